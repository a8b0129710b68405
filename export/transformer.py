"""The project's own PyTorch definition of the Qwen2 / Llama / Dream decoder, built for export.

One module serves both models: `causal=False` is Dream (bidirectional attention over the
cache and the whole window), `causal=True` is the verifier. Each forward takes a window of
tokens plus the cached keys/values of earlier positions and returns logits for the window and
the window's own keys/values, so a runtime can keep the cache in a preallocated buffer and
write new entries in place.

KV layout, shared by the graph inputs and outputs:
    past_kv  [batch, num_layers, 2, num_kv_heads, capacity, head_dim]   (2 = key, value)
    new_kv   [batch, num_layers, 2, num_kv_heads, seq_len,  head_dim]
past_kv is a whole cache buffer: only its first past_len = attention_mask length - seq_len
positions are read, so a runtime hands over its preallocated buffer as it is, whatever its
length, and crops by changing a number. Batch first: the rows of consecutive requests in a
runtime's per-model cache buffer (one row per slot) are one contiguous block it hands over as
it is. Each layer's keys are a contiguous block per head, the layout attention multiplies with.

In a batch each row has its own cache length and window length: the attention mask marks, per
row, which of the past_len cached positions and which window positions are real, and the
position ids carry each row's own positions.
"""

from __future__ import annotations

import torch
from torch import nn

from apd_deploy.export.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Qwen2 does, so fp16/bf16 graphs keep their accuracy. Divided by the
        # square root rather than multiplied by rsqrt: onnxruntime fuses this form into one
        # SimplifiedLayerNormalization kernel (six nodes fewer per norm, two norms per layer).
        x32 = x.float()
        x32 = x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [batch, seq, head_dim] for the default (unscaled) rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def apply_mask(scores: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
    # An addition rather than a select (masked_fill exports to Where): onnxruntime adds a
    # broadcast row far faster than it evaluates Where over the scores.
    return scores + mask_bias


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, past_k, past_v, mask_bias):
        """x [b, s, hidden]; past_k/v [b, kv_heads, p, d]; mask_bias [b, 1, 1 or s, p+s] fp32
        (0 where a query may attend, the lowest float where it may not).

        Returns the output and this window's keys/values [b, kv_heads, s, d].
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        group = self.heads // self.kv_heads
        q = q.reshape(b, self.kv_heads, group * s, self.head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (self.head_dim**-0.5)
        scores = scores.view(b, self.kv_heads, group, s, -1).float()
        scores = apply_mask(scores, mask_bias[:, :, None])
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(b, self.kv_heads, group * s, -1)
        out = torch.matmul(probs, values).view(b, self.heads, s, self.head_dim)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, qkv_bias)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, past_k, past_v, mask_bias):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, past_k, past_v, mask_bias)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Backbone(nn.Module):
    """Named `model` inside `DecoderLM` so parameter names match the Hugging Face checkpoints."""

    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, qkv_bias) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.config = cfg
        self.qkv_bias = qkv_bias
        self.model = Backbone(cfg, qkv_bias)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def empty_cache(self, batch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        c = self.config
        dtype = dtype or self.model.embed_tokens.weight.dtype
        return torch.zeros(batch, c.num_hidden_layers, 2, c.num_key_value_heads, 0, c.head_dim, dtype=dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_kv: torch.Tensor,
        logit_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, position_ids [b, s]; attention_mask [b, past_len + s] (1 = real token);
        past_kv as in the module docstring; logit_rows [n]: the rows that get logits, as indices
        into the batch's window rows flattened ([b * s]: row r's window position j is r * s + j),
        so each request of a batch asks for its own rows and no padding rows are projected.
        Returns fp32 logits [n, vocab] for logit_rows, or [b, s, vocab] without (training), and
        new_kv.

        Decoding needs logits for only some rows (APD's dLLM: not the W recomputed positions; the
        verifier: not the prompt), and the vocabulary projection of a large model costs as much
        as several layers and holds rows x vocab floats."""
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        s = input_ids.shape[1]
        past_len = attention_mask.shape[1] - s
        allowed = attention_mask.bool()[:, None, None, :]
        if cfg.causal:
            key_pos = torch.arange(attention_mask.shape[1], device=x.device)
            query_pos = torch.arange(s, device=x.device) + past_len
            allowed = allowed & (key_pos[None, :] <= query_pos[:, None])[None, None]
        # The lowest float, not -inf: a fully masked (padding) row stays finite. Computed once for
        # all layers; for the dLLM it is a single row broadcast over every query.
        mask_bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        new_kv = []
        for i, layer in enumerate(self.model.layers):
            past_k = past_kv[:, i, 0, :, :past_len]
            past_v = past_kv[:, i, 1, :, :past_len]
            x, k, v = layer(x, cos, sin, past_k, past_v, mask_bias)
            new_kv.append(torch.stack([k, v], dim=1))
        if logit_rows is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, logit_rows)
        logits = self.lm_head(self.model.norm(x)).float()
        return logits, torch.stack(new_kv, dim=1)

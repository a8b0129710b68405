"""`apd-deploy make-tiny`: a pair of random checkpoints in the real formats.

The default `tiny` pair exercises what real pairs have: grouped-query attention, q/k/v biases,
a verifier with tied embeddings, and a dLLM vocabulary larger than the verifier's (Dream has
152064 rows, Qwen2.5 151936). The `30m` preset has realistic proportions for CPU benchmarks.
Weights are drawn with std 0.3 so that a random model's predictions vary from position to
position instead of repeating one token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apd_deploy.bundle import staged_directory
from apd_deploy.errors import ApdDeployError

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INIT_STD = 0.3


@dataclass(frozen=True)
class Dims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


# (dLLM, verifier) per preset. The tokenizer has 260 tokens; both vocabularies are padded past
# it, the dLLM's further, as real checkpoints pad theirs.
PRESETS = {
    "tiny": (Dims(288, 64, 128, 2, 4, 2), Dims(272, 32, 64, 2, 4, 2)),
    # Realistic proportions for CPU benchmarks: a ~30M-parameter dLLM and a ~3M verifier.
    "30m": (Dims(8000, 512, 1536, 8, 8, 2), Dims(8000, 256, 768, 4, 4, 2)),
}
MAX_POSITIONS = {"tiny": 512, "30m": 2048}


def build_tokenizer():
    """A byte-level BPE tokenizer (256 byte tokens, no merges) plus Qwen-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _config(dims: Dims, special: dict[str, int], dllm: bool, max_positions: int) -> dict:
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|endoftext|>"],
        "pad_token_id": special["<|endoftext|>"],
        "hidden_act": "silu",
        "hidden_size": dims.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": dims.intermediate_size,
        "max_position_embeddings": max_positions,
        "num_attention_heads": dims.num_attention_heads,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_key_value_heads": dims.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "vocab_size": dims.vocab_size,
    }
    if dllm:
        return {"architectures": ["DreamModel"], "model_type": "Dream", "mask_token_id": special["<|mask|>"],
                "tie_word_embeddings": False, **common}
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True,
            "layer_types": ["full_attention"] * dims.num_hidden_layers, **common}


def random_weights(dims: Dims, tied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Weights named as in Qwen2 / Dream checkpoints, with q/k/v biases."""
    h, i = dims.hidden_size, dims.intermediate_size
    head_dim = h // dims.num_attention_heads
    q, kv = dims.num_attention_heads * head_dim, dims.num_key_value_heads * head_dim

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, INIT_STD, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(dims.vocab_size, h), "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(dims.num_hidden_layers):
        p = f"model.layers.{layer}."
        weights.update({
            p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.q_proj.bias": normal(q),
            p + "self_attn.k_proj.weight": normal(kv, h), p + "self_attn.k_proj.bias": normal(kv),
            p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.v_proj.bias": normal(kv),
            p + "self_attn.o_proj.weight": normal(h, q),
            p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        })
    if not tied:
        weights["lm_head.weight"] = normal(dims.vocab_size, h)
    return weights


def write_checkpoint(directory: Path, config: dict, weights: dict[str, np.ndarray], tokenizer=None) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
            "chat_template": CHAT_TEMPLATE,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def make_tiny(out: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write `out/dllm` and `out/verifier`; returns `out`."""
    if preset not in PRESETS:
        raise ApdDeployError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    dllm_dims, verifier_dims = PRESETS[preset]
    tokenizer = build_tokenizer()
    special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    rng = np.random.default_rng(seed)
    out = Path(out)
    with staged_directory(out, overwrite) as staging:
        positions = MAX_POSITIONS[preset]
        write_checkpoint(staging / "dllm", _config(dllm_dims, special, True, positions),
                         random_weights(dllm_dims, tied=False, rng=rng), tokenizer)
        write_checkpoint(staging / "verifier", _config(verifier_dims, special, False, positions),
                         random_weights(verifier_dims, tied=True, rng=rng), tokenizer)
    return out

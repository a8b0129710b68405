"""`apd-deploy make-tiny`: a pair of random checkpoints in the real formats.

The default `tiny` pair exercises what real pairs have: grouped-query attention, q/k/v biases,
a verifier with tied embeddings, and a dLLM vocabulary larger than the verifier's (Dream has
152064 rows, Qwen2.5 151936). The `30m` preset has realistic proportions for CPU benchmarks, the
`600m` preset real widths for GPU benchmarks.

Weights are drawn so that a random model behaves like a model, at a trained model's scale:
projection matrices with std 1/sqrt(fan_in) (each layer keeps its input's scale, so attention is
not uniform and predictions vary from position to position), embeddings and biases with std 0.02
as real initialisers draw them, and a final norm gain that gives the logits std 3 (a largest
|logit| of 10-20). Earlier presets drew everything with std 0.3: the 30m pair's activations grew
layer after layer to logits in the thousands, and its fp16 graph failed its own check. All
weights at std 0.02 instead leave attention uniform and the dLLM predicting one token at every
masked position.

The pair's directory holds `make-tiny.json`, the list of what was written: `--overwrite`
replaces a pair that has one, and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apd_deploy.errors import ApdDeployError, BundleError
from apd_deploy.staging import staged_directory

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INIT_STD = 0.02
LOGITS_STD = 3.0
MARKER = "make-tiny.json"


@dataclass(frozen=True)
class Dims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class Preset:
    dllm: Dims
    verifier: Dims
    max_positions: int
    rope_theta: float = 10000.0


# The tokenizer has 260 tokens; both vocabularies are padded past it, the dLLM's further, as
# real checkpoints pad theirs.
PRESETS = {
    "tiny": Preset(Dims(288, 64, 128, 2, 4, 2), Dims(272, 32, 64, 2, 4, 2), 512),
    # Realistic proportions for CPU benchmarks: a ~30M-parameter dLLM and a ~3M verifier.
    "30m": Preset(Dims(8000, 512, 1536, 8, 8, 2), Dims(8000, 256, 768, 4, 4, 2), 2048),
    # Real widths for GPU benchmarks: Qwen2.5-0.5B's dimensions with Dream's vocabulary, untied
    # (~0.63B), and a small verifier with Qwen2.5's vocabulary, tied.
    "600m": Preset(Dims(152064, 896, 4864, 24, 14, 2), Dims(151936, 512, 2048, 8, 8, 2), 4096, rope_theta=1e6),
}


def build_tokenizer():
    """A byte-level BPE tokenizer (256 byte tokens, no merges) plus Qwen-style special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def model_config(dims: Dims, special: dict[str, int], dllm: bool, preset: Preset) -> dict:
    common = {
        "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|endoftext|>"],
        "pad_token_id": special["<|endoftext|>"],
        "hidden_act": "silu",
        "hidden_size": dims.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": dims.intermediate_size,
        "max_position_embeddings": preset.max_positions,
        "num_attention_heads": dims.num_attention_heads,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_key_value_heads": dims.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": preset.rope_theta,
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


def weight_shapes(dims: Dims, tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as in Qwen2 / Dream checkpoints, with q/k/v biases."""
    h, i = dims.hidden_size, dims.intermediate_size
    head_dim = h // dims.num_attention_heads
    q, kv = dims.num_attention_heads * head_dim, dims.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (dims.vocab_size, h), "model.norm.weight": (h,)}
    for layer in range(dims.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    if not tied:
        shapes["lm_head.weight"] = (dims.vocab_size, h)
    return shapes


def random_weights(dims: Dims, tied: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights for `weight_shapes`. Each projection matrix is drawn with std 1/sqrt(fan_in),
    so that it keeps its input's scale; embeddings and biases with std INIT_STD, as real
    initialisers draw them; layer norms at one; the final norm's gain makes the logits' std
    LOGITS_STD."""
    h = dims.hidden_size
    weights = {}
    for name, shape in weight_shapes(dims, tied).items():
        if name == "model.norm.weight":
            head_std = INIT_STD if tied else h ** -0.5  # tied: the head is the embedding
            weights[name] = np.full(shape, LOGITS_STD / (head_std * h ** 0.5), np.float32)
        elif name.endswith("norm.weight"):
            weights[name] = np.ones(shape, np.float32)
        else:
            std = INIT_STD if name == "model.embed_tokens.weight" or len(shape) == 1 else shape[1] ** -0.5
            weights[name] = rng.standard_normal(shape, dtype=np.float32)  # float32 throughout: 600m draws 0.63B values
            weights[name] *= std
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


def recognise_pair(directory: Path) -> None:
    """Raise BundleError unless `directory` is a pair written by make-tiny and holds nothing else."""
    refuse = "--overwrite replaces only a pair written by `apd-deploy make-tiny`; move it away or choose another path"
    try:
        listed = set(json.loads((directory / MARKER).read_text())["files"]) | {MARKER}
    except FileNotFoundError:
        raise BundleError(f"{directory}: not a pair written by make-tiny (no {MARKER}); {refuse}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{directory / MARKER}: unreadable ({exc}); {refuse}") from None
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
    foreign = sorted(present - listed)
    if foreign:
        raise BundleError(
            f"{directory}: holds files make-tiny did not write ({', '.join(foreign[:5])}); --overwrite would delete "
            "them: move them out or choose another path"
        )


def make_tiny(out: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Write `out/dllm` and `out/verifier`; returns `out`. With `overwrite`, `out` may be an
    earlier pair (and nothing else)."""
    if preset not in PRESETS:
        raise ApdDeployError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    out = Path(out)
    chosen = PRESETS[preset]
    tokenizer = build_tokenizer()
    special = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    rng = np.random.default_rng(seed)
    with staged_directory(out, overwrite, recognise_pair) as staging:
        # One model's weights in memory at a time: 600m's dLLM alone is 2.5 GB.
        write_checkpoint(staging / "dllm", model_config(chosen.dllm, special, True, chosen),
                         random_weights(chosen.dllm, tied=False, rng=rng), tokenizer)
        write_checkpoint(staging / "verifier", model_config(chosen.verifier, special, False, chosen),
                         random_weights(chosen.verifier, tied=True, rng=rng), tokenizer)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        marker = {"written_by": "apd-deploy make-tiny", "preset": preset, "seed": seed, "files": files}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out

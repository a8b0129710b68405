"""The architecture description of a checkpoint, read from its `config.json`.

Dream (the diffusion LLM) is Qwen2's layout with bidirectional attention; the verifier is any
Qwen2 or Llama causal LM. One dataclass describes all three.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apd_deploy.errors import CheckpointError

ROLE_MODEL_TYPES = {"dllm": ("Dream",), "verifier": ("qwen2", "llama")}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    causal: bool
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out


def _field(raw: dict[str, Any], name: str, path: Path, kind: type, default: Any = ...) -> Any:
    if name not in raw or raw[name] is None:
        if default is ...:
            raise CheckpointError(f"{path}: field '{name}' is missing; add it to config.json")
        return default
    value = raw[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(
            f"{path}: field '{name}' is {value!r}, expected {kind.__name__}; fix config.json"
        )
    return value


def _rope_theta(raw: dict[str, Any], path: Path) -> float:
    # transformers 5 moves rope settings into `rope_parameters`; older configs keep
    # `rope_theta` and `rope_scaling` at the top level.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(
            f"{path}: rope type '{rope_type}' is not supported (only the default rotary "
            "embedding); remove 'rope_scaling' or use a checkpoint without it"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return _field({"rope_theta": theta}, "rope_theta", path, float)


def _eos_ids(raw: dict[str, Any], path: Path) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CheckpointError(f"{path}: field 'eos_token_id' is {eos!r}, expected an int or a list of ints")
    return tuple(ids)


def read_config(config_path: Path, role: str) -> ModelConfig:
    """Parse `config_path` as the config of a `role` model ('dllm' or 'verifier')."""
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{config_path.parent}: no config.json; expected a Hugging Face checkpoint directory "
            "(config.json + *.safetensors)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc}); re-save the config") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object at the top level")

    model_type = raw.get("model_type")
    allowed = ROLE_MODEL_TYPES[role]
    if model_type not in allowed:
        hint = "a Dream diffusion LLM" if role == "dllm" else "a Qwen2 or Llama causal LM"
        raise CheckpointError(
            f"{config_path}: field 'model_type' is {model_type!r}, but the {role} must be {hint} "
            f"(model_type one of {', '.join(allowed)})"
        )
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{config_path}: 'use_sliding_window' is true; sliding-window attention is not supported")
    heads = _field(raw, "num_attention_heads", config_path, int)
    hidden = _field(raw, "hidden_size", config_path, int)
    kv_heads = _field(raw, "num_key_value_heads", config_path, int, heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{config_path}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    head_dim = _field(raw, "head_dim", config_path, int, hidden // heads)
    if head_dim % 2:
        raise CheckpointError(f"{config_path}: head dimension {head_dim} is odd; rotary embeddings need it even")
    return ModelConfig(
        model_type=model_type,
        vocab_size=_field(raw, "vocab_size", config_path, int),
        hidden_size=hidden,
        intermediate_size=_field(raw, "intermediate_size", config_path, int),
        num_hidden_layers=_field(raw, "num_hidden_layers", config_path, int),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rope_theta=_rope_theta(raw, config_path),
        rms_norm_eps=_field(raw, "rms_norm_eps", config_path, float, 1e-6),
        max_position_embeddings=_field(raw, "max_position_embeddings", config_path, int),
        tie_word_embeddings=_field(raw, "tie_word_embeddings", config_path, bool, False),
        causal=role == "verifier",
        mask_token_id=_field(raw, "mask_token_id", config_path, int, ... if role == "dllm" else None),
        pad_token_id=_field(raw, "pad_token_id", config_path, int, None),
        bos_token_id=_field(raw, "bos_token_id", config_path, int, None),
        eos_token_ids=_eos_ids(raw, config_path),
    )

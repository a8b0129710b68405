"""Load a local Hugging Face checkpoint directory into the project's PyTorch decoder.

Local directories only: nothing is ever fetched from a hub. safetensors are the default; pickled
`.bin` weights can run arbitrary code when loaded and are refused unless the caller opts in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from apd_deploy.errors import CheckpointError
from apd_deploy.export.config import ModelConfig, read_config
from apd_deploy.export.transformer import DecoderLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: DecoderLM
    weight_files: list[Path]

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]


def _weight_files(directory: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """The weight files of `directory` and whether they are pickles."""
    for index_name, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index}: not a valid index file (needs a 'weight_map' object): {exc}") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard(s) {', '.join(missing)} listed in 'weight_map' are missing")
            files = [directory / s for s in shards]
            break
    else:
        files = sorted(directory.glob("*.safetensors"))
        pickled = not files
        if pickled:
            files = sorted(directory.glob("*.bin"))
    if not files:
        raise CheckpointError(
            f"{directory}: no weights found; expected model.safetensors (or sharded *.safetensors "
            "with model.safetensors.index.json) next to config.json"
        )
    if pickled and not allow_pickle:
        raise CheckpointError(
            f"{files[0]}: pickled PyTorch weights can execute code when loaded and are refused; convert "
            "the checkpoint to safetensors, or pass --allow-pickle if you trust its source"
        )
    return files, pickled


def _read_tensors(files: list[Path], pickled: bool) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if pickled:
                tensors.update(torch.load(f, map_location="cpu", weights_only=True))
            else:
                from safetensors.torch import load_file

                tensors.update(load_file(f))
        except Exception as exc:  # the libraries raise many types for a damaged file
            raise CheckpointError(f"{f}: cannot read weights ({type(exc).__name__}: {exc}); re-download or re-save it") from None
    return tensors


def load_checkpoint(path: str | Path, role: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> Checkpoint:
    """Load the checkpoint directory `path` as the `role` model ('dllm' or 'verifier')."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: not a directory; --{role} takes a local checkpoint directory (config.json + *.safetensors)"
        )
    config = read_config(directory / "config.json", role)
    files, pickled = _weight_files(directory, allow_pickle)
    tensors = _read_tensors(files, pickled)

    qkv_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    with torch.device("meta"):
        model = DecoderLM(config, qkv_bias)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        hint = " (is 'tie_word_embeddings' right in config.json?)" if "lm_head.weight" in missing else ""
        raise CheckpointError(f"{directory}: weights do not match config.json: {'; '.join(parts)}{hint}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{directory}: tensor '{name}' has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(expected[name].shape)}; the config does not belong to these weights"
            )
        tensors[name] = tensor.to(dtype)
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced the shared parameter: share it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return Checkpoint(directory, config, model.eval(), files)

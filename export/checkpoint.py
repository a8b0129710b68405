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
class CheckpointFiles:
    """A checkpoint directory checked without reading its weights."""

    path: Path
    config: ModelConfig
    weight_files: list[Path]
    pickled: bool

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    model: DecoderLM
    weight_files: list[Path]


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


READ_CHUNK_BYTES = 1 << 26
# safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file in `dtype`, read with plain reads in chunks of
    READ_CHUNK_BYTES, each converted into its place in the result.

    Neither the file (memory-mapped by the safetensors library, so its pages count towards the
    process's memory while it is open: a 4 GB shard is 4 GB more at the peak) nor a tensor in its
    stored dtype (a 1 GB bf16 embedding beside its fp32 conversion) is ever held beside the
    converted model: only one chunk is."""
    tensors = {}
    with open(path, "rb") as f:
        header_bytes = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_bytes))
        start = 8 + header_bytes
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            stored = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            tensor = torch.empty(entry["shape"], dtype=dtype)
            flat = tensor.view(-1)
            if (end - begin) != flat.numel() * stored.itemsize:
                raise ValueError(f"tensor '{name}': {end - begin} bytes for shape {entry['shape']} of {entry['dtype']}")
            f.seek(start + begin)
            step = max(1, READ_CHUNK_BYTES // stored.itemsize)
            for first in range(0, flat.numel(), step):
                raw = bytearray(min(step, flat.numel() - first) * stored.itemsize)
                if f.readinto(raw) != len(raw):
                    raise ValueError(f"tensor '{name}' runs past the end of the file")
                flat[first:first + len(raw) // stored.itemsize] = torch.frombuffer(raw, dtype=stored)
            tensors[name] = tensor
    return tensors


def _read_tensors(files: list[Path], pickled: bool, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of `files` in `dtype`."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if pickled:
                loaded = torch.load(f, map_location="cpu", weights_only=True)
                tensors.update((name, loaded.pop(name).to(dtype)) for name in list(loaded))
            else:
                tensors.update(_read_safetensors(f, dtype))
        except Exception as exc:  # the libraries raise many types for a damaged file
            raise CheckpointError(f"{f}: cannot read weights ({type(exc).__name__}: {exc}); re-download or re-save it") from None
    return tensors


def _header_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors headers, without reading any weights."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as opened:
                shapes.update((name, tuple(opened.get_slice(name).get_shape())) for name in opened.keys())
        except Exception as exc:  # the libraries raise many types for a damaged file
            raise CheckpointError(f"{f}: cannot read weights ({type(exc).__name__}: {exc}); re-download or re-save it") from None
    return shapes


def _match_weights(directory: Path, config: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Check the checkpoint's tensor names and shapes against `config`; returns the names to
    load, with their shapes (a tied checkpoint's stored copy of the embeddings and rotary
    buffers are dropped)."""
    qkv_bias = "model.layers.0.self_attn.q_proj.bias" in shapes
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in DecoderLM(config, qkv_bias).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    found = {k: v for k, v in shapes.items()
             if not k.endswith("rotary_emb.inv_freq") and not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = [f"{what} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                 for what, names in (("missing", missing), ("unexpected", unexpected)) if names]
        hint = " (is 'tie_word_embeddings' right in config.json?)" if "lm_head.weight" in missing else ""
        raise CheckpointError(f"{directory}: weights do not match config.json: {'; '.join(parts)}{hint}")
    for name, shape in found.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"{directory}: tensor '{name}' has shape {shape}, config.json implies "
                f"{expected[name]}; the config does not belong to these weights"
            )
    return found


def inspect_checkpoint(path: str | Path, role: str, allow_pickle: bool = False) -> CheckpointFiles:
    """Check the directory `path` as the `role` model ('dllm' or 'verifier'): its config and,
    from the safetensors headers, its tensor names and shapes. Cheap: no weights are read."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: not a directory; --{role} takes a local checkpoint directory (config.json + *.safetensors)"
        )
    config = read_config(directory / "config.json", role)
    files, pickled = _weight_files(directory, allow_pickle)
    if not pickled:  # pickles have no header: they are checked once loaded
        _match_weights(directory, config, _header_shapes(files))
    return CheckpointFiles(directory, config, files, pickled)


def load_checkpoint(path: str | Path, role: str, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> Checkpoint:
    """Load the checkpoint directory `path` as the `role` model ('dllm' or 'verifier')."""
    found = inspect_checkpoint(path, role, allow_pickle)
    directory, config = found.path, found.config
    tensors = _read_tensors(found.weight_files, found.pickled, dtype)
    names = _match_weights(directory, config, {k: tuple(v.shape) for k, v in tensors.items()})
    tensors = {k: v for k, v in tensors.items() if k in names}
    with torch.device("meta"):
        model = DecoderLM(config, "model.layers.0.self_attn.q_proj.bias" in tensors)
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced the shared parameter: share it again
        model.lm_head.weight = model.model.embed_tokens.weight
    return Checkpoint(directory, config, model.eval(), found.weight_files)

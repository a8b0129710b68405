"""Helpers that write small checkpoint directories for tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from apd_deploy.export.tiny import Dims, random_weights, write_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"


def dims_of(config: dict) -> Dims:
    return Dims(config["vocab_size"], config["hidden_size"], config["intermediate_size"],
                config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"])


def checkpoint_from_config(directory: Path, config: dict, seed: int = 0, qkv_bias: bool = True) -> Path:
    """A checkpoint with random weights named as Hugging Face names them, for `config`."""
    weights = random_weights(dims_of(config), config.get("tie_word_embeddings", False), np.random.default_rng(seed))
    if not qkv_bias:
        weights = {k: v for k, v in weights.items() if not k.endswith(".bias")}
    write_checkpoint(directory, config, weights)
    return directory


def fixture_config(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def shard(directory: Path, out: Path, parts: int = 2) -> Path:
    """Copy the single-file checkpoint `directory` to `out` as `parts` shards with an index."""
    from safetensors.numpy import load_file, save_file

    out.mkdir()
    shutil.copy(directory / "config.json", out / "config.json")
    tensors = load_file(str(directory / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(parts):
        shard_name = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[i::parts]}
        save_file(chunk, str(out / shard_name), metadata={"format": "pt"})
        weight_map.update({n: shard_name for n in chunk})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out

"""Run one exported decoder graph with onnxruntime."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apd_deploy.errors import BundleError
from apd_deploy.runtime.kv_cache import KVCache

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def default_threads() -> int:
    """Half the cores, at most 4: these machines are shared, and a second thread that competes
    with another process slows a step down rather than up."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to know about a graph, read from its manifest entry."""

    vocab_size: int
    max_positions: int
    kv_shape: tuple[int, ...]
    kv_dtype: str

    @classmethod
    def from_manifest(cls, entry: dict[str, Any]) -> DecoderSpec:
        past = next(t for t in entry["inputs"] if t["name"] == "past_kv")
        return cls(entry["config"]["vocab_size"], entry["config"]["max_position_embeddings"],
                   tuple(past["shape"][2:]), past["dtype"])


class OrtDecoder:
    """One onnxruntime session over a decoder graph. `run` is safe to call from several threads:
    all per-request state (the cache) is passed in."""

    def __init__(self, graph: Path, spec: DecoderSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        if spec.kv_dtype not in NUMPY_DTYPES:
            raise BundleError(
                f"{graph}: its KV cache is {spec.kv_dtype}, which onnxruntime's CPU provider cannot run; "
                "export with --dtype fp32 or fp16 for CPU"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self.spec = spec
        self.kv_dtype = np.dtype(NUMPY_DTYPES[spec.kv_dtype])
        self._positions = np.arange(spec.max_positions, dtype=np.int64)[None]
        self._ones = np.ones((1, spec.max_positions), dtype=np.int64)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity, self.spec.kv_shape, self.kv_dtype)

    def run(self, ids: np.ndarray, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        """Feed `ids` (1-D) at the positions right after `cache`; returns logits [n, vocab] and
        the window's keys/values [1, n, ...]. The cache itself is not changed."""
        start, n = cache.length, len(ids)
        feed = {
            "input_ids": ids.reshape(1, n),
            "position_ids": self._positions[:, start : start + n],
            "attention_mask": self._ones[:, : start + n],
            "past_kv": cache.past(),
        }
        logits, new_kv = self.session.run(["logits", "new_kv"], feed)
        return logits[0], new_kv

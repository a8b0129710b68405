"""Engine backends: run one exported decoder graph, behind one small interface.

Every backend takes token ids and a `KVCache` and returns logits and the window's keys/values
as arrays of its array module (`xp`): numpy for onnxruntime on the CPU (here), cupy for
onnxruntime's CUDA provider (`cuda_engine.py`) and for TensorRT (`tensorrt_engine.py`). The
cache buffer lives where the engine reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from apd_deploy.errors import BundleError
from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.fixed_shapes import FixedShape, PaddedInputs
from apd_deploy.runtime.kv_cache import KVCache

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
GRAPH_INPUTS = ("input_ids", "position_ids", "attention_mask", "past_kv", "logit_rows")
# APD alternates between two sessions. A session's worker threads spin for a while after each
# call by default, and then burn the cores the other session is about to use.
SPIN_BETWEEN_CALLS = False


def default_threads() -> int:
    """Every core this process may run on (its affinity mask where the OS has one, as taskset and
    container CPU sets narrow it), as onnxruntime and PyTorch choose by default. The two models
    run one after the other, so each session gets all of them; on a shared machine pass fewer."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class DecoderSpec:
    """What the runtime needs to know about a graph, read from its manifest entry."""

    vocab_size: int
    max_positions: int
    kv_dims: tuple[int, int, int]  # layers, kv_heads, head_dim
    kv_dtype: str

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], manifest_path: Path, role: str) -> DecoderSpec:
        names = [t["name"] for t in entry["inputs"]]
        missing = [name for name in GRAPH_INPUTS if name not in names]
        if missing:
            raise BundleError(f"{manifest_path}: models.{role}.inputs lacks {', '.join(missing)}: the bundle was "
                              "exported by an older apd-deploy; export it again with apd-deploy export")
        past = next(t for t in entry["inputs"] if t["name"] == "past_kv")
        layers, _, _, kv_heads, _, head_dim = past["shape"]
        return cls(entry["config"]["vocab_size"], entry["config"]["max_position_embeddings"],
                   (layers, kv_heads, head_dim), past["dtype"])

    def new_kv_shape(self, seq_len: int) -> tuple[int, ...]:
        layers, kv_heads, head_dim = self.kv_dims
        return (layers, 2, 1, kv_heads, seq_len, head_dim)


class DecoderEngine(Protocol):
    spec: DecoderSpec
    xp: ModuleType
    # Draft tokens the verifier scores in its first call of a step (each further call doubles),
    # or None for the whole draft at once: on the CPU a call costs its tokens, so scoring stops
    # at the first chunk with a rejection; on a GPU a call costs its launch and its host sync.
    first_verify_chunk: int | None

    def new_cache(self, capacity: int) -> KVCache: ...

    def run(self, ids, cache: KVCache, rows=None) -> tuple[Any, Any]:
        """Feed `ids` (1-D, host or device) at the positions right after `cache`; returns logits
        [len(rows), vocab] for the window rows `rows` (host int64 indices; default: every row)
        and the window's keys/values [..., n, head_dim]. The cache itself is not changed. The
        returned arrays may be the engine's own buffers: valid until its next call."""


def window_feed(xp: ModuleType, ids, cache: KVCache, rows, positions, ones) -> dict[str, Any]:
    """The graph inputs of one call (ids already [1, n] on the engine's side). `positions` and
    `ones` are per-engine constants [1, max_positions] sliced here instead of built per call."""
    start, n = cache.length, ids.shape[1]
    return {
        "input_ids": ids,
        "position_ids": positions[:, start : start + n],
        "attention_mask": ones[:, : start + n],
        "past_kv": cache.buffer,
        "logit_rows": positions[0, :n] if rows is None else xp.asarray(rows, dtype=np.int64),
    }


def ort_session_options(threads: int | None, options: dict[str, Any] | None):
    """onnxruntime session options for `threads` intra-op threads and the engine record's options."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN_BETWEEN_CALLS else "0")
    level = (options or {}).get("graph_optimization_level")
    if level:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return so


class OrtCpuDecoder:
    """onnxruntime on the CPU. With `xp` = cupy the logits are moved to the GPU after each call,
    which only makes sense to exercise the cupy array backend on a machine without a GPU engine.
    `fixed_shapes` pads every call as the CUDA engine does (`fixed_shapes.py`): slower here, it
    checks the padding and the masks against exact-size calls token for token."""

    first_verify_chunk = 8

    def __init__(self, graph: Path, spec: DecoderSpec, threads: int | None = None,
                 session_options: dict[str, Any] | None = None, xp: ModuleType = np,
                 fixed_shapes: bool = False) -> None:
        import onnxruntime as ort

        if spec.kv_dtype not in NUMPY_DTYPES:
            raise BundleError(
                f"{graph}: its KV cache is {spec.kv_dtype}, which onnxruntime's CPU provider cannot run; "
                "export with --dtype fp32 or fp16 for CPU, or build a TensorRT engine"
            )
        self.session = ort.InferenceSession(str(graph), ort_session_options(threads, session_options),
                                            providers=["CPUExecutionProvider"])
        self.spec, self.xp = spec, xp
        self.kv_dtype = np.dtype(NUMPY_DTYPES[spec.kv_dtype])
        self._positions = np.arange(spec.max_positions, dtype=np.int64)[None]
        self._ones = np.ones((1, spec.max_positions), dtype=np.int64)
        self._padded: dict[FixedShape, PaddedInputs] | None = {} if fixed_shapes else None

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity, *self.spec.kv_dims, self.kv_dtype)

    def run(self, ids, cache: KVCache, rows=None):
        ids = to_host(ids).reshape(1, -1)
        rows = None if rows is None else to_host(rows)
        if self._padded is None:
            feed = window_feed(np, ids, cache, rows, self._positions, self._ones)
            logits, new_kv = self.session.run(["logits", "new_kv"], feed)
            logits = logits[0]
        else:
            logits, new_kv = self._run_padded(ids, cache, rows)
        return (logits if self.xp is np else self.xp.asarray(logits)), new_kv

    def _run_padded(self, ids: np.ndarray, cache: KVCache, rows: np.ndarray | None):
        shape = FixedShape.for_call(ids.shape[1], rows, cache.capacity)
        if shape not in self._padded:
            self._padded[shape] = PaddedInputs(np, shape, self.spec.kv_dims, self.kv_dtype, self.spec.max_positions)
        inputs = self._padded[shape]
        n, count = inputs.write(ids, cache, rows)
        logits, new_kv = self.session.run(["logits", "new_kv"], inputs.arrays)
        return logits[0, :count], new_kv[..., :n, :]

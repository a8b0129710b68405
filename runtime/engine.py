"""Engine backends: run one exported decoder graph, behind one small interface.

Every backend takes token ids and a `KVCache` and returns logits and the window's keys/values
as arrays of its array module (`xp`): numpy for onnxruntime on the CPU, cupy for onnxruntime's
CUDA provider (I/O bound to device buffers) and for TensorRT (`tensorrt_engine.py`). The cache
buffer lives where the engine reads it.
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

    def new_cache(self, capacity: int) -> KVCache: ...

    def run(self, ids, cache: KVCache, rows=None) -> tuple[Any, Any]:
        """Feed `ids` (1-D, host or device) at the positions right after `cache`; returns logits
        [len(rows), vocab] for the window rows `rows` (int64 indices; default: every row) and the
        window's keys/values [1, n, ...]. The cache itself is not changed."""


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


def _session_options(threads: int | None, options: dict[str, Any] | None):
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
    which only makes sense to exercise the cupy array backend on a machine without a GPU engine."""

    def __init__(self, graph: Path, spec: DecoderSpec, threads: int | None = None,
                 session_options: dict[str, Any] | None = None, xp: ModuleType = np) -> None:
        import onnxruntime as ort

        if spec.kv_dtype not in NUMPY_DTYPES:
            raise BundleError(
                f"{graph}: its KV cache is {spec.kv_dtype}, which onnxruntime's CPU provider cannot run; "
                "export with --dtype fp32 or fp16 for CPU, or build a TensorRT engine"
            )
        self.session = ort.InferenceSession(str(graph), _session_options(threads, session_options),
                                            providers=["CPUExecutionProvider"])
        self.spec, self.xp = spec, xp
        self.kv_dtype = np.dtype(NUMPY_DTYPES[spec.kv_dtype])
        self._positions = np.arange(spec.max_positions, dtype=np.int64)[None]
        self._ones = np.ones((1, spec.max_positions), dtype=np.int64)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity, *self.spec.kv_dims, self.kv_dtype)

    def run(self, ids, cache: KVCache, rows=None):
        ids = to_host(ids).reshape(1, -1)
        feed = window_feed(np, ids, cache, None if rows is None else to_host(rows), self._positions, self._ones)
        logits, new_kv = self.session.run(["logits", "new_kv"], feed)
        return (logits[0] if self.xp is np else self.xp.asarray(logits[0])), new_kv


class OrtCudaDecoder:
    """onnxruntime's CUDA provider with I/O binding: ids, caches and logits stay in cupy buffers
    on the GPU; nothing is copied to the host here."""

    def __init__(self, graph: Path, spec: DecoderSpec, threads: int | None = None,
                 session_options: dict[str, Any] | None = None) -> None:
        import onnxruntime as ort

        from apd_deploy.accelerators import require_cupy, require_ort_cuda

        if spec.kv_dtype not in NUMPY_DTYPES:
            raise BundleError(
                f"{graph}: its KV cache is {spec.kv_dtype}, which onnxruntime's I/O binding cannot take from "
                "Python (no numpy dtype); build a TensorRT engine for bf16, or export fp16"
            )
        require_ort_cuda()
        self.xp = cupy = require_cupy()
        self.session = ort.InferenceSession(str(graph), _session_options(threads, session_options),
                                            providers=[("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"])
        self.spec = spec
        self.kv_dtype = np.dtype(NUMPY_DTYPES[spec.kv_dtype])
        self._positions = cupy.arange(spec.max_positions, dtype=np.int64)[None]
        self._ones = cupy.ones((1, spec.max_positions), dtype=np.int64)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity, *self.spec.kv_dims, self.kv_dtype, xp=self.xp)

    @staticmethod
    def _bind(binding, name: str, array, output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, "cuda", 0, array.dtype.type, list(array.shape), array.data.ptr)

    def run(self, ids, cache: KVCache, rows=None):
        cupy = self.xp
        ids = cupy.asarray(ids, dtype=np.int64).reshape(1, -1)
        feed = window_feed(cupy, ids, cache, rows, self._positions, self._ones)
        logits = cupy.empty((1, len(feed["logit_rows"]), self.spec.vocab_size), dtype=np.float32)
        new_kv = cupy.empty(self.spec.new_kv_shape(ids.shape[1]), dtype=self.kv_dtype)
        binding = self.session.io_binding()
        for name, array in feed.items():
            self._bind(binding, name, cupy.ascontiguousarray(array))
        self._bind(binding, "logits", logits, output=True)
        self._bind(binding, "new_kv", new_kv, output=True)
        # cupy wrote the inputs on its stream; onnxruntime reads them on its own.
        cupy.cuda.get_current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return logits[0], new_kv

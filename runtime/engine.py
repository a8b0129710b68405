"""Engine backends: run one exported decoder graph, behind one small interface.

Every backend takes a batch of `EngineCall`s (each request's token ids, its `KVCache` and the
rows it wants logits for; one call for a request decoding alone) and returns, per call, logits
and the window's keys/values as arrays of its array module (`xp`): numpy for onnxruntime on the
CPU (here), cupy for onnxruntime's CUDA provider (`cuda_engine.py`) and for TensorRT
(`tensorrt_engine.py`). The cache buffers live where the engine reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from apd_deploy.accelerators import default_threads
from apd_deploy.bundle import kv_dims
from apd_deploy.errors import BundleError
from apd_deploy.runtime.arrays import synchronize, to_host
from apd_deploy.runtime.fixed_shapes import FixedShape, PaddedInputs
from apd_deploy.runtime.kv_cache import KVCache, KVSlots, stacked_past

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
GRAPH_INPUTS = ("input_ids", "position_ids", "attention_mask", "past_kv", "logit_rows")
# APD alternates between two sessions. A session's worker threads spin for a while after each
# call by default, and then burn the cores the other session is about to use.
SPIN_BETWEEN_CALLS = False


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
        return cls(entry["config"]["vocab_size"], entry["config"]["max_position_embeddings"], kv_dims(entry),
                   past["dtype"])

    def new_kv_shape(self, batch: int, seq_len: int) -> tuple[int, ...]:
        layers, kv_heads, head_dim = self.kv_dims
        return (batch, layers, 2, kv_heads, seq_len, head_dim)


@dataclass(frozen=True)
class EngineCall:
    """One request's share of an engine call: `ids` (1-D, host or device) fed at the positions
    right after `cache`, asking for logits of the window rows `rows` (host int64; None: every row)."""

    ids: Any
    cache: KVCache
    rows: np.ndarray | None = None


class DecoderEngine(Protocol):
    spec: DecoderSpec
    xp: ModuleType
    # Draft tokens the verifier scores in its first call of a step (each further call doubles),
    # or None for the whole draft at once: on the CPU a call costs its tokens, so scoring stops
    # at the first chunk with a rejection; on a GPU a call costs its launch and its host sync.
    first_verify_chunk: int | None
    # What a call costs beyond its tokens, in window tokens of one request: the scheduler splits a
    # batch whose windows differ in length where padding the short ones would cost more (CPU:
    # a call's fixed cost is small, its tokens are compute; GPU: a call costs its launches).
    call_cost_tokens: int

    def new_cache(self, capacity: int) -> KVCache: ...

    def new_slots(self, slots: int, capacity: int) -> KVSlots: ...

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        """One graph call for every request in `calls`, each a row of the batch with its own cache
        length and window; their caches must be rows of one `KVSlots` buffer unless there is one
        call. Returns, per call, logits [len(rows), vocab] and the window's keys/values
        [1, ..., n, head_dim]. The caches themselves are not changed. The returned arrays may be
        the engine's own buffers: valid until its next call."""


class CacheAllocator:
    """An engine's `new_cache` and `new_slots`: buffers of its KV dtype where it reads them."""

    spec: DecoderSpec
    kv_dtype: np.dtype
    cache_xp: ModuleType = np  # the array module of the caches: cupy for the GPU engines

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity, *self.spec.kv_dims, self.kv_dtype, xp=self.cache_xp)

    def new_slots(self, slots: int, capacity: int) -> KVSlots:
        return KVSlots(slots, capacity, self.spec.kv_dims, self.kv_dtype, xp=self.cache_xp)


@dataclass(frozen=True)
class SynchronizedEngine:
    """An engine whose calls return once their work is done (a GPU call returns before), so that the
    time around a call is the model's (`Runtime.timed`)."""

    engine: DecoderEngine

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        outputs = self.engine.run(calls)
        synchronize(self.engine.xp)
        return outputs


def batch_feed(xp: ModuleType, calls: Sequence[EngineCall], arange) -> tuple[dict[str, Any], list[int]]:
    """The graph inputs of one exact-size call (window: the longest in the batch, past: the longest
    cache; each row's padding and the cache positions it lacks masked), and each call's logit-row
    count. `arange` is a per-engine constant [max_positions] sliced instead of built per call.
    One call is fed exactly as it comes: no padding, no mask to build."""
    if len(calls) == 1:
        (call,) = calls
        start, n = call.cache.length, call.ids.shape[-1]
        return {
            "input_ids": xp.asarray(call.ids).reshape(1, n),
            "position_ids": arange[None, start : start + n],
            "attention_mask": xp.ones((1, start + n), dtype=np.int64),
            "past_kv": call.cache.buffer,
            "logit_rows": arange[:n] if call.rows is None else xp.asarray(call.rows, dtype=np.int64),
        }, [n if call.rows is None else len(call.rows)]
    lengths = [call.ids.shape[-1] for call in calls]
    window, past = max(lengths), max(call.cache.length for call in calls)
    ids = xp.zeros((len(calls), window), dtype=np.int64)
    positions = xp.zeros((len(calls), window), dtype=np.int64)
    mask = xp.zeros((len(calls), past + window), dtype=np.int64)
    rows, counts = [], []
    for r, (call, n) in enumerate(zip(calls, lengths)):
        start = call.cache.length
        ids[r, :n] = call.ids
        positions[r, :n] = arange[start : start + n]
        mask[r, :start] = 1
        mask[r, past : past + n] = 1
        own = np.arange(n, dtype=np.int64) if call.rows is None else np.asarray(call.rows, dtype=np.int64)
        rows.append(own + r * window)  # rows index the batch's windows flattened
        counts.append(len(own))
    feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask,
            "past_kv": stacked_past([call.cache for call in calls], past),
            "logit_rows": xp.asarray(np.concatenate(rows))}
    return feed, counts


def split_outputs(calls: Sequence[EngineCall], counts: Sequence[int], logits, new_kv) -> list[tuple[Any, Any]]:
    """Each call's logit rows and the keys/values of its real window positions."""
    out, offset = [], 0
    for r, (call, count) in enumerate(zip(calls, counts)):
        out.append((logits[offset : offset + count], new_kv[r : r + 1, ..., : call.ids.shape[-1], :]))
        offset += count
    return out


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


class OrtCpuDecoder(CacheAllocator):
    """onnxruntime on the CPU. With `xp` = cupy the logits are moved to the GPU after each call,
    which only makes sense to exercise the cupy array backend on a machine without a GPU engine.
    `fixed_shapes` pads every call as the CUDA engine does (`fixed_shapes.py`): slower here, it
    checks the padding and the masks against exact-size calls token for token."""

    first_verify_chunk = 8
    call_cost_tokens = 32

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
        self._arange = np.arange(spec.max_positions, dtype=np.int64)
        self._padded: dict[FixedShape, PaddedInputs] | None = {} if fixed_shapes else None

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        # Draft ids live on the GPU when cupy samples over this engine (the rows are host arrays).
        calls = [c if isinstance(c.ids, np.ndarray) else replace(c, ids=to_host(c.ids)) for c in calls]
        if self._padded is None:
            feed, counts = batch_feed(np, calls, self._arange)
            logits, new_kv = self.session.run(["logits", "new_kv"], feed)
        else:
            shape = FixedShape.for_calls(calls)
            if shape not in self._padded:
                self._padded[shape] = PaddedInputs(np, shape, self.spec.kv_dims, self.kv_dtype, self.spec.max_positions)
            inputs = self._padded[shape]
            counts = inputs.write(calls)
            logits, new_kv = self.session.run(["logits", "new_kv"], inputs.arrays)
        if self.xp is not np:
            logits = self.xp.asarray(logits)
        return split_outputs(calls, counts, logits, new_kv)

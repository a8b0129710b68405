"""onnxruntime's CUDA provider, run so that a step costs GPU work rather than host round trips.

- One CUDA stream for onnxruntime and for the engines' own writes (`compute_stream`), created
  blocking, so that it is ordered with cupy's default stream, where the decoding loop samples:
  an engine call and the code that reads its logits need no host synchronisation between them,
  and onnxruntime is told not to synchronise at the end of a run. The one synchronisation of a
  step is the accepted count the loop reads.
- Fixed shapes (`fixed_shapes.py`): each call is padded to a power-of-two window, row count and
  cache capacity; each shape gets a session with its symbolic dimensions pinned (onnxruntime then
  folds the shape arithmetic, so every node runs on the GPU), static input and output buffers,
  and an I/O binding made once. On those sessions CUDA graphs (`enable_cuda_graph`) replay a
  whole call as one launch.
- Exact-size calls with a binding per call remain for shapes above the largest fixed one and
  for `fixed_shapes=False`.
- fp32 graphs run without TF32, so that they give the CPU's tokens.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from apd_deploy.errors import BundleError
from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.engine import (NUMPY_DTYPES, CacheAllocator, DecoderSpec, EngineCall, batch_feed,
                                      ort_session_options, split_outputs)
from apd_deploy.runtime.fixed_shapes import FixedShape, PaddedInputs

# Sessions kept per engine, one per fixed shape; each holds its own copy of the weights on the GPU.
MAX_FIXED_SESSIONS = 8
# Windows and capacities above these run at their exact size.
MAX_FIXED_WINDOW, MAX_FIXED_CAPACITY = 1024, 16384

_stream_lock = threading.Lock()
_stream = None


def compute_stream(cupy: ModuleType):
    """The process's one stream for CUDA engines (see the module docstring)."""
    global _stream
    with _stream_lock:
        if _stream is None:
            _stream = cupy.cuda.Stream(non_blocking=False)
        return _stream


def provider_options(stream, cuda_graph: bool) -> dict[str, str]:
    return {
        "device_id": "0",
        "use_tf32": "0",  # TF32 rounds fp32 matrix products to 10 mantissa bits: other tokens than the CPU's
        "has_user_compute_stream": "1",
        "user_compute_stream": str(stream.ptr),
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }


def bind(binding, name: str, array, output: bool = False) -> None:
    method = binding.bind_output if output else binding.bind_input
    method(name, "cuda", 0, array.dtype.type, list(array.shape), array.data.ptr)


class FixedShapeSession:
    """One fixed shape: its session, padded inputs, output buffers and I/O binding."""

    def __init__(self, session, cupy: ModuleType, spec: DecoderSpec, shape: FixedShape, kv_dtype: np.dtype) -> None:
        self.session = session
        self.inputs = PaddedInputs(cupy, shape, spec.kv_dims, kv_dtype, spec.max_positions)
        self.logits = cupy.zeros((shape.rows, spec.vocab_size), dtype=np.float32)
        self.new_kv = cupy.zeros(spec.new_kv_shape(shape.batch, shape.window), dtype=kv_dtype)
        self.binding = session.io_binding()
        for name, array in self.inputs.arrays.items():
            bind(self.binding, name, array)
        bind(self.binding, "logits", self.logits, output=True)
        bind(self.binding, "new_kv", self.new_kv, output=True)

    def run(self, calls: Sequence[EngineCall], run_options) -> list[tuple[Any, Any]]:
        counts = self.inputs.write(calls)
        self.session.run_with_iobinding(self.binding, run_options)
        return split_outputs(calls, counts, self.logits, self.new_kv)


class OrtCudaDecoder(CacheAllocator):
    """onnxruntime's CUDA provider with I/O binding: ids, caches and logits stay in cupy buffers
    on the GPU. Calls are serialised (the fixed-shape buffers are shared by every request)."""

    first_verify_chunk = None
    call_cost_tokens = 4096  # a batch is one call unless its windows differ by thousands

    def __init__(self, graph: Path, spec: DecoderSpec, threads: int | None = None,
                 session_options: dict[str, Any] | None = None, fixed_shapes: bool = True,
                 cuda_graph: bool = True) -> None:
        import onnxruntime as ort

        from apd_deploy.accelerators import require_cupy, require_ort_cuda

        if spec.kv_dtype not in NUMPY_DTYPES:
            raise BundleError(
                f"{graph}: its KV cache is {spec.kv_dtype}, which onnxruntime's I/O binding cannot take from "
                "Python (no numpy dtype); build a TensorRT engine for bf16, or export fp16"
            )
        require_ort_cuda()
        self.xp = self.cache_xp = cupy = require_cupy()
        self.graph, self.spec, self.threads, self.options = graph, spec, threads, session_options
        self.kv_dtype = np.dtype(NUMPY_DTYPES[spec.kv_dtype])
        self.stream = compute_stream(cupy)
        self.session = self._session(cuda_graph=False)
        self.fixed_shapes, self.cuda_graph = fixed_shapes, cuda_graph
        # Why CUDA graphs are off, when they were asked for and onnxruntime refused them.
        self.cuda_graph_error: str | None = None
        self._fixed: OrderedDict[FixedShape, FixedShapeSession] = OrderedDict()
        self._run_options = ort.RunOptions()
        # The stream orders everything; a synchronisation per run would only stall the host.
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self._arange = cupy.arange(spec.max_positions, dtype=np.int64)
        # Host ids go to the GPU through pinned memory: an asynchronous copy, where one from
        # pageable memory would wait for the stream.
        import cupyx

        self._pinned = cupyx.empty_pinned((spec.max_positions,), dtype=np.int64)
        self._copied = cupy.cuda.Event(disable_timing=True)
        self._lock = threading.Lock()

    def _session(self, cuda_graph: bool, dimensions: dict[str, int] | None = None):
        import onnxruntime as ort

        options = ort_session_options(self.threads, self.options)
        if dimensions:
            for name, value in dimensions.items():
                options.add_free_dimension_override_by_name(name, value)
            # Pinned dimensions let the shape arithmetic fold away, which needs the optimiser on.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        providers = [("CUDAExecutionProvider", provider_options(self.stream, cuda_graph)), "CPUExecutionProvider"]
        return ort.InferenceSession(str(self.graph), options, providers=providers)

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        with self._lock, self.stream:
            calls = self._to_device(calls)
            shape = FixedShape.for_calls(calls)
            if not (self.fixed_shapes and shape.window <= MAX_FIXED_WINDOW and shape.capacity <= MAX_FIXED_CAPACITY):
                return self._run_exact(calls)
            try:
                return self._fixed_session(shape).run(calls, self._run_options)
            except Exception as exc:  # a capture onnxruntime could not make; the call's inputs are written anew
                if not self.cuda_graph or self.cuda_graph_error is not None:
                    raise
                self._refuse_graphs(exc)
                return self._fixed_session(shape).run(calls, self._run_options)

    def _refuse_graphs(self, exc: Exception) -> None:
        self.cuda_graph_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"warning: {self.graph.name}: CUDA graphs are off: {self.cuda_graph_error}", file=sys.stderr)
        self._fixed.clear()

    def _to_device(self, calls: Sequence[EngineCall]) -> list[EngineCall]:
        """The calls with their ids on the GPU (host ids go through pinned memory: an asynchronous
        copy, where one from pageable memory would wait for the stream) and their rows on the host."""
        cupy = self.xp
        host = sum(call.ids.size for call in calls if isinstance(call.ids, np.ndarray))
        self._copied.synchronize()  # the previous copies out of the pinned buffer have finished
        if host > self._pinned.size:
            import cupyx

            self._pinned = cupyx.empty_pinned((host,), dtype=np.int64)
        out, offset = [], 0
        for call in calls:
            rows = None if call.rows is None else to_host(call.rows).astype(np.int64, copy=False)
            if isinstance(call.ids, np.ndarray):
                n = call.ids.size
                self._pinned[offset : offset + n] = call.ids.reshape(-1)
                ids = cupy.empty((n,), dtype=np.int64)
                ids.set(self._pinned[offset : offset + n], stream=self.stream)
                offset += n
            else:
                ids = cupy.asarray(call.ids, dtype=np.int64).reshape(-1)
            out.append(EngineCall(ids, call.cache, rows))
        self._copied.record(self.stream)
        return out

    def _fixed_session(self, shape: FixedShape) -> FixedShapeSession:
        if shape in self._fixed:
            self._fixed.move_to_end(shape)
            return self._fixed[shape]
        if len(self._fixed) >= MAX_FIXED_SESSIONS:
            self._fixed.popitem(last=False)
        session = None
        if self.cuda_graph and self.cuda_graph_error is None:
            try:
                session = self._session(cuda_graph=True, dimensions=shape.dimensions())
            except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
                self._refuse_graphs(exc)
        if session is None:
            session = self._session(cuda_graph=False, dimensions=shape.dimensions())
        self._fixed[shape] = FixedShapeSession(session, self.xp, self.spec, shape, self.kv_dtype)
        return self._fixed[shape]

    def _run_exact(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        cupy = self.xp
        feed, counts = batch_feed(cupy, calls, self._arange)
        batch, window = feed["input_ids"].shape
        logits = cupy.empty((len(feed["logit_rows"]), self.spec.vocab_size), dtype=np.float32)
        new_kv = cupy.empty(self.spec.new_kv_shape(batch, window), dtype=self.kv_dtype)
        binding = self.session.io_binding()
        for name, array in feed.items():
            bind(binding, name, cupy.ascontiguousarray(array))
        bind(binding, "logits", logits, output=True)
        bind(binding, "new_kv", new_kv, output=True)
        self.session.run_with_iobinding(binding, self._run_options)
        return split_outputs(calls, counts, logits, new_kv)

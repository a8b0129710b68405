"""TensorRT engines: `execute_async_v3` on one stream, with tensor addresses of cupy buffers.

An engine runs only on the TensorRT version and the GPU architecture that built it, so the
manifest's record of both is checked before the engine is deserialized.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from apd_deploy.errors import BundleError, EngineMismatch, GenerationError
from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.engine import GRAPH_INPUTS, CacheAllocator, DecoderSpec, EngineCall, batch_feed, split_outputs

# bf16 has no numpy/cupy dtype; the runtime only copies the cache, so 16-bit storage carries it.
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "int64": np.int64}
TENSORRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64"}
ALIGNMENT = 256  # setTensorAddress requires it of every I/O address


def check_engine_record(name: str, record: dict[str, Any], tensorrt_version: str, compute_capability: str) -> None:
    """Refuse an engine built by another TensorRT version or for another GPU architecture."""
    built = record["built_with"]
    rebuild = f"rebuild it on this machine: apd-deploy build-engine BUNDLE --backend tensorrt --precision {record['precision']}"
    if built["tensorrt"] != tensorrt_version:
        raise EngineMismatch(
            f"engine '{name}' was built with TensorRT {built['tensorrt']}, this machine has {tensorrt_version}; {rebuild}"
        )
    if built["compute_capability"] != compute_capability:
        raise EngineMismatch(
            f"engine '{name}' was built for GPUs of compute capability {built['compute_capability']}, this GPU is "
            f"{compute_capability}; {rebuild}"
        )


def select_profile(profiles: list[dict[str, Any]], batch: int, seq_len: int, past_len: int, logit_len: int,
                   capacity: int) -> int:
    """Index of the first optimisation profile whose batch, window, past, logit-row and cache-capacity
    ranges hold this call."""
    def holds(profile: dict[str, Any]) -> bool:
        return all(profile[key][0] <= value <= profile[key][2]
                   for key, value in (("batch", batch), ("seq_len", seq_len), ("past_len", past_len),
                                      ("logit_len", logit_len), ("capacity", capacity)))

    for index, profile in enumerate(profiles):
        if holds(profile):
            return index
    for key, value, beyond in (
        ("capacity", capacity, "a call hands over a cache buffer of {value} positions; the engine takes at most {most}; "
         "rebuild it with --max-seq-len {value} or more, or ask for fewer new tokens"),
        ("batch", batch, "a call batches {value} requests; the engine was built for at most {most}; rebuild it with "
         "--max-batch {value} or more, or run with a smaller --max-batch"),
        ("logit_len", logit_len, "a call asks for logits of {value} rows; the engine computes at most {most} per call "
         "(M + 1 of the bundle's APD defaults); rebuild it with --max-logit-rows {value} or more (Dream's diffusion "
         "asks for one row per masked position)"),
    ):
        if value > (most := max(p[key][2] for p in profiles)):
            raise GenerationError(beyond.format(value=value, most=most))
    limits = ", ".join(f"{p['name']}: window <= {p['seq_len'][2]}, past <= {p['past_len'][2]}" for p in profiles)
    raise GenerationError(
        f"a window of {seq_len} tokens after {past_len} cached ones is outside the engine's profiles ({limits}); "
        "rebuild the engine with a larger --max-seq-len, or lower --max-lookahead / --kv-window"
    )


class TensorRTDecoder(CacheAllocator):
    """Execution contexts (one per optimisation profile) share the engine and one device buffer for
    their activations, sized for the largest profile; calls are serialised by a lock, since a
    context is not safe to use from two threads at once (and the shared buffer serves one call at a
    time).

    Every address handed to TensorRT is 256-byte aligned: the small inputs are copied into buffers
    this engine allocates, the outputs are its own buffers, and a cache buffer is bound where it
    lies only if aligned (a row of a `KVSlots` buffer may not be), else copied too."""

    first_verify_chunk = None  # a GPU call costs its launch, not its tokens: score the whole draft
    call_cost_tokens = 4096  # a batch is one call unless its windows differ by thousands

    def __init__(self, name: str, plan: Path, spec: DecoderSpec, record: dict[str, Any], role: str) -> None:
        from apd_deploy.accelerators import compute_capability, require_cupy, require_tensorrt

        trt = require_tensorrt()
        self.xp = self.cache_xp = cupy = require_cupy()
        check_engine_record(name, record, trt.__version__, compute_capability())
        self.spec = spec
        self.kv_dtype = np.dtype(STORAGE_DTYPES[spec.kv_dtype])
        self.profiles = record["profiles"][role]
        self.stream = cupy.cuda.Stream()  # blocking: orders itself after work on the default stream
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = _deserialize(runtime, plan)
        self.dtypes = engine_io(trt, self.engine, plan, spec, len(self.profiles))
        rebuild = "rebuild it with apd-deploy build-engine"
        # One buffer for every context's activations: STATIC contexts would each reserve the largest profile.
        scratch_bytes = self.engine.device_memory_size_v2
        self._scratch = cupy.empty(max(scratch_bytes, ALIGNMENT), dtype=np.uint8)
        self.contexts = []
        for index in range(len(self.profiles)):
            context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise BundleError(f"{plan}: TensorRT could not create an execution context for the "
                                  f"{self.profiles[index]['name']} profile (see its log above); {rebuild}")
            context.set_device_memory(_address(self._scratch), scratch_bytes)
            try:
                context.set_optimization_profile_async(index, self.stream.ptr)
            except RuntimeError as exc:
                raise BundleError(f"{plan}: TensorRT refused optimisation profile {index} ({exc}); {rebuild}") from None
            self.contexts.append(context)
        self.stream.synchronize()
        self._arange = cupy.arange(spec.max_positions, dtype=np.int64)
        # Inputs are copied into these, sized for the largest shape the engine's profiles take
        # (the cache only where its own buffer is misaligned, so that one grows when needed).
        self._buffers = {name: cupy.empty(max(ALIGNMENT, self._largest_bytes(name)), dtype=np.uint8)
                         for name in GRAPH_INPUTS if name != "past_kv"}
        self._buffers.update(past_kv=cupy.empty(ALIGNMENT, dtype=np.uint8), logits=cupy.empty(ALIGNMENT, dtype=np.uint8),
                             new_kv=cupy.empty(ALIGNMENT, dtype=np.uint8))
        self._lock = threading.Lock()

    def _largest_bytes(self, name: str) -> int:
        largest = max(math.prod(self.engine.get_tensor_profile_shape(name, i)[2]) for i in range(len(self.profiles)))
        return largest * self.dtypes[name].itemsize

    def _buffer(self, name: str, shape: tuple[int, ...]):
        """This engine's buffer for tensor `name` as an array of `shape`, grown if it is too small."""
        dtype = self.dtypes[name]
        nbytes = math.prod(shape) * dtype.itemsize
        if self._buffers[name].nbytes < nbytes:
            self._buffers[name] = self.xp.empty(nbytes, dtype=np.uint8)
        return self._buffers[name][:nbytes].view(dtype).reshape(shape)

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        cupy = self.xp
        with self._lock, self.stream:
            calls = [EngineCall(cupy.asarray(c.ids, dtype=np.int64).reshape(-1), c.cache,
                                None if c.rows is None else to_host(c.rows)) for c in calls]
            feed, counts = batch_feed(cupy, calls, self._arange)
            batch, window = feed["input_ids"].shape
            past = feed["attention_mask"].shape[1] - window
            index = select_profile(self.profiles, batch, window, past, sum(counts), feed["past_kv"].shape[4])
            context = self.contexts[index]
            bound = {}
            for name, array in feed.items():
                if name == "past_kv" and _address(array) % ALIGNMENT == 0 and array.flags.c_contiguous:
                    bound[name] = array
                else:
                    bound[name] = self._buffer(name, tuple(array.shape))
                    bound[name][...] = array
                if not context.set_input_shape(name, tuple(array.shape)):
                    raise GenerationError(
                        f"TensorRT refused input {name} of shape {tuple(array.shape)} for its "
                        f"{self.profiles[index]['name']} profile; the engine does not match its record, rebuild it"
                    )
            expected = {"logits": (sum(counts), self.spec.vocab_size), "new_kv": self.spec.new_kv_shape(batch, window)}
            for name, shape in expected.items():
                computed = tuple(context.get_tensor_shape(name))
                if computed != shape:
                    raise GenerationError(
                        f"the engine computes {name} of shape {computed} for this call, the bundle's graph "
                        f"{shape}; the engine does not match the bundle: rebuild it with apd-deploy build-engine"
                    )
                bound[name] = self._buffer(name, shape)
            for name, array in bound.items():
                address = _address(array)
                if address % ALIGNMENT or not context.set_tensor_address(name, address):
                    raise GenerationError(f"TensorRT refused the address {address:#x} of {name}")
            if not context.execute_async_v3(self.stream.ptr):
                raise GenerationError(f"TensorRT failed to run a batch of {batch} windows of up to {window} tokens "
                                      f"after up to {past} cached ones (see its log above)")
            self.stream.synchronize()
        return split_outputs(calls, counts, bound["logits"], bound["new_kv"])


def _address(array) -> int:
    return array.data.ptr


def _deserialize(runtime, plan: Path):
    """The engine, read from a memory map of the plan: no copy of it on the host."""
    try:
        with open(plan, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            engine = runtime.deserialize_cuda_engine(mapped)
    except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
        raise BundleError(f"{plan}: cannot read the engine ({exc}); rebuild it with apd-deploy build-engine") from None
    if engine is None:
        raise BundleError(f"{plan}: TensorRT could not deserialize this engine; rebuild it with apd-deploy build-engine")
    return engine


def engine_io(trt: ModuleType, engine, plan: Path, spec: DecoderSpec, profiles: int) -> dict[str, np.dtype]:
    """The storage dtype of each of the engine's I/O tensors, checked against the bundle's graph:
    names, directions, types and the number of optimisation profiles."""
    expected = {**{name: ("INPUT", "int64") for name in GRAPH_INPUTS}, "past_kv": ("INPUT", spec.kv_dtype),
                "logits": ("OUTPUT", "float32"), "new_kv": ("OUTPUT", spec.kv_dtype)}
    rebuild = "the engine does not match the bundle's graph; rebuild it with apd-deploy build-engine"
    if engine.num_optimization_profiles != profiles:
        raise BundleError(f"{plan}: the engine has {engine.num_optimization_profiles} optimisation profiles, its "
                          f"record {profiles}; {rebuild}")
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    dtypes = {}
    for name, (mode, dtype) in expected.items():
        if name not in names:
            raise BundleError(f"{plan}: the engine has no tensor {name}; {rebuild}")
        actual_mode = engine.get_tensor_mode(name)
        if actual_mode != getattr(trt.TensorIOMode, mode):
            raise BundleError(f"{plan}: tensor {name} is an {actual_mode.name.lower()} of the engine, an "
                              f"{mode.lower()} of the graph; {rebuild}")
        actual = TENSORRT_DTYPES.get(engine.get_tensor_dtype(name).name)
        if actual != dtype:
            raise BundleError(f"{plan}: tensor {name} is {engine.get_tensor_dtype(name).name} in the engine, "
                              f"{dtype} in the graph; {rebuild}")
        dtypes[name] = np.dtype(STORAGE_DTYPES[dtype])
    return dtypes

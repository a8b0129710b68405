"""TensorRT engines: `execute_async_v3` with tensor addresses taken from cupy arrays, on one stream.

An engine runs only on the TensorRT version and the GPU architecture that built it, so the
manifest's record of both is checked before the engine is deserialized.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apd_deploy.errors import BundleError, EngineMismatch, GenerationError
from apd_deploy.runtime.arrays import to_host
from apd_deploy.runtime.engine import DecoderSpec, EngineCall, batch_feed, split_outputs
from apd_deploy.runtime.kv_cache import KVCache, KVSlots

# bf16 has no numpy/cupy dtype; the runtime only copies the cache, so 16-bit storage carries it.
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


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


def select_profile(profiles: list[dict[str, Any]], batch: int, seq_len: int, past_len: int, logit_len: int) -> int:
    """Index of the first optimisation profile whose batch, window, past and logit-row ranges hold this call."""
    def holds(profile: dict[str, Any]) -> bool:
        return all(profile[key][0] <= value <= profile[key][2]
                   for key, value in (("batch", batch), ("seq_len", seq_len), ("past_len", past_len),
                                      ("logit_len", logit_len)))

    for index, profile in enumerate(profiles):
        if holds(profile):
            return index
    most_batch = max(p["batch"][2] for p in profiles)
    if batch > most_batch:
        raise GenerationError(
            f"a call batches {batch} requests; the engine was built for at most {most_batch}; rebuild it with "
            f"--max-batch {batch} or more, or run with a smaller --max-batch"
        )
    most_rows = max(p["logit_len"][2] for p in profiles)
    if logit_len > most_rows:
        raise GenerationError(
            f"a call asks for logits of {logit_len} rows; the engine computes at most {most_rows} per call "
            "(M + 1 of the bundle's APD defaults); rebuild it with --max-logit-rows "
            f"{logit_len} or more (Dream's diffusion asks for one row per masked position)"
        )
    limits = ", ".join(f"{p['name']}: window <= {p['seq_len'][2]}, past <= {p['past_len'][2]}" for p in profiles)
    raise GenerationError(
        f"a window of {seq_len} tokens after {past_len} cached ones is outside the engine's profiles ({limits}); "
        "rebuild the engine with a larger --max-seq-len, or lower --max-lookahead / --kv-window"
    )


class TensorRTDecoder:
    """Execution contexts (one per optimisation profile) share the engine; calls are serialised
    by a lock, since a context is not safe to use from two threads at once."""

    first_verify_chunk = None  # a GPU call costs its launch, not its tokens: score the whole draft
    call_cost_tokens = 4096  # a batch is one call unless its windows differ by thousands

    def __init__(self, name: str, plan: Path, spec: DecoderSpec, record: dict[str, Any], role: str) -> None:
        from apd_deploy.accelerators import compute_capability, require_cupy, require_tensorrt

        trt = require_tensorrt()
        self.xp = cupy = require_cupy()
        check_engine_record(name, record, trt.__version__, compute_capability())
        self.spec = spec
        self.kv_dtype = np.dtype(STORAGE_DTYPES[spec.kv_dtype])
        self.profiles = record["profiles"][role]
        self.stream = cupy.cuda.Stream()  # blocking: orders itself after work on the default stream
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BundleError(f"{plan}: TensorRT could not deserialize this engine; rebuild it with apd-deploy build-engine")
        self.contexts = []
        for index in range(len(self.profiles)):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.ptr)
            self.contexts.append(context)
        self.stream.synchronize()
        self._arange = cupy.arange(spec.max_positions, dtype=np.int64)
        self._lock = threading.Lock()

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(capacity, *self.spec.kv_dims, self.kv_dtype, xp=self.xp)

    def new_slots(self, slots: int, capacity: int) -> KVSlots:
        return KVSlots(slots, capacity, self.spec.kv_dims, self.kv_dtype, xp=self.xp)

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        cupy = self.xp
        with self._lock, self.stream:
            calls = [EngineCall(cupy.asarray(c.ids, dtype=np.int64).reshape(-1), c.cache,
                                None if c.rows is None else to_host(c.rows)) for c in calls]
            feed, counts = batch_feed(cupy, calls, self._arange)
            batch, window = feed["input_ids"].shape
            past = feed["attention_mask"].shape[1] - window
            context = self.contexts[select_profile(self.profiles, batch, window, past, sum(counts))]
            inputs = {name: cupy.ascontiguousarray(array) for name, array in feed.items()}
            logits = cupy.empty((sum(counts), self.spec.vocab_size), dtype=np.float32)
            new_kv = cupy.empty(self.spec.new_kv_shape(batch, window), dtype=self.kv_dtype)
            for tensor_name, array in inputs.items():
                context.set_input_shape(tensor_name, tuple(array.shape))
            for tensor_name, array in {**inputs, "logits": logits, "new_kv": new_kv}.items():
                context.set_tensor_address(tensor_name, array.data.ptr)
            if not context.execute_async_v3(self.stream.ptr):
                raise RuntimeError(f"TensorRT failed to run a batch of {batch} windows of up to {window} tokens "
                                   f"after up to {past} cached ones")
            self.stream.synchronize()
        return split_outputs(calls, counts, logits, new_kv)

"""OpenVINO on the CPU: the graphs compiled for this CPU's AMX / AVX-512 units, in fp32 or bf16.

- Inputs are handed over without copies (`share_inputs`): the KV cache buffer whole, as the
  exported graphs take it (they read the first past_len = mask length - window positions), and
  the ids, positions, mask and logit rows from buffers allocated once and grown only when a call
  outgrows them. Outputs are copied out of the infer request (the size of the window, not of the
  sequence): the scheduler may split one batch into several calls before it reads any of them.
- Shapes are bucketed: OpenVINO prepares a compiled graph for each new input shape, which costs
  about as much as the call itself when every call of a decoding run has another past length and
  window. A call is padded to a window that is a power of two up to 32 and a multiple of 32 above,
  and to a past length that is a multiple of PAST_STEP (capped at the buffer), so that a decoding
  run meets a few shapes; the mask hides the padding, as for the CUDA engine's fixed shapes.
- One infer request per engine object; scheduling lanes get one each on a model compiled with a
  stream per lane (`open_openvino`), so the lanes share the compiled weights.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apd_deploy.accelerators import cpu_isa, native_bf16, require_openvino
from apd_deploy.engines.openvino_build import compile_config
from apd_deploy.errors import BundleError, EngineMismatch
from apd_deploy.runtime.engine import CacheAllocator, DecoderSpec, EngineCall, split_outputs
from apd_deploy.runtime.kv_cache import stacked_past

PAST_STEP = 64


def bucket_window(n: int) -> int:
    """The window a call of `n` tokens is padded to: a power of two up to 32, then a multiple of 32."""
    return 1 << (n - 1).bit_length() if n <= 32 else -(-n // 32) * 32


def bucket_past(past: int, capacity: int) -> int:
    """The past length a call with `past` cached positions is given: a multiple of PAST_STEP, at most
    the buffer's `capacity` positions."""
    return min(-(-past // PAST_STEP) * PAST_STEP, capacity)


class GrowingBuffers:
    """Flat int64 buffers reused by every call, viewed in the shape of each call's inputs."""

    def __init__(self) -> None:
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        flat = self._flat.get(name)
        if flat is None or flat.size < size:
            flat = self._flat[name] = np.zeros(max(size, 2 * (0 if flat is None else flat.size)), dtype=np.int64)
        return flat[:size].reshape(shape)


class OpenVinoDecoder(CacheAllocator):
    """One compiled graph and one infer request of it (see the module docstring)."""

    first_verify_chunk = 8  # a CPU call costs its tokens: score the draft in growing chunks
    call_cost_tokens = 32
    kv_dtype = np.dtype(np.float32)

    def __init__(self, compiled: Any, spec: DecoderSpec, blob: np.memmap | None = None) -> None:
        self.compiled, self.spec, self.xp = compiled, spec, np
        self._blob = blob  # the memory map the compiled model's constants may live in
        self.request = compiled.create_infer_request()
        self._buffers = GrowingBuffers()
        self._arange = np.arange(spec.max_positions, dtype=np.int64)

    def run(self, calls: Sequence[EngineCall]) -> list[tuple[Any, Any]]:
        feed, counts = self._feed(calls)
        outputs = self.request.infer(feed, share_inputs=True)
        return split_outputs(calls, counts, outputs["logits"], outputs["new_kv"])

    def _feed(self, calls: Sequence[EngineCall]) -> tuple[dict[str, np.ndarray], list[int]]:
        """The bucketed inputs of one call for every request of `calls` (a batch row each)."""
        caches = [call.cache for call in calls]
        past = bucket_past(max(cache.length for cache in caches), caches[0].buffer.shape[-2])
        past_kv = stacked_past(caches, past)
        batch, window = len(calls), bucket_window(max(call.ids.shape[-1] for call in calls))
        ids = self._buffers.get("input_ids", (batch, window))
        positions = self._buffers.get("position_ids", (batch, window))
        mask = self._buffers.get("attention_mask", (batch, past + window))
        ids[:], positions[:], mask[:] = 0, 0, 0
        rows, counts = [], []
        for r, call in enumerate(calls):
            start, n = call.cache.length, call.ids.shape[-1]
            ids[r, :n] = np.asarray(call.ids)
            positions[r, :n] = self._arange[start : start + n]
            mask[r, :start] = 1
            mask[r, past : past + n] = 1
            own = self._arange[:n] if call.rows is None else np.asarray(call.rows, dtype=np.int64)
            rows.append(own + r * window)  # rows index the batch's windows flattened
            counts.append(len(own))
        wanted = sum(counts)
        logit_rows = self._buffers.get("logit_rows", (bucket_window(wanted),))
        np.concatenate(rows, out=logit_rows[:wanted])
        logit_rows[wanted:] = logit_rows[wanted - 1]  # extra rows repeat the last real one
        return {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "past_kv": past_kv,
                "logit_rows": logit_rows}, counts


def open_openvino(bundle: Path, name: str, record: dict[str, Any], specs: dict[str, DecoderSpec], threads: int,
                  lanes: int = 1) -> list[dict[str, OpenVinoDecoder]]:
    """The engines of `lanes` scheduling loops: each graph compiled once with a stream per lane
    (the blob imported, or the graph compiled again where the blob cannot serve this machine)."""
    ov = require_openvino()
    core = ov.Core()
    config = compile_config(record["precision"], threads, lanes)
    stale = blob_mismatch(name, record, ov.get_version(), cpu_isa())
    if stale:
        print(f"warning: {stale}", file=sys.stderr)
    compiled, blobs = {}, {}
    for role in specs:
        if stale:
            source = bundle / record["sources"][role]
            if not source.is_file():
                raise BundleError(f"{source}: the {role} graph to compile the engine from again is missing; re-export "
                                  "the bundle, or build the engine again on the machine its blobs came from")
            compiled[role] = core.compile_model(str(source), "CPU", config)
        else:
            # Imported from a memory map, not read into memory: the compiled model keeps using the
            # blob's pages for its constants, so the map lives as long as the model (`blobs`).
            blob = np.memmap(bundle / record["graphs"][role], dtype=np.uint8, mode="c")
            compiled[role] = core.import_model(ov.Tensor(blob, shared_memory=True), "CPU", config)
            blobs[role] = blob
    return [{role: OpenVinoDecoder(compiled[role], spec, blobs.get(role)) for role, spec in specs.items()}
            for _ in range(lanes)]


def blob_mismatch(name: str, record: dict[str, Any], version: str, isa: list[str]) -> str | None:
    """Why `record`'s blobs cannot serve this machine, or None. A bf16 engine on a CPU without
    bf16 instructions is refused; another OpenVINO version or a CPU lacking instruction sets the
    blobs were compiled for means compiling the graphs again at every load."""
    precision = record["precision"]
    rebuild = f"apd-deploy build-engine BUNDLE --backend openvino --precision {precision}"
    if precision == "bf16" and not native_bf16(isa):
        raise EngineMismatch(
            f"engine '{name}' computes in bf16, which this CPU has no instructions for (neither AMX nor "
            "AVX512_BF16); build an fp32 engine: apd-deploy build-engine BUNDLE --backend openvino --precision fp32"
        )
    built = record["built_with"]
    if built["openvino"] != version:
        why = f"was compiled by OpenVINO {built['openvino']}, this is {version}"
    elif missing := [flag for flag in built["isa"] if flag not in isa]:
        why = f"was compiled for instruction sets this CPU lacks ({', '.join(missing)})"
    else:
        return None
    return (f"engine '{name}' {why}: compiling its graphs again at each load; rebuild it on this machine to store "
            f"blobs for it: {rebuild}")


"""Trace a `DecoderLM` to an ONNX file with `torch.onnx.export` (the dynamo exporter)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from apd_deploy.export.graph_io import DYNAMIC_AXES, graph_io
from apd_deploy.export.transformer import DecoderLM

# Past 256 MiB of weights a graph keeps them in an external data file, `<graph>.onnx.data`.
# Required past 2 GB (a protobuf cannot be larger); chosen well below for memory: onnxruntime maps
# an external data file instead of parsing a copy of every weight, and writing a self-contained
# graph holds two more copies of its weights (the message, then its bytes). At this size the
# export's peak stays about one copy of the larger model.
EXTERNAL_DATA_BYTES = 1 << 28


def example_inputs(model: DecoderLM, batch: int = 2, seq_len: int = 5, past_len: int = 3) -> tuple[torch.Tensor, ...]:
    """Example inputs for tracing. Every dynamic axis must be >= 2 here, or the exporter
    specialises the graph to that size (a window of 1 would bake a decode-only path), and
    different from the others, or it may tie them together."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    position_ids = torch.arange(past_len, past_len + seq_len).expand(batch, seq_len).contiguous()
    attention_mask = torch.ones(batch, past_len + seq_len, dtype=torch.int64)
    empty = model.empty_cache(batch)
    past_kv = empty.new_zeros((*empty.shape[:4], past_len + 3, empty.shape[5]))  # a buffer longer than the past
    past_kv.normal_(generator=g)
    logit_rows = torch.arange(1, 2 * seq_len - 1)  # rows of both batch rows, flattened
    return input_ids, position_ids, attention_mask, past_kv, logit_rows


def trace_to_onnx(model: DecoderLM, out_path: Path, opset: int) -> None:
    """Write `model` to `out_path` (plus `out_path.data` past EXTERNAL_DATA_BYTES of weights)."""
    io = graph_io(model.config, kv_dtype="unused")
    dims = {name: torch.export.Dim(name, min=1 if name in ("batch", "seq_len", "logit_len") else 0)
            for name in DYNAMIC_AXES}
    dynamic_shapes = {
        spec["name"]: {axis: dims[a] for axis, a in enumerate(spec["shape"]) if isinstance(a, str)}
        for spec in io["inputs"]
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example_inputs(model),
            dynamo=True,
            input_names=[s["name"] for s in io["inputs"]],
            output_names=[s["name"] for s in io["outputs"]],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() counts tied ones once
    program.save(str(out_path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    # onnxscript's rewriter rules keep the last graph they matched alive (0.7), and its weights with
    # it: once the graph is written, let the in-memory graph drop them.
    for initializer in program.model.graph.initializers.values():
        initializer.const_value = None


def release_weights(model: torch.nn.Module) -> None:
    """Free the memory of `model`'s weights once it has been traced; the module is unusable after.

    Deleting the model is not enough: onnxscript's rewriter rules keep a reference to the last
    graph they matched (onnxscript 0.7), whose initializers hold the parameters or views of them,
    so the weights would outlive the export and sit beside onnxruntime's copy during the check.
    Shrinking each storage to nothing frees the memory whoever still holds a view of it; storages
    the exporter made non-resizable are at least dropped by the module (and by the graph, which
    `trace_to_onnx` empties once written)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            if storage.resizable():
                storage.resize_(0)
            tensor.data = torch.empty(0, dtype=tensor.dtype)

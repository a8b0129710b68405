"""Trace a `DecoderLM` to an ONNX file with `torch.onnx.export` (the dynamo exporter)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from apd_deploy.export.graph_io import DYNAMIC_AXES, graph_io
from apd_deploy.export.transformer import DecoderLM

# A protobuf message cannot exceed 2 GB, and the graph itself (nodes, shapes, names) needs room
# beside the weights: past 1.8 GB of weights they go to an external data file.
EXTERNAL_DATA_BYTES = 1_800_000_000


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
    logit_rows = torch.arange(1, seq_len)
    return input_ids, position_ids, attention_mask, past_kv, logit_rows


def parameter_bytes(model: DecoderLM) -> int:
    seen = {id(p): p for p in model.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


def trace_to_onnx(model: DecoderLM, out_path: Path, opset: int) -> None:
    """Write `model` to `out_path` (plus `out_path.data` for graphs over 2 GB)."""
    io = graph_io(model.config, kv_dtype="unused")
    dims = {name: torch.export.Dim(name, min=0) for name in DYNAMIC_AXES}
    dims["batch"] = torch.export.Dim("batch", min=1)
    dims["seq_len"] = torch.export.Dim("seq_len", min=1)
    dims["logit_len"] = torch.export.Dim("logit_len", min=1)
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
    # Saved with external data first: serialising a whole protobuf would hold two more copies of
    # the weights in memory (the message, then its bytes).
    if parameter_bytes(model) > EXTERNAL_DATA_BYTES:
        program.save(str(out_path), external_data=True)
        return
    staged = out_path.with_name(f".{out_path.name}.external")
    try:
        program.save(str(staged), external_data=True)
        del program
        _inline_external_data(staged, out_path)
    finally:
        staged.unlink(missing_ok=True)
        staged.with_name(staged.name + ".data").unlink(missing_ok=True)


# Field numbers in onnx.proto of the fields `_inline_external_data` writes by hand.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
COPY_CHUNK = 1 << 24


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_header(number: int, length: int) -> bytes:
    """The tag and length that precede a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _inline_external_data(source: Path, out_path: Path) -> None:
    """Write `source` (a graph with external data) as one self-contained file, streaming the weights.

    The graph without its weights is written first, then each weight as a further `graph` field
    holding one initializer, its raw bytes copied from the data file in chunks: protobuf parsers
    merge repeated occurrences of a message field, so the file reads as one ModelProto, and no
    weight is ever held in memory (serialising the whole message would hold two copies of all)."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    initializers = list(model.graph.initializer)
    del model.graph.initializer[:]
    with open(out_path, "wb") as out, open(source.with_name(source.name + ".data"), "rb") as data:
        out.write(model.SerializeToString())
        for tensor in initializers:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                body = tensor.SerializeToString()
                out.write(_field_header(MODEL_GRAPH, len(_field_header(GRAPH_INITIALIZER, len(body))) + len(body)))
                out.write(_field_header(GRAPH_INITIALIZER, len(body)) + body)
                continue
            where = {entry.key: entry.value for entry in tensor.external_data}
            offset, length = int(where.get("offset", 0)), int(where["length"])
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            head = tensor.SerializeToString() + _field_header(TENSOR_RAW_DATA, length)
            tensor_bytes = len(head) + length
            initializer = _field_header(GRAPH_INITIALIZER, tensor_bytes)
            out.write(_field_header(MODEL_GRAPH, len(initializer) + tensor_bytes) + initializer + head)
            data.seek(offset)
            while length:
                chunk = data.read(min(length, COPY_CHUNK))
                out.write(chunk)
                length -= len(chunk)

"""Measure the peak memory of `apd-deploy export` on a pair of random bf16 checkpoints.

    .venv/bin/python scripts/export_memory.py [--pair real-width|small] [--dtype fp32|fp16] [--keep DIR]

`real-width`: a dLLM at Dream-7B's widths with 2 layers (hidden 3584, intermediate 18944, 28 heads,
4 KV heads, vocabulary 152064, untied, ~1.56B parameters, 3 shards) and the full Qwen2.5-0.5B
shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied).
Weights are drawn with std 0.02. It takes several minutes and ~10 GB of RAM, plus ~4 GB of disk
for the checkpoints and up to 8 GB for the bundle.

The pair is written here, in this process; the export runs in a child process, whose peak RSS
`resource.getrusage(RUSAGE_CHILDREN)` reports once it has exited. The figure is printed with its
ratio to the larger model's bytes at the export dtype (the dLLM's), the quantity the export's
memory design bounds: peak <= 1.3 x that + a constant (Python, torch, onnxruntime themselves).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

INIT_STD = 0.02
SHARD_BYTES = 1_500_000_000
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Qwen2 / Dream tensor names and shapes, with q/k/v biases."""
        head_dim = self.hidden // self.heads
        q, kv = self.heads * head_dim, self.kv_heads * head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab, self.hidden), "model.norm.weight": (self.hidden,)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "self_attn.q_proj.weight": (q, self.hidden), p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, self.hidden), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, self.hidden), p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (self.hidden, q),
                p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
                p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
                p + "input_layernorm.weight": (self.hidden,), p + "post_attention_layernorm.weight": (self.hidden,),
            })
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, self.hidden)
        return shapes

    def parameters(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.tensors().values())


# (dLLM, verifier, mask token id, eos token id) per pair.
PAIRS = {
    "real-width": (Shape(152064, 3584, 18944, 2, 28, 4, tied=False), Shape(151936, 896, 4864, 24, 14, 2, tied=True),
                   151666, 151643),
    # For the slow test: a ~0.25B dLLM (1 GB in fp32), large enough that its weights dwarf the
    # libraries' own memory, with matrices of 64 MB as real models have (glibc keeps smaller
    # blocks in its heap after they are freed, which would blur the measurement).
    "small": (Shape(32768, 2048, 8192, 2, 16, 2, tied=False), Shape(32768, 256, 1024, 2, 4, 2, tied=True), 32000, 100),
}


def _config(shape: Shape, dllm: bool, mask: int, eos: int) -> dict:
    config = {
        "architectures": ["DreamModel" if dllm else "Qwen2ForCausalLM"], "model_type": "Dream" if dllm else "qwen2",
        "vocab_size": shape.vocab, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 4096,
        "tie_word_embeddings": shape.tied, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
        "torch_dtype": "bfloat16", "use_sliding_window": False,
    }
    if dllm:
        config["mask_token_id"] = mask
    return config


def write_checkpoint(directory: Path, config: dict, shape: Shape, seed: int) -> None:
    """Random bf16 weights in shards of at most SHARD_BYTES, with an index when there are several."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, dims in shape.tensors().items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(dims, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(dims, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)
        if size and size + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def build_pair(root: Path, pair: str) -> tuple[Path, Path]:
    dllm, verifier, mask, eos = PAIRS[pair]
    write_checkpoint(root / "dllm", _config(dllm, True, mask, eos), dllm, seed=1)
    write_checkpoint(root / "verifier", _config(verifier, False, mask, eos), verifier, seed=2)
    return root / "dllm", root / "verifier"


def measure_export(dllm: Path, verifier: Path, out: Path, dtype: str) -> dict:
    """Run `apd-deploy export` in a child process; returns its peak RSS (bytes), seconds and status.
    Call it once per process: RUSAGE_CHILDREN keeps the largest child seen so far."""
    command = [sys.executable, "-c", "from apd_deploy.cli import main; main()", "export", "--dllm", str(dllm),
               "--verifier", str(verifier), "-o", str(out), "--dtype", dtype, "--json"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    if result.returncode != 0:
        raise RuntimeError(f"export failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return {"peak_rss_bytes": peak, "seconds": round(seconds, 1), "summary": json.loads(result.stdout)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="real-width")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    parser.add_argument("--keep", type=Path, help="Write the pair and the bundle here and keep them.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="export-memory-") as scratch:
        root = args.keep or Path(scratch)
        dllm_dir, verifier_dir = build_pair(root, args.pair)
        result = measure_export(dllm_dir, verifier_dir, root / "bundle", args.dtype)
    larger = max(shape.parameters() for shape in PAIRS[args.pair][:2]) * DTYPE_BYTES[args.dtype]
    report = {
        "pair": args.pair, "dtype": args.dtype, "larger_model_bytes": larger,
        "peak_rss_bytes": result["peak_rss_bytes"], "ratio": round(result["peak_rss_bytes"] / larger, 3),
        "export_seconds": result["seconds"],
        "checks": {role: check.get("max_abs_diff") for role, check in result["summary"]["checks"].items()},
    }
    print(json.dumps(report))
    print(f"{args.pair} {args.dtype}: peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB = {report['ratio']:.2f} x the "
          f"larger model's {larger / 1e9:.2f} GB; export {report['export_seconds']:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

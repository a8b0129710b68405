"""Export: both graphs to ONNX with KV-cache I/O, checked against PyTorch, written atomically."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from apd_deploy.bundle import read_manifest, sha256_file
from apd_deploy.errors import BundleError, CheckpointError, ExportCheckError
from apd_deploy.export.checkpoint import load_checkpoint
from apd_deploy.export.pipeline import export_bundle
from checkpoints import checkpoint_from_config, fixture_config

CLI = str(Path(sys.executable).with_name("apd-deploy"))


def test_manifest_describes_the_pair(tiny_bundle, tiny_pair):
    manifest = read_manifest(tiny_bundle)
    dllm, verifier = manifest["models"]["dllm"], manifest["models"]["verifier"]
    assert dllm["attention"] == "bidirectional" and verifier["attention"] == "causal"
    assert dllm["config"]["vocab_size"] == 288 and verifier["config"]["vocab_size"] == 272
    assert verifier["config"]["tie_word_embeddings"]
    assert dllm["config"]["num_key_value_heads"] == 2 and dllm["config"]["num_attention_heads"] == 4
    assert manifest["special_tokens"] == {"mask": 259, "eos": [256], "pad": 256, "bos": 256}
    assert manifest["apd_defaults"] == {"apd_mixture_weight": 0.7, "kv_window": 16, "max_lookahead": 100}
    assert manifest["tokenizer"]["tokenizer_json"] == "tokenizer/tokenizer.json"
    assert set(manifest["files"]) == {"dllm.onnx", "verifier.onnx", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"}
    for rel, record in manifest["files"].items():
        assert record["sha256"] == sha256_file(tiny_bundle / rel)
    for model in (dllm, verifier):
        assert model["check"]["status"] == "passed"
        assert model["check"]["max_abs_diff"] < 1e-4
        assert {s["past_len"] for s in model["check"]["steps"]} >= {0}
        assert [i["name"] for i in model["inputs"]] == ["input_ids", "position_ids", "attention_mask", "past_kv",
                                                        "logit_rows"]


def test_graph_axes_are_dynamic(tiny_bundle):
    session = ort.InferenceSession(str(tiny_bundle / "dllm.onnx"), providers=["CPUExecutionProvider"])
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["input_ids"] == ["batch", "seq_len"]
    assert shapes["attention_mask"] == ["batch", "total_len"]
    assert shapes["past_kv"][0:5:4] == ["batch", "capacity"]


def _run_both(bundle, pair, role, batch, steps, mask_token=None):
    """Drive the ONNX graph and the PyTorch model through `steps` of (kept past, new tokens);
    returns the largest |logits diff|."""
    model = load_checkpoint(pair / role, role).model
    session = ort.InferenceSession(str(bundle / f"{role}.onnx"), providers=["CPUExecutionProvider"])
    length = max(k + n for k, n in steps)
    tokens = torch.randint(0, 272, (batch, length), generator=torch.Generator().manual_seed(1))
    if mask_token is not None:
        tokens[:, length // 2:] = mask_token
    torch_cache, onnx_cache, worst = model.empty_cache(batch), model.empty_cache(batch).numpy(), 0.0
    for keep, new in steps:
        ids = tokens[:, keep:keep + new]
        positions = torch.arange(keep, keep + new).expand(batch, new).contiguous()
        mask = torch.ones(batch, keep + new, dtype=torch.int64)
        with torch.no_grad():
            expected, kv = model(ids, positions, mask, torch_cache[..., :keep, :])
        torch_cache = torch.cat([torch_cache[..., :keep, :], kv], -2)
        # Longer windows ask for logits of some rows only, in any order, as the runtime does, and
        # each batch row its own (indices into the batch's windows flattened).
        rows = np.arange(new) if new < 3 else np.array([new - 1, 0, new // 2])
        per_row = [np.roll(rows, r) for r in range(batch)]
        logits, new_kv = session.run(None, {"input_ids": ids.numpy(), "position_ids": positions.numpy(),
                                            "attention_mask": mask.numpy(), "past_kv": onnx_cache,
                                            "logit_rows": np.concatenate([r * new + own for r, own in enumerate(per_row)])})
        onnx_cache = np.concatenate([onnx_cache[..., :keep, :], new_kv], -2)
        assert logits.shape == (batch * len(rows), model.config.vocab_size)
        want = np.concatenate([expected.numpy()[r, own] for r, own in enumerate(per_row)])
        worst = max(worst, float(np.abs(logits - want).max()))
    return worst


@pytest.mark.parametrize("batch", [1, 3])
def test_dllm_graph_matches_pytorch(tiny_bundle, tiny_pair, batch):
    # A first window of one token from an empty cache, windows with past, a cropped cache.
    steps = [(0, 1), (1, 9), (6, 1), (7, 12), (19, 1), (12, 3)]
    assert _run_both(tiny_bundle, tiny_pair, "dllm", batch, steps, mask_token=259) < 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_verifier_graph_matches_pytorch(tiny_bundle, tiny_pair, batch):
    steps = [(0, 11), (11, 1), (12, 1), (10, 5), (15, 1)]
    assert _run_both(tiny_bundle, tiny_pair, "verifier", batch, steps) < 1e-4


def test_verifier_graph_is_causal_and_dllm_is_not(tiny_bundle):
    def logits(role, ids):
        session = ort.InferenceSession(str(tiny_bundle / f"{role}.onnx"), providers=["CPUExecutionProvider"])
        n = ids.shape[1]
        _, layers, _, heads, _, head_dim = session.get_inputs()[3].shape
        return session.run(["logits"], {"input_ids": ids, "position_ids": np.arange(n)[None],
                                        "attention_mask": np.ones((1, n), np.int64),
                                        "past_kv": np.zeros((1, layers, 2, heads, 0, head_dim), np.float32),
                                        "logit_rows": np.arange(n)})[0]

    a = np.array([[5, 6, 7, 8, 9]], np.int64)
    b = a.copy()
    b[0, -1] = 10
    assert np.allclose(logits("verifier", a)[:-1], logits("verifier", b)[:-1])
    assert not np.allclose(logits("dllm", a)[:-1], logits("dllm", b)[:-1])


@pytest.mark.slow  # the default run exports a Dream-format directory too: the bundled demo pair's dLLM
def test_dream_format_directory_exports(tmp_path):
    # Two of the example's four layers: the format is what is tested, and tracing time grows with depth.
    dream = fixture_config("dream-config.json") | {"num_hidden_layers": 2}
    dllm = checkpoint_from_config(tmp_path / "dream", dream, seed=1)
    verifier = checkpoint_from_config(tmp_path / "qwen2", fixture_config("qwen2-verifier-config.json"), seed=2)
    manifest = export_bundle(dllm, verifier, tmp_path / "bundle")
    assert manifest["tokenizer"] is None
    assert manifest["special_tokens"]["mask"] == 2047
    assert manifest["models"]["dllm"]["config"]["model_type"] == "Dream"
    for model in manifest["models"].values():  # logits reach about 15 here: 1e-5 of that is ~1.5e-4
        assert model["check"]["max_abs_diff"] < 1e-5 * model["check"]["logits_scale"]


def test_fp16_export_carries_half_precision_caches(tiny_fp16_bundle):
    manifest = read_manifest(tiny_fp16_bundle)
    assert manifest["export"]["dtype"] == "fp16"
    for model in manifest["models"].values():
        assert {t["name"]: t["dtype"] for t in model["inputs"]}["past_kv"] == "float16"
        assert {t["name"]: t["dtype"] for t in model["outputs"]}["logits"] == "float32"
        assert model["check"]["status"] == "passed"
        assert model["check"]["max_abs_diff"] <= model["check"]["tolerance"]


def test_a_graph_no_installed_provider_runs_gets_a_reason_not_a_session(tmp_path):
    """What a bf16 export's check meets on a CPU-only machine, without tracing a model: a bf16
    matrix product, which onnxruntime's CPU provider has no kernel for."""
    from onnx import TensorProto, helper

    from apd_deploy.export import parity

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "bf16", [x], [y])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    session, reason = parity.ort_session(path)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime's CUDA provider runs bf16 here")
    assert session is None and "CPUExecutionProvider" in reason


@pytest.mark.slow  # a whole export; the check's refusal itself is tested above without tracing
def test_bf16_export_records_an_unrunnable_check_instead_of_faking_it(tiny_pair, tmp_path):
    manifest = export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", tmp_path / "bf16", dtype="bf16")
    for model in manifest["models"].values():
        assert {t["name"]: t["dtype"] for t in model["inputs"]}["past_kv"] == "bfloat16"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            assert model["check"]["status"] == "skipped"
            assert "onnxruntime" in model["check"]["reason"]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_failed_check_leaves_an_existing_bundle_untouched(tiny_pair, tiny_bundle, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    for f in tiny_bundle.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    before = {f.name: sha256_file(f) for f in out.iterdir()}
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", out)
    with pytest.raises(ExportCheckError, match="disagree"):
        export_bundle(tiny_pair / "dllm", tiny_pair / "verifier", out, overwrite=True, tolerance=0.0)
    assert {f.name: sha256_file(f) for f in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_bad_checkpoint_writes_nothing(tiny_pair, tmp_path):
    with pytest.raises(CheckpointError):
        export_bundle(tiny_pair / "verifier", tiny_pair / "verifier", tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_incompatible_vocabularies_are_refused(tmp_path):
    dream = fixture_config("dream-config.json") | {"vocab_size": 1024, "mask_token_id": 1000, "eos_token_id": 1001}
    dllm = checkpoint_from_config(tmp_path / "dream", dream)
    verifier = checkpoint_from_config(tmp_path / "qwen2", fixture_config("qwen2-verifier-config.json"))
    with pytest.raises(CheckpointError, match="larger than the dLLM's"):
        export_bundle(dllm, verifier, tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # a trace of its own, 14 s
def test_large_graphs_use_external_data(tiny_pair, tmp_path, monkeypatch):
    from apd_deploy.export import trace

    monkeypatch.setattr(trace, "EXTERNAL_DATA_BYTES", 0)
    model = load_checkpoint(tiny_pair / "verifier", "verifier").model
    trace.trace_to_onnx(model, tmp_path / "v.onnx", 18)
    data = [p for p in tmp_path.iterdir() if p.name != "v.onnx"]
    embedding_bytes = model.model.embed_tokens.weight.numel() * 4
    assert [p.name for p in data] == ["v.onnx.data"] and data[0].stat().st_size >= embedding_bytes
    session = ort.InferenceSession(str(tmp_path / "v.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "logits"


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # a whole export through the CLI, 30 s; the output modes are tested on a stand-in below
def test_cli_make_tiny_then_export_reports_progress(tmp_path):
    assert _cli("make-tiny", "t", cwd=tmp_path).returncode == 0
    result = _cli("export", "--dllm", "t/dllm", "--verifier", "t/verifier", "-o", "b", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    progress = result.stderr.splitlines()
    assert "tracing dllm to ONNX (opset 18, fp32) ..." in progress and "checking verifier graph against PyTorch ..." in progress
    # Nothing but progress: what torch's exporter prints itself, --quiet could not silence.
    assert all(line.endswith(" ...") or re.search(r": done in [0-9.]+ s$", line) for line in progress), progress
    assert result.stdout.splitlines()[-1].startswith("wrote b in ")
    read_manifest(tmp_path / "b")


@pytest.mark.parametrize("flag", ["--quiet", "--json"])
def test_cli_export_quiet_and_json_print_no_progress(tiny_bundle, monkeypatch, flag):
    """The output modes, around an export that reports progress (the real one is tested above)."""
    from click.testing import CliRunner

    from apd_deploy import cli
    from apd_deploy.export import pipeline

    def export(*_, report, **__):
        report("tracing dllm ...")
        return read_manifest(tiny_bundle)

    monkeypatch.setattr(pipeline, "export_bundle", export)
    result = CliRunner().invoke(cli.cli, ["export", "--dllm", "d", "--verifier", "v", "-o", "b", flag])
    assert result.exit_code == 0 and result.stderr == ""
    if flag == "--quiet":
        assert result.stdout == ""
    else:
        summary = json.loads(result.stdout)
        assert summary["checks"]["dllm"]["status"] == "passed"
        assert "manifest.json" not in summary["files"] and "dllm.onnx" in summary["files"]


@pytest.mark.parametrize("args, message", [
    (["--dllm", "nowhere", "--verifier", "nowhere"], "nowhere: not a directory"),
    (["--dllm", "t/verifier", "--verifier", "t/verifier"], "model_type' is 'qwen2'"),
])
def test_cli_errors_are_one_line_without_traceback(tmp_path, args, message):
    assert _cli("make-tiny", "t", cwd=tmp_path).returncode == 0
    result = _cli("export", *args, "-o", "b", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1]
    assert "Traceback" not in result.stderr and sum(line.startswith("error") for line in lines) == 1
    assert not (tmp_path / "b").exists()

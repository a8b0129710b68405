"""build-engine and the engine backends: what runs here (onnxruntime on the CPU), and every part
of the GPU paths that can be checked without a GPU: profiles, records, refusals, missing packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from apd_deploy import accelerators
from apd_deploy.bundle import read_manifest, sha256_file, store_manifest
from apd_deploy.engines import build as build_module
from apd_deploy.engines.build import build_engine
from apd_deploy.engines.profiles import derive_profiles
from apd_deploy.engines.tensorrt_build import tensorrt_record
from apd_deploy.errors import ApdDeployError, BackendUnavailable, EngineMismatch, GenerationError
from apd_deploy.runtime import Runtime
from apd_deploy.runtime.tensorrt_engine import check_engine_record, select_profile
from conftest import without_eos

PROMPT = [72, 101, 108, 108, 111]
CLI = str(Path(sys.executable).with_name("apd-deploy"))


def _has_tensorrt() -> bool:
    try:
        accelerators.require_tensorrt()
        return True
    except BackendUnavailable:
        return False


def _has_ort_cuda() -> bool:
    try:
        accelerators.require_ort_cuda()
        return True
    except BackendUnavailable:
        return False


def _has_cuda_cupy() -> bool:
    try:
        accelerators.require_cupy()
        return True
    except BackendUnavailable:
        return False


def _snapshot(bundle: Path) -> dict[str, str]:
    return {p.relative_to(bundle).as_posix(): sha256_file(p) for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.fixture
def bundle(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle, tmp_path / "b")


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, tmp_path_factory):
    copy = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("engine") / "b")
    build_engine(copy, "onnxruntime", "cpu")
    return copy


def test_onnxruntime_cpu_engine_is_recorded_and_hashed(engine_bundle):
    manifest = read_manifest(engine_bundle, verify="full")
    record = manifest["engines"]["onnxruntime-cpu-fp32"]
    assert record["backend"] == "onnxruntime" and record["device"] == "cpu" and record["array_backend"] == "numpy"
    assert record["graphs"] == {"dllm": "engines/onnxruntime-cpu-fp32/dllm.onnx",
                                "verifier": "engines/onnxruntime-cpu-fp32/verifier.onnx"}
    assert record["session_options"] == {"graph_optimization_level": "ORT_DISABLE_ALL"}
    assert record["built_with"]["execution_provider"] == "CPUExecutionProvider"
    for path in record["graphs"].values():
        assert manifest["files"][path]["sha256"] == sha256_file(engine_bundle / path)


@pytest.mark.parametrize("alg, params", [
    ("apd", {}), ("apd", {"apd_mixture_weight": 0.4, "kv_window": 3, "max_lookahead": 20}),
    ("leftright", {"tokens_per_step": 2}), ("diffusion", {"steps": 16}), ("ar", {}),
])
def test_engine_generates_the_same_tokens_as_the_graphs(engine_bundle, alg, params):
    graphs = Runtime.load(engine_bundle)
    engine = Runtime.load(engine_bundle, engine="onnxruntime-cpu-fp32")
    for prompt in (PROMPT, list(range(40, 60))):
        assert (engine.generate(prompt, alg=alg, max_new_tokens=120, **params).token_ids
                == graphs.generate(prompt, alg=alg, max_new_tokens=120, **params).token_ids)


def test_fp16_cpu_engine_converts_the_weights_once(tiny_fp16_bundle, tmp_path):
    """onnxruntime's CPU provider has no fp16 matrix kernels; the engine must hold the weights it
    runs with (fp32), not Casts that convert the fp16 weights again on every call."""
    import onnx

    bundle = shutil.copytree(tiny_fp16_bundle, tmp_path / "b")
    name, record = build_engine(bundle, "onnxruntime", "cpu")
    assert name == "onnxruntime-cpu-fp16" and record["session_options"] == {"graph_optimization_level": "ORT_DISABLE_ALL"}
    for path in record["graphs"].values():
        graph = onnx.load(str(bundle / path)).graph
        weights = {t.name for t in graph.initializer}
        assert any(n.op_type == "Cast" for n in graph.node)  # the activations still cross to fp32 and back
        assert [n.name for n in graph.node if n.op_type == "Cast" and n.input[0] in weights] == []
    graphs = Runtime.load(bundle)
    engine = Runtime.load(bundle, engine=name)
    for alg in ("apd", "ar"):
        assert engine.generate(PROMPT, alg=alg, max_new_tokens=60).token_ids == graphs.generate(PROMPT, alg=alg, max_new_tokens=60).token_ids


def test_rebuild_replaces_the_engine(bundle):
    build_engine(bundle, "onnxruntime")
    first = read_manifest(bundle)
    build_engine(bundle, "onnxruntime")
    second = read_manifest(bundle)
    assert list(second["engines"]) == ["onnxruntime-cpu-fp32"] and second["files"].keys() == first["files"].keys()
    assert sorted(p.name for p in (bundle / "engines").iterdir()) == ["onnxruntime-cpu-fp32"]


@pytest.mark.parametrize("args, message", [
    (dict(backend="onnxruntime", precision="fp16"), "re-export with `apd-deploy export --dtype fp16`"),
    pytest.param(dict(backend="onnxruntime", device="cuda"), "onnxruntime's CUDA provider is not available",
                 marks=pytest.mark.skipif(_has_ort_cuda(), reason="this machine has onnxruntime's CUDA provider")),
    pytest.param(dict(backend="tensorrt"), "TensorRT is not installed",
                 marks=pytest.mark.skipif(_has_tensorrt(), reason="this machine has TensorRT")),
    (dict(backend="tensorrt", device="cpu"), "the tensorrt backend runs on cuda"),
    (dict(backend="tvm"), "--backend must be one of"),
    (dict(backend="openvino", device="cuda"), "the openvino backend runs on cpu"),
    (dict(backend="onnxruntime", max_seq_len=4096), "exceeds the models' 512 positions"),
])
def test_failed_builds_leave_the_bundle_as_it_was(bundle, args, message):
    before = _snapshot(bundle)
    with pytest.raises(ApdDeployError, match=message):
        build_engine(bundle, **args)
    assert _snapshot(bundle) == before
    assert not (bundle / "engines").exists() and not list(bundle.rglob(".*"))


def test_a_failure_at_the_commit_restores_the_previous_engine(bundle, monkeypatch):
    build_engine(bundle, "onnxruntime")
    before = _snapshot(bundle)

    def broken(*_):
        raise OSError("disk full")

    monkeypatch.setattr(build_module, "store_manifest", broken)
    with pytest.raises(OSError, match="disk full"):
        build_engine(bundle, "onnxruntime")
    assert _snapshot(bundle) == before
    assert sorted(p.name for p in (bundle / "engines").iterdir()) == ["onnxruntime-cpu-fp32"]


def test_profiles_follow_the_apd_parameters():
    dllm = {p.name: p for p in derive_profiles("dllm", 2048, kv_window=16, max_lookahead=100, max_batch=4)}
    assert dllm["steady"].seq_len == (1, 116, 215)  # W + M to tune for, W + 2M - 1 at most
    assert dllm["steady"].past_len == (0, 1024, 2047)
    # In a batch a request's prefill may share its call with requests that have a cache.
    assert dllm["prefill"].seq_len == (1, 228, 2048) and dllm["prefill"].past_len == (0, 0, 2047)
    assert dllm["steady"].batch == (1, 1, 4)
    verifier = {p.name: p for p in derive_profiles("verifier", 2048, 16, 100, opt_window=8)}
    assert verifier["steady"].seq_len == (1, 8, 100) and verifier["steady"].past_len == (1, 1024, 2047)
    assert verifier["prefill"].past_len == (0, 0, 0)  # batch 1: a prefill is alone
    shapes = dllm["steady"].input_shapes((28, 4, 128))
    # The whole cache buffer goes in: its length is the request's, at most the engine's max.
    assert shapes["past_kv"] == ((1, 28, 2, 4, 1, 128), (1, 28, 2, 4, 1024, 128), (4, 28, 2, 4, 2048, 128))
    # The M lookahead rows to tune for, M + 1 per request at most (rows of a batch share the axis).
    assert shapes["logit_rows"] == ((1,), (100,), (404,))
    assert shapes["attention_mask"] == ((1, 1), (1, 1140), (4, 2262))
    assert dllm["prefill"].logit_len == (1, 100, 404) and verifier["prefill"].logit_len == (1, 100, 101)
    assert verifier["steady"].logit_len == (1, 8, 100)


def test_profiles_of_a_real_pair_reserve_no_prefill_logits():
    """Dream-7B's 131072 positions and a 32768 context: the prefill profile once allowed a
    [32768, 152064] fp32 logits tensor (19.9 GB); now M + 1 rows, or what --max-logit-rows says."""
    for role in ("dllm", "verifier"):
        prefill = {p.name: p for p in derive_profiles(role, 32768, 16, 100)}["prefill"]
        assert prefill.seq_len[2] == 32768 and prefill.logit_len[2] == 101
        assert 4 * prefill.logit_len[2] * 152064 < 64 << 20
    wide = {p.name: p for p in derive_profiles("dllm", 32768, 16, 100, max_logit_rows=512)}
    assert wide["prefill"].logit_len[2] == 512


def test_default_max_seq_len_is_a_sane_context(tiny_bundle, tmp_path, monkeypatch):
    """A 131072-position model gets 4096-position profiles unless --max-seq-len raises it."""
    seen = {}

    def fake_build(bundle, manifest, precision, profiles, max_batch, max_seq_len, *cache_and_output):
        seen.update(max_seq_len=max_seq_len, profiles=profiles)
        raise BackendUnavailable("stop here")

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    monkeypatch.setattr(build_module, "DEFAULT_MAX_SEQ_LEN", 256)  # the tiny pair has 512 positions
    monkeypatch.setattr(build_module, "build_tensorrt", fake_build)
    with pytest.raises(BackendUnavailable):
        build_module.build_engine(bundle, "tensorrt")
    assert seen["max_seq_len"] == 256 and seen["profiles"]["dllm"][1].seq_len[2] == 256
    with pytest.raises(BackendUnavailable):
        build_module.build_engine(bundle, "tensorrt", max_seq_len=512)
    assert seen["max_seq_len"] == 512


def test_profiles_hold_every_call_the_runtime_makes(tiny_bundle, monkeypatch):
    """Run the real decoding loops, alone and batched as on a GPU (one call per model per round),
    and check each engine call against the derived profiles."""
    runtime = Runtime.load(tiny_bundle)
    profiles = {role: [p.to_dict() for p in derive_profiles(role, 512, 16, 100, max_batch=4)]
                for role in ("dllm", "verifier")}
    calls = []
    for role, engine in (("dllm", runtime.dllm), ("verifier", runtime.verifier)):
        original = engine.run
        engine.call_cost_tokens = 4096  # as a GPU engine: a round's calls are never split

        def recording(batch, role=role, original=original):
            calls.append((role, len(batch), max(len(c.ids) for c in batch), max(c.cache.length for c in batch),
                          sum(len(c.ids) if c.rows is None else len(c.rows) for c in batch),
                          max(c.cache.buffer.shape[4] for c in batch)))
            return original(batch)

        monkeypatch.setattr(engine, "run", recording)
    runtime = without_eos(runtime)
    for prompt, n in (([5], 511), (list(range(60)), 452), (PROMPT, 200)):
        for alg, params in (("apd", {}), ("apd", {"apd_mixture_weight": 1.0}), ("leftright", {"tokens_per_step": 8}),
                            ("ar", {})):
            runtime.generate(prompt, alg=alg, max_new_tokens=n, **params)
    runtime.generate(PROMPT, alg="diffusion", max_new_tokens=101, steps=4)  # 101 masked rows: M + 1
    runtime.generate_many([[5], list(range(60)), PROMPT, [7, 8]], max_batch=4, max_new_tokens=200)
    assert {role for role, *_ in calls} == {"dllm", "verifier"} and max(batch for _, batch, *_ in calls) == 4
    for role, batch, seq_len, past_len, logit_len, capacity in calls:
        select_profile(profiles[role], batch, seq_len, past_len, logit_len, capacity)


def test_select_profile_prefers_steady_state_and_explains_misses():
    profiles = [p.to_dict() for p in derive_profiles("dllm", 512, 16, 100)]
    assert select_profile(profiles, 1, 116, 300, 100, 512) == 0
    assert select_profile(profiles, 1, 400, 0, 100, 512) == 1
    with pytest.raises(GenerationError, match="rebuild the engine with a larger --max-seq-len"):
        select_profile(profiles, 1, 300, 10, 100, 512)
    with pytest.raises(GenerationError, match="at most 101 per call.*--max-logit-rows 200"):
        select_profile(profiles, 1, 300, 0, 200, 512)
    with pytest.raises(GenerationError, match="batches 2 requests; the engine was built for at most 1.*--max-batch 2"):
        select_profile(profiles, 2, 116, 300, 100, 512)
    batched = [p.to_dict() for p in derive_profiles("dllm", 512, 16, 100, max_batch=8)]
    assert select_profile(batched, 8, 116, 300, 800, 512) == 0  # logit rows: M per request
    assert select_profile(batched, 8, 300, 10, 100, 512) == 1  # a prefill beside cached requests


def _tensorrt_record(version="10.13.0.35", capability="9.0"):
    profiles = {role: derive_profiles(role, 512, 16, 100) for role in ("dllm", "verifier")}
    record = tensorrt_record("fp16", version, capability, "NVIDIA H100", profiles, 1, 512)
    record["graphs"] = {role: f"engines/tensorrt-cuda-fp16/{path}" for role, path in record["graphs"].items()}
    return record


def test_tensorrt_record_fits_the_manifest_schema(bundle):
    manifest = read_manifest(bundle)
    store_manifest(bundle, {**manifest, "engines": {"tensorrt-cuda-fp16": _tensorrt_record()}})
    record = read_manifest(bundle, verify="skip")["engines"]["tensorrt-cuda-fp16"]
    assert record["built_with"]["tensorrt"] == "10.13.0.35" and record["built_with"]["compute_capability"] == "9.0"
    assert [p["name"] for p in record["profiles"]["dllm"]] == ["steady", "prefill"]


@pytest.mark.parametrize("version, capability, message", [
    ("10.14.1.48", "9.0", "built with TensorRT 10.13.0.35, this machine has 10.14.1.48; rebuild it"),
    ("10.13.0.35", "8.9", "compute capability 9.0, this GPU is 8.9; rebuild it"),
])
def test_engines_from_another_tensorrt_or_gpu_are_refused(version, capability, message):
    record = _tensorrt_record()
    check_engine_record("tensorrt-cuda-fp16", record, "10.13.0.35", "9.0")
    with pytest.raises(EngineMismatch, match=message):
        check_engine_record("tensorrt-cuda-fp16", record, version, capability)


@pytest.mark.skipif(_has_cuda_cupy(), reason="this machine has cupy and a GPU: the error paths below do not apply")
def test_gpu_engines_explain_what_is_missing(bundle):
    manifest = read_manifest(bundle)
    store_manifest(bundle, {**manifest, "engines": {"tensorrt-cuda-fp16": _tensorrt_record()}})
    with pytest.raises(BackendUnavailable, match=r"pip install 'apd-deploy\[(tensorrt|gpu)\]'"):
        Runtime.load(bundle, engine="tensorrt-cuda-fp16", verify="skip")
    with pytest.raises(BackendUnavailable, match=r"cupy .*pip install 'apd-deploy\[gpu\]'"):
        Runtime.load(bundle, array_backend="cupy")


def test_cli_build_engine_and_generate(bundle):
    env = {**os.environ}
    built = subprocess.run([CLI, "build-engine", str(bundle), "--backend", "onnxruntime", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["name"] == "onnxruntime-cpu-fp32"
    generated = subprocess.run([CLI, "generate", str(bundle), "--engine", "onnxruntime-cpu-fp32", "--prompt-ids",
                                "1,2,3", "--max-new-tokens", "20", "--json"], capture_output=True, text=True, env=env)
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["token_ids"] == Runtime.load(bundle).generate([1, 2, 3], max_new_tokens=20).token_ids


@pytest.mark.parametrize("args, message", [
    (["--backend", "tensorrt"], "TensorRT is not installed (it needs an NVIDIA GPU): pip install 'apd-deploy[tensorrt]'"),
    (["--backend", "onnxruntime", "--device", "cuda"], "pip install 'apd-deploy[gpu]'"),
])
def test_cli_missing_packages_are_one_line(bundle, args, message):
    if _has_cuda_cupy():
        pytest.skip("this machine has a GPU stack")
    result = subprocess.run([CLI, "build-engine", str(bundle), *args], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1] and "Traceback" not in result.stderr


def test_gpu_check_script_runs_and_skips_with_reasons(tiny_bundle, tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--bundle", str(tiny_bundle), "--work", str(tmp_path),
                             "--max-new-tokens", "24"], capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).parents[1], env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "onnxruntime CPU engine, numpy" in result.stdout and "10/10 generations identical" in result.stdout
    if not _has_cuda_cupy():
        assert "skipped" in result.stdout and "pip install 'apd-deploy[tensorrt]'" in result.stdout


@pytest.mark.skipif(not _has_cuda_cupy(), reason="needs cupy and an NVIDIA GPU (run scripts/gpu_check.sh on one)")
def test_cupy_array_backend_matches_numpy(tiny_bundle):
    numpy_runtime = Runtime.load(tiny_bundle)
    cupy_runtime = Runtime.load(tiny_bundle, array_backend="cupy")
    for alg in ("apd", "leftright", "diffusion", "ar"):
        assert (cupy_runtime.generate(PROMPT, alg=alg, max_new_tokens=64).token_ids
                == numpy_runtime.generate(PROMPT, alg=alg, max_new_tokens=64).token_ids)

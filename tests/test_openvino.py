"""The OpenVINO CPU engine: build, record, load, refusals, and the same tokens as onnxruntime."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apd_deploy.accelerators import cpu_isa, native_bf16
from apd_deploy.bundle import read_manifest, sha256_file, store_manifest
from apd_deploy.engines.build import build_engine
from apd_deploy.engines.openvino_build import check_precision
from apd_deploy.errors import ApdDeployError, EngineMismatch
from apd_deploy.runtime import Runtime
from apd_deploy.runtime.openvino_engine import blob_mismatch, bucket_past, bucket_window
from apd_deploy.tasks.arithmetic import problems
from conftest import without_eos
from engine_parity import explain, lockstep_runtime

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install 'apd-deploy[openvino]'")

CLI = str(Path(sys.executable).with_name("apd-deploy"))
PROMPT = [72, 101, 108, 108, 111]
BF16 = native_bf16(cpu_isa())
NO_BF16 = "this CPU has neither AMX nor AVX512_BF16"


@pytest.fixture(scope="module")
def ov_demo(demo_bundle, tmp_path_factory):
    """The demo pair with its OpenVINO engines: fp32, and bf16 where the CPU has it."""
    copy = shutil.copytree(demo_bundle, tmp_path_factory.mktemp("openvino-demo") / "demo")
    for precision in ("fp32", "bf16") if BF16 else ("fp32",):
        build_engine(copy, "openvino", "cpu", precision, threads=1)
    return copy


@pytest.fixture(scope="module")
def ov_bundle(tiny_bundle, tmp_path_factory):
    copy = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("openvino") / "b")
    build_engine(copy, "onnxruntime", "cpu")
    build_engine(copy, "openvino", "cpu", "fp32", threads=1)
    return copy


def test_engine_is_recorded_and_hashed(ov_bundle):
    manifest = read_manifest(ov_bundle, verify="full")
    record = manifest["engines"]["openvino-cpu-fp32"]
    assert record["backend"] == "openvino" and record["device"] == "cpu" and record["array_backend"] == "numpy"
    assert record["graphs"] == {"dllm": "engines/openvino-cpu-fp32/dllm.blob",
                                "verifier": "engines/openvino-cpu-fp32/verifier.blob"}
    assert record["sources"] == {"dllm": "dllm.onnx", "verifier": "verifier.onnx"}
    built = record["built_with"]
    assert built["isa"] == cpu_isa() and built["threads"] == 1 and built["openvino"]
    for path in record["graphs"].values():
        assert manifest["files"][path]["sha256"] == sha256_file(ov_bundle / path)


@pytest.mark.parametrize("alg, params", [("apd", {}), ("leftright", {"tokens_per_step": 2}), ("diffusion", {}),
                                         ("ar", {})])
def test_fp32_engine_gives_onnxruntimes_tokens(ov_bundle, alg, params):
    # every generation its full length
    ort = without_eos(Runtime.load(ov_bundle, engine="onnxruntime-cpu-fp32", threads=1))
    ov = without_eos(Runtime.load(ov_bundle, engine="openvino-cpu-fp32", threads=1))
    expected = ort.generate(PROMPT, alg=alg, max_new_tokens=24, **params)
    assert list(ov.generate(PROMPT, alg=alg, max_new_tokens=24, **params).token_ids) == list(expected.token_ids)


def test_batched_and_laned_decoding_gives_the_same_tokens(ov_demo):
    """Requests decoded together (in one lane or two) get the tokens each gets alone: a batch split
    into several calls must not read one call's outputs after the next call."""
    ov = Runtime.load(ov_demo, engine="openvino-cpu-fp32", threads=2)
    prompts = [ov.prompt_ids(p.question, chat=True) for p in itertools.islice(problems("test"), 8)]
    alone = [list(ov.generate(p, max_new_tokens=32).token_ids) for p in prompts]
    for lanes in (1, 2):
        together = ov.generate_many(prompts, max_batch=4, lanes=lanes, max_new_tokens=32)
        assert [list(r.token_ids) for r in together] == alone


def test_buckets_keep_shapes_few():
    assert [bucket_window(n) for n in (1, 2, 3, 8, 9, 32, 33, 116, 128, 129)] == [1, 2, 4, 8, 16, 32, 64, 128, 128, 160]
    assert [bucket_past(p, 1000) for p in (0, 1, 64, 65, 990)] == [0, 64, 64, 128, 1000]
    # APD's dLLM windows over a 256-token generation meet a handful of shapes, not one per step.
    shapes = {(bucket_window(112 + s % 6), bucket_past(100 + 2 * s, 400)) for s in range(128)}
    assert len(shapes) <= 6


def test_demo_pair_gives_onnxruntimes_tokens_or_near_ties(ov_demo):
    """The test problems the demo tests solve, APD and one token per step: the same answers as the
    onnxruntime engine, every call compared; any other argmax must be a near-tie (printed)."""
    ort = Runtime.load(ov_demo, engine="onnxruntime-cpu-fp32", threads=1)
    ov = Runtime.load(ov_demo, engine="openvino-cpu-fp32", threads=1)
    checked, steps = lockstep_runtime(ort, ov)
    for problem, alg in itertools.product(itertools.islice(problems("test"), 24), ("apd", "leftright")):
        prompt = ort.prompt_ids(problem.question, chat=True)
        expected = checked.generate(prompt, alg=alg, max_new_tokens=32)
        assert list(ov.generate(prompt, alg=alg, max_new_tokens=32).token_ids) == list(expected.token_ids) or \
            any(step.disagreements for step in steps)
    assert explain(steps) == []


def test_bf16_refused_without_bf16_instructions():
    with pytest.raises(ApdDeployError, match=NO_BF16.replace("neither", r"no bf16 instructions \(neither")):
        check_precision("bf16", "fp32", ["avx2", "avx512f"])
    check_precision("bf16", "fp32", ["avx512f", "avx512_bf16"])
    check_precision("fp32", "fp32", [])
    with pytest.raises(ApdDeployError, match="re-export it with `apd-deploy export --dtype fp32`"):
        check_precision("fp32", "fp16", [])
    record = {"precision": "bf16", "built_with": {"openvino": "v", "isa": ["amx_bf16"]}}
    with pytest.raises(EngineMismatch, match="build an fp32 engine"):
        blob_mismatch("openvino-cpu-bf16", record, "v", ["avx2"])


def test_fp16_bundle_is_refused(tiny_fp16_bundle, tmp_path):
    bundle = shutil.copytree(tiny_fp16_bundle, tmp_path / "b")
    with pytest.raises(ApdDeployError, match="compiles fp32 graphs"):
        build_engine(bundle, "openvino", "cpu", "fp32")
    assert "engines" not in read_manifest(bundle)


@pytest.mark.parametrize("change, message", [
    ({"openvino": "2020.1.0"}, "was compiled by OpenVINO 2020.1.0"),
    ({"isa": ["avx2", "an_isa_no_cpu_has"]}, "instruction sets this CPU lacks (an_isa_no_cpu_has)"),
])
def test_blobs_from_another_machine_are_compiled_again_with_a_warning(ov_bundle, tmp_path, change, message, capfd):
    bundle = shutil.copytree(ov_bundle, tmp_path / "b")
    manifest = read_manifest(bundle)
    manifest["engines"]["openvino-cpu-fp32"]["built_with"].update(change)
    store_manifest(bundle, manifest)
    for blob in (bundle / "engines" / "openvino-cpu-fp32").glob("*.blob"):
        blob.write_bytes(b"unusable")  # proves the graphs are compiled from the sources, not imported
        manifest["files"][blob.relative_to(bundle).as_posix()] = {"sha256": sha256_file(blob), "bytes": 8}
    store_manifest(bundle, manifest)
    ov = Runtime.load(bundle, engine="openvino-cpu-fp32", threads=1)
    err = capfd.readouterr().err
    assert message in err
    assert "apd-deploy build-engine BUNDLE --backend openvino --precision fp32" in err
    ort = Runtime.load(bundle, engine="onnxruntime-cpu-fp32", threads=1)
    assert list(ov.generate(PROMPT, max_new_tokens=12).token_ids) == list(ort.generate(PROMPT, max_new_tokens=12).token_ids)


def test_cli_builds_and_generates(ov_bundle, tmp_path):
    bundle = shutil.copytree(ov_bundle, tmp_path / "b")
    run = subprocess.run([CLI, "build-engine", str(bundle), "--backend", "openvino", "--threads", "1", "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["name"] == "openvino-cpu-fp32"
    run = subprocess.run([CLI, "generate", str(bundle), "--engine", "openvino-cpu-fp32", "--prompt-ids", "72,101,108",
                          "--max-new-tokens", "8", "--threads", "1", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    refused = subprocess.run([CLI, "build-engine", str(bundle), "--backend", "openvino", "--device", "cuda"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--device cuda: the openvino backend runs on cpu" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.skipif(not BF16, reason=f"{NO_BF16}: a bf16 engine is refused here")
def test_bf16_engine_runs_and_answers_the_demo_problems(ov_demo):
    ov = Runtime.load(ov_demo, engine="openvino-cpu-bf16", threads=1)
    questions = list(itertools.islice(problems("test"), 16))
    results = ov.generate_many([p.question for p in questions], chat=True, max_batch=4, max_new_tokens=32)
    solved = sum(str(p.answer) in r.text for p, r in zip(questions, results))
    assert solved >= 14  # fp32 solves 15 of these; bf16 may lose a near-tie


def test_a_damaged_engine_is_rebuilt(ov_bundle, tmp_path):
    """Rebuilding needs only the graphs it is built from to be sound."""
    bundle = shutil.copytree(ov_bundle, tmp_path / "b")
    (bundle / "engines" / "onnxruntime-cpu-fp32" / "dllm.onnx").unlink()
    (bundle / "engines" / "openvino-cpu-fp32" / "verifier.blob").write_bytes(b"damaged")
    for backend in ("onnxruntime", "openvino"):
        run = subprocess.run([CLI, "build-engine", str(bundle), "--backend", backend, "--threads", "1", "--quiet"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    read_manifest(bundle, verify="full")
    (bundle / "dllm.onnx").write_bytes(b"damaged")
    run = subprocess.run([CLI, "build-engine", str(bundle), "--backend", "openvino", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 1 and "dllm.onnx: " in run.stderr and "damaged" in run.stderr


@pytest.mark.slow
def test_30m_pair_gives_onnxruntimes_tokens_over_256(tmp_path):
    """The 30m preset (realistic proportions), APD over 256 new tokens from two prompts."""
    from apd_deploy.export.pipeline import export_bundle
    from apd_deploy.export.tiny import make_tiny

    make_tiny(tmp_path / "m30", preset="30m")
    bundle = tmp_path / "b"
    export_bundle(tmp_path / "m30" / "dllm", tmp_path / "m30" / "verifier", bundle)
    build_engine(bundle, "onnxruntime", "cpu")
    build_engine(bundle, "openvino", "cpu", "fp32", threads=2)
    ort = Runtime.load(bundle, engine="onnxruntime-cpu-fp32", threads=2)
    ov = Runtime.load(bundle, engine="openvino-cpu-fp32", threads=2)
    checked, steps = lockstep_runtime(without_eos(ort), ov)
    ov = without_eos(ov)
    rng = np.random.default_rng(0)
    for prompt in (rng.integers(300, 7000, 16) for _ in range(2)):
        expected = checked.generate(prompt, max_new_tokens=256)
        assert list(ov.generate(prompt, max_new_tokens=256).token_ids) == list(expected.token_ids) or \
            any(step.disagreements for step in steps)
    assert explain(steps) == []


def test_served_over_http_in_two_lanes(ov_demo):
    """`serve --engine openvino-cpu-fp32 --lanes 2`, driven by the openai client: Runtime.generate's answers."""
    from openai import OpenAI

    from apd_deploy.bench.serving import launched_server

    runtime = Runtime.load(ov_demo, engine="openvino-cpu-fp32", threads=1)
    questions = [p.question for p in itertools.islice(problems("test"), 4)]
    with launched_server([str(ov_demo), "--engine", "openvino-cpu-fp32", "--lanes", "2", "--threads", "2"]) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        for question in questions:
            answer = client.chat.completions.create(model="demo", max_tokens=32,
                                                    messages=[{"role": "user", "content": question}])
            assert answer.choices[0].message.content == runtime.generate(question, chat=True, max_new_tokens=32).text


def test_without_openvino_the_demo_falls_back_and_loads_explain(ov_bundle, tmp_path, monkeypatch):
    from apd_deploy.engines.build import fastest_cpu_engine

    assert fastest_cpu_engine() == ("openvino", "bf16" if BF16 else "fp32")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as on a machine without it
    assert fastest_cpu_engine() == ("onnxruntime", "fp32")
    bundle = shutil.copytree(ov_bundle, tmp_path / "b")
    for attempt in (lambda: build_engine(bundle, "openvino", "cpu", "fp32"),
                    lambda: Runtime.load(bundle, engine="openvino-cpu-fp32")):
        with pytest.raises(ApdDeployError, match=r"OpenVINO is not installed.*pip install 'apd-deploy\[openvino\]'"):
            attempt()
    assert Runtime.load(bundle, engine="onnxruntime-cpu-fp32").generate(PROMPT, max_new_tokens=4).token_ids is not None

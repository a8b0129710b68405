"""What loading a bundle hashes, and per-step counts that add up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from apd_deploy import bundle as bundle_module
from apd_deploy.errors import BundleError
from apd_deploy.runtime import Runtime
from conftest import without_eos

PROMPT = [72, 101, 108, 108, 111]


@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle with an onnxruntime CPU engine."""
    from apd_deploy.engines.build import build_engine

    copy = shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("hashing") / "b")
    name, _ = build_engine(copy, "onnxruntime", "cpu")
    return copy, name


@pytest.fixture()
def hashed(monkeypatch):
    """The bundle files hashed while the test runs, relative to their bundle."""
    names: list[str] = []
    real = bundle_module.sha256_file

    def spy(path, *args):
        path = Path(path)
        names.append(path.relative_to(next(p for p in path.parents if (p / "manifest.json").is_file())).as_posix())
        return real(path, *args)

    monkeypatch.setattr(bundle_module, "sha256_file", spy)
    return names


# Loading hashes the files the chosen engine reads, and no others.
def test_loading_the_graphs_hashes_only_the_graphs_and_tokenizer(engine_bundle, hashed):
    bundle, _ = engine_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    Runtime.load(bundle, verify="full")
    assert sorted(hashed) == sorted(["dllm.onnx", "verifier.onnx", *manifest["tokenizer"]["files"]])


def test_loading_an_engine_hashes_only_its_graphs_and_tokenizer(engine_bundle, hashed):
    bundle, name = engine_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    Runtime.load(bundle, engine=name, verify="full")
    assert sorted(hashed) == sorted([f"engines/{name}/dllm.onnx", f"engines/{name}/verifier.onnx",
                                     *manifest["tokenizer"]["files"]])


def test_a_damaged_file_stops_only_the_loads_that_read_it(engine_bundle, tmp_path):
    source, name = engine_bundle
    bundle = shutil.copytree(source, tmp_path / "b")
    graph = bundle / "engines" / name / "verifier.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    Runtime.load(bundle, verify="full")
    with pytest.raises(BundleError, match=f"engines/{name}/verifier.onnx: sha256 differs"):
        Runtime.load(bundle, engine=name, verify="full")


def test_an_unlisted_weights_file_beside_a_graph_is_refused(tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    (bundle / "dllm.onnx.data").write_bytes(b"weights nobody hashed")
    with pytest.raises(BundleError, match="dllm.onnx.data: not listed in manifest.json 'files'"):
        Runtime.load(bundle, verify="full")


def test_remembered_verification_trusts_size_and_modification_time(tiny_bundle, tmp_path):
    """Documented (generate --help): a change that keeps a file's size and mtime is not noticed."""
    import os

    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    Runtime.load(bundle, verify="remembered")
    graph = bundle / "dllm.onnx"
    stat = graph.stat()
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    Runtime.load(bundle, verify="remembered")
    with pytest.raises(BundleError, match="dllm.onnx: sha256 differs"):
        Runtime.load(bundle, verify="full")


# accepted_per_step: never negative, adds up to the tokens returned.
def _with_eos(tiny_bundle: Path, tmp_path: Path, eos: int) -> Path:
    copy = shutil.copytree(tiny_bundle, tmp_path / "eos")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["special_tokens"]["eos"] = [eos]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("alg, params", [
    ("diffusion", {}), ("diffusion", {"steps": 4}), ("diffusion", {"diffusion_order": "entropy", "temperature": 0.7}),
    ("apd", {}), ("leftright", {"tokens_per_step": 3}), ("ar", {}),
])
def test_accepted_per_step_adds_up_to_the_tokens_returned(tiny_bundle, tmp_path, alg, params):
    runtime = without_eos(Runtime.load(tiny_bundle))
    full = runtime.generate(PROMPT, alg=alg, max_new_tokens=16, seed=0, **params).token_ids
    # An EOS early in the output, so that much of what the steps decided is cut off.
    cut = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    result = Runtime.load(_with_eos(tiny_bundle, tmp_path, full[cut])).generate(
        PROMPT, alg=alg, max_new_tokens=16, seed=0, **params)
    assert result.token_ids == full[: cut + 1]
    assert min(result.accepted_per_step) >= 0
    assert sum(result.accepted_per_step) == len(result.token_ids)
    assert len(result.accepted_per_step) == result.steps

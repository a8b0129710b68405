"""The TensorRT build and runtime against a recording fake of the tensorrt API (tests/fake_tensorrt.py):
call order, aligned addresses, every failure signal looked at, sizes taken from the engine, no
host copies of the plan. What the fake cannot show (that TensorRT itself behaves as its headers
say) is checked by scripts/gpu_check.sh on a machine with TensorRT."""

from __future__ import annotations

import mmap
import shutil

import numpy as np
import pytest

from apd_deploy.bundle import read_manifest
from apd_deploy.engines.build import build_engine
from apd_deploy.engines.profiles import SCORE_COPIES, activation_bytes, derive_profiles
from apd_deploy.engines.tensorrt_build import build_tensorrt, precision_plan, tensorrt_record
from apd_deploy.errors import ApdDeployError, BundleError, GenerationError
from apd_deploy.runtime.engine import DecoderSpec, EngineCall
from apd_deploy.runtime.tensorrt_engine import TensorRTDecoder, select_profile
from fake_tensorrt import (ALIGNMENT, DataType, EngineSpec, ExecutionContextAllocationStrategy, FakeTensorRT,
                           TensorIOMode, fake_cupy, install)

KV_DIMS = (2, 2, 4)  # 128 bytes per fp32 position: a slot of an odd capacity starts misaligned
VOCAB = 32
DREAM_7B = {"num_attention_heads": 28, "vocab_size": 152064}


def _profiles(max_batch: int = 4):
    return derive_profiles("dllm", 64, 4, 8, max_batch=max_batch)


def _fake(version: str = "10.13.0.35", **engine) -> FakeTensorRT:
    shapes = [p.input_shapes(KV_DIMS) for p in _profiles()]
    return FakeTensorRT(version, EngineSpec(shapes, VOCAB, **engine))


def _decoder(tmp_path, fake: FakeTensorRT) -> TensorRTDecoder:
    plan = tmp_path / "dllm.plan"
    plan.write_bytes(b"plan")
    record = tensorrt_record("fp32", fake.version, "9.0", "Fake GPU", {"dllm": _profiles()}, 4, 64)
    return TensorRTDecoder("tensorrt-cuda-fp32", plan, DecoderSpec(VOCAB, 64, KV_DIMS, "float32"), record, "dllm")


@pytest.fixture
def fake(monkeypatch):
    return install(monkeypatch, _fake())


def test_every_bound_address_is_aligned_and_holds_the_call(fake, tmp_path):
    """A lone call's positions are a view into a constant (base + 8 * start) and a batch's caches a
    view of odd slots: both reach TensorRT only through aligned buffers, holding the right values."""
    decoder = _decoder(tmp_path, fake)
    cache = decoder.new_cache(20)
    cache.length = 3
    (logits, new_kv), = decoder.run([EngineCall(np.arange(5), cache, np.array([1, 4]))])
    slots = decoder.new_slots(4, 21)
    caches = [slots.cache(slot, 21) for slot in (1, 2)]
    for c, length in zip(caches, (2, 6)):
        slots.buffer[c.slot, ..., :length, :] = c.slot
        c.length = length
    batched = decoder.run([EngineCall(np.arange(3), caches[0]), EngineCall(np.arange(2), caches[1])])

    addresses = [args[1] for name, args in fake.calls if name == "set_tensor_address"]
    assert len(addresses) == 14 and all(address % ALIGNMENT == 0 for address in addresses)
    lone, batch = fake.executed
    assert lone["position_ids"].tolist() == [[3, 4, 5, 6, 7]] and lone["logit_rows"].tolist() == [1, 4]
    assert logits[:, 0].tolist() == [4, 7] and logits.shape == (2, VOCAB) and new_kv[0, 0, 0, 0, :, 0].tolist() == [3, 4, 5, 6, 7]
    assert batch["position_ids"].tolist() == [[2, 3, 4], [6, 7, 0]]
    assert batch["past_kv"][:, 0, 0, 0, 0, 0].tolist() == [1, 2]  # the slots' rows, copied from a misaligned view
    assert batched[1][0][:, 0].tolist() == [6, 7] and batched[0][1].shape == (1, *KV_DIMS[:1], 2, KV_DIMS[1], 3, KV_DIMS[2])


def test_contexts_share_one_buffer_sized_by_the_engine(fake, tmp_path):
    decoder = _decoder(tmp_path, fake)
    created = [args for name, args in fake.calls if name == "create_execution_context"]
    assert created == [(ExecutionContextAllocationStrategy.USER_MANAGED,)] * 2
    memory = [args for name, args in fake.calls if name == "set_device_memory"]
    assert len(memory) == 2 and memory[0] == memory[1] and memory[0][1] == 8 << 20  # device_memory_size_v2
    assert memory[0][0] % ALIGNMENT == 0
    order = [name for name in fake.names() if name in ("create_execution_context", "set_device_memory",
                                                        "set_optimization_profile_async")]
    assert order == ["create_execution_context", "set_device_memory", "set_optimization_profile_async"] * 2
    decoder.run([EngineCall(np.arange(40), decoder.new_cache(64), np.arange(8))])  # the prefill profile runs in the shared buffer


def test_the_plan_is_mapped_not_read(fake, tmp_path):
    _decoder(tmp_path, fake)
    (name, (plan,)), = [call for call in fake.calls if call[0] == "deserialize_cuda_engine"]
    assert isinstance(plan, mmap.mmap)


@pytest.mark.parametrize("failing, error, message", [
    ("deserialize_cuda_engine", BundleError, "could not deserialize this engine"),
    ("create_execution_context", BundleError, "could not create an execution context for the steady profile"),
    ("set_optimization_profile_async", BundleError, "refused optimisation profile 0"),
    ("set_input_shape", GenerationError, "refused input input_ids of shape"),
    ("wrong_logits", GenerationError, r"computes logits of shape \(5, 33\) for this call, the bundle's graph \(5, 32\)"),
    ("set_tensor_address", GenerationError, "refused the address"),
    ("execute_async_v3", GenerationError, "failed to run a batch of 1 windows"),
])
def test_every_failure_signal_is_an_error(fake, tmp_path, failing, error, message):
    fake.fail.add(failing)
    with pytest.raises(error, match=message):
        decoder = _decoder(tmp_path, fake)
        decoder.run([EngineCall(np.arange(5), decoder.new_cache(8))])


@pytest.mark.parametrize("engine, message", [
    (dict(kv_dtype=DataType.HALF), "tensor past_kv is HALF in the engine, float32 in the graph"),
    (dict(dtypes={"logits": DataType.HALF}), "tensor logits is HALF in the engine, float32 in the graph"),
    (dict(modes={"new_kv": TensorIOMode.INPUT}), "tensor new_kv is an input of the engine, an output of the graph"),
    (dict(device_memory=[1]), "the engine has 1 optimisation profiles, its record 2"),
])
def test_engine_io_is_checked_against_the_bundle(monkeypatch, tmp_path, engine, message):
    fake = _fake(**engine)
    if "device_memory" in engine:
        fake.engine.profiles = fake.engine.profiles[:1]
    install(monkeypatch, fake)
    with pytest.raises(BundleError, match=message):
        _decoder(tmp_path, fake)


def test_select_profile_checks_the_cache_capacity():
    profiles = [p.to_dict() for p in derive_profiles("dllm", 512, 16, 100)]
    assert select_profile(profiles, 1, 116, 300, 100, 512) == 0
    with pytest.raises(GenerationError, match="cache buffer of 600 positions; the engine takes at most 512.*--max-seq-len 600"):
        select_profile(profiles, 1, 116, 300, 100, 600)


# ---- build -----------------------------------------------------------------------------------

def _source(tmp_path, dtype: str = "fp32", config: dict | None = None) -> dict:
    models = {}
    for role in ("dllm", "verifier"):
        (tmp_path / f"{role}.onnx").write_bytes(b"graph")
        past = {"name": "past_kv", "dtype": "float32", "shape": ["batch", KV_DIMS[0], 2, KV_DIMS[1], "capacity", KV_DIMS[2]]}
        models[role] = {"graph": f"{role}.onnx", "inputs": [past],
                        "config": config or {"num_attention_heads": 4, "vocab_size": VOCAB}}
    return {"export": {"dtype": dtype}, "models": models}


def _build(tmp_path, precision="fp32", timing_cache=None, max_seq_len=64, max_batch=1, config=None, dtype=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    profiles = {role: derive_profiles(role, max_seq_len, 4, 8, max_batch=max_batch) for role in ("dllm", "verifier")}
    messages = []
    record = build_tensorrt(tmp_path, _source(tmp_path, dtype or precision, config), precision, profiles, max_batch,
                            max_seq_len, timing_cache, tmp_path / "previous", out, messages.append)
    return record, out, messages


@pytest.mark.parametrize("version, network_flags", [("10.13.0.35", 1), ("11.1.0.7", 0)])
def test_build_is_strongly_typed_in_order_and_writes_the_plan_without_a_copy(monkeypatch, tmp_path, version, network_flags):
    fake = install(monkeypatch, _fake(version))
    record, out, messages = _build(tmp_path)
    build = ["create_network", "parse_from_file", "create_builder_config", "create_timing_cache", "set_timing_cache",
             "build_serialized_network", "get_timing_cache"]
    assert [n for n in fake.names() if n in build] == build * 2 and messages == []
    assert ("create_network", (network_flags,)) in fake.calls
    assert not [args for name, args in fake.calls if name == "set_flag"]  # no FP16/BF16 builder flags
    assert (out / "dllm.plan").read_bytes() == f"plan built by {version}".encode()
    assert record["built_with"]["strongly_typed"] and record["built_with"]["builder_flags"] == []


@pytest.mark.parametrize("exported, precision", [("fp32", "fp16"), ("fp32", "bf16"), ("fp16", "bf16")])
def test_reduced_precision_comes_from_the_export(exported, precision):
    with pytest.raises(ApdDeployError, match=f"strongly typed.*--precision {exported}.*export --dtype {precision}"):
        precision_plan(exported, precision)
    precision_plan(precision, precision)


def test_a_refused_timing_cache_falls_back_to_an_empty_one(monkeypatch, tmp_path):
    fake = install(monkeypatch, _fake())
    fake.refused_caches.add(b"from another GPU")
    cache = tmp_path / "my.cache"
    cache.write_bytes(b"from another GPU")
    record, out, messages = _build(tmp_path, timing_cache=cache)
    assert "another TensorRT version or GPU" in messages[0] and "empty" in messages[0]
    created = [args[0] for name, args in fake.calls if name == "create_timing_cache"]
    assert created[:2] == [b"from another GPU", b""]
    assert cache.read_bytes() == b"cache:10.13.0.35" == (out / record["timing_cache"]).read_bytes()


def test_an_unreadable_timing_cache_falls_back_and_a_missing_one_is_reported(monkeypatch, tmp_path):
    fake = install(monkeypatch, _fake())
    fake.unreadable_caches.add(b"truncated")
    (tmp_path / "my.cache").write_bytes(b"truncated")
    record, out, messages = _build(tmp_path, timing_cache=tmp_path / "my.cache")
    assert "another TensorRT version or GPU" in messages[0] and "timing_cache" in record
    fake.fail.add("get_timing_cache")
    record, out, messages = _build(tmp_path / "out")
    assert [m for m in messages if "returned no timing cache" in m] and "timing_cache" not in record
    assert not list((tmp_path / "out" / "out").glob("*.cache"))


def test_a_failed_empty_timing_cache_is_an_error(monkeypatch, tmp_path):
    fake = install(monkeypatch, _fake())
    fake.fail.add("create_timing_cache")
    with pytest.raises(ApdDeployError, match="could not create an empty timing cache"):
        _build(tmp_path)


def test_build_engine_keys_the_timing_cache_by_tensorrt_and_gpu(monkeypatch, tiny_bundle, tmp_path):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    fake = install(monkeypatch, _fake("10.13.0.35"))
    build_engine(bundle, "tensorrt", max_seq_len=64)
    record = read_manifest(bundle)["engines"]["tensorrt-cuda-fp32"]
    assert record["timing_cache"] == "engines/tensorrt-cuda-fp32/timing-trt10.13.0.35-sm90.cache"
    assert (bundle / record["timing_cache"]).read_bytes() == b"cache:10.13.0.35"

    for version, first_cache in (("10.14.1.48", b""), ("10.14.1.48", b"cache:10.14.1.48")):
        fake = install(monkeypatch, _fake(version))
        build_engine(bundle, "tensorrt", max_seq_len=64)
        assert [args[0] for name, args in fake.calls if name == "create_timing_cache"][0] == first_cache
    assert sorted(p.name for p in (bundle / "engines/tensorrt-cuda-fp32").glob("*.cache")) == [
        "timing-trt10.14.1.48-sm90.cache"]


def test_activation_estimate_at_dream_7b_widths():
    """One fp32 copy of the scores at a 4096-token prefill is 1.88 GB; the batch and the past multiply it."""
    prefill = {p.name: p for p in derive_profiles("dllm", 4096, 16, 100)}["prefill"]
    logits = 4 * 101 * DREAM_7B["vocab_size"]
    assert (activation_bytes(prefill, DREAM_7B) - logits) / SCORE_COPIES == pytest.approx(1.879e9, rel=1e-3)
    batched = {p.name: p for p in derive_profiles("dllm", 4096, 16, 100, max_batch=8)}["prefill"]
    assert (activation_bytes(batched, DREAM_7B) - 8 * logits) / SCORE_COPIES == pytest.approx(30.06e9, rel=1e-3)


def test_build_refuses_profiles_beyond_the_gpu_memory_and_warns_near_it(monkeypatch, tmp_path):
    install(monkeypatch, _fake(), fake_cupy(total_memory=80 << 30))
    with pytest.raises(ApdDeployError, match=r"about 72\d\.\d GB of GPU memory .*this GPU has 85\.9 GB; "
                                             r"lower --max-seq-len .* or --max-batch"):
        _build(tmp_path, max_seq_len=32768, config=DREAM_7B)
    assert not list((tmp_path / "out").iterdir())  # refused before anything was built
    _, _, messages = _build(tmp_path, max_seq_len=10240, config=DREAM_7B)
    assert messages and messages[0].startswith("warning: the engines would need about")

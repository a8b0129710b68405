"""Recording stand-ins for `tensorrt` and `cupy`, so the TensorRT build and runtime run on the CPU.

The fake `tensorrt` has the real Python API's names and signatures (TensorRT 10.8-11.1:
NvInfer.h / NvInferRuntime.h and their pybind bindings) and its failure signals: None from
the factories, False from the setters, a RuntimeError from `set_optimization_profile_async` and
`set_shape`. Every call is appended to `FakeTensorRT.calls` as (name, args). `fail` names calls
that signal failure. Device memory is host memory: the fake cupy allocates 256-byte aligned numpy
buffers whose `.data.ptr` is their address, so the fake engine reads the inputs at the addresses it
was given and writes its outputs there, as a GPU would.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types
from dataclasses import dataclass, field
import numpy as np

ALIGNMENT = 256


# ---- cupy ------------------------------------------------------------------------------------

class DeviceArray(np.ndarray):
    """A numpy array standing for a cupy one: `.data.ptr` is its address, `.get()` a host copy."""

    @property
    def data(self):  # cupy's MemoryPointer
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self) -> np.ndarray:
        return np.array(self)


def _allocate(shape, dtype) -> DeviceArray:
    """Aligned like cudaMalloc (cupy's pool rounds to 512 bytes)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    nbytes = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1)
    raw = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -raw.ctypes.data % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype)[: int(np.prod(shape))].reshape(shape).view(DeviceArray)


class _Stream:
    ptr = 0x5000

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def synchronize(self) -> None:
        pass


def fake_cupy(total_memory: int = 80 << 30, capability: str = "90") -> types.ModuleType:
    cupy = types.ModuleType("cupy")

    def empty(shape, dtype=np.float32):
        return _allocate(shape, dtype)

    def zeros(shape, dtype=np.float32):
        return _allocate(shape, dtype)

    def ones(shape, dtype=np.float32):
        array = _allocate(shape, dtype)
        array[...] = 1
        return array

    def arange(n, dtype=np.int64):
        array = _allocate(n, dtype)
        array[...] = np.arange(n, dtype=dtype)
        return array

    def asarray(array, dtype=None):
        if isinstance(array, DeviceArray) and (dtype is None or array.dtype == dtype):
            return array
        host = np.asarray(array, dtype=dtype)
        device = _allocate(host.shape, host.dtype)
        device[...] = host
        return device

    def ascontiguousarray(array):  # as cupy: no copy of an array that is already contiguous
        return array if array.flags.c_contiguous else asarray(np.ascontiguousarray(array))

    cupy.empty, cupy.zeros, cupy.ones, cupy.arange = empty, zeros, ones, arange
    cupy.asarray, cupy.ascontiguousarray = asarray, ascontiguousarray
    cupy.ndarray = DeviceArray
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda device: {"name": b"Fake GPU", "totalGlobalMem": total_memory})
    device = types.SimpleNamespace(compute_capability=capability, synchronize=lambda: None)
    cupy.cuda = types.SimpleNamespace(Stream=_Stream, runtime=runtime, Device=lambda index=0: device)
    return cupy


# ---- tensorrt --------------------------------------------------------------------------------

class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 0


class BuilderFlag(enum.Enum):
    FP16 = 0
    BF16 = 1
    TF32 = 6


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


NUMPY = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.BF16: np.uint16, DataType.INT64: np.int64}


class HostMemory(bytearray):
    """IHostMemory: a buffer. `bytes(plan)` would copy it; the fake refuses to be copied."""

    def __bytes__(self):
        raise AssertionError("bytes() copies TensorRT's host memory")

    @property
    def nbytes(self) -> int:
        return len(self)


@dataclass
class EngineSpec:
    """What the fake engine was built with: per-input (min, opt, max) shapes per profile, dtypes."""

    profiles: list[dict[str, tuple]]
    vocab: int
    kv_dtype: DataType = DataType.FLOAT
    dtypes: dict[str, DataType] = field(default_factory=dict)
    modes: dict[str, TensorIOMode] = field(default_factory=dict)
    device_memory: list[int] = field(default_factory=lambda: [1 << 20, 8 << 20])

    def dtype(self, name: str) -> DataType:
        default = self.kv_dtype if name in ("past_kv", "new_kv") else DataType.FLOAT if name == "logits" else DataType.INT64
        return self.dtypes.get(name, default)

    def mode(self, name: str) -> TensorIOMode:
        default = TensorIOMode.OUTPUT if name in ("logits", "new_kv") else TensorIOMode.INPUT
        return self.modes.get(name, default)


class FakeTensorRT:
    """Build with `module()`; `calls` records every API call, `fail` makes named calls fail."""

    def __init__(self, version: str = "10.13.0.35", engine: EngineSpec | None = None) -> None:
        self.version, self.engine = version, engine
        self.calls: list[tuple[str, tuple]] = []
        self.fail: set[str] = set()
        self.refused_caches: set[bytes] = set()  # serialized caches set_timing_cache refuses
        self.unreadable_caches: set[bytes] = set()  # serialized caches create_timing_cache cannot read
        self.executed: list[dict[str, np.ndarray]] = []  # the inputs each execution read

    def record(self, name: str, *args) -> bool:
        self.calls.append((name, args))
        return name in self.fail

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def module(self) -> types.ModuleType:
        fake = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = self.version
        trt.DataType, trt.TensorIOMode = DataType, TensorIOMode
        trt.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
        trt.NetworkDefinitionCreationFlag, trt.BuilderFlag, trt.MemoryPoolType = (
            NetworkDefinitionCreationFlag, BuilderFlag, MemoryPoolType)

        class Logger:
            WARNING = 2

            def __init__(self, min_severity: int = WARNING) -> None:
                pass

        class TimingCache:
            def __init__(self, blob: bytes) -> None:
                self.blob = blob

            def serialize(self) -> HostMemory:
                return HostMemory(b"cache:" + fake.version.encode())

        class OptimizationProfile:
            def set_shape(self, input: str, min, opt, max) -> None:
                fake.record("set_shape", input, tuple(min), tuple(opt), tuple(max))
                if not all(a <= b <= c for a, b, c in zip(min, opt, max)):
                    raise RuntimeError("Shape provided for min is inconsistent with other shapes.")

        class BuilderConfig:
            def __init__(self) -> None:
                self.cache = None
                self.flags: set = set()

            def set_memory_pool_limit(self, pool, pool_size: int) -> None:
                fake.record("set_memory_pool_limit", pool, pool_size)

            def set_flag(self, flag) -> None:
                fake.record("set_flag", flag)

            def clear_flag(self, flag) -> None:
                fake.record("clear_flag", flag)

            def add_optimization_profile(self, profile) -> int:
                return -1 if fake.record("add_optimization_profile", profile) else 0

            def create_timing_cache(self, serialized_timing_cache) -> TimingCache | None:
                blob = bytes(serialized_timing_cache)
                failed = fake.record("create_timing_cache", blob) or blob in fake.unreadable_caches
                return None if failed else TimingCache(blob)

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                refused = fake.record("set_timing_cache", cache.blob, ignore_mismatch) or cache.blob in fake.refused_caches
                if not refused:
                    self.cache = cache
                return not refused

            def get_timing_cache(self) -> TimingCache | None:
                return None if fake.record("get_timing_cache") else self.cache

        class Network:
            pass

        class Builder:
            def __init__(self, logger) -> None:
                pass

            def create_network(self, flags: int = 0) -> Network:
                fake.record("create_network", flags)
                return Network()

            def create_builder_config(self) -> BuilderConfig:
                fake.record("create_builder_config")
                return BuilderConfig()

            def create_optimization_profile(self) -> OptimizationProfile:
                return OptimizationProfile()

            def build_serialized_network(self, network, config) -> HostMemory | None:
                if fake.record("build_serialized_network", config.cache):
                    return None
                return HostMemory(b"plan built by " + fake.version.encode())

        class ParserError:
            def desc(self) -> str:
                return "unsupported operator"

        class OnnxParser:
            def __init__(self, network, logger) -> None:
                self.num_errors = 0

            def parse_from_file(self, model: str) -> bool:
                if fake.record("parse_from_file", model):
                    self.num_errors = 1
                    return False
                return True

            def get_error(self, index: int) -> ParserError:
                return ParserError()

        class Runtime:
            def __init__(self, logger) -> None:
                pass

            def deserialize_cuda_engine(self, serialized_engine) -> Engine | None:
                return None if fake.record("deserialize_cuda_engine", serialized_engine) else Engine(fake.engine, fake)

        trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
        return trt


TENSORS = ("input_ids", "position_ids", "attention_mask", "past_kv", "logit_rows", "logits", "new_kv")


class Engine:
    def __init__(self, spec: EngineSpec, fake: FakeTensorRT) -> None:
        self.spec, self.fake = spec, fake

    @property
    def num_io_tensors(self) -> int:
        return len(TENSORS)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self.spec.profiles)

    @property
    def device_memory_size_v2(self) -> int:
        return max(self.spec.device_memory)

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self.spec.device_memory[profile_index]

    def get_tensor_name(self, index: int) -> str:
        return TENSORS[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.spec.mode(name)

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.spec.dtype(name)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple]:
        return [tuple(s) for s in self.spec.profiles[profile_index][name]]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC) -> Context | None:
        return None if self.fake.record("create_execution_context", strategy) else Context(self, strategy)


class Context:
    def __init__(self, engine: Engine, strategy) -> None:
        self.engine, self.strategy = engine, strategy
        self.profile: int | None = None
        self.memory: tuple[int, int] | None = None
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, memory: int, size: int) -> None:
        self.engine.fake.record("set_device_memory", memory, size)
        self.memory = (memory, size)

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if self.engine.fake.record("set_optimization_profile_async", profile_index, stream_handle):
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = profile_index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        low, _, high = self.engine.spec.profiles[self.profile][name]
        inside = len(shape) == len(low) and all(a <= s <= b for a, s, b in zip(low, shape, high))
        failed = self.engine.fake.record("set_input_shape", name, tuple(shape))
        if inside and not failed:
            self.shapes[name] = tuple(shape)
        return inside and not failed

    def get_tensor_shape(self, name: str) -> tuple:
        self.engine.fake.record("get_tensor_shape", name)
        if name == "logits":
            return (self.shapes["logit_rows"][0], self.engine.spec.vocab + ("wrong_logits" in self.engine.fake.fail))
        if name == "new_kv":
            batch, layers, two, heads, _, dim = self.shapes["past_kv"]
            return (batch, layers, two, heads, self.shapes["input_ids"][1], dim)
        return self.shapes[name]

    def set_tensor_address(self, name: str, memory: int) -> bool:
        failed = self.engine.fake.record("set_tensor_address", name, memory)
        if failed or memory % ALIGNMENT:  # the real one logs an error and returns False
            return False
        self.addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        if self.engine.fake.record("execute_async_v3", stream_handle):
            return False
        spec = self.engine.spec
        size = self.engine.get_device_memory_size_for_profile_v2(self.profile)
        if self.strategy is ExecutionContextAllocationStrategy.USER_MANAGED and (self.memory is None or self.memory[1] < size):
            return False
        inputs = {name: _read(self.addresses[name], self.shapes[name], NUMPY[spec.dtype(name)]).copy()
                  for name in TENSORS[:5]}
        self.engine.fake.executed.append(inputs)
        # logits[r] = position of the row asked for, in every column; new_kv = the window's positions.
        rows = inputs["logit_rows"]
        positions = inputs["position_ids"]
        logits = _read(self.addresses["logits"], self.get_tensor_shape("logits"), np.float32)
        logits[...] = positions.reshape(-1)[rows][:, None]
        new_kv = _read(self.addresses["new_kv"], self.get_tensor_shape("new_kv"), NUMPY[spec.dtype("new_kv")])
        new_kv[...] = positions[:, None, None, None, :, None]
        return True


def _read(address: int, shape: tuple, dtype) -> np.ndarray:
    """The array at a (fake) device address."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    raw = (ctypes.c_byte * max(count * dtype.itemsize, 1)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def install(monkeypatch, fake: FakeTensorRT, cupy: types.ModuleType | None = None) -> FakeTensorRT:
    """Put the fake `tensorrt` (and a fake `cupy`) into sys.modules for one test."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module())
    monkeypatch.setitem(sys.modules, "cupy", cupy or fake_cupy())
    return fake

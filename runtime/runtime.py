"""`Runtime`: a loaded bundle (two engines, tokenizer, manifest, default parameters), and requests of it.

A Runtime never changes: what a request changes (canvas, caches, random generator, counters) is
made per request, so threads may generate on one runtime at once. A variant (other defaults, timed
engine calls) is a new Runtime over the same engines (`dataclasses.replace`, `timed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apd_deploy.bundle import VERIFY_MODES, read_manifest, verify_files
from apd_deploy.errors import BundleError, GenerationError
from apd_deploy.runtime.arrays import array_module
from apd_deploy.runtime.driver import Decoding, Request, step
from apd_deploy.runtime.engine import DecoderEngine, DecoderSpec, OrtCpuDecoder, SynchronizedEngine, default_threads
from apd_deploy.runtime.openvino_engine import open_openvino
from apd_deploy.runtime.params import DEFAULT_MAX_NEW_TOKENS, GenerationParams, check_integer, group
from apd_deploy.runtime.results import Generation, GenerationResult
from apd_deploy.runtime.sampling import SamplingParams
from apd_deploy.runtime.threads import too_many_threads
from apd_deploy.runtime.tokenizer import BundleTokenizer

if TYPE_CHECKING:
    from apd_deploy.runtime.scheduler import Scheduler


@dataclass(frozen=True, eq=False)
class Runtime:
    bundle: Path
    manifest: dict[str, Any]
    dllm: DecoderEngine
    verifier: DecoderEngine
    tokenizer: BundleTokenizer | None
    max_seq_len: int | None = None  # an engine's limit below the models' positions
    defaults: GenerationParams | None = None  # None: the manifest's apd_defaults
    eos_ids: frozenset[int] | None = None  # None: the manifest's
    threads: int | None = None  # onnxruntime threads per model (set by `load`)
    # The engines of n scheduling loops, threads / n threads each (set by `load`; see `scheduler`).
    open_lanes: Callable[[int], list[dict[str, DecoderEngine]]] | None = None
    engine_max_batch: tuple[str, int] | None = None  # (engine, largest batch it was built for)
    engines: dict[str, DecoderEngine] = field(init=False)  # by role, as decoders name them
    xp: Any = field(init=False)  # the engines' array module
    mask_id: int = field(init=False)
    vocab_size: int = field(init=False)  # the verifier's: the ids both models know
    max_positions: int = field(init=False)

    def __post_init__(self) -> None:
        special = self.manifest["special_tokens"]
        settled = {"defaults": self.defaults or GenerationParams(**self.manifest["apd_defaults"]),
                   "eos_ids": frozenset(special["eos"]) if self.eos_ids is None else self.eos_ids,
                   "engines": {"dllm": self.dllm, "verifier": self.verifier}, "xp": self.dllm.xp,
                   "mask_id": special["mask"], "vocab_size": self.verifier.spec.vocab_size,
                   "max_positions": min(self.dllm.spec.max_positions, self.verifier.spec.max_positions,
                                        self.max_seq_len or 1 << 62)}
        for name, value in settled.items():  # frozen: set once, here
            object.__setattr__(self, name, value)

    @classmethod
    def load(cls, bundle: str | Path, engine: str | None = None, threads: int | None = None,
             verify: str = "remembered", array_backend: str | None = None,
             engine_options: dict[str, Any] | None = None) -> Runtime:
        """Load `bundle`.

        engine: a name from the manifest's `engines` (see `apd-deploy build-engine`), or None to
          run the exported ONNX graphs with onnxruntime on the CPU.
        verify: checks the files this engine reads (its graphs and the tokenizer; not the other
          engines' files) against their sha256 in the manifest. 'full' hashes them; 'remembered'
          (default) skips a file whose size and modification time match an earlier full check, so a
          change that keeps both goes unnoticed; 'skip' trusts the files.
        threads: onnxruntime threads per model; default: every core this process may run on.
        array_backend: 'numpy' or 'cupy' for sampling and acceptance; by default the engine's
          (cupy for GPU engines). cupy over a CPU engine exercises the GPU sampling code.
        engine_options: for onnxruntime engines, `fixed_shapes` (pad calls to a few shapes; on by
          default on CUDA, where it enables `cuda_graph`, also on by default) — to compare the
          GPU levers, or to check the padding on the CPU.
        """
        if threads is not None:
            check_integer("threads", threads, 1)
            if (reason := too_many_threads(threads)) is not None:
                raise GenerationError(f"threads {reason}")
        if verify not in VERIFY_MODES:
            raise GenerationError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        bundle = Path(bundle)
        manifest, record = cls.check_files(bundle, engine, verify)
        specs = {role: DecoderSpec.from_manifest(manifest["models"][role], bundle / "manifest.json", role)
                 for role in ("dllm", "verifier")}
        _check_pair(bundle, manifest, specs)
        threads = threads or default_threads()
        # Cached: a lane's sessions are opened once per runtime (each costs a load of the weights).
        open_lanes = cache(partial(_open_engines, bundle, manifest, engine, record, specs, array_backend,
                                   engine_options or {}, threads))
        (engines,) = open_lanes(1)
        return cls(bundle, manifest, engines["dllm"], engines["verifier"], BundleTokenizer.from_bundle(bundle, manifest),
                   record.get("max_seq_len") if record else None, threads=threads, open_lanes=open_lanes,
                   # TensorRT: its profiles hold batches up to max_batch
                   engine_max_batch=(engine, record["max_batch"]) if record and record.get("max_batch") else None)

    @staticmethod
    def check_files(bundle: str | Path, engine: str | None = None,
                    verify: str = "full") -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Check the files `load(bundle, engine)` would read against the manifest's sha256, without
        opening an engine (a node checks its copy of a bundle before it serves); returns the
        manifest and the engine's record (None: the exported graphs)."""
        bundle = Path(bundle)
        manifest = read_manifest(bundle, verify="skip")
        record = _engine_record(bundle, manifest, engine)
        verify_files(bundle, manifest, verify, only=_files_read(bundle, manifest, record))
        return manifest, record

    def params(self, **overrides: Any) -> GenerationParams:
        """Generation parameters: the bundle's APD defaults with `overrides` (None = default)."""
        sampling = SamplingParams(**{k: v for k in group("sampling") if (v := overrides.pop(k, None)) is not None})
        chosen = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(chosen) - set(GenerationParams.__dataclass_fields__)
        if unknown:
            raise GenerationError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
        params = replace(self.defaults, sampling=sampling, **chosen)
        params.check()
        return params

    def fit(self, params: GenerationParams, prompt_len: int) -> GenerationParams:
        """`params` with max_new_tokens settled for a prompt of `prompt_len` tokens: by default
        DEFAULT_MAX_NEW_TOKENS or what the models' positions leave after the prompt, if less."""
        room = self.max_positions - prompt_len
        if room < 1:
            raise GenerationError(
                f"the prompt alone is too long: its {prompt_len} tokens leave no room for new tokens in the "
                f"models' {self.max_positions} positions; shorten it to at most {self.max_positions - 1} tokens", "prompt"
            )
        if params.max_new_tokens is None:
            params = replace(params, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, room))
            params.check()  # --steps against the settled number of new tokens
        elif params.max_new_tokens > room:
            raise GenerationError(
                f"prompt of {prompt_len} tokens + {{name}} {params.max_new_tokens} exceeds the models' "
                f"{self.max_positions} positions; use {{name}} {room} or less", "max_new_tokens"
            )
        return params

    def prompt_ids(self, prompt: str | Sequence[int], chat: bool = False) -> np.ndarray:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(f"{self.bundle}: the bundle has no tokenizer; give the prompt as token ids")
            ids = self.tokenizer.apply_chat_template(prompt) if chat else self.tokenizer.encode(prompt)
        else:
            if chat:
                raise GenerationError("--chat needs a text prompt, not token ids")
            ids = [int(i) for i in prompt]
        if not ids:
            raise GenerationError("the prompt is empty; give at least one token", "prompt")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", "prompt")
        return np.asarray(ids, dtype=np.int64)

    def request(self, prompt: str | Sequence[int], chat: bool, params: dict[str, Any]) -> Request:
        """A request's prompt ids and settled parameters, checked: GenerationError names what is wrong."""
        ids = self.prompt_ids(prompt, chat)
        return Request(ids, self.fit(self.params(**params), len(ids)))

    def timed(self) -> Runtime:
        """This runtime with engine calls that return once their work is done (a GPU call returns
        before), so that a result's dllm_seconds and verifier_seconds are the models' (benchmarks)."""
        return replace(self, dllm=SynchronizedEngine(self.dllm), verifier=SynchronizedEngine(self.verifier))

    def generate(self, prompt: str | Sequence[int], chat: bool = False, **params: Any) -> GenerationResult:
        # No chunk texts: the whole text is decoded once at the end.
        return self._alone(self.request(prompt, chat, params), chunk_text=False).result()

    def stream(self, prompt: str | Sequence[int], chat: bool = False, **params: Any) -> Generation:
        """Like `generate`, but iterate the returned Generation for each step's committed chunk,
        then take its `result()`."""
        return self._alone(self.request(prompt, chat, params), chunk_text=True)

    def _alone(self, request: Request, chunk_text: bool) -> Generation:
        """`request` decoded alone by the thread that asks for its chunks (`driver.step`, a batch of one)."""
        engines = self.engines
        decoding = Decoding(Generation(drive=lambda: step([decoding], engines)), request, chunk_text)
        decoding.start(self, lambda role, capacity: engines[role].new_cache(capacity))
        return decoding.handle

    def scheduler(self, max_batch: int = 8, max_queue: int = 256, max_seq_len: int | None = None,
                  lanes: int = 1) -> Scheduler:
        """A batched scheduler on this runtime (see `scheduler.py`): `submit` requests from any
        thread; up to `max_batch` decode together, up to `max_queue` wait for a slot. Each slot holds
        a request of up to `max_seq_len` positions (default: the models'). Close it when done
        (or use it as a context manager).

        lanes: on a CPU engine, split the slots among this many loops that run side by side, each
        on its own sessions with threads / lanes threads (a batch of small calls uses one thread
        better than two threads use one call); each lane beyond the first holds another copy of
        the models' weights."""
        from apd_deploy.runtime.scheduler import Scheduler

        return Scheduler(self, max_batch, max_queue, max_seq_len, lanes)

    def generate_many(self, prompts: Sequence[str | Sequence[int]], chat: bool = False, max_batch: int = 8,
                      lanes: int = 1, progress: Callable[[], None] | None = None,
                      **params: Any) -> list[GenerationResult]:
        """Generate for every prompt, up to `max_batch` decoding together (in `lanes`, see
        `scheduler`); results in prompt order, `progress()` called as each is taken. The same
        parameters for every prompt (a seed, if given, for each): for per-request parameters submit
        to a `scheduler()`. At temperature 0 each result's tokens are those of `generate` on its
        prompt alone."""
        requests = [self.request(prompt, chat, dict(params)) for prompt in prompts]  # every prompt checked first
        if not requests:
            return []
        longest = max(len(ids) + p.max_new_tokens for ids, p in requests)
        with self.scheduler(max_batch, max_queue=len(requests), max_seq_len=longest, lanes=lanes) as scheduler:
            handles = [scheduler.submit_prepared(ids, p, chunk_text=False) for ids, p in requests]
            results = []
            for handle in handles:
                results.append(handle.result())
                if progress is not None:
                    progress()
            return results


def _engine_record(bundle: Path, manifest: dict[str, Any], engine: str | None) -> dict[str, Any] | None:
    if engine is None:
        return None
    engines = manifest.get("engines", {})
    if engine not in engines:
        available = ", ".join(engines) or "none; build one with apd-deploy build-engine"
        raise BundleError(f"{bundle}: no engine named '{engine}' in manifest.json 'engines' (available: {available})")
    return engines[engine]


def _files_read(bundle: Path, manifest: dict[str, Any], record: dict[str, Any] | None) -> list[str]:
    """The bundle files that loading with `record` (None: the exported graphs) reads: the two graphs,
    their external weights, the tokenizer. Other engines' files are not read, so not hashed."""
    graphs = record["graphs"].values() if record else [manifest["models"][role]["graph"] for role in ("dllm", "verifier")]
    files = []
    for graph in graphs:
        files.append(graph)
        if (bundle / f"{graph}.data").exists():  # onnxruntime reads it beside the graph, listed or not
            files.append(f"{graph}.data")
    tokenizer = manifest["tokenizer"]
    return files + (tokenizer["files"] if tokenizer else [])


def _open_engines(bundle: Path, manifest: dict[str, Any], name: str | None, record: dict[str, Any] | None,
                  specs: dict[str, DecoderSpec], array_backend: str | None, engine_options: dict[str, Any],
                  threads: int, lanes: int = 1) -> list[dict[str, DecoderEngine]]:
    """The engines of `lanes` scheduling loops, `threads` threads in all: onnxruntime opens sessions
    of threads / lanes threads each; OpenVINO compiles each graph once with a stream per lane."""
    if record is not None and record["backend"] == "openvino":
        if array_backend not in (None, "numpy"):
            raise GenerationError(f"engine '{name}' runs on the CPU and samples with numpy; drop --array-backend {array_backend}")
        if engine_options:
            raise GenerationError(f"engine '{name}' takes no engine options (got {', '.join(engine_options)})")
        return open_openvino(bundle, name, record, specs, threads, lanes)
    per_lane = max(1, threads // lanes)
    return [{role: _open_engine(bundle, manifest, name, record, role, spec, per_lane, array_backend, engine_options)
             for role, spec in specs.items()} for _ in range(lanes)]


def _open_engine(bundle: Path, manifest: dict[str, Any], name: str | None, record: dict[str, Any] | None, role: str,
                 spec: DecoderSpec, threads: int | None, array_backend: str | None,
                 engine_options: dict[str, Any]) -> DecoderEngine:
    if record is None or (record["backend"] == "onnxruntime" and record["device"] == "cpu"):
        graph = bundle / (record["graphs"][role] if record else manifest["models"][role]["graph"])
        options = record.get("session_options") if record else None
        return OrtCpuDecoder(graph, spec, threads, options, array_module(array_backend or "numpy"), **engine_options)
    if array_backend == "numpy":
        raise GenerationError(f"engine '{name}' runs on the GPU and hands its logits to cupy; drop --array-backend numpy")
    if record["backend"] == "onnxruntime":
        from apd_deploy.runtime.cuda_engine import OrtCudaDecoder

        return OrtCudaDecoder(bundle / record["graphs"][role], spec, threads, record.get("session_options"),
                              **engine_options)
    from apd_deploy.runtime.tensorrt_engine import TensorRTDecoder

    return TensorRTDecoder(name, bundle / record["graphs"][role], spec, record, role)


def _check_pair(bundle: Path, manifest: dict[str, Any], specs: dict[str, DecoderSpec]) -> None:
    """Refuse a bundle whose two models cannot share token ids."""
    where = bundle / "manifest.json"
    dllm, verifier = specs["dllm"], specs["verifier"]
    special = manifest["special_tokens"]
    if verifier.vocab_size > dllm.vocab_size:
        raise BundleError(
            f"{where}: models.verifier.config.vocab_size {verifier.vocab_size} exceeds the dLLM's "
            f"{dllm.vocab_size}; the two models do not share a tokenizer; re-export with a matching pair"
        )
    if not 0 <= special["mask"] < dllm.vocab_size:
        raise BundleError(f"{where}: special_tokens.mask {special['mask']} is outside the dLLM's vocabulary")
    for eos in special["eos"]:
        if not 0 <= eos < verifier.vocab_size:
            raise BundleError(
                f"{where}: special_tokens.eos {eos} is outside the verifier's vocabulary ({verifier.vocab_size}); "
                "the pair does not share special tokens"
            )

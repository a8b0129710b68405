"""`Runtime`: load a bundle once, then generate from many requests (threads welcome).

The loaded runtime holds only immutable things (sessions, tokenizer, manifest); everything a
request changes (canvas, caches, random generator, counters) is created per call, so two
threads may generate on one runtime at the same time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apd_deploy.bundle import VERIFY_MODES, read_manifest, verify_files
from apd_deploy.errors import BundleError, GenerationError
from apd_deploy.runtime.apd import apd
from apd_deploy.runtime.autoregressive import autoregressive
from apd_deploy.runtime.canvas import Canvas, Decoder, Step
from apd_deploy.runtime.diffusion import diffusion
from apd_deploy.runtime.arrays import array_module, synchronize
from apd_deploy.runtime.engine import DecoderEngine, DecoderSpec, OrtCpuDecoder, default_threads
from apd_deploy.runtime.kv_cache import KVCache
from apd_deploy.runtime.leftright import leftright
from apd_deploy.runtime.openvino_engine import OpenVinoDecoder, open_openvino
from apd_deploy.runtime.params import DEFAULT_MAX_NEW_TOKENS, GenerationParams, check_integer
from apd_deploy.runtime.results import Chunk, Generation, GenerationResult, Progress
from apd_deploy.runtime.sampling import Sampler, SamplingParams
from apd_deploy.runtime.tokenizer import BundleTokenizer

if TYPE_CHECKING:
    from apd_deploy.runtime.scheduler import Scheduler


class Runtime:
    def __init__(self, bundle: Path, manifest: dict[str, Any], dllm: DecoderEngine, verifier: DecoderEngine,
                 tokenizer: BundleTokenizer | None, max_seq_len: int | None = None) -> None:
        self.bundle, self.manifest = bundle, manifest
        self.dllm, self.verifier, self.tokenizer = dllm, verifier, tokenizer
        self.engines = {"dllm": dllm, "verifier": verifier}  # by role, as decoders name them
        self.xp = dllm.xp
        special = manifest["special_tokens"]
        self.mask_id, self.eos_ids = special["mask"], frozenset(special["eos"])
        self.vocab_size = verifier.spec.vocab_size
        self.max_positions = min(dllm.spec.max_positions, verifier.spec.max_positions, max_seq_len or 1 << 62)
        self.defaults = GenerationParams(**manifest["apd_defaults"])
        # Wait for every engine call to finish, so that GPU time is split per model (benchmarks).
        self.time_engine_calls = False
        self.threads: int | None = None  # onnxruntime threads per model (set by `load`)
        self._open_engines: Callable[[int, int], list[dict[str, DecoderEngine]]] | None = None
        self._lane_engines: dict[int, list[dict[str, DecoderEngine]]] = {}
        self.engine_max_batch: tuple[str, int] | None = None  # (engine, largest batch it was built for)

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
            from apd_deploy.runtime.threads import check_thread_limit

            check_integer("threads", threads, 1)
            check_thread_limit("threads", threads)
        if verify not in VERIFY_MODES:
            raise GenerationError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        bundle = Path(bundle)
        manifest = read_manifest(bundle, verify="skip")
        specs = {role: DecoderSpec.from_manifest(manifest["models"][role], bundle / "manifest.json", role)
                 for role in ("dllm", "verifier")}
        _check_pair(bundle, manifest, specs)
        record = _engine_record(bundle, manifest, engine)
        verify_files(bundle, manifest, verify, only=_files_read(bundle, manifest, record))
        open_engines = partial(_open_engines, bundle, manifest, engine, record, specs, array_backend, engine_options or {})
        threads = threads or default_threads()
        (engines,) = open_engines(threads)
        runtime = cls(bundle, manifest, engines["dllm"], engines["verifier"], BundleTokenizer.from_bundle(bundle, manifest),
                      record.get("max_seq_len") if record else None)
        runtime.threads, runtime._open_engines = threads, open_engines
        if record and record.get("max_batch"):  # TensorRT: its profiles hold batches up to this
            runtime.engine_max_batch = (engine, record["max_batch"])
        return runtime

    @staticmethod
    def check_files(bundle: str | Path, engine: str | None = None, verify: str = "full") -> None:
        """Check the files `load(bundle, engine)` would read against the manifest's sha256, without
        opening an engine (a node checks its copy of a bundle before it serves)."""
        bundle = Path(bundle)
        manifest = read_manifest(bundle, verify="skip")
        record = _engine_record(bundle, manifest, engine)
        verify_files(bundle, manifest, verify, only=_files_read(bundle, manifest, record))

    def params(self, **overrides: Any) -> GenerationParams:
        """Generation parameters: the bundle's APD defaults with `overrides` (None = default)."""
        sampling = SamplingParams(**{k: overrides.pop(k) for k in ("temperature", "top_p", "top_k", "seed") if k in overrides})
        if sampling.temperature is None:
            sampling = replace(sampling, temperature=0.0)
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

    def request(self, prompt: str | Sequence[int], chat: bool, params: dict[str, Any]) -> tuple[np.ndarray, GenerationParams]:
        """A request's prompt ids and settled parameters, checked: GenerationError names what is wrong."""
        ids = self.prompt_ids(prompt, chat)
        return ids, self.fit(self.params(**params), len(ids))

    def start(self, ids: np.ndarray, p: GenerationParams, new_cache: Callable[[str, int], KVCache]) -> tuple[Canvas, Decoder]:
        """A request's canvas and decoder, its caches made by `new_cache(role, capacity)`."""
        sampler = Sampler(p.sampling, self.vocab_size, self.xp)
        canvas = Canvas.start(ids, p.max_new_tokens, self.mask_id, self.vocab_size, sampler, new_cache)
        return canvas, self._decoder(canvas, p)

    def generate(self, prompt: str | Sequence[int], chat: bool = False, **params: Any) -> GenerationResult:
        # No chunk texts: the whole text is decoded once at the end.
        stream = self._start(prompt, chat, params, chunk_text=False)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | Sequence[int], chat: bool = False, **params: Any) -> Generation:
        """Like `generate`, but iterate the returned object for each step's committed chunk."""
        return self._start(prompt, chat, params, chunk_text=True)

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

    def engines_for_lanes(self, lanes: int) -> list[dict[str, DecoderEngine]]:
        """The engines of each of `lanes` scheduling loops: this runtime's for one lane; for more,
        new sessions of threads / lanes threads each (CPU engines only)."""
        if lanes == 1:
            return [self.engines]
        if self.xp is not np or not isinstance(self.dllm, (OrtCpuDecoder, OpenVinoDecoder)) or self._open_engines is None:
            raise GenerationError("lanes > 1 is for CPU engines loaded with Runtime.load; a GPU engine batches "
                                  "in one lane (use lanes=1)")
        if lanes not in self._lane_engines:  # opened once per runtime: a session costs a load of the weights
            self._lane_engines[lanes] = self._open_engines(self.threads, lanes)
        return self._lane_engines[lanes]

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

    def _start(self, prompt: str | Sequence[int], chat: bool, params: dict[str, Any], chunk_text: bool) -> Generation:
        ids, p = self.request(prompt, chat, params)
        canvas, decoder = self.start(ids, p, lambda role, capacity: self.engines[role].new_cache(capacity))
        generation = Generation(iter(()))
        generation._chunks = self._run(decoder, canvas, generation, chunk_text, p)
        return generation

    def _decoder(self, canvas: Canvas, p: GenerationParams) -> Decoder:
        if p.alg == "apd":
            return apd(canvas, p.apd_mixture_weight, p.kv_window, p.max_lookahead, self.verifier.first_verify_chunk)
        if p.alg == "leftright":
            return leftright(canvas, p.tokens_per_step, p.kv_window, p.max_lookahead)
        if p.alg == "diffusion":
            return diffusion(canvas, p.steps or p.max_new_tokens, p.diffusion_order)
        return autoregressive(canvas)

    def _run(self, decoder: Decoder, canvas: Canvas, generation: Generation, chunk_text: bool,
             p: GenerationParams) -> Iterator[Chunk]:
        """Decode alone: each engine call the decoder asks for is made at once, batch 1."""
        progress = Progress(canvas, self.eos_ids, self.tokenizer, chunk_text, ignore_eos=p.ignore_eos,
                            min_tokens=p.min_tokens)
        reply = None
        while not progress.stopped:
            try:
                item = decoder.send(reply)
            except StopIteration:
                break
            if isinstance(item, Step):
                reply = None
                yield progress.push(item)
                continue
            started = time.perf_counter()
            (reply,) = self.engines[item.role].run([item.call])
            if self.time_engine_calls:  # a GPU call returns before its work is done
                synchronize(self.xp)
            canvas.engine_seconds[item.role] += time.perf_counter() - started
        decoder.close()
        if (rest := progress.rest()) is not None:
            yield rest
        generation.result = progress.result()


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

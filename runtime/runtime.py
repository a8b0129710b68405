"""`Runtime`: load a bundle once, then generate from many requests (threads welcome).

The loaded runtime holds only immutable things (sessions, tokenizer, manifest); everything a
request changes (canvas, caches, random generator, counters) is created per call, so two
threads may generate on one runtime at the same time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from apd_deploy.bundle import VERIFY_MODES, read_manifest, verify_files
from apd_deploy.errors import BundleError, GenerationError
from apd_deploy.runtime.apd import apd
from apd_deploy.runtime.autoregressive import autoregressive
from apd_deploy.runtime.canvas import Canvas, Decoder
from apd_deploy.runtime.diffusion import diffusion
from apd_deploy.runtime.arrays import array_module, synchronize
from apd_deploy.runtime.engine import DecoderEngine, DecoderSpec, OrtCpuDecoder
from apd_deploy.runtime.leftright import leftright
from apd_deploy.runtime.params import DEFAULT_MAX_NEW_TOKENS, GenerationParams, check_integer
from apd_deploy.runtime.sampling import Sampler, SamplingParams
from apd_deploy.runtime.tokenizer import BundleTokenizer, TextStream


@dataclass
class GenerationResult:
    token_ids: list[int]  # the generated part only, up to and including the first EOS
    text: str | None
    steps: int
    accepted_per_step: list[int]
    dllm_forwards: int
    verifier_forwards: int
    seconds: float
    tokens_per_second: float
    seed: int | None = None  # the seed used, to reproduce a sampled (T > 0) generation
    dllm_seconds: float = 0.0  # time inside the dLLM engine; the rest of `seconds` minus
    verifier_seconds: float = 0.0  # the verifier's is host logic (sampling, mixture, acceptance, caches)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Chunk:
    """Tokens committed by one step, and the text they add (None without a tokenizer)."""

    token_ids: list[int]
    text: str | None


@dataclass
class Generation:
    """Iterate for the chunks as they are committed; `result` is set once iteration ends."""

    _chunks: Iterator[Chunk]
    result: GenerationResult | None = field(default=None)

    def __iter__(self) -> Iterator[Chunk]:
        return self._chunks


class Runtime:
    def __init__(self, bundle: Path, manifest: dict[str, Any], dllm: DecoderEngine, verifier: DecoderEngine,
                 tokenizer: BundleTokenizer | None, max_seq_len: int | None = None) -> None:
        self.bundle, self.manifest = bundle, manifest
        self.dllm, self.verifier, self.tokenizer = dllm, verifier, tokenizer
        self.xp = dllm.xp
        special = manifest["special_tokens"]
        self.mask_id, self.eos_ids = special["mask"], frozenset(special["eos"])
        self.vocab_size = verifier.spec.vocab_size
        self.max_positions = min(dllm.spec.max_positions, verifier.spec.max_positions, max_seq_len or 1 << 62)
        self.defaults = GenerationParams(**manifest["apd_defaults"])
        # Wait for every engine call to finish, so that GPU time is split per model (benchmarks).
        self.time_engine_calls = False

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
        if verify not in VERIFY_MODES:
            raise GenerationError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        bundle = Path(bundle)
        manifest = read_manifest(bundle, verify="skip")
        specs = {role: DecoderSpec.from_manifest(manifest["models"][role], bundle / "manifest.json", role)
                 for role in ("dllm", "verifier")}
        _check_pair(bundle, manifest, specs)
        record = _engine_record(bundle, manifest, engine)
        verify_files(bundle, manifest, verify, only=_files_read(bundle, manifest, record))
        engines = {role: _open_engine(bundle, manifest, engine, record, role, specs[role], threads, array_backend,
                                      engine_options or {})
                   for role in specs}
        return cls(bundle, manifest, engines["dllm"], engines["verifier"], BundleTokenizer.from_bundle(bundle, manifest),
                   record.get("max_seq_len") if record else None)

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
                f"models' {self.max_positions} positions; shorten it to at most {self.max_positions - 1} tokens"
            )
        if params.max_new_tokens is None:
            params = replace(params, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, room))
            params.check()  # --steps against the settled number of new tokens
        elif params.max_new_tokens > room:
            raise GenerationError(
                f"prompt of {prompt_len} tokens + --max-new-tokens {params.max_new_tokens} exceeds the models' "
                f"{self.max_positions} positions; use --max-new-tokens {room} or less"
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
            raise GenerationError("the prompt is empty; give at least one token")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return np.asarray(ids, dtype=np.int64)

    def generate(self, prompt: str | Sequence[int], chat: bool = False, **params: Any) -> GenerationResult:
        # No chunk texts: the whole text is decoded once at the end.
        stream = self._start(prompt, chat, params, chunk_text=False)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: str | Sequence[int], chat: bool = False, **params: Any) -> Generation:
        """Like `generate`, but iterate the returned object for each step's committed chunk."""
        return self._start(prompt, chat, params, chunk_text=True)

    def _start(self, prompt: str | Sequence[int], chat: bool, params: dict[str, Any], chunk_text: bool) -> Generation:
        ids = self.prompt_ids(prompt, chat)
        p = self.fit(self.params(**params), len(ids))
        sampler = Sampler(p.sampling, self.vocab_size, self.xp)
        canvas = Canvas.start(ids, p.max_new_tokens, self.mask_id, self.vocab_size, sampler)
        if self.time_engine_calls:
            canvas.synchronize = partial(synchronize, self.xp)
        generation = Generation(iter(()))
        generation._chunks = self._run(self._decoder(canvas, p), canvas, generation, chunk_text)
        return generation

    def _decoder(self, canvas: Canvas, p: GenerationParams) -> Decoder:
        if p.alg == "apd":
            return apd(canvas, self.dllm, self.verifier, p.apd_mixture_weight, p.kv_window, p.max_lookahead)
        if p.alg == "leftright":
            return leftright(canvas, self.dllm, p.tokens_per_step, p.kv_window, p.max_lookahead)
        if p.alg == "diffusion":
            return diffusion(canvas, self.dllm, p.steps or p.max_new_tokens, p.diffusion_order)
        return autoregressive(canvas, self.verifier)

    def _run(self, decoder: Decoder, canvas: Canvas, generation: Generation, chunk_text: bool) -> Iterator[Chunk]:
        started = time.perf_counter()
        generated: list[int] = []
        decided: list[np.ndarray] = []  # the canvas positions each step decided
        pieces = TextStream(self.tokenizer) if chunk_text and self.tokenizer is not None else None
        for step in decoder:
            start = canvas.prompt_len + len(generated)
            decided.append(step.positions if step.positions is not None else np.arange(start, start + step.committed))
            tokens = step.tokens.tolist()
            eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            if eos_at is not None:
                tokens = tokens[: eos_at + 1]
            generated += tokens
            yield Chunk(tokens, pieces.push(tokens) if pieces is not None and tokens else None)
            if eos_at is not None:
                break
        seconds = time.perf_counter() - started
        # Positions past the first EOS are not returned, so a step is credited only with those
        # before it (diffusion may have decided them many steps before the EOS appeared).
        end = canvas.prompt_len + len(generated)
        accepted = [int((positions < end).sum()) for positions in decided]
        generation.result = GenerationResult(
            token_ids=generated,
            text=self.tokenizer.decode(generated) if self.tokenizer is not None else None,
            steps=len(accepted),
            accepted_per_step=accepted,
            dllm_forwards=canvas.forwards["dllm"],
            verifier_forwards=canvas.forwards["verifier"],
            seconds=seconds,
            tokens_per_second=len(generated) / seconds if seconds > 0 else 0.0,
            seed=canvas.sampler.seed if not canvas.sampler.params.greedy else None,
            dllm_seconds=canvas.engine_seconds["dllm"],
            verifier_seconds=canvas.engine_seconds["verifier"],
        )


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

"""The `apd-deploy` command line. It parses and prints; the work is library calls a service can make too."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from apd_deploy import __version__
from apd_deploy.bench.concurrency import parse_levels
from apd_deploy.bench.runner import parse_sweep
from apd_deploy.bundle import VERIFY_MODES
from apd_deploy.cli_options import (CONTEXT, THREADS_BOUND, IntList, Parsed, ThreadCount, in_cli_terms,
                                    local_threads_option, param_option, param_options, slot_options, threads_option)
from apd_deploy.cli_progress import counted, progress_bar
from apd_deploy.engines.build import BACKENDS, DEVICES, PRECISIONS
from apd_deploy.errors import ApdDeployError, GenerationError
from apd_deploy.evaluation import DEFAULT_ALGS, TASKS, AlgSpec, parse_algs
from apd_deploy.runtime.params import group
from apd_deploy.server.ray_serve import parse_autoscale
from apd_deploy.tasks import arithmetic

EXPORT_INSTALL_HINT = "install the export extra: pip install torch==2.13.0 'apd-deploy[export]'"
# click 8.2+ reports a bare `apd-deploy` as a usage error whose message is the whole help (8.1 just
# prints the help); it is shown as it is, not as an `error:` line.
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
ALGS = Parsed(parse_algs, "algs")
LEVELS = Parsed(parse_levels, "levels")
NAMES = Parsed(lambda text: tuple(name.strip() for name in text.split(",") if name.strip()), "names")  # comma-separated


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can act on into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApdDeployError as exc:
            click.echo(f"error: {in_cli_terms(exc) if isinstance(exc, GenerationError) else exc}", err=True)
            sys.exit(1)
        except ModuleNotFoundError as exc:
            if exc.name in ("torch", "transformers", "safetensors", "onnx", "onnxscript"):
                click.echo(f"error: this command needs {exc.name}; {EXPORT_INSTALL_HINT}", err=True)
                sys.exit(1)
            raise

    return wrapper


def progress_printer(quiet: bool) -> Callable[[str], None]:
    if quiet:
        return lambda _: None
    return lambda message: click.echo(message, err=True)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="apd-deploy")
def cli() -> None:
    """Deploy Adaptive Parallel Decoding: a diffusion LLM drafts, a small AR model verifies."""


def main(args: list[str] | None = None) -> None:
    """Console entry point. A usage error prints the usage line, where to find help and one `error:`
    line, exit status 2; other click errors print one `error:` line."""
    try:
        code = cli.main(args=args, prog_name="apd-deploy", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C; 130 is the shell's status for death by SIGINT
        click.echo("error: interrupted (Ctrl-C)", err=True)
        sys.exit(130)
    except NO_ARGS_IS_HELP as exc:
        click.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
            click.echo(f"Try '{exc.ctx.command_path} --help' for help.\n", err=True)
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def interruptible(command: Callable[..., Any]) -> Callable[..., Any]:
    """SIGTERM ends the command as Ctrl-C does, removing its staging folder; exit status 143,
    the shell's for death by SIGTERM (130 for Ctrl-C, SIGINT's)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from apd_deploy.staging import Terminated, sigterm_raises

        try:
            with sigterm_raises():
                return command(*args, **kwargs)
        except Terminated:
            click.echo("error: terminated (SIGTERM); nothing was written", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted (Ctrl-C); nothing was written", err=True)
            sys.exit(130)

    return wrapper


@cli.command("make-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny", "30m", "600m"]), default="tiny", show_default=True,
              help="tiny: for tests; 30m: a 30M-parameter dLLM and a 3M verifier, for CPU benchmarks; "
                   "600m: Qwen2.5-0.5B's widths with Dream's vocabulary (0.63B) and a 0.11B verifier, for GPUs.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the random weights: the same seed writes the same pair.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a pair make-tiny wrote.")
@interruptible
@user_errors
def make_tiny_command(out: str, preset: str, seed: int, overwrite: bool) -> None:
    """Write a random dLLM + verifier pair (OUT/dllm, OUT/verifier) in the real checkpoint formats."""
    from apd_deploy.export.tiny import make_tiny

    make_tiny(out, preset=preset, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {out}/dllm and {out}/verifier")


@cli.command("export")
@click.option("--dllm", "dllm_dir", required=True, type=click.Path(), help="Dream-format checkpoint directory.")
@click.option("--verifier", "verifier_dir", required=True, type=click.Path(), help="Qwen2/Llama checkpoint directory.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision of the graphs' weights and KV caches (logits are always fp32); fp32 for CPUs, fp16/bf16 for GPUs.")
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True, help="ONNX opset (18 or newer).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="Max |ONNX - PyTorch| logits allowed [default: per dtype, relative to the logits' scale].")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin weights (they can run code: trusted sources only).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a bundle apd-deploy wrote (only once the new one is complete).")
@click.option("--quiet", is_flag=True, help="No progress output (warnings still go to stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@interruptible
@user_errors
def export_command(dllm_dir: str, verifier_dir: str, out: str, dtype: str, opset: int, tolerance: float | None,
                   allow_pickle: bool, overwrite: bool, quiet: bool, as_json: bool) -> None:
    """Export the dLLM and the verifier to ONNX with KV-cache I/O, check both, write a bundle."""
    import time

    started = time.perf_counter()
    from apd_deploy.export.pipeline import export_bundle

    manifest = export_bundle(dllm_dir, verifier_dir, out, dtype=dtype, opset=opset, allow_pickle=allow_pickle,
                             overwrite=overwrite, tolerance=tolerance, report=progress_printer(quiet or as_json),
                             warn=progress_printer(False))
    summary = {
        "bundle": out,
        "dtype": dtype,
        "opset": opset,
        "seconds": round(time.perf_counter() - started, 2),  # all of it: imports, hashing, the final rename
        "checks": {role: m["check"] for role, m in manifest["models"].items()},
        "engines": sorted(manifest.get("engines", {})),
        "files": manifest["files"],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        for role, check in summary["checks"].items():
            if check["status"] == "passed":
                click.echo(f"{role}: max |logits diff| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.1e})")
        click.echo(f"wrote {out} in {summary['seconds']:.1f} s")


CHUNK_COLOURS = ("cyan", "yellow")


@cli.command("generate", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--prompt", help="Prompt text (needs a bundle with a tokenizer).")
@click.option("--prompt-ids", type=IntList(0, "token id", "1,2,3"), help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@param_options("alg", *group("apd"), "tokens_per_step", "steps", "diffusion_order", *group("sampling"), "max_new_tokens")
@click.option("--chat", is_flag=True, help="Wrap the --prompt text in the tokenizer's chat template.")
@click.option("--engine", help="An engine of the bundle (apd-deploy build-engine)  [default: the ONNX graphs on the CPU]")
@click.option("--array-backend", type=click.Choice(["numpy", "cupy"]),
              help="Where sampling and acceptance run  [default: the engine's: cupy for GPU engines]")
@local_threads_option
@click.option("--verify", type=click.Choice(VERIFY_MODES), default="remembered", show_default=True,
              help="Check the files the engine reads against their sha256. full: hash them; remembered: hash a file "
                   "once per size and modification time, so a change that keeps both goes unnoticed; skip: trust them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
@user_errors
def generate_command(bundle: str, prompt: str | None, prompt_ids: list[int] | None, chat: bool, engine: str | None,
                     array_backend: str | None, threads: int | None, verify: str, as_json: bool, **params: Any) -> None:
    """Generate from BUNDLE, streaming each step's accepted chunk (coloured in a terminal)."""
    from apd_deploy.runtime import Runtime
    from apd_deploy.runtime.tokenizer import check_text

    if (prompt is None) == (prompt_ids is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if chat and prompt is None:
        raise click.UsageError("--chat wraps a text prompt: give --prompt TEXT, not --prompt-ids")
    if prompt is not None:
        try:
            check_text(prompt, "--prompt")
        except GenerationError as exc:
            raise click.UsageError(str(exc)) from None
    runtime = Runtime.load(bundle, engine=engine, threads=threads, verify=verify, array_backend=array_backend)
    stream = runtime.stream(prompt if prompt is not None else prompt_ids, chat=chat, **params)
    if as_json:  # result() runs the steps the chunks would come from
        click.echo(json.dumps({"alg": params["alg"], **stream.result().to_dict()}))
        return
    shown = ""
    for i, chunk in enumerate(stream):
        piece = chunk.text if runtime.tokenizer is not None else " ".join(map(str, chunk.token_ids)) + " "
        if piece:
            shown += piece
            click.echo(click.style(piece, fg=CHUNK_COLOURS[i % 2]), nl=False)
    result = stream.result()
    if result.text is not None and result.text.startswith(shown):
        click.echo(result.text[len(shown):], nl=False)  # a held-back partial character, if any
    click.echo()
    mean = len(result.token_ids) / max(result.steps, 1)
    seed = f", seed {result.seed}" if result.seed is not None else ""
    click.echo(
        f"[{params['alg']}] {counted(len(result.token_ids), 'token')} in {counted(result.steps, 'step')} "
        f"({mean:.2f} per step), "
        f"dLLM forwards {result.dllm_forwards}, verifier forwards {result.verifier_forwards}, "
        f"{result.seconds:.3f} s, {result.tokens_per_second:.1f} tokens/s{seed}",
        err=True,
    )


@cli.command("build-engine", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--backend", required=True, type=click.Choice(BACKENDS), help="The engine's runtime library.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]),
              help="Where it runs (openvino: cpu only; tensorrt: cuda only)  [default: cpu, cuda for tensorrt]")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="The engine's precision (openvino: fp32, or bf16 on a CPU with AMX or AVX512_BF16)  "
                   "[default: the export's dtype]")
@click.option("--max-batch", type=click.IntRange(min=1), default=1, show_default=True, help="TensorRT: largest batch.")
@click.option("--max-seq-len", type=click.IntRange(min=2),
              help="TensorRT: longest prompt + generation  [default: 4096, at most the models' positions]")
@click.option("--opt-window", type=click.IntRange(min=1),
              help="TensorRT: window length to tune for  [default: W + M (dLLM), M (verifier)]")
@click.option("--max-logit-rows", type=click.IntRange(min=1),
              help="TensorRT: most logit rows per call  [default: M + 1; Dream's diffusion needs one per masked position]")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache to reuse and update.")
@click.option("--threads", type=click.IntRange(min=1),
              help="OpenVINO: threads to compile for (a run's --threads still sets its own)  [default: every core]")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the engine's manifest record as JSON.")
@user_errors
def build_engine_command(bundle: str, backend: str, device: str | None, precision: str | None, max_batch: int,
                         max_seq_len: int | None, opt_window: int | None, max_logit_rows: int | None,
                         timing_cache: str | None, threads: int | None, quiet: bool, as_json: bool) -> None:
    """Build engines for BUNDLE's graphs and record them in its manifest (atomically)."""
    from apd_deploy.engines.build import build_engine

    if device is not None and device not in DEVICES[backend]:
        raise click.UsageError(f"--device {device}: the {backend} backend runs on {' or '.join(DEVICES[backend])}")
    name, record = build_engine(bundle, backend, device, precision, max_batch, max_seq_len, opt_window, timing_cache,
                                max_logit_rows, threads, report=progress_printer(quiet or as_json))
    if as_json:
        click.echo(json.dumps({"name": name, **record}, indent=2))
    elif not quiet:
        click.echo(f"engine '{name}' added to {bundle}; use it with: apd-deploy generate {bundle} --engine {name} ...")


@cli.command("eval", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--task", type=click.Choice(sorted(TASKS)), default="arithmetic", show_default=True,
              help="The task whose problems to solve.")
@click.option("--split", type=click.Choice(list(arithmetic.SPLITS)), default="test", show_default=True,
              help="Which of the task's problems.")
@click.option("--n", "n", type=click.IntRange(min=1), default=200, show_default=True, help="Problems per algorithm.")
@click.option("--algs", type=ALGS, default=DEFAULT_ALGS, show_default=True,
              help="Comma-separated; leftright:K commits K tokens per step, diffusion:S takes S steps.")
@param_options(*group("apd"), *group("sampling"))
@click.option("--max-new-tokens", "lengths", type=IntList(1, "positive integer", "32,48,64,96"),
              help="Tokens per answer at most; several, comma-separated (32,48,64,96), run each algorithm at each "
              "length  [default: the task's]")
@click.option("--engine", help="An engine of the bundle  [default: the ONNX graphs on the CPU]")
@local_threads_option
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Problems decoded together (batched engine calls); the same answers at temperature 0.")
@click.option("--lanes", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --batch-size on a CPU engine: scheduling loops side by side, each with threads/lanes "
                   "threads and its own copy of the weights.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per algorithm, one per line.")
@user_errors
def eval_command(bundle: str, task: str, split: str, n: int, algs: list[AlgSpec], lengths: list[int] | None, engine: str | None,
                 threads: int | None, batch_size: int, lanes: int, as_json: bool, **params: Any) -> None:
    """Solve task problems with each algorithm; report accuracy, tokens per step, forwards, speed."""
    from apd_deploy.evaluation import format_table, plan, run
    from apd_deploy.runtime import Runtime

    if lanes > batch_size:
        raise click.UsageError(f"--lanes {lanes} is more than --batch-size {batch_size}: each lane needs a slot")
    runtime = Runtime.load(bundle, engine=engine, threads=threads)
    work = plan(runtime, task, split, n, algs, params, lengths)
    with progress_bar(len(work.problems) * len(work.runs), "solving", "generation") as bar:
        results = run(runtime, work, progress=lambda: bar.update(1), batch_size=batch_size, lanes=lanes)
    if as_json:
        for result in results:
            click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(format_table(results))


def refuse_typed(names: tuple[str, ...], why: str) -> None:
    """A usage error naming the first of the options `names` typed on the command line: a value from
    the environment (RAY_ADDRESS, APD_API_KEY) is no mistake."""
    source = click.get_current_context().get_parameter_source
    typed = [name for name in names if source(name) is click.core.ParameterSource.COMMANDLINE]
    if typed:
        raise click.UsageError(f"--{typed[0].replace('_', '-')} {why}")


@cli.command("serve", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--engine", help="An engine of the bundle  [default: the ONNX graphs on the CPU]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; give an --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@slot_options("requests get 429 with Retry-After")
@click.option("--lanes", type=click.IntRange(min=1), default=1, show_default=True,
              help="CPU engines: scheduling loops side by side, each with threads/lanes threads.")
@threads_option
@click.option("--api-key", envvar="APD_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 routes  [env: APD_API_KEY]")
@click.option("--served-model-name", "model_name", help="The model name clients send  [default: the bundle folder's name]")
@click.option("--max-tokens", type=click.IntRange(min=1),
              help="Largest max_tokens a request may ask for  [default: the models' positions]")
@click.option("--max-body-bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body; larger ones get 413.")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, how long requests in flight may take to finish.")
@click.option("--header-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Seconds a client has to send a request's line and headers; slower connections are closed.")
@click.option("--max-header-bytes", type=click.IntRange(min=1024), default=16384, show_default=True,
              help="Largest request line and headers; larger ones get 400.")
@click.option("--keep-alive-seconds", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True,
              help="An idle connection between requests is closed after this.")
@click.option("--max-connections", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Open connections and requests in flight; beyond it requests get 503.")
@click.option("--allowed-hosts", type=NAMES, default="",
              help="Comma-separated Host names answered besides the bound address and localhost ('*': any)  "
              "[default with --host 0.0.0.0: any]")
@click.option("--allowed-origins", type=NAMES, default="",
              help="Comma-separated browser origins (https://app.example) allowed to call the API, with CORS; "
              "requests from other origins get 403  [default: none]")
@click.option("--metrics-key-required", is_flag=True, help="/metrics asks for --api-key too (Prometheus: "
              "authorization credentials).")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the server as Ray Serve replicas behind one endpoint (pip install 'apd-deploy[ray]'); "
              "each replica reserves --threads CPUs  [default with --ray: 1 thread].")
@click.option("--replicas", type=click.IntRange(min=1), help="With --ray: how many replicas  [default: 1]")
@click.option("--autoscale", type=Parsed(parse_autoscale, "MIN:MAX"),
              help="With --ray: MIN:MAX replicas, grown and shrunk with the requests in flight (target: a full "
              "batch per replica).")
@click.option("--ray-address", envvar="RAY_ADDRESS",
              help="With --ray: join this Ray cluster (HEAD:6379, or 'auto' for the one `ray start` began on this "
              "machine)  [env: RAY_ADDRESS; default: start a local Ray that stops with this command]")
@click.option("--ray-proxy-every-node", is_flag=True,
              help="With --ray: an HTTP proxy on every node with a replica (behind your load balancer)  "
              "[default: one, on the head node]")
@user_errors
def serve_command(use_ray: bool, replicas: int | None, autoscale: tuple[int, int] | None, ray_address: str | None,
                  ray_proxy_every_node: bool, **options: Any) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)."""
    from apd_deploy.server.settings import ServeSettings

    settings = ServeSettings(**options)
    if settings.lanes > settings.max_batch:
        raise click.UsageError(f"--lanes {settings.lanes} is more than --max-batch {settings.max_batch}: each lane "
                               "needs a slot")
    if settings.metrics_key_required and settings.api_key is None:
        raise click.UsageError("--metrics-key-required needs --api-key (or APD_API_KEY)")
    if not use_ray:
        refuse_typed(("replicas", "autoscale", "ray_address", "ray_proxy_every_node"), "is for Ray Serve: add --ray")
        from apd_deploy.server.serve import serve

        serve(settings)
        return
    refuse_typed(("header_timeout", "max_header_bytes", "keep_alive_seconds", "max_connections", "allowed_hosts",
                  "allowed_origins", "metrics_key_required"), "is for the single-process server: drop it or --ray")
    if replicas is not None and autoscale is not None:
        raise click.UsageError("give --replicas or --autoscale, not both")
    try:
        from apd_deploy.server.ray_replica import deployment_options, for_ray
        from apd_deploy.server.ray_serve import serve_on_ray
    except ImportError as exc:
        raise click.UsageError(f"--ray needs Ray Serve ({exc}): pip install 'apd-deploy[ray]'") from None
    settings = for_ray(settings)
    serve_on_ray(settings, deployment_options(settings, replicas, autoscale), ray_address, ray_proxy_every_node)


@cli.command("bench-serve", context_settings=CONTEXT)
@click.argument("url")
@click.option("--concurrency", "levels", type=LEVELS, default="1,4,16", show_default=True,
              help="Concurrent clients per level, comma-separated.")
@click.option("--requests", type=click.IntRange(min=1), default=64, show_default=True, help="Requests per level.")
@click.option("--stream", is_flag=True, help="Stream the answers (time to first token from the first chunk).")
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Chat requests from a task's test problems (accuracy "
              "is measured)  [default: arithmetic, unless --prompts]")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="Completion requests, one text prompt per line.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True, help="max_tokens per request.")
@click.option("--model", help="The model field of each request  [default: none, the server's]")
@click.option("--api-key", envvar="APD_API_KEY", help="Sent as 'Authorization: Bearer KEY'  [env: APD_API_KEY]")
@click.option("--compare-bundle", type=click.Path(), help="Also send the prompts one at a time, each followed by "
              "Runtime.generate on it in this process: the server's overhead (the bundle the server serves).")
@click.option("--engine", help="With --compare-bundle: the engine the server runs.")
@click.option("--compare-url", help="Also send the prompts one at a time to URL and then to this second server "
              "(e.g. the single-process server beside a Ray Serve one): the overhead of URL over it.")
@local_threads_option
@click.option("--out", type=click.Path(file_okay=False), default="bench-serve-results", show_default=True,
              help="Directory for results.json, results.csv and serve_vs_concurrency.png.")
@user_errors
def bench_serve_command(url: str, levels: list[int], requests: int, stream: bool, task: str | None, prompts_file: str | None,
                        max_tokens: int, model: str | None, api_key: str | None, compare_bundle: str | None,
                        engine: str | None, compare_url: str | None, threads: int | None, out: str) -> None:
    """Load a running server (apd-deploy serve, or any OpenAI-compatible one) at URL; JSON, CSV, PNG."""
    import itertools

    from apd_deploy.bench.plots import plot_serve, subtitle
    from apd_deploy.bench.report import check_out, write_rows
    from apd_deploy.bench.runner import read_prompt_lines
    from apd_deploy.bench.serving import (RuntimeBaseline, ServerBaseline, check_answered, check_reachable, format_serve,
                                          jobs_from, paired_overhead, run_level, summarise)

    if task and prompts_file:
        raise click.UsageError("give --task or --prompts, not both")
    if compare_bundle and compare_url:
        raise click.UsageError("give --compare-bundle or --compare-url, not both")
    extract = None
    if prompts_file:
        try:
            lines = read_prompt_lines(prompts_file)
        except GenerationError as exc:
            raise click.UsageError(str(exc)) from None
        jobs = jobs_from(None, lines, [None] * len(lines), max_tokens, model)
    else:
        problems = list(itertools.islice(TASKS[task or "arithmetic"].problems("test"), requests))
        jobs = jobs_from([p.question for p in problems], None, [p.answer for p in problems], max_tokens, model)
        extract = TASKS[task or "arithmetic"].extract_answer
    check_out(Path(out))
    url = url.rstrip("/")
    check_reachable(url)
    rows = []
    bar = progress_bar(requests * len(levels), "loading the server", "request")
    with bar:
        for level in levels:
            samples, seconds = run_level(url, jobs, level, requests, stream, api_key, progress=lambda: bar.update(1))
            check_answered(level, samples)
            rows.append(summarise(level, samples, seconds, jobs, extract))
    base = next((r for r in rows if r.concurrency == 1), None)
    for row in rows:
        row.speedup_vs_level_1 = row.tokens_per_second / base.tokens_per_second if base and base.tokens_per_second else None
    settings: dict[str, Any] = {"url": url, "concurrency": levels, "requests": requests, "stream": stream,
                                "task": None if prompts_file else task or "arithmetic", "prompts": prompts_file,
                                "max_tokens": max_tokens}
    click.echo(format_serve(rows))
    if compare_bundle or compare_url:
        baseline = (RuntimeBaseline(compare_bundle, engine, threads) if compare_bundle
                    else ServerBaseline(compare_url, api_key))
        b = settings["baseline"] = paired_overhead(url, jobs[: min(len(jobs), requests)], stream, api_key, baseline)
        click.echo(f"one at a time, {counted(b['pairs'], 'pair')}: server p50 {b['server_p50_ms']:.1f} ms, {b['baseline']} p50 "
                   f"{b['baseline_p50_ms']:.1f} ms; overhead (median of the pairs) {b['overhead_ms']:.1f} ms, "
                   f"{b['overhead_share']:.1%} of a request{'' if b['same_answers'] else '; the answers differ'}")
    written = [*write_rows(Path(out), "results", settings, [r.row() for r in rows]), plot_serve(rows, Path(out), subtitle(settings))]
    click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


@cli.command("bench", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.option("--algs", type=ALGS,
              help="Comma-separated, as for eval: leftright:K commits K tokens per step, diffusion:S takes S steps  "
                   "[default: apd,leftright:1,ar; with --concurrency: apd]")
@click.option("--concurrency", "levels", type=LEVELS,
              help="Instead: throughput against concurrent requests, e.g. 1,2,4,8,16 (each level through one "
                   "batched scheduler with that max batch, plus the requests one by one alone).")
@click.option("--lanes", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --concurrency or --batch-size on a CPU engine: scheduling loops side by side, each with "
                   "threads/lanes threads and its own copy of the weights.")
@click.option("--sweep", "sweeps", multiple=True, type=Parsed(parse_sweep, "NAME=V1,V2"),
              help=f"APD parameter values, e.g. kv_window=4,16,64 (repeatable; {', '.join(group('apd'))}).")
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Prompts from a task's test problems (accuracy is measured).")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="A file of text prompts, one per line.")
@click.option("--random-prompts", type=click.IntRange(min=1), help="N random 16-token prompts.")
@click.option("--n", "n", type=click.IntRange(min=1), default=20, show_default=True, help="Problems, with --task.")
@param_option("max_new_tokens", help="Tokens per prompt  [default: the task's, else 256]")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per configuration (median and range).")
@click.option("--threads", type=ThreadCount(),
              help=f"Threads for onnxruntime (per model) and for PyTorch, {THREADS_BOUND}  "
                   "[default: every core this process may run on]")
@click.option("--engine", help="An engine of the bundle  [default: the ONNX graphs on the CPU]")
@click.option("--eager/--no-eager", default=True, show_default=True,
              help="Also run the APD configurations on the PyTorch-eager loop (needs torch).")
@click.option("--eager-device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the PyTorch-eager loop runs (cuda: the baseline for GPU engines), in the export's dtype.")
@click.option("--step-profile", is_flag=True,
              help="Also time APD steps at 128 and 1024 generated tokens (full windows) on the first prompt.")
@click.option("--out", type=click.Path(file_okay=False), default="bench-results", show_default=True,
              help="Directory for results.json, results.csv and the plots.")
@user_errors
def bench_command(bundle: str, algs: list[AlgSpec] | None, levels: list[int] | None, lanes: int,
                  sweeps: tuple[tuple[str, list], ...], task: str | None,
                  prompts_file: str | None, random_prompts: int | None, n: int, max_new_tokens: int | None, repeat: int,
                  threads: int | None, engine: str | None, eager: bool, eager_device: str, step_profile: bool,
                  out: str) -> None:
    """Benchmark BUNDLE: tokens/s, accuracy, per-step time breakdown, ratio to PyTorch eager; JSON, CSV, PNG.

    With --concurrency: total and per-request tokens/s, latency and time to first chunk per level."""
    from apd_deploy.bench.report import check_out, format_table, write_results
    from apd_deploy.bench.runner import benchmark, check_benchmark, check_prompt_source, default_max_new_tokens, load_prompts
    from apd_deploy.runtime import Runtime
    from apd_deploy.runtime.engine import default_threads

    try:
        check_prompt_source(task, prompts_file, random_prompts, n)
    except GenerationError as exc:
        raise click.UsageError(str(exc)) from None
    if levels and (sweeps or step_profile):
        raise click.UsageError("--concurrency measures one configuration: drop --sweep and --step-profile")
    if lanes > 1 and not levels:
        raise click.UsageError("--lanes applies to --concurrency; add --concurrency LEVELS or drop --lanes")
    check_out(Path(out))
    threads = threads or default_threads()
    runtime = Runtime.load(bundle, engine=engine, threads=threads)
    prompts = load_prompts(runtime, task, prompts_file, random_prompts, n)
    max_new_tokens = max_new_tokens or default_max_new_tokens(task)
    settings: dict[str, Any] = {"bundle": bundle, "engine": engine, "threads": threads, "task": task,
                                "prompts": prompts_file, "random_prompts": random_prompts, "n": len(prompts),
                                "max_new_tokens": max_new_tokens, "repeat": repeat}
    if levels:
        bench_concurrency(runtime, levels, algs or parse_algs("apd"), prompts, {**settings, "lanes": lanes}, Path(out))
        return
    algs, grid = algs or parse_algs("apd,leftright:1,ar"), dict(sweeps)
    check_benchmark(runtime, algs, grid, prompts, max_new_tokens, repeat)
    eager_loop = None
    if eager:
        from apd_deploy.bench.eager import EagerAPD

        models = runtime.manifest["models"]
        eager_loop = EagerAPD(models["dllm"]["source"], models["verifier"]["source"], threads, eager_device,
                              runtime.manifest["export"]["dtype"])
    bar = progress_bar(None, "benchmarking", "generation")
    with bar:
        results = benchmark(runtime, algs, grid, prompts, max_new_tokens, repeat, task, eager_loop,
                            progress_total=lambda total: setattr(bar, "length", total), progress=lambda: bar.update(1))
    settings.update(algs=",".join(a.label for a in algs), eager_device=eager_device if eager else None,
                    sweeps=[f"{name}={','.join(map(str, values))}" for name, values in grid.items()])
    if step_profile:
        from apd_deploy.bench.runner import step_profile as profile

        settings["step_ms_at"] = profile(runtime, prompts[0], (128, 1024), {})
        at = settings["step_ms_at"]
        click.echo(f"APD step at 128 generated tokens {at[128]:.1f} ms, at 1024 {at[1024]:.1f} ms "
                   f"({at[1024] / at[128]:.2f}x)")
    written = write_results(Path(out), settings, results)
    click.echo(format_table(results))
    click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


def bench_concurrency(runtime: Any, levels: list[int], algs: list[AlgSpec], prompts: list, settings: dict[str, Any],
                      out: Path) -> None:
    """`bench --concurrency`: one configuration (the only one in --algs) at each level, with bench's `settings`."""
    from apd_deploy.bench.concurrency import benchmark_concurrency, format_levels
    from apd_deploy.bench.report import write_levels
    from apd_deploy.bench.runner import check_benchmark

    max_new_tokens, repeat, task = settings["max_new_tokens"], settings["repeat"], settings["task"]
    configs, names = check_benchmark(runtime, algs, {}, prompts, max_new_tokens, repeat), ",".join(a.label for a in algs)
    if len(configs) != 1:
        raise click.UsageError(f"--concurrency measures one configuration; --algs names {len(configs)}: {names}")
    (config,) = configs
    params = {"alg": config.alg, "max_new_tokens": max_new_tokens, **config.params}
    extract = TASKS[task].extract_answer if task else None
    bar = progress_bar(None, "benchmarking", "generation")
    with bar:
        rows = benchmark_concurrency(runtime, levels, prompts, params, repeat, extract, settings["lanes"],
                                     progress_total=lambda total: setattr(bar, "length", total),
                                     progress=lambda: bar.update(1))
    written = write_levels(out, {**settings, "algs": names, "concurrency": levels}, rows)
    click.echo(format_levels(rows))
    click.echo(f"wrote {', '.join(str(p) for p in written)}", err=True)


@cli.command("triton-repo", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path())
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--engine", help="An engine of the bundle  [default: the ONNX graphs on the CPU]")
@click.option("--model-name", help="The model's name in Triton (its folder in OUT)  [default: the bundle folder's name]")
@slot_options("a request gets an UNAVAILABLE error (retry later); per instance")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (stub processes), each with the bundle loaded and its own scheduler.")
@threads_option
@click.option("--python-env", type=click.Path(file_okay=False),
              help="The environment Triton's Python stub runs the model in (numpy < 2, apd-deploy installed)  "
                   "[default: this Python's]")
@click.option("--copy-bundle", is_flag=True, help="Copy the bundle into the repository (self-contained) instead of "
              "naming its path.")
@user_errors
def triton_repo_command(bundle: str, out: str, engine: str | None, model_name: str | None, max_batch: int,
                        max_queue: int, instances: int, threads: int | None, python_env: str | None,
                        copy_bundle: bool) -> None:
    """Write a Triton model repository (OUT/MODEL) serving BUNDLE as a decoupled Python-backend model."""
    from apd_deploy.triton.repository import write_repository

    model = write_repository(bundle, out, model_name, engine, max_batch, max_queue, instances, threads, python_env,
                             copy_bundle)
    click.echo(f"wrote {model}; serve it with: apd-deploy triton-serve {out}")


@cli.command("triton-serve", context_settings=CONTEXT)
@click.argument("repo", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address of the HTTP, gRPC and metrics ports.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="HTTP port (/v2/models/NAME/generate_stream).")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True,
              help="Prometheus metrics port (/metrics).")
@click.option("--grace-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="On SIGTERM, how long requests in flight may take to finish.")
@user_errors
def triton_serve_command(repo: str, host: str, http_port: int, grpc_port: int, metrics_port: int,
                         grace_seconds: float) -> int:
    """Serve a model repository (apd-deploy triton-repo) with tritonserver from the nvidia-pytriton wheel."""
    from apd_deploy.triton.server import triton_serve

    return triton_serve(repo, host, http_port, grpc_port, metrics_port, grace_seconds)

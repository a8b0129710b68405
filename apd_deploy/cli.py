"""The `apd-deploy` command line. It parses and prints; the work is library calls a service can make too."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from apd_deploy import __version__
from apd_deploy.errors import ApdDeployError

EXPORT_INSTALL_HINT = "install the export extra: pip install torch==2.13.0 'apd-deploy[export]'"


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can act on into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApdDeployError as exc:
            click.echo(f"error: {exc}", err=True)
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


@click.group()
@click.version_option(__version__, prog_name="apd-deploy")
def main() -> None:
    """Deploy Adaptive Parallel Decoding: a diffusion LLM drafts, a small AR model verifies."""


@main.command("make-tiny")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--preset", type=click.Choice(["tiny"]), default="tiny", show_default=True, help="Model sizes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@user_errors
def make_tiny_command(out: str, preset: str, seed: int, overwrite: bool) -> None:
    """Write a random dLLM + verifier pair (OUT/dllm, OUT/verifier) in the real checkpoint formats."""
    from apd_deploy.export.tiny import make_tiny

    make_tiny(out, preset=preset, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {out}/dllm and {out}/verifier")


@main.command("export")
@click.option("--dllm", "dllm_dir", required=True, type=click.Path(), help="Dream-format checkpoint directory.")
@click.option("--verifier", "verifier_dir", required=True, type=click.Path(), help="Qwen2/Llama checkpoint directory.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--opset", type=click.IntRange(18), default=18, show_default=True, help="ONNX opset (18 or newer).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="Max |ONNX - PyTorch| logits allowed [default: per dtype, relative to the logits' scale].")
@click.option("--allow-pickle", is_flag=True, help="Accept pickled .bin weights (they can run code: trusted sources only).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle (only once the new one is complete).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@user_errors
def export_command(dllm_dir: str, verifier_dir: str, out: str, dtype: str, opset: int, tolerance: float | None,
                   allow_pickle: bool, overwrite: bool, quiet: bool, as_json: bool) -> None:
    """Export the dLLM and the verifier to ONNX with KV-cache I/O, check both, write a bundle."""
    from apd_deploy.export.pipeline import export_bundle

    manifest = export_bundle(dllm_dir, verifier_dir, out, dtype=dtype, opset=opset, allow_pickle=allow_pickle,
                             overwrite=overwrite, tolerance=tolerance, report=progress_printer(quiet or as_json))
    summary = {
        "bundle": out,
        "dtype": dtype,
        "opset": opset,
        "seconds": manifest["export"]["seconds"],
        "checks": {role: m["check"] for role, m in manifest["models"].items()},
        "files": manifest["files"],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        for role, check in summary["checks"].items():
            if check["status"] == "passed":
                click.echo(f"{role}: max |logits diff| {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.1e})")
        click.echo(f"wrote {out} in {summary['seconds']:.1f} s")

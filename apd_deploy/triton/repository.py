"""`apd-deploy triton-repo`: a Triton model repository holding a bundle as a decoupled
Python-backend model (one request in, a response per decoding step out).

    OUT/<model-name>/config.pbtxt     inputs and outputs (fields.py), the settings below, the stub's environment
    OUT/<model-name>/1/model.py       model.py of this package: loads the bundle, runs the scheduler
    OUT/<model-name>/1/bundle/        only with copy_bundle; else config.pbtxt names the bundle's path

Written atomically (staged beside, then renamed); other models in OUT are left alone.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from apd_deploy.errors import ApdDeployError, BundleError
from apd_deploy.runtime import Runtime
from apd_deploy.staging import staged_directory
from apd_deploy.triton.environment import PythonEnv
from apd_deploy.triton.fields import INPUTS, OUTPUTS, Tensor

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
TEMPLATE = Path(__file__).with_name("model.py")
COPIED_BUNDLE = "1/bundle"  # the bundle's place inside the model's folder, with copy_bundle


def _tensor(t: Tensor) -> str:
    optional = " optional: true" if t.optional and t in INPUTS else ""
    return f'  {{ name: "{t.name}" data_type: {t.data_type} dims: [ {t.dims} ]{optional} }}'


def config_text(name: str, params: dict[str, str], instances: int) -> str:
    """config.pbtxt: decoupled (many responses per request), no Triton batching (the model's own
    scheduler batches the requests of every Triton batch), `instances` CPU instances, `params` as
    its string parameters."""
    inputs = ",\n".join(_tensor(t) for t in INPUTS)
    outputs = ",\n".join(_tensor(t) for t in OUTPUTS)
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }", f"input [\n{inputs}\n]", f"output [\n{outputs}\n]",
             f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]"]
    lines += [f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in params.items()]
    return "\n".join(lines) + "\n"


def write_repository(bundle: str | Path, out: str | Path, model_name: str | None = None, engine: str | None = None,
                     max_batch: int = 8, max_queue: int = 64, instances: int = 1, threads: int | None = None,
                     python_env: str | Path | None = None, copy_bundle: bool = False) -> Path:
    """Write OUT/<model_name> (default: the bundle folder's name) and return it. The bundle's files
    are checked first (the engine's graphs, the tokenizer), and the stub's environment."""
    bundle = Path(bundle).absolute()
    name = model_name or bundle.name
    if not MODEL_NAME.fullmatch(name):
        raise ApdDeployError(f"--model-name {name!r}: use letters, digits, '_', '.' and '-' (a folder and a URL part)")
    env = (PythonEnv.inspect(python_env) if python_env else
           PythonEnv.inspect(sys.prefix, flag="this Python's environment (the default of --python-env)"))
    Runtime.check_files(bundle, engine)
    target = Path(out) / name
    with staged_directory(target, overwrite=False, recognise=_refuse) as staging:
        (staging / "1").mkdir()
        shutil.copyfile(TEMPLATE, staging / "1" / "model.py")
        where = str(bundle)
        if copy_bundle:
            shutil.copytree(bundle, staging / COPIED_BUNDLE)
            where = COPIED_BUNDLE
        # What each instance runs: the parameters model.py reads (the bundle absolute, or relative
        # to the model's folder), and the stub's environment.
        params = {"bundle": where, "engine": engine or "", "threads": str(threads or ""), "max_batch": str(max_batch),
                  "max_queue": str(max_queue), "EXECUTION_ENV_PATH": str(env.path)}
        (staging / "config.pbtxt").write_text(config_text(name, params, instances))
    return target


def _refuse(target: Path) -> None:
    raise BundleError(f"{target}: already exists; choose another --model-name or OUT")

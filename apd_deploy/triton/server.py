"""`apd-deploy triton-serve`: tritonserver from the nvidia-pytriton wheel on a model repository,
with what its Python backend needs set up:

- a backend directory holding the wheel's `libtriton_python.so`, `triton_python_backend_utils.py`
  and the stub built for the Python of the models' environment (tritonserver looks in
  /opt/tritonserver otherwise);
- LD_LIBRARY_PATH with the wheel's own libraries (the stub links libcudart even on a CPU; without
  it the server hangs) and the environment Python's LIBDIR (its libpython);
- each bundle checked first, as `serve` checks it (a bundle that does not check is one error line).

tritonserver runs as a child on loopback by default; SIGTERM and Ctrl-C are passed on to it (it
lets requests in flight finish, for up to grace_seconds) and its exit status is the command's.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from apd_deploy.errors import ApdDeployError
from apd_deploy.runtime import Runtime
from apd_deploy.triton.environment import INSTALL_HINT, PythonEnv

PARAMETER = re.compile(r'key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')
READY_TIMEOUT_SECONDS = 300  # a large bundle's load and hash check
PR_SET_PDEATHSIG = 1


def model_parameters(repo: Path) -> dict[str, dict[str, str]]:
    """The string parameters of each model's config.pbtxt, by model folder."""
    configs = sorted(repo.glob("*/config.pbtxt"))
    if not configs:
        raise ApdDeployError(f"{repo}: no model there (no */config.pbtxt); write one with apd-deploy triton-repo "
                             "BUNDLE REPO")
    return {config.parent.name: dict(PARAMETER.findall(config.read_text())) for config in configs}


def stub_environment(repo: Path, models: dict[str, dict[str, str]]) -> PythonEnv:
    """The one environment the repository's Python models run in (one stub serves them all)."""
    envs = {}
    for name, params in models.items():
        where = params.get("EXECUTION_ENV_PATH")
        if where:
            env = PythonEnv.inspect(where, flag=f"{repo / name / 'config.pbtxt'}: EXECUTION_ENV_PATH")
            envs[env.python] = env
    if len(envs) > 1:
        raise ApdDeployError(f"{repo}: its models run in environments of Python {' and '.join(sorted(envs))}; "
                             "tritonserver loads one Python stub: write them all with one --python-env")
    return next(iter(envs.values()), None) or PythonEnv.inspect(sys.prefix, flag="the running Python's environment")


def check_bundles(repo: Path, models: dict[str, dict[str, str]]) -> None:
    """Check the files of each APD model's bundle, as `serve` would before it loads one."""
    for name, params in models.items():
        if "bundle" in params:
            bundle = Path(params["bundle"])
            Runtime.check_files(bundle if bundle.is_absolute() else repo / name / bundle, params.get("engine") or None)


def check_port(host: str, port: int, flag: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ApdDeployError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another {flag} or --host, "
                                 "or stop what listens there") from None


def backend_directory(pytriton: Path, python: str, folder: Path) -> Path:
    """`folder`/python: the Python backend of the wheel with the stub for `python` (links)."""
    backend, stub = pytriton / "tritonserver" / "backends" / "python", pytriton / "tritonserver" / "python_backend_stubs" / python
    if not (stub / "triton_python_backend_stub").exists():
        raise ApdDeployError(f"the PyTriton wheel at {pytriton} has no Python backend stub for Python {python}; "
                             "use an environment of Python 3.8-3.13")
    (folder / "python").mkdir()
    for source in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py",
                   stub / "triton_python_backend_stub"):
        (folder / "python" / source.name).symlink_to(source)
    return folder


def _die_with_parent() -> None:
    """In the child: SIGTERM when this command dies, even by SIGKILL (no orphaned server)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_ready(server: subprocess.Popen, url: str) -> bool:
    """True once the server answers ready; False if it exits first."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def triton_serve(repo: str | Path, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, grace_seconds: float = 30.0) -> int:
    """Run tritonserver on `repo` until it exits (SIGTERM, Ctrl-C); its exit status."""
    if not (host == "localhost" or host.strip("[]") == "::1" or host.startswith("127.")):
        print(f"warning: serving on {host}: tritonserver asks no API key, so anyone who can reach its ports can use "
              "the models; put it behind an authenticating proxy, or bind --host 127.0.0.1", file=sys.stderr, flush=True)
    repo = Path(repo).absolute()
    if not repo.is_dir():
        raise ApdDeployError(f"{repo}: no such directory; write a model repository with apd-deploy triton-repo")
    models = model_parameters(repo)
    env = stub_environment(repo, models)
    spec = importlib.util.find_spec("pytriton")  # this Python's wheel first, else the environment's
    pytriton = Path(spec.origin).parent if spec else env.pytriton
    if pytriton is None:
        raise ApdDeployError(f"triton-serve runs tritonserver from the nvidia-pytriton wheel, which neither this "
                             f"Python nor {env.path} has; {INSTALL_HINT}")
    check_bundles(repo, models)
    for port, flag in ((http_port, "--http-port"), (grpc_port, "--grpc-port"), (metrics_port, "--metrics-port")):
        check_port(host, port, flag)
    libraries = [str(pytriton.parent / "nvidia_pytriton.libs"), env.libdir, os.environ.get("LD_LIBRARY_PATH", "")]
    with tempfile.TemporaryDirectory(prefix="apd-triton-backends-") as folder:
        command = [str(pytriton / "tritonserver" / "bin" / "tritonserver"), "--model-repository", str(repo),
                   "--backend-directory", str(backend_directory(pytriton, env.python, Path(folder))),
                   "--http-address", host, "--grpc-address", host, "--metrics-address", host,
                   "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
                   "--exit-timeout-secs", str(max(1, round(grace_seconds))), "--log-info", "false"]
        server = subprocess.Popen(command, env={**os.environ, "LD_LIBRARY_PATH": ":".join(filter(None, libraries))},
                                  preexec_fn=_die_with_parent)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _: server.send_signal(signum))
        shown = f"[{host}]" if ":" in host else host
        if wait_ready(server, f"http://{shown}:{http_port}"):
            print(f"serving {', '.join(models)} from {repo} on http://{shown}:{http_port} (generate_stream), gRPC "
                  f"{shown}:{grpc_port}, metrics http://{shown}:{metrics_port}/metrics", file=sys.stderr, flush=True)
        code = server.wait()
    if code < 0:  # killed by a signal: the shell's status for it
        code = 128 - code
    if code != 0:
        print(f"error: tritonserver exited with status {code}; its log is above", file=sys.stderr, flush=True)
    else:
        print("stopped", file=sys.stderr, flush=True)
    return code


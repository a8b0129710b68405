"""The Python environment the Triton Python backend's stub runs the model in.

The stub is a program of its own, built per Python minor version, that embeds that version's
libpython and imports the model's packages from an environment (`EXECUTION_ENV_PATH`). Its
tensors cross to the server as numpy arrays, and with numpy 2 the first string request kills it
(`deserialize_bytes_tensor`): the environment needs numpy < 2, which the `[triton]` extra pins.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from apd_deploy.errors import ApdDeployError

INSTALL_HINT = ("make one with: python3 -m venv ENV && ENV/bin/pip install 'apd-deploy[triton]' (it pins numpy < 2); "
                "from a checkout, bash scripts/install.sh makes .venv-triton")
# What the environment's Python reports about itself.
PROBE = """
import json, sys, sysconfig
found = {"python": "%d.%d" % sys.version_info[:2], "libdir": sysconfig.get_config_var("LIBDIR")}
try:
    import numpy
    found["numpy"] = numpy.__version__
    import apd_deploy.runtime
except ImportError as exc:
    found["missing"] = exc.name or str(exc)
try:
    import pytriton
    found["pytriton"] = str(__import__("pathlib").Path(pytriton.__file__).parent)
except ImportError:
    pass
print(json.dumps(found))
"""


@dataclass(frozen=True)
class PythonEnv:
    path: Path  # the environment's prefix (a venv's folder)
    python: str  # its Python's minor version, "3.11": the stub must be built for it
    libdir: str  # where its libpython lies (the stub links it)
    pytriton: Path | None  # the nvidia-pytriton package, if installed there

    @classmethod
    def inspect(cls, path: str | Path, flag: str = "--python-env") -> PythonEnv:
        """The environment at `path`, checked for the stub: a Python, numpy < 2 and apd_deploy.
        ApdDeployError (naming `flag`) otherwise."""
        path = Path(path).absolute()
        python = path / "bin" / "python"
        if not python.exists():
            raise ApdDeployError(f"{flag} {path}: no Python environment there (no bin/python); {INSTALL_HINT}")
        try:
            found = json.loads(subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, check=True,
                                              timeout=120).stdout)
        except (subprocess.SubprocessError, ValueError) as exc:
            raise ApdDeployError(f"{flag} {path}: its Python does not run ({exc}); {INSTALL_HINT}") from None
        if "missing" in found:
            raise ApdDeployError(f"{flag} {path}: the environment lacks {found['missing']}, which the model imports; "
                                 f"{INSTALL_HINT}")
        if int(found["numpy"].split(".")[0]) >= 2:
            raise ApdDeployError(f"{flag} {path}: the environment has numpy {found['numpy']}, and Triton's Python stub "
                                 f"fails on the first string request with numpy 2; use an environment with numpy < 2 "
                                 f"({INSTALL_HINT})")
        pytriton = Path(found["pytriton"]) if "pytriton" in found else None
        return cls(path, found["python"], found["libdir"], pytriton)

"""Errors the user can act on: the CLI prints their message as one line, never a traceback."""

import re
from collections.abc import Callable

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class ApdDeployError(Exception):
    """Bad input or an unmet requirement; the message names the file, the field and the fix."""


class CheckpointError(ApdDeployError):
    """A checkpoint directory that cannot be loaded as it is."""


class BundleError(ApdDeployError):
    """A bundle that is missing, incomplete, tampered with or of another format version."""


class ExportCheckError(ApdDeployError):
    """An exported graph that disagrees with the PyTorch model beyond the tolerance."""


class GenerationError(ApdDeployError):
    """Generation parameters or a prompt that cannot be run as given.

    `param` names the parameter at fault by its Python keyword (e.g. 'kv_window'), and the message
    refers to it as `{name}`: each front end fills in its own name for it (`in_terms_of`), a flag on
    the command line, a body field over HTTP; `str()` gives the keyword, as the Python API takes it.
    A message may name a second parameter by its keyword in braces (`{max_new_tokens}`).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        self.template, self.param = message, param
        super().__init__(self.in_terms_of())

    def in_terms_of(self, name_of: Callable[[str], str] = str) -> str:
        """The message with each parameter it names called `name_of(keyword)` (a flag, a body field)."""
        fill = PLACEHOLDER.sub(lambda m: name_of(self.param if m[1] == "name" else m[1]), self.template)
        return fill if self.param else self.template


class BackendUnavailable(ApdDeployError):
    """A backend or package this machine lacks; the message says how to install it."""


class EngineMismatch(ApdDeployError):
    """An engine built for another TensorRT version or GPU; the message says to rebuild it."""

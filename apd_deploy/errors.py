"""Errors the user can act on: the CLI prints their message as one line, never a traceback."""


class ApdDeployError(Exception):
    """Bad input or an unmet requirement; the message names the file, the field and the fix."""


class CheckpointError(ApdDeployError):
    """A checkpoint directory that cannot be loaded as it is."""


class BundleError(ApdDeployError):
    """A bundle that is missing, incomplete, tampered with or of another format version."""


class ExportCheckError(ApdDeployError):
    """An exported graph that disagrees with the PyTorch model beyond the tolerance."""


class GenerationError(ApdDeployError):
    """Generation parameters or a prompt that cannot be run as given."""


class BackendUnavailable(ApdDeployError):
    """A backend or package this machine lacks; the message says how to install it."""


class EngineMismatch(ApdDeployError):
    """An engine built for another TensorRT version or GPU; the message says to rebuild it."""

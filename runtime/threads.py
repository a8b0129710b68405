"""How many onnxruntime threads per model a runtime may start on this machine."""

from __future__ import annotations

from apd_deploy.runtime.engine import default_threads

# Room for lanes that share cores and for some oversubscription, none for a typo: 10000 threads
# per model gave the tokens, then kept the process alive past 100 s at 1.5 GB.
THREADS_PER_CORE = 4


def too_many_threads(threads: int) -> str | None:
    """Why `threads` is too many for the cores this process may run on, or None."""
    cores = default_threads()
    if threads <= THREADS_PER_CORE * cores:
        return None
    return (f"{threads} is more than {THREADS_PER_CORE}x the {cores} core{'s' * (cores > 1)} this process may run "
            f"on; use at most {THREADS_PER_CORE * cores}")

"""Write an output directory atomically: assemble it in a staging folder beside its destination,
rename it into place only when complete, and replace an existing destination only when it is
something this tool wrote.

Staging and retired folders carry their owner's pid in their name (`.NAME.staging-PID-XXXX`,
`.NAME.old-PID-XXXX`), so that a later run can tell the leftovers of a killed process (SIGKILL,
power loss) from the work of one still running, and remove only the former.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from apd_deploy.errors import BundleError

# Raises BundleError (naming what is in the way) if an existing, non-empty destination is not
# something the caller wrote and may therefore replace.
Recognise = Callable[[Path], None]


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    swallows it on the way out and every `finally` that cleans up runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    # A second SIGTERM must not interrupt the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (as SIGINT raises KeyboardInterrupt), so
    staging folders are removed instead of left behind. Only the main thread receives signals;
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _owner_pid(name: str, prefix: str) -> int | None:
    """The pid in `.NAME.KIND-PID-XXXX`, or None for a name this module did not make."""
    pid, sep, _ = name[len(prefix):].partition("-")
    return int(pid) if sep and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the staging and retired folders of `target` whose owner process is gone; returns them.

    A retired folder of a process killed between its two renames holds the only copy of the old
    destination: it is put back when nothing has taken its place.
    """
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("staging", "old"):
        prefix = f".{target.name}.{kind}-"
        for folder in target.parent.iterdir():
            if not folder.name.startswith(prefix) or not folder.is_dir():
                continue
            pid = _owner_pid(folder.name, prefix)
            if pid is None or pid == os.getpid() or _alive(pid):
                continue
            retired = folder / target.name
            if kind == "old" and retired.exists() and not os.path.lexists(target):
                os.replace(retired, target)
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def check_writable(target: Path, beside: bool = False) -> None:
    """Raise BundleError unless the directory `target` can be made, or written in where it is one;
    with `beside`, unless a directory can be made beside it (staging, then a rename). The nearest
    existing folder must be a directory that takes a new entry: tried, not asked (os.access),
    because root may write anywhere on paper, yet not on a read-only file system or in /proc. The
    folder tried is removed at once."""
    existing = next(p for p in ((target.parent, *target.parent.parents) if beside else (target, *target.parents))
                    if os.path.lexists(p))
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == target else f"{existing} is not a directory"
        raise BundleError(f"{target}: {what}; choose another output path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".apd-deploy-probe-", dir=existing))
    except OSError as exc:
        raise BundleError(f"{target}: cannot write in {existing} ({exc.strerror}); choose another output "
                          "path") from None


def check_destination(target: Path, overwrite: bool, recognise: Recognise) -> None:
    """Raise BundleError unless `target` may be written: absent, an empty directory, or (with
    `overwrite`) something `recognise` accepts; and in a place this process can write."""
    if os.path.lexists(target) and not target.is_dir():
        raise BundleError(f"{target}: exists and is not a directory; remove it or choose another output path")
    check_writable(target, beside=True)
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise BundleError(f"{target}: already exists; choose another output path or pass --overwrite")
    recognise(target)


def _private_dir(target: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def _commit(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, replacing what is there. Interrupted between the two renames,
    it puts the old destination back."""
    retired = None
    try:
        if target.exists():
            retired = _private_dir(target, "old") / target.name
            os.replace(target, retired)
        os.replace(staging, target)
    except BaseException:
        if retired is not None and retired.exists() and not os.path.lexists(target):
            os.replace(retired, target)
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired.parent, ignore_errors=True)


def _follow_umask(staging: Path, umask: int) -> None:
    """Give what was written the modes of ordinary output: some writers make private files
    (safetensors' save_file 0600, mkstemp), which a server running as another user cannot read."""
    for path in staging.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def staged_directory(target: str | Path, overwrite: bool, recognise: Recognise) -> Iterator[Path]:
    """Yield an empty staging directory that replaces `target` if the block completes.

    `target` is checked first (see `check_destination`), and again before the final rename in
    case something appeared there meanwhile. On any exception, KeyboardInterrupt and
    `Terminated` included, the staging directory is removed and `target` is left as it was.
    """
    target = Path(target)
    check_destination(target, overwrite, recognise)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    staging = _private_dir(target, "staging")
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        yield staging
        _follow_umask(staging, umask)
        check_destination(target, overwrite, recognise)
        _commit(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

"""Publishing an output folder: the one place that writes where the user asked for a folder.

Every folder output (a merged checkpoint, a merged adapter, a task bank, a saved merged model) is staged and moved
into place only when complete, under these rules:

- **Inputs are never touched.** An ``output_dir`` that is, contains or lies inside an input folder (compared as
  resolved real paths) is refused before any work.
- **Nothing of the user's is deleted.** The package marks each folder it writes (:data:`MARKER`, listing the
  entries it wrote). An existing non-empty folder without that marker is refused unless ``overwrite=True``; even
  then, and in an earlier output the user added files to, files the package did not write are *kept* (as
  ``save_pretrained`` keeps them): only the package's own entries are replaced. An existing file is refused.
- **Atomic where the file system allows.** A new folder, or an earlier output holding only the package's entries,
  is staged in a temporary sibling and renamed into place in one step. A symlinked folder is written through, and a
  mount point (which cannot be renamed), or a folder with the user's files in it, is published from a staging
  folder inside it, entry by entry.
- **One run at a time.** A lock next to the target makes a second run publishing into the same folder fail at once
  with :class:`OutputFolderError`.
- **No leftovers.** A failure, Ctrl-C or SIGTERM removes the staging folder; staging folders of killed runs are
  removed by the next run into the same target. Folders get the umask's permissions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

#: The file marking a folder as an output of this package: ``{"format", "version", "entries": [names]}``.
MARKER = ".hf_merge_output.json"
_FORMAT = "hf_merge.output"
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^/]+$")
_INNER_STAGING = re.compile(r"^\.hf_merge-staging-(?P<pid>\d+)-[^/]+$")


class OutputFolderError(ValueError):
    """An ``output_dir`` that cannot be written without touching an input or the user's files, or that another run
    is writing."""


def check_output_dir(output_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                     overwrite: bool = False) -> None:
    """Refuse ``output_dir`` (before any work) when it is an existing file, is/contains/lies inside one of the
    ``inputs`` folders, or is a non-empty folder this package did not write and ``overwrite`` is false."""
    target = Path(output_dir).absolute()
    real = Path(os.path.realpath(target))
    for item in inputs:
        source = Path(os.path.realpath(Path(item).absolute()))
        if real == source or source in real.parents or real in source.parents:
            relation = "is" if real == source else ("lies inside" if source in real.parents else "contains")
            raise OutputFolderError(
                f"output_dir {str(target)!r} {relation} the input {str(source)!r}: writing there would change or "
                "delete an input. Choose another output folder."
            )
    if real.exists() and not real.is_dir():
        raise OutputFolderError(f"output_dir {str(target)!r} is an existing file, not a folder; choose another path.")
    if real.is_dir() and not overwrite and own_entries(real) is None:  # an earlier output keeps the user's files
        foreign = _foreign_entries(real)
        if foreign:
            shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
            raise OutputFolderError(
                f"output_dir {str(target)!r} already holds files hf_merge did not write ({shown}). Choose an empty or "
                "new folder, or pass overwrite=True (CLI: --overwrite) to write into it: your files are kept, only "
                "hf_merge's own are replaced."
            )


@contextlib.contextmanager
def publish_folder(output_dir: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                   overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success its entries become ``output_dir`` (see the module docstring for the
    rules). On any exception, Ctrl-C or SIGTERM the staging folder is removed and ``output_dir`` is left as it was."""
    check_output_dir(output_dir, inputs, overwrite=overwrite)
    target = Path(output_dir).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target), _sigterm_as_exit():
        _remove_stale_staging(target)
        real = Path(os.path.realpath(target))
        in_place = real.is_dir() and (target.is_symlink() or os.path.ismount(real) or bool(_foreign_entries(real)))
        staging = _make_staging(real if in_place else target.parent, target.name, in_place)
        try:
            yield staging
            entries = sorted(entry.name for entry in staging.iterdir())
            (staging / MARKER).write_text(json.dumps({"format": _FORMAT, "version": 1, "entries": entries},
                                                     indent=2) + "\n", encoding="utf-8")
            if in_place or not _swap(staging, target):
                _move_entries(staging, real)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def own_entries(folder: Path) -> set[str] | None:
    """The entries this package wrote into ``folder`` (its marker included), or ``None`` without a valid marker."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != _FORMAT or not isinstance(record.get("entries"), list):
        return None
    return {str(name) for name in record["entries"]} | {MARKER}


def _foreign_entries(folder: Path) -> set[str]:
    """Entries of ``folder`` this package did not write (all of them, without a marker)."""
    present = {entry.name for entry in folder.iterdir()
               if not _INNER_STAGING.match(entry.name) and entry.name != ".hf_merge.lock"}
    return present - (own_entries(folder) or set())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_staging(parent: Path, name: str, inside: bool) -> Path:
    """A staging folder: a hidden sibling ``.<name>.tmp-<pid>-…`` (or, inside the target, ``.hf_merge-staging-…``),
    with the permissions a new folder gets under the umask."""
    prefix = f".hf_merge-staging-{os.getpid()}-" if inside else f".{name}.tmp-{os.getpid()}-"
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def _swap(staging: Path, target: Path) -> bool:
    """Rename ``staging`` to ``target`` (an earlier output holding only this package's entries is moved aside and
    removed); ``False`` when the file system refuses to rename the target (a mount point, a busy folder)."""
    if not target.exists():
        os.replace(staging, target)
        return True
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    try:
        os.replace(target, old / target.name)
    except OSError as error:
        shutil.rmtree(old, ignore_errors=True)
        if error.errno in (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.EINVAL):
            return False
        raise
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the earlier output back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def _move_entries(staging: Path, folder: Path) -> None:
    """Publish inside ``folder``: this package's earlier entries are removed, the staged ones moved in; every other
    entry (the user's) is kept."""
    for name in own_entries(folder) or set():
        if name != MARKER and not (staging / name).exists():
            _remove(folder / name)
    for entry in sorted(staging.iterdir(), key=lambda path: path.name == MARKER):  # the marker last
        destination = folder / entry.name
        if destination.is_dir() and not destination.is_symlink():
            _remove(destination)
        try:
            os.replace(entry, destination)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            shutil.move(str(entry), str(destination))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(target: Path) -> None:
    """Staging folders that runs killed before they could clean up (their process is gone) left next to or inside
    ``target``."""
    places = [(target.parent, _STAGING, target.name)]
    real = Path(os.path.realpath(target))
    if real.is_dir():
        places.append((real, _INNER_STAGING, None))
    for folder, pattern, name in places:
        for entry in folder.iterdir():
            match = pattern.match(entry.name)
            if match and (name is None or match["name"] == name) and not _pid_alive(int(match["pid"])):
                shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
    """An exclusive, non-blocking lock on ``.<name>.lock`` next to the target (inside it, as ``.hf_merge.lock``, when
    only the target is writable, e.g. a mounted volume under a read-only parent)."""
    import fcntl

    path = target.parent / f".{target.name}.lock"
    try:
        handle = open(path, "a+")  # noqa: SIM115 (closed below)
    except OSError:
        if not target.is_dir():
            raise
        path = target / ".hf_merge.lock"
        handle = open(path, "a+")  # noqa: SIM115 (closed below)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputFolderError(
                f"Another run is writing into {str(target)!r} right now; wait for it to finish or choose another "
                "output_dir."
            ) from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        handle.close()


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (``timeout``, ``docker stop``, Slurm) unwinds like Ctrl-C while a folder is being written, so the
    staging folder is removed; only in the main thread, and only where SIGTERM has its default action."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

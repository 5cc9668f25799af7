"""Publishing an output folder: the one place that writes where the user asked for a folder.

Every folder output (a merged checkpoint, a merged adapter, a task bank, whatever a route writes) is staged in a
temporary sibling of the target and renamed into place only when complete, so a failed or interrupted run leaves no
output behind and an earlier folder untouched until the new one is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def publish_folder(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``output_dir``; on success it replaces ``output_dir`` in one rename.

    On any exception the temporary folder is removed and an existing ``output_dir`` is left untouched.
    """
    target = Path(output_dir).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

"""Writing folders atomically: build in a temporary folder beside the target, then swap."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compiler.errors import ArtifactError


def replace_dir(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is swapped out only after the move."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(backup, target)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def staged_dir(target: Path, what: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; on success it replaces ``target`` whole.

    On any failure the staging folder is removed and ``target`` is untouched.

    Raises:
        ArtifactError: ``target`` exists and is not empty (without ``overwrite``), or it
            cannot be written; ``what`` names the thing in the message.
    """
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ArtifactError(f"{target} exists and is not empty (pass overwrite=True)")
    parent = target.parent if str(target.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    except OSError as e:
        raise ArtifactError(f"cannot write {what} to {target}: {e}") from e
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ArtifactError(f"cannot write {what} to {target}: {e}") from e
        raise


__all__ = ["replace_dir", "staged_dir"]

"""Writing folders atomically (build in a temporary folder beside the target, then swap), and
the manifest of a compiled artifact (format, version, every file's size and SHA-256)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compiler.errors import ArtifactError

ARTIFACT_FORMAT = "fxcompress-artifact"
#: 2: report.json holds the per-pass data of the HTML report (``PassRecord.details``)
ARTIFACT_VERSION = 2


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


def read_manifest(directory: str | os.PathLike) -> dict:
    """The checked ``manifest.json`` of a compiled artifact (format and version; files unchecked).

    Raises:
        ArtifactError: not a folder with a manifest, a corrupt or foreign manifest, or a format
            version newer than this fxcompress reads.
    """
    directory = Path(directory)
    mpath = directory / "manifest.json"
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such folder (give a compiled artifact folder, "
                            "written by fxcompress compile -o)")
    if not mpath.is_file():
        raise ArtifactError(f"{directory}: not an fxcompress artifact (no manifest.json; "
                            "write one with fxcompress compile MODEL -o FOLDER)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath}: corrupt manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{mpath}: not an fxcompress artifact manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or version > ARTIFACT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format version {version!r} is newer than this "
                            f"fxcompress reads ({ARTIFACT_VERSION}); upgrade fxcompress")
    return manifest


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """A manifest's entry of one file: its size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "file_entry", "read_manifest", "replace_dir",
           "sha256_of", "staged_dir"]

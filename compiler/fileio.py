"""Writing folders atomically: build in a temporary folder beside the target, then swap."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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


__all__ = ["replace_dir"]

"""The README's Python examples run as written, in order, from a repository root whose
``../shared/data`` is the shared data (as a user would paste them into one session)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DATA, needs_stories

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_examples_use_the_fxcompress_import_name():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert "import fxcompress" in blocks[0]
    for b in blocks:
        assert "compiler." not in b and "import compiler" not in b, b


@pytest.mark.slow  # ~30 s: compiles stories260K twice (fp32, SmoothQuant W8A8), generates, exports
@needs_stories
def test_readme_python_examples_run_as_written(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(DATA, target_is_directory=True)
    script = repo / "readme_examples.py"
    script.write_text("\n".join(python_blocks()))
    r = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True,
                       timeout=600, env={**__import__("os").environ, "FXCOMPRESS_DATA": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (repo / "out" / "model.onnx").is_file()
    assert (repo / "out" / "artifact" / "manifest.json").is_file()
    assert (repo / "out" / "stories-genai" / "genai_config.json").is_file()
    assert "canonicalize" in r.stdout

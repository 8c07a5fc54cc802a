"""The HTML report of a compiled stories260K in headless Chromium: it renders, has its sections,
logs no console error, loads nothing from outside, and reads with JavaScript disabled.

Set ``FXCOMPRESS_UPDATE_DOCS=1`` to also write the README's screenshot (``docs/report.png``):
the SmoothQuant section of the stories260K SmoothQuant + W8A8 report, as taken here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compiler.cli import main
from tests.browser import Chromium, find_chromium
from tests.conftest import REPO, STORIES, needs_stories

# one worker builds the module's compiled reports once (under -n, --dist loadgroup)
pytestmark = [pytest.mark.slow, needs_stories, pytest.mark.xdist_group("report_browser")]
pytest.importorskip("matplotlib", reason="the HTML report's plots need matplotlib ([report])")
PIL = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency) reads the PNG")

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium executable (.ci/run installs Debian's chromium; "
                             "apt-get install chromium, or set FXCOMPRESS_CHROMIUM)")

PIPELINES = {
    "sq_w8a8": "smoothquant(alpha=0.5), insert_qdq(scheme=w8a8)",
    "prune_slice": "structured_prune(ratio=0.2, importance=l2), slicegpt(sparsity=0.25, round_to=1)",
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, Path]:
    """Each pipeline compiled by the CLI; its report written again by ``fxcompress report``."""
    out = {}
    for name, passes in PIPELINES.items():
        art = tmp_path_factory.mktemp(name) / "art"
        assert main(["-q", "compile", str(STORIES), "--passes", passes, "--calib",
                     "tinystories:8x256", "--ppl", "tinystories:4", "-o", str(art)]) == 0
        assert (art / "report.html").is_file()  # written by compile
        html = art.parent / "report.html"
        assert main(["report", str(art), "-o", str(html)]) == 0
        out[name] = html
    return out


def _headings(b: Chromium) -> list[str]:
    return b.evaluate("Array.from(document.querySelectorAll('h2, h3'))"
                      ".map(e => e.firstChild.textContent.trim())")


def _rendered(png: Path) -> tuple[int, int, float]:
    """(width, height, fraction of pixels that differ from the page background)."""
    img = PIL.open(png).convert("RGB")
    small = img.resize((img.width // 4, img.height // 4))
    bg = small.getpixel((2, small.height - 2))
    px = list(small.getdata())
    return img.width, img.height, sum(p != bg for p in px) / len(px)


def _check_page(b: Chromium, html: Path) -> None:
    assert b.console_errors == []
    outside = [u for u in b.requests if not u.startswith(("file:", "data:"))]
    assert outside == [], "the report must not load anything from outside the file"
    assert b.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert b.evaluate("document.querySelectorAll('script').length") == 0


@needs_chromium
def test_smoothquant_w8a8_report_renders_with_channel_maxima_and_marked_graphs(reports,
                                                                               tmp_path):
    html = reports["sq_w8a8"]
    with Chromium(CHROMIUM, width=1280, height=900) as b:
        b.open(html.as_uri())
        _check_page(b, html)
        h = _headings(b)
        assert h[:2] == ["Passes", "Perplexity per pass"]
        assert [x for x in h if x[0].isdigit()] == [
            "1. canonicalize()", "2. smoothquant(alpha=0.5)",
            "3. insert_qdq(scheme=w8a8, symmetric=True)"]
        assert h.count("Block graph") == 3 and "Quantization error" in h
        # every pass has its block graph with the change marked
        for i in (1, 2, 3):
            marked = b.evaluate(f"document.querySelectorAll('#pass-{i} svg .n.added, "
                                f"#pass-{i} svg .n.removed, #pass-{i} svg .n.rewritten').length")
            assert marked > 0, f"pass {i}: no marked node"
        # SmoothQuant: per-channel maxima before and after, for the sites of one block
        alts = b.evaluate("Array.from(document.querySelectorAll('#pass-2 img')).map(i => i.alt)")
        assert sum("channels" in a for a in alts) >= 4
        # the before / after views are CSS only: "before" hides the nodes the pass added
        assert b.evaluate("getComputedStyle(document.querySelector('#pass-3 .n.added'))"
                          ".display") != "none"
        b.evaluate("document.querySelector('#pass-3 input.v-before').click()")
        assert b.evaluate("getComputedStyle(document.querySelector('#pass-3 .n.added'))"
                          ".display") == "none"
        shot = b.screenshot(tmp_path / "page.png", full_page=True)
        width, height, ink = _rendered(shot)
        assert width == 1280 and height > 3000 and ink > 0.05
        if os.environ.get("FXCOMPRESS_UPDATE_DOCS"):
            _write_docs_screenshot(b, tmp_path)


def _write_docs_screenshot(b: Chromium, tmp_path: Path) -> None:
    """The SmoothQuant section down to its activation plots, scaled and palettized (small)."""
    b.evaluate("document.querySelector('#pass-3 input.v-diff').click()")
    box = b.evaluate("(() => { const s = document.querySelector('#pass-2').getBoundingClientRect();"
                     " const d = document.querySelector('#pass-2 details:last-of-type')"
                     ".getBoundingClientRect(); return [s.x + scrollX, s.y + scrollY, s.width,"
                     " d.bottom - s.y]; })()")
    x, y, w, h = box
    raw = b.screenshot(tmp_path / "sq.png", clip={"x": x, "y": y, "width": w, "height": h})
    img = PIL.open(raw).convert("RGB")
    img = img.resize((int(img.width * 0.62), int(img.height * 0.62)), PIL.LANCZOS)
    docs = REPO / "docs"
    docs.mkdir(exist_ok=True)
    img.quantize(colors=128).save(docs / "report.png", optimize=True)


@needs_chromium
def test_prune_slicegpt_report_renders_with_kept_variance_and_reshaped_blocks(reports, tmp_path):
    with Chromium(CHROMIUM) as b:
        b.open(reports["prune_slice"].as_uri())
        _check_page(b, reports["prune_slice"])
        h = _headings(b)
        assert "Kept variance" in h and h.count("Block graph") == 3
        assert h.count("Activation ranges") == 2  # pruning and slicing move the inputs
        why = b.evaluate("Array.from(document.querySelectorAll('#pass-2 svg .n.rewritten title'))"
                         ".map(t => t.textContent).join('\\n')")
        assert "parameter shape" in why
        _, _, ink = _rendered(b.screenshot(tmp_path / "page.png", full_page=True))
        assert ink > 0.05


@needs_chromium
def test_report_reads_with_javascript_disabled(reports, tmp_path):
    with Chromium(CHROMIUM, javascript=False) as b:
        b.open(reports["sq_w8a8"].as_uri())
        assert b.console_errors == []
        assert "Activation ranges" in _headings(b)  # DevTools evaluation still works
        _, _, ink = _rendered(b.screenshot(tmp_path / "nojs.png"))
        assert ink > 0.05

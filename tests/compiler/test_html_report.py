"""The HTML compile report: self-contained page, per-pass sections, graph layout, CLI, errors."""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import compiler
from compiler.cli import main
from compiler.errors import ArtifactError, ReportError
from compiler.html_report import layout, read_artifact_report, render_html
from compiler.report import Report
from tests.conftest import tiny_model

pytest.importorskip("matplotlib", reason="the HTML report's plots need matplotlib ([report])")
# one worker compiles the module's model once (under -n, --dist loadgroup)
pytestmark = pytest.mark.xdist_group("html_report")


@pytest.fixture(scope="module")
def compiled():
    g = torch.Generator().manual_seed(11)
    calib = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(4)]
    return compiler.compile(tiny_model("llama"), ["smoothquant", "insert_qdq(scheme=w8a8)"],
                            calibration=calib)


@pytest.fixture(scope="module")
def saved(compiled, tmp_path_factory) -> Path:
    return compiled.save(tmp_path_factory.mktemp("saved") / "art")


@pytest.fixture
def artifact(saved, tmp_path) -> Path:
    """A fresh copy of the saved artifact (tests modify it)."""
    return Path(shutil.copytree(saved, tmp_path / "art"))


@pytest.fixture(scope="module")
def page(compiled) -> str:
    return render_html(compiled.report)


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text of h2/h3 headings."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag in ("h2", "h3"):
            self._in, self._text = tag, ""

    def handle_endtag(self, tag):
        if tag == self._in:
            self.headings.append(self._text.strip())
            self._in = None

    def handle_data(self, data):
        if self._in:
            self._text += data


def _parse(page: str) -> _Tags:
    p = _Tags()
    p.feed(page)
    return p


def test_page_is_self_contained_without_scripts_or_remote_resources(page):
    tags = _parse(page).tags
    assert not any(t == "script" for t, _ in tags)  # readable with JavaScript disabled
    assert not any(t in ("link", "iframe", "object", "embed") for t, _ in tags)
    srcs = [a["src"] for _, a in tags if "src" in a]
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    hrefs = [a["href"] for _, a in tags if "href" in a]
    assert hrefs and all(h.startswith("#") for h in hrefs)
    assert "@import" not in page and "url(http" not in page


def test_every_pass_has_a_section_with_its_row_and_marked_block_graph(page, compiled):
    parsed = _parse(page)
    sections = [a["id"] for t, a in parsed.tags if t == "section"]
    assert sections == ["passes", "pass-1", "pass-2", "pass-3"]
    h = parsed.headings
    assert h[0] == "Passes"
    for r in compiled.report.records:
        assert f"{r.index}. {r.spec}" in "".join(h)
    assert h.count("Block graph") == 3
    # one drawn block graph per pass (blocks 0-1 changed alike), with its changes marked
    svgs = page.count("<svg")
    assert svgs == 3
    assert 'class="n rewritten"' in page and 'class="n added"' in page
    assert "blocks 0-1 (each)" in page


def test_smoothquant_shows_channel_maxima_and_qdq_its_errors(page):
    sq = page.split('id="pass-2"')[1].split("</section>")[0]
    assert "<h3>Activation ranges</h3>" in sq and sq.count("<img") >= 2
    assert "Quantization error" not in sq
    qdq = page.split('id="pass-3"')[1].split("</section>")[0]
    assert "<h3>Quantization error</h3>" in qdq and "Largest output error" in qdq
    canon = page.split('id="pass-1"')[1].split("</section>")[0]
    assert "Activation ranges" not in canon  # an exact rewrite that moves no range


def test_layout_edges_point_down_and_boxes_in_a_layer_do_not_overlap(compiled):
    diff = compiled.report.records[2].details["graph"]["drawn"][0]
    placed, paths, width, height = layout(diff["nodes"], diff["edges"])
    assert set(placed) == {n["id"] for n in diff["nodes"]}
    for pts, _ in paths:
        assert all(b[1] > a[1] for a, b in itertools.pairwise(pts))
    rows: dict[float, list] = {}
    for x, y, w in placed.values():
        rows.setdefault(y, []).append((x - w / 2, x + w / 2))
        assert 0 <= x - w / 2 and x + w / 2 <= width and y + 22 <= height
    for boxes in rows.values():
        boxes.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(boxes))


def test_to_html_writes_the_file_atomically(compiled, tmp_path):
    out = compiled.report.to_html(tmp_path / "sub" / "report.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def test_report_without_captured_data_is_a_clear_error_and_writes_nothing(tmp_path):
    cm = compiler.compile(tiny_model("llama"), [], report_data=False)
    with pytest.raises(ReportError, match=r"no captured graphs .* canonicalize"):
        cm.report.to_html(tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_a_clear_error(compiled, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"pip install -e \"\.\[report\]\""):
        compiled.report.to_html(tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_cli_report_of_an_artifact_and_compile_writes_one_too(artifact, tmp_path, capsys):
    art = artifact
    assert main(["report", str(art), "-o", str(tmp_path / "r.html")]) == 0
    assert "<h2>Passes</h2>" in (tmp_path / "r.html").read_text()
    assert main(["report", str(art)]) == 0  # default: next to the artifact
    assert (art / "report.html").is_file()
    assert main(["-q", "compile", "tiny-llama", "-o", str(tmp_path / "c")]) == 0
    assert "wrote HTML report" in capsys.readouterr().out
    assert "Block graph" in (tmp_path / "c" / "report.html").read_text()


def _manifest(art: Path, **changes) -> None:
    path = art / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("case, error, message", [
    ("missing", ArtifactError, "no such folder"),
    ("not_artifact", ArtifactError, "not an fxcompress artifact"),
    ("old_format", ReportError, "format version 1 was written before"),
    ("newer_format", ArtifactError, "newer than this fxcompress reads"),
    ("modified_report", ArtifactError, "does not match the manifest"),
])
def test_bad_artifacts_give_clear_errors_and_no_file(artifact, tmp_path, capsys, case, error,
                                                      message):
    art = artifact
    target = {"missing": tmp_path / "nope", "not_artifact": tmp_path}.get(case, art)
    if case == "old_format":
        _manifest(art, version=1)
    elif case == "newer_format":
        _manifest(art, version=99)
    elif case == "modified_report":
        rpath = art / "report.json"
        rpath.write_text(rpath.read_text().replace('"canonicalize"', '"canonicalise"', 1))
    with pytest.raises(error, match=message):
        read_artifact_report(target)
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(target), "-o", str(out)]) == 2
    assert message.split()[0] in capsys.readouterr().err
    assert not out.parent.exists()


def test_loading_an_artifact_of_a_newer_format_is_refused(artifact):
    _manifest(artifact, version=99)
    with pytest.raises(ArtifactError, match="newer"):
        compiler.load(artifact)


def test_a_report_of_an_old_fxcompress_without_details_cannot_be_drawn(compiled):
    d = json.loads(compiled.report.to_json())
    for r in d["records"]:
        r.pop("details")
    with pytest.raises(ReportError, match="compile again"):
        render_html(Report.from_dict(d))


def test_compile_ppl_needs_a_tokenizer_and_a_window_count(tmp_path, capsys):
    assert main(["compile", "tiny-llama", "--ppl", "tinystories:4", "-o", str(tmp_path / "a")]) == 2
    assert "needs a model folder with a tokenizer" in capsys.readouterr().err
    assert main(["compile", "tiny-llama", "--ppl", "tinystories:x", "-o", str(tmp_path / "b")]) == 2
    assert "DATA[:WINDOWS]" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

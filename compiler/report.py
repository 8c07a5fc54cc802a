"""Per-pass records and the compile report (a table that reads well in a terminal, and JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class PassRecord:
    """What one pass did, as the report shows it."""

    index: int
    name: str
    spec: str
    exact: bool
    seconds: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    modified: bool = False
    skipped: bool = False
    drift: float | None = None  # max |logits - original logits| on the probe batch
    # calibration runs (activation statistics computed over the calibration set) in the pass;
    # 0 when it used statistics cached or transformed by an earlier pass
    sweeps: int = 0
    exact_check: float | None = None  # max |after - before| for exact passes
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # per-site rankings too long for notes (PassResult.tables), e.g. insert_qdq's sensitivity
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ops_delta: dict[str, int] = field(default_factory=dict)
    # per block params and shapes before/after (compiler.inspection.block_params), recorded only
    # when the pass changed the shape of a parameter it kept
    blocks_before: dict[str, dict] | None = None
    blocks_after: dict[str, dict] | None = None
    # perplexity before and after the pass ({"before", "after", "data"}), when measured
    # (compiler.report_capture.PassPerplexity)
    perplexity: dict[str, Any] | None = None
    # what the HTML report draws: block graph diff, activation ranges, quantization error,
    # kept variance (compiler.report_capture.ReportCapture; None when not captured)
    details: dict[str, Any] | None = None


@dataclass
class Report:
    """The compile report: one record per pass plus global facts."""

    records: list[PassRecord] = field(default_factory=list)
    model: str = ""
    calibration: str = "none"
    total_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "calibration": self.calibration,
            "total_seconds": self.total_seconds,
            "extra": self.extra,
            "records": [asdict(r) for r in self.records],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(
            records=[PassRecord(**r) for r in d.get("records", [])],
            model=d.get("model", ""),
            calibration=d.get("calibration", "none"),
            total_seconds=d.get("total_seconds", 0.0),
            extra=d.get("extra", {}),
        )

    def to_html(self, path: str | os.PathLike) -> Path:
        """Write the report as one self-contained HTML file (:mod:`compiler.html_report`):
        per pass its table row, the block graph before/after with the change marked, activation
        ranges, quantization error, kept variance. Written atomically.

        Raises:
            ReportError: the report has no captured per-pass data, or matplotlib is missing.
        """
        from compiler.html_report import write_html

        return write_html(self, path)

    def table(self) -> str:
        """Render as a fixed-width table: pass, seconds, calibration sweeps, nodes and params
        before/after, drift, stats."""
        head = ["#", "pass", "kind", "sec", "sweeps", "nodes", "params", "drift", "stats"]
        rows = [head]
        for r in self.records:
            if r.skipped:
                rows.append([str(r.index), r.spec, "skipped", "-", "-", "-", "-", "-", ""])
                continue
            stats = ", ".join(f"{k}={_fmt(v)}" for k, v in r.stats.items() if v not in (0, None, "", []))
            rows.append([
                str(r.index),
                r.spec,
                "exact" if r.exact else "lossy",
                f"{r.seconds:.2f}",
                str(r.sweeps),
                f"{r.nodes_before}->{r.nodes_after}",
                f"{_human(r.params_before)}->{_human(r.params_after)}",
                "-" if r.drift is None else f"{r.drift:.2e}",
                stats,
            ])
        widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
        lines = []
        for j, row in enumerate(rows):
            cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
            lines.append("  ".join(cells).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  -----")
        lines.append(f"total {self.total_seconds:.2f}s; model {self.model}; calibration {self.calibration}")
        notes = [(r.spec, n) for r in self.records for n in r.notes]
        if notes:
            lines.append("notes:")
            lines += [f"  [{spec}] {n}" for spec, n in notes[:50]]
            if len(notes) > 50:
                lines.append(f"  ... {len(notes) - 50} more notes (see report.json)")
        return "\n".join(lines)

    def blocks_table(self) -> str:
        """Per pass that changed parameter shapes: each block's params and shapes before/after
        ("" when no pass did)."""
        from compiler.inspection import block_changes

        lines = []
        for r in self.records:
            if r.skipped or r.blocks_before is None or r.blocks_after is None:
                continue
            lines.append(f"{r.index} {r.spec}:")
            lines += [f"  {line}" for line in block_changes(r.blocks_before, r.blocks_after)]
        return "\n".join(lines)

    def diff_table(self) -> str:
        """Per-pass change of op counts (which ops each pass added or removed)."""
        lines = []
        for r in self.records:
            if r.skipped or not r.ops_delta:
                continue
            delta = ", ".join(f"{k} {v:+d}" for k, v in sorted(r.ops_delta.items()))
            lines.append(f"{r.index:>2} {r.spec}: {delta}")
        return "\n".join(lines) if lines else "(no pass changed the op counts)"

    def __str__(self) -> str:
        blocks = self.blocks_table()
        if not blocks:
            return self.table()
        return self.table() + "\nparameters and shapes per block:\n" + blocks


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)

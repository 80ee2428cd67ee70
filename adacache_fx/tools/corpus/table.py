"""The corpus results as a Markdown table and a CSV file."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, fields

from .runner import Result


def result_label(r: Result) -> str:
    if r.status == "fail":
        return f"fail: {r.stage}" + (f" ({r.phase})" if r.phase else "")
    return r.status


def metric_is_zero(r: Result) -> bool:
    """Every measured metric 0: the output does not move with the timestep, a skip proves nothing."""
    measured = [m for m in (r.metrics or []) if m is not None]
    return bool(measured) and all(m == 0 for m in measured)


def computed_label(r: Result) -> str:
    if r.computed is None:
        return ""
    label = f"{len(r.computed)}/{r.num_steps}: " + ",".join(map(str, r.computed))
    return label + " (metric 0)" if metric_is_zero(r) else label


def state_label(r: Result) -> str:
    if not r.state_checked:
        return ""
    if r.state_changes:
        return f"changed ({len(r.state_changes)})"
    return "unchanged" + (f" (eager changes {len(r.eager_only_changes)})" if r.eager_only_changes else "")


def diff_label(value: float | None) -> str:
    return "" if value is None else ("0" if value == 0 else f"{value:.2g}")


def repeat_label(r: Result) -> str:
    if r.repeat_ok is None:
        return ""
    return ("yes" if r.repeat_ok else "no") + " / " + ("yes" if r.reset_ok else "no" if r.reset_ok is False else "")


def compile_label(r: Result) -> str:
    if r.compile_graphs is None:
        return ""
    return f"{r.compile_graphs} graph, {r.compile_breaks} breaks, diff {diff_label(r.compile_diff)}"


def error_label(r: Result, width: int | None = 160) -> str:
    if r.status == "skip":
        text = r.error or ""
    elif r.error is None:
        return ""
    else:
        text = f"{r.error_class}: {r.error}" if r.error_class else r.error
    text = text.replace("|", "\\|")
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def onnx_label(r: Result) -> str:
    if r.onnx_status is None:
        return ""
    if r.onnx_status == "pass":
        return f"pass, same steps, diff {diff_label(r.onnx_diff)}"
    detail = f"{r.onnx_error}" if r.onnx_error else f"steps {r.onnx_steps}, diff {diff_label(r.onnx_diff)}"
    return f"{r.onnx_status}: {detail}".replace("|", "\\|")[:200]


def markdown(results: list[Result], with_compile: bool = False, with_onnx: bool = False) -> str:
    header = ["configuration", "class", "video", "result", "never-skip max diff", "state after capture",
              "computed steps (default)", "repeat / reset", "error", "where (diffusers 0.42.1)", "s"]
    if with_onnx:
        header.insert(8, "ONNX Runtime (exported, same steps, max diff)")
    if with_compile:
        header.insert(8, "compile")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        row = [r.name, f"`{r.cls}`", "yes" if r.video else "", result_label(r), diff_label(r.never_skip_diff),
               state_label(r), computed_label(r), repeat_label(r), error_label(r),
               f"`{r.where}`" if r.where else "", f"{r.seconds:.1f}"]
        if with_onnx:
            row.insert(8, onnx_label(r))
        if with_compile:
            row.insert(8, compile_label(r))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    skipping = sum(1 for r in results if r.computed is not None and len(r.computed) < r.num_steps)
    parts = [f"{counts.get(s, 0)} {s}" for s in ("pass", "fail", "skip", "timeout", "crash") if counts.get(s)]
    text = (f"{len(results)} configurations: " + ", ".join(parts)
            + f"; the default policy computed fewer than N steps on {skipping}")
    exported = [r for r in results if r.onnx_status is not None]
    if exported:
        passed = sum(1 for r in exported if r.onnx_status == "pass")
        text += f"; ONNX Runtime: {passed} of {len(exported)} exported and ran with the same steps"
    return text


def to_csv(results: list[Result]) -> str:
    names = [f.name for f in fields(Result)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = asdict(r)
        for key, value in row.items():
            if isinstance(value, list):
                row[key] = " ".join("-" if v is None else str(v) for v in value) if key != "state_changes" \
                    and key != "warnings" and key != "eager_only_changes" else "; ".join(value)
        writer.writerow(row)
    return out.getvalue()

"""The last step of ``make bench``: every target of the benchmarks on one page.

Reads what the benchmarks wrote (``compress-demo.json``, ``triton-e2e.json``,
``pipeline-cost.json``) and writes ``bench/results/bench.md``: each target, its measured value and
verdict, with a link to the page that shows how it was measured. A benchmark that has not run is
listed as missing, not as met. Exit status 2 when any target is missing or not met.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
SOURCES = {
    "compress-demo": "compression techniques, peer baseline, cost and compute",
    "triton-e2e": "Triton end to end vs in-process ONNX Runtime",
    "pipeline-cost": "optimize_model wall time and memory per task",
}
COMPRESS_LABELS = {
    "interleaved_speedup": ("promoted vs FP32 PyTorch teacher: lower p50 latency at batch 1", ">= {t}x", "{m:.1f}x"),
    "size_reduction": ("promoted vs teacher: smaller", ">= {t}x", "{m:.1f}x"),
    "accuracy_retention": ("promoted vs teacher: accuracy kept", ">= {t:.0%}", "{m:.1%}"),
    "speedup_vs_optimum": ("promoted vs Optimum dynamic-INT8 teacher: lower p50 latency", ">= {t}x", "{m:.1f}x"),
    "accuracy_points_below_optimum": ("promoted vs Optimum: accuracy points below", "<= {t}", "{m:.1f}"),
}


def load(results: Path, stem: str) -> dict | None:
    path = results / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def target_lines(results: Path) -> list[dict]:
    lines = []
    compress = load(results, "compress-demo")
    if compress is None:
        lines.append({"what": "compression targets", "source": "compress-demo", "missing": True})
    else:
        for key, check in compress["targets"].items():
            label, target, measured = COMPRESS_LABELS.get(key, (key, "{t}", "{m:.3f}"))
            value = measured.format(m=check["measured"])
            if "interval_95" in check:
                low, high = check["interval_95"]
                value += f" (95% interval {low:.1f} to {high:.1f})"
            if "middle_half" in check:
                low, high = check["middle_half"]
                value += f" (middle half of rounds {low:.1f} to {high:.1f})"
            lines.append({"what": label, "target": target.format(t=check["target"]), "measured": value,
                          "met": check["met"], "source": "compress-demo"})
    triton = load(results, "triton-e2e")
    if triton is None:
        lines.append({"what": "Triton end to end", "source": "triton-e2e", "missing": True})
    else:
        check = triton["target"]
        lines.append({"what": "Triton end to end throughput vs in-process ONNX Runtime (ensemble, best)",
                      "target": f">= {check['target']:.0%}", "measured": f"{check['measured']:.0%}",
                      "met": check["met"], "source": "triton-e2e"})
    cost = load(results, "pipeline-cost")
    if cost is None:
        lines.append({"what": "optimize_model wall time", "source": "pipeline-cost", "missing": True})
    else:
        check = cost["target"]
        measured = "unknown" if check["measured"] is None else f"{check['measured'] / 60:.1f} min"
        lines.append({"what": "full optimize_model on the demo profile", "target":
                      f"< {check['target_seconds'] // 60} min", "measured": measured, "met": check["met"],
                      "source": "pipeline-cost"})
    return lines


def markdown(lines: list[dict]) -> str:
    out = ["# Benchmarks: every target", "",
           "Written by `make bench` from the figures the benchmarks measured in their last run on this machine "
           "(ratios measured in one run each). Details and method on each linked page.", "",
           "| target | required | measured | verdict | page |", "|---|---|---|---|---|"]
    for line in lines:
        page = f"[{line['source']}.md]({line['source']}.md)"
        if line.get("missing"):
            out.append(f"| {line['what']} | | not measured | **MISSING** | {page} |")
            continue
        verdict = "met" if line["met"] else "NOT met"
        out.append(f"| {line['what']} | {line['target']} | {line['measured']} | **{verdict}** | {page} |")
    out += ["", "Pages:", ""] + [f"- [{stem}.md]({stem}.md): {what}" for stem, what in SOURCES.items()] + [""]
    return "\n".join(out)


def main(results: Path = RESULTS_DIR) -> int:
    lines = target_lines(results)
    page = markdown(lines)
    (results / "bench.md").write_text(page)
    print(page)
    return 0 if all(line.get("met") for line in lines) else 2


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR))

"""The readable report of one optimize_model run, from its ``summary.json``: a Markdown page, the
same as HTML, and a latency/accuracy Pareto plot. All three are logged to the run's MLflow parent
run, where reviewers look at candidates.

Figures are the run's own measurements (batch-1 latency percentiles, throughput at batch 32,
size, peak memory) relative to the FP32 PyTorch teacher of the same run. "Cost" is compute per
text: the cores a text keeps busy, so at a fixed load the cost ratio is the inverse of the
throughput ratio on the same machine.
"""

from __future__ import annotations

import html
from pathlib import Path

from monitoring.stats import wilson_interval
from tasks.recipe import REFERENCE_CANDIDATE

REPORT_FILES = ("report.md", "report.html", "pareto.png")


def version_of(summary: dict, candidate: str) -> str:
    """The candidate's MLflow version as the report shows it ("-" when it was not registered); the
    reference teacher's is marked as such (it is never gated or served)."""
    if candidate == REFERENCE_CANDIDATE and summary.get("reference_version"):
        return f"{summary['reference_version']} (reference)"
    return summary["versions"].get(candidate) or "-"


def candidate_rows(summary: dict) -> list[dict]:
    """One row per candidate with its ratios against the PyTorch teacher, in the run's order."""
    reference = summary["candidates"][REFERENCE_CANDIDATE]
    rows = []
    for name, metrics in summary["candidates"].items():
        throughput = metrics.get("throughput_per_s") or float("nan")
        rows.append({
            "name": name, "version": version_of(summary, name),
            "accuracy": metrics["accuracy"], "retention": metrics["accuracy"] / reference["accuracy"],
            "macro_f1": metrics.get("macro_f1", float("nan")),
            "size_mb": metrics["size_bytes"] / 1e6, "smaller": reference["size_bytes"] / metrics["size_bytes"],
            "p50": metrics["latency_p50_ms"], "p95": metrics["latency_p95_ms"],
            "p99": metrics.get("latency_p99_ms", float("nan")),
            "faster": reference["latency_p50_ms"] / metrics["latency_p50_ms"],
            "throughput": throughput,
            "cost_reduction": 1.0 - reference.get("throughput_per_s", float("nan")) / throughput,
            "peak_mb": metrics.get("peak_memory_mb", float("nan")),
            "gates": _gate_verdict(summary["gates"].get(name)),
        })
    return rows


def _score(value: float) -> str:
    """A metric to four places, "-" where the summary has none (written before it was measured)."""
    return "-" if value != value else f"{value:.4f}"  # NaN is the one value unequal to itself


def _gate_verdict(checks: list[dict] | None) -> str:
    if checks is None:
        return "not gated (reference)"
    failed = [f"{check['name']}: {check['detail']}" for check in checks if check["decision"] != "pass"]
    return "pass" if not failed else "FAIL: " + "; ".join(failed)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both latency (lower) and accuracy (higher),
    fastest first."""
    front = [name for name, (latency, accuracy) in points.items()
             if not any(other_latency <= latency and other_accuracy >= accuracy
                        and (other_latency, other_accuracy) != (latency, accuracy)
                        for other_latency, other_accuracy in points.values())]
    return sorted(front, key=lambda name: points[name][0])


def _outcome(summary: dict) -> str:
    promotion = summary["promotion"]
    if promotion["status"] == "success":
        info = promotion["info"]
        return (f"Promoted **{summary['winner']}**: MLflow {info['registered_model']} version {info['mlflow_version']} "
                f"(alias `{info['alias']}`), Triton {info['triton_model']} version "
                f"{int(promotion['metrics']['triton_version'])}.")
    return f"Nothing promoted: {promotion.get('reason') or promotion['status']}. The champion stays."


def _switched_off_line(summary: dict) -> str:
    """Which candidates the run's params switched off (not built, evaluated or registered), and why."""
    off = summary.get("switched_off") or {}  # absent from summaries written before the switches existed
    if not off:
        return "Every candidate was built: no technique was switched off."
    return "Switched off (not built, evaluated or registered): " + "; ".join(
        f"{name} ({reason})" for name, reason in off.items()) + "."


def _champion_line(champion: dict | None) -> str:
    if not champion:
        return "No champion was serving before this run."
    if champion.get("accuracy") is None:
        return f"The serving champion could not be scored on this run's data: {champion['note']}."
    return (f"Serving champion before this run: accuracy {champion['accuracy']:.4f} on this run's test split "
            f"({champion['note']}).")


def _statistics_line(summary: dict) -> str:
    """The winner's accuracy with its 95% interval, and how it compared with the champion on the same texts."""
    winner = summary.get("winner")
    if not winner:
        return "No winner: see each candidate's gates."
    metrics = summary["candidates"][winner]
    texts = int(metrics.get("test_rows", 0))
    low, high = wilson_interval(round(metrics["accuracy"] * texts), texts)
    line = f"{winner}: accuracy {metrics['accuracy']:.4f} (95% interval {low:.4f} to {high:.4f}, {texts} test texts)"
    champion = next((check for check in summary["gates"].get(winner, []) if check["name"] == "champion_regression"),
                    None)
    return line + (f"; against the champion: {champion['detail']}." if champion else "; no champion to compare with.")


def primary_line(summary: dict) -> str:
    """Which metric the gates and the winner rule judged (accuracy for summaries written before the choice)."""
    metric = summary.get("primary_metric", "accuracy")
    return (f"Primary metric: `{metric}` (the accuracy gates, the champion comparison and the winner rule judge it; "
            "param `primary_metric`).")


def teacher_warning(summary: dict) -> str | None:
    """A warning when a candidate beats its own teacher beyond the noise (the lower end of the paired
    comparison's 95% interval above zero): the teacher is under-trained, and every gate that measures
    candidates against it asks too little."""
    better = {name: found for name, found in (summary.get("versus_teacher") or {}).items() if found["low"] > 0}
    if not better:
        return None
    metric = summary.get("primary_metric", "accuracy")
    return ("**Warning: the teacher is beaten beyond the noise** by " + "; ".join(
        f"{name} ({metric} {found['difference']:+.4f}, 95% interval {found['low']:+.4f} to {found['high']:+.4f}, "
        f"{found['test']})" for name, found in better.items())
        + ". The teacher looks under-trained: fine-tune it longer (param `epochs`) before trusting the "
          "teacher-relative gate.")


def per_class_lines(summary: dict) -> list[str]:
    """The per-class table (precision, recall, F1, support) of the winner and the teacher, as Markdown."""
    per_class = summary.get("per_class") or {}
    shown = [name for name in (summary.get("winner"), REFERENCE_CANDIDATE) if name and name in per_class]
    if not shown:
        return []
    header = "| class | support | " + " | ".join(f"{name} {what}" for name in shown
                                                for what in ("precision", "recall", "F1")) + " |"
    lines = [f"Per class on the test split ({', '.join(shown)}):", "", header,
             "|" + "---|" * (2 + 3 * len(shown))]
    for index, row in enumerate(per_class[shown[0]]):
        cells = [f"{per_class[name][index][key]:.3f}" for name in shown for key in ("precision", "recall", "f1")]
        lines.append(f"| {row['label']} | {row['support']} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict) -> str:
    rows = candidate_rows(summary)
    lines = [
        f"# optimize_model run `{summary['run_id']}`", "",
        _outcome(summary), "",
        _champion_line(summary.get("champion_before")), "",
        _statistics_line(summary), "",
        primary_line(summary), "",
        *([warning, ""] if (warning := teacher_warning(summary)) else []),
        _switched_off_line(summary), "",
        "| candidate | MLflow version | accuracy | macro-F1 | retention | size MB | smaller | p50 ms | p95 ms | "
        "p99 ms | faster (p50) | texts/s @32 | cost per text | peak MB | gates |",
        "|" + "---|" * 15,
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['version']} | {row['accuracy']:.4f} | {_score(row['macro_f1'])} | "
            f"{row['retention']:.1%} | "
            f"{row['size_mb']:.1f} | {row['smaller']:.1f}x | {row['p50']:.2f} | {row['p95']:.2f} | {row['p99']:.2f} | "
            f"{row['faster']:.1f}x | {row['throughput']:.0f} | {-row['cost_reduction']:+.0%} | {row['peak_mb']:.0f} | "
            f"{row['gates']} |")
    points = {row["name"]: (row["p50"], row["accuracy"]) for row in rows}
    lines += ["", "Ratios are against the FP32 PyTorch teacher of this run; cost per text is the inverse of "
              "throughput on the same cores.", "",
              f"Pareto front (no candidate is both faster and more accurate): {', '.join(pareto_front(points))}.", "",
              *per_class_lines(summary), "",
              "![latency vs accuracy](pareto.png)", ""]
    return "\n".join(lines)


def html_page(summary: dict) -> str:
    rows = candidate_rows(summary)
    cells = []
    for row in rows:
        failed = row["gates"].startswith("FAIL")
        cells.append(
            "<tr>" + "".join(f"<td>{html.escape(str(value))}</td>" for value in (
                row["name"], row["version"], f"{row['accuracy']:.4f}", _score(row["macro_f1"]),
                f"{row['retention']:.1%}", f"{row['size_mb']:.1f}",
                f"{row['smaller']:.1f}x", f"{row['p50']:.2f}", f"{row['p95']:.2f}", f"{row['p99']:.2f}",
                f"{row['faster']:.1f}x", f"{row['throughput']:.0f}", f"{-row['cost_reduction']:+.0%}",
                f"{row['peak_mb']:.0f}"))
            + f"<td class=\"{'fail' if failed else 'pass'}\">{html.escape(row['gates'])}</td></tr>")
    header = "".join(f"<th>{name}</th>" for name in (
        "candidate", "MLflow version", "accuracy", "macro-F1", "retention", "size MB", "smaller", "p50 ms", "p95 ms", "p99 ms",
        "faster (p50)", "texts/s @32", "cost per text", "peak MB", "gates"))
    outcome = html.escape(_outcome(summary)).replace("**", "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>optimize_model {html.escape(summary['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:right}}td:first-child,td:last-child{{text-align:left}}.fail{{color:#b00}}.pass{{color:#070}}
</style></head><body>
<h1>optimize_model run {html.escape(summary['run_id'])}</h1>
<p>{outcome}</p>
<p>{html.escape(_statistics_line(summary))}</p>
<p>{html.escape(primary_line(summary))}</p>
{f"<p class=fail>{html.escape(warning.replace('**', ''))}</p>" if (warning := teacher_warning(summary)) else ""}
<p>{html.escape(_switched_off_line(summary))}</p>
<table><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(cells)}
</tbody></table>
<p>Ratios are against the FP32 PyTorch teacher of this run; cost per text is the inverse of throughput on the
same cores.</p>
{per_class_html(summary)}
<img src="pareto.png" alt="latency vs accuracy of every candidate">
</body></html>
"""


def per_class_html(summary: dict) -> str:
    """The per-class table of the winner and the teacher as an HTML table (empty without one)."""
    lines = per_class_lines(summary)
    if not lines:
        return ""
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:] if not line.startswith("|-")]
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<p>{html.escape(lines[0])}</p><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pareto_plot(summary: dict, target: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = candidate_rows(summary)
    points = {row["name"]: (row["p50"], row["accuracy"]) for row in rows}
    front = pareto_front(points)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, (name, (latency, accuracy)) in enumerate(sorted(points.items(), key=lambda item: item[1])):
        winner = name == summary.get("winner")
        axes.scatter(latency, accuracy, s=80 if winner else 40, color="tab:green" if winner else "tab:blue",
                     zorder=3)
        axes.annotate(name + (" (promoted)" if winner else ""), (latency, accuracy), textcoords="offset points",
                      xytext=(5, 4 if index % 2 == 0 else -11), fontsize=8)  # neighbours alternate above/below
    axes.plot([points[name][0] for name in front], [points[name][1] for name in front], "--", color="tab:orange",
              label="Pareto front", zorder=2)
    axes.set_xscale("log")
    axes.set_xlabel("batch-1 latency p50 (ms, log scale)")
    axes.set_ylabel("accuracy (test split)")
    axes.set_title(f"optimize_model {summary['run_id']}", fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def write_reports(summary: dict, folder: Path) -> list[Path]:
    """``report.md``, ``report.html`` and ``pareto.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(markdown(summary))
    (folder / "report.html").write_text(html_page(summary))
    pareto_plot(summary, folder / "pareto.png")
    return [folder / name for name in REPORT_FILES]

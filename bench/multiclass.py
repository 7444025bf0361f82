"""``make bench-multiclass``: the pipeline end to end on an imbalanced multi-class data set, at a small
size, with the teacher fine-tuned at the old default (1 epoch) and at the new one (3 epochs).

Each arm runs the optimize_model recipe's own CPU stages (``bench.compress.run_recipe``: fine-tune,
export, quantize, distill, prune) in a run directory of its own, evaluates every candidate as the
``evaluate`` task does, and judges them with the gate task's own functions
(``tasks.decisions.judge_candidates``, ``choose_winner``, ``quality_record``) under both primary
metrics; nothing is registered or served (no MLflow, no Triton). Writes
``bench/results/multiclass.{json,md}`` and each arm's report (``report.md``) in the work folder.

    python -m bench.multiclass                      # demo:reuters8, 480 training texts (~30 min on 2 cores)
    python -m bench.multiclass --profile tiny       # a tiny random model on generated 5-class texts (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.compress import RESULTS_DIR, pipeline_run, record, run_recipe
from tasks.recipe import REFERENCE_CANDIDATE

log = logging.getLogger("bench.multiclass")

PRIMARY_METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning the teacher; everything else is the same in every arm."""

    name: str
    teacher_epochs: float


ARMS = (Arm("old default: teacher 1 epoch", 1.0), Arm("new default: teacher 3 epochs", 3.0))


@dataclass(frozen=True)
class Profile:
    name: str
    max_train: int
    max_eval: int
    distill_epochs: float
    prune_epochs: float
    max_length: int
    learning_rate: float = 5e-5


PROFILES = {
    "reuters8": Profile("reuters8", max_train=480, max_eval=200, distill_epochs=2.0, prune_epochs=1.0, max_length=128),
    "tiny": Profile("tiny", max_train=0, max_eval=0, distill_epochs=3.0, prune_epochs=1.0, max_length=32,
                    learning_rate=5e-3),
}


def tiny_inputs(work: Path, classes: int = 5) -> tuple[str, str]:
    """A tiny random teacher and generated texts of ``classes`` imbalanced topics (no download)."""
    import random

    import pandas as pd

    from tasks.modeling import TINY_WORDS, build_tiny_model

    labels = tuple(f"topic{index}" for index in range(classes))
    teacher = build_tiny_model(work / "inputs" / "tiny-bert", labels=labels)
    rng, rows = random.Random(1), []
    for index, label in enumerate(labels):
        marker = TINY_WORDS[index * 2: index * 2 + 2]
        for _ in range(160 // (index + 1)):  # 160, 80, 53, 40, 32 texts: imbalanced
            words = [rng.choice(marker) for _ in range(2)] + rng.sample(TINY_WORDS[20:], 5)
            rng.shuffle(words)
            rows.append((" ".join(words), label))
    csv = work / "inputs" / "topics.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(csv, index=False)
    return str(teacher), str(csv)


def reuters_inputs() -> tuple[str, str]:
    from opsctl.settings import StackSettings
    from tasks.assets import fetch_dataset, fetch_demo_assets

    cache = StackSettings.from_env(os.environ).assets_cache
    teacher = fetch_demo_assets(cache, progress=log.info).teacher_dir
    return str(teacher), str(fetch_dataset("reuters8", cache, progress=log.info))


def run_arm(profile: Profile, arm: Arm, work: Path, teacher: str, data_source: str) -> dict:
    """Build, evaluate and judge every CPU candidate of one arm; returns its record."""
    from tasks.pipeline import config_from_params, evaluate_candidates, prepare_data

    config = config_from_params({
        "data_source": data_source, "teacher": teacher, "max_train": profile.max_train,
        "max_eval": profile.max_eval, "epochs": arm.teacher_epochs, "learning_rate": profile.learning_rate,
        "max_length": profile.max_length, "distill_epochs": profile.distill_epochs,
        "prune_epochs": profile.prune_epochs, "target": "cpu", "max_p95_latency_ms": 0.0,
    })
    settings, run_id = pipeline_run(work)
    steps: dict[str, dict] = {}
    started = time.perf_counter()
    data = record(steps, "data", prepare_data(settings, config, run_id))
    run_recipe(settings, config, run_id, data, steps)
    evaluations = evaluate_candidates(settings, config, run_id, data, steps)
    return {"arm": arm.name, "teacher_epochs": arm.teacher_epochs, "seconds": time.perf_counter() - started,
            "split_sizes": data["metrics"], "finetune": steps["finetune_teacher"]["metrics"],
            "candidates": {name: value["metrics"] for name, value in evaluations.items()},
            "decisions": {metric: judge(config, evaluations, metric, work) for metric in PRIMARY_METRICS}}


def judge(config, evaluations: dict[str, dict], metric: str, work: Path) -> dict:
    """The gate task's decision under ``metric`` (no champion: a first run), with its report."""
    from dataclasses import replace

    from tasks import decisions, report
    from tasks import gate as gate_step

    gate = replace(config.gate, primary_metric=metric)
    names = [name for name in evaluations if name != REFERENCE_CANDIDATE]
    gates = decisions.judge_candidates(gate, evaluations, names, None)
    winner = decisions.choose_winner({name: (gate_step.passed(checks), evaluations[name]["metrics"])
                                      for name, checks in gates.items()}, noise_margin=gate.latency_noise_margin,
                                     metric=metric)
    summary = {
        "run_id": f"{work.name}-{metric}", "versions": {}, "reference_version": None, "winner": winner,
        "candidates": {name: value["metrics"] for name, value in evaluations.items()}, "primary_metric": metric,
        "gates": {name: [{"name": c.name, "decision": c.decision.value, "detail": c.detail} for c in checks]
                  for name, checks in gates.items()},
        "promotion": {"status": "skipped", "reason": "a benchmark: nothing is registered or served"},
        "champion_before": None, "switched_off": {},
    } | decisions.quality_record(evaluations, metric)
    report.write_reports(summary, work / f"report-{metric}")
    return summary


def markdown(results: dict) -> str:
    from tasks import report

    lines = [f"# Multi-class end to end: {results['data']}", "",
             f"Written by `python -m bench.multiclass --profile {results['profile']}` on {results['machine']}. "
             "Each arm runs the optimize_model recipe's CPU stages, evaluates every candidate on the same "
             "test split and judges them with the gate task's functions (no champion: a first run; no latency "
             "budget), under each primary metric. Only the teacher's fine-tuning epochs differ.", ""]
    for arm in results["arms"]:
        sizes = ", ".join(f"{key.removesuffix('_rows')} {int(value)}" for key, value in arm["split_sizes"].items())
        lines += [f"## {arm['arm']}", "",
                  f"Splits: {sizes}. Teacher fine-tuning: {int(arm['finetune']['steps'])} steps, validation "
                  f"accuracy {arm['finetune']['val_accuracy']:.4f}. Arm wall time {arm['seconds'] / 60:.1f} min.", "",
                  "| candidate | accuracy | macro-F1 |", "|---|---|---|"]
        lines += [f"| {name} | {metrics['accuracy']:.4f} | {metrics['macro_f1']:.4f} |"
                  for name, metrics in arm["candidates"].items()]
        for metric, summary in arm["decisions"].items():
            lines += ["", f"Primary metric `{metric}`: winner **{summary['winner'] or 'none'}**."]
        summary = arm["decisions"]["macro_f1"]
        lines += ["", *report.per_class_lines(summary), "", report.teacher_warning(summary) or
                  "No candidate beats the teacher beyond the noise (paired comparison on the same texts).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="reuters8")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-multiclass"))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = PROFILES[args.profile]
    teacher, data_source = tiny_inputs(args.work) if profile.name == "tiny" else reuters_inputs()
    arms = [run_arm(profile, arm, args.work / f"arm-{int(arm.teacher_epochs)}-epochs", teacher, data_source)
            for arm in ARMS]
    import platform

    results = {"profile": profile.name, "data": "demo:reuters8" if profile.name == "reuters8" else "generated topics",
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "arms": arms}
    suffix = "" if profile.name == "reuters8" else f"-{profile.name}"
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"multiclass{suffix}.json").write_text(json.dumps(results, indent=2, default=str))
    (args.results / f"multiclass{suffix}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make bench-compress``: every compression technique and combination, built from one fine-tuned
teacher and measured the same way in one run, as a table (JSON + Markdown).

Ratios are what this benchmark reports: the machine is shared and noisy, so every row is measured
in the same run, one after another, each in a fresh process (for its peak memory), on the same
held-out texts sent one at a time (batch 1) and in batches that fill the cores. Batch-1 latency is
then measured again interleaved (``bench.latency_workers``): the speed-up of record is the median
over rounds of the per-round ratio, so a noisy spell cannot decide it.

    python -m bench.compress --profile demo      # the demo assets (MiniLM teacher, IMDB reviews)
    python -m bench.compress --profile tiny      # a tiny random model on generated texts (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench import compute, latency_workers
from bench.latency_workers import InterleavedLatency
from tasks.recipe import MODEL_INPUT, OPTIMIZE_MODEL, Stage, Step, Target
from tasks.results import ModelFormat, StepResult, StepStatus

if TYPE_CHECKING:
    from tasks.config import ExportConfig, PipelineConfig
    from tasks.settings import PipelineSettings

log = logging.getLogger("bench.compress")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
# The rows of the pipeline's candidates are named as the optimize_model recipe names them
# (tasks/recipe.py); the benchmark's own rows have names no candidate has.
REFERENCE_ROW = "teacher_pytorch"
PROMOTED_ROW = "pruned_int8"
OPTIMUM_ROW = "optimum_int8"
SPARSE_INT8_ROW = "sparse_int8"
TENSORRT_ROW, TENSORRT_STEP = "tensorrt_fp16", "compile_tensorrt_fp16"
# The fine-tuned teacher's folder in the work dir (the run directory of the recipe's stages).
TEACHER_DIR = OPTIMIZE_MODEL.producer(REFERENCE_ROW).output
OPTIMUM_PYTHON = REPO_ROOT / ".venv-optimum" / "bin" / "python"
# The compression issue's targets for the promoted combination vs the FP32 PyTorch teacher.
# p50 speed-up of record: the interleaved one (median over rounds), see ``table``.
TARGETS = {"interleaved_speedup": 8.0, "size_reduction": 6.0, "accuracy_retention": 0.97}
# The benchmark issue's targets against the peer baseline (Optimum dynamic INT8 teacher): speed-up
# (interleaved median, at least) and accuracy points below it (at most).
PEER_TARGETS = {"speedup_vs_optimum": 2.0, "accuracy_points_below_optimum": 1.0}
# Interleaved rounds by default, per worker: every worker takes every place of the rotating order
# this many times.
ROUNDS_PER_WORKER = 3
# These rows are also timed on one thread each, in workers of their own: one-thread latency has no
# slow spells here (``bench.latency_workers``), so these ratios are the steadiest of the run.
ONE_THREAD_ROWS = (REFERENCE_ROW, OPTIMUM_ROW, PROMOTED_ROW)
ONE_THREAD = "@1thread"


@dataclass(frozen=True)
class Profile:
    name: str
    max_train: int
    max_eval: int
    epochs: float
    batch_size: int
    learning_rate: float
    max_length: int
    distill_epochs: float
    prune_epochs: float
    sparsity: float
    calibration_samples: int
    warmup: int


PROFILES = {
    # ~25 minutes on 2 cores: 1,500 IMDB reviews, MiniLM-L6 teacher, 500 test reviews.
    "demo": Profile("demo", max_train=1500, max_eval=500, epochs=1.0, batch_size=32, learning_rate=1e-4,
                    max_length=128, distill_epochs=2.0, prune_epochs=1.0, sparsity=0.5, calibration_samples=128,
                    warmup=10),
    # A tiny random BERT on generated texts: checks the benchmark itself in about a minute.
    "tiny": Profile("tiny", max_train=0, max_eval=0, epochs=3.0, batch_size=16, learning_rate=5e-3, max_length=32,
                    distill_epochs=2.0, prune_epochs=2.0, sparsity=0.5, calibration_samples=32, warmup=1),
}


@dataclass(frozen=True)
class Row:
    """One measured model: its name, the technique chain that made it, where it is, its format."""

    name: str
    technique: str
    model_dir: Path | None
    model_format: ModelFormat | None
    skipped_reason: str = ""
    source: str = TEACHER_DIR  # the PyTorch model (folder in the work dir) whose arithmetic it does
    precision: str = "fp32"  # the ceiling it is read against: fp32 or int8


def tiny_inputs(work: Path) -> tuple[str, str]:
    """A tiny random teacher and a generated labelled CSV (no download)."""
    import pandas as pd

    from tasks.modeling import build_tiny_model, generate_texts

    teacher = build_tiny_model(work / "inputs" / "tiny-bert")
    texts, labels = generate_texts(400, seed=1)
    csv = work / "inputs" / "texts.csv"
    pd.DataFrame({"text": texts, "label": ["positive" if y else "negative" for y in labels]}).to_csv(csv, index=False)
    return str(teacher), str(csv)


def demo_inputs() -> tuple[str, str]:
    from opsctl.settings import StackSettings
    from tasks.assets import fetch_demo_assets

    assets = fetch_demo_assets(StackSettings.from_env(os.environ).assets_cache, progress=log.info)
    return str(assets.teacher_dir), str(assets.imdb_csv)


def pipeline_config(profile: Profile, teacher_source: str, data_source: str) -> PipelineConfig:
    """The optimize_model config of a run with the profile's settings as the DAG's params, every
    technique switched on (unstructured sparsity too, at the profile's sparsity), for the CPU: the GPU
    branch is the GPU benchmark's (bench/gpu.py)."""
    from tasks.pipeline import config_from_params

    return config_from_params({
        "data_source": data_source, "max_train": profile.max_train, "max_eval": profile.max_eval,
        "teacher": teacher_source, "epochs": profile.epochs, "batch_size": profile.batch_size,
        "learning_rate": profile.learning_rate, "max_length": profile.max_length,
        "distill_epochs": profile.distill_epochs, "prune_epochs": profile.prune_epochs,
        "sparsify": True, "sparsity": profile.sparsity, "sparsify_epochs": profile.prune_epochs, "target": "cpu",
    })


def pipeline_run(work: Path) -> tuple[PipelineSettings, str]:
    """Settings and run id whose run directory is ``work``: the recipe's stages write there."""
    from tasks.settings import PipelineSettings

    # run_stage reads only the run directory (and the assets cache, for demo: sources: the benchmark
    # passes paths it resolved itself); nothing is registered or served.
    settings = PipelineSettings(runs_dir=work.parent, mlflow_tracking_uri="", triton_url="",
                                triton_model_repository=work / "unused", assets_cache=work / "inputs")
    if settings.run_dir(work.name) != work:
        raise ValueError(f"--work {work}: name its last folder with letters, digits, '.', '_' or '-' only "
                         "(it is used as the pipeline's run id)")
    return settings, work.name


def record(steps: dict[str, dict], name: str, result: StepResult | dict) -> dict:
    """Keep a step's result (as a plain dict) under ``name`` in ``steps`` and log it."""
    result = result.to_dict() if isinstance(result, StepResult) else result
    steps[name] = result
    metrics = {key: round(value, 4) for key, value in list(result.get("metrics", {}).items())[:8]}
    log.info("%s: %s %s", name, result["status"], metrics)
    return result


def build_rows(profile: Profile, work: Path, teacher_source: str, data_source: str,
               steps: dict[str, dict]) -> list[Row]:
    """Build every model and return the rows to measure; ``steps`` collects each step's result.

    The pipeline's candidates are built by the optimize_model recipe's own stages (``run_recipe``),
    in ``work`` as the run directory; the benchmark's own variants from their outputs."""
    from tasks.pipeline import prepare_data

    config = pipeline_config(profile, teacher_source, data_source)
    settings, run_id = pipeline_run(work)
    data = record(steps, "data", prepare_data(settings, config, run_id))
    run_recipe(settings, config, run_id, data, steps)
    build_variants(profile, config, work, steps)
    return row_list(profile, work, steps)


def run_recipe(settings: PipelineSettings, config: PipelineConfig, run_id: str, data: dict,
               steps: dict[str, dict]) -> None:
    """Run every CPU stage of the optimize_model recipe, as the DAG does; results under the stage ids."""
    from tasks.pipeline import run_stage, stage_switched_off

    for stage in OPTIMIZE_MODEL.on(Target.CPU):
        reason = stage_switched_off(config, stage.id)
        if reason is not None:
            record(steps, stage.id, StepResult(step=stage.id, status=StepStatus.SKIPPED, reason=reason))
            continue
        upstream = {key: steps[upstream_id] for key, upstream_id in stage.inputs.items()}
        record(steps, stage.id, run_stage(settings, config, run_id, stage.id, data, upstream))


def build_variants(profile: Profile, config: PipelineConfig, work: Path, steps: dict[str, dict]) -> None:
    """The benchmark's own models, from the recipe's outputs in ``work``: other exports and
    precisions of the teacher, structured pruning of the teacher, INT8 of the sparse student, a
    TensorRT engine and the Optimum peer baseline."""
    from tasks import compile as compile_step
    from tasks import export, prune, quantize
    from tasks.config import CompileConfig, QuantizeConfig

    data_dir, length = work / "data", config.finetune.max_length
    teacher, onnx_fp32 = work / TEACHER_DIR, candidate_dir(work, "onnx_fp32")

    def export_to(name: str, model_dir: Path, export_config: ExportConfig) -> Path:
        record(steps, f"export_{name}", export.run(export_config, model_dir, data_dir, work / name, length))
        return work / name

    def quantize_to(name: str, onnx_dir: Path, quantize_config: QuantizeConfig) -> Path:
        record(steps, f"quantize_{name}", quantize.run(quantize_config, onnx_dir, data_dir, work / name, length))
        return work / name

    fused = export_to("onnx_fp32_fused", teacher, replace(config.export, optimize_graph=True))
    quantize_to("onnx_int8_per_tensor", onnx_fp32, replace(config.quantize, per_channel=False))
    quantize_to("onnx_fused_int8", fused, config.quantize)
    quantize_to("onnx_static_int8", onnx_fp32, QuantizeConfig.static_calibrated(samples=profile.calibration_samples))
    fp16 = quantize_to("onnx_fp16", onnx_fp32, QuantizeConfig.fp16())
    record(steps, "quantize_torch_int8", quantize.quantize_torch_dynamic(teacher, work / "teacher_torch_int8"))
    # The student's structured pruning (the recipe's prune section) applied to the teacher itself.
    record(steps, "prune_teacher_pruned", prune.run(config.prune, teacher, teacher, data_dir, work / "teacher_pruned"))
    teacher_pruned_onnx = export_to("teacher_pruned_onnx", work / "teacher_pruned", config.export)
    quantize_to("teacher_pruned_int8", teacher_pruned_onnx, config.quantize)
    quantize_to(SPARSE_INT8_ROW, candidate_dir(work, "sparse_onnx_fp32"), config.quantize)
    record(steps, TENSORRT_STEP, compile_step.run(CompileConfig(max_sequence=length, opt_sequence=length), fp16,
                                                  work / TENSORRT_ROW, precision="fp16"))
    record(steps, OPTIMUM_ROW, optimum_baseline(teacher, work / OPTIMUM_ROW))


def optimum_baseline(teacher: Path, out_dir: Path) -> StepResult:
    """Hugging Face Optimum's export + dynamic INT8 of the teacher, built in ``.venv-optimum``."""
    python = OPTIMUM_PYTHON
    if not python.exists():
        return StepResult(step="optimum_int8", status=StepStatus.SKIPPED,
                          reason=f"{python.relative_to(REPO_ROOT)} not found: run `make venv-optimum`")
    completed = subprocess.run([str(python), str(REPO_ROOT / "bench" / "optimum_baseline.py"), str(teacher),
                                str(out_dir)], capture_output=True, text=True, cwd=REPO_ROOT)
    if completed.returncode != 0:
        return StepResult(step="optimum_int8", status=StepStatus.FAILED,
                          reason=f"Optimum baseline failed: {completed.stderr.strip().splitlines()[-1:]}")
    return StepResult(step="optimum_int8", status=StepStatus.SUCCESS, uris={"model": str(out_dir)},
                      info=json.loads(completed.stdout.strip().splitlines()[-1]))


def candidate_dir(work: Path, candidate: str) -> Path:
    """Where the recipe's stage that makes ``candidate`` writes it in the run directory ``work``."""
    return work / OPTIMIZE_MODEL.producer(candidate).output


def pytorch_source(stage: Stage) -> Stage:
    """The stage that made the PyTorch model whose arithmetic ``stage``'s output does: follow the
    model inputs up through exports and quantizations, which only convert."""
    while stage.step in (Step.EXPORT, Step.QUANTIZE):
        stage = OPTIMIZE_MODEL.stage(stage.inputs[MODEL_INPUT])
    return stage


def not_built(steps: dict[str, dict], name: str) -> str:
    """Why the step ``name`` left no model to measure ("" when it did, or when ``steps`` does not know it)."""
    step = steps.get(name)
    if step is None or step["status"] == StepStatus.SUCCESS.value:
        return ""
    return step.get("reason") or f"{name} {step['status']}"


def technique_text(profile: Profile, stage: Stage, then: str = "") -> str:
    """The recipe's technique chain up to ``stage``, then ``then``, with the sparsity where it applies."""
    text = OPTIMIZE_MODEL.technique_chain(stage.id) + then
    if "sparsify" in OPTIMIZE_MODEL.techniques_needed(stage.id):
        text += f"; {profile.sparsity:.0%} of the encoder's weights zero"
    return text


def row_list(profile: Profile, work: Path, steps: dict[str, dict]) -> list[Row]:
    """Every measured model of a benchmark whose models are in ``work`` and whose step results are
    ``steps``: the pipeline's candidates (named by the recipe), then the benchmark's own variants."""
    return candidate_rows(profile, work, steps) + variant_rows(profile, work, steps)


def candidate_rows(profile: Profile, work: Path, steps: dict[str, dict]) -> list[Row]:
    """One row per CPU candidate of the optimize_model recipe, in recipe order, under the candidate's name."""
    rows = []
    for stage in (stage for stage in OPTIMIZE_MODEL.on(Target.CPU) if stage.candidate):
        technique = technique_text(profile, stage, then=" (PyTorch FP32 eager)"
                                   if stage.model_format is ModelFormat.PYTORCH else "")
        reason = not_built(steps, stage.id)
        place = ({"model_dir": None, "model_format": None, "skipped_reason": reason} if reason else
                 {"model_dir": work / stage.output, "model_format": stage.model_format})
        rows.append(Row(stage.candidate, technique, **place, source=pytorch_source(stage).output,
                        precision="int8" if stage.step is Step.QUANTIZE else "fp32"))
    return rows


def variant_rows(profile: Profile, work: Path, steps: dict[str, dict]) -> list[Row]:
    """The benchmark's own rows (``build_variants``): names that no candidate of the recipe has."""
    onnx, sparse_onnx = ModelFormat.ONNX, OPTIMIZE_MODEL.producer("sparse_onnx_fp32")

    def skippable(step: str, name: str, fmt: ModelFormat | None) -> dict:
        reason = not_built(steps, step)
        return {"model_dir": None, "model_format": None, "skipped_reason": reason} if reason else \
            {"model_dir": work / name, "model_format": fmt}

    return [
        Row("teacher_torch_int8", "PyTorch dynamic INT8 (torch.ao baseline)", work / "teacher_torch_int8",
            ModelFormat.PYTORCH_DYNAMIC_INT8, precision="int8"),
        Row(OPTIMUM_ROW, "Hugging Face Optimum: ONNX export + dynamic INT8 (peer baseline)",
            **skippable(OPTIMUM_ROW, OPTIMUM_ROW, onnx), precision="int8"),
        Row("onnx_fp32_fused", "ONNX Runtime FP32, attention/LayerNorm/GELU fused", work / "onnx_fp32_fused", onnx),
        Row("onnx_int8_per_tensor", "ONNX dynamic INT8 (per tensor, as Optimum's preset)", work / "onnx_int8_per_tensor",
            onnx, precision="int8"),
        Row("onnx_fused_int8", "ONNX fused + dynamic INT8", work / "onnx_fused_int8", onnx, precision="int8"),
        Row("onnx_static_int8", "ONNX static INT8 (calibrated, activation MatMuls FP32)", work / "onnx_static_int8",
            onnx, precision="int8"),
        Row("onnx_fp16", "ONNX FP16 (a GPU format; CPU timing for reference)", work / "onnx_fp16", onnx),
        Row("teacher_pruned_onnx", "structured pruning (33% heads, 60% FFN) > ONNX FP32", work / "teacher_pruned_onnx",
            onnx, source="teacher_pruned"),
        Row("teacher_pruned_int8", "structured pruning > ONNX dynamic INT8", work / "teacher_pruned_int8", onnx,
            source="teacher_pruned", precision="int8"),
        Row(SPARSE_INT8_ROW, technique_text(profile, sparse_onnx, then=" > dynamic INT8"), work / SPARSE_INT8_ROW,
            onnx, source=pytorch_source(sparse_onnx).output, precision="int8"),
        Row(TENSORRT_ROW, "ONNX FP16 > TensorRT engine (NVIDIA GPU)", **skippable(TENSORRT_STEP, TENSORRT_ROW, None),
            precision="fp16"),
    ]


def interleaved_latency(rows: list[Row], profile: Profile, data_dir: Path, rounds: int | None = None,
                        texts: int = 100) -> InterleavedLatency:
    """Batch-1 latency of every measurable row, interleaved in time, each model in its own worker
    process (``bench.latency_workers``): ratios per round, so a noisy spell cannot favour one row.
    The ONE_THREAD_ROWS are timed on one thread too (named ``row + ONE_THREAD``). ``rounds``
    defaults to ROUNDS_PER_WORKER per worker."""
    from tasks import splits as data_step

    sample = data_step.read_split(data_dir, "test")["text"].head(texts).tolist()
    measurable = [row for row in rows if row.model_format is not None]
    candidates = [latency_workers.Candidate(row.name, row.model_dir, row.model_format.value) for row in measurable]
    candidates += [latency_workers.Candidate(row.name + ONE_THREAD, row.model_dir, row.model_format.value, threads=1)
                   for row in measurable if row.name in ONE_THREAD_ROWS]
    rounds = ROUNDS_PER_WORKER * len(candidates) if rounds is None else rounds
    return latency_workers.measure(candidates, sample, profile.max_length, warmup=profile.warmup, rounds=rounds,
                                   progress=log.info)


def measure(rows: list[Row], profile: Profile, work: Path, data_dir: Path, isolate: bool) -> dict[str, dict]:
    """Evaluate every row the same way; a fresh process per row when ``isolate``."""
    from tasks import evaluate
    from tasks.config import EvaluateConfig

    config = EvaluateConfig(warmup=profile.warmup, max_length=profile.max_length)
    evaluate_row: Callable = evaluate.run_isolated if isolate else evaluate.run
    measured = {}
    for index, row in enumerate(rows, start=1):
        if row.model_format is None:
            log.info("[%d/%d] %s: SKIPPED (%s)", index, len(rows), row.name, row.skipped_reason or "not measurable here")
            continue
        started = time.monotonic()
        result = evaluate_row(config, row.name, row.model_dir, row.model_format, data_dir, work / "evaluation" / row.name)
        measured[row.name] = result.to_dict()
        log.info("[%d/%d] %s: accuracy %.4f p50 %.2f ms (%.0fs)", index, len(rows), row.name,
                 result.metrics["accuracy"], result.metrics["latency_p50_ms"], time.monotonic() - started)
    return measured


def compute_work(rows: list[Row], profile: Profile, work: Path) -> dict:
    """The machine's matrix-multiply ceilings and each source model's operations per text, on the
    batches the throughput measurement times (``bench.compute``)."""
    from tasks import splits as data_step
    from tasks.config import EvaluateConfig
    from tasks.evaluate import throughput_inputs
    from tasks.modeling import load_tokenizer

    config = EvaluateConfig(warmup=profile.warmup, max_length=profile.max_length)
    texts = data_step.read_split(work / "data", "test")["text"].tolist()
    batches = throughput_inputs(load_tokenizer(work / TEACHER_DIR), texts, config)
    sources = sorted({row.source for row in rows if row.model_format is not None})
    operations = {source: compute.operations_per_text(work / source, batches) for source in sources}
    log.info("operations per text: %s", {source: f"{value / 1e9:.2f} G" for source, value in operations.items()})
    teacher = json.loads((work / TEACHER_DIR / "config.json").read_text())
    tokens = sum(batch["input_ids"].size for batch in batches) // len(batches)
    ceilings = compute.ceilings(compute.model_shapes(teacher["hidden_size"], teacher["intermediate_size"], tokens))
    log.info("ceilings: FP32 %.0f GFLOP/s, INT8 %.0f GOP/s", ceilings["fp32_gops"], ceilings["int8_gops"])
    return {"ceilings": ceilings, "operations_per_text": operations}


def table(rows: list[Row], measured: dict[str, dict], latency: InterleavedLatency | None = None,
          compute_figures: dict | None = None) -> list[dict]:
    """One dict per row with its metrics and its ratios against the FP32 PyTorch teacher.

    Two batch-1 latencies: each model's evaluation, alone in its own process, one model after the
    other; and the interleaved rounds (each model in its own worker process, all models timed in
    turn, many short rounds). The speed-up of record is the interleaved one, the median over rounds
    of the per-round ratio: four sequential runs of this benchmark gave 10.3x, 6.3x, 11.4x and 8.4x
    for the same two models, because a noisy spell of this shared machine fell on one of them."""
    from tasks.onnx_model import compare_logits
    from tasks.predictions import read_logits

    reference = StepResult.from_dict(measured[REFERENCE_ROW])
    reference_logits = read_logits(Path(reference.uri("predictions")))
    ref = reference.metrics
    lines = []
    for row in rows:
        if row.name not in measured:
            lines.append({"name": row.name, "technique": row.technique, "status": "skipped",
                          "reason": row.skipped_reason})
            continue
        result = StepResult.from_dict(measured[row.name])
        m = dict(result.metrics)
        agreement = compare_logits(reference_logits, read_logits(Path(result.uri("predictions"))))
        lines.append({
            "name": row.name, "technique": row.technique, "status": "measured",
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "accuracy_retention": m["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan"),
            "teacher_label_agreement": agreement["label_agreement"],
            "size_mb": m["size_bytes"] / 1e6, "size_reduction": ref["size_bytes"] / m["size_bytes"],
            "latency_p50_ms": m["latency_p50_ms"], "latency_p95_ms": m["latency_p95_ms"],
            "latency_p99_ms": m["latency_p99_ms"], "p50_speedup": ref["latency_p50_ms"] / m["latency_p50_ms"],
            **_interleaved(latency, row.name, ref["latency_p50_ms"] / m["latency_p50_ms"]),
            "throughput_per_s": m.get("throughput_per_s", float("nan")),
            "throughput_gain": m.get("throughput_per_s", float("nan")) / ref.get("throughput_per_s", float("nan")),
            "peak_memory_mb": m.get("peak_memory_mb", float("nan")),
            "model_memory_mb": m.get("model_memory_mb", float("nan")),
        })
        line = lines[-1]
        # The reference text's "-75% latency / -85% cost" row: time saved per text at batch 1, and
        # cores (so cost) saved per text at full load, both against the teacher.
        line["latency_reduction"] = 1.0 - 1.0 / line["interleaved_speedup"]
        line["cost_reduction"] = 1.0 - 1.0 / line["throughput_gain"]
        if compute_figures:
            kind = "int8" if row.precision == "int8" else "fp32"  # FP16 on the CPU computes in FP32
            operations = compute_figures["operations_per_text"][row.source]
            line |= {"gops_per_text": operations / 1e9, "ceiling": kind,
                     **compute.achieved(operations, line["throughput_per_s"], compute_figures["ceilings"][f"{kind}_gops"])}
    return lines


def _interleaved(latency: InterleavedLatency | None, name: str, sequential_speedup: float) -> dict[str, float]:
    if latency is None:
        nan = float("nan")
        return {"interleaved_p50_ms": nan, "interleaved_p95_ms": nan, "interleaved_speedup": sequential_speedup,
                "interleaved_speedup_q1": nan, "interleaved_speedup_q3": nan, "interleaved_speedup_min": nan,
                "interleaved_speedup_max": nan, "interleaved_round_speedups": [], "interleaved_round_p50_ms": []}
    figures, speedup = latency.percentiles(name), latency.speedup(REFERENCE_ROW, name)
    return {"interleaved_p50_ms": figures["p50"], "interleaved_p95_ms": figures["p95"],
            "interleaved_speedup": speedup["median"], "interleaved_speedup_q1": speedup["q1"],
            "interleaved_speedup_q3": speedup["q3"], "interleaved_speedup_min": speedup["min"],
            "interleaved_speedup_max": speedup["max"],
            "interleaved_round_speedups": [round(ratio, 2) for ratio in latency.round_ratios(REFERENCE_ROW, name)],
            "interleaved_round_p50_ms": [round(value, 3) for value in latency.per_round_p50[name]]}


def paired_gap_interval(reference_correct: np.ndarray, candidate_correct: np.ndarray, resamples: int = 4000,
                        seed: int = 0) -> tuple[float, float]:
    """95% interval, in accuracy points, of (reference accuracy - candidate accuracy) over test sets
    like this one: the same resampled texts for both (paired bootstrap), so the noise of a 500-text
    split is shown next to a gap that is read against a target of one point."""
    rng = np.random.default_rng(seed)
    differences = reference_correct.astype(np.float64) - candidate_correct.astype(np.float64)
    picks = rng.integers(0, len(differences), size=(resamples, len(differences)))
    gaps = differences[picks].mean(axis=1) * 100
    low, high = np.percentile(gaps, [2.5, 97.5])
    return float(low), float(high)


def correct_per_text(evaluation_dir: Path) -> np.ndarray | None:
    """Whether each test text was classified right, from an evaluation's predictions file."""
    path = evaluation_dir / "predictions.parquet"
    if not path.exists():
        return None
    import pandas as pd

    frame = pd.read_parquet(path, columns=["label", "prediction"])
    return (frame["label"] == frame["prediction"]).to_numpy()


def target_checks(lines: list[dict], latency: InterleavedLatency | None = None,
                  gap_interval: tuple[float, float] | None = None) -> dict[str, dict]:
    """The promoted combination against the teacher (TARGETS) and against the Optimum baseline
    (``gap_interval``: the accuracy gap's 95% interval, shown beside it)."""
    promoted = next(line for line in lines if line["name"] == PROMOTED_ROW)
    checks = {key: {"target": target, "measured": promoted[key], "met": bool(promoted[key] >= target)}
              for key, target in TARGETS.items()}
    if latency:
        checks["interleaved_speedup"]["middle_half"] = [promoted["interleaved_speedup_q1"],
                                                        promoted["interleaved_speedup_q3"]]
    peer = next((line for line in lines if line["name"] == OPTIMUM_ROW and line["status"] == "measured"), None)
    if peer is None:
        return checks
    peer_speedup = latency.speedup(OPTIMUM_ROW, PROMOTED_ROW) if latency else None
    speedup = (peer_speedup["median"] if peer_speedup
               else promoted["latency_p50_ms"] and peer["latency_p50_ms"] / promoted["latency_p50_ms"])
    # Accuracy in points; rounded to the test split's resolution so 0.79 - 0.78 is one point, not 1.0000001.
    drop = round((peer["accuracy"] - promoted["accuracy"]) * 100, 6)
    target_speedup, max_drop = PEER_TARGETS["speedup_vs_optimum"], PEER_TARGETS["accuracy_points_below_optimum"]
    checks["speedup_vs_optimum"] = {"target": target_speedup, "measured": speedup, "met": bool(speedup >= target_speedup)}
    if peer_speedup:
        checks["speedup_vs_optimum"]["middle_half"] = [peer_speedup["q1"], peer_speedup["q3"]]
    checks["accuracy_points_below_optimum"] = {"target": max_drop, "measured": drop, "met": bool(drop <= max_drop),
                                               "at_most": True}
    if gap_interval is not None:
        checks["accuracy_points_below_optimum"]["interval_95"] = [round(value, 3) for value in gap_interval]
    return checks


def one_thread_speedups(latency: InterleavedLatency | None) -> dict[str, dict[str, float]]:
    """The promoted model against the teacher and against Optimum, all three on one thread, from the
    same interleaved rounds: {"<reference>_vs_promoted": speedup figures and both p50s}."""
    promoted = PROMOTED_ROW + ONE_THREAD
    if latency is None or promoted not in latency.per_round_p50:
        return {}
    promoted_p50 = latency.percentiles(promoted)["p50"]
    figures = {}
    for reference in (REFERENCE_ROW, OPTIMUM_ROW):
        if reference + ONE_THREAD in latency.per_round_p50:
            figures[f"{reference}_vs_promoted"] = latency.speedup(reference + ONE_THREAD, promoted) | {
                "reference_p50_ms": latency.percentiles(reference + ONE_THREAD)["p50"],
                "promoted_p50_ms": promoted_p50}
    return figures


def markdown(report: dict) -> str:
    """The report as a Markdown page."""
    head = ("| candidate | technique | accuracy | retention | agreement w/ teacher | size MB | smaller | "
            "p50 ms | p95 ms | p99 ms | faster (p50) | texts/s @32 | peak MB | interleaved p50 ms | "
            "interleaved faster (median [middle half of rounds]) |")
    out = [f"# Compression benchmark ({report['profile']['name']} profile)", "",
           f"Measured {report['finished']} on {report['machine']['processor']} ({report['machine']['cpus']} CPUs), "
           f"{report['rows_test']} test texts, each model evaluated alone in its own process, one after the "
           "other: batch-1 latency (texts sent one at a time), throughput at batch 32, peak memory. The last two "
           f"columns time every model again in {report['latency_rounds']} interleaved rounds of "
           f"{report['latency_turn_texts']} texts per model: each model in its own worker process, all "
           "models in turn in every round, so a noisy spell of this shared machine lands on several models; the "
           "speed-up is the median over rounds of the per-round ratio (the figure of record), with the middle "
           f"half of the rounds in brackets. Models built {report['models_built']}. Ratios are against the FP32 "
           "PyTorch teacher measured in the same run. The first rows are the optimize_model pipeline's candidates "
           "(built by its recipe's stages, named as it names them); the rest are the benchmark's own.", "", head,
           "|" + "---|" * 15]
    for line in report["table"]:
        if line["status"] == "skipped":
            out.append(f"| {line['name']} | {line['technique']} | SKIPPED: {line['reason']} |" + " |" * 13)
            continue
        out.append(
            f"| {line['name']} | {line['technique']} | {line['accuracy']:.4f} | {line['accuracy_retention']:.1%} | "
            f"{line['teacher_label_agreement']:.1%} | {line['size_mb']:.1f} | {line['size_reduction']:.1f}x | "
            f"{line['latency_p50_ms']:.2f} | {line['latency_p95_ms']:.2f} | {line['latency_p99_ms']:.2f} | "
            f"{line['p50_speedup']:.1f}x | {line['throughput_per_s']:.0f} | {line['peak_memory_mb']:.0f} | "
            f"{line['interleaved_p50_ms']:.2f} | {line['interleaved_speedup']:.1f}x "
            f"[{line['interleaved_speedup_q1']:.1f}-{line['interleaved_speedup_q3']:.1f}] |")
    out += compute_markdown(report)
    out += ["", f"## Targets for `{PROMOTED_ROW}` (distilled + pruned + INT8)", "",
            f"Against the FP32 PyTorch teacher, and against the peer baseline `{OPTIMUM_ROW}` (Optimum's dynamic "
            "INT8 of the same teacher; its speed-up is the median of the per-round ratios of the two).", ""]
    for key, check in report["targets"].items():
        verdict = "met" if check["met"] else "NOT met"
        bound = "<=" if check.get("at_most") else ">="
        interval, middle = check.get("interval_95"), check.get("middle_half")
        spread = (f" [95% interval over resampled test texts: {interval[0]:.1f} to {interval[1]:.1f}]"
                  if interval else f" [middle half of rounds: {middle[0]:.2f} to {middle[1]:.2f}]" if middle else "")
        out.append(f"- {key}: {check['measured']:.3f}{spread} (target {bound} {check['target']}): **{verdict}**")
    one_thread = report["one_thread"]
    if one_thread:
        out += ["", "The same three models on one thread each, timed in the same rounds by workers of their own "
                "(one-thread latency has none of the slow spells that two-thread runs have on this machine; "
                "see `bench/latency_workers.py`). For reading the figures above, not a target:", ""]
        for key, figures in one_thread.items():
            out.append(f"- {key}: {figures['median']:.2f}x [middle half {figures['q1']:.2f} to {figures['q3']:.2f}] "
                       f"(p50 {figures['reference_p50_ms']:.2f} ms vs {figures['promoted_p50_ms']:.2f} ms)")
    steps = report["steps"]
    out += ["", "## Pruning", ""]
    for name in ("prune_teacher_pruned", *(stage.id for stage in OPTIMIZE_MODEL.stages if stage.step is Step.PRUNE)):
        if name in steps:
            m = steps[name]["metrics"]
            out.append(f"- {name}: heads {m['heads_before']:.0f} -> {m['heads_after']:.0f}, FFN neurons "
                       f"{m['ffn_neurons_before']:.0f} -> {m['ffn_neurons_after']:.0f}, parameters "
                       f"{m['parameters_before'] / 1e6:.2f}M -> {m['parameters_after'] / 1e6:.2f}M, encoder weight "
                       f"sparsity {m['encoder_weight_sparsity']:.1%}, validation accuracy {m['val_accuracy_before']:.4f}"
                       f" -> {m['val_accuracy_pruned']:.4f} (pruned) -> {m['val_accuracy']:.4f} (recovered)")
    out += ["", f"Total wall time: {report['seconds']:.0f} s.", ""]
    return "\n".join(out)


def compute_markdown(report: dict) -> list[str]:
    """The cost row of the reference text, measured, and each runtime's share of the machine's ceiling."""
    ceilings = report.get("ceilings")
    if not ceilings:
        return []
    out = ["", "## Cost and compute", "",
           "Latency reduction: batch-1 time saved per text (interleaved median). Cost reduction: cores, so "
           "machines, saved per text at full load (1 - teacher throughput / throughput at batch 32, same cores). "
           "GOP/text: operations of the source PyTorch model on the throughput batches (a multiply-add is two; "
           "sparse models counted dense). Achieved: GOP/text x texts/s. Ceiling: the best matrix multiply "
           f"measured here in this run, FP32 {ceilings['fp32_gops']:.0f} GFLOP/s and INT8 "
           f"{ceilings['int8_gops']:.0f} GOP/s (every figure in the JSON). INT8 rows still do attention's "
           "activation products in FP32.", "",
           "| candidate | latency reduction | cost reduction | GOP/text | achieved GOP/s | ceiling | share of ceiling |",
           "|---|---|---|---|---|---|---|"]
    for line in report["table"]:
        if line["status"] != "measured" or "achieved_gops" not in line:
            continue
        out.append(f"| {line['name']} | {-line['latency_reduction']:+.0%} | {-line['cost_reduction']:+.0%} | "
                   f"{line['gops_per_text']:.2f} | {line['achieved_gops']:.0f} | {line['ceiling'].upper()} | "
                   f"{line['ceiling_share']:.0%} |")
    return out


def machine() -> dict:
    return {"processor": processor_name(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "platform": platform.platform()}


INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")  # what INT8 speed depends on


def processor_name() -> str:
    """The CPU's model name and its INT8-relevant instruction sets (from /proc/cpuinfo on Linux),
    else what the platform module says."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    flags = next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    present = [feature for feature in INT8_FEATURES if feature in flags]
    return f"{name} ({', '.join(present) or 'no AVX2'})"


def reuse_models(profile: Profile, work: Path, last_report: Path) -> tuple[list[Row], dict[str, dict], str]:
    """The rows of the models built before in ``work``, the steps of the report that measured them,
    and when they were built (the Optimum baseline is built now if it is missing)."""
    previous = json.loads(last_report.read_text())
    steps = previous["steps"]
    missing = [str(row.model_dir) for row in row_list(profile, work, steps)
               if row.name != OPTIMUM_ROW and row.model_dir is not None and not row.model_dir.exists()]
    if missing:
        raise FileNotFoundError(f"--measure-only: no {', '.join(missing)} (models built by an earlier version of "
                                "the benchmark, or none at all): run it once without --measure-only")
    if not (work / OPTIMUM_ROW / "model.onnx").exists() or OPTIMUM_ROW not in steps:
        steps[OPTIMUM_ROW] = optimum_baseline(work / TEACHER_DIR, work / OPTIMUM_ROW).to_dict()
    return row_list(profile, work, steps), steps, previous.get("models_built", previous["finished"])


def run(profile: Profile, work: Path, results: Path, isolate: bool = True, measure_only: bool = False,
        rounds: int | None = None) -> dict:
    """Build every model (unless ``measure_only``: reuse those in ``work`` and the steps of the last
    report), evaluate each, then time all of them round-robin: ``rounds`` rounds (None: the default
    of ``interleaved_latency``; 0: none)."""
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    stem = f"compress-{profile.name}"
    if measure_only:
        rows, steps, built = reuse_models(profile, work, results / f"{stem}.json")
    else:
        teacher_source, data_source = tiny_inputs(work) if profile.name == "tiny" else demo_inputs()
        steps = {}
        rows = build_rows(profile, work, teacher_source, data_source, steps)
        built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = measure(rows, profile, work, work / "data", isolate)
    latency = interleaved_latency(rows, profile, work / "data", rounds=rounds) if rounds != 0 else None
    compute_figures = compute_work(rows, profile, work)
    lines = table(rows, measured, latency, compute_figures)
    peer_correct, promoted_correct = (correct_per_text(work / "evaluation" / name) for name in (OPTIMUM_ROW, PROMOTED_ROW))
    gap_interval = (paired_gap_interval(peer_correct, promoted_correct)
                    if peer_correct is not None and promoted_correct is not None else None)
    report = {
        "profile": asdict(profile), "machine": machine(), "models_built": built,
        "latency_rounds": latency.rounds if latency else 0, "latency_turn_texts": latency_workers.TURN_TEXTS,
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows_test": int(StepResult.from_dict(measured[REFERENCE_ROW]).metrics["test_rows"]),
        "table": lines, "targets": target_checks(lines, latency, gap_interval),
        "one_thread": one_thread_speedups(latency), "steps": steps,
        "ceilings": compute_figures["ceilings"], "operations_per_text": compute_figures["operations_per_text"],
        "seconds": time.monotonic() - started,
    }
    results.mkdir(parents=True, exist_ok=True)
    # Paths relative to the repository: the report is committed and read on other machines.
    (results / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str).replace(f"{REPO_ROOT}/", ""))
    (results / f"{stem}.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / ".bench" / "compress",
                        help="where the models are written (default .bench/compress)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the JSON and Markdown go")
    parser.add_argument("--measure-only", action="store_true",
                        help="reuse the models in --work and the steps of the last report; only measure again")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved batch-1 latency rounds, each model in its own process (default: "
                             f"{ROUNDS_PER_WORKER} per worker, every worker {ROUNDS_PER_WORKER} times in every place "
                             "of the order; 0 = none)")
    args = parser.parse_args(argv)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    report = run(PROFILES[args.profile], args.work, args.results, measure_only=args.measure_only,
                 rounds=args.rounds)
    print(markdown(report))
    print(f"written: {args.results}/compress-{args.profile}.json and .md")
    return 0 if all(check["met"] for check in report["targets"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())

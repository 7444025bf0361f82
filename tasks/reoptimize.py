"""Re-optimization after a latency breach: the budget, the more aggressive search, the champion's lineage.

A latency breach does not retrain. The run starts from the serving champion's lineage (the teacher
and the data splits its pipeline run logged to MLflow), searches candidates more aggressive than
the champion's (fewer student layers, larger head and feed-forward pruning fractions, a shorter
maximum length when the served texts allow it) and gates them against a latency budget: the SLO
minus the serving overhead observed in the window (served p95 minus the champion's own batch-1
median latency: the median, because an offline p95 measured on a busy machine can be inflated
enough to hide the overhead, and a budget that is too generous promotes a model that breaches the
SLO on arrival).

The budget and search functions are pure; ``fetch_lineage`` talks to MLflow.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import QuantizeMode
from tasks.errors import PipelineError
from tasks.recipe import REFERENCE_CANDIDATE
from tasks.registry import CANDIDATE_TAG, DATA_ARTIFACT, MODEL_FILES_ARTIFACT, ROLE_TAG, RUN_TAG

# Maximum lengths a re-optimization may shorten to (tokens); the served texts' p99 must fit.
LENGTH_STEPS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
HEAD_STEP, FFN_STEP = 0.17, 0.15
MAX_HEAD_FRACTION, MAX_FFN_FRACTION = 0.75, 0.9
RELAXED_REGRESSION = 0.98  # gate.max_champion_regression of a re-optimization: the champion is what breaches


@dataclass(frozen=True)
class LatencyBudget:
    """The batch-1 p95 a candidate may take so that serving meets the SLO.

    ``overhead_ms`` is what serving adds to the model: the window's served p95 minus the champion's
    own batch-1 median latency measured at its evaluation (0 when that is unknown or larger). It
    counts the model's own tail and any slowdown under load as overhead: conservative."""

    slo_p95_ms: float
    served_p95_ms: float
    champion_p50_ms: float | None

    @property
    def overhead_ms(self) -> float:
        if self.champion_p50_ms is None:
            return 0.0
        return max(0.0, self.served_p95_ms - self.champion_p50_ms)

    @property
    def budget_ms(self) -> float:
        return self.slo_p95_ms - self.overhead_ms

    def describe(self) -> str:
        champion = "unknown" if self.champion_p50_ms is None else f"{self.champion_p50_ms:.1f} ms"
        return (f"latency budget {self.budget_ms:.1f} ms batch-1 p95 = SLO {self.slo_p95_ms:.1f} ms - serving "
                f"overhead {self.overhead_ms:.1f} ms (served p95 {self.served_p95_ms:.1f} ms - the champion's own "
                f"batch-1 median {champion})")

    def to_dict(self) -> dict[str, float | None]:
        return {"slo_p95_ms": self.slo_p95_ms, "served_p95_ms": self.served_p95_ms,
                "champion_p50_ms": self.champion_p50_ms, "overhead_ms": self.overhead_ms,
                "budget_ms": self.budget_ms}


def latency_budget(evidence: dict[str, Any], champion_p50_ms: float | None) -> LatencyBudget:
    """The budget from the monitor's evidence (``slo_p95_ms``, ``latency_p95_ms``); PipelineError
    when the evidence lacks them (a trigger from an older monitor: say so instead of guessing)."""
    missing = [key for key in ("slo_p95_ms", "latency_p95_ms") if not isinstance(evidence.get(key), (int, float))]
    if missing:
        raise PipelineError(f"the latency trigger's evidence lacks {missing}: cannot size a latency budget; "
                            "trigger again from a monitor that records them")
    return LatencyBudget(float(evidence["slo_p95_ms"]), float(evidence["latency_p95_ms"]), champion_p50_ms)


def shorter_max_length(current: int, token_p99: float | None) -> int | None:
    """The smallest step of ``LENGTH_STEPS`` that holds the served texts' p99 token count, when it is
    shorter than ``current`` (None: the texts need the current length, or their length is unknown)."""
    if token_p99 is None or token_p99 <= 0:
        return None
    fitting = [step for step in LENGTH_STEPS if step >= token_p99]
    if not fitting or fitting[0] >= current:
        return None
    return fitting[0]


def effective_student_layers(champion_params: dict[str, str], teacher_layers: int) -> int:
    """The champion run's student depth (its param 0 means half the teacher's layers)."""
    layers = int(float(champion_params.get("distill.student_layers", "0") or 0))
    return layers if layers > 0 else max(1, teacher_layers // 2)


def aggressive_overrides(champion_params: dict[str, str], teacher_layers: int, token_p99: float | None,
                         budget: LatencyBudget) -> dict[str, dict[str, Any]]:
    """Config overrides (section -> key -> value) for a search more aggressive than the champion's run."""
    head = float(champion_params.get("prune.head_fraction", 0.33))
    ffn = float(champion_params.get("prune.ffn_fraction", 0.6))
    overrides: dict[str, dict[str, Any]] = {
        "distill": {"enabled": True,
                    "student_layers": max(1, effective_student_layers(champion_params, teacher_layers) - 1)},
        "prune": {"enabled": True, "head_fraction": round(min(MAX_HEAD_FRACTION, head + HEAD_STEP), 2),
                  "ffn_fraction": round(min(MAX_FFN_FRACTION, ffn + FFN_STEP), 2)},
        # Static INT8 (calibrated QDQ): batch-invariant like the default per-token dynamic INT8 and
        # faster than it on the demo's models (bench/results/batch-invariance.md).
        "quantize": {"enabled": True, "mode": QuantizeMode.STATIC_INT8.value},
        # The champion breaches the SLO: holding candidates to its accuracy would block every fix. The
        # accuracy gate against the teacher (max_relative_accuracy_drop) still holds them.
        "gate": {"max_p95_latency_ms": round(budget.budget_ms, 3), "max_champion_regression": RELAXED_REGRESSION},
    }
    length = shorter_max_length(int(float(champion_params.get("finetune.max_length", 128))), token_p99)
    if length is not None:
        overrides["finetune"] = {"max_length": length}
    if "finetune.truncation" in champion_params:  # the reused teacher was fine-tuned on the tokens it keeps
        overrides.setdefault("finetune", {})["truncation"] = champion_params["finetune.truncation"]
    return overrides


@dataclass(frozen=True)
class ChampionOrigin:
    """Where the champion came from: its version, the pipeline run that built it and that run's
    MLflow parent run and teacher run (not ``tasks.lineage.Lineage``, what a version was built from)."""

    version: str
    pipeline_run_id: str
    parent_run_id: str
    teacher_run_id: str
    params: dict[str, str]
    champion_p50_ms: float | None


def find_origin(tracking_uri: str, experiment: str, registered_model: str, alias: str) -> ChampionOrigin | None:
    """Where the champion came from, traced in MLflow (None: no champion); PipelineError when it cannot be."""
    from tasks import model_aliases

    champion = model_aliases.alias_tags(tracking_uri, registered_model, alias)
    if champion is None:
        return None
    version, tags = champion
    run_id = tags.get(RUN_TAG)
    client = model_aliases.mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if run_id is None or found is None:
        raise PipelineError(f"{registered_model} v{version} has no pipeline run lineage (tag {RUN_TAG}): "
                            "re-optimize by a normal run instead")
    runs = {run.data.tags.get(ROLE_TAG) + ":" + run.data.tags.get(CANDIDATE_TAG, ""): run for run in
            client.search_runs([found.experiment_id], filter_string=f"tags.{RUN_TAG} = '{run_id}'", max_results=100)
            if run.data.tags.get(ROLE_TAG)}
    parent, teacher = runs.get("parent:"), runs.get(f"candidate:{REFERENCE_CANDIDATE}")
    if parent is None or teacher is None:
        raise PipelineError(f"the MLflow runs of pipeline run {run_id} (which built {registered_model} v{version}) "
                            "are incomplete: no parent run or no teacher run")
    p50 = tags.get("metric.latency_p50_ms")
    return ChampionOrigin(version, run_id, parent.info.run_id, teacher.info.run_id, dict(parent.data.params),
                          float(p50) if p50 else None)


def fetch_lineage(tracking_uri: str, origin: ChampionOrigin, out_dir: Path) -> dict[str, Path]:
    """Download the champion run's teacher and data splits into ``out_dir`` (``teacher/``, ``data/``)."""
    from tasks.model_aliases import mlflow_client

    client = mlflow_client(tracking_uri)
    folders = {}
    for name, run_id, artifact in (("teacher", origin.teacher_run_id, MODEL_FILES_ARTIFACT),
                                   ("data", origin.parent_run_id, DATA_ARTIFACT)):
        target = out_dir / name
        staging = out_dir / f".{name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            downloaded = Path(client.download_artifacts(run_id, artifact, str(staging)))
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise PipelineError(f"cannot fetch the champion's {name} ({artifact!r} of MLflow run {run_id}): "
                                f"{error}. Runs registered before lineage was logged cannot be re-optimized; "
                                "run a normal optimize_model run first") from None
        shutil.rmtree(target, ignore_errors=True)
        downloaded.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        folders[name] = target
    return folders


def teacher_layers(teacher_dir: Path) -> int:
    """The number of transformer layers in a saved Hugging Face model folder."""
    import json

    config = json.loads((teacher_dir / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layers", "num_layers"):
        if key in config:
            return int(config[key])
    raise PipelineError(f"{teacher_dir}/config.json names no layer count")

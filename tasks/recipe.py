"""The optimize_model recipe: one typed list of stages, from which everything else derives.

The Airflow DAG (``dags/optimize_model.py``), the Kubeflow pipeline (``infra/kubeflow/pipeline.py``),
the compression benchmark (``bench/compress.py``), the evaluation, registration and gating
(``tasks/pipeline.py``) and the tests all read the stages below; none of them lists candidates or
edges of its own. A candidate has one name everywhere: the ``candidate`` of the stage that makes it.

Adding a technique means: its step (``tasks/<step>.py``), its config section (``tasks/config.py``,
with a ``enabled`` switch whose field metadata makes the DAG param), and its stages here.

Standard library only: the DAG file imports this module when the scheduler parses it, and the
Kubeflow compiler imports it in an environment without the project's dependencies.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from tasks.results import ModelFormat  # standard library only, like this module


class Target(str, Enum):
    """The hardware a stage's output is built for."""

    CPU = "cpu"
    GPU = "gpu"


class Step(str, Enum):
    """The kinds of work a stage does; ``tasks.pipeline.run_stage`` dispatches on them."""

    FINETUNE = "finetune"
    DISTILL = "distill"
    PRUNE = "prune"
    EXPORT = "export"
    QUANTIZE = "quantize"
    COMPILE = "compile"


# The keyword under which a stage receives the model it works on; other keywords are helpers
# (the teacher that gives soft targets, say).
MODEL_INPUT = "model"


@dataclass(frozen=True)
class Stage:
    """One task of the pipeline.

    Attributes:
        id: the task's id in Airflow, its display name in Kubeflow.
        step: what it does (see ``Step``).
        label: the technique as a reader names it, for the candidate's technique chain.
        inputs: keyword -> id of the upstream stage whose result it takes (the prepared data is
            always passed as well). ``model`` is the model the stage transforms.
        section: the config section the step reads (``PipelineConfig.<section>``).
        technique: the switchable technique it applies (a config section with ``enabled``), or
            "" when it always runs once its inputs exist.
        output: the folder under the run directory it writes.
        candidate: the candidate it produces, or None when its output is only an intermediate.
        model_format: the format of that output (default: PyTorch for training steps, else ONNX).
        compared_with: the candidate it was converted from, for the agreement gate (export and
            quantization); None for new models (distilled, pruned), which the accuracy gates judge.
        target: the hardware its output is built for; GPU stages run only when the run's target
            includes the GPU and the worker has one (``tasks.hardware``).
        settings: fixed values of the section's fields for this stage (the GPU branch's FP16 and
            TensorRT-ready INT8 quantizations set ``mode``), applied over the run's config.
        doc: one line for the task's documentation.
    """

    id: str
    step: Step
    label: str
    inputs: Mapping[str, str] = field(default_factory=dict)
    section: str = ""
    technique: str = ""
    output: str = ""
    candidate: str | None = None
    model_format: ModelFormat | None = None
    compared_with: str | None = None
    target: Target = Target.CPU
    settings: Mapping[str, object] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "settings", MappingProxyType(dict(self.settings)))
        object.__setattr__(self, "section", self.section or self.step.value)
        object.__setattr__(self, "output", self.output or self.candidate or self.id)
        if self.model_format is None:  # training steps write PyTorch models, the rest ONNX
            trains = self.step in (Step.FINETUNE, Step.DISTILL, Step.PRUNE)
            built = ModelFormat.TENSORRT_PLAN if self.step is Step.COMPILE else ModelFormat.ONNX
            object.__setattr__(self, "model_format", ModelFormat.PYTORCH if trains else built)


# The fine-tuned FP32 PyTorch teacher: the reference every candidate is measured against (gates, speed-up),
# registered as a version of its own and named in every candidate's lineage; a re-optimization reuses it.
REFERENCE_CANDIDATE = "teacher_pytorch"


def _teacher_stages() -> list[Stage]:
    return [
        Stage("finetune_teacher", Step.FINETUNE, "finetune", output="teacher", candidate=REFERENCE_CANDIDATE,
              doc="Fine-tune the teacher with a fresh classification head."),
        Stage("export_onnx", Step.EXPORT, "ONNX export (FP32)", {MODEL_INPUT: "finetune_teacher"},
              candidate="onnx_fp32", compared_with=REFERENCE_CANDIDATE,
              doc="Export the teacher to ONNX and check it reproduces the PyTorch logits."),
        Stage("quantize_int8", Step.QUANTIZE, "dynamic INT8", {MODEL_INPUT: "export_onnx"}, technique="quantize",
              candidate="onnx_int8", compared_with="onnx_fp32",
              doc="Dynamic INT8 quantization of the teacher with ONNX Runtime."),
    ]


def _student_stages() -> list[Stage]:
    return [
        Stage("distill_student", Step.DISTILL, "distill", {MODEL_INPUT: "finetune_teacher"}, technique="distill",
              output="student", doc="Distill the teacher into a student that keeps evenly spaced teacher layers."),
        Stage("export_student", Step.EXPORT, "ONNX export (FP32)", {MODEL_INPUT: "distill_student"},
              candidate="student_onnx_fp32", doc="Export the student to ONNX and check it reproduces its logits."),
        Stage("quantize_student", Step.QUANTIZE, "dynamic INT8", {MODEL_INPUT: "export_student"},
              technique="quantize", candidate="student_int8", compared_with="student_onnx_fp32",
              doc="Dynamic INT8 quantization of the student with ONNX Runtime."),
    ]


def _pruned_stages() -> list[Stage]:
    return [
        Stage("prune_student", Step.PRUNE, "prune", {MODEL_INPUT: "distill_student", "teacher": "finetune_teacher"},
              technique="prune", output="pruned",
              doc="Remove the least important heads and FFN neurons of the student; recover by distillation."),
        Stage("export_pruned", Step.EXPORT, "ONNX export (FP32)", {MODEL_INPUT: "prune_student"},
              candidate="pruned_onnx_fp32", doc="Export the pruned student to ONNX and check its logits."),
        Stage("quantize_pruned", Step.QUANTIZE, "dynamic INT8", {MODEL_INPUT: "export_pruned"},
              technique="quantize", candidate="pruned_int8", compared_with="pruned_onnx_fp32",
              doc="Dynamic INT8 quantization of the pruned student with ONNX Runtime."),
    ]


def _sparse_stages() -> list[Stage]:
    return [
        Stage("sparsify_student", Step.PRUNE, "unstructured sparsity",
              {MODEL_INPUT: "distill_student", "teacher": "finetune_teacher"}, section="sparsify",
              technique="sparsify", output="sparse",
              doc="Zero the student's smallest weights by gradual magnitude pruning during recovery distillation."),
        Stage("export_sparse", Step.EXPORT, "ONNX export (FP32)", {MODEL_INPUT: "sparsify_student"},
              candidate="sparse_onnx_fp32", doc="Export the sparse student to ONNX and check its logits."),
    ]


# The GPU branch's quantizations: FP16 weights and compute (inputs and logits kept), and static INT8 in
# QDQ form with signed, symmetric activations (TensorRT's explicit quantization needs zero points of 0).
FP16_SETTINGS = {"mode": "fp16"}
TENSORRT_INT8_SETTINGS = {"mode": "static_int8", "symmetric_activations": True}


def _gpu_stages(model: str, fp32_stage: str, fp32_candidate: str, prefix: str) -> list[Stage]:
    """The GPU branch of one model: FP16 ONNX (a candidate: served with Triton's TensorRT accelerator,
    the route when no engine can be built), a TensorRT-ready INT8 QDQ model, and an engine from each.
    ``model`` names the stages (``fp16_<model>``), ``prefix`` the candidates (``<prefix>trt_fp16``)."""
    gpu = Target.GPU
    return [
        Stage(f"fp16_{model}", Step.QUANTIZE, "FP16", {MODEL_INPUT: fp32_stage}, candidate=f"{prefix}onnx_fp16",
              compared_with=fp32_candidate, target=gpu, settings=FP16_SETTINGS,
              doc=f"FP16 ONNX model of the {model} for the GPU (inputs and logits stay as they are)."),
        Stage(f"compile_{model}_fp16", Step.COMPILE, "TensorRT engine", {MODEL_INPUT: f"fp16_{model}"},
              candidate=f"{prefix}trt_fp16", compared_with=fp32_candidate, target=gpu,
              doc=f"TensorRT FP16 engine of the {model} for the worker's GPU (SKIPPED without GPU or TensorRT)."),
        Stage(f"qdq_{model}", Step.QUANTIZE, "static INT8 (QDQ, symmetric)", {MODEL_INPUT: fp32_stage},
              technique="quantize", output=f"{prefix}qdq_int8", target=gpu, settings=TENSORRT_INT8_SETTINGS,
              doc=f"Static INT8 QDQ model of the {model}, calibrated on training texts, for TensorRT."),
        Stage(f"compile_{model}_int8", Step.COMPILE, "TensorRT engine", {MODEL_INPUT: f"qdq_{model}"},
              technique="quantize", candidate=f"{prefix}trt_int8", compared_with=fp32_candidate, target=gpu,
              doc=f"TensorRT INT8 engine of the {model} from its QDQ model (SKIPPED without GPU or TensorRT)."),
    ]


def _gpu_branch() -> list[Stage]:
    return (_gpu_stages("teacher", "export_onnx", "onnx_fp32", "")
            + _gpu_stages("student", "export_student", "student_onnx_fp32", "student_")
            + _gpu_stages("pruned", "export_pruned", "pruned_onnx_fp32", "pruned_"))


@dataclass(frozen=True)
class Recipe:
    """The stages in an order where every stage comes after its inputs, and the switchable
    techniques (config sections with ``enabled``) in the order reasons name them."""

    stages: tuple[Stage, ...]
    techniques: tuple[str, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for stage in self.stages:
            if stage.technique and stage.technique not in self.techniques:
                raise ValueError(f"stage {stage.id} applies {stage.technique!r}, not one of {self.techniques}")
            missing = set(stage.inputs.values()) - seen
            if missing:
                raise ValueError(f"stage {stage.id} takes {sorted(missing)}, which no earlier stage makes")
            if stage.id in seen:
                raise ValueError(f"stage {stage.id} appears twice")
            seen.add(stage.id)
        candidates = [stage.candidate for stage in self.stages if stage.candidate]
        if len(set(candidates)) != len(candidates):
            raise ValueError(f"a candidate is made twice: {candidates}")
        for stage in self.stages:
            if stage.compared_with and stage.compared_with not in candidates:
                raise ValueError(f"stage {stage.id} is compared with unknown candidate {stage.compared_with}")

    def stage(self, stage_id: str) -> Stage:
        for stage in self.stages:
            if stage.id == stage_id:
                return stage
        raise KeyError(f"no stage {stage_id!r}; stages: {[stage.id for stage in self.stages]}")

    def producer(self, candidate: str) -> Stage:
        """The stage that makes ``candidate``."""
        for stage in self.stages:
            if stage.candidate == candidate:
                return stage
        raise KeyError(f"no candidate {candidate!r}; candidates: {self.candidates}")

    @property
    def candidates(self) -> tuple[str, ...]:
        """Every candidate, sources before what is converted from them."""
        return tuple(stage.candidate for stage in self.stages if stage.candidate)

    def on(self, target: Target) -> tuple[Stage, ...]:
        """The stages whose output is built for ``target``."""
        return tuple(stage for stage in self.stages if stage.target is target)

    def entry_stages(self, target: Target) -> tuple[Stage, ...]:
        """The first stages of ``target``'s branch: those of ``target`` whose inputs are all built for
        another target (the GPU branch starts from the CPU branch's FP32 ONNX models)."""
        return tuple(stage for stage in self.on(target)
                     if all(self.stage(source).target is not target for source in stage.inputs.values()))

    def edges(self) -> set[tuple[str, str]]:
        """(upstream, downstream) stage ids."""
        return {(upstream, stage.id) for stage in self.stages for upstream in stage.inputs.values()}

    def lineage(self, stage_id: str) -> Iterator[Stage]:
        """The stage and every stage upstream of it, each once (inputs of inputs included)."""
        seen: set[str] = set()
        pending = [stage_id]
        while pending:
            current = self.stage(pending.pop())
            if current.id not in seen:
                seen.add(current.id)
                yield current
                pending.extend(current.inputs.values())

    def techniques_needed(self, stage_id: str) -> tuple[str, ...]:
        """The switchable techniques a stage needs: its own and those of everything upstream."""
        needed = {stage.technique for stage in self.lineage(stage_id) if stage.technique}
        return tuple(technique for technique in self.techniques if technique in needed)

    def technique_chain(self, stage_id: str) -> str:
        """``finetune > distill > ONNX export (FP32)``: the labels along the model inputs."""
        labels = []
        current: Stage | None = self.stage(stage_id)
        while current is not None:
            labels.append(current.label)
            upstream = current.inputs.get(MODEL_INPUT)
            current = self.stage(upstream) if upstream else None
        return " > ".join(reversed(labels))


OPTIMIZE_MODEL = Recipe(tuple(_teacher_stages() + _student_stages() + _pruned_stages() + _sparse_stages()
                              + _gpu_branch()),
                        techniques=("distill", "prune", "sparsify", "quantize"))

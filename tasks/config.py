"""Frozen, validated configurations of the pipeline steps, with named presets.

A config is checked when it is built: an invalid value raises ``ConfigError`` that names
the field and the allowed range, before any work starts. ``PipelineConfig.from_params``
turns the Airflow params / DAG run conf (plain JSON) into configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tasks.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled texts come from and how they are split.

    Attributes:
        source: a local CSV/Parquet/JSONL/JSON file, a local folder of such files, or
            ``hf:<dataset name>[:<split>]`` for a Hugging Face dataset.
        text_column / label_column: column names in the source.
        labels: label names in class-index order; empty means sorted unique labels found.
        max_train / max_eval: caps on split sizes (stratified sample), 0 = no cap.
        validation_fraction / test_fraction: shares of the cleaned data.
        min_chars: texts shorter than this (after cleaning) are dropped.
        seed: sampling and split seed.
    """

    source: str
    text_column: str = "text"
    label_column: str = "label"
    labels: tuple[str, ...] = ()
    max_train: int = 0
    max_eval: int = 0
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
        model: a local model folder (config + weights + tokenizer) or a Hugging Face model id.
        epochs / max_steps: training length; max_steps > 0 stops early.
        batch_size, learning_rate, weight_decay, warmup_ratio: optimiser settings.
        max_length: tokens per text (truncation).
        seed: initialisation and shuffling seed.
    """

    model: str
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 16
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_length: int = 128
    seed: int = 13

    def __post_init__(self) -> None:
        _require(bool(self.model), "finetune.model is empty: give a model folder or hub id")
        _require(0 < self.epochs <= 100, "finetune.epochs must be in (0, 100]")
        _require(self.max_steps >= 0, "finetune.max_steps must be >= 0")
        _require(1 <= self.batch_size <= 1024, "finetune.batch_size must be in 1..1024")
        _require(0 < self.learning_rate < 1, "finetune.learning_rate must be in (0, 1)")
        _require(0 <= self.warmup_ratio < 1, "finetune.warmup_ratio must be in [0, 1)")
        _require(8 <= self.max_length <= 4096, "finetune.max_length must be in 8..4096")


@dataclass(frozen=True)
class DistillConfig:
    """Distil the fine-tuned teacher into a student with fewer encoder layers.

    Attributes:
        student_layers: encoder layers kept (0 = half the teacher's), copied from evenly spaced
            teacher layers, the last one included.
        temperature: softmax temperature of the soft targets.
        alpha: weight of the soft-target loss; 1 - alpha weighs the hard labels.
        epochs, batch_size, learning_rate, max_length, seed: training settings.
    """

    student_layers: int = 0
    temperature: float = 2.0
    alpha: float = 0.5
    epochs: float = 1.0
    batch_size: int = 16
    learning_rate: float = 1e-4
    max_length: int = 128
    seed: int = 13

    def __post_init__(self) -> None:
        _require(self.student_layers >= 0, "distill.student_layers must be >= 0")
        _require(0 < self.temperature <= 20, "distill.temperature must be in (0, 20]")
        _require(0 <= self.alpha <= 1, "distill.alpha must be in [0, 1]")
        _require(0 < self.epochs <= 100, "distill.epochs must be in (0, 100]")
        _require(1 <= self.batch_size <= 1024, "distill.batch_size must be in 1..1024")
        _require(0 < self.learning_rate < 1, "distill.learning_rate must be in (0, 1)")
        _require(8 <= self.max_length <= 4096, "distill.max_length must be in 8..4096")


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export and its correctness check against the source model.

    Attributes:
        opset: ONNX opset.
        max_abs_diff: largest allowed |logit difference| between ONNX and PyTorch.
        check_samples: texts from the test split used for the check.
    """

    opset: int = 17
    max_abs_diff: float = 1e-3
    check_samples: int = 16

    def __post_init__(self) -> None:
        _require(14 <= self.opset <= 23, "export.opset must be in 14..23")
        _require(self.max_abs_diff > 0, "export.max_abs_diff must be > 0")
        _require(self.check_samples >= 1, "export.check_samples must be >= 1")


@dataclass(frozen=True)
class QuantizeConfig:
    """ONNX Runtime dynamic INT8 quantization.

    Attributes:
        per_channel: one scale per output channel of each weight (more accurate, slightly bigger).
        reduce_range: 7-bit weights, for CPUs without VNNI.
    """

    per_channel: bool = False
    reduce_range: bool = False

    @classmethod
    def avx512_vnni(cls) -> QuantizeConfig:
        """For CPUs with AVX-512 VNNI (uint8 activations take the VNNI path)."""
        return cls(per_channel=False, reduce_range=False)

    @classmethod
    def avx2(cls) -> QuantizeConfig:
        """For CPUs without VNNI, where 8-bit products can saturate."""
        return cls(per_channel=False, reduce_range=True)


@dataclass(frozen=True)
class EvaluateConfig:
    """How every candidate is measured, identically.

    Attributes:
        warmup: untimed batch-1 calls before timing.
        max_length: tokens per text.
        threads: intra-op threads for both PyTorch and ONNX Runtime (0 = library default).
    """

    warmup: int = 10
    max_length: int = 128
    threads: int = 0

    def __post_init__(self) -> None:
        _require(0 <= self.warmup <= 10_000, "evaluate.warmup must be in 0..10000")
        _require(8 <= self.max_length <= 4096, "evaluate.max_length must be in 8..4096")
        _require(self.threads >= 0, "evaluate.threads must be >= 0")


@dataclass(frozen=True)
class GateConfig:
    """Checks a candidate must pass before promotion (each result is recorded).

    Attributes:
        max_relative_accuracy_drop: accuracy >= teacher accuracy x (1 - this).
        min_source_agreement: label agreement with the unquantized source model.
        max_p95_latency_ms: batch-1 p95 latency budget (0 = no budget).
        max_champion_regression: accuracy may be at most this far (absolute) below the serving
            champion's accuracy on the same test split.
    """

    max_relative_accuracy_drop: float = 0.03
    min_source_agreement: float = 0.95
    max_p95_latency_ms: float = 0.0
    max_champion_regression: float = 0.01

    def __post_init__(self) -> None:
        _require(0 <= self.max_relative_accuracy_drop < 1, "gate.max_relative_accuracy_drop must be in [0, 1)")
        _require(0 <= self.min_source_agreement <= 1, "gate.min_source_agreement must be in [0, 1]")
        _require(self.max_p95_latency_ms >= 0, "gate.max_p95_latency_ms must be >= 0")
        _require(0 <= self.max_champion_regression < 1, "gate.max_champion_regression must be in [0, 1)")


@dataclass(frozen=True)
class PromoteConfig:
    """Where the winner goes.

    Attributes:
        registered_model: MLflow registered model name.
        triton_model: Triton model name.
        alias: MLflow alias that marks the serving version.
        smoke_samples: test texts sent through Triton and compared with the evaluation outputs.
        smoke_tolerance: largest allowed |logit difference| between Triton and the evaluation.
    """

    registered_model: str = "text-classifier"
    triton_model: str = "text_classifier"
    alias: str = "champion"
    smoke_samples: int = 16
    smoke_tolerance: float = 1e-3

    def __post_init__(self) -> None:
        _require(bool(self.registered_model), "promote.registered_model is empty")
        _require(
            self.triton_model.replace("_", "").replace("-", "").isalnum(),
            f"promote.triton_model {self.triton_model!r} must be letters, digits, '_' or '-'",
        )
        _require(self.alias not in ("latest", ""), "promote.alias must name an alias other than 'latest'")
        _require(self.smoke_samples >= 1, "promote.smoke_samples must be >= 1")


@dataclass(frozen=True)
class PipelineConfig:
    """All step configs of one optimize_model run."""

    data: DataConfig
    finetune: FinetuneConfig
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """Build from nested plain data; unknown keys are an error (typos must not pass silently)."""
        sections = {
            "data": DataConfig,
            "finetune": FinetuneConfig,
            "distill": DistillConfig,
            "export": ExportConfig,
            "quantize": QuantizeConfig,
            "evaluate": EvaluateConfig,
            "gate": GateConfig,
            "promote": PromoteConfig,
        }
        unknown = set(data) - set(sections)
        _require(not unknown, f"unknown config sections {sorted(unknown)}; expected {sorted(sections)}")
        _require("data" in data and "finetune" in data, "config needs at least 'data' and 'finetune' sections")
        built = {name: _build_section(kind, data.get(name, {}), name) for name, kind in sections.items()}
        return cls(**built)


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
        if text.startswith("tuple"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{name} must be a list of strings, got {value!r}")
            return tuple(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{name} has an invalid value {value!r}") from None
    return value

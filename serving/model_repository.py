"""Write Triton model repositories: typed config -> ``config.pbtxt``; versions written atomically.

Config fields come only from Triton's model configuration schema, so a repository written here
loads unchanged in the official Triton container (real ONNX Runtime backend).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from serving.errors import ServingError
from serving.truncation import DEFAULT_TRUNCATION, TRUNCATIONS

PYTHON_MODELS_DIR = Path(__file__).parent / "triton_models"
# The text normalisation the tokenizer model applies (serving/text.py), copied beside its model.py.
NORMALISER_FILE = Path(__file__).parent / "text.py"
# The truncation rule it applies to a long text (serving/truncation.py), copied there too.
TRUNCATION_FILE = Path(__file__).parent / "truncation.py"
# The served ensemble's name wherever none is given: the one place it is written (the pipeline's
# config, the gateway, the monitor, the CLI and the replica sync all read it from here).
DEFAULT_MODEL = "text_classifier"

# The largest batch Triton forms for a classifier unless told otherwise (a TensorRT engine's profile
# must take it: tasks.compile.serving_profile).
DEFAULT_MAX_BATCH_SIZE = 32

ONNX_PLATFORM = "onnxruntime_onnx"
TENSORRT_PLATFORM = "tensorrt_plan"

_DATA_TYPES = {"int64": "TYPE_INT64", "int32": "TYPE_INT32", "fp32": "TYPE_FP32", "fp16": "TYPE_FP16",
               "string": "TYPE_STRING"}


class RepositoryError(ServingError):
    """The model repository is missing something or a config value is invalid."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # key of _DATA_TYPES
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.data_type not in _DATA_TYPES:
            raise RepositoryError(f"tensor {self.name}: data_type {self.data_type!r} not in {sorted(_DATA_TYPES)}")
        if not self.dims or any(dim == 0 or dim < -1 for dim in self.dims):
            raise RepositoryError(f"tensor {self.name}: dims {self.dims} must be positive or -1 (variable)")


@dataclass(frozen=True)
class EngineProfile:
    """The shapes a TensorRT engine's optimization profile accepts (``tasks.compile`` records them in
    ``compile_config.json`` beside ``model.plan``): batch and token ranges of both inputs."""

    min_batch: int
    max_batch: int
    min_sequence: int
    max_sequence: int

    @classmethod
    def read(cls, model_dir: Path) -> EngineProfile:
        """The profile recorded beside an engine; ``RepositoryError`` when it is not there."""
        path = model_dir / ENGINE_PROFILE_FILE
        if not path.exists():
            raise RepositoryError(f"{model_dir} has no {ENGINE_PROFILE_FILE}: the engine's optimization profile is "
                                  "unknown, so Triton's batch size cannot be checked against it (build it with "
                                  "tasks.compile)")
        recorded = json.loads(path.read_text())
        return cls(int(recorded["min_batch"]), int(recorded["max_batch"]), int(recorded["min_sequence"]),
                   int(recorded["max_sequence"]))


ENGINE_PROFILE_FILE = "compile_config.json"


@dataclass(frozen=True)
class OnnxModelConfig:
    """The Triton configuration of one ONNX classifier.

    Attributes:
        name: Triton model name (folder name).
        inputs / outputs: tensors without the batch dimension.
        max_batch_size: largest batch Triton may form (0 disables batching).
        instances: CPU model instances.
        intra_op_threads: ONNX Runtime threads per instance (0 = library default; Triton's backend is
            known to be slow on CPU with defaults, so the pipeline sets it).
        versions_kept: how many newest versions stay loaded (1: the new version replaces the old).
        gpu: run the instances on the GPU (KIND_GPU) instead of the CPU.
        tensorrt_precision: on GPU, let ONNX Runtime hand the graph to TensorRT ("FP16" or "FP32";
            "" = plain CUDA execution provider). Triton builds the engine when the model loads.
        tensorrt_workspace_mb: TensorRT builder scratch memory.
        preferred_batch_sizes / max_queue_delay_us: dynamic batching (requests of equal shape are
            grouped); no preferred sizes and a delay of 0 turn it off.
        warmup_tokens: a zero-filled request of this many tokens is run when the model loads, so the
            first real request does not pay for initialisation (0 = no warmup).
        engine_profile: a TensorRT engine's profile (plans only): Triton's batches and the warmup
            must fit in it.
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    instances: int = 1
    intra_op_threads: int = 0
    versions_kept: int = 1
    gpu: bool = False
    tensorrt_precision: str = ""
    tensorrt_workspace_mb: int = 1024
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 500
    warmup_tokens: int = 16
    engine_profile: EngineProfile | None = None

    def __post_init__(self) -> None:
        if any(size < 1 or size > max(self.max_batch_size, 1) for size in self.preferred_batch_sizes):
            raise RepositoryError(f"preferred_batch_sizes {self.preferred_batch_sizes} must be in 1..max_batch_size")
        if self.max_queue_delay_us < 0 or self.warmup_tokens < 0:
            raise RepositoryError("max_queue_delay_us and warmup_tokens must be >= 0")
        if self.tensorrt_precision not in ("", "FP16", "FP32"):
            raise RepositoryError(f"tensorrt_precision {self.tensorrt_precision!r} must be '', 'FP16' or 'FP32'")
        if self.tensorrt_precision and not self.gpu:
            raise RepositoryError("the TensorRT accelerator runs on the GPU: set gpu=True with tensorrt_precision")
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise RepositoryError(f"model name {self.name!r} must be letters, digits, '_' or '-'")
        if self.max_batch_size < 0 or self.instances < 1 or self.intra_op_threads < 0 or self.versions_kept < 1:
            raise RepositoryError("max_batch_size >= 0, instances >= 1, intra_op_threads >= 0, versions_kept >= 1")


def classifier_config(name: str, num_labels: int, intra_op_threads: int = 0,
                      max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                      instances: int = 1) -> OnnxModelConfig:
    """The config of a classifier exported by tasks.export (input_ids, attention_mask -> logits)."""
    return OnnxModelConfig(
        name=name,
        inputs=(TensorSpec("input_ids", "int64", (-1,)), TensorSpec("attention_mask", "int64", (-1,))),
        outputs=(TensorSpec("logits", "fp32", (num_labels,)),),
        intra_op_threads=intra_op_threads,
        max_batch_size=max_batch_size,
        instances=instances,
    )


def _tensors(specs: tuple[TensorSpec, ...]) -> str:
    items = [
        f'  {{ name: "{spec.name}" data_type: {_DATA_TYPES[spec.data_type]} dims: [ {", ".join(map(str, spec.dims))} ] }}'
        for spec in specs
    ]
    return ",\n".join(items)


def _parameters(values: dict[str, str]) -> list[str]:
    return [f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in values.items()]


def render_config(config: OnnxModelConfig) -> str:
    """``config.pbtxt`` text for ``config`` (an ONNX model served by ONNX Runtime)."""
    lines = _model_lines(config, ONNX_PLATFORM, gpu=config.gpu)
    lines += _parameters({"intra_op_thread_count": str(config.intra_op_threads), "inter_op_thread_count": "1"})
    lines += _scheduling_lines(config)
    if config.tensorrt_precision:
        lines.append(_tensorrt_accelerator(config.tensorrt_precision, config.tensorrt_workspace_mb))
    return "\n".join(lines) + "\n"


def render_plan_config(config: OnnxModelConfig) -> str:
    """``config.pbtxt`` text for a serialized TensorRT engine (``model.plan``) with the same tensors.

    The engine runs on the GPU it was built for, so its instances are KIND_GPU whatever ``config.gpu``
    says; the ONNX Runtime settings (threads, TensorRT accelerator) do not apply. The engine's
    optimization profile must cover ``max_batch_size`` and the warmup's token count.
    """
    profile = config.engine_profile
    if profile is None:
        raise RepositoryError(f"{config.name}: a TensorRT plan needs its engine profile (EngineProfile)")
    if not (profile.min_batch <= 1 and config.max_batch_size <= profile.max_batch):
        raise RepositoryError(
            f"{config.name}: Triton may form batches of 1..{config.max_batch_size}, but the engine's profile takes "
            f"{profile.min_batch}..{profile.max_batch}; rebuild it with compile.max_batch >= {config.max_batch_size}")
    if config.warmup_tokens and not profile.min_sequence <= config.warmup_tokens <= profile.max_sequence:
        raise RepositoryError(f"{config.name}: the {config.warmup_tokens}-token warmup is outside the engine's "
                              f"{profile.min_sequence}..{profile.max_sequence} tokens")
    lines = _model_lines(config, TENSORRT_PLATFORM, gpu=True, profile="0")
    return "\n".join(lines + _scheduling_lines(config)) + "\n"


def _model_lines(config: OnnxModelConfig, platform: str, gpu: bool, profile: str = "") -> list[str]:
    # An engine's instances name the optimization profile they run (a plan has one, "0").
    profiles = f' profile: [ "{profile}" ]' if profile else ""
    return [
        f'name: "{config.name}"',
        f'platform: "{platform}"',
        f"max_batch_size: {config.max_batch_size}",
        f"version_policy: {{ latest {{ num_versions: {config.versions_kept} }} }}",
        f"input [\n{_tensors(config.inputs)}\n]",
        f"output [\n{_tensors(config.outputs)}\n]",
        f"instance_group [ {{ count: {config.instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'}{profiles} }} ]",
    ]


def _scheduling_lines(config: OnnxModelConfig) -> list[str]:
    """Dynamic batching and the load-time warmup request, where configured."""
    lines = []
    if config.max_batch_size and (config.preferred_batch_sizes or config.max_queue_delay_us):
        sizes = ", ".join(map(str, config.preferred_batch_sizes))
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {sizes} ] "
                     f"max_queue_delay_microseconds: {config.max_queue_delay_us} }}")
    if config.warmup_tokens:
        lines.append(_warmup(config))
    return lines


@dataclass(frozen=True)
class ClassifierWriter:
    """How a classifier of one model format is served: its Triton platform, the file Triton loads
    (plus side files matching ``side_files``, e.g. ONNX external data) and its config renderer."""

    platform: str
    model_file: str
    render: Callable[[OnnxModelConfig], str]
    side_files: str = ""

    def files(self, model_dir: Path) -> list[Path]:
        return [model_dir / self.model_file, *(sorted(model_dir.glob(self.side_files)) if self.side_files else [])]


# Model format (the value of tasks.results.ModelFormat, which serving does not import) -> its writer.
# A new served format is one entry here (and a predictor in tasks.evaluate).
CLASSIFIER_WRITERS = {
    "onnx": ClassifierWriter(ONNX_PLATFORM, "model.onnx", render_config, side_files="*.onnx.data"),
    "tensorrt_plan": ClassifierWriter(TENSORRT_PLATFORM, "model.plan", render_plan_config),
}


def classifier_writer(model_format: str) -> ClassifierWriter:
    """The writer for a classifier of ``model_format``; ``RepositoryError`` naming the served formats."""
    try:
        return CLASSIFIER_WRITERS[model_format]
    except KeyError:
        raise RepositoryError(
            f"no Triton writer for {model_format!r} models; served formats: {', '.join(sorted(CLASSIFIER_WRITERS))}. "
            "Add a ClassifierWriter to serving.model_repository.CLASSIFIER_WRITERS"
        ) from None


def _warmup(config: OnnxModelConfig) -> str:
    """One zero-filled batch-1 request of ``warmup_tokens`` tokens per input, run at load time."""
    inputs = []
    for spec in config.inputs:
        dims = ", ".join(str(config.warmup_tokens if dim == -1 else dim) for dim in spec.dims)
        inputs.append(f'  inputs {{ key: "{spec.name}" value: {{ data_type: {_DATA_TYPES[spec.data_type]} '
                      f"dims: [ {dims} ] zero_data: true }} }}")
    body = "\n".join(inputs)
    return f'model_warmup [ {{\n  name: "zeros"\n  batch_size: 1\n{body}\n}} ]'


def _tensorrt_accelerator(precision: str, workspace_mb: int) -> str:
    """ONNX Runtime's TensorRT execution provider inside Triton's onnxruntime backend (GPU only)."""
    return (
        "optimization { execution_accelerators { gpu_execution_accelerator : [ {\n"
        '  name : "tensorrt"\n'
        f'  parameters {{ key: "precision_mode" value: "{precision}" }}\n'
        f'  parameters {{ key: "max_workspace_size_bytes" value: "{workspace_mb << 20}" }}\n'
        "} ] } }"
    )


CONFIG_SNAPSHOT = "config.pbtxt.snapshot"


def versions(repository: Path, model: str) -> list[int]:
    """Numeric version folders of ``model``, ascending."""
    folder = repository / model
    if not folder.exists():
        return []
    return sorted(int(entry.name) for entry in folder.iterdir() if entry.is_dir() and entry.name.isdigit())


def write_version(repository: Path, config: OnnxModelConfig, model_dir: Path,
                  files: tuple[str, ...] = ("model.onnx",)) -> int:
    """Copy ``files`` of ``model_dir`` into a new version folder and refresh ``config.pbtxt``.

    The version is assembled under a hidden temporary name and renamed into place, so Triton never
    sees a half-written version. Returns the new version number.
    """
    missing = [name for name in files if not (model_dir / name).exists()]
    if missing:
        raise RepositoryError(f"Could not find {missing} in {model_dir}")
    folder = repository / config.name
    folder.mkdir(parents=True, exist_ok=True)
    version = (versions(repository, config.name) or [0])[-1] + 1
    staging = folder / f".incoming-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in files:
        shutil.copy2(model_dir / name, staging / name)
    # ONNX external data files travel with the model.
    for extra in model_dir.glob("*.onnx.data"):
        shutil.copy2(extra, staging / extra.name)
    _write_text_atomic(folder / "config.pbtxt", render_config(config))
    staging.rename(folder / str(version))
    return version


def remove_version(repository: Path, model: str, version: int) -> None:
    shutil.rmtree(repository / model / str(version), ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


@dataclass(frozen=True)
class ClassifierEnsemble:
    """A raw-text classifier served as a Triton ensemble: tokenizer -> ONNX model -> postprocess.

    Clients call ``name`` with ``TEXT`` (strings, shape [n, 1]) and get ``LABEL``, ``PROBABILITIES``
    and ``LOGITS``. Each served version N is written to all four models at once (the same N).
    """

    name: str
    labels: tuple[str, ...]
    max_length: int
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    truncation: str = DEFAULT_TRUNCATION  # which max_length tokens of a longer text the tokenizer keeps
    intra_op_threads: int = 0
    instances: int = 1  # model instances of the classifier and the tokenizer (requests served at once)
    gpu: bool = False  # an ONNX classifier on the GPU (a TensorRT plan always is)
    tensorrt_precision: str = ""  # with gpu: ONNX Runtime hands the graph to TensorRT ("FP16", "FP32")

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise RepositoryError("instances must be >= 1")
        if len(self.labels) < 2 or any("," in label or '"' in label for label in self.labels):
            raise RepositoryError(f"labels {self.labels} must be two or more names without ',' or '\"'")
        if self.max_length < 1:
            raise RepositoryError("max_length must be >= 1")
        if self.truncation not in TRUNCATIONS:
            raise RepositoryError(f"truncation must be one of {list(TRUNCATIONS)}, got {self.truncation!r}")
        classifier_config(self.onnx_model, len(self.labels))  # validates the name

    @property
    def onnx_model(self) -> str:
        return f"{self.name}_onnx"

    @property
    def tokenizer_model(self) -> str:
        return f"{self.name}_tokenizer"

    @property
    def postprocess_model(self) -> str:
        return f"{self.name}_postprocess"

    @property
    def load_order(self) -> tuple[str, ...]:
        return ensemble_models(self.name)


def ensemble_models(name: str) -> tuple[str, ...]:
    """The models of ensemble ``name`` in load order: components first (the classifier before its
    tokenizer), the ensemble last."""
    return (f"{name}_onnx", f"{name}_tokenizer", f"{name}_postprocess", name)


# Ensemble components keep the two newest versions loaded: while version N of the ensemble (whose
# steps are pinned to version N of each component) replaces N-1, every request runs entirely on N-1
# or entirely on N, never on a new classifier with an old tokenizer.
COMPONENT_VERSIONS_KEPT = 2


def render_python_config(name: str, max_batch_size: int, inputs: tuple[TensorSpec, ...],
                         outputs: tuple[TensorSpec, ...], parameters: dict[str, str], instances: int = 1) -> str:
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        f"version_policy: {{ latest {{ num_versions: {COMPONENT_VERSIONS_KEPT} }} }}",
        f"input [\n{_tensors(inputs)}\n]",
        f"output [\n{_tensors(outputs)}\n]",
        f"instance_group [ {{ count: {instances} kind: KIND_CPU }} ]",
        *_parameters(parameters),
    ]
    if max_batch_size:
        # Requests already waiting go to the stub together (no added delay): one round trip to the
        # stub process per batch instead of per request.
        lines.append("dynamic_batching { }")
    return "\n".join(lines) + "\n"


def _maps(kind: str, pairs: dict[str, str]) -> str:
    return " ".join(f'{kind} {{ key: "{key}" value: "{value}" }}' for key, value in pairs.items())


def render_ensemble_config(ensemble: ClassifierEnsemble, version: int) -> str:
    """The ensemble's config for its version ``version``: every step pinned to that component version."""
    num_labels = len(ensemble.labels)
    steps = [
        (ensemble.tokenizer_model, {"TEXT": "TEXT"}, {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                                      "token_count": "TOKENS", "unknown_count": "UNKNOWN_TOKENS",
                                                      "embedding": EMBEDDING_OUTPUT.name}),
        (ensemble.onnx_model, {"input_ids": "input_ids", "attention_mask": "attention_mask"}, {"logits": "logits"}),
        (ensemble.postprocess_model, {"logits": "logits"},
         {"LOGITS": "LOGITS", "PROBABILITIES": "PROBABILITIES", "LABEL": "LABEL"}),
    ]
    rendered = ",\n".join(
        f'    {{ model_name: "{model}" model_version: {version} {_maps("input_map", inputs)} {_maps("output_map", outputs)} }}'
        for model, inputs, outputs in steps
    )
    lines = [
        f'name: "{ensemble.name}"',
        'platform: "ensemble"',
        f"max_batch_size: {ensemble.max_batch_size}",
        "version_policy: { latest { num_versions: 1 } }",
        f"input [\n{_tensors(TEXT_INPUT)}\n]",
        f"output [\n{_tensors(_ensemble_outputs(num_labels))}\n]",
        f"ensemble_scheduling {{\n  step [\n{rendered}\n  ]\n}}",
    ]
    return "\n".join(lines) + "\n"


TEXT_INPUT = (TensorSpec("TEXT", "string", (1,)),)

# The pooled input embedding the tokenizer model returns per text (for embedding drift monitoring):
# the mean of a projection table's rows over the text's tokens. The table (vocabulary x
# EMBEDDING_DIMS, float32, numpy .npy) is fitted at promotion (monitoring.embedding) and lies beside
# tokenizer.json in the tokenizer's version folder; a version without it returns NaN rows.
EMBEDDING_TABLE_FILE = "embedding_projection.npy"
EMBEDDING_DIMS = 16

TOKENIZER_OUTPUTS = (TensorSpec("input_ids", "int64", (-1,)), TensorSpec("attention_mask", "int64", (-1,)),
                     TensorSpec("token_count", "int64", (1,)), TensorSpec("unknown_count", "int64", (1,)),
                     TensorSpec("embedding", "fp32", (EMBEDDING_DIMS,)))
COUNT_OUTPUTS = (TensorSpec("TOKENS", "int64", (1,)), TensorSpec("UNKNOWN_TOKENS", "int64", (1,)))
EMBEDDING_OUTPUT = TensorSpec("EMBEDDING", "fp32", (EMBEDDING_DIMS,))


def _classifier_outputs(num_labels: int) -> tuple[TensorSpec, ...]:
    """What the postprocess model returns."""
    return (TensorSpec("LABEL", "string", (1,)), TensorSpec("PROBABILITIES", "fp32", (num_labels,)),
            TensorSpec("LOGITS", "fp32", (num_labels,)))


def _ensemble_outputs(num_labels: int) -> tuple[TensorSpec, ...]:
    """What clients get: the postprocess outputs plus each text's token and unknown-token counts and
    its pooled input embedding."""
    return _classifier_outputs(num_labels) + COUNT_OUTPUTS + (EMBEDDING_OUTPUT,)


def ensemble_versions(repository: Path, name: str) -> list[int]:
    """Versions present for the ensemble itself (each has matching component versions)."""
    return versions(repository, name)


def next_ensemble_version(repository: Path, name: str) -> int:
    """One more than any version folder of the ensemble's four models: one number per served version."""
    return 1 + max(max(versions(repository, model) + [0]) for model in ensemble_models(name))


def write_component_versions(repository: Path, ensemble: ClassifierEnsemble, model_dir: Path,
                             model_format: str = "onnx", tokenizer_files: tuple[Path, ...] = (),
                             min_version: int = 1) -> int:
    """Write version N of the ensemble's three components (not the ensemble) from a model folder.

    ``model_dir`` holds the model file of ``model_format`` (``model.onnx`` + external data, or
    ``model.plan``; see ``CLASSIFIER_WRITERS``) and ``tokenizer.json``. The classifier component keeps
    its name (``<name>_onnx``) whatever the format. ``tokenizer_files`` are copied beside
    ``tokenizer.json`` in the tokenizer's version (the embedding table, ``EMBEDDING_TABLE_FILE``).
    Nothing routes to the new components until ``write_ensemble_step`` adds the ensemble version
    pinned to them, so they can be loaded beside the serving version first. The version is the next
    free one, at least ``min_version`` (a repository rebuilt while Triton still serves a version from
    memory must not reuse its number).
    """
    writer = classifier_writer(model_format)
    missing = [name for name in (writer.model_file, "tokenizer.json") if not (model_dir / name).exists()]
    missing += [str(path) for path in tokenizer_files if not Path(path).is_file()]
    if missing:
        raise RepositoryError(f"Could not find {missing} in {model_dir}")
    _check_same_platform(repository / ensemble.onnx_model, writer.platform)
    version = max(next_ensemble_version(repository, ensemble.name), min_version)
    num_labels = len(ensemble.labels)
    layout = {
        ensemble.onnx_model: (writer.render(classifier_component_config(ensemble, model_dir, model_format)),
                              writer.files(model_dir)),
        ensemble.tokenizer_model: (
            render_python_config(
                ensemble.tokenizer_model, ensemble.max_batch_size, TEXT_INPUT, TOKENIZER_OUTPUTS,
                {"max_length": str(ensemble.max_length), "truncation": ensemble.truncation,
                 "pad_token": pad_token(model_dir)},
                instances=ensemble.instances,
            ),
            [PYTHON_MODELS_DIR / "tokenizer" / "model.py", NORMALISER_FILE, TRUNCATION_FILE,
             model_dir / "tokenizer.json", *(Path(path) for path in tokenizer_files)],
        ),
        ensemble.postprocess_model: (
            render_python_config(
                ensemble.postprocess_model, ensemble.max_batch_size, (TensorSpec("logits", "fp32", (num_labels,)),),
                _classifier_outputs(num_labels),
                {"labels": ",".join(ensemble.labels)},
            ),
            [PYTHON_MODELS_DIR / "postprocess" / "model.py"],
        ),
    }
    _write_versions(repository, version, layout)
    return version


def classifier_component_config(ensemble: ClassifierEnsemble, model_dir: Path, model_format: str) -> OnnxModelConfig:
    """The classifier component's config: on the GPU with the TensorRT accelerator where the ensemble
    says so; for a TensorRT plan, with the engine's profile, which must take the tokenizer's tokens."""
    config = replace(classifier_config(ensemble.onnx_model, len(ensemble.labels), ensemble.intra_op_threads,
                                       ensemble.max_batch_size, ensemble.instances),
                     versions_kept=COMPONENT_VERSIONS_KEPT, gpu=ensemble.gpu,
                     tensorrt_precision=ensemble.tensorrt_precision)
    if classifier_writer(model_format).platform != TENSORRT_PLATFORM:
        return config
    profile = EngineProfile.read(model_dir)
    if not (profile.min_sequence <= 1 and ensemble.max_length <= profile.max_sequence):
        raise RepositoryError(f"{model_dir}: the tokenizer sends 1..{ensemble.max_length} tokens, but the engine "
                              f"takes {profile.min_sequence}..{profile.max_sequence}; rebuild it with "
                              f"compile.max_sequence >= {ensemble.max_length}")
    return replace(config, gpu=True, tensorrt_precision="", engine_profile=profile)


def _check_same_platform(folder: Path, platform: str) -> None:
    """A model's config is shared by its loaded versions: a new version of another platform would make
    Triton reload the serving version under that platform, so it is refused."""
    config = folder / "config.pbtxt"
    if not config.exists():
        return
    found = re.search(r'^platform: "([^"]+)"', config.read_text(), flags=re.MULTILINE)
    if found and found.group(1) != platform:
        raise RepositoryError(
            f"{folder.name} serves {found.group(1)} models; a {platform} version beside them is not supported yet "
            "(the shared config.pbtxt would reload the serving version as the new platform). "
            "Serve it under another model name"
        )


def write_ensemble_step(repository: Path, name: str, version: int, config_text: str,
                        files: tuple[Path, ...] = ()) -> None:
    """Add version N of the ensemble itself (its config pins every step to component version N).
    Loading it switches traffic to N at once, so it is written only once the components are loaded."""
    _write_versions(repository, version, {name: (config_text, list(files))})


def write_shadow_ensemble(repository: Path, ensemble: ClassifierEnsemble, version: int) -> str:
    """An ensemble named ``<name>_shadow`` over component version N, which loads beside the serving
    ones without taking any traffic from the ensemble itself (``serving/shadow.py``); its name."""
    from serving.shadow import shadow_model

    name = shadow_model(ensemble.name)
    config = render_ensemble_config(ensemble, version).replace(f'name: "{ensemble.name}"', f'name: "{name}"', 1)
    _write_versions(repository, version, {name: (config, [])})
    return name


def remove_model(repository: Path, model: str) -> None:
    """Delete a model's folder (a shadow ensemble after its shadow)."""
    shutil.rmtree(repository / model, ignore_errors=True)


def write_ensemble_version(repository: Path, ensemble: ClassifierEnsemble, model_dir: Path,
                           model_format: str = "onnx") -> int:
    """Write version N of the ensemble and its three components in one go (for a repository that
    Triton loads afterwards; a live switch writes and loads the components first, see tasks.promote)."""
    version = write_component_versions(repository, ensemble, model_dir, model_format)
    write_ensemble_step(repository, ensemble.name, version, render_ensemble_config(ensemble, version))
    return version


# In each ensemble version folder: which registered model version its files are (written by a
# promotion; the reconcile loop finds a version's files by it).
REGISTERED_VERSION_FILE = "registered_version.json"


def write_registered_version(folder: Path, registered_model: str, version: str) -> Path:
    """The marker file naming ``registered_model`` ``version``, in ``folder`` (to be copied into an
    ensemble version folder)."""
    path = folder / REGISTERED_VERSION_FILE
    path.write_text(json.dumps({"registered_model": registered_model, "version": str(version)}))
    return path


def registered_version(repository: Path, name: str, version: int) -> tuple[str, str] | None:
    """(registered model, version) whose files ensemble ``name`` version ``version`` holds, or None for
    a folder without the marker (written before markers, or by hand)."""
    path = repository / name / str(version) / REGISTERED_VERSION_FILE
    try:
        data = json.loads(path.read_text())
        return str(data["registered_model"]), str(data["version"])
    except (OSError, ValueError, KeyError):
        return None


def copy_ensemble_components(repository: Path, name: str, source: int) -> int:
    """Copy version ``source`` of the three components to a new version N (serving an older model again
    goes forward, through the same path as a promotion). Each component gets its config of ``source``."""
    missing = [model for model in ensemble_models(name)[:-1] if not (repository / model / str(source)).is_dir()]
    if missing:
        raise RepositoryError(f"version {source} of {missing} is no longer in {repository}")
    version = next_ensemble_version(repository, name)
    layout = {}
    for model in ensemble_models(name)[:-1]:
        folder = repository / model / str(source)
        files = [path for path in folder.iterdir() if path.is_file() and path.name != CONFIG_SNAPSHOT]
        config_text = (folder / CONFIG_SNAPSHOT).read_text()
        if model == f"{name}_tokenizer":
            config_text = with_outputs(config_text, TOKENIZER_OUTPUTS)
        layout[model] = (config_text, files)
    _write_versions(repository, version, layout)
    return version


def with_outputs(config_text: str, outputs: tuple[TensorSpec, ...]) -> str:
    """``config_text`` with those of ``outputs`` it does not declare added to its ``output`` list.

    A model's config is shared by all its loaded versions. The copy of a tokenizer version written
    before an output existed (the embedding) keeps declaring it: otherwise its config would reload
    the serving version without that output while the serving ensemble still maps it, and Triton
    would refuse that ensemble mid-switch. The older ``model.py`` does not return it, and the older
    ensemble that routes to the copy never asks for it."""
    declared = set(re.findall(r'\{ name: "([^"]+)"', config_text))
    added = tuple(spec for spec in outputs if spec.name not in declared)
    block = re.search(r"^output \[\n(.*?)\n\]", config_text, flags=re.MULTILINE | re.DOTALL)
    if not added or block is None:
        return config_text
    body = f"{block.group(1)},\n{_tensors(added)}"
    return config_text[:block.start(1)] + body + config_text[block.end(1):]


def repinned_ensemble_config(repository: Path, name: str, source: int, version: int) -> str:
    """The ensemble config of version ``source`` with its steps pinned to component version ``version``."""
    text = (repository / name / str(source) / CONFIG_SNAPSHOT).read_text()
    return re.sub(r"\bmodel_version: \d+\b", f"model_version: {version}", text)


def _write_versions(repository: Path, version: int, layout: dict[str, tuple[str, list[Path]]]) -> None:
    """Stage version ``version`` of each model under a hidden name, then rename all into place.

    ``config.pbtxt`` is per model, not per version: each version keeps its own copy (to go back to),
    and the model's config is rewritten only when its text changes (a rewrite makes Triton reload
    every loaded version of the model, not just add the new one).
    """
    staged = []
    try:
        for model, (config_text, files) in layout.items():
            folder = repository / model
            folder.mkdir(parents=True, exist_ok=True)
            staging = folder / f".incoming-{version}"
            shutil.rmtree(staging, ignore_errors=True)
            staged.append((staging, folder / str(version)))
            staging.mkdir()
            for source in files:
                shutil.copy2(source, staging / source.name)
            (staging / CONFIG_SNAPSHOT).write_text(config_text)
            write_config_if_changed(folder, config_text)
    except OSError:  # a full disk: no half-written folder is left behind
        for staging, _ in staged:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    for staging, final in staged:
        staging.rename(final)


def write_config_if_changed(folder: Path, config_text: str) -> bool:
    config = folder / "config.pbtxt"
    if config.exists() and config.read_text() == config_text:
        return False
    _write_text_atomic(config, config_text)
    return True


def remove_ensemble_version(repository: Path, name: str, version: int, models: tuple[str, ...] | None = None) -> None:
    """Delete version N of the ensemble's models (all four unless ``models`` names some)."""
    for model in models or ensemble_models(name):
        remove_version(repository, model, version)


def restore_config(repository: Path, model: str, version: int) -> None:
    """Make version N's own config the model's config again (when N serves again after a failure)."""
    snapshot = repository / model / str(version) / CONFIG_SNAPSHOT
    if snapshot.exists():
        write_config_if_changed(repository / model, snapshot.read_text())


def pad_token(model_dir: Path) -> str:
    """The tokenizer's padding token, from its saved config (``[PAD]`` for BERT-style tokenizers)."""
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get("pad_token")
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                return str(value)
    return "[PAD]"

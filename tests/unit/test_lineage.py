"""The "nothing changed" check compares the data, the effective configuration, the teacher and the code
with the champion's version tags, against a real MLflow tracking store (SQLite in a temporary folder);
the lineage functions on tiny temporary folders."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tasks import lineage, pipeline, registry
from tasks.results import StepResult, StepStatus
from tasks.settings import PipelineSettings

DATA_HASH = "ab" * 32
_model_names = (f"model-{index}" for index in itertools.count())


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture()
def settings(tracking_uri, tmp_path) -> PipelineSettings:
    return PipelineSettings(runs_dir=tmp_path / "runs", mlflow_tracking_uri=tracking_uri, triton_url="unused",
                            triton_model_repository=tmp_path / "models", assets_cache=tmp_path / "assets")


@pytest.fixture()
def teacher(tmp_path) -> Path:
    folder = tmp_path / "teacher"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\nhello\n")
    return folder


def _config(teacher: Path, registered_model: str | None = None, **params):
    """A run's config; each test registers its own model, so tests share the store but no champion."""
    overrides = {"promote": {"registered_model": registered_model or next(_model_names)}}
    return pipeline.config_from_params({"teacher": str(teacher), "data_source": "reviews.csv", **params,
                                        "overrides": overrides})


def _data(data_hash: str = DATA_HASH) -> dict:
    return StepResult("prepare_data", StepStatus.SUCCESS, info={"data_hash": data_hash}).to_dict()


def _register_champion(settings, config, tags: dict[str, str]) -> str:
    """A version registered as register_candidates does (parent run with the run's params, nested run,
    version tagged with ``tags`` and the pipeline run id), with the champion alias on it."""
    from tasks.model_aliases import mlflow_client

    uri, name = settings.mlflow_tracking_uri, config.promote.registered_model
    run_key = f"run-of-{name}"
    parent = registry.parent_run_id(uri, settings.experiment, run_key, pipeline.run_params(config))
    client = mlflow_client(uri)
    experiment_id = client.get_run(parent).info.experiment_id
    nested = client.create_run(experiment_id, tags={registry.RUN_TAG: run_key, registry.ROLE_TAG: "candidate",
                                                    "mlflow.parentRunId": parent})
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"runs:/{nested.info.run_id}/model",
                                          run_id=nested.info.run_id, tags=tags | {registry.RUN_TAG: run_key})
    client.set_registered_model_alias(name, config.promote.alias, version.version)
    return version.version


def _champion_of_this_run(settings, config, data: dict) -> str:
    return _register_champion(settings, config, pipeline.run_lineage(settings, config, data).tags())


def test_same_params_data_teacher_and_code_stop_the_run(settings, teacher):
    config = _config(teacher, epochs=2.0)
    version = _champion_of_this_run(settings, config, _data())

    verdict = pipeline.changed_since_champion(settings, config, _data(), force=False)

    assert verdict["changed"] is False
    assert verdict["reason"].startswith(f"nothing changed: champion v{version} was trained on this data")
    assert "this configuration, this teacher and this code" in verdict["reason"]
    assert "set force_retrain to train anyway" in verdict["reason"]
    assert pipeline.changed_since_champion(settings, config, _data(), force=True)["changed"] is True


def test_a_changed_param_trains_and_the_reason_names_it(settings, teacher):
    champion_config = _config(teacher, epochs=2.0)
    _champion_of_this_run(settings, champion_config, _data())
    config = _config(teacher, champion_config.promote.registered_model, epochs=3.0)

    verdict = pipeline.changed_since_champion(settings, config, _data(), force=False)

    assert verdict["changed"] is True
    assert "configuration changed: finetune.epochs 2.0 -> 3.0" in verdict["reason"], verdict["reason"]
    assert not any(f"{component} " in verdict["reason"] for component in ("data", "teacher", "code")), verdict["reason"]


def test_a_changed_param_is_named_by_hash_when_the_champion_run_is_gone(settings, teacher):
    champion_config = _config(teacher)
    tags = pipeline.run_lineage(settings, champion_config, _data()).tags() | {"config_hash": "0" * 64}
    _register_champion(settings, champion_config, tags)
    from tasks.model_aliases import mlflow_client

    client = mlflow_client(settings.mlflow_tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id],
                                filter_string=f"tags.pipeline_run_id = 'run-of-{champion_config.promote.registered_model}'")
    for run in parent:
        client.delete_run(run.info.run_id)

    verdict = pipeline.changed_since_champion(settings, champion_config, _data(), force=False)

    assert verdict["changed"] is True
    assert f"configuration changed (hash 000000000000 -> {lineage.config_hash(champion_config)[:12]})" in \
        verdict["reason"], verdict["reason"]


def test_a_changed_teacher_folder_trains(settings, teacher):
    config = _config(teacher)
    _champion_of_this_run(settings, config, _data())
    (teacher / "model.safetensors").write_bytes(b"other weights")

    verdict = pipeline.changed_since_champion(settings, config, _data(), force=False)

    assert verdict["changed"] is True
    assert "teacher sha256:" in verdict["reason"] and "configuration" not in verdict["reason"], verdict["reason"]


def test_changed_data_or_code_trains_and_says_which(settings, teacher):
    config = _config(teacher)
    tags = pipeline.run_lineage(settings, config, _data()).tags() | {"code_version": "0123456789ab"}
    _register_champion(settings, config, tags)

    verdict = pipeline.changed_since_champion(settings, config, _data("cd" * 32), force=False)

    assert verdict["changed"] is True
    assert f"data {'ab' * 6} -> {'cd' * 6}" in verdict["reason"], verdict["reason"]
    assert f"code 0123456789ab -> {lineage.code_version()}" in verdict["reason"], verdict["reason"]


def test_no_champion_trains(settings, teacher):
    verdict = pipeline.changed_since_champion(settings, _config(teacher), _data(), force=False)

    assert verdict["changed"] is True and "has no 'champion' yet" in verdict["reason"]


def test_a_champion_registered_before_the_lineage_tags_trains(settings, teacher):
    config = _config(teacher)
    tags = pipeline.run_lineage(settings, config, _data()).tags()
    _register_champion(settings, config, {"data_hash": tags["data_hash"], "code_version": tags["code_version"]})

    verdict = pipeline.changed_since_champion(settings, config, _data(), force=False)

    assert verdict["changed"] is True
    assert "the champion has no config_hash, teacher_id tag" in verdict["reason"], verdict["reason"]


def test_the_config_hash_covers_the_effective_configuration(teacher):
    default = pipeline.config_from_params({"teacher": str(teacher)})
    explicit = pipeline.config_from_params({"teacher": str(teacher), "epochs": default.finetune.epochs})

    assert lineage.config_hash(default) == lineage.config_hash(explicit)
    assert lineage.config_hash(default) != lineage.config_hash(pipeline.config_from_params(
        {"teacher": str(teacher), "prune": False}))
    assert len(lineage.config_hash(default)) == 64


def test_the_teacher_identity_is_the_content_of_its_folder(teacher, tmp_path):
    identity = lineage.teacher_identity(str(teacher))
    moved = tmp_path / "elsewhere"
    teacher.rename(moved)

    assert identity.startswith("sha256:") and len(identity) == len("sha256:") + 64
    assert lineage.teacher_identity(str(moved)) == identity  # where it lies is not what it is
    (moved / ".cache").mkdir()
    (moved / ".cache" / "download.metadata").write_text("etag and a timestamp")
    assert lineage.teacher_identity(str(moved)) == identity  # download bookkeeping is not the model
    (moved / "tokenizer" / "vocab.txt").rename(moved / "tokenizer" / "vocab2.txt")
    assert lineage.teacher_identity(str(moved)) != identity  # a renamed file is a different model
    (moved / "tokenizer" / "vocab2.txt").rename(moved / "tokenizer" / "vocab.txt")
    assert lineage.teacher_identity(str(moved)) == identity
    (moved / "config.json").write_text('{"hidden_size": 16}')
    assert lineage.teacher_identity(str(moved)) != identity


def test_a_hub_teacher_is_its_id_with_any_revision():
    assert lineage.teacher_identity("prajjwal1/bert-tiny") == "prajjwal1/bert-tiny"
    assert lineage.teacher_identity("prajjwal1/bert-tiny@6f75de8") == "prajjwal1/bert-tiny@6f75de8"


def _sources(root: Path) -> Path:
    for package in lineage.SOURCE_PACKAGES:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text(f"# {package}\n")
    return root


def test_the_code_version_is_the_stamped_file_else_a_hash_of_the_sources(tmp_path):
    root = _sources(tmp_path / "project")
    hashed = lineage.code_version(root)
    assert hashed.startswith("sources sha256:") and len(hashed) == len("sources sha256:") + 12
    (root / "tasks" / "__init__.py").write_text("# tasks, edited\n")
    assert lineage.code_version(root) != hashed
    edited = lineage.code_version(root)
    (root / "tasks" / "__pycache__").mkdir()
    (root / "tasks" / "__pycache__" / "stale.py").write_text("# not a source\n")
    (root / "tasks" / "notes.txt").write_text("not Python")
    assert lineage.code_version(root) == edited

    (root / lineage.CODE_VERSION_FILE).write_text("0123456789ab\n")
    assert lineage.code_version(root) == "0123456789ab"
    (root / lineage.CODE_VERSION_FILE).write_text("\n")  # an empty stamp is no stamp
    assert lineage.code_version(root) == edited


@pytest.mark.skipif(not (lineage.REPO_ROOT / ".git").exists(), reason="not a git checkout")
def test_the_code_version_of_this_checkout_is_its_commit():
    version = lineage.code_version()
    commit, _, dirty = version.partition("+dirty:")
    assert len(commit) == 12 and not commit.startswith("sources ")
    assert not dirty or dirty == lineage.sources_hash()[:12]  # uncommitted edits: which edits, too

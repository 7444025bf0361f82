import json
from dataclasses import replace

import pytest
from tritonclient.grpc import model_config_pb2

from serving import model_repository as repo


def test_render_config_is_standard_triton_text():
    text = repo.render_config(repo.classifier_config("text_classifier", 2, intra_op_threads=2))
    assert 'platform: "onnxruntime_onnx"' in text
    assert 'name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ]' in text
    assert 'name: "logits" data_type: TYPE_FP32 dims: [ 2 ]' in text
    assert "instance_group [ { count: 1 kind: KIND_CPU } ]" in text
    assert 'key: "intra_op_thread_count" value: { string_value: "2" }' in text
    assert "version_policy: { latest { num_versions: 1 } }" in text


def test_write_version_counts_up_atomically(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"onnx")
    config = repo.classifier_config("clf", 3)
    assert repo.write_version(tmp_path / "repo", config, model_dir) == 1
    assert repo.write_version(tmp_path / "repo", config, model_dir) == 2
    assert repo.versions(tmp_path / "repo", "clf") == [1, 2]
    assert (tmp_path / "repo" / "clf" / "2" / "model.onnx").read_bytes() == b"onnx"
    assert not list((tmp_path / "repo" / "clf").glob(".incoming-*"))
    repo.remove_version(tmp_path / "repo", "clf", 2)
    assert repo.versions(tmp_path / "repo", "clf") == [1]


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(repo.RepositoryError, match="model.onnx"):
        repo.write_version(tmp_path / "repo", repo.classifier_config("clf", 2), tmp_path)


@pytest.mark.parametrize("kwargs", [{"name": "bad name"}, {"name": "ok", "instances": 0}])
def test_invalid_configs_are_rejected(kwargs):
    base = {"name": "ok", "inputs": (repo.TensorSpec("x", "int64", (-1,)),),
            "outputs": (repo.TensorSpec("y", "fp32", (2,)),)}
    with pytest.raises(repo.RepositoryError):
        repo.OnnxModelConfig(**(base | kwargs))


def test_invalid_tensor_specs_are_rejected():
    with pytest.raises(repo.RepositoryError):
        repo.TensorSpec("x", "float64", (1,))
    with pytest.raises(repo.RepositoryError):
        repo.TensorSpec("x", "fp32", (0,))


def test_servable_models_are_loaded_at_startup(tmp_path):
    from serving.triton_server import servable_models

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.onnx").write_bytes(b"onnx")
    repo.write_version(tmp_path / "repo", repo.classifier_config("served", 2), model_dir)
    (tmp_path / "repo" / "no_versions").mkdir()
    (tmp_path / "repo" / "no_versions" / "config.pbtxt").write_text("")
    assert servable_models(tmp_path / "repo") == ["served"]
    assert servable_models(tmp_path / "missing") == []


def _exported(tmp_path, folder: str = "exported", model_file: str = "model.onnx", content: bytes = b"onnx"):
    """A model folder as the export (or compile) step leaves it: the model file and the tokenizer."""
    model_dir = tmp_path / folder
    model_dir.mkdir(parents=True)
    (model_dir / model_file).write_bytes(content)
    (model_dir / "tokenizer.json").write_text("{}")
    return model_dir


def test_ensemble_versions_are_written_to_every_model_with_one_number(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, intra_op_threads=2)
    repository = tmp_path / "repo"
    assert repo.write_ensemble_version(repository, ensemble, _exported(tmp_path)) == 1
    assert repo.write_ensemble_version(repository, ensemble, _exported(tmp_path / "b")) == 2
    for model in ensemble.load_order:
        assert repo.versions(repository, model) == [1, 2]
        assert (repository / model / "config.pbtxt").exists()
    assert (repository / "clf_tokenizer" / "2" / "tokenizer.json").exists()
    assert (repository / "clf_tokenizer" / "2" / "model.py").exists()
    # The tokenizer model normalises texts with the training's function, shipped beside it.
    assert (repository / "clf_tokenizer" / "2" / "text.py").read_text() == repo.NORMALISER_FILE.read_text()
    assert (repository / "clf_postprocess" / "2" / "model.py").exists()
    assert (repository / "clf_onnx" / "2" / "model.onnx").exists()
    ensemble_text = (repository / "clf" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ensemble_text
    assert ensemble_text.index('"clf_tokenizer"') < ensemble_text.index('"clf_onnx"') < ensemble_text.index(
        '"clf_postprocess"')
    assert 'key: "labels" value: { string_value: "negative,positive" }' in (
        repository / "clf_postprocess" / "config.pbtxt").read_text()
    assert 'key: "max_length" value: { string_value: "64" }' in (repository / "clf_tokenizer" / "config.pbtxt").read_text()

    assert ensemble_text.count("model_version: 2 ") == 3  # every step pinned to this version
    # Version 1 keeps its own pinning for rollback.
    assert (repository / "clf" / "1" / repo.CONFIG_SNAPSHOT).read_text().count("model_version: 1 ") == 3

    repo.remove_ensemble_version(repository, "clf", 2)
    assert all(repo.versions(repository, model) == [1] for model in ensemble.load_order)


def test_a_failed_write_leaves_no_half_written_version(tmp_path):
    """A write that fails midway (a full disk; here the tokenizer file cannot be copied) raises and
    leaves neither a new version nor a staging folder, in any component."""
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64)
    repository = tmp_path / "repo"
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path))
    broken = _exported(tmp_path / "b")
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.json").mkdir()  # copying it fails after the classifier's folder is staged
    with pytest.raises(OSError):
        repo.write_component_versions(repository, ensemble, broken)
    assert all(repo.versions(repository, model) == [1] for model in ensemble.load_order)
    assert not list(repository.glob("*/.incoming-*"))


def test_components_are_written_before_the_ensemble_that_routes_to_them(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64)
    repository = tmp_path / "repo"
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path))
    version = repo.write_component_versions(repository, ensemble, _exported(tmp_path / "b"))
    assert version == 2
    assert repo.ensemble_versions(repository, "clf") == [1]  # nothing routes to version 2 yet
    assert all(repo.versions(repository, model) == [1, 2] for model in ensemble.load_order[:-1])
    assert (repository / "clf" / "config.pbtxt").read_text().count("model_version: 1 ") == 3
    reference = tmp_path / "reference.parquet"
    reference.write_bytes(b"x")
    repo.write_ensemble_step(repository, "clf", version, repo.render_ensemble_config(ensemble, version), (reference,))
    assert repo.ensemble_versions(repository, "clf") == [1, 2]
    assert (repository / "clf" / "2" / "reference.parquet").exists()
    assert not list((repository / "clf").glob(".incoming-*"))


def _long_then_short(tmp_path):
    """A repository with version 1 (max_length 128) and version 2 (max_length 64) of ensemble clf."""
    repository = tmp_path / "repo"
    for folder, max_length in (("a", 128), ("b", 64)):
        ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=max_length)
        repo.write_ensemble_version(repository, ensemble, _exported(tmp_path / folder))
    return repository


def test_an_older_version_is_served_again_as_a_new_version(tmp_path):
    repository = _long_then_short(tmp_path)
    (repository / "clf_onnx" / "1" / "model.onnx").write_bytes(b"version one")
    version = repo.copy_ensemble_components(repository, "clf", 1)
    assert version == 3
    assert (repository / "clf_onnx" / "3" / "model.onnx").read_bytes() == b"version one"
    assert (repository / "clf_tokenizer" / "3" / "tokenizer.json").exists()
    # The copy brings version 1's own config back (max_length 128), the ensemble still routes to 2.
    assert '"128"' in (repository / "clf_tokenizer" / "config.pbtxt").read_text()
    assert repo.ensemble_versions(repository, "clf") == [1, 2]
    config = repo.repinned_ensemble_config(repository, "clf", 1, 3)
    assert config.count("model_version: 3 ") == 3 and "model_version: 1 " not in config
    assert _parsed(config).ensemble_scheduling.step[0].model_version == 3
    repo.remove_version(repository, "clf_onnx", 1)
    with pytest.raises(repo.RepositoryError, match="no longer"):
        repo.copy_ensemble_components(repository, "clf", 1)


def test_a_config_is_rewritten_only_when_its_text_changes(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert repo.write_config_if_changed(folder, "a") is True
    assert repo.write_config_if_changed(folder, "a") is False
    assert repo.write_config_if_changed(folder, "b") is True
    assert (folder / "config.pbtxt").read_text() == "b"


def test_each_version_keeps_its_own_config_for_rollback(tmp_path):
    repository = _long_then_short(tmp_path)
    config = repository / "clf_tokenizer" / "config.pbtxt"
    assert '"64"' in config.read_text()
    repo.restore_config(repository, "clf_tokenizer", 1)
    assert '"128"' in config.read_text() and '"64"' not in config.read_text()


def test_pad_token_comes_from_the_tokenizer_config(tmp_path):
    assert repo.pad_token(tmp_path) == "[PAD]"
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": "<pad>"}')
    assert repo.pad_token(tmp_path) == "<pad>"


def test_ensemble_rejects_bad_labels_and_missing_files(tmp_path):
    with pytest.raises(repo.RepositoryError):
        repo.ClassifierEnsemble("clf", ("only-one",), max_length=8)
    with pytest.raises(repo.RepositoryError):
        repo.ClassifierEnsemble("clf", ("a,b", "c"), max_length=8)
    ensemble = repo.ClassifierEnsemble("clf", ("a", "b"), max_length=8)
    with pytest.raises(repo.RepositoryError, match="tokenizer.json"):
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.onnx").write_bytes(b"x")
        repo.write_ensemble_version(tmp_path / "repo", ensemble, tmp_path / "m")


def _parsed(text: str):
    """Parse with Triton's own model configuration schema (fails on any unknown field)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_rendered_configs_follow_tritons_schema():
    cpu = _parsed(repo.render_config(repo.classifier_config("text_classifier", 2, intra_op_threads=2)))
    assert cpu.platform == "onnxruntime_onnx" and cpu.max_batch_size == 32
    assert cpu.parameters["intra_op_thread_count"].string_value == "2"
    assert cpu.instance_group[0].kind == cpu.instance_group[0].KIND_CPU


def test_gpu_config_hands_the_onnx_graph_to_tensorrt():
    config = repo.OnnxModelConfig(
        name="text_classifier",
        inputs=(repo.TensorSpec("input_ids", "int64", (-1,)),),
        outputs=(repo.TensorSpec("logits", "fp32", (2,)),),
        gpu=True, tensorrt_precision="FP16", tensorrt_workspace_mb=512,
    )
    parsed = _parsed(repo.render_config(config))
    assert parsed.instance_group[0].kind == parsed.instance_group[0].KIND_GPU
    (accelerator,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": str(512 << 20)}


def test_tensorrt_accelerator_needs_the_gpu():
    with pytest.raises(repo.RepositoryError, match="GPU"):
        repo.OnnxModelConfig(name="m", inputs=(), outputs=(), tensorrt_precision="FP16")


def test_every_config_of_an_ensemble_version_follows_tritons_schema(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, intra_op_threads=2)
    repository = tmp_path / "repo"
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path))
    version = repo.write_ensemble_version(repository, ensemble, _exported(tmp_path / "b"))
    configs = {model: _parsed((repository / model / "config.pbtxt").read_text()) for model in ensemble.load_order}
    steps = configs["clf"].ensemble_scheduling.step
    assert [step.model_name for step in steps] == ["clf_tokenizer", "clf_onnx", "clf_postprocess"]
    assert all(step.model_version == version for step in steps)
    assert configs["clf"].version_policy.latest.num_versions == 1
    for component in ("clf_onnx", "clf_tokenizer", "clf_postprocess"):
        assert configs[component].version_policy.latest.num_versions == repo.COMPONENT_VERSIONS_KEPT
    assert configs["clf_tokenizer"].backend == "python" and configs["clf_onnx"].platform == "onnxruntime_onnx"
    for component in ("clf_tokenizer", "clf_postprocess"):  # waiting requests reach the stub together
        assert configs[component].HasField("dynamic_batching")
        assert configs[component].dynamic_batching.max_queue_delay_microseconds == 0


def test_classifier_config_batches_dynamically_and_warms_up():
    parsed = _parsed(repo.render_config(repo.classifier_config("text_classifier", 2)))
    assert list(parsed.dynamic_batching.preferred_batch_size) == [4, 8]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    (warmup,) = parsed.model_warmup
    assert warmup.batch_size == 1
    assert {name: (list(item.dims), item.zero_data) for name, item in warmup.inputs.items()} == {
        "input_ids": ([16], True), "attention_mask": ([16], True)}
    plain = repo.render_config(repo.OnnxModelConfig("m", (), (), preferred_batch_sizes=(), max_queue_delay_us=0,
                                                    warmup_tokens=0))
    assert "dynamic_batching" not in plain and "model_warmup" not in plain
    with pytest.raises(repo.RepositoryError, match="preferred_batch_sizes"):
        repo.OnnxModelConfig("m", (), (), max_batch_size=8, preferred_batch_sizes=(16,))


def test_instances_apply_to_the_classifier_and_the_tokenizer(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, instances=2)
    repository = tmp_path / "repo"
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path))
    for model in (ensemble.onnx_model, ensemble.tokenizer_model):
        assert _parsed((repository / model / "config.pbtxt").read_text()).instance_group[0].count == 2
    assert _parsed((repository / ensemble.postprocess_model / "config.pbtxt").read_text()).instance_group[0].count == 1
    with pytest.raises(repo.RepositoryError, match="instances"):
        repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, instances=0)


PROFILE = {"min_batch": 1, "opt_batch": 8, "max_batch": 32, "min_sequence": 1, "opt_sequence": 128,
           "max_sequence": 128}


def _plan_folder(tmp_path, profile=None):
    """An engine folder as tasks.compile leaves it: the plan, the tokenizer and the recorded profile."""
    folder = _exported(tmp_path, folder="engine", model_file="model.plan", content=b"engine")
    (folder / repo.ENGINE_PROFILE_FILE).write_text(json.dumps((profile or PROFILE) | {"precision": "fp16"}))
    return folder


def test_a_tensorrt_plan_classifier_gets_a_tensorrt_plan_config_on_the_gpu():
    profile = repo.EngineProfile(min_batch=1, max_batch=32, min_sequence=1, max_sequence=128)
    config = replace(repo.classifier_config("clf_onnx", 2, intra_op_threads=2), engine_profile=profile)
    parsed = _parsed(repo.render_plan_config(config))
    assert parsed.platform == "tensorrt_plan" and parsed.max_batch_size == 32
    (group,) = parsed.instance_group
    assert group.kind == group.KIND_GPU and group.count == 1 and list(group.profile) == ["0"]
    assert not parsed.parameters and not parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert [(item.name, item.data_type, list(item.dims)) for item in parsed.input] == [
        ("input_ids", model_config_pb2.TYPE_INT64, [-1]), ("attention_mask", model_config_pb2.TYPE_INT64, [-1])]
    assert [(item.name, list(item.dims)) for item in parsed.output] == [("logits", [2])]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500 and len(parsed.model_warmup) == 1


def test_a_plan_config_must_fit_the_engines_profile():
    config = repo.classifier_config("clf_onnx", 2)
    with pytest.raises(repo.RepositoryError, match="needs its engine profile"):
        repo.render_plan_config(config)
    small = repo.EngineProfile(min_batch=1, max_batch=16, min_sequence=1, max_sequence=128)
    with pytest.raises(repo.RepositoryError, match="batches of 1..32.*1..16.*max_batch >= 32"):
        repo.render_plan_config(replace(config, engine_profile=small))
    long_only = repo.EngineProfile(min_batch=1, max_batch=32, min_sequence=32, max_sequence=128)
    with pytest.raises(repo.RepositoryError, match="16-token warmup is outside"):
        repo.render_plan_config(replace(config, engine_profile=long_only))
    assert "model_warmup" not in repo.render_plan_config(replace(config, engine_profile=long_only, warmup_tokens=0))


def test_an_engine_too_short_for_the_tokenizer_is_refused_before_anything_is_written(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=256)
    with pytest.raises(repo.RepositoryError, match="sends 1..256 tokens.*1..128.*max_sequence >= 256"):
        repo.write_ensemble_version(tmp_path / "repo", ensemble, _plan_folder(tmp_path), "tensorrt_plan")
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").rglob("model.plan"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "model.plan").write_bytes(b"engine")
    (tmp_path / "bare" / "tokenizer.json").write_text("{}")
    with pytest.raises(repo.RepositoryError, match="no compile_config.json"):
        repo.write_ensemble_version(tmp_path / "repo2", replace(ensemble, max_length=64), tmp_path / "bare",
                                    "tensorrt_plan")


def test_an_fp16_onnx_classifier_runs_on_the_gpu_through_the_tensorrt_accelerator(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64, gpu=True,
                                       tensorrt_precision="FP16")
    repository = tmp_path / "repo"
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path))
    parsed = _parsed((repository / "clf_onnx" / "config.pbtxt").read_text())
    assert parsed.platform == "onnxruntime_onnx" and parsed.instance_group[0].kind == parsed.instance_group[0].KIND_GPU
    (accelerator,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    tokenizer = _parsed((repository / "clf_tokenizer" / "config.pbtxt").read_text())
    assert tokenizer.instance_group[0].kind == tokenizer.instance_group[0].KIND_CPU  # the python models stay on CPU


def test_the_classifier_writer_is_chosen_by_the_model_format(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64)
    onnx_repository, plan_repository = tmp_path / "onnx_repo", tmp_path / "plan_repo"
    repo.write_ensemble_version(onnx_repository, ensemble, _exported(tmp_path))
    version = repo.write_ensemble_version(plan_repository, ensemble, _plan_folder(tmp_path), "tensorrt_plan")
    onnx_config = _parsed((onnx_repository / "clf_onnx" / "config.pbtxt").read_text())
    plan_config = _parsed((plan_repository / "clf_onnx" / "config.pbtxt").read_text())
    assert onnx_config.platform == "onnxruntime_onnx" and plan_config.platform == "tensorrt_plan"
    assert plan_config.version_policy.latest.num_versions == repo.COMPONENT_VERSIONS_KEPT
    files = {path.name for path in (plan_repository / "clf_onnx" / str(version)).iterdir()}
    assert files == {"model.plan", repo.CONFIG_SNAPSHOT}
    with pytest.raises(repo.RepositoryError, match="model.plan"):
        repo.write_ensemble_version(tmp_path / "other", ensemble, _exported(tmp_path / "b"), "tensorrt_plan")
    with pytest.raises(repo.RepositoryError, match="served formats: onnx, tensorrt_plan"):
        repo.write_ensemble_version(tmp_path / "other", ensemble, _exported(tmp_path / "c"), "pytorch")


def test_a_version_of_another_platform_is_refused_beside_the_serving_one(tmp_path):
    ensemble = repo.ClassifierEnsemble("clf", ("negative", "positive"), max_length=64)
    repository = tmp_path / "repo"
    repo.write_ensemble_version(repository, ensemble, _exported(tmp_path))
    with pytest.raises(repo.RepositoryError, match="serves onnxruntime_onnx models"):
        repo.write_component_versions(repository, ensemble, _plan_folder(tmp_path), "tensorrt_plan")
    assert repo.versions(repository, "clf_onnx") == [1]

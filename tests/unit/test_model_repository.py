import pytest

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

"""The artifact manifest: written by every step that makes a model, read by evaluation, registration
and promotion to decide how to handle the folder."""

import json
import shutil
from dataclasses import replace

import pytest

from tasks import compile as compile_step
from tasks import evaluate, registry
from tasks.config import CompileConfig, EvaluateConfig, FinetuneConfig
from tasks.manifest import (MANIFEST_FILENAME, ArtifactManifest, Backend, ManifestError, ModelSource, Precision,
                            Structure, config_hash, read_manifest, write_manifest)
from tasks.results import ModelFormat, StepStatus


def _manifest(**changes) -> ArtifactManifest:
    base = ArtifactManifest(format=ModelFormat.ONNX, precision=Precision.FP32, backend=Backend.ONNXRUNTIME,
                            files=("model.onnx", "tokenizer.json"), source=ModelSource("/runs/1/teacher", "pytorch"),
                            config_hash=config_hash({"opset": 17}), step="export_onnx", created_by="tasks.export")
    return replace(base, **changes)


def _folder_with(tmp_path, manifest: ArtifactManifest, name: str = "model"):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for file in manifest.files:
        (folder / file).write_bytes(b"x")
    manifest.write(folder)
    return folder


def test_a_manifest_round_trips_through_its_folder(tmp_path):
    manifest = _manifest(details={"opset": 17}, structure="pruned")
    folder = _folder_with(tmp_path, manifest)
    data = json.loads((folder / MANIFEST_FILENAME).read_text())
    assert data["format"] == "onnx" and data["backend"] == "onnxruntime" and data["structure"] == "pruned"
    assert data["source"] == {"path": "/runs/1/teacher", "format": "pytorch"}
    assert data["details"] == {"opset": "17"}
    read = ArtifactManifest.read(folder)
    assert read == manifest and read.structure is Structure.PRUNED and read.source.format is ModelFormat.PYTORCH
    assert not list(folder.glob(".*.tmp"))  # written atomically


def test_a_missing_manifest_names_the_folder_and_the_steps_that_write_it(tmp_path):
    with pytest.raises(ManifestError, match="tasks.export") as raised:
        ArtifactManifest.read(tmp_path)
    assert str(tmp_path) in str(raised.value) and MANIFEST_FILENAME in str(raised.value)
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize("content", ["not json", '{"format": "onnx"}',
                                     json.dumps(_manifest().to_dict() | {"format": "safetensors"}),
                                     json.dumps(_manifest().to_dict() | {"schema_version": 99})])
def test_an_invalid_manifest_is_a_clear_error(tmp_path, content):
    (tmp_path / MANIFEST_FILENAME).write_text(content)
    with pytest.raises(ManifestError, match="not a valid manifest"):
        read_manifest(tmp_path)


def test_a_manifest_lists_only_files_that_are_in_its_folder(tmp_path):
    with pytest.raises(ManifestError, match="model.onnx"):
        _manifest().write(tmp_path)
    with pytest.raises(ManifestError, match="inside the model folder"):
        _manifest(files=("../model.onnx",))
    with pytest.raises(ManifestError, match="sha256"):
        _manifest(config_hash="abc")


def test_the_config_hash_is_canonical_and_follows_the_config():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": (1, 2), "a": 1})
    base = FinetuneConfig(model="tiny")
    assert config_hash(base) == config_hash(FinetuneConfig(model="tiny"))
    assert config_hash(base) != config_hash(replace(base, epochs=base.epochs + 1))
    assert len(config_hash(base)) == 64


def test_write_manifest_lists_the_folder_but_the_config_record(tmp_path):
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json", "export_config.json"):
        (tmp_path / name).write_bytes(b"x")
    manifest = write_manifest(tmp_path, format=ModelFormat.ONNX, precision=Precision.FP32, step="export_onnx",
                              created_by="tasks.export", source=ModelSource("t", ModelFormat.PYTORCH), config={"a": 1},
                              config_file="export_config.json")
    assert manifest.files == ("model.onnx", "model.onnx.data", "tokenizer.json")
    assert manifest.backend is Backend.ONNXRUNTIME and manifest.config_file == "export_config.json"


def test_finetune_writes_a_pytorch_fp32_manifest(trained_teacher):
    manifest = ArtifactManifest.read(trained_teacher)
    assert (manifest.format, manifest.precision, manifest.backend) == (ModelFormat.PYTORCH, Precision.FP32,
                                                                       Backend.TORCH)
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest.files)
    assert "finetune_config.json" not in manifest.files and manifest.config_file == "finetune_config.json"
    assert manifest.step == "finetune" and manifest.created_by == "tasks.finetune"
    assert manifest.source.format is ModelFormat.PYTORCH
    assert manifest.config_hash == config_hash(json.loads((trained_teacher / "finetune_config.json").read_text()))


def test_export_writes_an_onnx_fp32_manifest(exported_onnx, trained_teacher):
    manifest = ArtifactManifest.read(exported_onnx)
    assert (manifest.format, manifest.precision, manifest.backend) == (ModelFormat.ONNX, Precision.FP32,
                                                                       Backend.ONNXRUNTIME)
    assert {"model.onnx", "tokenizer.json"} <= set(manifest.files)
    assert manifest.source == ModelSource(str(trained_teacher), ModelFormat.PYTORCH)
    assert manifest.step == "export_onnx" and manifest.created_by == "tasks.export"


def _fake_engine(onnx_path, engine_path, config, precision):
    engine_path.write_bytes(b"serialized engine")
    return {"tensorrt_version": "10.0.0"}


def test_compile_writes_a_tensorrt_plan_manifest_whose_hash_follows_the_config(exported_onnx, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_step, "build_engine", _fake_engine)
    hashes = []
    for index, config in enumerate((CompileConfig(), CompileConfig(workspace_mb=512))):
        result = compile_step.run(config, exported_onnx, tmp_path / f"trt{index}", precision="fp16",
                                  gpus=["NVIDIA H200"], trt_version="10.0.0")
        assert result.status is StepStatus.SUCCESS
        manifest = ArtifactManifest.read(tmp_path / f"trt{index}")
        assert (manifest.format, manifest.precision, manifest.backend) == (ModelFormat.TENSORRT_PLAN, Precision.FP16,
                                                                           Backend.TENSORRT)
        assert {"model.plan", "tokenizer.json"} <= set(manifest.files)
        assert manifest.source.format is ModelFormat.ONNX
        assert manifest.details["gpu"] == "NVIDIA H200" and manifest.step == "compile_tensorrt_fp16"
        hashes.append(manifest.config_hash)
    assert hashes[0] != hashes[1]


def test_compile_rejects_an_unknown_precision(exported_onnx, tmp_path):
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="precision"):
        compile_step.run(CompileConfig(), exported_onnx, tmp_path / "trt", precision="int4", gpus=[], trt_version=None)


def test_evaluate_follows_the_manifest_not_the_caller(exported_onnx, prepared_data, tmp_path):
    folder = tmp_path / "onnx_copy"
    shutil.copytree(exported_onnx, folder)
    result = evaluate.run(EvaluateConfig(warmup=1, max_length=32, batch_size=0), "onnx_fp32", folder,
                          ModelFormat.PYTORCH, prepared_data, tmp_path / "eval")
    assert result.info["format"] == "onnx"
    assert json.loads((tmp_path / "eval" / "evaluate_config.json").read_text())["format"] == "onnx"


def test_evaluate_dispatch_without_a_manifest_and_for_a_format_without_a_predictor(tmp_path):
    (tmp_path / "bare").mkdir()
    assert evaluate.model_format_of(tmp_path / "bare", ModelFormat.ONNX) is ModelFormat.ONNX
    with pytest.raises(ManifestError, match="no manifest.json"):
        evaluate.model_format_of(tmp_path / "bare")
    plan = _folder_with(tmp_path, _manifest(format="tensorrt_plan", backend="tensorrt", files=("model.plan",)), "plan")
    with pytest.raises(evaluate.UnsupportedFormat, match="tensorrt_plan") as raised:
        evaluate.run(EvaluateConfig(), "plan", plan, ModelFormat.ONNX, tmp_path / "no-data", tmp_path / "eval")
    assert "supported formats on cpu: onnx, pytorch, pytorch_dynamic_int8" in str(raised.value)
    assert evaluate.model_format_of(plan, device="cuda") is ModelFormat.TENSORRT_PLAN


def test_registry_registers_what_the_manifest_says_is_onnx(tmp_path):
    onnx = _folder_with(tmp_path, _manifest(), "onnx")
    torch = _folder_with(tmp_path, _manifest(format="pytorch", backend="torch", files=("model.safetensors",)), "pt")
    assert registry.is_registrable(registry.Candidate("onnx_fp32", onnx, {}, "export", registrable=False))
    assert not registry.is_registrable(registry.Candidate("teacher", torch, {}, "finetune", registrable=True))
    (tmp_path / "bare").mkdir()
    assert not registry.is_registrable(registry.Candidate("other", tmp_path / "bare", {}, "x", registrable=False))


def test_promotion_picks_the_triton_writer_from_the_manifest(tmp_path):
    from tasks import promote
    from tasks.errors import PromotionFailed

    onnx = _folder_with(tmp_path, _manifest(), "onnx")
    plan = _folder_with(tmp_path, _manifest(format="tensorrt_plan", backend="tensorrt", files=("model.plan",)), "plan")
    torch = _folder_with(tmp_path, _manifest(format="pytorch", backend="torch", files=("model.safetensors",)), "pt")
    (tmp_path / "bare").mkdir()
    assert promote.served_format(onnx) == "onnx" and promote.served_format(tmp_path / "bare") == "onnx"
    assert promote.served_format(plan) == "tensorrt_plan"
    with pytest.raises(PromotionFailed, match="pytorch model.*served formats: onnx, tensorrt_plan"):
        promote.served_format(torch)

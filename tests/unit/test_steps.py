"""Each pipeline step on a tiny random BERT and generated texts (no download)."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from tasks import evaluate, export, gate, quantize
from tasks.champion import ChampionScore
from tasks.config import EvaluateConfig, ExportConfig, GateConfig, QuantizeConfig
from tasks.errors import ExportError
from tasks.manifest import ArtifactManifest, Backend, Precision
from tasks.onnx_model import model_size_bytes
from tasks.predictions import read_logits
from tasks.results import ModelFormat, StepResult, StepStatus


def test_finetune_learns_the_generated_task(trained_teacher):
    config = json.loads((trained_teacher / "finetune_config.json").read_text())
    assert config["epochs"] == 3
    assert (trained_teacher / "model.safetensors").exists()
    assert (trained_teacher / "tokenizer.json").exists()


def test_finetuned_teacher_beats_chance(trained_teacher, prepared_data, tmp_path):
    result = evaluate.run(EvaluateConfig(warmup=1, max_length=32), "teacher", trained_teacher, ModelFormat.PYTORCH,
                          prepared_data, tmp_path / "eval")
    assert result.metrics["accuracy"] >= 0.8


def test_export_has_dynamic_axes_and_matches_pytorch(exported_onnx):
    model = onnx.load(str(exported_onnx / "model.onnx"))
    inputs = {item.name: [d.dim_param or d.dim_value for d in item.type.tensor_type.shape.dim] for item in model.graph.input}
    assert inputs == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert [item.name for item in model.graph.output] == ["logits"]
    check = json.loads((exported_onnx / "export_config.json").read_text())["check"]
    assert check["max_abs_diff"] < 1e-3
    assert check["label_agreement"] == 1.0


def test_export_rejects_a_model_that_does_not_match(trained_teacher, prepared_data, tmp_path):
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export.run(ExportConfig(max_abs_diff=1e-30), trained_teacher, prepared_data, tmp_path / "onnx", max_length=32)
    assert not (tmp_path / "onnx").exists()


def test_dynamic_int8_quantizes_matmuls_and_shrinks_the_file(exported_onnx, prepared_data, tmp_path):
    result = quantize.run(QuantizeConfig(), exported_onnx, prepared_data, tmp_path / "int8", max_length=32)
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node)
    fp32_ops = Counter(node.op_type for node in onnx.load(str(exported_onnx / "model.onnx")).graph.node)
    assert ops["DynamicQuantizeLinear"] == 0 and ops["ReduceMax"] > 0  # per-token scales, the default
    assert ops["MatMulInteger"] > 0
    assert ops["MatMul"] < fp32_ops["MatMul"]
    assert result.metrics["size_bytes"] < model_size_bytes(exported_onnx)
    assert result.metrics["source_label_agreement"] >= 0.9
    assert (tmp_path / "int8" / "tokenizer.json").exists()
    _assert_manifest(tmp_path / "int8", ModelFormat.ONNX, Precision.INT8, Backend.ONNXRUNTIME, "model.onnx",
                     quantization="dynamic_int8", source=exported_onnx)


def test_per_token_dynamic_int8_answers_a_text_the_same_alone_or_batched(exported_onnx, prepared_data, tmp_path):
    """ONNX Runtime's per-tensor scales span the whole batch (padding included), so a text's logits move
    with its neighbours; per-token scales keep each token's own, and batching changes nothing."""
    from tasks.modeling import load_tokenizer
    from tasks.splits import read_split

    texts = read_split(prepared_data, "test")["text"].head(24).tolist()
    tokenizer = load_tokenizer(exported_onnx)
    changes = {}
    for scales in ("per_tensor", "per_token"):
        out = tmp_path / scales
        quantize.run(QuantizeConfig(activation_scales=scales), exported_onnx, prepared_data, out, max_length=32)
        predict = evaluate.onnx_predictor(out, threads=1)
        alone = np.concatenate([predict(evaluate.tokenize(tokenizer, [text], 32)) for text in texts])
        batched = np.concatenate([predict(evaluate.tokenize(tokenizer, texts[start:start + 8], 32))
                                  for start in range(0, len(texts), 8)])
        changes[scales] = evaluate.batch_invariance(alone, batched)
        ops = Counter(node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node)
        if scales == "per_tensor":
            rewritten = ops["DynamicQuantizeLinear"]
        else:
            assert ops["DynamicQuantizeLinear"] == 0 and ops["ReduceMax"] == rewritten > 0
    assert changes["per_tensor"]["batch_max_logit_change"] > 1e-5  # the neighbours move the answer...
    assert changes["per_token"]["batch_max_logit_change"] < 1e-5  # ...not with a scale per token
    assert changes["per_token"]["batch_label_flip_rate"] == 0.0 and changes["per_token"]["batch_compared_texts"] == 24


def test_evaluation_measures_batch_invariance(exported_onnx, prepared_data, tmp_path):
    config = EvaluateConfig(warmup=1, max_length=32, batch_size=8, throughput_batches=2)
    metrics = evaluate.run(config, "onnx_fp32", exported_onnx, ModelFormat.ONNX, prepared_data, tmp_path / "e").metrics
    assert metrics["batch_compared_texts"] == 16
    assert metrics["batch_label_flip_rate"] == 0.0 and metrics["batch_max_logit_change"] < 1e-4


def _assert_manifest(folder, model_format, precision, backend, model_file, source, **details):
    manifest = ArtifactManifest.read(folder)
    assert (manifest.format, manifest.precision, manifest.backend) == (model_format, precision, backend)
    assert {model_file, "tokenizer.json"} <= set(manifest.files)
    assert manifest.source.path == str(source)
    assert all(manifest.details[key] == value for key, value in details.items())
    return manifest


def test_evaluate_writes_predictions_and_metrics(exported_onnx, prepared_data, tmp_path):
    result = evaluate.run(EvaluateConfig(warmup=2, max_length=32), "onnx_fp32", exported_onnx, ModelFormat.ONNX,
                          prepared_data, tmp_path / "eval")
    assert result.status is StepStatus.SUCCESS
    logits = read_logits(tmp_path / "eval" / "predictions.parquet")
    assert logits.shape == (int(result.metrics["test_rows"]), 2)
    assert np.isfinite(logits).all()
    m = result.metrics
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["macro_f1"] <= 1
    assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"] <= m["latency_p99_ms"]
    assert m["nan_outputs"] == 0.0
    assert StepResult.from_dict(result.to_dict()) == result


def test_macro_f1_matches_hand_computed_values():
    labels = np.array([0, 0, 1, 1])
    assert evaluate.macro_f1(labels, np.array([0, 0, 1, 1]), 2) == 1.0
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=2 fp=1 fn=0 -> 4/5
    assert evaluate.macro_f1(labels, np.array([0, 1, 1, 1]), 2) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_gates_pass_and_fail_with_reasons():
    teacher = {"accuracy": 0.9}
    good = {"accuracy": 0.89, "nan_outputs": 0.0, "source_label_agreement": 0.99, "latency_p95_ms": 5.0}
    checks = gate.evaluate_gates(GateConfig(max_relative_accuracy_drop=0.03, max_p95_latency_ms=10), good, teacher)
    assert gate.passed(checks)
    bad = good | {"accuracy": 0.5, "nan_outputs": 1.0, "source_label_agreement": 0.5, "latency_p95_ms": 50.0}
    checks = gate.evaluate_gates(GateConfig(max_relative_accuracy_drop=0.03, max_p95_latency_ms=10), bad, teacher)
    assert not gate.passed(checks)
    assert {c.name for c in checks if c.decision is gate.GateDecision.FAIL} == {
        "accuracy", "finite_outputs", "source_agreement", "latency_p95"}
    assert any("accuracy 0.5000 vs required 0.8730" in reason for reason in gate.failure_reasons(checks))


def test_latency_gate_holds_back_the_noise_margin():
    teacher = {"accuracy": 0.9}
    candidate = {"accuracy": 0.9, "nan_outputs": 0.0, "latency_p95_ms": 9.5}
    strict = gate.evaluate_gates(GateConfig(max_p95_latency_ms=10, latency_noise_margin=0.1), candidate, teacher)
    latency = next(check for check in strict if check.name == "latency_p95")
    assert latency.decision is gate.GateDecision.FAIL and latency.threshold == pytest.approx(9.0)
    assert "less a 10% noise margin" in latency.detail
    loose = gate.evaluate_gates(GateConfig(max_p95_latency_ms=10, latency_noise_margin=0.0), candidate, teacher)
    assert gate.passed(loose)
    unbudgeted = gate.evaluate_gates(GateConfig(max_p95_latency_ms=0), candidate | {"latency_p95_ms": 1e6}, teacher)
    assert "latency_p95" not in {check.name for check in unbudgeted}


def test_champion_regression_gate_compares_on_the_same_split():
    teacher = {"accuracy": 0.9}
    candidate = {"accuracy": 0.88, "nan_outputs": 0.0, "nan_on_edge_inputs": 0.0, "latency_p95_ms": 1.0}
    config = GateConfig(max_relative_accuracy_drop=0.05, max_champion_regression=0.01)
    better_champion = ChampionScore(0.92, "Triton clf v3")
    checks = {c.name: c for c in gate.evaluate_gates(config, candidate, teacher, better_champion)}
    assert checks["champion_regression"].decision is gate.GateDecision.FAIL
    assert "champion 0.9200" in checks["champion_regression"].detail
    close_champion = ChampionScore(0.885, "Triton clf v3")
    assert gate.passed(gate.evaluate_gates(config, candidate, teacher, close_champion))
    unmeasurable = ChampionScore(None, "champion labels differ")
    checks = {c.name: c for c in gate.evaluate_gates(config, candidate, teacher, unmeasurable)}
    assert checks["champion_regression"].decision is gate.GateDecision.PASS
    assert "not compared: champion labels differ" in checks["champion_regression"].detail
    assert "champion_regression" not in {c.name for c in gate.evaluate_gates(config, candidate, teacher)}


def test_nan_on_edge_length_inputs_fails_the_finite_gate(trained_teacher):
    from tasks.modeling import load_tokenizer

    tokenizer = load_tokenizer(trained_teacher)

    def nan_when_short(batch):
        width = batch["input_ids"].shape[1]
        return np.full((1, 2), np.nan if width <= 3 else 0.5, dtype=np.float32)

    assert evaluate.non_finite_on_edge_inputs(nan_when_short, tokenizer, max_length=32)
    assert not evaluate.non_finite_on_edge_inputs(lambda batch: np.zeros((1, 2), np.float32), tokenizer, 32)
    texts = evaluate.adversarial_texts(tokenizer, 32)
    lengths = [evaluate.tokenize(tokenizer, [text], 32)["input_ids"].shape[1] for text in texts]
    assert lengths[0] == 2 and lengths[1] == 3 and lengths[2] == 32  # [CLS] [SEP], one token, truncated
    checks = gate.evaluate_gates(GateConfig(), {"accuracy": 0.9, "nan_outputs": 0.0, "nan_on_edge_inputs": 1.0,
                                                   "latency_p95_ms": 1.0},
                                 {"accuracy": 0.9})
    assert not gate.passed(checks)


def test_static_int8_is_calibrated_qdq_and_keeps_activation_matmuls_in_fp32(exported_onnx, prepared_data, tmp_path):
    activation = quantize.activation_matmuls(exported_onnx / "model.onnx")
    assert len(activation) == 4  # scores and weighted values in each of the 2 layers
    config = QuantizeConfig.static_calibrated(samples=32)
    result = quantize.run(config, exported_onnx, prepared_data, tmp_path / "static", max_length=32)
    model = onnx.load(str(tmp_path / "static" / "model.onnx"))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert ops["DynamicQuantizeLinear"] == 0
    kept = set(result.info["fp32_nodes"].split(","))
    assert kept == set(activation)
    quantized_inputs = {name for node in model.graph.node if node.op_type == "DequantizeLinear" for name in node.output}
    for node in model.graph.node:
        if node.name in kept:
            assert not set(node.input) & quantized_inputs, f"{node.name} reads quantized tensors"
    assert result.metrics["source_label_agreement"] >= 0.9
    assert json.loads((tmp_path / "static" / "quantize_config.json").read_text())["mode"] == "static_int8"
    _assert_manifest(tmp_path / "static", ModelFormat.ONNX, Precision.INT8, Backend.ONNXRUNTIME, "model.onnx",
                     quantization="static_int8", source=exported_onnx)


def test_fp16_halves_the_weights_and_keeps_float32_logits(exported_onnx, prepared_data, tmp_path):
    result = quantize.run(QuantizeConfig.fp16(), exported_onnx, prepared_data, tmp_path / "fp16", max_length=32)
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    types = Counter(init.data_type for init in model.graph.initializer)
    assert types[onnx.TensorProto.FLOAT16] > 0 and types[onnx.TensorProto.FLOAT] == 0
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert result.metrics["source_max_abs_diff"] < 1e-2
    assert result.metrics["size_bytes"] < 0.8 * model_size_bytes(exported_onnx)  # tiny graph: structure weighs too
    _assert_manifest(tmp_path / "fp16", ModelFormat.ONNX, Precision.FP16, Backend.ONNXRUNTIME, "model.onnx",
                     quantization="fp16", source=exported_onnx)


def test_quantize_config_rejects_unknown_modes():
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize.mode"):
        QuantizeConfig(mode="int4")


def test_isolated_evaluation_reports_throughput_and_memory(exported_onnx, prepared_data, tmp_path):
    config = EvaluateConfig(warmup=1, max_length=32, batch_size=8, throughput_batches=2)
    result = evaluate.run_isolated(config, "onnx_fp32", exported_onnx, ModelFormat.ONNX, prepared_data,
                                   tmp_path / "eval")
    metrics = result.metrics
    assert metrics["batch_size"] == 8 and metrics["throughput_per_s"] > 0 and metrics["latency_batch_p50_ms"] > 0
    assert metrics["peak_memory_mb"] > metrics["model_memory_mb"] >= 0
    assert metrics["peak_memory_mb"] > 50  # the evaluating process holds torch and onnxruntime
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["peak_memory_mb"] == metrics["peak_memory_mb"]


def test_graph_optimization_fuses_attention_and_still_matches(trained_teacher, prepared_data, tmp_path):
    result = export.run(ExportConfig(optimize_graph=True), trained_teacher, prepared_data, tmp_path / "fused",
                        max_length=32)
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "fused" / "model.onnx")).graph.node)
    assert ops["Attention"] == 2 and result.metrics["fused_Attention"] == 2
    assert ops["SkipLayerNormalization"] > 0
    assert result.metrics["max_abs_diff"] < 1e-3


def test_pytorch_dynamic_int8_baseline_is_evaluated_like_any_candidate(trained_teacher, prepared_data, tmp_path):
    made = quantize.quantize_torch_dynamic(trained_teacher, tmp_path / "torch_int8")
    assert made.metrics["size_bytes"] > 0
    _assert_manifest(tmp_path / "torch_int8", ModelFormat.PYTORCH_DYNAMIC_INT8, Precision.INT8, Backend.TORCH,
                     "model_dynamic_int8.pt", quantization="dynamic", source=trained_teacher)
    result = evaluate.run(EvaluateConfig(warmup=1, max_length=32, batch_size=8, throughput_batches=1),
                          "teacher_torch_int8", tmp_path / "torch_int8", ModelFormat.PYTORCH_DYNAMIC_INT8,
                          prepared_data, tmp_path / "eval")
    assert result.metrics["accuracy"] >= 0.8
    assert result.metrics["size_bytes"] == made.metrics["size_bytes"]


def test_exporting_leaves_the_model_in_eval_mode(tiny_model, tmp_path):
    """The exporter restores the traced wrapper's mode on the model: a fresh wrapper is in train mode,
    which would switch dropout back on for whoever uses the model after the export."""
    from tasks.export import export_onnx
    from tasks.modeling import load_classifier, load_tokenizer

    model = load_classifier(tiny_model)
    export_onnx(model, load_tokenizer(tiny_model), tmp_path / "model.onnx", opset=17, max_length=16)
    assert not model.training and not any(module.training for module in model.modules())

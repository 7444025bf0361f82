"""The GPU benchmark (bench/gpu.py): its statistics, the shapes of the models it times, its report,
and what it does without a GPU. The measuring itself runs here on the CPU with a tiny architecture
(no wall-clock assertions); the gpu-marked test runs it on CUDA."""

import json
import random

import pytest
import torch

from bench import gpu
from tasks.config import PruneConfig
from tasks.modeling import head_size_of

TINY = {"vocab_size": 200, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 96, "max_position_embeddings": 64, "num_labels": 2}
TINY_SETTINGS = gpu.BenchSettings(architecture=TINY, sequence=16, repetitions={1: 6, 2: 6}, warmup=1)


def test_median_interval_is_the_order_statistics_of_the_binomial_table():
    # n = 100: the 40th and 61st smallest (the classic table), coverage 96.5%.
    samples = list(range(1, 101))
    random.Random(0).shuffle(samples)
    low, high, coverage = gpu.median_interval(samples)
    assert (low, high) == (40, 61)
    assert coverage == pytest.approx(0.9648, abs=1e-4)
    # n = 6 is the smallest sample with a 95% interval: the extremes, coverage 1 - 2/64.
    assert gpu.median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0, pytest.approx(1 - 2 / 64))
    with pytest.raises(ValueError, match="too few"):
        gpu.median_interval([1.0, 2.0, 3.0, 4.0, 5.0])


def test_summary_is_in_milliseconds_and_texts_per_second():
    seconds = [0.010] * 5 + [0.020] * 5 + [0.100]
    summary = gpu.summarize(seconds, batch=32)
    assert summary["median_ms"] == pytest.approx(20.0) and summary["texts_per_s"] == pytest.approx(1600.0)
    assert summary["median_ci_ms"][0] <= summary["median_ms"] <= summary["median_ci_ms"][1]
    assert summary["p95_ms"] == pytest.approx(60.0) and summary["repetitions"] == 11


def test_timing_counts_repetitions_after_the_warmup_and_synchronises_each():
    calls, syncs = [], []
    seconds = gpu.time_calls(lambda: calls.append(1), repetitions=7, warmup=3, synchronize=lambda: syncs.append(1))
    assert len(seconds) == 7 and len(calls) == 10 and len(syncs) == 8 and min(seconds) >= 0


def test_the_demo_models_have_the_shapes_of_the_pipelines_defaults():
    models = gpu.build_models(gpu.TEACHER_ARCHITECTURE, "sdpa")
    shapes = {name: gpu.model_shapes(model) for name, model in models.items()}
    assert shapes["teacher"]["layers"] == 6 and shapes["teacher"]["heads"] == [12] * 6
    assert shapes["teacher"]["ffn"] == [1536] * 6
    assert shapes["student"]["layers"] == 3 and shapes["student"]["heads"] == [12] * 3  # half, DistillConfig's 0
    prune = PruneConfig()
    heads, neurons = round(12 * (1 - prune.head_fraction)), round(1536 * (1 - prune.ffn_fraction))
    assert (heads, neurons) == (8, 614)  # 0.33 of the heads and 0.6 of the FFN neurons removed
    assert shapes["pruned_student"]["heads"] == [heads] * 3 and shapes["pruned_student"]["ffn"] == [neurons] * 3
    pruned = models["pruned_student"]
    assert head_size_of(pruned) == 32 and pruned.base_model.encoder.layer[0].attention.self.query.out_features == 256
    assert shapes["pruned_student"]["parameters"] < shapes["student"]["parameters"] < shapes["teacher"]["parameters"]
    ids = torch.randint(0, 30522, (2, 16))
    with torch.inference_mode():
        assert pruned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 2)


def test_the_kernel_label_names_what_the_dispatcher_chose():
    sdpa = "aten::scaled_dot_product_attention"
    assert gpu.kernel_label([sdpa, "aten::_scaled_dot_product_flash_attention"]) == "flash"
    assert gpu.kernel_label([sdpa, "aten::_scaled_dot_product_flash_attention_for_cpu"]) == "flash (CPU kernel)"
    assert gpu.kernel_label([sdpa, "aten::_scaled_dot_product_efficient_attention"]) == "memory-efficient"
    assert gpu.kernel_label([sdpa, "aten::_scaled_dot_product_cudnn_attention"]) == "cudnn"
    assert gpu.kernel_label([sdpa, "aten::_scaled_dot_product_attention_math"]) == "math"
    assert gpu.kernel_label([]) == gpu.NO_SDPA


def test_a_run_on_the_cpu_measures_every_pytorch_variant_and_says_why_tensorrt_did_not_run(tmp_path):
    report = gpu.run(TINY_SETTINGS, tmp_path, torch.device("cpu"))
    measured = [row for row in report["rows"] if row["status"] == "measured"]
    assert len(measured) == 3 * len(gpu.PYTORCH_VARIANTS) * 2
    assert all(row["median_ms"] > 0 and row["peak_memory_mb"] is None for row in measured)
    kernels = {row["variant"]: row["kernel"] for row in measured}
    assert kernels["pytorch_fp32_eager"] == gpu.NO_SDPA and kernels["pytorch_fp16_flash"].startswith("flash")
    assert report["models"]["student"]["layers"] == 1
    (teacher_trt, promoted_trt) = report["could_not_run"]
    assert teacher_trt["variant"] == promoted_trt["variant"] == "tensorrt_fp16"
    assert "no NVIDIA GPU visible" in teacher_trt["reason"]
    figures = {(f["model"], f["variant"], f["batch"], f["against"]) for f in report["relative"]}
    assert ("pruned_student", "pytorch_fp16_sdpa", 2, "teacher") in figures
    assert ("teacher", "pytorch_fp16_sdpa", 1, "pytorch_fp32_sdpa") in figures
    assert ("teacher", "pytorch_fp32_sdpa", 1, "pytorch_fp32_eager") in figures
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"][0]["model"] == "teacher"
    assert "no NVIDIA GPU visible" in (tmp_path / "gpu.md").read_text()


def test_the_onnx_an_engine_is_built_from_is_fp16_and_computes_the_logits(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = gpu.build_models(TINY, "eager")["pruned_student"]
    path = gpu.tensorrt_onnx(model, 16, tmp_path)
    assert not model.training  # the exporter hands the model back in training mode; the engine's check needs eval
    graph = onnx.load(str(path)).graph
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    inputs = gpu.random_inputs(2, 16, TINY["vocab_size"], torch.device("cpu"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    with torch.inference_mode():
        expected = model(**inputs).logits.numpy()
    assert logits.shape == (2, 2) and abs(logits - expected).max() < 2e-3


REPORT = {
    "date": "2026-01-02 03:04 UTC", "seconds": 42.0,
    "environment": {"device": "NVIDIA H200", "nvidia_smi": "NVIDIA H200, 570.00", "cuda": "13.0", "torch": "2.11.0",
                    "transformers": "5.17.0", "tensorrt": None, "float32_matmul_precision": "highest"},
    "settings": {"sequence": 128, "warmup": 10},
    "models": {"teacher": {"note": "MiniLM-L6", "layers": 6, "heads": [12] * 6, "ffn": [1536] * 6,
                           "parameters": 22_700_000}},
    "rows": [
        {"model": "teacher", "variant": "pytorch_fp16_sdpa", "batch": 32, "status": "measured", "kernel": "flash",
         "median_ms": 1.2345, "median_ci_ms": [1.2, 1.3], "p95_ms": 1.5, "texts_per_s": 25921.4,
         "peak_memory_mb": 123.4},
        {"model": "teacher", "variant": "pytorch_fp16_flash", "batch": 1, "status": "could_not_run",
         "reason": "flash attention refused: No available kernel"},
        {"model": "teacher", "variant": "tensorrt_fp16", "batch": None, "status": "failed",
         "reason": "CompileError: TensorRT could not parse"},
    ],
    "relative": [{"model": "teacher", "variant": "pytorch_fp16_sdpa", "batch": 32, "against": "pytorch_fp32_sdpa",
                  "speedup": 2.5, "range": [2.25, 2.75]},
                 {"model": "student", "variant": "pytorch_fp32_sdpa", "batch": 1, "against": "teacher",
                  "speedup": 1.8, "range": [1.6, 2.0]}],
    "padding_probe": {"model": "teacher", "batch": 32, "padded": "every other text padded from token 64",
                      "default_kernel": "memory-efficient", "forced_flash": "refused: No available kernel"},
}


def test_the_page_shows_the_figures_the_device_and_what_could_not_run():
    report = REPORT | {"could_not_run": [row for row in REPORT["rows"] if row["status"] != "measured"]}
    page = gpu.markdown(report)
    assert "# GPU benchmark (NVIDIA H200)" in page and "2026-01-02 03:04 UTC" in page and "570.00" in page
    assert "random weights" in page and "no accuracy is measured" in page
    assert "| teacher | pytorch_fp16_sdpa | 32 | flash | 1.234 | 1.200 to 1.300 | 1.500 | 25921 | 123 |" in page
    assert "| teacher | 32 |  | 2.50x (2.25 to 2.75) |  |  |" in page  # FP16 SDPA against FP32 SDPA
    assert "| student | 1 |  | 1.80x (1.60 to 2.00) |" in page  # the teacher table: FP32 SDPA column
    assert "PyTorch's own choice: memory-efficient; flash forced: refused: No available kernel" in page
    assert "- teacher pytorch_fp16_flash (batch 1): could not run: flash attention refused: No available kernel" in page
    assert "- teacher tensorrt_fp16: failed: CompileError: TensorRT could not parse" in page
    assert "Everything ran." not in page


def test_without_a_gpu_it_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "results")]) == 0
    assert capsys.readouterr().out.strip() == gpu.NO_GPU == "no CUDA GPU visible: nothing measured"
    assert not (tmp_path / "results").exists()


@pytest.mark.gpu
def test_the_benchmark_measures_on_the_gpu_and_records_the_kernel(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    report = gpu.run(TINY_SETTINGS, tmp_path, torch.device("cuda"))
    rows = {(row["model"], row["variant"], row["batch"]): row for row in report["rows"]}
    for model in ("teacher", "student", "pruned_student"):
        for variant in ("pytorch_fp32_eager", "pytorch_fp32_sdpa", "pytorch_fp16_sdpa"):
            for batch in TINY_SETTINGS.batches:
                row = rows[(model, variant, batch)]
                assert row["status"] == "measured" and row["median_ms"] > 0 and row["peak_memory_mb"] > 0
                assert (row["kernel"] == gpu.NO_SDPA) == (variant == "pytorch_fp32_eager")
    flash = [row for row in report["rows"] if row["variant"] == "pytorch_fp16_flash"]
    assert flash and all(row["kernel"] == "flash" if row["status"] == "measured" else row["reason"] for row in flash)
    assert not [row for row in report["rows"] if row["status"] == "failed"]
    assert (tmp_path / "gpu.md").exists()

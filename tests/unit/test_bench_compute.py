"""The compute figures of the benchmark: matrix-multiply ceilings and operations per text."""

import json

import numpy as np
import pytest

from bench import compute


def test_ceilings_are_the_best_measured_rate_per_precision():
    figures = compute.ceilings((compute.Gemm(64, 64, 64), compute.Gemm(128, 32, 64)))
    assert {line["library"] for line in figures["measured"]} == {"torch.mm", "onnxruntime MatMul",
                                                                 "onnxruntime MatMulInteger"}
    fp32 = [line["gops"] for line in figures["measured"] if line["precision"] == "fp32"]
    int8 = [line["gops"] for line in figures["measured"] if line["precision"] == "int8"]
    assert len(fp32) == 4 and len(int8) == 2 and min(fp32 + int8) > 0
    assert figures["fp32_gops"] == max(fp32) and figures["int8_gops"] == max(int8)


def test_int8_kernel_computes_the_product_it_is_timed_on():
    """The ceiling graph is a real uint8 x int8 -> int32 product (not an empty or mis-wired graph)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    # Ranges whose pairwise products cannot saturate int16: without VNNI (AVX2 only, as on some CI
    # machines) ONNX Runtime's u8 x s8 kernel adds pairs in int16 (vpmaddubsw) and saturates beyond.
    x = rng.integers(0, 128, (8, 16), dtype=np.uint8)
    w = rng.integers(-64, 65, (16, 4), dtype=np.int8)
    session = compute._ort_session([helper.make_tensor_value_info("x", TensorProto.UINT8, [8, 16])],
                                   numpy_helper.from_array(w, "w"), helper.make_node("MatMulInteger", ["x", "w"], ["y"]))
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x.astype(np.int32) @ w.astype(np.int32))


def test_operations_per_text_match_the_encoder_arithmetic(tmp_path):
    """Counted operations equal the closed form of a BERT encoder: per layer four h x h projections,
    two h x i feed-forward products, and the two attention products, plus pooler and classifier."""
    from tasks.evaluate import tokenize
    from tasks.modeling import build_tiny_model, load_tokenizer

    model_dir = build_tiny_model(tmp_path / "tiny")
    config = json.loads((model_dir / "config.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tokenizer = load_tokenizer(model_dir)
    batches = [tokenize(tokenizer, ["good film"] * 3, 32), tokenize(tokenizer, ["a rather long and dull film"], 32)]
    expected = 0.0
    for batch in batches:
        b, s = batch["input_ids"].shape
        expected += layers * (2 * b * s * (4 * h * h + 2 * h * i) + 2 * 2 * b * s * s * h)
        expected += 2 * b * h * h + 2 * b * h * len(config["id2label"])
    assert compute.operations_per_text(model_dir, batches) == pytest.approx(expected / 4)


def test_achieved_rate_is_operations_times_throughput():
    assert compute.achieved(2e9, 50.0, 200.0) == {"achieved_gops": 100.0, "ceiling_share": 0.5}

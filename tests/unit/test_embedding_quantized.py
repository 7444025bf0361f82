"""The token-embedding matrix of quantized models: dynamic INT8 (tasks.quantize) quantizes the
embedding's Gather and dequantizes its output; QDQ models dequantize the matrix itself. Both are
read back as float (scale and zero point applied), and a matrix that cannot be read leaves the
promotion without embeddings instead of failing it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from monitoring import embedding as emb

VOCAB, HIDDEN = 40, 8


def _save(path: Path, nodes, initializers, outputs=("out",)) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _float_model(path: Path, matrix: np.ndarray) -> Path:
    """input_ids -> Gather(embedding matrix) -> MatMul(head): an embedding model in miniature."""
    from onnx import helper, numpy_helper

    head = np.random.default_rng(1).normal(size=(matrix.shape[1], 2)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["word_embeddings", "input_ids"], ["gathered"], name="emb_gather"),
             helper.make_node("MatMul", ["gathered", "head"], ["out"], name="head_matmul")]
    return _save(path, nodes, [numpy_helper.from_array(matrix, "word_embeddings"), numpy_helper.from_array(head, "head")])


@pytest.fixture()
def matrix() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=0.05, size=(VOCAB, HIDDEN)).astype(np.float32)


def test_dynamic_int8_embeddings_are_dequantized(tmp_path, matrix):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = _float_model(tmp_path / "fp32.onnx", matrix)
    target = tmp_path / "int8.onnx"
    # As tasks.quantize.quantize_dynamic_int8 calls it (every op type it quantizes, Gather included).
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    graph = onnx.load(str(target)).graph
    assert not [init for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT and
                list(init.dims) == [VOCAB, HIDDEN]], "the quantizer left the matrix float: this test tests nothing"
    read = emb.token_embeddings(target, VOCAB)
    scale = np.abs(matrix).max() / 127
    assert read.dtype == np.float32 and read.shape == (VOCAB, HIDDEN)
    assert np.abs(read - matrix).max() <= scale / 2 + 1e-7
    assert np.abs(read - matrix).max() > 0  # really read through the quantization


def test_qdq_embeddings_with_a_scale_per_row_are_dequantized(tmp_path, matrix):
    from onnx import helper, numpy_helper

    scales = (np.abs(matrix).max(axis=1) / 120).astype(np.float32)
    zero = np.full(VOCAB, 3, dtype=np.int8)
    quantized = np.clip(np.round(matrix / scales[:, None]) + 3, -128, 127).astype(np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
             helper.make_node("Gather", ["w", "input_ids"], ["out"])]
    path = _save(tmp_path / "qdq.onnx", nodes, [numpy_helper.from_array(quantized, "w_q"),
                                                 numpy_helper.from_array(scales, "w_scale"),
                                                 numpy_helper.from_array(zero, "w_zero")])
    read = emb.token_embeddings(path, VOCAB)
    assert np.allclose(read, (quantized.astype(np.float32) - 3) * scales[:, None])
    assert np.abs(read - matrix).max() <= scales.max() / 2 + 1e-7


def test_an_integer_matrix_without_its_dequantization_is_unavailable(tmp_path):
    from onnx import helper, numpy_helper

    quantized = np.ones((VOCAB, HIDDEN), dtype=np.int8)
    nodes = [helper.make_node("Gather", ["w_q", "input_ids"], ["g"]), helper.make_node("Cast", ["g"], ["out"], to=1)]
    path = _save(tmp_path / "odd.onnx", nodes, [numpy_helper.from_array(quantized, "w_q")])
    with pytest.raises(emb.EmbeddingUnavailable, match="DequantizeLinear"):
        emb.token_embeddings(path, VOCAB)


def test_promotion_fits_the_table_on_training_texts_or_goes_on_without_one(tmp_path, tiny_model, prepared_data,
                                                                           caplog):
    from tokenizers import Tokenizer

    from tasks.promote import fit_embedding_table

    vocab = Tokenizer.from_file(str(tiny_model / "tokenizer.json")).get_vocab_size()
    model_dir = tmp_path / "int8"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    matrix = np.random.default_rng(4).normal(size=(vocab, 3 * emb.DIMS)).astype(np.float32)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(_float_model(tmp_path / "fp32.onnx", matrix)), str(model_dir / "model.onnx"),
                     weight_type=QuantType.QInt8)
    table_file = fit_embedding_table(model_dir, prepared_data, 32, tmp_path / emb.TABLE_FILE)
    table = np.load(table_file)
    assert table.shape == (vocab, emb.DIMS) and np.isfinite(table).all()
    # Whitened on the training texts (what it was fitted on): unit variance per component.
    from tasks.splits import read_split

    train = read_split(prepared_data, "train")["text"].tolist()
    pooled = emb.mean_pooled(table, emb.token_ids(model_dir / "tokenizer.json", train, 32))
    assert np.allclose(pooled.std(axis=0, ddof=1), 1.0, atol=1e-3)

    narrow = tmp_path / "narrow"  # fewer hidden units than components: no table, no failure
    narrow.mkdir()
    (narrow / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    _float_model(narrow / "model.onnx", matrix[:, : emb.DIMS - 1].copy())
    assert fit_embedding_table(narrow, prepared_data, 32, tmp_path / "narrow.npy") is None

    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    (plan_dir / "model.plan").write_bytes(b"engine")
    (plan_dir / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    with caplog.at_level(logging.WARNING, logger="tasks.promote"):
        assert fit_embedding_table(plan_dir, prepared_data, 32, tmp_path / "plan.npy") is None
    assert "no embedding table" in caplog.text and not (tmp_path / "plan.npy").exists()


def test_the_smoke_check_of_served_embeddings():
    from tasks.errors import PromotionFailed
    from tasks.promote import check_embeddings

    expected = np.random.default_rng(5).normal(size=(4, emb.DIMS)).astype(np.float16).astype(np.float64)
    check_embeddings(expected + 1e-3, expected)
    with pytest.raises(PromotionFailed, match="differ from the reference"):
        check_embeddings(expected + 0.1, expected)
    with pytest.raises(PromotionFailed, match="non-finite"):
        check_embeddings(np.full_like(expected, np.nan), expected)

"""How much of this machine's matrix-multiply capacity each runtime turns into model throughput.

Two measurements, both made by the benchmark itself in the same run:

- the ceiling: the best GFLOP/s (FP32) and GOP/s (INT8) that plain matrix multiplications reach
  here on all cores, through PyTorch (``torch.mm``) and ONNX Runtime (``MatMul``, and
  ``MatMulInteger``: uint8 x int8 -> int32, the kernel ONNX Runtime's dynamic INT8 models use), on
  a square shape and on the shape of a BERT feed-forward layer at the throughput batch;
- the work of one model: the floating-point operations of its PyTorch source model, counted by
  ``torch.utils.flop_counter`` on exactly the batches the throughput measurement times (same texts,
  same padding). A multiply-add counts as two operations. Converted models (ONNX, INT8) do the same
  arithmetic as their source; unstructured sparsity is counted dense, since no runtime here skips
  the zeros.

Achieved GOP/s = operations per text x texts per second; its share of the ceiling of the row's
precision says how far each runtime is from what the cores can do. Dynamic INT8 models still run
attention's activation-by-activation products in FP32, so their share is of a mixed ceiling, read
against the INT8 one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SQUARE = (1024, 1024, 1024)


@dataclass(frozen=True)
class Gemm:
    m: int
    k: int
    n: int

    @property
    def operations(self) -> float:
        return 2.0 * self.m * self.k * self.n


def _best_seconds(call, repeats: int, min_seconds: float = 0.3) -> float:
    """The fastest of ``repeats`` timed calls (after two untimed), repeating until ``min_seconds``."""
    call()
    call()
    best, spent, done = float("inf"), 0.0, 0
    while done < repeats or spent < min_seconds:
        started = time.perf_counter()
        call()
        elapsed = time.perf_counter() - started
        best, spent, done = min(best, elapsed), spent + elapsed, done + 1
    return best


def torch_fp32_gops(gemm: Gemm, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(gemm.m, gemm.k), torch.randn(gemm.k, gemm.n)
    with torch.inference_mode():
        return gemm.operations / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def _ort_session(graph_inputs, weight, node):
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(
        helper.make_graph([node], "gemm", graph_inputs, [helper.make_tensor_value_info("y", 0, None)], [weight]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # time the kernel as built
    return ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def ort_fp32_gops(gemm: Gemm, repeats: int = 10) -> float:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((gemm.k, gemm.n)).astype(np.float32), "w")
    session = _ort_session([helper.make_tensor_value_info("x", TensorProto.FLOAT, [gemm.m, gemm.k])], weight,
                           helper.make_node("MatMul", ["x", "w"], ["y"]))
    feeds = {"x": rng.standard_normal((gemm.m, gemm.k)).astype(np.float32)}
    return gemm.operations / _best_seconds(lambda: session.run(None, feeds), repeats) / 1e9


def ort_int8_gops(gemm: Gemm, repeats: int = 10) -> float:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (gemm.k, gemm.n), dtype=np.int8), "w")
    session = _ort_session([helper.make_tensor_value_info("x", TensorProto.UINT8, [gemm.m, gemm.k])], weight,
                           helper.make_node("MatMulInteger", ["x", "w"], ["y"]))
    feeds = {"x": rng.integers(0, 256, (gemm.m, gemm.k), dtype=np.uint8)}
    return gemm.operations / _best_seconds(lambda: session.run(None, feeds), repeats) / 1e9


def ceilings(shapes: tuple[Gemm, ...]) -> dict:
    """Best FP32 and INT8 matrix-multiply rates over ``shapes`` and libraries, with every figure."""
    measured = []
    for gemm in shapes:
        shape = f"{gemm.m}x{gemm.k}x{gemm.n}"
        measured += [
            {"library": "torch.mm", "precision": "fp32", "shape": shape, "gops": torch_fp32_gops(gemm)},
            {"library": "onnxruntime MatMul", "precision": "fp32", "shape": shape, "gops": ort_fp32_gops(gemm)},
            {"library": "onnxruntime MatMulInteger", "precision": "int8", "shape": shape, "gops": ort_int8_gops(gemm)},
        ]
    return {
        "fp32_gops": max(line["gops"] for line in measured if line["precision"] == "fp32"),
        "int8_gops": max(line["gops"] for line in measured if line["precision"] == "int8"),
        "measured": measured,
    }


def model_shapes(hidden: int, intermediate: int, tokens: int) -> tuple[Gemm, ...]:
    """The square shape and a feed-forward layer's shape at ``tokens`` rows (batch x sequence)."""
    return (Gemm(*SQUARE), Gemm(tokens, hidden, intermediate))


def operations_per_text(model_dir: Path, batches: list[dict[str, np.ndarray]]) -> float:
    """Floating-point operations of the PyTorch model in ``model_dir`` per text, over ``batches``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tasks.modeling import load_classifier
    from tasks.onnx_model import INPUT_NAMES

    model = load_classifier(model_dir).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        for batch in batches:
            model(**{name: torch.from_numpy(batch[name]) for name in INPUT_NAMES})
    texts = sum(len(batch["input_ids"]) for batch in batches)
    return counter.get_total_flops() / texts


def achieved(operations: float, texts_per_s: float, ceiling_gops: float) -> dict[str, float]:
    gops = operations * texts_per_s / 1e9
    return {"achieved_gops": gops, "ceiling_share": gops / ceiling_gops if ceiling_gops else float("nan")}

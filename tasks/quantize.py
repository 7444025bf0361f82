"""Lower the precision of an ONNX classifier: dynamic INT8, static INT8 calibrated on real texts,
or FP16 for GPU targets. Each output is checked against its FP32 source on test texts."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from serving.truncation import DEFAULT_TRUNCATION
from tasks.config import ActivationScales, QuantizeConfig, QuantizeMode
from tasks.manifest import ModelSource, Precision, write_manifest
from tasks.modeling import load_classifier, load_tokenizer
from tasks.onnx_model import (INPUT_NAMES, MODEL_FILENAME, TORCH_INT8_FILENAME, compare_logits, copy_tokenizer_files,
                              model_size_bytes, onnx_logits)
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_split
from tasks.tokens import encode

log = logging.getLogger(__name__)


# Blocked QuantizeLinear (a block of a whole row: one scale per token) arrived in opset 21.
PER_TOKEN_OPSET = 21


def quantize_dynamic_int8(source: Path, target: Path, config: QuantizeConfig) -> Path:
    """Write an INT8-weight, dynamically quantized copy of ``source`` to ``target``; with
    ``config.activation_scales`` "per_token", each token's activations get their own scale."""
    import onnx

    per_token = config.activation_scales == ActivationScales.PER_TOKEN.value
    with tempfile.TemporaryDirectory(prefix="quantize-") as scratch:
        source = with_opset(source, PER_TOKEN_OPSET, Path(scratch) / "source.onnx") if per_token else source
        _quantize_dynamic(source, target, config)
    if per_token:
        model = onnx.load(str(target))
        log.info("per-token activation scales: %d dynamic quantizations rewritten", per_token_scales(model.graph))
        onnx.save(model, str(target))
    return target


def with_opset(source: Path, opset: int, target: Path) -> Path:
    """``source`` converted to ``opset`` (written to ``target``) when it imports an older one."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(source))
    current = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    if current >= opset:
        return source
    onnx.save(version_converter.convert_version(model, opset), str(target))
    return target


def _quantize_dynamic(source: Path, target: Path, config: QuantizeConfig) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model_input=str(source),
        model_output=str(target),
        weight_type=QuantType.QInt8,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        # Fused contrib ops (Attention, SkipLayerNormalization) defeat shape inference: name the type.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def per_token_scales(graph) -> int:
    """Rewrite every ``DynamicQuantizeLinear`` of ``graph`` that feeds only weight ``MatMulInteger``
    nodes (in place) so that each token, i.e. each row along the last axis, gets its own scale and
    zero point instead of one pair for the whole input tensor.

    ONNX Runtime's dynamic quantization computes one scale and zero point over the whole tensor it
    quantizes: with Triton batching requests (and padding a request's texts to its longest), a
    text's answer then depends on the texts it shares a batch with. Per token, it cannot: every row
    is quantized from its own values only, and padded rows never reach a real token's scale.

    Each row is quantized as ``DynamicQuantizeLinear`` quantizes a tensor (uint8, its range widened
    to hold 0, scale = range / 255, zero point = round(-min / scale)). ``MatMulInteger`` takes one
    zero point for its first input, so it gets 0, and the row's zero point times the weight's column
    sums is subtracted from its int32 output (exact: sum((q - z) * w) = sum(q * w) - z * sum(w)).
    The products of scales after it broadcast the per-row scales unchanged. The graph must import
    opset 21 or later (blocked ``QuantizeLinear``). Returns how many nodes were rewritten; the
    others keep per-tensor scales, with a warning."""
    weights = {initializer.name: initializer for initializer in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewritten, nodes, moved = 0, [], set()
    for node in graph.node:
        if id(node) in moved:  # a rewritten MatMulInteger, placed after its quantizer already
            continue
        if node.op_type != "DynamicQuantizeLinear" or not _feeds_weight_matmuls_only(node, consumers, weights):
            nodes.append(node)
            continue
        matmuls = consumers[node.output[0]]
        nodes += _per_token_quantize(graph, node, int(weights[matmuls[0].input[1]].dims[0]))
        for matmul in matmuls:  # they follow their quantizer, so the nodes stay in topological order
            moved.add(id(matmul))
            nodes += [matmul, *_zero_point_correction(graph, matmul, f"{node.output[0]}_row_zero_point", weights,
                                                      consumers)]
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = sum(node.op_type == "DynamicQuantizeLinear" for node in graph.node)
    if kept:
        log.warning("%d dynamic quantizations feed fused operators (QAttention, ...) that take one scale only: they "
                    "keep per-tensor scales, and this model's answers depend on the batch (the promotion's batched "
                    "smoke test will say so); export without graph optimization for a batch-invariant INT8 model",
                    kept)
    return rewritten


def _per_token_quantize(graph, node, width: int) -> list:
    """The nodes that quantize ``node``'s input per row (rows of ``width`` values), writing its
    quantized and scale outputs and ``<quantized>_row_zero_point`` (int32, one per row); its
    zero-point output becomes a constant 0. The quantizing itself is one blocked ``QuantizeLinear``
    (opset 21: a block of the whole row), so the rewrite adds two reductions over the input and a
    few operations on one value per row."""
    from onnx import TensorProto, helper, numpy_helper

    x, (quantized, scale, zero_point), p = node.input[0], node.output, node.output[0]
    constants = {f"{p}_eps": np.float32(1e-8), f"{p}_zero": np.float32(0.0), f"{p}_levels": np.float32(255.0)}
    graph.initializer.extend(numpy_helper.from_array(np.array(value), name) for name, value in constants.items())
    graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), zero_point))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{p}_axes"))
    return [
        helper.make_node("ReduceMin", [x, f"{p}_axes"], [f"{p}_min"], keepdims=1),
        helper.make_node("ReduceMax", [x, f"{p}_axes"], [f"{p}_max"], keepdims=1),
        helper.make_node("Min", [f"{p}_min", f"{p}_zero"], [f"{p}_low"]),  # the range holds 0, as ONNX Runtime's
        helper.make_node("Max", [f"{p}_max", f"{p}_zero"], [f"{p}_high"]),
        helper.make_node("Sub", [f"{p}_high", f"{p}_low"], [f"{p}_span"]),
        helper.make_node("Max", [f"{p}_span", f"{p}_eps"], [f"{p}_range"]),
        helper.make_node("Div", [f"{p}_range", f"{p}_levels"], [scale]),
        helper.make_node("Div", [f"{p}_low", scale], [f"{p}_low_scaled"]),
        helper.make_node("Neg", [f"{p}_low_scaled"], [f"{p}_neg_low"]),
        helper.make_node("Round", [f"{p}_neg_low"], [f"{p}_zp_rounded"]),
        helper.make_node("Clip", [f"{p}_zp_rounded", f"{p}_zero", f"{p}_levels"], [f"{p}_zp_float"]),
        helper.make_node("Cast", [f"{p}_zp_float"], [f"{p}_zp_uint8"], to=TensorProto.UINT8),
        helper.make_node("Cast", [f"{p}_zp_float"], [f"{p}_row_zero_point"], to=TensorProto.INT32),
        helper.make_node("QuantizeLinear", [x, scale, f"{p}_zp_uint8"], [quantized], axis=-1, block_size=width),
    ]


def _zero_point_correction(graph, matmul, row_zero_point: str, weights: dict, consumers: dict[str, list]) -> list:
    """Nodes that subtract ``row_zero_point * column sums of the weight`` (less its zero point) from
    ``matmul``'s int32 output, rewiring its consumers to the corrected tensor."""
    from onnx import helper, numpy_helper

    weight = numpy_helper.to_array(weights[matmul.input[1]]).astype(np.int64)
    has_zero_point = len(matmul.input) > 3 and matmul.input[3]
    centred = weight - (numpy_helper.to_array(weights[matmul.input[3]]).astype(np.int64) if has_zero_point else 0)
    column_sums, out = f"{matmul.output[0]}_column_sums", matmul.output[0]
    graph.initializer.append(numpy_helper.from_array(centred.sum(axis=0).astype(np.int32), column_sums))
    for consumer in consumers.get(out, []):
        for index, name in enumerate(consumer.input):
            if name == out:
                consumer.input[index] = f"{out}_corrected"
    return [helper.make_node("Mul", [row_zero_point, column_sums], [f"{out}_offset"]),
            helper.make_node("Sub", [out, f"{out}_offset"], [f"{out}_corrected"])]


def _feeds_weight_matmuls_only(node, consumers: dict[str, list], weights: dict) -> bool:
    """Whether a ``DynamicQuantizeLinear``'s outputs reach only ``MatMulInteger`` nodes with a 2-D
    weight (values and zero point) and the scale products after them, which take a per-row scale."""
    quantized, scale, zero_point = node.output
    matmuls = consumers.get(quantized, [])
    return (bool(matmuls) and all(m.op_type == "MatMulInteger" and m.input[0] == quantized and m.input[1] in weights
                                  and len(weights[m.input[1]].dims) == 2 for m in matmuls)
            and {m.op_type for m in consumers.get(zero_point, [])} <= {"MatMulInteger"}
            and {m.op_type for m in consumers.get(scale, [])} <= {"Mul"})


def activation_matmuls(model_path: Path) -> list[str]:
    """Names of MatMul nodes whose inputs are both computed (no weight): attention scores and
    attention-weighted values."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    weights = {initializer.name for initializer in model.graph.initializer}
    constants = {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and not any(name in weights or name in constants for name in node.input)]


def excluded_nodes(model_path: Path, config: QuantizeConfig) -> list[str]:
    """Nodes static INT8 keeps in FP32: activation MatMuls (if asked) and names matching ``exclude_nodes``."""
    import onnx

    chosen = set(activation_matmuls(model_path)) if config.exclude_activation_matmuls else set()
    if config.exclude_nodes:
        names = [node.name for node in onnx.load(str(model_path), load_external_data=False).graph.node]
        chosen |= {name for name in names if any(fragment in name for fragment in config.exclude_nodes)}
    return sorted(chosen)


class TextCalibrationReader:
    """ONNX Runtime calibration data: one tokenized text per call, padded to ``max_length`` (the
    histogram calibrators need every call to have the same shape)."""

    def __init__(self, tokenizer, texts: list[str], max_length: int, truncation: str = DEFAULT_TRUNCATION) -> None:
        self._feeds = iter([
            {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}
            for encoded in (encode(tokenizer, [text], max_length, truncation, padding="max_length", return_tensors="np")
                            for text in texts)
        ])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_static_int8(source: Path, target: Path, config: QuantizeConfig, tokenizer, texts: list[str],
                         max_length: int, truncation: str = DEFAULT_TRUNCATION) -> list[str]:
    """Write a QDQ static INT8 copy of ``source`` calibrated on ``texts``; returns the nodes kept in FP32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    exclude = excluded_nodes(source, config)
    # The calibrator writes augmented models and histograms to a temp folder; keep them out of the cwd.
    with tempfile.TemporaryDirectory(prefix="calibrate-") as scratch:
        quantize_static(
            model_input=str(source),
            model_output=str(target),
            calibration_data_reader=TextCalibrationReader(tokenizer, texts, max_length, truncation),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            # uint8 activations take the CPU's VNNI path; TensorRT reads signed, symmetric ones only
            activation_type=QuantType.QInt8 if config.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=methods[config.calibration_method],
            extra_options=static_options(config, scratch),
        )
    return exclude


def static_options(config: QuantizeConfig, scratch: str) -> dict:
    """ONNX Runtime's extra options for static INT8: the calibrator's scratch folder, MinMax's moving
    average, and, when ``symmetric_activations`` asks for TensorRT's form, zero points of 0 (symmetric
    scales) and float biases."""
    options: dict = {"TmpDir": scratch}
    if config.calibration_method == "minmax":
        options |= {"CalibTensorRangeSymmetric": False, "CalibMovingAverage": True}
    if config.symmetric_activations:
        # biases stay float: TensorRT fuses them into its INT8 kernels and does not read quantized ones
        options |= {"ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True,
                    "QuantizeBias": False}
    return options


def convert_fp16(source: Path, target: Path) -> Path:
    """Half-precision weights and compute; int64 inputs and float32 logits unchanged (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return target


# What quantize_torch_dynamic does (it takes no config): the manifest's config hash is of these.
TORCH_DYNAMIC_SETTINGS = {"api": "torch.ao.quantization.quantize_dynamic", "modules": ["Linear"], "dtype": "qint8"}
# The precision each ONNX quantization mode leaves the model in.
MODE_PRECISION = {QuantizeMode.DYNAMIC_INT8: Precision.INT8, QuantizeMode.STATIC_INT8: Precision.INT8,
                  QuantizeMode.FP16: Precision.FP16}


def quantize_torch_dynamic(model_dir: Path, out_dir: Path) -> StepResult:
    """PyTorch dynamic INT8 (``torch.ao.quantization.quantize_dynamic`` on Linear layers), the
    baseline users reach for first. Saved as a pickled module (load with ``weights_only=False``)."""
    import warnings

    import torch

    model = load_classifier(model_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization is deprecated, still works
        quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with staged_dir(out_dir) as staging:
        torch.save(quantized, staging / TORCH_INT8_FILENAME)
        load_tokenizer(model_dir).save_pretrained(staging)
        write_manifest(staging, format=ModelFormat.PYTORCH_DYNAMIC_INT8, precision=Precision.INT8,
                       step="quantize_torch_dynamic_int8", created_by=__name__,
                       source=ModelSource(str(model_dir), ModelFormat.PYTORCH), config=TORCH_DYNAMIC_SETTINGS,
                       details={"quantization": "dynamic", "modules": "Linear"})
    return StepResult(step="quantize_torch_dynamic_int8", status=StepStatus.SUCCESS, uris={"model": str(out_dir)},
                      metrics={"size_bytes": float((out_dir / TORCH_INT8_FILENAME).stat().st_size)})


def run(config: QuantizeConfig, onnx_dir: Path, data_dir: Path, out_dir: Path, max_length: int,
        check_samples: int = 64, truncation: str = DEFAULT_TRUNCATION) -> StepResult:
    """Quantize ``onnx_dir/model.onnx`` into ``out_dir`` and report its agreement with the FP32 model."""
    mode = QuantizeMode(config.mode)
    texts = read_split(data_dir, "test")["text"].head(check_samples).tolist()
    tokenizer = load_tokenizer(onnx_dir)
    info: dict[str, str] = {"mode": mode.value}
    with staged_dir(out_dir) as staging:
        source, target = onnx_dir / MODEL_FILENAME, staging / MODEL_FILENAME
        if mode is QuantizeMode.DYNAMIC_INT8:
            quantize_dynamic_int8(source, target, config)
        elif mode is QuantizeMode.STATIC_INT8:
            calibration = read_split(data_dir, "train")["text"].head(config.calibration_samples).tolist()
            log.info("calibrating static INT8 on %d training texts (%s)", len(calibration), config.calibration_method)
            kept = quantize_static_int8(source, target, config, tokenizer, calibration, max_length, truncation)
            info["fp32_nodes"] = ",".join(kept)
        else:
            convert_fp16(source, target)
        copy_tokenizer_files(onnx_dir, staging)
        write_json_atomic(staging / "quantize_config.json", asdict(config) | {"fp32_nodes": info.get("fp32_nodes", "")})
        write_manifest(staging, format=ModelFormat.ONNX, precision=MODE_PRECISION[mode], step=f"quantize_{mode.value}",
                       created_by=__name__, source=ModelSource(str(onnx_dir), ModelFormat.ONNX),
                       config=asdict(config) | {"max_length": max_length, "truncation": truncation},
                       config_file="quantize_config.json",
                       details={"quantization": mode.value})
        # One text per call, as served: dynamic INT8 scales depend on the whole input tensor.
        check = compare_logits(
            onnx_logits(source, tokenizer, texts, max_length, batch_size=1, truncation=truncation),
            onnx_logits(target, tokenizer, texts, max_length, batch_size=1, truncation=truncation),
        )
    log.info("%s: max |logit diff| %.4f, label agreement %.4f vs FP32", mode.value, check["max_abs_diff"],
             check["label_agreement"])
    return StepResult(
        step=f"quantize_{mode.value}",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir), "onnx": str(out_dir / MODEL_FILENAME)},
        metrics={f"source_{key}": value for key, value in check.items()}
        | {"size_bytes": float(model_size_bytes(out_dir))},
        info=info,
    )

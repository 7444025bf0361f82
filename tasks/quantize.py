"""Lower the precision of an ONNX classifier: dynamic INT8, static INT8 calibrated on real texts,
or FP16 for GPU targets. Each output is checked against its FP32 source on test texts."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tasks.config import QuantizeConfig, QuantizeMode
from tasks.manifest import ModelSource, Precision, write_manifest
from tasks.modeling import load_classifier, load_tokenizer
from tasks.onnx_model import (INPUT_NAMES, MODEL_FILENAME, TORCH_INT8_FILENAME, compare_logits, copy_tokenizer_files,
                              model_size_bytes, onnx_logits)
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_split

log = logging.getLogger(__name__)


def quantize_dynamic_int8(source: Path, target: Path, config: QuantizeConfig) -> Path:
    """Write an INT8-weight, dynamically quantized copy of ``source`` to ``target``."""
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
    return target


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

    def __init__(self, tokenizer, texts: list[str], max_length: int) -> None:
        self._feeds = iter([
            {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}
            for encoded in (tokenizer([text], truncation=True, max_length=max_length, padding="max_length",
                                      return_tensors="np", return_token_type_ids=False) for text in texts)
        ])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_static_int8(source: Path, target: Path, config: QuantizeConfig, tokenizer, texts: list[str],
                         max_length: int) -> list[str]:
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
            calibration_data_reader=TextCalibrationReader(tokenizer, texts, max_length),
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
        check_samples: int = 64) -> StepResult:
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
            kept = quantize_static_int8(source, target, config, tokenizer, calibration, max_length)
            info["fp32_nodes"] = ",".join(kept)
        else:
            convert_fp16(source, target)
        copy_tokenizer_files(onnx_dir, staging)
        write_json_atomic(staging / "quantize_config.json", asdict(config) | {"fp32_nodes": info.get("fp32_nodes", "")})
        write_manifest(staging, format=ModelFormat.ONNX, precision=MODE_PRECISION[mode], step=f"quantize_{mode.value}",
                       created_by=__name__, source=ModelSource(str(onnx_dir), ModelFormat.ONNX),
                       config=asdict(config) | {"max_length": max_length}, config_file="quantize_config.json",
                       details={"quantization": mode.value})
        # One text per call, as served: dynamic INT8 scales depend on the whole input tensor.
        check = compare_logits(
            onnx_logits(source, tokenizer, texts, max_length, batch_size=1),
            onnx_logits(target, tokenizer, texts, max_length, batch_size=1),
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

"""Dynamic INT8 quantization of an ONNX classifier with ONNX Runtime."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from tasks import data as data_step
from tasks.config import QuantizeConfig
from tasks.export import MODEL_FILENAME, compare_logits, model_size_bytes, onnx_logits
from tasks.modeling import load_tokenizer
from tasks.results import StepResult, StepStatus, staged_dir, write_json_atomic

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


def quantize_dynamic_int8(source: Path, target: Path, config: QuantizeConfig) -> Path:
    """Write an INT8-weight, dynamically quantized copy of ``source`` to ``target``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model_input=str(source),
        model_output=str(target),
        weight_type=QuantType.QInt8,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
    )
    return target


def run(config: QuantizeConfig, onnx_dir: Path, data_dir: Path, out_dir: Path, max_length: int,
        check_samples: int = 64) -> StepResult:
    """Quantize ``onnx_dir/model.onnx`` into ``out_dir`` and report its agreement with the FP32 model."""
    texts = data_step.read_split(data_dir, "test")["text"].head(check_samples).tolist()
    with staged_dir(out_dir) as staging:
        quantize_dynamic_int8(onnx_dir / MODEL_FILENAME, staging / MODEL_FILENAME, config)
        for name in TOKENIZER_FILES:
            if (onnx_dir / name).exists():
                shutil.copy2(onnx_dir / name, staging / name)
        write_json_atomic(staging / "quantize_config.json", asdict(config))
        tokenizer = load_tokenizer(staging)
        check = compare_logits(
            onnx_logits(onnx_dir / MODEL_FILENAME, tokenizer, texts, max_length),
            onnx_logits(staging / MODEL_FILENAME, tokenizer, texts, max_length),
        )
    return StepResult(
        step="quantize_int8",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir), "onnx": str(out_dir / MODEL_FILENAME)},
        metrics={f"source_{key}": value for key, value in check.items()}
        | {"size_bytes": float(model_size_bytes(out_dir))},
    )

"""The model folder that steps hand to each other: file and tensor names, the tokenizer files kept
beside a model, its size, and ONNX Runtime logits for checking a converted file against its source."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from serving.truncation import DEFAULT_TRUNCATION
from tasks.tokens import encode

INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
MODEL_FILENAME = "model.onnx"
TORCH_INT8_FILENAME = "model_dynamic_int8.pt"
ENGINE_FILENAME = "model.plan"  # a TensorRT engine (tasks/compile.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


def copy_tokenizer_files(source: Path, target: Path) -> None:
    """Copy the tokenizer and model config files that sit next to a model, so the folder stays servable."""
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def onnx_logits(model_path: Path, tokenizer, texts: list[str], max_length: int, batch_size: int = 32,
                threads: int = 0, truncation: str = DEFAULT_TRUNCATION) -> np.ndarray:
    """Logits of an ONNX classifier via ONNX Runtime on CPU (long texts cut by ``truncation``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[start:start + batch_size], max_length, truncation, return_tensors="np")
        feeds = {name: batch[name].astype(np.int64) for name in INPUT_NAMES}
        outputs.append(session.run([OUTPUT_NAME], feeds)[0])
    return np.concatenate(outputs)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max |difference| and argmax agreement of two logit arrays."""
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        "label_agreement": float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean()),
    }


def model_size_bytes(model_dir: Path) -> int:
    """Bytes of the model's weights: ONNX files plus external-data side files, or safetensors/bin files."""
    patterns = ("*.onnx", "*.onnx.data", "*.safetensors", "pytorch_model*.bin", "*.pt", "*.plan")
    return sum(path.stat().st_size for pattern in patterns for path in Path(model_dir).glob(pattern))

"""The peer baseline: Hugging Face Optimum's one-click ONNX Runtime path on the same teacher.

Optimum exports the fine-tuned teacher to ONNX (``ORTModelForSequenceClassification(export=True)``)
and quantizes it with dynamic INT8 (``ORTQuantizer`` + ``AutoQuantizationConfig``, the instruction
set of this CPU, per tensor, as its documentation shows). The result is written in this project's
ONNX layout (``model.onnx`` + tokenizer + config), so ``bench.compress`` measures it with the same
evaluator and the same ONNX Runtime as every other row.

optimum-onnx pins transformers < 4.58, which the project's environment cannot share, so this runs
in ``.venv-optimum`` (``make venv-optimum``) as a subprocess; it imports nothing from the project.

    .venv-optimum/bin/python bench/optimum_baseline.py TEACHER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def quantization_config():
    """Optimum's dynamic INT8 preset for this CPU: what a user following its docs would pick."""
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = cpu_flags()
    if "avx512_vnni" in flags:
        return "avx512_vnni", AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
    if "avx512f" in flags:
        return "avx512", AutoQuantizationConfig.avx512(is_static=False, per_channel=False)
    if "avx2" in flags:
        return "avx2", AutoQuantizationConfig.avx2(is_static=False, per_channel=False)
    return "arm64", AutoQuantizationConfig.arm64(is_static=False, per_channel=False)


def build(teacher_dir: Path, out_dir: Path) -> dict:
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTQuantizer

    preset, config = quantization_config()
    with tempfile.TemporaryDirectory(prefix="optimum-") as scratch:
        exported = Path(scratch) / "exported"
        model = ORTModelForSequenceClassification.from_pretrained(str(teacher_dir), export=True)
        model.save_pretrained(exported)
        quantized = Path(scratch) / "quantized"
        ORTQuantizer.from_pretrained(model).quantize(save_dir=quantized, quantization_config=config)
        produced = sorted(quantized.glob("*.onnx"))
        if len(produced) != 1:
            raise RuntimeError(f"expected one quantized ONNX file, Optimum wrote {[p.name for p in produced]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(produced[0], out_dir / "model.onnx")
    shutil.copyfile(teacher_dir / "config.json", out_dir / "config.json")
    for name in TOKENIZER_FILES:
        if (teacher_dir / name).exists():
            shutil.copyfile(teacher_dir / name, out_dir / name)
    info = {"preset": preset, "per_channel": False, "is_static": False,
            **{package: metadata.version(package)
               for package in ("optimum-onnx", "optimum", "transformers", "onnxruntime", "torch")}}
    (out_dir / "optimum_baseline.json").write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1]), Path(sys.argv[2]))))

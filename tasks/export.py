"""Export a PyTorch classifier to ONNX with dynamic batch and sequence axes, and check it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from serving.truncation import DEFAULT_TRUNCATION
from tasks.config import ExportConfig
from tasks.errors import ConfigError, ExportError
from tasks.manifest import ModelSource, Precision, write_manifest
from tasks.modeling import block_parts, load_classifier, load_tokenizer
from tasks.onnx_model import INPUT_NAMES, MODEL_FILENAME, OUTPUT_NAME, compare_logits, model_size_bytes, onnx_logits
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_split
from tasks.tokens import encode
from tasks.training import predict_logits


class _LogitsOnly(torch.nn.Module):
    """Wrap a Hugging Face classifier so the graph has plain tensor inputs and one output."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_onnx(model: torch.nn.Module, tokenizer, path: Path, opset: int, max_length: int) -> Path:
    """Trace ``model`` to ONNX at ``path``.

    The legacy TorchScript exporter (``dynamo=False``) with eager attention is used on purpose:
    it is the graph shape ONNX Runtime's transformer optimizer fuses attention for.
    """
    model.eval()
    sample = encode(tokenizer, ["an example text to trace"], max_length, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    axes[OUTPUT_NAME] = {0: "batch"}
    with torch.inference_mode():
        torch.onnx.export(
            _LogitsOnly(model).eval(),  # the exporter restores the wrapper's mode on the model: eval, not train
            (sample["input_ids"], sample["attention_mask"]),
            str(path),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def attention_shape(model: torch.nn.Module) -> tuple[int, int] | None:
    """(heads, hidden size) when every layer's attention has the standard shape (heads x head size =
    hidden size), else None: ONNX Runtime's attention fusion takes one head count for the graph."""
    hidden, heads = model.config.hidden_size, model.config.num_attention_heads
    try:
        parts = block_parts(model)
    except ConfigError:  # not a supported encoder family: let the optimizer fuse what it recognises
        return heads, hidden
    if all(part.query.out_features == hidden for part in parts):
        return heads, hidden
    return None


def optimize_graph(path: Path, shape: tuple[int, int] | None, model_type: str = "bert") -> dict[str, int]:
    """Fuse attention, LayerNorm and GELU in place with ONNX Runtime's transformer optimizer.

    ``shape`` is (heads, hidden size) for attention fusion (the optimizer cannot detect them from
    this exporter's graph); None keeps attention unfused (structurally pruned layers). Embedding
    LayerNorm fusion stays off: it expects token_type_ids, which the exported graph does not take.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(model_type)
    options.enable_embed_layer_norm = False
    options.enable_attention = shape is not None
    heads, hidden = shape or (0, 0)
    optimized = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden,
                               optimization_options=options, opt_level=0)
    optimized.save_model_to_file(str(path))
    return {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}


def run(config: ExportConfig, model_dir: Path, data_dir: Path, out_dir: Path, max_length: int,
        truncation: str = DEFAULT_TRUNCATION) -> StepResult:
    """Export ``model_dir`` to ``out_dir/model.onnx`` (+ tokenizer files) and verify it on test texts."""
    tokenizer = load_tokenizer(model_dir)
    model = load_classifier(model_dir)
    texts = read_split(data_dir, "test")["text"].head(config.check_samples).tolist()
    with staged_dir(out_dir) as staging:
        export_onnx(model, tokenizer, staging / MODEL_FILENAME, config.opset, max_length)
        fused = optimize_graph(staging / MODEL_FILENAME, attention_shape(model)) if config.optimize_graph else {}
        tokenizer.save_pretrained(staging)
        model.config.save_pretrained(staging)
        reference = predict_logits(model, tokenizer, texts, max_length, truncation=truncation)
        check = compare_logits(reference, onnx_logits(staging / MODEL_FILENAME, tokenizer, texts, max_length,
                                                     truncation=truncation))
        write_json_atomic(staging / "export_config.json",
                          asdict(config) | {"max_length": max_length, "truncation": truncation, "check": check,
                                            "fused_operators": fused})
        if check["max_abs_diff"] > config.max_abs_diff:
            raise ExportError(
                f"ONNX export differs from PyTorch by {check['max_abs_diff']:.2e} (> {config.max_abs_diff:.0e}) on "
                f"{len(texts)} test texts; the exported file is kept at {staging} for inspection"
            )
        write_manifest(staging, format=ModelFormat.ONNX, precision=Precision.FP32, step="export_onnx",
                       created_by=__name__, source=ModelSource(str(model_dir), ModelFormat.PYTORCH),
                       config=asdict(config) | {"max_length": max_length, "truncation": truncation},
                       config_file="export_config.json",
                       details={"opset": str(config.opset), "graph_optimized": str(config.optimize_graph).lower()})
    return StepResult(
        step="export_onnx",
        status=StepStatus.SUCCESS,
        uris={"model": str(out_dir), "onnx": str(out_dir / MODEL_FILENAME)},
        metrics=check | {"size_bytes": float(model_size_bytes(out_dir))}
        | {f"fused_{name}": float(count) for name, count in fused.items()},
    )

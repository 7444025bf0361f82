"""Measure every candidate the same way on the same held-out split."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from serving.truncation import DEFAULT_TRUNCATION
from tasks.config import EvaluateConfig
from tasks.errors import PipelineError
from tasks.manifest import ArtifactManifest, read_manifest
from tasks.modeling import load_classifier, load_tokenizer
from tasks.hardware import gpu_names, onnxruntime_gpu_providers, tensorrt_missing, tensorrt_version
from tasks.onnx_model import (ENGINE_FILENAME, INPUT_NAMES, MODEL_FILENAME, OUTPUT_NAME, TORCH_INT8_FILENAME,
                              compare_logits, model_size_bytes)
from tasks.results import ModelFormat, StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import read_split
from tasks.tokens import encode

log = logging.getLogger(__name__)

Predictor = Callable[[dict[str, np.ndarray]], np.ndarray]


class UnsupportedFormat(PipelineError):
    """No predictor can run a model of this format here."""


def torch_predictor(model_dir: Path, threads: int) -> Predictor:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = load_classifier(model_dir).eval()

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            tensors = {name: torch.from_numpy(batch[name]) for name in INPUT_NAMES}
            return model(**tensors).logits.float().numpy()

    return predict


def onnx_predictor(model_dir: Path, threads: int) -> Predictor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_dir / MODEL_FILENAME), options, providers=["CPUExecutionProvider"])

    # Graphs exported by other tools (Hugging Face Optimum) also take token_type_ids: all zeros for
    # one text, which is what the tokenizer would give.
    with_token_types = "token_type_ids" in {tensor.name for tensor in session.get_inputs()}

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        feeds = {name: batch[name] for name in INPUT_NAMES}
        if with_token_types:
            feeds["token_type_ids"] = np.zeros_like(batch["input_ids"])
        return session.run([OUTPUT_NAME], feeds)[0]

    return predict


def torch_dynamic_int8_predictor(model_dir: Path, threads: int) -> Predictor:
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = torch.load(model_dir / TORCH_INT8_FILENAME, weights_only=False).eval()  # our own artifact

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{name: torch.from_numpy(batch[name]) for name in INPUT_NAMES}).logits.float().numpy()

    return predict


PREDICTORS: dict[ModelFormat, Callable[[Path, int], Predictor]] = {
    ModelFormat.PYTORCH: torch_predictor,
    ModelFormat.PYTORCH_DYNAMIC_INT8: torch_dynamic_int8_predictor,
    ModelFormat.ONNX: onnx_predictor,
}


def onnx_gpu_predictor(model_dir: Path, threads: int) -> Predictor:
    """ONNX Runtime's CUDA provider (the GPU build, onnxruntime-gpu). Triton serves the model through
    its TensorRT accelerator, which builds an engine per input shape: timing that here would time the
    builds, so the evaluation times the CUDA provider, an upper bound of the served latency."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_dir / MODEL_FILENAME), options, providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise UnsupportedFormat(f"ONNX Runtime did not take the CUDA provider for {model_dir} "
                                f"(it took {session.get_providers()})")

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        return session.run([OUTPUT_NAME], {name: batch[name] for name in INPUT_NAMES})[0]

    return predict


def tensorrt_predictor(model_dir: Path, threads: int) -> Predictor:
    """A TensorRT engine run through the TensorRT 10 runtime, with CUDA tensors from torch as its
    buffers (inputs copied to the GPU per call, as Triton does, and the logits copied back)."""
    import tensorrt as trt
    import torch

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        (model_dir / ENGINE_FILENAME).read_bytes())
    if engine is None:
        raise UnsupportedFormat(f"TensorRT {trt.__version__} could not load {model_dir / ENGINE_FILENAME}: an engine "
                                "runs only on the GPU model and TensorRT version it was built with")
    context = engine.create_execution_context()
    types = {trt.int64: torch.int64, trt.int32: torch.int32, trt.float32: torch.float32, trt.float16: torch.float16}

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        stream = torch.cuda.current_stream()
        inputs = [torch.from_numpy(batch[name]).to("cuda", types[engine.get_tensor_dtype(name)])
                  for name in INPUT_NAMES]
        for name, tensor in zip(INPUT_NAMES, inputs):
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        logits = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)),
                             dtype=types[engine.get_tensor_dtype(OUTPUT_NAME)], device="cuda")
        context.set_tensor_address(OUTPUT_NAME, logits.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {model_dir / ENGINE_FILENAME}")
        stream.synchronize()
        return logits.float().cpu().numpy()

    return predict


# The GPU stages' candidates (tasks/recipe.py, target GPU) are timed on the GPU.
GPU_PREDICTORS: dict[ModelFormat, Callable[[Path, int], Predictor]] = {
    ModelFormat.ONNX: onnx_gpu_predictor,
    ModelFormat.TENSORRT_PLAN: tensorrt_predictor,
}


def gpu_unavailable_reason(model_format: ModelFormat, gpus: list[str] | None = None,
                           trt_version: str | None = None, ort_providers: list[str] | None = None) -> str | None:
    """Why a GPU candidate of ``model_format`` cannot be evaluated on this worker (None: it can)."""
    gpus = gpu_names() if gpus is None else gpus
    if not gpus:
        return "no NVIDIA GPU visible to CUDA on this worker"
    if model_format is ModelFormat.TENSORRT_PLAN:
        missing = tensorrt_missing(gpus, tensorrt_version() if trt_version is None else trt_version)
        if missing is not None:
            return missing
    providers = onnxruntime_gpu_providers() if ort_providers is None else ort_providers
    if model_format is ModelFormat.ONNX and "CUDAExecutionProvider" not in providers:
        return (f"the installed onnxruntime has no CUDA provider (GPU {gpus[0]} is present): install onnxruntime-gpu "
                "(the project's GPU image does, infra/project/Dockerfile)")
    if model_format not in GPU_PREDICTORS:
        return f"no GPU predictor runs {model_format.value} models"
    return None


def gpu_free_bytes() -> int | None:
    """Free memory of the current CUDA device (None without one)."""
    try:
        import torch
    except ImportError:
        return None
    return int(torch.cuda.mem_get_info()[0]) if torch.cuda.is_available() else None


def model_format_of(model_dir: Path, model_format: ModelFormat | None = None, device: str = "cpu") -> ModelFormat:
    """The format to evaluate ``model_dir`` as: its manifest's when it has one (the caller's
    ``model_format`` is then only a hint), else the caller's. Raises ``UnsupportedFormat`` when no
    predictor runs that format on ``device``, ``ManifestError`` when neither says what the folder holds."""
    manifest = read_manifest(model_dir)
    if manifest is None and model_format is None:
        manifest = ArtifactManifest.read(model_dir)  # raises: the folder says nothing and neither did the caller
    chosen = manifest.format if manifest is not None else ModelFormat(model_format)
    if manifest is not None and model_format is not None and ModelFormat(model_format) is not chosen:
        log.info("%s: its manifest says %s (caller said %s); evaluating it as %s", model_dir, chosen.value,
                 ModelFormat(model_format).value, chosen.value)
    predictors = predictors_on(device)
    if chosen not in predictors:
        raise UnsupportedFormat(
            f"{model_dir} holds a {chosen.value} model and no predictor evaluates {chosen.value} on {device}; "
            f"supported formats on {device}: {', '.join(sorted(item.value for item in predictors))}. Add one to "
            "tasks.evaluate.PREDICTORS (CPU) or GPU_PREDICTORS")
    return chosen


def predictors_on(device: str) -> dict[ModelFormat, Callable[[Path, int], Predictor]]:
    return GPU_PREDICTORS if device == "cuda" else PREDICTORS


def predictor_for(model_dir: Path, threads: int, model_format: ModelFormat | None = None,
                  device: str = "cpu") -> Predictor:
    """The predictor of ``model_dir`` on ``device``, chosen by ``model_format_of``."""
    return predictors_on(device)[model_format_of(model_dir, model_format, device)](model_dir, threads)


def tokenize(tokenizer, texts: list[str], max_length: int,
             truncation: str = DEFAULT_TRUNCATION) -> dict[str, np.ndarray]:
    """A model's int64 inputs for ``texts`` (``tasks.tokens.encode``: cut by ``truncation``, padded to the longest)."""
    batch = encode(tokenizer, texts, max_length, truncation, return_tensors="np")
    return {name: batch[name].astype(np.int64) for name in INPUT_NAMES}


def macro_f1(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> float:
    scores = []
    for cls in range(num_classes):
        tp = float(((predictions == cls) & (labels == cls)).sum())
        fp = float(((predictions == cls) & (labels != cls)).sum())
        fn = float(((predictions != cls) & (labels == cls)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def timed_logits(predict: Predictor, tokenizer, texts: list[str], config: EvaluateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every text sent alone (batch 1, no padding: what a serving client sends) and each call's
    latency in ms (tokenization excluded), after ``config.warmup`` untimed calls."""
    inputs = [tokenize(tokenizer, [text], config.max_length, config.truncation) for text in texts]
    for index in range(min(config.warmup, len(inputs))):
        predict(inputs[index])
    logits, timings = [], np.empty(len(inputs))
    for index, batch in enumerate(inputs):
        start = time.perf_counter()
        logits.append(predict(batch))
        timings[index] = (time.perf_counter() - start) * 1000.0
    return np.concatenate(logits), timings


def batch_throughput(predict: Predictor, tokenizer, texts: list[str], config: EvaluateConfig,
                     alone: np.ndarray | None = None) -> dict[str, float]:
    """Latency of batches of ``config.batch_size`` texts (padded to the longest in each) and the texts
    per second they give, after one untimed batch. With ``alone`` (the same texts' logits sent one
    at a time), also how much batching changed the answers (``batch_invariance``)."""
    if not config.batch_size or not texts:
        return {}
    inputs = throughput_inputs(tokenizer, texts, config)
    predict(inputs[0])
    timings, outputs = np.empty(len(inputs)), []
    for index, batch in enumerate(inputs):
        start = time.perf_counter()
        outputs.append(predict(batch))
        timings[index] = time.perf_counter() - start
    batched = np.concatenate(outputs)
    return {
        "batch_size": float(config.batch_size),
        "latency_batch_p50_ms": float(np.percentile(timings, 50) * 1000.0),
        "throughput_per_s": float(len(batched) / timings.sum()),
    } | (batch_invariance(alone[:len(batched)], batched) if alone is not None else {})


def batch_invariance(alone: np.ndarray, batched: np.ndarray) -> dict[str, float]:
    """How much a text's answer depends on the texts it is batched (and padded) with: the share of
    texts whose label flips and the largest change of any logit, alone versus batched. Dynamic INT8
    computes its activation scales over the whole input tensor, so it is not zero there."""
    compared = compare_logits(alone, batched)
    return {"batch_label_flip_rate": 1.0 - compared["label_agreement"],
            "batch_max_logit_change": compared["max_abs_diff"], "batch_compared_texts": float(len(alone))}


def throughput_inputs(tokenizer, texts: list[str], config: EvaluateConfig) -> list[dict[str, np.ndarray]]:
    """The batches ``batch_throughput`` times: the first ``throughput_batches`` groups of
    ``batch_size`` texts, each padded to its longest text."""
    size = config.batch_size
    groups = [texts[start:start + size] for start in range(0, min(len(texts), size * config.throughput_batches), size)]
    return [tokenize(tokenizer, group, config.max_length, config.truncation) for group in groups]


def adversarial_texts(tokenizer, max_length: int) -> list[str]:
    """Inputs at the edges of the length range: empty, one token, and past the maximum length."""
    word = next(iter(token for token in ("the", "a", "x") if token in tokenizer.get_vocab()), "x")
    return ["", word, " ".join([word] * (max_length * 2))]


def non_finite_on_edge_inputs(predict: Predictor, tokenizer, max_length: int) -> bool:
    """True when any edge-length input gives NaN or Inf logits."""
    return any(
        not np.isfinite(predict(tokenize(tokenizer, [text], max_length))).all()
        for text in adversarial_texts(tokenizer, max_length)
    )


def run(config: EvaluateConfig, candidate: str, model_dir: Path, model_format: ModelFormat | None, data_dir: Path,
        out_dir: Path, device: str = "cpu") -> StepResult:
    """Accuracy, macro F1, batch-1 latency percentiles and size of one candidate on the test split.

    Every test text is sent alone, as serving clients do, so the logits are the ones Triton must
    reproduce (dynamic INT8 scales depend on the whole input tensor, padding included).

    Writes ``predictions.parquet`` (label, prediction, per-class logits) for gates, promotion
    smoke tests and drift references.

    The predictor follows the model folder's manifest; ``model_format`` is used only for a folder
    without one (made by another tool). ``device`` "cuda" times the model on the GPU (the GPU
    stages' candidates) and adds ``gpu_memory_mb``: the device memory taken while the model was
    loaded and ran (device-wide, read from CUDA's free memory).
    """
    model_format = model_format_of(model_dir, model_format, device)
    test = read_split(data_dir, "test")
    labels = test["label"].to_numpy()
    texts = test["text"].tolist()
    tokenizer = load_tokenizer(model_dir)
    free_before = gpu_free_bytes() if device == "cuda" else None
    predict = predictors_on(device)[model_format](model_dir, config.threads)

    logits, timings = timed_logits(predict, tokenizer, texts, config)
    predictions = logits.argmax(axis=1)
    seconds = timings.sum() / 1000.0
    metrics = {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": macro_f1(labels, predictions, logits.shape[1]),
        "latency_p50_ms": float(np.percentile(timings, 50)),
        "latency_p95_ms": float(np.percentile(timings, 95)),
        "latency_p99_ms": float(np.percentile(timings, 99)),
        "throughput_batch1_per_s": float(len(timings) / seconds) if seconds else 0.0,
        "size_bytes": float(model_size_bytes(model_dir)),
        "nan_outputs": float(not np.isfinite(logits).all()),
        "nan_on_edge_inputs": float(non_finite_on_edge_inputs(predict, tokenizer, config.max_length)),
        "test_rows": float(len(texts)),
    } | batch_throughput(predict, tokenizer, texts, config, alone=logits)
    if free_before is not None:
        metrics["gpu_memory_mb"] = max(0, free_before - (gpu_free_bytes() or free_before)) / 2**20
    frame = pd.DataFrame({"label": labels, "prediction": predictions})
    for cls in range(logits.shape[1]):
        frame[f"logit_{cls}"] = logits[:, cls]
    with staged_dir(out_dir) as staging:
        frame.to_parquet(staging / "predictions.parquet", index=False)
        write_json_atomic(staging / "metrics.json", metrics)
        write_json_atomic(staging / "evaluate_config.json",
                          asdict(config) | {"candidate": candidate, "format": model_format.value, "device": device})
    return StepResult(
        step=f"evaluate_{candidate}",
        status=StepStatus.SUCCESS,
        uris={"model": str(model_dir), "evaluation": str(out_dir), "predictions": str(out_dir / "predictions.parquet")},
        metrics=metrics,
        info={"candidate": candidate, "format": model_format.value, "device": device},
    )


def run_isolated(config: EvaluateConfig, candidate: str, model_dir: Path, model_format: ModelFormat | None,
                 data_dir: Path, out_dir: Path, device: str = "cpu") -> StepResult:
    """``run`` in a fresh Python process, adding its memory: ``peak_memory_mb`` (the whole evaluating
    process at its peak) and ``model_memory_mb`` (the peak above the process after its imports,
    i.e. what loading and running this model added). A fresh process per candidate keeps one
    candidate's freed-but-retained memory from hiding another's.

    A plain ``python -m tasks.evaluate`` child rather than multiprocessing: spawn re-runs the
    parent's main script, which inside an Airflow worker is the ``airflow`` command itself.
    """
    import subprocess
    import sys
    import tempfile

    model_format = model_format_of(model_dir, model_format, device)  # a format without a predictor fails here
    with tempfile.TemporaryDirectory(prefix="evaluate-") as scratch:
        request, answer = Path(scratch) / "request.json", Path(scratch) / "result.json"
        write_json_atomic(request, {"config": asdict(config), "candidate": candidate, "model_dir": str(model_dir),
                                    "format": model_format.value, "data_dir": str(data_dir), "out_dir": str(out_dir),
                                    "device": device})
        finished = subprocess.run([sys.executable, "-m", "tasks.evaluate", str(request), str(answer)],
                                  capture_output=True, text=True, check=False)
        if finished.returncode != 0 or not answer.exists():
            raise RuntimeError(f"evaluating {candidate} in a child process failed (exit {finished.returncode}): "
                               f"{finished.stderr[-3000:]}")
        result = StepResult.from_dict(json.loads(answer.read_text()))
    write_json_atomic(out_dir / "metrics.json", result.metrics)
    return result


def _run_measuring_memory(config: EvaluateConfig, candidate: str, model_dir: Path, model_format: ModelFormat | None,
                          data_dir: Path, out_dir: Path, device: str = "cpu") -> dict:
    import onnxruntime  # noqa: F401  (imported before the baseline is read)
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401

    baseline = psutil.Process().memory_info().rss
    result = run(config, candidate, model_dir, model_format, data_dir, out_dir, device)
    peak = peak_rss_bytes()
    memory = {"peak_memory_mb": peak / 2**20, "model_memory_mb": max(0, peak - baseline) / 2**20}
    return StepResult(result.step, result.status, result.uris, result.metrics | memory, result.info).to_dict()


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started its program.

    ``VmHWM`` from /proc is the high-water mark of the current address space; ``ru_maxrss`` is not
    used because Linux carries it over from the parent across fork and exec (a spawned evaluator
    would report the training parent's peak).
    """
    from pathlib import Path as _Path

    for line in _Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _main(request_path: str, result_path: str) -> None:
    """Child side of ``run_isolated``."""
    request = json.loads(Path(request_path).read_text())
    result = _run_measuring_memory(EvaluateConfig(**request["config"]), request["candidate"],
                                   Path(request["model_dir"]), ModelFormat(request["format"]),
                                   Path(request["data_dir"]), Path(request["out_dir"]), request.get("device", "cpu"))
    write_json_atomic(Path(result_path), result)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1], sys.argv[2])

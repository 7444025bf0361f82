"""``make bench-gpu``: the teacher, the distilled student and the promoted (pruned) student on an
NVIDIA GPU: PyTorch FP32 and FP16 with SDPA attention (and the flash kernel forced), FP32 eager
attention as a reference, and a TensorRT FP16 engine where TensorRT is installed; batch 1 and 32,
128 tokens per text.

The models are the demo's architectures with random weights (the teacher is
sentence-transformers/all-MiniLM-L6-v2 as a BERT classifier; the student and the pruned student are
cut from it as the distill and prune steps cut them, at their configs' defaults). Nothing is
downloaded and no weights are carried to the GPU machine: timings depend on the shapes and the
precision, not on the weight values. No accuracy is measured here (``bench/results/compress-demo.md``
has accuracy, on the CPU).

    python -m bench.gpu --out bench/results     # gpu.json and gpu.md; without a CUDA GPU: nothing
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from math import comb
from pathlib import Path

import numpy as np
import torch

from tasks.compile import ENGINE_FILENAME, build_engine, gpu_names, tensorrt_version, unavailable_reason
from tasks.config import CompileConfig, DistillConfig, ExportConfig, FinetuneConfig, PruneConfig
from tasks.errors import CompileError
from tasks.modeling import PruningPlan, apply_plan, build_student, encoder_layers
from tasks.onnx_model import INPUT_NAMES, MODEL_FILENAME, OUTPUT_NAME
from tasks.prune import full_plan, kept_indices
from tasks.results import write_json_atomic

log = logging.getLogger("bench.gpu")

RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
NO_GPU = "no CUDA GPU visible: nothing measured"
# The demo teacher's architecture: sentence-transformers/all-MiniLM-L6-v2 with a two-label head.
TEACHER_ARCHITECTURE = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                        "intermediate_size": 1536, "max_position_embeddings": 512, "num_labels": 2}
# The pipeline's tokens per text (fine-tuning's max_length, which distillation and pruning follow).
SEQUENCE = next(item.default for item in fields(FinetuneConfig) if item.name == "max_length")
TEACHER, STUDENT, PROMOTED = "teacher", "student", "pruned_student"
MODEL_NOTES = {TEACHER: "the teacher (by default the demo teacher's architecture, all-MiniLM-L6-v2)",
               STUDENT: "distilled student: the teacher's layers kept by the distill step",
               PROMOTED: "promoted: the student with heads and FFN neurons pruned at PruneConfig's fractions"}
TENSORRT_MODELS = (TEACHER, PROMOTED)
TENSORRT_VARIANT = "tensorrt_fp16"
FP32_EAGER, FP32_REFERENCE = "pytorch_fp32_eager", "pytorch_fp32_sdpa"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# TensorRT's tensor types (by enum name) as torch types, for the buffers the engine reads and writes.
TENSORRT_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT32": torch.int32, "INT64": torch.int64,
                         "BOOL": torch.bool}
# Which SDPA kernel ran, from the aten op the dispatcher chose (first match wins: the CPU flash op
# also contains "flash").
KERNEL_LABELS = (("cudnn", "cudnn"), ("flash_attention_for_cpu", "flash (CPU kernel)"), ("flash", "flash"),
                 ("efficient", "memory-efficient"), ("math", "math"))
NO_SDPA = "none (no SDPA call: eager attention)"


@dataclass(frozen=True)
class Variant:
    """One way of running a PyTorch model: attention implementation, precision, forced flash or not."""

    name: str
    attention: str
    dtype: str
    force_flash: bool = False


PYTORCH_VARIANTS = (
    Variant(FP32_EAGER, "eager", "fp32"),
    Variant(FP32_REFERENCE, "sdpa", "fp32"),
    Variant("pytorch_fp16_sdpa", "sdpa", "fp16"),
    Variant("pytorch_fp16_flash", "sdpa", "fp16", force_flash=True),
)


# What each variant's speed-up is read against (same model, same batch).
REFERENCE_VARIANT = {FP32_REFERENCE: FP32_EAGER, "pytorch_fp16_sdpa": FP32_REFERENCE,
                     "pytorch_fp16_flash": FP32_REFERENCE, TENSORRT_VARIANT: FP32_REFERENCE}


@dataclass(frozen=True)
class BenchSettings:
    """What is measured: the teacher's architecture, tokens per text, batch sizes and timed calls per batch."""

    architecture: dict = field(default_factory=lambda: dict(TEACHER_ARCHITECTURE))
    sequence: int = SEQUENCE
    repetitions: dict[int, int] = field(default_factory=lambda: {1: 300, 32: 100})
    warmup: int = 10

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(sorted(self.repetitions))


# ---- statistics ----

def median_interval(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Distribution-free interval of the median: the j-th smallest and the j-th largest of the n samples,
    j the largest rank with P(Binomial(n, 1/2) < j) <= (1 - confidence) / 2. Returns (low, high, coverage)."""
    n, ordered, total = len(samples), sorted(samples), 2 ** len(samples)
    tail_limit = (1.0 - confidence) / 2
    rank, below = 0, 0  # below: the number of n-bit outcomes with fewer than ``rank`` samples under the median
    while (below + comb(n, rank)) / total <= tail_limit:
        below += comb(n, rank)
        rank += 1
    if rank == 0:
        raise ValueError(f"{n} samples are too few for a {confidence:.0%} interval of the median")
    return ordered[rank - 1], ordered[n - rank], 1.0 - 2.0 * below / total


def summarize(seconds: Sequence[float], batch: int) -> dict:
    """Median, p95 and the median's 95% interval in ms, and texts per second at the median."""
    low, high, coverage = median_interval(seconds)
    median = float(np.median(seconds))
    return {"repetitions": len(seconds), "median_ms": median * 1e3, "p95_ms": float(np.percentile(seconds, 95)) * 1e3,
            "median_ci_ms": [low * 1e3, high * 1e3], "ci_coverage": coverage, "min_ms": min(seconds) * 1e3,
            "texts_per_s": batch / median}


def time_calls(call: Callable[[], object], repetitions: int, warmup: int,
               synchronize: Callable[[], None]) -> list[float]:
    """Seconds per call, each from a synchronised start until the device has finished it: what a caller
    waits for, launch overhead included."""
    for _ in range(warmup):
        call()
    synchronize()
    seconds = []
    for _ in range(repetitions):
        started = time.perf_counter()
        call()
        synchronize()
        seconds.append(time.perf_counter() - started)
    return seconds


# ---- models ----

def student_layer_count(teacher_layers: int) -> int:
    """The distill step's choice at DistillConfig's default: student_layers, 0 meaning half the teacher's."""
    return DistillConfig().student_layers or max(1, teacher_layers // 2)


def shape_plan(model: torch.nn.Module, prune: PruneConfig) -> PruningPlan:
    """A plan of the shapes structured pruning at ``prune``'s fractions leaves: per layer as many heads
    and neurons as ``kept_indices`` keeps, the first ones (which ones does not change the timing)."""
    full = full_plan(model)

    def first(count: int, fraction: float) -> tuple[int, ...]:
        return kept_indices(torch.arange(count, 0, -1, dtype=torch.float32), fraction)

    return PruningPlan(full.head_size, tuple(first(len(heads), prune.head_fraction) for heads in full.heads),
                       tuple(first(len(neurons), prune.ffn_fraction) for neurons in full.neurons))


def build_models(architecture: dict, attention: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The teacher, the student and the pruned student with random weights, on the CPU, in FP32."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    teacher = AutoModelForSequenceClassification.from_config(BertConfig(**architecture),
                                                             attn_implementation=attention)
    layers = student_layer_count(len(encoder_layers(teacher)))
    student, _ = build_student(teacher, layers)
    pruned, _ = build_student(teacher, layers)
    apply_plan(pruned, shape_plan(pruned, PruneConfig()))
    return {TEACHER: teacher.eval(), STUDENT: student.eval(), PROMOTED: pruned.eval()}


def model_shapes(model: torch.nn.Module) -> dict:
    layers = encoder_layers(model)
    head_size = model.config.hidden_size // model.config.num_attention_heads
    return {"layers": len(layers), "heads": [layer.attention.self.query.out_features // head_size for layer in layers],
            "ffn": [layer.intermediate.dense.out_features for layer in layers],
            "parameters": sum(parameter.numel() for parameter in model.parameters())}


def random_inputs(batch: int, sequence: int, vocab_size: int, device: torch.device, seed: int = 0,
                  padded_from: int | None = None) -> dict[str, torch.Tensor]:
    """Random token ids and a full attention mask (or, with ``padded_from``, every other text padded
    from that position on)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, sequence), generator=generator)
    mask = torch.ones_like(ids)
    if padded_from is not None:
        mask[::2, padded_from:] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


# ---- measuring ----

def sdpa_ops(call: Callable[[], object]) -> list[str]:
    """The scaled-dot-product-attention aten ops one call dispatched to (profiled on the host side)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        call()
    return sorted({event.name for event in profiler.events() if "scaled_dot_product" in event.name})


def kernel_label(ops: list[str]) -> str:
    kernels = [op for op in ops if op != "aten::scaled_dot_product_attention"]
    if not ops:
        return NO_SDPA
    labels = [label for key, label in KERNEL_LABELS if any(key in op for op in kernels)]
    return labels[0] if labels else "unknown: " + ", ".join(ops)


@contextlib.contextmanager
def attention_backends(force_flash: bool) -> Iterator[None]:
    """Only the flash SDPA kernel when ``force_flash`` (PyTorch raises where it cannot run), else PyTorch's choice."""
    if not force_flash:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        yield


def probe_kernel(call: Callable[[], object]) -> tuple[list[str] | None, str]:
    """(the SDPA ops of one call, "") or (None, why it could not run) when the forced kernel was refused."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return sdpa_ops(call), ""
        except RuntimeError as error:
            why = "; ".join(dict.fromkeys(str(warning.message).strip() for warning in caught))
            return None, f"{error}".strip() + (f" ({why})" if why else "")


class Device:
    """Synchronisation and peak-memory figures of the device the models run on (no-ops on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None

    def release(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def not_run(model: str, variant: str, batch: int | None, reason: str, status: str = "could_not_run") -> dict:
    return {"model": model, "variant": variant, "batch": batch, "status": status, "reason": reason}


def measure_pytorch(name: str, variant: Variant, model: torch.nn.Module, settings: BenchSettings,
                    device: Device) -> list[dict]:
    """One row per batch size: ``model`` (on the CPU, FP32) copied to the device in the variant's precision."""
    rows = []
    model = copy.deepcopy(model).to(device=device.device, dtype=DTYPES[variant.dtype])
    for batch in settings.batches:
        inputs = random_inputs(batch, settings.sequence, model.config.vocab_size, device.device, seed=batch)

        def call() -> torch.Tensor:
            return model(**inputs).logits

        with torch.inference_mode(), attention_backends(variant.force_flash):
            device.reset_peak()
            ops, refused = probe_kernel(call)
            if ops is None:
                rows.append(not_run(name, variant.name, batch, f"flash attention refused: {refused}"))
                continue
            seconds = time_calls(call, settings.repetitions[batch], settings.warmup, device.synchronize)
        rows.append({"model": name, "variant": variant.name, "batch": batch, "status": "measured",
                     "kernel": kernel_label(ops), "sdpa_ops": ops, "peak_memory_mb": device.peak_mb(),
                     **summarize(seconds, batch)})
    del model
    device.release()
    return rows


def padding_probe(model: torch.nn.Module, settings: BenchSettings, device: Device) -> dict:
    """Which SDPA kernel FP16 picks when half the texts of the largest batch are padded, and whether
    forcing flash still runs (flash takes no padding mask on CUDA): a probe, not timed."""
    batch = max(settings.batches)
    model = copy.deepcopy(model).to(device=device.device, dtype=torch.float16)
    inputs = random_inputs(batch, settings.sequence, model.config.vocab_size, device.device,
                           padded_from=settings.sequence // 2)
    with torch.inference_mode():
        chosen = outcome(*probe_kernel(lambda: model(**inputs).logits))
        with attention_backends(force_flash=True):
            forced = outcome(*probe_kernel(lambda: model(**inputs).logits))
    del model
    device.release()
    return {"model": TEACHER, "batch": batch, "padded": f"every other text padded from token {settings.sequence // 2}",
            "default_kernel": chosen, "forced_flash": forced}


def outcome(ops: list[str] | None, refused: str) -> str:
    return kernel_label(ops) if ops is not None else f"refused: {refused}"


# ---- TensorRT ----

def _trace_tokenizer(texts: list[str], **_: object) -> dict[str, torch.Tensor]:
    """What ``export_onnx`` asks of a tokenizer: one example to trace (token ids need no vocabulary here)."""
    ids = torch.full((len(texts), 8), 7, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def tensorrt_onnx(model: torch.nn.Module, sequence: int, folder: Path) -> Path:
    """The pipeline's path to an engine's input: ONNX export (eager attention), then FP16 (inputs and
    logits unchanged)."""
    from tasks.export import export_onnx
    from tasks.quantize import convert_fp16

    folder.mkdir(parents=True, exist_ok=True)
    exported = export_onnx(model, _trace_tokenizer, folder / "model_fp32.onnx", ExportConfig().opset, sequence)
    # The TorchScript exporter restores the training flag of the wrapper it traced, which is True: the
    # model comes back in training mode (dropout on) unless it is set back.
    model.eval()
    return convert_fp16(exported, folder / MODEL_FILENAME)


class EngineRunner:
    """A TensorRT engine run by the TensorRT 10 runtime on torch CUDA buffers: named tensors
    (set_input_shape, set_tensor_address) and execute_async_v3 on a stream of its own."""

    def __init__(self, engine_path: Path) -> None:
        import tensorrt as trt

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise CompileError(f"TensorRT could not load {engine_path}; see the TensorRT log above")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.buffers: dict[str, torch.Tensor] = {}

    def _dtype(self, name: str) -> torch.dtype:
        dtype = self.engine.get_tensor_dtype(name)  # a trt.DataType: its name, or str() "DataType.HALF"
        return TENSORRT_TORCH_DTYPES[getattr(dtype, "name", str(dtype).split(".")[-1])]

    def bind(self, inputs: dict[str, torch.Tensor]) -> None:
        for name in INPUT_NAMES:
            tensor = inputs[name].to(self._dtype(name)).contiguous()
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise CompileError(f"the engine does not take {name} of shape {tuple(tensor.shape)}: "
                                   "outside its optimization profile")
            self.buffers[name] = tensor
        shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        self.buffers[OUTPUT_NAME] = torch.empty(shape, dtype=self._dtype(OUTPUT_NAME),
                                                device=inputs[INPUT_NAMES[0]].device)
        for name, tensor in self.buffers.items():
            if not self.context.set_tensor_address(name, tensor.data_ptr()):
                raise CompileError(f"TensorRT refused the address of {name}")
        torch.cuda.synchronize()  # the inputs were written on the default stream; the engine runs on its own

    def execute(self) -> None:
        if not self.context.execute_async_v3(stream_handle=self.stream.cuda_stream):
            raise CompileError("TensorRT execute_async_v3 failed; see the TensorRT log above")

    def synchronize(self) -> None:
        self.stream.synchronize()


def measure_tensorrt(name: str, model: torch.nn.Module, settings: BenchSettings, device: Device,
                     work: Path) -> list[dict]:
    """Build an FP16 engine from ``model`` (eager attention, CPU, FP32) and time it per batch size; its
    logits are compared with the FP32 model's on the same inputs."""
    onnx_path = tensorrt_onnx(model, settings.sequence, work / name)
    largest = max(settings.batches)
    config = CompileConfig(opt_batch=min(CompileConfig().opt_batch, largest), max_batch=largest,
                           opt_sequence=settings.sequence, max_sequence=settings.sequence)
    info = build_engine(onnx_path, work / name / ENGINE_FILENAME, config, "fp16")
    runner = EngineRunner(work / name / ENGINE_FILENAME)
    rows = []
    for batch in settings.batches:
        inputs = random_inputs(batch, settings.sequence, model.config.vocab_size, device.device, seed=batch)
        runner.bind(inputs)
        device.reset_peak()
        seconds = time_calls(runner.execute, settings.repetitions[batch], settings.warmup, runner.synchronize)
        with torch.inference_mode():
            expected = model(**{key: value.cpu() for key, value in inputs.items()}).logits
        difference = (runner.buffers[OUTPUT_NAME].float().cpu() - expected).abs().max().item()
        rows.append({"model": name, "variant": TENSORRT_VARIANT, "batch": batch, "status": "measured",
                     "kernel": f"TensorRT {info['tensorrt_version']} engine", "sdpa_ops": [],
                     "peak_memory_mb": None, "max_abs_logit_diff_vs_fp32": difference, **summarize(seconds, batch)})
    return rows


def tensorrt_rows(models: dict[str, torch.nn.Module], settings: BenchSettings, device: Device) -> list[dict]:
    reason = unavailable_reason(gpu_names(), tensorrt_version())
    if reason is not None:
        return [not_run(name, TENSORRT_VARIANT, None, reason) for name in TENSORRT_MODELS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-trt-") as work:
        for name in TENSORRT_MODELS:
            rows += guarded(lambda: measure_tensorrt(name, models[name], settings, device, Path(work)),
                            name, TENSORRT_VARIANT)
    return rows


def guarded(measure: Callable[[], list[dict]], model: str, variant: str) -> list[dict]:
    """The rows ``measure`` returns, or one "failed" row with the error: the GPU machine is lent for one
    short run, so one variant's failure must not lose the others' figures."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - recorded in the report, with the traceback in the log
        log.exception("%s %s failed", model, variant)
        return [not_run(model, variant, None, f"{type(error).__name__}: {error}", status="failed")]


# ---- the report ----

def relative_figures(rows: list[dict]) -> list[dict]:
    """Ratios of medians: each variant against the one it improves on (REFERENCE_VARIANT) for the same
    model, and each smaller model against the teacher in the same variant; the range is from the two
    medians' 95% intervals."""
    measured = {(row["model"], row["variant"], row["batch"]): row for row in rows if row["status"] == "measured"}
    figures = []
    for (model, variant, batch), row in measured.items():
        references = [(REFERENCE_VARIANT.get(variant), measured.get((model, REFERENCE_VARIANT.get(variant), batch)))]
        if model != TEACHER:
            references.append((TEACHER, measured.get((TEACHER, variant, batch))))
        for against, reference in references:
            if reference is None:
                continue
            (ref_low, ref_high), (low, high) = reference["median_ci_ms"], row["median_ci_ms"]
            figures.append({"model": model, "variant": variant, "batch": batch, "against": against,
                            "speedup": reference["median_ms"] / row["median_ms"],
                            "range": [ref_low / high, ref_high / low]})
    return figures


def nvidia_smi() -> str | None:
    try:
        completed = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def environment(device: Device) -> dict:
    import transformers

    env = {"device": platform.processor() or platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "tensorrt": tensorrt_version(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "nvidia_smi": nvidia_smi()}
    if device.cuda:
        switches = {"flash": "flash_sdp_enabled", "memory_efficient": "mem_efficient_sdp_enabled",
                    "math": "math_sdp_enabled", "cudnn": "cudnn_sdp_enabled"}
        env |= {"device": torch.cuda.get_device_name(device.device),
                "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(device.device))),
                "cudnn": torch.backends.cudnn.version(),
                "sdpa_kernels_enabled": {kernel: getattr(torch.backends.cuda, switch, lambda: None)()
                                         for kernel, switch in switches.items()}}
    return env


def run(settings: BenchSettings, out: Path | None, device: torch.device) -> dict:
    """Measure every model and variant on ``device``; the report is (re)written to ``out`` after each
    model, so a run cut short still leaves what it measured."""
    started, target = time.monotonic(), Device(device)
    models = {attention: build_models(settings.architecture, attention) for attention in ("eager", "sdpa")}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(target),
              "settings": asdict(settings) | {"batches": list(settings.batches)},
              "models": {name: {"note": MODEL_NOTES[name], **model_shapes(model)}
                         for name, model in models["sdpa"].items()},
              "prune_config": {"head_fraction": PruneConfig().head_fraction,
                               "ffn_fraction": PruneConfig().ffn_fraction},
              "rows": []}
    for name in models["sdpa"]:
        for variant in PYTORCH_VARIANTS:
            log.info("%s %s", name, variant.name)
            report["rows"] += guarded(lambda: measure_pytorch(name, variant, models[variant.attention][name], settings,
                                                              target), name, variant.name)
        finish(report, out, started)
    # Guarded as a whole too: a broken tensorrt install can fail on import with more than ImportError.
    report["rows"] += guarded(lambda: tensorrt_rows(models["eager"], settings, target), ", ".join(TENSORRT_MODELS),
                              TENSORRT_VARIANT)
    try:
        report["padding_probe"] = padding_probe(models["sdpa"][TEACHER], settings, target)
    except Exception as error:  # noqa: BLE001 - a probe; the figures above must still be written
        log.exception("padding probe failed")
        report["padding_probe_error"] = f"{type(error).__name__}: {error}"
    return finish(report, out, started)


def finish(report: dict, out: Path | None, started: float) -> dict:
    report["relative"] = relative_figures(report["rows"])
    report["could_not_run"] = [row for row in report["rows"] if row["status"] != "measured"]
    report["seconds"] = time.monotonic() - started
    if out is not None:
        write_json_atomic(out / "gpu.json", report)
        page = out / ".gpu.md.tmp"
        page.write_text(markdown(report))
        page.replace(out / "gpu.md")
    return report


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def markdown(report: dict) -> str:
    """The report as a Markdown page: how it was measured, the figures, the speed-ups, what could not run."""
    out = method_markdown(report) + measured_markdown(report["rows"]) + speedup_markdown(report["relative"])
    probe = report.get("padding_probe")
    if probe:
        out += ["", "## With padding", "", f"{probe['model']} in FP16 at batch {probe['batch']}, {probe['padded']}: "
                f"PyTorch's own choice: {probe['default_kernel']}; flash forced: {probe['forced_flash']}."]
    if report.get("padding_probe_error"):
        out += ["", "## With padding", "", f"The padding probe failed: {report['padding_probe_error']}"]
    out += ["", "## Could not run", ""]
    for row in report["could_not_run"]:
        batch = f" (batch {row['batch']})" if row["batch"] else ""
        out.append(f"- {row['model']} {row['variant']}{batch}: {row['status'].replace('_', ' ')}: {row['reason']}")
    if not report["could_not_run"]:
        out.append("Everything ran.")
    return "\n".join(out + ["", f"Wall time: {report['seconds']:.0f} s.", ""])


def method_markdown(report: dict) -> list[str]:
    env, settings = report["environment"], report["settings"]
    out = [f"# GPU benchmark ({env['device']})", "",
           f"Measured {report['date']} on {env['device']} (nvidia-smi: {env.get('nvidia_smi') or 'not available'}; "
           f"CUDA {env.get('cuda')}, torch {env['torch']}, transformers {env['transformers']}, TensorRT "
           f"{env.get('tensorrt') or 'not installed'}; FP32 matmul precision {env['float32_matmul_precision']}).", "",
           "The models are the demo's architectures with **random weights** (no download, nothing large carried to "
           "the GPU machine): timings depend on shapes and precision, not on weight values, and **no accuracy is "
           f"measured** here. Inputs: random token ids, {settings['sequence']} tokens per text, a full attention "
           "mask. Each call is timed from a synchronised start until the GPU has finished it (what a caller waits "
           f"for, launch overhead included), after {settings['warmup']} untimed calls; the 95% interval of the "
           "median is distribution-free (order statistics). Peak GPU memory: torch's peak allocation per variant "
           "and batch, weights included (not counted for TensorRT, which allocates its own).", "", "Models:", ""]
    for name, shape in report["models"].items():
        out.append(f"- `{name}`: {shape['note']}; {shape['layers']} layers, heads per layer {shape['heads']}, FFN "
                   f"neurons per layer {shape['ffn']}, {shape['parameters'] / 1e6:.1f}M parameters")
    return out


def measured_markdown(rows: list[dict]) -> list[str]:
    out = ["", "| model | variant | batch | attention kernel | median ms | 95% interval of median | p95 ms | "
           "texts/s | peak GPU MB |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "measured":
            continue
        low, high = row["median_ci_ms"]
        memory = "n/a" if row.get("peak_memory_mb") is None else f"{row['peak_memory_mb']:.0f}"
        out.append(f"| {row['model']} | {row['variant']} | {row['batch']} | {row['kernel']} | "
                   f"{_ms(row['median_ms'])} | {_ms(low)} to {_ms(high)} | {_ms(row['p95_ms'])} | "
                   f"{row['texts_per_s']:.0f} | {memory} |")
    return out


def speedup_markdown(figures: list[dict]) -> list[str]:
    """Two tables of the relative figures: each variant against the one it improves on, and each smaller
    model against the teacher; one row per model and batch."""
    cells = {(figure["model"], figure["batch"], figure["variant"], figure["against"]):
             f"{figure['speedup']:.2f}x ({figure['range'][0]:.2f} to {figure['range'][1]:.2f})" for figure in figures}
    order = list(MODEL_NOTES)
    keys = sorted({(figure["model"], figure["batch"]) for figure in figures},
                  key=lambda key: (order.index(key[0]) if key[0] in order else len(order), key[1]))
    improved, variants = list(REFERENCE_VARIANT), [variant.name for variant in PYTORCH_VARIANTS] + [TENSORRT_VARIANT]

    def table(columns: list[str], against: Callable[[str], str], models: list[tuple[str, int]]) -> list[str]:
        lines = ["| model | batch | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for model, batch in models:
            row = [cells.get((model, batch, column, against(column)), "") for column in columns]
            lines.append(f"| {model} | {batch} | " + " | ".join(row) + " |")
        return lines

    return ["", "## Speed-ups", "", "Ratios of medians (above 1: faster); in brackets, the range the two medians' 95% "
            "intervals allow.", "", "Against the same model's reference variant (" +
            "; ".join(f"{variant} against {reference}" for variant, reference in REFERENCE_VARIANT.items()) + "):", "",
            *table(improved, REFERENCE_VARIANT.get, keys), "", "Against the teacher in the same variant:", "",
            *table(variants, lambda _: TEACHER, [key for key in keys if key[0] != TEACHER])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where gpu.json and gpu.md go")
    args = parser.parse_args(argv)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(name, value)
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(BenchSettings(), args.out, torch.device("cuda"))
    print(markdown(report))
    print(f"written: {args.out}/gpu.json and gpu.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench-batch``: does a text's answer depend on the texts it is served with?

Triton serves a request's texts as one padded batch, and its dynamic batcher joins requests of
equal shape. A model whose arithmetic mixes the rows of a batch then answers a text differently
depending on its neighbours. ONNX Runtime's dynamic INT8 does: it computes one activation scale
over the whole input tensor, padding included.

For every FP32 ONNX model of an optimize_model run folder (the models the DAG built: ``onnx_fp32``,
``student_onnx_fp32``, ``pruned_onnx_fp32``), this builds each served format with the pipeline's own
quantization functions: FP32 as exported, dynamic INT8 with ONNX Runtime's per-tensor scales,
dynamic INT8 with per-token scales (the pipeline's default), and static INT8 (calibrated QDQ).
Each format answers the run's test texts

- alone (batch 1, no padding: what the evaluation measured and what the gates judged);
- in requests of ``--batch`` texts drawn at random, padded to the longest (a multi-text request);
- in batches of texts with the same token count, no padding (what the dynamic batcher forms).

Figures per format: the share of texts whose label flips (with its 95% Wilson interval), the
largest and the mean change of a logit, accuracy alone, and batch-1 p50 latency and batched
throughput, timed in interleaved rounds (the machine is shared; ratios within a round count).

    python -m bench.batch_invariance                      # the newest run of the local stack
    python -m bench.batch_invariance --run-dir <folder>   # a given run folder
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.compress import machine

log = logging.getLogger("bench.batch_invariance")
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SOURCES = ("onnx_fp32", "student_onnx_fp32", "pruned_onnx_fp32")
FORMATS = ("fp32", "dynamic_int8_per_tensor", "dynamic_int8_per_token", "static_int8")
# Target (issue 23): every format the pipeline serves by default flips no label when batched.
SERVED_BY_DEFAULT = ("fp32", "dynamic_int8_per_token")


@dataclass(frozen=True)
class Texts:
    texts: list[str]
    labels: np.ndarray
    max_length: int


def build_format(source: Path, fmt: str, out: Path, calibration: list[str], max_length: int) -> Path:
    """``source``'s model in ``fmt``, written with the pipeline's quantization functions."""
    from tasks.config import ActivationScales, QuantizeConfig
    from tasks.modeling import load_tokenizer
    from tasks.onnx_model import MODEL_FILENAME, copy_tokenizer_files
    from tasks.quantize import quantize_dynamic_int8, quantize_static_int8

    if fmt == "fp32":
        return source
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "static_int8":
        quantize_static_int8(source / MODEL_FILENAME, out / MODEL_FILENAME, QuantizeConfig.static_calibrated(),
                             load_tokenizer(source), calibration, max_length)
    else:
        scales = (ActivationScales.PER_TOKEN if fmt.endswith("per_token") else ActivationScales.PER_TENSOR).value
        quantize_dynamic_int8(source / MODEL_FILENAME, out / MODEL_FILENAME, QuantizeConfig(activation_scales=scales))
    copy_tokenizer_files(source, out)
    return out


def random_requests(count: int, size: int, seed: int) -> list[list[int]]:
    """Indices of ``count`` texts cut into requests of ``size`` in a random order."""
    order = np.random.default_rng(seed).permutation(count)
    return [order[start:start + size].tolist() for start in range(0, count, size)]


def equal_length_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices grouped by token count, in batches of at most ``size`` (what the dynamic batcher joins:
    requests of the same shape); texts without a same-length partner are left out."""
    groups: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        groups.setdefault(length, []).append(index)
    return [members[start:start + size] for members in groups.values() if len(members) > 1
            for start in range(0, len(members), size) if len(members[start:start + size]) > 1]


def logits_of(predict: Callable, tokenizer, texts: list[str], groups: list[list[int]], max_length: int) -> dict[int, np.ndarray]:
    from tasks.evaluate import tokenize

    answers = {}
    for group in groups:
        out = predict(tokenize(tokenizer, [texts[index] for index in group], max_length))
        answers.update(zip(group, out))
    return answers


def compare(alone: np.ndarray, batched: dict[int, np.ndarray]) -> dict:
    """Flips and logit changes of the texts in ``batched`` against their answers alone."""
    from monitoring.stats import wilson_interval

    indices = sorted(batched)
    if not indices:
        return {"texts": 0}
    mine, theirs = alone[indices], np.stack([batched[index] for index in indices])
    flips = int((mine.argmax(axis=1) != theirs.argmax(axis=1)).sum())
    change = np.abs(mine - theirs)
    low, high = wilson_interval(flips, len(indices))
    return {"texts": len(indices), "flips": flips, "flip_rate": flips / len(indices), "flip_rate_95": [low, high],
            "max_logit_change": float(change.max()), "mean_logit_change": float(change.mean())}


def timed(predict: Callable, inputs: list[dict]) -> float:
    start = time.perf_counter()
    for batch in inputs:
        predict(batch)
    return time.perf_counter() - start


def measure_source(source: Path, work: Path, data: Texts, calibration: list[str], batch: int, seed: int,
                   rounds: int) -> dict:
    """Every format of one FP32 model: invariance figures, accuracy, and interleaved timings."""
    from tasks.evaluate import onnx_predictor, tokenize
    from tasks.modeling import load_tokenizer
    from tasks.tokens import encode

    tokenizer = load_tokenizer(source)
    lengths = [len(ids) for ids in encode(tokenizer, data.texts, data.max_length, padding=False,
                                          return_tensors=None)["input_ids"]]
    requests, same_length = random_requests(len(data.texts), batch, seed), equal_length_batches(lengths, batch)
    singles = [tokenize(tokenizer, [text], data.max_length) for text in data.texts]
    padded = [tokenize(tokenizer, [data.texts[i] for i in group], data.max_length) for group in requests]
    rows, predictors, fp32_labels = {}, {}, None
    for fmt in FORMATS:  # fp32 first: the others' label agreement is with it
        log.info("%s: %s", source.name, fmt)
        model_dir = build_format(source, fmt, work / f"{source.name}_{fmt}", calibration, data.max_length)
        predict = predictors[fmt] = onnx_predictor(model_dir, threads=0)
        alone = np.concatenate([predict(single) for single in singles])
        fp32_labels = alone.argmax(axis=1) if fp32_labels is None else fp32_labels
        rows[fmt] = {
            "accuracy_alone": float((alone.argmax(axis=1) == data.labels).mean()),
            "agreement_with_fp32": float((alone.argmax(axis=1) == fp32_labels).mean()),
            "padded_requests": compare(alone, logits_of(predict, tokenizer, data.texts, requests, data.max_length)),
            "equal_length_batches": compare(alone, logits_of(predict, tokenizer, data.texts, same_length,
                                                             data.max_length)),
        }
    timings = {fmt: {"batch1_s": [], "batched_s": []} for fmt in FORMATS}
    for _ in range(rounds):  # interleaved: each round times every format once
        for fmt in FORMATS:
            timings[fmt]["batch1_s"].append(timed(predictors[fmt], singles[:100]) / min(100, len(singles)))
            timings[fmt]["batched_s"].append(timed(predictors[fmt], padded) / len(data.texts))
    for fmt in FORMATS:
        rows[fmt]["batch1_ms"] = float(np.median(timings[fmt]["batch1_s"]) * 1000)
        rows[fmt]["batched_texts_per_s"] = float(1.0 / np.median(timings[fmt]["batched_s"]))
    return {"formats": rows, "texts": len(data.texts), "batch": batch, "rounds": rounds,
            "equal_length_batches": len(same_length),
            "per_token_over_per_tensor": {  # per round: time per text, per-token / per-tensor
                kind: [float(a / b) for a, b in zip(timings["dynamic_int8_per_token"][kind],
                                                    timings["dynamic_int8_per_tensor"][kind])]
                for kind in ("batch1_s", "batched_s")}}


def markdown(report: dict) -> str:
    lines = [
        "# Batch invariance: alone versus batched, per served format", "",
        f"Run folder `{report['run']}` (the models the DAG built; INT8 formats quantized from its FP32 exports "
        f"with the pipeline's functions). {report['texts']} test texts, requests of {report['batch']}. "
        f"Processor: {report['machine']['processor']} ({report['machine']['cpus']} CPUs).", "",
        "Flip: the text's label differs from its label when sent alone. Padded requests: random texts padded to "
        "the longest; equal-length batches: texts of the same token count, no padding (what Triton's dynamic "
        "batcher joins). Batch-1 time per text and batched throughput: medians over interleaved rounds.", "",
        "| model | format | accuracy alone | labels as FP32 | flips, padded requests (95%) | max logit change | "
        "flips, equal-length batches (95%) | max logit change | batch-1 ms | batched texts/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for source, measured in report["models"].items():
        for fmt, row in measured["formats"].items():
            cells = []
            for kind in ("padded_requests", "equal_length_batches"):
                figures = row[kind]
                if not figures["texts"]:
                    cells += ["-", "-"]
                    continue
                low, high = figures["flip_rate_95"]
                cells += [f"{figures['flips']}/{figures['texts']} = {figures['flip_rate']:.1%} [{low:.1%}, {high:.1%}]",
                          f"{figures['max_logit_change']:.2g}"]
            lines.append(f"| {source} | {fmt} | {row['accuracy_alone']:.4f} | {row['agreement_with_fp32']:.1%} | "
                         + " | ".join(cells)
                         + f" | {row['batch1_ms']:.2f} | {row['batched_texts_per_s']:.0f} |")
    lines += ["", "Per-token over per-tensor dynamic INT8, time per text, per round (1.00 = as fast):", ""]
    for source, measured in report["models"].items():
        ratios = measured["per_token_over_per_tensor"]
        lines.append(f"- {source}: batch 1 " + ", ".join(f"{r:.2f}" for r in ratios["batch1_s"])
                     + "; batched " + ", ".join(f"{r:.2f}" for r in ratios["batched_s"]))
    verdict = "met" if report["met"] else "missed"
    lines += ["", f"Target: no label flips for the formats served by default ({', '.join(SERVED_BY_DEFAULT)}) in "
                  f"either scenario: **{verdict}**.", ""]
    return "\n".join(lines)


def read_texts(run_dir: Path, limit: int) -> tuple[Texts, list[str]]:
    """The run's test texts (at most ``limit``) with their labels, its maximum length, and training
    texts to calibrate static INT8 with (as the pipeline does)."""
    from tasks.splits import read_split

    test, train = read_split(run_dir / "data", "test").head(limit), read_split(run_dir / "data", "train")
    config = json.loads((run_dir / "onnx_fp32" / "export_config.json").read_text()) \
        if (run_dir / "onnx_fp32" / "export_config.json").exists() else {}
    max_length = int(config.get("max_length", 128))
    return Texts(test["text"].tolist(), test["label"].to_numpy(), max_length), train["text"].head(128).tolist()


def run(run_dir: Path, results: Path, limit: int, batch: int, seed: int, rounds: int) -> dict:
    data, calibration = read_texts(run_dir, limit)
    models = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as work:
        for name in SOURCES:
            if (run_dir / name / "model.onnx").exists():
                models[name] = measure_source(run_dir / name, Path(work), data, calibration, batch, seed, rounds)
    met = all(measured["formats"][fmt][kind].get("flips", 0) == 0 for measured in models.values()
              for fmt in SERVED_BY_DEFAULT for kind in ("padded_requests", "equal_length_batches"))
    report = {"run": run_dir.name, "machine": machine(), "texts": len(data.texts), "batch": batch,
              "max_length": data.max_length, "models": models, "met": met,
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    results.mkdir(parents=True, exist_ok=True)
    (results / "batch-invariance.json").write_text(json.dumps(report, indent=2))
    (results / "batch-invariance.md").write_text(markdown(report))
    return report


def newest_run(runs_dir: Path) -> Path:
    candidates = sorted((path for path in runs_dir.glob("*") if (path / "onnx_fp32" / "model.onnx").exists()),
                        key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise SystemExit(f"no optimize_model run with an onnx_fp32 model under {runs_dir}: run `make demo` first")
    return candidates[-1]


def main(argv: list[str] | None = None) -> int:
    from opsctl.settings import StackSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="an optimize_model run folder (default: the stack's newest)")
    parser.add_argument("--texts", type=int, default=500, help="test texts to use (at most)")
    parser.add_argument("--batch", type=int, default=8, help="texts per request (Triton's preferred batch size)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import os

    run_dir = args.run_dir or newest_run(StackSettings.from_env(os.environ).runs_dir)
    report = run(run_dir, args.results, args.texts, args.batch, args.seed, args.rounds)
    print(markdown(report))
    return 0 if report["met"] else 2


if __name__ == "__main__":
    sys.exit(main())

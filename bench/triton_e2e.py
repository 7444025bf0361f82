"""``make bench-triton``: the promoted model served by Triton vs the same ONNX file in-process.

A Triton server is started from ``.venv-triton`` on free loopback ports with a model repository
written by the promotion code (``serving.model_repository``: tokenizer -> ONNX model ->
postprocess ensemble, the served configuration). Two levels are measured at a few concurrencies:

- ``ensemble``: text in, label out. Triton: NVIDIA's ``perf_analyzer`` (from the
  ``tritonclient==2.51.0`` wheel, ``make perf-analyzer``) over gRPC; in-process: the model's
  tokenizer + an ONNX Runtime session on the same ``model.onnx``, called from as many threads.
- ``model``: token ids in, logits out: the ONNX model alone, same comparison.

Both sides share this machine's cores with their client (perf_analyzer, or the calling threads):
a real deployment pays that too. On this machine Triton is the pip-bundled server, whose ONNX
models run in the project's python-backend stand-in for the ``onnxruntime`` backend
(``serving/triton_backends``): the same ONNX Runtime, reached through a python stub process, that
like the real backend runs each group the dynamic batcher forms as one batch. The official
container's C++ backend skips the stub hop, so the share measured here is a lower bound. Figures:
throughput (texts/s), latency p50/p95/p99 per concurrency, and Triton's throughput as a share of
in-process (the figure of record is the best throughput of each side over the concurrencies,
ensemble level).

    python -m bench.triton_e2e [--model-dir .bench/compress/pruned_int8]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from opsctl.settings import StackSettings

log = logging.getLogger("bench.triton_e2e")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
PERF_ANALYZER_DIR = REPO_ROOT / ".tools" / "perf_analyzer"
MODEL_NAME = "bench_classifier"
# Up to 8 requests in flight: on 2 cores Triton's pipeline (server, three stubs) was not yet saturated at 4.
CONCURRENCIES = (1, 2, 4, 8)
TARGET_SHARE = 0.8  # Triton end to end >= 80% of in-process ONNX Runtime throughput


@dataclass(frozen=True)
class Load:
    """Throughput and latency of one side at one concurrency."""

    concurrency: int
    throughput_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        return {"concurrency": self.concurrency, "throughput_per_s": self.throughput_per_s, "p50_ms": self.p50_ms,
                "p95_ms": self.p95_ms, "p99_ms": self.p99_ms}


def perf_analyzer_command(binary: Path, model: str, grpc_url: str, input_data: Path, concurrency: int,
                          csv_path: Path, interval_ms: int) -> list[str]:
    return [str(binary), "-m", model, "-i", "grpc", "-u", grpc_url, "-b", "1", "--input-data", str(input_data),
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(interval_ms),
            "--stability-percentage", "50", "--max-trials", "10", "--percentile", "95", "-f", str(csv_path)]


def parse_perf_analyzer_csv(text: str) -> Load:
    """The one row of a ``perf_analyzer -f`` CSV (latencies in microseconds)."""
    row = next(csv.DictReader(text.splitlines()))
    return Load(concurrency=int(row["Concurrency"]), throughput_per_s=float(row["Inferences/Second"]),
                p50_ms=float(row["p50 latency"]) / 1000.0, p95_ms=float(row["p95 latency"]) / 1000.0,
                p99_ms=float(row["p99 latency"]) / 1000.0)


def ensemble_input_data(texts: list[str]) -> dict:
    """perf_analyzer's ``--input-data`` for the ensemble: one text per request."""
    return {"data": [{"TEXT": {"content": [text], "shape": [1]}} for text in texts]}


def model_input_data(batches: list[dict[str, np.ndarray]]) -> dict:
    """perf_analyzer's ``--input-data`` for the ONNX model: one tokenized text per request."""
    return {"data": [{name: {"content": batch[name][0].tolist(), "shape": [int(batch[name].shape[1])]}
                      for name in ("input_ids", "attention_mask")} for batch in batches]}


def in_process_load(call, requests: list, concurrency: int, seconds: float) -> Load:
    """``concurrency`` threads calling ``call(request)`` in turn over ``requests`` for ``seconds``."""
    for request in requests[:5]:
        call(request)
    timings: list[list[float]] = [[] for _ in range(concurrency)]
    stop = threading.Event()

    def worker(index: int) -> None:
        position = index
        while not stop.is_set():
            started = time.perf_counter()
            call(requests[position % len(requests)])
            timings[index].append((time.perf_counter() - started) * 1000.0)
            position += concurrency

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    calls = np.concatenate([np.array(values) for values in timings])
    return Load(concurrency, len(calls) / elapsed, float(np.percentile(calls, 50)), float(np.percentile(calls, 95)),
                float(np.percentile(calls, 99)))


def in_process_callers(model_dir: Path, max_length: int, threads: int):
    """The in-process counterparts: (text -> label) and (token ids -> logits) on one ORT session."""
    from tasks import evaluate

    predict = evaluate.onnx_predictor(model_dir, threads)
    tokenizer = evaluate.load_tokenizer(model_dir)

    def classify(text: str) -> int:
        return int(predict(evaluate.tokenize(tokenizer, [text], max_length)).argmax())

    return classify, predict


@contextmanager
def triton_serving(home: Path, model_dir: Path, labels: tuple[str, ...], max_length: int, intra_op_threads: int,
                   instances: int = 1) -> Iterator[StackSettings]:
    """A Triton of its own, serving ``model_dir`` as the ensemble the promotion code writes; stopped on exit."""
    from opsctl.services import standalone_triton
    from serving import model_repository as repo
    from serving.triton_client import TritonClient, TritonUnavailable, wait_until_ready

    ensemble = repo.ClassifierEnsemble(MODEL_NAME, labels, max_length, intra_op_threads=intra_op_threads,
                                       instances=instances)
    repo.write_ensemble_version(StackSettings(home=home).triton_model_repository, ensemble, model_dir)
    with standalone_triton(home) as settings:
        client = TritonClient(settings.triton_http_url)
        try:
            wait_until_ready(client, (MODEL_NAME,), timeout_s=180)
        except TritonUnavailable as error:
            raise RuntimeError(f"{error} (log: {settings.logs_dir / 'triton.log'})") from error
        finally:
            client.close()
        yield settings


def perf_analyzer_binary() -> Path:
    binary = PERF_ANALYZER_DIR / "perf_analyzer"
    if not binary.exists():
        raise SystemExit(f"{binary.relative_to(REPO_ROOT)} not found: run `make perf-analyzer` first")
    return binary


def triton_load(binary: Path, model: str, grpc_url: str, data: dict, concurrency: int, scratch: Path,
                interval_ms: int) -> Load:
    input_data, csv_path = scratch / f"{model}-input.json", scratch / f"{model}-{concurrency}.csv"
    input_data.write_text(json.dumps(data))
    env = dict(os.environ, LD_LIBRARY_PATH=f"{PERF_ANALYZER_DIR}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    command = perf_analyzer_command(binary, model, grpc_url, input_data, concurrency, csv_path, interval_ms)
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if completed.returncode != 0 or not csv_path.exists():
        raise RuntimeError(f"perf_analyzer failed ({completed.returncode}):\n{completed.stdout[-2000:]}"
                           f"\n{completed.stderr[-2000:]}")
    return parse_perf_analyzer_csv(csv_path.read_text())


def compare(triton: list[Load], in_process: list[Load]) -> dict:
    """Per concurrency and at the best throughput of each side: Triton's share of in-process."""
    best_triton = max(load.throughput_per_s for load in triton)
    best_local = max(load.throughput_per_s for load in in_process)
    return {
        "triton": [load.as_dict() for load in triton],
        "in_process": [load.as_dict() for load in in_process],
        "share_by_concurrency": {load.concurrency: load.throughput_per_s / local.throughput_per_s
                                 for load, local in zip(triton, in_process)},
        "best_triton_per_s": best_triton, "best_in_process_per_s": best_local,
        "best_share": best_triton / best_local,
    }


def run(model_dir: Path, data_dir: Path, results: Path, texts: int = 200, seconds: float = 5.0,
        concurrencies: tuple[int, ...] = CONCURRENCIES, instances: int | None = None,
        threads: int | None = None) -> dict:
    """Measure both sides. ``instances`` / ``threads``: the served configuration (default: what
    promotion writes, ``tasks.config.PromoteConfig``); the in-process session uses the same threads."""
    from tasks import evaluate
    from tasks.config import EvaluateConfig
    from tasks.splits import read_split

    started = time.monotonic()
    binary = perf_analyzer_binary()
    config = json.loads((model_dir / "config.json").read_text())
    labels = tuple(config["id2label"][str(index)] for index in range(len(config["id2label"])))
    threads = EvaluateConfig().threads if threads is None else threads  # what promotion configures
    instances = 1 if instances is None else instances
    max_length = EvaluateConfig().max_length
    sample = read_split(data_dir, "test")["text"].head(texts).tolist()
    tokenizer = evaluate.load_tokenizer(model_dir)
    batches = [evaluate.tokenize(tokenizer, [text], max_length) for text in sample]
    classify, predict = in_process_callers(model_dir, max_length, threads)
    levels = {"ensemble": (MODEL_NAME, ensemble_input_data(sample), classify, sample),
              "model": (f"{MODEL_NAME}_onnx", model_input_data(batches), predict, batches)}
    report = {"model_dir": str(model_dir).replace(f"{REPO_ROOT}/", ""), "texts": len(sample), "seconds_per_point": seconds,
              "concurrencies": list(concurrencies), "intra_op_threads": threads, "instances": instances, "levels": {}}
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as scratch:
        with triton_serving(Path(scratch) / "stack", model_dir, labels, max_length, threads, instances) as server:
            for level, (model, data, call, requests) in levels.items():
                triton, local = [], []
                for concurrency in concurrencies:
                    # Alternate the two sides at each concurrency, so a noisy spell hits both.
                    triton.append(triton_load(binary, model, server.triton_grpc_url, data, concurrency,
                                              Path(scratch), int(seconds * 1000)))
                    local.append(in_process_load(call, requests, concurrency, seconds))
                    log.info("%s c=%d: Triton %.0f/s p50 %.2f ms | in-process %.0f/s p50 %.2f ms", level,
                             concurrency, triton[-1].throughput_per_s, triton[-1].p50_ms,
                             local[-1].throughput_per_s, local[-1].p50_ms)
                report["levels"][level] = compare(triton, local)
    share = report["levels"]["ensemble"]["best_share"]
    report["target"] = {"target": TARGET_SHARE, "measured": share, "met": bool(share >= TARGET_SHARE)}
    report["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["seconds"] = time.monotonic() - started
    results.mkdir(parents=True, exist_ok=True)
    (results / "triton-e2e.json").write_text(json.dumps(report, indent=2).replace(f"{REPO_ROOT}/", ""))
    (results / "triton-e2e.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    out = ["# Triton end to end vs in-process ONNX Runtime", "",
           f"Measured {report['finished']} on this machine ({os.cpu_count()} CPUs), model `{report['model_dir']}`, "
           f"{report['texts']} test texts sent one per request, {report['seconds_per_point']:.0f} s per point. "
           f"Served configuration: {report.get('instances', 1)} instance(s) of the classifier and the tokenizer, "
           f"ONNX Runtime intra-op threads {report['intra_op_threads'] or 'default (one per core)'} on both "
           "sides. Triton: perf_analyzer over gRPC to a server started for this benchmark with that "
           "configuration. In-process: the same model.onnx in one ONNX Runtime session called from as many "
           "threads as the concurrency. Both sides share the cores with their client. Triton here is the "
           "pip-bundled server: its ONNX models run in this project's python-backend stand-in for the "
           "`onnxruntime` backend (the same ONNX Runtime behind a python stub process); the official "
           "container's C++ backend skips that hop, so these shares are a lower bound.", ""]
    for level, figures in report["levels"].items():
        what = "text in, label out (tokenizer included on both sides)" if level == "ensemble" else \
            "token ids in, logits out (the ONNX model alone)"
        out += [f"## {level}: {what}", "",
                "| concurrency | Triton texts/s | in-process texts/s | Triton share | Triton p50 / p95 / p99 ms | "
                "in-process p50 / p95 / p99 ms |", "|---|---|---|---|---|---|"]
        for triton, local in zip(figures["triton"], figures["in_process"]):
            out.append(f"| {triton['concurrency']} | {triton['throughput_per_s']:.0f} | "
                       f"{local['throughput_per_s']:.0f} | "
                       f"{triton['throughput_per_s'] / local['throughput_per_s']:.0%} | "
                       f"{triton['p50_ms']:.2f} / {triton['p95_ms']:.2f} / {triton['p99_ms']:.2f} | "
                       f"{local['p50_ms']:.2f} / {local['p95_ms']:.2f} / {local['p99_ms']:.2f} |")
        out += ["", f"Best throughput: Triton {figures['best_triton_per_s']:.0f}/s, in-process "
                    f"{figures['best_in_process_per_s']:.0f}/s: **{figures['best_share']:.0%}**.", ""]
    target = report["target"]
    verdict = "met" if target["met"] else "NOT met"
    out += [f"Target (ensemble level, best throughput): Triton >= {target['target']:.0%} of in-process: "
            f"{target['measured']:.0%}, **{verdict}**.", "", f"Total wall time: {report['seconds']:.0f} s.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from bench.compress import PROMOTED_ROW, candidate_dir

    parser = argparse.ArgumentParser(prog="python -m bench.triton_e2e", description=__doc__.split("\n\n")[0])
    work = REPO_ROOT / ".bench" / "compress"
    parser.add_argument("--model-dir", type=Path, default=candidate_dir(work, PROMOTED_ROW),
                        help="an ONNX model folder (default: the promoted combination of make bench-compress)")
    parser.add_argument("--data-dir", type=Path, default=work / "data", help="a prepared data folder (test split)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per measured point")
    parser.add_argument("--instances", type=int, help="served model instances (default: as promotion writes)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: as promotion writes)")
    args = parser.parse_args(argv)
    for name, value in (("MLFLOW_DISABLE_TELEMETRY", "true"), ("DO_NOT_TRACK", "true")):
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    if not (args.model_dir / "model.onnx").exists():
        print(f"no model.onnx in {args.model_dir}: run `make bench-compress` first, or pass --model-dir",
              file=sys.stderr)
        return 1
    report = run(args.model_dir, args.data_dir, args.results, seconds=args.seconds, instances=args.instances,
                 threads=args.threads)
    print(markdown(report))
    print(f"written: {args.results}/triton-e2e.json and .md")
    return 0 if report["target"]["met"] else 2


if __name__ == "__main__":
    sys.exit(main())

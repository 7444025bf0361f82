"""Batch-1 latency of several models, interleaved in time, each model in its own process.

One worker process per model loads it, tokenizes the sample texts and warms up, then waits. The
parent runs rounds: in each round every worker in turn (rotated order) times all sample texts while
the others sit idle. So each model runs alone on the cores with its own runtime thread pools (as it
is served), and a noisy spell of this shared machine lands on several models instead of one
model's whole measurement. Ratios between two models are taken per round; their median over the
rounds is the figure of record, with the lowest and highest round shown beside it.

Between two turns the parent waits ``GAP_S``, and each turn starts with a few untimed calls:
runtimes keep their threads spinning for a while after a call (OpenMP in PyTorch, ONNX Runtime's
pool), and without the gap the model timed right after a PyTorch worker shared the cores with
those spinning threads: in one run every model's ratio to the teacher moved by a third depending
on where it stood in the round's order.

    python -m bench.latency_workers MODEL_DIR FORMAT MAX_LENGTH WARMUP TEXTS_FILE   # a worker (internal)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

READY = "ready"
GAP_S = 0.5  # idle time between two workers' turns (spinning threads of the last one go to sleep)
WARM_CALLS = 5  # untimed calls at the start of each turn


@dataclass(frozen=True)
class Candidate:
    name: str
    model_dir: Path
    model_format: str  # tasks.results.ModelFormat value


@dataclass
class InterleavedLatency:
    rounds: int
    texts: int
    per_round_p50: dict[str, list[float]] = field(default_factory=dict)
    calls: dict[str, list[float]] = field(default_factory=dict)

    def percentiles(self, name: str) -> dict[str, float]:
        values = np.array(self.calls[name])
        return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
                "p99": float(np.percentile(values, 99)), "calls": float(len(values))}

    def speedup(self, reference: str, name: str) -> dict[str, float]:
        """Per-round ratio of p50 latencies (reference / name): median, lowest and highest round."""
        ratios = self.round_ratios(reference, name)
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    def round_ratios(self, reference: str, name: str) -> list[float]:
        return [ref / other for ref, other in zip(self.per_round_p50[reference], self.per_round_p50[name])]


class Worker:
    """One model in its own process, timing batch-1 calls on request."""

    def __init__(self, candidate: Candidate, texts_file: Path, max_length: int, warmup: int) -> None:
        self.name = candidate.name
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.latency_workers", str(candidate.model_dir), candidate.model_format,
             str(max_length), str(warmup), str(texts_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        line = self._read(deadline)
        if line != READY:
            raise RuntimeError(f"latency worker for {self.name} did not start: {line!r}")

    def time_all(self, timeout_s: float = 600.0) -> list[float]:
        self._process.stdin.write("time\n")
        self._process.stdin.flush()
        return json.loads(self._read(time.monotonic() + timeout_s))

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._process.stdin.write("quit\n")
                self._process.stdin.flush()
                self._process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()

    def _read(self, deadline: float) -> str:
        line = self._process.stdout.readline()
        if not line:
            code = self._process.wait(timeout=max(1.0, deadline - time.monotonic()))
            raise RuntimeError(f"latency worker for {self.name} exited with {code} (its stderr is above)")
        return line.strip()


def measure(candidates: list[Candidate], texts: list[str], max_length: int, warmup: int = 10,
            rounds: int = 5, progress=lambda message: None) -> InterleavedLatency:
    """Start one worker per candidate, then time ``rounds`` rounds of every candidate on ``texts``."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    result = InterleavedLatency(rounds=rounds, texts=len(texts))
    workers: list[Worker] = []
    scratch = tempfile.TemporaryDirectory(prefix="latency-")
    texts_file = Path(scratch.name) / "texts.json"
    texts_file.write_text(json.dumps(texts))
    try:
        # All start at once (nothing is timed until every worker is ready).
        workers.extend(Worker(candidate, texts_file, max_length, warmup) for candidate in candidates)
        for worker in workers:
            worker.wait_ready()
            result.per_round_p50[worker.name], result.calls[worker.name] = [], []
        for round_index in range(rounds):
            shift = round_index % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                time.sleep(GAP_S)
                timings = worker.time_all()
                result.calls[worker.name].extend(timings)
                result.per_round_p50[worker.name].append(float(np.percentile(timings, 50)))
            progress(f"latency round {round_index + 1}/{rounds} done")
    finally:
        for worker in workers:
            worker.close()
        scratch.cleanup()
    return result


def _serve(model_dir: Path, model_format: str, max_length: int, warmup: int, texts_file: Path) -> None:
    # The protocol owns stdout; anything a library prints goes to stderr.
    protocol, sys.stdout = sys.stdout, sys.stderr
    from tasks import evaluate
    from tasks.results import ModelFormat

    texts = json.loads(texts_file.read_text())
    predict = evaluate.PREDICTORS[ModelFormat(model_format)](model_dir, 0)
    tokenizer = evaluate.load_tokenizer(model_dir)
    batches = [evaluate.tokenize(tokenizer, [text], max_length) for text in texts]
    for batch in batches[:warmup]:
        predict(batch)
    print(READY, file=protocol, flush=True)
    for command in sys.stdin:
        if command.strip() != "time":
            break
        for batch in batches[:WARM_CALLS]:
            predict(batch)
        timings = []
        for batch in batches:
            started = time.perf_counter()
            predict(batch)
            timings.append((time.perf_counter() - started) * 1000.0)
        print(json.dumps(timings), file=protocol, flush=True)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))

"""Batch-1 latency of several models, interleaved in time, each model in its own process.

One worker process per model loads it, tokenizes the sample texts and warms up, then waits. The
parent runs rounds: in each round every worker in turn (rotated order) times a short slice of the
sample texts (``TURN_TEXTS``; the next slice in the next round) while the others sit idle. So each
model runs alone on the cores with its own runtime thread pools (as it is served), and the turns
of two models in one round are seconds apart at most. Ratios between two models are taken per
round; their median over the rounds is the figure of record, with the middle half and the range
of the rounds shown beside it.

Why short turns: on this shared 2-vCPU machine a two-thread ONNX Runtime session of the promoted
model spends spells of seconds at 4.1 ms per text instead of 2.35 ms (slower than one thread,
3.8 ms, which stays steady), and the PyTorch teacher at 27.8 ms instead of 21.7 ms. With turns of
100 texts (up to 3 s each, rounds of 25 s) the two turns of a ratio often fell in different
spells; with short turns both mostly fall in the same one. A worker may also time its model on
one thread (``Candidate.threads``): one-thread latency does not have these spells.

Between two turns the parent waits ``GAP_S``: runtimes keep their threads spinning after a call
(measured here: ONNX Runtime's pool about 50 ms, PyTorch's OpenMP threads about 10 ms), and the
next model must not share the cores with them. Each turn starts with a few untimed calls.

    python -m bench.latency_workers MODEL_DIR FORMAT MAX_LENGTH WARMUP THREADS TEXTS_FILE   # a worker (internal)
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
GAP_S = 0.1  # idle time between two workers' turns (spinning threads of the last one go to sleep)
WARM_CALLS = 3  # untimed calls at the start of each turn
TURN_TEXTS = 20  # texts timed in one turn


@dataclass(frozen=True)
class Candidate:
    name: str
    model_dir: Path
    model_format: str  # tasks.results.ModelFormat value
    threads: int = 0  # runtime threads: 0 = the runtime's default (all cores, as served)


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
        """Per-round ratio of p50 latencies (reference / name): median, quartiles (q1, q3: the
        middle half of the rounds), lowest and highest round."""
        ratios = self.round_ratios(reference, name)
        q1, q3 = (float(value) for value in np.percentile(ratios, [25, 75]))
        return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios)}

    def round_ratios(self, reference: str, name: str) -> list[float]:
        return [ref / other for ref, other in zip(self.per_round_p50[reference], self.per_round_p50[name])]


class Worker:
    """One model in its own process, timing batch-1 calls on request."""

    def __init__(self, candidate: Candidate, texts_file: Path, max_length: int, warmup: int,
                 truncation: str = "head") -> None:
        self.name = candidate.name
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.latency_workers", str(candidate.model_dir), candidate.model_format,
             str(max_length), str(warmup), str(candidate.threads), str(texts_file), truncation],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        line = self._read(deadline)
        if line != READY:
            raise RuntimeError(f"latency worker for {self.name} did not start: {line!r}")

    def time_texts(self, start: int, count: int, timeout_s: float = 600.0) -> list[float]:
        """Milliseconds per call for sample texts ``start`` .. ``start + count - 1`` (wrapping)."""
        self._process.stdin.write(f"time {start} {count}\n")
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
            rounds: int = 5, turn_texts: int = TURN_TEXTS, progress=lambda message: None,
            truncation: str = "head") -> InterleavedLatency:
    """Start one worker per candidate, then time ``rounds`` rounds of every candidate, each turn on
    the next ``turn_texts`` of ``texts`` (the same slice for every candidate in a round), each text
    cut to ``max_length`` tokens by ``truncation`` as the run evaluated it."""
    if rounds < 1 or turn_texts < 1:
        raise ValueError("rounds and turn_texts must be >= 1")
    result = InterleavedLatency(rounds=rounds, texts=len(texts))
    workers: list[Worker] = []
    scratch = tempfile.TemporaryDirectory(prefix="latency-")
    texts_file = Path(scratch.name) / "texts.json"
    texts_file.write_text(json.dumps(texts))
    try:
        # All start at once (nothing is timed until every worker is ready).
        workers.extend(Worker(candidate, texts_file, max_length, warmup, truncation) for candidate in candidates)
        for worker in workers:
            worker.wait_ready()
            result.per_round_p50[worker.name], result.calls[worker.name] = [], []
        for round_index in range(rounds):
            shift = round_index % len(workers)
            start = (round_index * turn_texts) % len(texts)
            for worker in workers[shift:] + workers[:shift]:
                time.sleep(GAP_S)
                timings = worker.time_texts(start, turn_texts)
                result.calls[worker.name].extend(timings)
                result.per_round_p50[worker.name].append(float(np.percentile(timings, 50)))
            if (round_index + 1) % max(1, rounds // 10) == 0 or round_index + 1 == rounds:
                progress(f"latency round {round_index + 1}/{rounds} done")
    finally:
        for worker in workers:
            worker.close()
        scratch.cleanup()
    return result


def _serve(model_dir: Path, model_format: str, max_length: int, warmup: int, threads: int, texts_file: Path,
           truncation: str = "head") -> None:
    # The protocol owns stdout; anything a library prints goes to stderr.
    protocol, sys.stdout = sys.stdout, sys.stderr
    from tasks import evaluate
    from tasks.results import ModelFormat

    texts = json.loads(texts_file.read_text())
    predict = evaluate.PREDICTORS[ModelFormat(model_format)](model_dir, threads)
    tokenizer = evaluate.load_tokenizer(model_dir)
    batches = [evaluate.tokenize(tokenizer, [text], max_length, truncation) for text in texts]
    for batch in batches[:warmup]:
        predict(batch)
    print(READY, file=protocol, flush=True)
    for command in sys.stdin:
        words = command.split()
        if not words or words[0] != "time":
            break
        start, count = int(words[1]), int(words[2])
        turn = [batches[(start + offset) % len(batches)] for offset in range(count)]
        for batch in turn[:WARM_CALLS]:
            predict(batch)
        timings = []
        for batch in turn:
            started = time.perf_counter()
            predict(batch)
            timings.append((time.perf_counter() - started) * 1000.0)
        print(json.dumps(timings), file=protocol, flush=True)


if __name__ == "__main__":
    _serve(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6]),
           *sys.argv[7:8])

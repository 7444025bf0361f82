"""``make bench-attention``: eager versus SDPA attention for the encoder classifier on this CPU.

PyTorch's ``scaled_dot_product_attention`` (SDPA) computes the same function as the eager
attention (matmul, mask, softmax, matmul) in one fused kernel; flash and memory-efficient kernels
are its GPU back ends. This measures, on the fine-tuned teacher of an optimize_model run folder
(the demo's MiniLM after ``make demo``), in interleaved rounds:

- inference at batch 1 (one test text per call: what the reference timings of the gates use);
- inference at batch 32, padded to the longest text;
- one training step (forward, backward, optimizer step) at batch 32, the fine-tuning shape;

and how far the two implementations' logits differ on the same texts.

    python -m bench.attention                      # the newest run of the local stack
    python -m bench.attention --run-dir <folder>
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from bench.compress import machine

log = logging.getLogger("bench.attention")
RESULTS_DIR = Path(__file__).resolve().parent.parent / "bench" / "results"
IMPLEMENTATIONS = ("eager", "sdpa")


def _timed(call) -> float:
    """Seconds one call of ``call`` takes."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def workloads(teacher: Path, texts: list[str], max_length: int) -> dict:
    """Per implementation: the model, and a callable per measured workload."""
    import torch

    from tasks.modeling import load_classifier, load_tokenizer
    from tasks.tokens import encode

    tokenizer = load_tokenizer(teacher)
    singles = [encode(tokenizer, [text], max_length, return_tensors="pt") for text in texts[:20]]
    batch = encode(tokenizer, texts[:32], max_length, return_tensors="pt")
    labels = torch.zeros(len(texts[:32]), dtype=torch.long)
    built = {}
    for name in IMPLEMENTATIONS:
        model = load_classifier(teacher, attention=name)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

        def infer_one(model=model):
            model.eval()
            with torch.inference_mode():
                for single in singles:
                    model(**single)

        def infer_batch(model=model):
            model.eval()
            with torch.inference_mode():
                model(**batch)

        def train_step(model=model, optimizer=optimizer):
            model.train()
            optimizer.zero_grad()
            model(**batch, labels=labels).loss.backward()
            optimizer.step()

        built[name] = {"model": model, "batch1_per_text": (infer_one, len(singles)), "batch32": (infer_batch, 1),
                       "train_step32": (train_step, 1)}
    return built | {"_batch": batch}


def run(run_dir: Path, results: Path, rounds: int) -> dict:
    import torch

    from tasks.splits import read_split

    teacher = run_dir / "teacher"
    max_length = int(json.loads((teacher / "finetune_config.json").read_text()).get("max_length", 128))
    texts = read_split(run_dir / "data", "test")["text"].head(64).tolist()
    built = workloads(teacher, texts, max_length)
    with torch.inference_mode():
        logits = {name: built[name]["model"].eval()(**built["_batch"]).logits.numpy() for name in IMPLEMENTATIONS}
    times: dict[str, dict[str, list[float]]] = {name: {} for name in IMPLEMENTATIONS}
    for _ in range(rounds):  # interleaved: every workload of both implementations once per round
        for workload in ("batch1_per_text", "batch32", "train_step32"):
            for name in IMPLEMENTATIONS:
                call, per = built[name][workload]
                times[name].setdefault(workload, []).append(_timed(call) / per)
    ratios = {workload: [e / s for e, s in zip(times["eager"][workload], times["sdpa"][workload])]
              for workload in times["eager"]}
    report = {"run": run_dir.name, "machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "max_length": max_length, "rounds": rounds,
              "ms": {name: {workload: float(np.median(values) * 1000) for workload, values in per.items()}
                     for name, per in times.items()},
              "eager_over_sdpa_per_round": ratios,
              "max_logit_difference": float(np.abs(logits["eager"] - logits["sdpa"]).max())}
    results.mkdir(parents=True, exist_ok=True)
    (results / "attention.json").write_text(json.dumps(report, indent=2))
    (results / "attention.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["# Eager versus SDPA attention, PyTorch on CPU", "",
             f"The fine-tuned teacher of run `{report['run']}`, max length {report['max_length']}, torch "
             f"{report['torch']} with {report['threads']} threads. Processor: {report['machine']['processor']}. "
             f"Medians of {report['rounds']} interleaved rounds; the ratio is eager time over SDPA time per round "
             "(> 1: SDPA is faster).", "",
             "| workload | eager ms | SDPA ms | eager / SDPA per round (median, range) |", "|---|---|---|---|"]
    for workload, ratios in report["eager_over_sdpa_per_round"].items():
        lines.append(f"| {workload} | {report['ms']['eager'][workload]:.2f} | {report['ms']['sdpa'][workload]:.2f} | "
                     f"{np.median(ratios):.2f} ({min(ratios):.2f} to {max(ratios):.2f}) |")
    lines += ["", f"Largest logit difference between the two on 32 padded test texts: "
                  f"{report['max_logit_difference']:.2e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    from bench.batch_invariance import newest_run
    from opsctl.settings import StackSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="an optimize_model run folder (default: the stack's newest)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run_dir = args.run_dir or newest_run(StackSettings.from_env(os.environ).runs_dir)
    print(markdown(run(run_dir, args.results, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

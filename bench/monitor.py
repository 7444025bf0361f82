"""``python -m bench.monitor``: how long one monitoring window takes over 10,000 logged predictions
(read from the SQLite prediction log, features and embeddings decoded, Evidently drift on every
feature with the HTML report, the embedding MMD included, SLOs, decision), written to
``bench/results/monitor.json``. Target: under 60 s here.

The predictions are synthetic draws shaped like served reviews (the time depends on the row count,
not on the text), each with a pooled input embedding (whitened, as the projection table makes them)
logged as the gateway logs it; the reference has the size of the demo's test split (500 rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 60.0


def synthetic_features(rows: int, seed: int) -> pd.DataFrame:
    from monitoring import embedding as emb

    rng = np.random.default_rng(seed)
    chars = rng.lognormal(6.6, 0.6, rows)
    tokens = np.minimum(128, np.round(chars / 4.5 + 2))
    features = pd.DataFrame({
        "confidence": 0.5 + 0.5 * rng.beta(4, 1.5, rows),
        "predicted": rng.choice(["negative", "positive"], rows),
        "text_chars": chars.round(),
        "token_count": tokens,
        "unknown_share": rng.binomial(tokens.astype(int), 0.01) / tokens,
    })
    # Rounded through float16, as logged (and as promotion writes the reference's).
    embeddings = rng.normal(size=(rows, emb.DIMS)).astype(np.float16).astype(np.float64)
    return features.join(pd.DataFrame(embeddings, columns=list(emb.COLUMNS)))


def run(rows: int = 10_000) -> dict:
    from monitoring import embedding as emb
    from monitoring.features import REFERENCE_FILE
    from serving import prediction_log as plog
    from monitoring.monitor import MonitorConfig, MonitorSettings, run_window

    with tempfile.TemporaryDirectory(prefix="bench-monitor-") as scratch:
        root = Path(scratch)
        version_dir = root / "models" / "bench_model" / "1"
        version_dir.mkdir(parents=True)
        synthetic_features(500, seed=1).to_parquet(version_dir / REFERENCE_FILE)
        url = f"sqlite:///{root / 'predictions.db'}"
        engine = plog.create_engine(url)
        end = time.time()
        served = synthetic_features(rows, seed=2)
        embeddings = served[list(emb.COLUMNS)].to_numpy()
        records = [plog.Prediction(end - 800 + 700 * r.Index / rows, "bench_model", "1", int(r.text_chars),
                                   int(r.token_count), int(round(r.unknown_share * r.token_count)), r.predicted,
                                   (1 - r.confidence, r.confidence) if r.predicted == "positive"
                                   else (r.confidence, 1 - r.confidence), 4.0,
                                   embedding=plog.encode_embedding(embeddings[r.Index])).row()
                   for r in served.itertuples()]
        with engine.begin() as connection:
            connection.execute(plog.PREDICTIONS.insert(), records)
        settings = MonitorSettings(url, root / "models", "bench_model", "unused", root / "state")
        started = time.perf_counter()
        summary = run_window(settings, MonitorConfig(), end, False, root / "window", log_to_mlflow=False)
        seconds = time.perf_counter() - started
    judged = summary["verdict"]["evidence"]["drift"].get("embedding", {})
    if "score" not in judged:
        raise RuntimeError(f"the window did not judge the embeddings ({judged.get('reason', 'not in the result')}): "
                           "the benchmark would not time the embedding MMD")
    return {"rows": rows, "seconds": seconds, "target_seconds": TARGET_SECONDS, "met": seconds < TARGET_SECONDS,
            "verdict": summary["verdict"]["status"], "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    result = run(args.rows)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "monitor.json").write_text(json.dumps(result, indent=2))
    print(f"monitoring window over {result['rows']} predictions: {result['seconds']:.1f} s "
          f"(target < {TARGET_SECONDS:.0f} s: {'met' if result['met'] else 'NOT met'}); verdict {result['verdict']}")
    return 0 if result["met"] else 2


if __name__ == "__main__":
    sys.exit(main())

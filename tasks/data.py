"""Prepare labelled texts: load from a file, folder or Hugging Face dataset, clean, split, hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from serving.text import normalise_text
from tasks.config import DataConfig
from tasks.errors import DataError
from tasks.results import StepResult, StepStatus, staged_dir, write_json_atomic
from tasks.splits import META_FILENAME, SPLITS, split_path

_READERS = {
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".jsonl": lambda path: pd.read_json(path, lines=True),
    ".json": pd.read_json,
}


def load_frame(source: str) -> pd.DataFrame:
    """Read labelled texts from ``source``.

    Accepts a CSV / Parquet / JSONL / JSON file, a folder of such files, or ``hf:<dataset>[:<split>]``
    for a Hugging Face dataset (default split ``train``; a local dataset folder works offline, e.g.
    ``hf:/data/my_dataset``).

    A folder is a versioned data location: its files are read in name order (name them so that
    newer sorts later, e.g. ``2026-11-01-base.csv``, ``2026-11-27-tweets-labelled.csv``) and
    concatenated; when a text appears in several files, ``normalise`` keeps the label from the
    latest file, so newly labelled examples correct older labels.
    """
    if source.startswith("hf:"):
        return _load_hf(source[3:])
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source} does not exist: give a CSV/Parquet/JSONL file, a folder, or hf:<name>")
    if path.is_dir():
        files = sorted(item for item in path.iterdir() if item.suffix.lower() in _READERS)
        if not files:
            raise DataError(f"folder {path} holds no {sorted(_READERS)} files")
        return pd.concat([_read_file(item) for item in files], ignore_index=True)
    return _read_file(path)


def _read_file(path: Path) -> pd.DataFrame:
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path.name}: unsupported file type {path.suffix!r}; use one of {sorted(_READERS)}")
    try:
        return reader(path)
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise DataError(f"could not read {path}: {error}") from error


def _load_hf(spec: str) -> pd.DataFrame:
    name, separator, split_name = spec.rpartition(":")
    if not separator:
        name, split_name = spec, "train"
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is in the lock file
        raise DataError("reading hf: sources needs the `datasets` package") from error
    try:
        dataset = datasets.load_dataset(name, split=split_name)
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split_name}): {error}") from error
    return dataset.to_pandas()


def normalise(frame: pd.DataFrame, config: DataConfig) -> tuple[pd.DataFrame, list[str]]:
    """Keep text and label columns, clean texts, drop empties and duplicates (the last occurrence of a
    text wins: later files of a data folder are newer), map labels to ids."""
    missing = [column for column in (config.text_column, config.label_column) if column not in frame.columns]
    if missing:
        raise DataError(
            f"columns {missing} not found; the data has {list(frame.columns)}. "
            "Set data.text_column / data.label_column."
        )
    frame = frame[[config.text_column, config.label_column]].rename(
        columns={config.text_column: "text", config.label_column: "label_name"}
    )
    frame = frame.dropna()
    frame = frame[frame["text"].map(lambda value: isinstance(value, str))]
    frame = frame.assign(text=frame["text"].map(normalise_text), label_name=frame["label_name"].astype(str))
    frame = frame[frame["text"].str.len() >= config.min_chars]
    frame = frame.drop_duplicates(subset="text", keep="last").reset_index(drop=True)
    found = sorted(frame["label_name"].unique())
    labels = list(config.labels) or found
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise DataError(f"labels {unknown} are not in data.labels {labels}")
    if len(found) < 2:
        raise DataError(f"need at least two classes, found {found} in {len(frame)} usable rows")
    frame["label"] = frame["label_name"].map({name: index for index, name in enumerate(labels)}).astype("int64")
    return frame[["text", "label"]], labels


def split(frame: pd.DataFrame, config: DataConfig) -> dict[str, pd.DataFrame]:
    """Deterministic stratified split: every class is cut into test, validation and train by the
    configured fractions (at least one text of each class in each split), and the caps (max_train /
    max_eval) keep each class's share, so a rare class is in every split of an imbalanced set."""
    counts = frame["label"].value_counts().sort_index()
    too_small = {int(label): int(count) for label, count in counts.items() if count < len(SPLITS)}
    if too_small:
        raise DataError(f"classes {too_small} (label id: usable texts) have fewer than {len(SPLITS)} texts: each "
                        "split needs one of each class. Add texts, or drop those classes from the data")
    rng = np.random.default_rng(config.seed)
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in SPLITS}
    for _, group in frame.groupby("label", sort=True):
        group = group.iloc[rng.permutation(len(group))]
        n_test = min(len(group) - 2, max(1, round(len(group) * config.test_fraction)))
        n_val = min(len(group) - n_test - 1, max(1, round(len(group) * config.validation_fraction)))
        parts["test"].append(group.iloc[:n_test])
        parts["validation"].append(group.iloc[n_test:n_test + n_val])
        parts["train"].append(group.iloc[n_test + n_val:])
    splits = {}
    for name in SPLITS:
        joined = pd.concat(parts[name]).sample(frac=1.0, random_state=config.seed).reset_index(drop=True)
        cap = config.max_train if name == "train" else config.max_eval
        if cap and len(joined) > cap:
            joined = _stratified_head(joined, cap, config.seed)
        splits[name] = joined
    return splits


def stratified_counts(counts: pd.Series, size: int) -> dict[int, int]:
    """How many texts of each class (label -> count available) a sample of ``size`` keeps: each class
    its share of ``size`` by largest remainder, at least one each, never more than it has, summing to
    ``size`` (or to every class once, when there are more classes than ``size``)."""
    shares = counts / counts.sum() * size
    kept = {label: int(min(count, max(1, int(shares[label])))) for label, count in counts.items()}
    by_remainder = sorted(counts.index, key=lambda label: (-(shares[label] - int(shares[label])), label))
    while sum(kept.values()) < size:
        growing = [label for label in by_remainder if kept[label] < counts[label]]
        if not growing:
            break
        for label in growing[:size - sum(kept.values())]:
            kept[label] += 1
    while sum(kept.values()) > size and max(kept.values()) > 1:
        largest = max(kept, key=lambda label: (kept[label], -label))
        kept[largest] -= 1
    return kept


def _stratified_head(frame: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    kept = stratified_counts(frame["label"].value_counts().sort_index(), size)
    picks = [frame[frame["label"] == label].head(count) for label, count in kept.items()]
    return pd.concat(picks).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def content_hash(splits: dict[str, pd.DataFrame], labels: list[str]) -> str:
    """sha256 over labels and every split's rows: equal data gives an equal hash."""
    digest = hashlib.sha256(json.dumps(labels).encode())
    for name in SPLITS:
        digest.update(name.encode())
        for text, label in zip(splits[name]["text"], splits[name]["label"]):
            digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()


def run(config: DataConfig, out_dir: Path) -> StepResult:
    """Load, clean and split the data into ``out_dir`` (train/validation/test Parquet + meta)."""
    frame, labels = normalise(load_frame(config.source), config)
    splits = split(frame, config)
    data_hash = content_hash(splits, labels)
    with staged_dir(out_dir) as staging:
        for name, part in splits.items():
            part.to_parquet(split_path(staging, name), index=False)
        meta = {"labels": labels, "data_hash": data_hash, "sizes": {name: len(part) for name, part in splits.items()}}
        write_json_atomic(staging / META_FILENAME, meta)
        write_json_atomic(staging / "config.json", asdict(config))
    return StepResult(
        step="prepare_data",
        status=StepStatus.SUCCESS,
        uris={"data": str(out_dir)},
        metrics={f"{name}_rows": float(len(part)) for name, part in splits.items()},
        info={"data_hash": data_hash, "labels": ",".join(labels)},
    )


def result_of(data_dir: Path) -> StepResult:
    """The result of a data folder prepared earlier (its meta says the labels, hash and sizes)."""
    meta_path = data_dir / META_FILENAME
    if not meta_path.exists():
        raise DataError(f"{data_dir} is not a prepared data folder: {META_FILENAME} is missing")
    meta = json.loads(meta_path.read_text())
    return StepResult(
        step="prepare_data",
        status=StepStatus.SUCCESS,
        uris={"data": str(data_dir)},
        metrics={f"{name}_rows": float(size) for name, size in meta["sizes"].items()},
        info={"data_hash": meta["data_hash"], "labels": ",".join(meta["labels"])},
    )

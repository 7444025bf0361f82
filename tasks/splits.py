"""Read the prepared data that ``tasks.data`` writes: one Parquet file per split and ``meta.json``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from tasks.errors import DataError

SPLITS = ("train", "validation", "test")
META_FILENAME = "meta.json"


def split_path(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / f"{name}.parquet"


def read_split(data_dir: Path, name: str) -> pd.DataFrame:
    path = split_path(data_dir, name)
    if not path.exists():
        raise DataError(f"{path} is missing: run prepare_data first")
    return pd.read_parquet(path)


def read_meta(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / META_FILENAME).read_text())

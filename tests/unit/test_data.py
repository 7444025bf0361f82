import json

import pandas as pd
import pytest

from serving.text import normalise_text
from tasks import data
from tasks.config import DataConfig
from tasks.errors import DataError


@pytest.fixture()
def frame() -> pd.DataFrame:
    rows = [(f"text number {i} <br />with a break", "pos" if i % 3 else "neg") for i in range(90)]
    return pd.DataFrame(rows, columns=["review", "sentiment"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl", ".json"])
def test_loads_each_file_type(tmp_path, frame, suffix):
    path = tmp_path / f"d{suffix}"
    {
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".json": lambda: frame.to_json(path, orient="records"),
    }[suffix]()
    loaded = data.load_frame(str(path))
    assert list(loaded["review"]) == list(frame["review"])


def test_loads_a_folder_of_files(tmp_path, frame):
    frame.iloc[:40].to_csv(tmp_path / "a.csv", index=False)
    frame.iloc[40:].to_parquet(tmp_path / "b.parquet")
    assert len(data.load_frame(str(tmp_path))) == len(frame)


def test_a_newer_file_in_a_data_folder_relabels_the_same_text(tmp_path, frame):
    folder = tmp_path / "versions"
    folder.mkdir()
    frame.to_csv(folder / "2026-11-01-base.csv", index=False)
    relabelled = frame.head(3).assign(sentiment="neg")
    new = pd.DataFrame({"review": ["a newly labelled tweet", "another one"], "sentiment": ["pos", "neg"]})
    pd.concat([relabelled, new]).to_csv(folder / "2026-11-27-labelled.csv", index=False)
    config = DataConfig(source=str(folder), text_column="review", label_column="sentiment")
    normalised, labels = data.normalise(data.load_frame(str(folder)), config)
    assert len(normalised) == len(frame) + 2
    by_text = dict(zip(normalised["text"], normalised["label"]))
    neg = labels.index("neg")
    assert all(by_text[normalise_text(text)] == neg for text in relabelled["review"])
    assert by_text["a newly labelled tweet"] == labels.index("pos")


def test_loads_a_hugging_face_dataset_by_name(tmp_path, frame):
    # datasets resolves a local folder name offline through the same load_dataset call a hub name uses.
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    frame.to_parquet(folder / "train.parquet")
    loaded = data.load_frame(f"hf:{folder}:train")
    assert len(loaded) == len(frame)


@pytest.mark.parametrize(
    "source, message",
    [("/no/such/file.csv", "does not exist"), ("hf:/no/such/dataset", "could not load Hugging Face dataset")],
)
def test_bad_sources_raise_data_error(source, message):
    with pytest.raises(DataError, match=message):
        data.load_frame(source)


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported file type"):
        data.load_frame(str(path))


def test_missing_columns_are_named(frame):
    with pytest.raises(DataError, match=r"columns \['text'\] not found"):
        data.normalise(frame, DataConfig(source="x", label_column="sentiment"))


def test_normalise_cleans_dedupes_and_maps_labels(frame):
    doubled = pd.concat([frame, frame.iloc[:5], pd.DataFrame({"review": [None, "  "], "sentiment": ["pos", "neg"]})])
    cleaned, labels = data.normalise(doubled, DataConfig(source="x", text_column="review", label_column="sentiment"))
    assert labels == ["neg", "pos"]
    assert len(cleaned) == len(frame)
    assert not cleaned["text"].str.contains("<br").any()
    assert set(cleaned["label"]) == {0, 1}


def test_unknown_label_is_an_error(frame):
    config = DataConfig(source="x", text_column="review", label_column="sentiment", labels=("pos",))
    with pytest.raises(DataError, match="not in data.labels"):
        data.normalise(frame, config)


def test_split_is_deterministic_disjoint_and_stratified(frame):
    config = DataConfig(source="x", text_column="review", label_column="sentiment")
    cleaned, _ = data.normalise(frame, config)
    first, second = data.split(cleaned, config), data.split(cleaned, config)
    for name in data.SPLITS:
        pd.testing.assert_frame_equal(first[name], second[name])
    texts = [set(first[name]["text"]) for name in data.SPLITS]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(len(part) for part in first.values()) == len(cleaned)
    assert set(first["test"]["label"]) == {0, 1}


def test_caps_limit_split_sizes(frame):
    config = DataConfig(source="x", text_column="review", label_column="sentiment", max_train=10, max_eval=6)
    cleaned, _ = data.normalise(frame, config)
    splits = data.split(cleaned, config)
    assert len(splits["train"]) == 10
    assert len(splits["test"]) <= 6 and len(splits["validation"]) <= 6


def test_run_writes_splits_meta_and_a_stable_hash(tmp_path, frame):
    source = tmp_path / "d.csv"
    frame.to_csv(source, index=False)
    config = DataConfig(source=str(source), text_column="review", label_column="sentiment")
    first = data.run(config, tmp_path / "out")
    second = data.run(config, tmp_path / "out")  # re-run overwrites
    assert first.info["data_hash"] == second.info["data_hash"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["labels"] == ["neg", "pos"]
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"train.parquet", "validation.parquet", "test.parquet"}
    frame.iloc[:-1].to_csv(source, index=False)
    assert data.run(config, tmp_path / "out2").info["data_hash"] != first.info["data_hash"]


def test_staged_dir_replaces_output_only_on_success(tmp_path):
    from tasks.results import staged_dir

    out = tmp_path / "step"
    with staged_dir(out) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with staged_dir(out) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("step failed")
    assert (out / "a.txt").read_text() == "first"
    assert (tmp_path / "step.partial" / "a.txt").read_text() == "half"
    with staged_dir(out) as staging:
        (staging / "a.txt").write_text("second")
    assert (out / "a.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]

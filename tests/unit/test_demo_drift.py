import pandas as pd
import pytest

from opsctl.demo_drift import BASE_FILE, LABELLED_FILE, DriftDemoSizes, prepare_data
from tasks import data as data_step


def _csv(path, prefix, rows):
    labels = ["negative", "positive"]
    pd.DataFrame({"text": [f"{prefix} {i}" for i in range(rows)],
                  "label": [labels[i % 2] for i in range(rows)]}).to_csv(path, index=False)
    return path


def test_the_demo_data_parts_are_disjoint_and_the_labelled_tweets_come_last(tmp_path):
    sizes = DriftDemoSizes(imdb_base=40, tweets_labelled=20, traffic=10, held_out=8)
    data = prepare_data(_csv(tmp_path / "imdb.csv", "review", 60), _csv(tmp_path / "tweets.csv", "tweet", 45),
                        tmp_path / "labelled", sizes)
    assert sorted(path.name for path in data.folder.iterdir()) == [BASE_FILE, LABELLED_FILE]
    trained = data_step.load_frame(str(data.folder))
    assert len(trained) == 60 and trained["text"].tail(20).str.startswith("tweet").all()
    assert len(data.normal_texts) == len(data.shifted_texts) == 10 and len(data.held_out) == 8
    assert all(text.startswith("review") for text in data.normal_texts)
    # Nothing sent as traffic or held out for the before/after score is trained on.
    unseen = set(data.shifted_texts) | set(data.held_out["text"]) | set(data.normal_texts)
    assert not unseen & set(trained["text"])
    assert not set(data.shifted_texts) & set(data.held_out["text"])


def test_too_few_tweets_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        prepare_data(_csv(tmp_path / "imdb.csv", "review", 60), _csv(tmp_path / "tweets.csv", "tweet", 5),
                     tmp_path / "labelled", DriftDemoSizes(imdb_base=40, tweets_labelled=20, traffic=10, held_out=8))

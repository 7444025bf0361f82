"""The prediction log on SQLite: batched writes through the journal, retries, retention."""

import asyncio
import time

import pytest
import sqlalchemy as sa

from serving import prediction_log as plog


def _prediction(index: int, served_at: float | None = None) -> plog.Prediction:
    return plog.Prediction(served_at=served_at or time.time(), model="m", model_version="3", text_chars=10 + index,
                           token_count=5, unknown_tokens=0, label="positive" if index % 2 else "negative",
                           probabilities=(0.3, 0.7) if index % 2 else (0.8, 0.2), latency_ms=1.5)


def test_predictions_are_written_in_batches_through_the_journal(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"

    async def scenario() -> plog.LogStats:
        log = plog.PredictionLog(url, batch_size=16, flush_interval_s=0.01)
        await log.start()
        for start in range(0, 1000, 50):
            await log.record(_prediction(i) for i in range(start, start + 50))
        await log.close()
        return log.stats

    stats = asyncio.run(scenario())
    engine = plog.create_engine(url)
    assert plog.count(engine) == 1000 == stats.written and stats.replayed_duplicates == 0
    assert (tmp_path / "log.db.journal" / "committed").read_text() == "1000"  # beside the database by default
    frame = plog.read_window(engine, 0, time.time() + 1)
    assert len(frame) == 1000 and frame["prediction_id"].nunique() == 1000  # each got an id
    assert frame["probabilities"].iloc[0] == [0.8, 0.2] and frame["confidence"].iloc[0] == pytest.approx(0.8)
    assert frame["text"].isna().all()  # texts are not stored unless asked


def test_failed_writes_are_retried_with_the_same_rows(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    real_insert = plog.PredictionLog._insert
    failures = {"left": 2}

    def flaky_insert(self, rows):
        if failures["left"]:
            failures["left"] -= 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        return real_insert(self, rows)

    monkeypatch.setattr(plog.PredictionLog, "_insert", flaky_insert)

    async def scenario() -> plog.LogStats:
        log = plog.PredictionLog(url, batch_size=100, flush_interval_s=0.01)
        await log.start()
        await log.record(_prediction(i) for i in range(30))
        await log.close()
        return log.stats

    stats = asyncio.run(scenario())
    assert stats.write_failures == 2 and stats.written == 30
    assert plog.count(plog.create_engine(url)) == 30


def test_retention_deletes_only_old_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = plog.create_engine(url)
    now = time.time()
    with engine.begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), [_prediction(1, now - 40 * 86400).row(),
                                                       _prediction(2, now - 1).row()])
    assert plog.delete_older_than(engine, now - 30 * 86400) == 1
    assert plog.count(engine) == 1 and plog.count(engine, since=now - 10) == 1


def test_invalid_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        plog.PredictionLog("sqlite://", tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="under 4096"):
        plog.PredictionLog("sqlite://", tmp_path, journal_max_bytes=100)


def test_a_table_of_an_earlier_release_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = sa.create_engine(url)
    with old.begin() as connection:
        connection.execute(sa.text(
            "CREATE TABLE predictions (id INTEGER PRIMARY KEY, served_at FLOAT NOT NULL, model VARCHAR(128) NOT NULL, "
            "model_version VARCHAR(32) NOT NULL, text_chars INTEGER NOT NULL, token_count INTEGER, "
            "unknown_tokens INTEGER, label VARCHAR(128) NOT NULL, confidence FLOAT NOT NULL, "
            "probabilities TEXT NOT NULL, latency_ms FLOAT NOT NULL, text TEXT)"))
        connection.execute(sa.text(
            "INSERT INTO predictions (served_at, model, model_version, text_chars, label, confidence, probabilities, "
            "latency_ms) VALUES (1.0, 'm', '1', 5, 'positive', 0.9, '[0.1, 0.9]', 3.0)"))
    old.dispose()
    engine = plog.create_engine(url)
    assert plog.add_missing_columns(engine) == []  # already added by create_engine
    with engine.begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), [_prediction(1, served_at=2.0).row()
                                                       | {"prediction_id": "abc", "embedding": b"\x00\x01"}])
    frame = plog.read_window(engine, 0.0, 10.0)
    assert frame["prediction_id"].tolist() == [None, "abc"]
    assert frame["embedding"].tolist()[0] is None and bytes(frame["embedding"].tolist()[1]) == b"\x00\x01"
    # feedback looks predictions up by id: the added column gets the unique index a new table has
    assert plog.PREDICTION_ID_INDEX in {index["name"] for index in sa.inspect(engine).get_indexes("predictions")}
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as connection:
        connection.execute(plog.PREDICTIONS.insert(), [_prediction(2, served_at=3.0).row() | {"prediction_id": "abc"}])

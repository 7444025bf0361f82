"""The prediction log's durable journal: a database outage never stalls serving, every prediction
reaches the database exactly once when it is back (after a restart too, and after a crash between
the database's commit and the journal's checkpoint), and the journal's bound is a clear refusal.

The database is a real SQLite file; it is "down" while its folder does not exist (SQLite cannot
open the file) and "back" once the folder is made."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from serving import prediction_log as plog
from serving.gateway import GatewaySettings, create_app
from serving.journal import Journal, JournalFull, JournalInUse, segment_name

from tests.unit.test_gateway_errors import StandInTriton


def _prediction(index: int) -> plog.Prediction:
    return plog.Prediction(served_at=time.time(), model="m", model_version="1", text_chars=index, token_count=3,
                           unknown_tokens=0, label="positive", probabilities=(0.25, 0.75), latency_ms=2.0,
                           prediction_id=f"{index:032d}", embedding=bytes([index % 256, 1]) if index % 2 else None)


def _database(tmp_path: Path) -> tuple[str, Path]:
    """A SQLite URL whose folder does not exist yet: the database is down until it is made."""
    folder = tmp_path / "database"
    return f"sqlite:///{folder / 'predictions.db'}", folder


@pytest.fixture(params=["sqlite", "postgresql"])
def down_database(request, tmp_path):
    """(URL, bring it back): a SQLite file in a folder not made yet, or a PostgreSQL database not
    created yet on the server at 127.0.0.1:5432 (skipped when there is none)."""
    if request.param == "sqlite":
        url, folder = _database(tmp_path)
        yield url, folder.mkdir
        return
    from tests.unit.test_feedback_log import POSTGRES, _postgres_skip_reason

    reason = _postgres_skip_reason()
    if reason:
        pytest.skip(reason)
    name = f"journal_test_{uuid.uuid4().hex[:12]}"
    server = f"postgresql+psycopg2://postgres@{POSTGRES[0]}:{POSTGRES[1]}"
    admin = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")

    def bring_back() -> None:
        with admin.connect() as connection:
            connection.execute(sa.text(f"CREATE DATABASE {name}"))

    yield f"{server}/{name}", bring_back
    with admin.connect() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _logged_ids(url: str) -> list[str]:
    with plog.create_engine(url).connect() as connection:
        return list(connection.execute(sa.select(plog.PREDICTIONS.c.prediction_id)).scalars())


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_an_outage_is_absorbed_and_each_prediction_written_once_when_the_database_is_back(tmp_path, down_database):
    url, bring_back = down_database

    async def scenario() -> plog.PredictionLog:
        log = plog.PredictionLog(url, tmp_path / "journal", batch_size=16, flush_interval_s=0.01)
        await log.start()
        started = time.monotonic()
        for start in range(0, 200, 20):  # the database is down: every record returns all the same
            await log.record(_prediction(i) for i in range(start, start + 20))
        assert time.monotonic() - started < 5 and log.queue_depth == 200
        await _until(lambda: log.stats.write_failures >= 2)
        bring_back()
        await _until(lambda: log.queue_depth == 0)
        await log.close()
        return log

    log = asyncio.run(scenario())
    ids = _logged_ids(url)
    assert sorted(ids) == [f"{i:032d}" for i in range(200)] and log.stats.written == 200
    frame = plog.read_window(plog.create_engine(url), 0, 1e12)
    assert bytes(frame.set_index("text_chars").loc[3, "embedding"]) == bytes([3, 1])  # the journal kept the bytes
    assert log.journal.committed_seq == log.journal.last_seq == 200


def test_a_restart_replays_the_journal_and_a_crash_before_the_checkpoint_writes_nothing_twice(tmp_path,
                                                                                            down_database):
    url, bring_back = down_database
    journal = tmp_path / "journal"

    async def serve_during_outage() -> int:
        log = plog.PredictionLog(url, journal, flush_interval_s=0.01, drain_timeout_s=0.1)
        await log.start()
        await log.record(_prediction(i) for i in range(50))
        await log.close()  # the database is still down: the predictions stay in the journal
        return log.queue_depth

    async def restart(crash_before_checkpoint: bool) -> plog.PredictionLog:
        log = plog.PredictionLog(url, journal, flush_interval_s=0.01, drain_timeout_s=0.1)
        if crash_before_checkpoint:
            log.journal.commit = lambda seq: None  # the process dies after each database commit
        await log.start()
        await _until(lambda: log.stats.written + log.stats.replayed_duplicates >= 50)
        await log.close()
        return log

    assert asyncio.run(serve_during_outage()) == 50
    bring_back()
    first = asyncio.run(restart(crash_before_checkpoint=True))
    assert first.stats.written == 50 and first.queue_depth == 50  # in the database, the checkpoint not moved
    second = asyncio.run(restart(crash_before_checkpoint=False))
    assert second.stats.written == 0 and second.stats.replayed_duplicates == 50 and second.queue_depth == 0
    assert sorted(_logged_ids(url)) == [f"{i:032d}" for i in range(50)]


def test_a_full_journal_refuses_whole_requests_and_counts_them(tmp_path):
    url, folder = _database(tmp_path)

    async def scenario() -> tuple[plog.PredictionLog, int]:
        log = plog.PredictionLog(url, tmp_path / "journal", journal_max_bytes=8192, flush_interval_s=0.01)
        await log.start()
        accepted = 0
        with pytest.raises(JournalFull, match=r"journal is full \(\d+ of 8192 bytes, \d+ predictions waiting"):
            for start in range(0, 1000, 5):
                await log.record(_prediction(i) for i in range(start, start + 5))
                accepted += 5
        assert log.stats.rejected == 5 and log.journal.size_bytes <= 8192
        folder.mkdir()
        await _until(lambda: log.queue_depth == 0)
        await log.record(_prediction(i) for i in range(5000, 5005))  # room again
        await log.close()
        return log, accepted

    log, accepted = asyncio.run(scenario())
    assert 0 < accepted < 1000 and len(_logged_ids(url)) == accepted + 5 == log.stats.written


def test_a_torn_last_line_is_cut_off_and_the_rest_replayed(tmp_path):
    journal = Journal(tmp_path, max_bytes=1 << 20)
    journal.open()
    assert journal.append([[{"n": 1}, {"n": 2}], [{"n": 3}]]) == [2, 3]
    journal.close()
    with open(tmp_path / segment_name(1), "ab") as handle:
        handle.write(b'{"seq":4,"rec')  # a crash in the middle of a write that was never acknowledged
    reopened = Journal(tmp_path, max_bytes=1 << 20)
    reopened.open()
    assert reopened.last_seq == 3 and [entry.record["n"] for entry in reopened.read(10)] == [1, 2, 3]
    assert reopened.append([[{"n": 4}]]) == [4] and [entry.seq for entry in reopened.read(10)] == [4]
    with pytest.raises(JournalInUse, match="give each gateway process its own GATEWAY_JOURNAL_DIR"):
        Journal(tmp_path, max_bytes=1 << 20).open()
    reopened.close()


def test_segments_rotate_and_are_deleted_once_committed(tmp_path):
    journal = Journal(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    journal.open()
    for n in range(30):
        journal.append([[{"n": n}]])
    segments = sorted(tmp_path.glob("segment-*"))
    assert len(segments) > 3 and journal.pending == 30
    assert [entry.record["n"] for entry in journal.read(100)] == list(range(30))
    journal.commit(30)
    assert len(list(tmp_path.glob("segment-*"))) == 1 and journal.pending == 0
    journal.close()
    again = Journal(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    again.open()
    assert (again.committed_seq, again.last_seq, again.read(10)) == (30, 30, [])
    again.close()


def test_the_gateway_serves_through_an_outage_and_answers_503_when_the_journal_is_full(tmp_path):
    url, folder = _database(tmp_path)
    settings = GatewaySettings(prediction_log_url=url, journal_dir=str(tmp_path / "journal"), journal_max_bytes=4096)
    with TestClient(create_app(settings, lambda _settings: StandInTriton())) as client:
        statuses = [client.post("/v1/classify", json={"texts": ["a text"] * 4}).status_code for _ in range(20)]
        served = statuses.count(200)
        assert served > 0 and statuses[served:] == [503] * (20 - served)  # served until the bound, then refused
        refused = client.post("/v1/classify", json={"texts": ["a text"] * 4})
        assert refused.status_code == 503 and "journal is full" in refused.json()["error"]
        assert "the prediction was not served" in refused.json()["error"]
        page = client.get("/metrics").text
        assert f'gateway_requests_total{{model="text_classifier",status="503"}} {21 - served}.0' in page
        assert "prediction_journal_rejected " in page and "prediction_journal_max_bytes 4096.0" in page
        folder.mkdir()
        deadline = time.monotonic() + 10
        while len(_logged_ids(url)) < served * 4:
            assert time.monotonic() < deadline, "the journal was not written to the database"
            time.sleep(0.05)
        assert client.post("/v1/classify", json={"texts": ["a text"] * 4}).status_code == 200
    assert len(set(_logged_ids(url))) == len(_logged_ids(url)) == served * 4 + 4


def test_the_journal_alerts_name_metrics_the_gateway_exports(tmp_path):
    import re

    import yaml
    from prometheus_client import generate_latest

    from serving.gateway import Metrics

    root = Path(__file__).resolve().parents[2]
    rules = yaml.safe_load((root / "infra" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    used = {name for rule in rules for name in re.findall(r"\bprediction_(?:journal|log)_[a-z_]+\b", rule["expr"])}
    page = generate_latest(Metrics(plog.PredictionLog("sqlite://", tmp_path)).registry).decode()
    exported = set(re.findall(r"^(prediction_[a-z_]+) ", page, flags=re.MULTILINE))
    assert {"prediction_journal_bytes", "prediction_journal_max_bytes", "prediction_journal_rejected"} <= used
    assert used <= exported

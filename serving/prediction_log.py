"""The prediction log: every served prediction, written off the request path.

The gateway hands each request's predictions to ``PredictionLog.record``, which puts them in a
durable local journal (``serving.journal``) and returns: serving never waits for the database. A
background task writes the journal to the database in batches (SQLAlchemy: SQLite by default,
Postgres in docker-compose), in order, retrying while the database is down, and checkpoints the
journal past what the database committed; a restart replays the rest, and a replayed prediction
the database already has is skipped (rows are keyed by ``prediction_id``). A full journal refuses
the request's predictions (``JournalFull``, answered 503): nothing is dropped silently. Rows older
than the retention period are deleted as it goes.

Label feedback: the true label of a logged prediction, sent later by its ``prediction_id``
(``record_feedback``; a later label for the same id replaces the earlier one), is kept in the
``feedback`` table and read back joined with its prediction (``read_labelled``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from serving.errors import ServingError
from serving.journal import Entry, Journal, JournalError
from serving.model_repository import EMBEDDING_DIMS

log = logging.getLogger(__name__)

METADATA = sa.MetaData()
PREDICTIONS = sa.Table(
    "predictions",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("served_at", sa.Float, nullable=False, index=True),  # unix seconds
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("text_chars", sa.Integer, nullable=False),
    sa.Column("token_count", sa.Integer, nullable=True),
    sa.Column("unknown_tokens", sa.Integer, nullable=True),
    sa.Column("label", sa.String(128), nullable=False),
    sa.Column("confidence", sa.Float, nullable=False),
    sa.Column("probabilities", sa.Text, nullable=False),  # JSON list, in label order
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("text", sa.Text, nullable=True),  # only when text logging is on (off by default)
    # Added after the first release (``create_engine`` adds them to an older table):
    sa.Column("prediction_id", sa.String(32), nullable=True, unique=True),  # the id /v1/classify returns
    sa.Column("embedding", sa.LargeBinary, nullable=True),  # float16 bytes (encode_embedding)
)
FEEDBACK = sa.Table(
    "feedback",
    METADATA,
    sa.Column("prediction_id", sa.String(32), primary_key=True),  # a predictions.prediction_id
    sa.Column("label", sa.String(128), nullable=False),  # the true label
    sa.Column("received_at", sa.Float, nullable=False, index=True),  # unix seconds; a replaced label's is the latest
)
PREDICTION_ID_INDEX = "ix_predictions_prediction_id"  # the unique index an upgraded table gets
# Columns an older table may lack, added by ``create_engine``: (name, SQL type per dialect).
ADDED_COLUMNS = {"prediction_id": "VARCHAR(32)", "embedding": {"postgresql": "BYTEA", "default": "BLOB"}}


@dataclass(frozen=True)
class Prediction:
    served_at: float
    model: str
    model_version: str
    text_chars: int
    token_count: int | None
    unknown_tokens: int | None
    label: str
    probabilities: tuple[float, ...]
    latency_ms: float
    text: str | None = None
    prediction_id: str | None = None
    embedding: bytes | None = None  # the pooled input embedding, float16 (encode_embedding)

    def row(self) -> dict:
        data = asdict(self)
        data["probabilities"] = json.dumps([round(p, 6) for p in self.probabilities])
        data["confidence"] = max(self.probabilities) if self.probabilities else 0.0
        return data


def encode_embedding(vector: Sequence[float]) -> bytes | None:
    """The log's form of one pooled input embedding: its values as float16 bytes (``EMBEDDING_DIMS``
    of them, 32 bytes); None for a vector with a NaN or an infinity (a version without an embedding
    table answers NaN rows)."""
    values = np.asarray(vector, dtype=np.float64)
    if not np.isfinite(values).all():
        return None
    return values.astype(np.float16).tobytes()


def decode_embedding(blob: bytes | None, dims: int = EMBEDDING_DIMS) -> np.ndarray:
    """One logged embedding as float64 (NaN when absent or of another size)."""
    if blob is None:
        return np.full(dims, np.nan)
    values = np.frombuffer(bytes(blob), dtype=np.float16)
    return values.astype(np.float64) if len(values) == dims else np.full(dims, np.nan)


class FeedbackNotStored(ServingError):
    """The prediction log's database failed the feedback write; nothing of it was stored (send it again)."""


class FeedbackOfAnotherModel(ServingError):
    """Feedback sent for one model names predictions another model made; nothing of it was stored.
    ``models``: each such prediction id's model."""

    def __init__(self, model: str, models: dict[str, str]) -> None:
        self.models = models
        ids = ", ".join(f"{pid} ({other})" for pid, other in list(models.items())[:10])
        super().__init__(f"{len(models)} prediction ids were not made by {model!r} but by another model: {ids}; "
                         "send their labels to /v1/models/<that model>/feedback (nothing was stored)")


@dataclass
class LogStats:
    written: int = 0  # rows inserted into the database
    replayed_duplicates: int = 0  # journal records the database already had (skipped: never written twice)
    write_failures: int = 0  # failed (and retried) database writes
    rejected: int = 0  # predictions the journal refused (full or unwritable): their requests got a 503
    unreadable_records: int = 0  # journal records that do not make a prediction (logged, skipped)
    deleted_by_retention: int = 0


def journal_record(prediction: Prediction) -> dict:
    """One prediction as a journal record (JSON: the embedding's bytes in base64)."""
    record = asdict(prediction)
    record["probabilities"] = list(prediction.probabilities)
    record["embedding"] = base64.b64encode(prediction.embedding).decode() if prediction.embedding else None
    return record


def prediction_from_record(record: dict) -> Prediction:
    """The prediction a journal record holds (``journal_record``'s inverse)."""
    embedding = record.get("embedding")
    return Prediction(**{**record, "probabilities": tuple(record["probabilities"]),
                         "embedding": base64.b64decode(embedding) if embedding else None})


def default_journal_dir(url: str) -> Path:
    """Where the journal lives unless told: beside a SQLite file (``<file>.journal``), else
    ``prediction-journal`` in the working directory."""
    database = sa.engine.make_url(url).database if url.startswith("sqlite") else None
    return Path(f"{database}.journal") if database and database != ":memory:" else Path("prediction-journal")


def create_engine(url: str) -> sa.Engine:
    """An engine with the table created; SQLite gets WAL mode so readers never block the writer."""
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _wal(connection, _record) -> None:  # noqa: ANN001 - DBAPI connection
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()
    METADATA.create_all(engine)
    if "prediction_id" in add_missing_columns(engine):
        # Feedback looks predictions up by id: the column a new table declares unique needs an index here too.
        with engine.begin() as connection:
            connection.execute(sa.text(f"CREATE UNIQUE INDEX IF NOT EXISTS {PREDICTION_ID_INDEX} "
                                       f"ON {PREDICTIONS.name} (prediction_id)"))
    return engine


def add_missing_columns(engine: sa.Engine) -> list[str]:
    """Add the columns of ``ADDED_COLUMNS`` that a table created by an earlier release lacks (all
    nullable, so old rows stay valid); returns the names added."""
    present = {column["name"] for column in sa.inspect(engine).get_columns(PREDICTIONS.name)}
    added = []
    with engine.begin() as connection:
        for name, sql_type in ADDED_COLUMNS.items():
            if name in present:
                continue
            if isinstance(sql_type, dict):
                sql_type = sql_type.get(engine.dialect.name, sql_type["default"])
            connection.execute(sa.text(f"ALTER TABLE {PREDICTIONS.name} ADD COLUMN {name} {sql_type}"))
            added.append(name)
    if added:
        log.info("prediction log: added columns %s to the existing table", ", ".join(added))
    return added


class PredictionLog:
    """Never-dropping, never-stalling writer of predictions: a durable local journal first, the
    database from it.

    ``record`` returns once the predictions are in the journal (appended and ``fsync``-ed, one
    ``fsync`` for every request waiting at that moment): it never waits for the database. A
    background task writes the journal's records to the database in order, in batches, retrying a
    failed write with the same rows for as long as the database is down, and moves the journal's
    checkpoint past each batch committed. Rows are keyed by ``prediction_id``: a record the
    database already has (a crash between its commit and the checkpoint) is skipped, so a replay
    never writes a prediction twice. On start, what the journal holds beyond its checkpoint is
    written (a restart replays it). A full journal refuses the request's predictions
    (``JournalFull``), counted; nothing is dropped silently.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``).
        journal_dir: the journal's folder, one per process (default: ``default_journal_dir(url)``).
        journal_max_bytes: the journal's bound on disk.
        batch_size: most rows per insert.
        flush_interval_s: how long a prediction may wait for others to share its insert.
        retention_days: rows older than this are deleted (0 = keep everything).
        drain_timeout_s: how long ``close`` keeps writing what the journal holds (the rest waits
            in the journal for the next start).
    """

    def __init__(self, url: str, journal_dir: Path | None = None, journal_max_bytes: int = 512 << 20,
                 batch_size: int = 256, flush_interval_s: float = 0.2, retention_days: float = 30.0,
                 drain_timeout_s: float = 5.0) -> None:
        if batch_size < 1 or flush_interval_s <= 0 or retention_days < 0 or drain_timeout_s < 0:
            raise ValueError("batch_size >= 1, flush_interval_s > 0, retention_days >= 0, drain_timeout_s >= 0")
        self.url = url
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self.drain_timeout_s = drain_timeout_s
        self.journal = Journal(journal_dir or default_journal_dir(url), journal_max_bytes)
        self.stats = LogStats()
        self._engine: sa.Engine | None = None
        self._waiting: list[tuple[list[dict], asyncio.Future]] = []  # groups for the next journal append
        self._appended: asyncio.Event | None = None  # groups are waiting
        self._journaled: asyncio.Event | None = None  # the journal has records the writer may not have read
        self._tasks: list[asyncio.Task] = []
        self._last_retention = 0.0

    @property
    def queue_depth(self) -> int:
        """Predictions in the journal, not yet in the database."""
        return self.journal.pending

    async def start(self) -> None:
        """Open the journal (replaying what it holds) and start writing; a database that is down
        now is connected to when it is back."""
        await asyncio.to_thread(self.journal.open)
        if self.journal.pending:
            log.info("prediction log: %d predictions in the journal %s are written first", self.journal.pending,
                     self.journal.directory)
        self._appended, self._journaled = asyncio.Event(), asyncio.Event()
        self._journaled.set()
        try:
            await asyncio.to_thread(self._connect)
        except sa.exc.SQLAlchemyError as error:
            log.warning("prediction log database unreachable (%s); serving goes on, predictions wait in the journal",
                        _first_line(error))
        self._tasks = [asyncio.create_task(self._journal_forever(), name="prediction-journal"),
                       asyncio.create_task(self._write_forever(), name="prediction-log-writer")]
        for task in self._tasks:
            task.add_done_callback(_report_crash)

    async def record(self, predictions: Iterable[Prediction]) -> None:
        """Put predictions in the journal; returns once they are durable there. JournalError when
        the journal cannot take them (full, or its disk failed): none of them is logged."""
        assert self._appended is not None, "PredictionLog.start() was not awaited"
        records = [journal_record(p if p.prediction_id else replace(p, prediction_id=uuid.uuid4().hex))
                   for p in predictions]
        if not records:
            return
        done = asyncio.get_running_loop().create_future()
        self._waiting.append((records, done))
        self._appended.set()
        await done

    async def record_feedback(self, items: list[tuple[str, str]], model: str | None = None) -> tuple[int, list[str]]:
        """``record_feedback`` on the log's database in a worker thread; FeedbackNotStored when the
        database fails the write (the transaction is rolled back: nothing was stored)."""
        assert self._appended is not None, "PredictionLog.start() was not awaited"
        try:
            return await asyncio.to_thread(lambda: record_feedback(self._connect(), items, model=model))
        except sa.exc.SQLAlchemyError as error:
            raise FeedbackNotStored(f"the prediction log could not store the feedback "
                                    f"({type(error).__name__}: {_first_line(error)}); "
                                    "nothing was stored, send it again") from error

    async def close(self) -> None:
        """Write what the journal holds for up to ``drain_timeout_s``, then stop (the rest stays in
        the journal for the next start)."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self._tasks and (self._waiting or self.journal.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.journal.pending:
            log.warning("prediction log: %d predictions stay in the journal %s until the next start",
                        self.journal.pending, self.journal.directory)
        await asyncio.to_thread(self.journal.close)
        if self._engine is not None:
            self._engine.dispose()

    def _connect(self) -> sa.Engine:
        if self._engine is None:
            self._engine = create_engine(self.url)
        return self._engine

    async def _journal_forever(self) -> None:
        """Append the waiting groups, one ``fsync`` for all, and answer each group's ``record``."""
        assert self._appended is not None and self._journaled is not None
        while True:
            await self._appended.wait()
            self._appended.clear()
            groups, self._waiting = self._waiting, []
            try:
                outcomes = await asyncio.to_thread(self.journal.append, [records for records, _ in groups])
            except (OSError, TypeError, ValueError) as error:  # its disk failed, or a record is no JSON
                outcomes = [JournalError(f"the prediction journal {self.journal.directory} cannot be written "
                                         f"({error}); nothing of this request was logged")] * len(groups)
            for (records, done), outcome in zip(groups, outcomes, strict=True):
                if isinstance(outcome, JournalError):
                    self.stats.rejected += len(records)
                if not done.done():
                    done.set_exception(outcome) if isinstance(outcome, JournalError) else done.set_result(None)
            self._journaled.set()

    async def _write_forever(self) -> None:
        """Write the journal's records to the database in order, batch by batch, and checkpoint."""
        assert self._journaled is not None
        while True:
            self._journaled.clear()
            try:
                entries = await asyncio.to_thread(self.journal.read, self.batch_size)
                if entries:
                    await self._write_with_retry(entries)
                    await asyncio.to_thread(self.journal.commit, entries[-1].seq)
            except OSError as error:  # the journal's disk: the records stay there, tried again
                log.error("prediction journal %s: %s; trying again in 1 s", self.journal.directory, error)
                await asyncio.sleep(1.0)
                continue
            if not entries:
                await self._journaled.wait()
                await asyncio.sleep(self.flush_interval_s)  # let a batch gather
                continue
            await self._apply_retention()

    async def _write_with_retry(self, entries: list[Entry]) -> None:
        rows = []
        for entry in entries:
            try:
                rows.append(prediction_from_record(entry.record).row())
            except (TypeError, KeyError, ValueError) as error:
                self.stats.unreadable_records += 1
                log.error("prediction journal record %d is unreadable (%s): skipped", entry.seq, error)
        delay = 0.1
        while True:
            try:
                inserted = await asyncio.to_thread(self._insert, rows)
                self.stats.written += inserted
                self.stats.replayed_duplicates += len(rows) - inserted
                return
            except sa.exc.SQLAlchemyError as error:
                self.stats.write_failures += 1
                log.warning("prediction log write of %d rows failed (%s); retrying in %.1fs", len(rows),
                            _first_line(error), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _insert(self, rows: list[dict]) -> int:
        """Insert the rows the database does not have yet (by ``prediction_id``); how many were new."""
        with self._connect().begin() as connection:
            return insert_new_rows(connection, rows)

    async def _apply_retention(self) -> None:
        if not self.retention_days or time.monotonic() - self._last_retention < 60:
            return
        self._last_retention = time.monotonic()
        cutoff = time.time() - self.retention_days * 86400
        try:
            self.stats.deleted_by_retention += await asyncio.to_thread(delete_older_than, self._connect(), cutoff)
        except sa.exc.SQLAlchemyError as error:  # done at the next chance
            log.warning("prediction log retention failed (%s)", _first_line(error))


def _report_crash(task: asyncio.Task) -> None:
    """A background task that ended other than by ``close``: a bug; say so loudly (the journal
    keeps what was not written, and its metrics and alert show it growing)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("prediction log task %s stopped: %r; predictions stay in the journal until a restart",
                  task.get_name(), task.exception(), exc_info=task.exception())


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def insert_new_rows(connection: sa.Connection, rows: list[dict]) -> int:
    """Insert the prediction rows whose ``prediction_id`` is not in the table (a replayed journal
    record may already be there); returns how many were inserted."""
    present: set[str] = set()
    for chunk in _chunks([row["prediction_id"] for row in rows if row.get("prediction_id")]):
        query = sa.select(PREDICTIONS.c.prediction_id).where(PREDICTIONS.c.prediction_id.in_(chunk))
        present.update(connection.execute(query).scalars())
    new = [row for row in rows if row.get("prediction_id") not in present]
    new = list({row["prediction_id"]: row for row in new}.values())  # once each, even within the batch
    if new:
        connection.execute(PREDICTIONS.insert(), new)
    return len(new)


def delete_older_than(engine: sa.Engine, cutoff: float) -> int:
    """Delete the predictions served before ``cutoff`` and the feedback of every prediction no longer
    in the log; returns how many predictions were deleted."""
    with engine.begin() as connection:
        deleted = connection.execute(PREDICTIONS.delete().where(PREDICTIONS.c.served_at < cutoff)).rowcount
        logged = sa.select(PREDICTIONS.c.id).where(PREDICTIONS.c.prediction_id == FEEDBACK.c.prediction_id)
        connection.execute(FEEDBACK.delete().where(~logged.exists()))
        return deleted


def count(engine: sa.Engine, since: float | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(PREDICTIONS)
    if since is not None:
        query = query.where(PREDICTIONS.c.served_at >= since)
    with engine.connect() as connection:
        return int(connection.execute(query).scalar_one())


def read_window(engine: sa.Engine, start: float, end: float):
    """Predictions served in [start, end) as a pandas DataFrame (probabilities decoded to lists)."""
    import pandas as pd

    query = sa.select(PREDICTIONS).where(PREDICTIONS.c.served_at >= start, PREDICTIONS.c.served_at < end)
    with engine.connect() as connection:
        frame = pd.read_sql(query, connection)
    frame["probabilities"] = frame["probabilities"].map(json.loads)
    return frame


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    """``values`` in slices of at most ``size`` (the bound parameters of one ``IN`` list)."""
    return [values[start:start + size] for start in range(0, len(values), size)]


def _upsert_feedback(connection: sa.Connection, rows: list[dict]) -> None:
    """Insert feedback rows, replacing the label of an id that already has one."""
    dialect = connection.dialect.name
    if dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        insert = (postgresql if dialect == "postgresql" else sqlite).insert(FEEDBACK)
        connection.execute(insert.on_conflict_do_update(
            index_elements=[FEEDBACK.c.prediction_id],
            set_={"label": insert.excluded.label, "received_at": insert.excluded.received_at}), rows)
        return
    for chunk in _chunks([row["prediction_id"] for row in rows]):  # other databases: delete, then insert
        connection.execute(FEEDBACK.delete().where(FEEDBACK.c.prediction_id.in_(chunk)))
    connection.execute(FEEDBACK.insert(), rows)


def record_feedback(engine: sa.Engine, items: Iterable[tuple[str, str]],
                    received_at: float | None = None, model: str | None = None) -> tuple[int, list[str]]:
    """Store true labels of logged predictions, in one transaction.

    Args:
        items: (prediction_id, label) pairs; of an id given twice, the last label counts.
        received_at: unix seconds recorded with each label (default: now).
        model: the served model the labels are for; FeedbackOfAnotherModel (nothing stored) when an id
            was logged by another model. None: any model's predictions.

    Returns:
        How many labels were stored, and the ids that are not in the prediction log (not stored:
        never served, deleted by retention, or still queued for writing).
    """
    labels = dict(items)
    if not labels:
        return 0, []
    at = time.time() if received_at is None else received_at
    with engine.begin() as connection:
        known: dict[str, str] = {}  # prediction id -> the model that made it
        for chunk in _chunks(list(labels)):
            query = (sa.select(PREDICTIONS.c.prediction_id, PREDICTIONS.c.model)
                     .where(PREDICTIONS.c.prediction_id.in_(chunk)))
            known.update({pid: made_by for pid, made_by in connection.execute(query)})
        others = {pid: made_by for pid, made_by in known.items() if model is not None and made_by != model}
        if others:
            raise FeedbackOfAnotherModel(model, others)
        rows = [{"prediction_id": pid, "label": label, "received_at": at}
                for pid, label in labels.items() if pid in known]
        if rows:
            _upsert_feedback(connection, rows)
    return len(rows), [pid for pid in labels if pid not in known]


def read_labelled(engine: sa.Engine, start: float, end: float):
    """The predictions whose true label arrived in [start, end), with it as ``true_label`` (a pandas
    DataFrame with ``read_window``'s columns plus ``true_label`` and ``received_at``).

    The window is the feedback's arrival, not the prediction's serving: labels come hours or days
    after the prediction, so each label counts once, in the window it arrived in."""
    import pandas as pd

    query = (sa.select(PREDICTIONS, FEEDBACK.c.label.label("true_label"), FEEDBACK.c.received_at)
             .join(FEEDBACK, FEEDBACK.c.prediction_id == PREDICTIONS.c.prediction_id)
             .where(FEEDBACK.c.received_at >= start, FEEDBACK.c.received_at < end))
    with engine.connect() as connection:
        frame = pd.read_sql(query, connection)
    frame["probabilities"] = frame["probabilities"].map(json.loads)
    return frame

"""The prediction log: every served prediction, written off the request path.

The gateway hands each prediction to ``PredictionLog.record``; a background task writes them in
batches (SQLAlchemy: SQLite by default, Postgres in docker-compose). The queue is bounded: when it
is full, ``record`` waits for room (back-pressure, counted) instead of dropping anything. A failed
write is retried with the same rows. Rows older than the retention period are deleted as it goes.

Label feedback: the true label of a logged prediction, sent later by its ``prediction_id``
(``record_feedback``; a later label for the same id replaces the earlier one), is kept in the
``feedback`` table and read back joined with its prediction (``read_labelled``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import sqlalchemy as sa

from serving.errors import ServingError
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


@dataclass
class LogStats:
    written: int = 0
    backpressure_waits: int = 0
    write_failures: int = 0
    deleted_by_retention: int = 0


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
    """Batched, bounded, never-dropping writer of predictions.

    Args:
        url: SQLAlchemy URL (``sqlite:///path.db``, ``postgresql+psycopg://...``).
        queue_size: predictions waiting to be written before ``record`` starts to wait.
        batch_size: most rows per insert.
        flush_interval_s: longest time a prediction waits before its batch is written.
        retention_days: rows older than this are deleted (0 = keep everything).
    """

    def __init__(self, url: str, queue_size: int = 10_000, batch_size: int = 256, flush_interval_s: float = 0.2,
                 retention_days: float = 30.0) -> None:
        if queue_size < 1 or batch_size < 1 or flush_interval_s <= 0 or retention_days < 0:
            raise ValueError("queue_size >= 1, batch_size >= 1, flush_interval_s > 0, retention_days >= 0")
        self.url = url
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self.stats = LogStats()
        self._queue_size = queue_size
        self._queue: asyncio.Queue[Prediction] | None = None
        self._engine: sa.Engine | None = None
        self._writer: asyncio.Task | None = None
        self._last_retention = 0.0

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._engine = await asyncio.to_thread(create_engine, self.url)
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        self._writer = asyncio.create_task(self._write_forever(), name="prediction-log-writer")

    async def record(self, predictions: Iterable[Prediction]) -> None:
        """Queue predictions for writing; waits (and counts it) while the queue is full."""
        assert self._queue is not None, "PredictionLog.start() was not awaited"
        for prediction in predictions:
            if self._queue.full():
                self.stats.backpressure_waits += 1
            await self._queue.put(prediction)

    async def record_feedback(self, items: list[tuple[str, str]]) -> tuple[int, list[str]]:
        """``record_feedback`` on the log's database in a worker thread; FeedbackNotStored when the
        database fails the write (the transaction is rolled back: nothing was stored)."""
        assert self._engine is not None, "PredictionLog.start() was not awaited"
        try:
            return await asyncio.to_thread(record_feedback, self._engine, items)
        except sa.exc.SQLAlchemyError as error:
            raise FeedbackNotStored(f"the prediction log could not store the feedback "
                                    f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                                    "nothing was stored, send it again") from error

    async def close(self) -> None:
        """Write everything still queued, then stop."""
        if self._queue is not None:
            await self._queue.join()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if self._engine is not None:
            self._engine.dispose()

    async def _write_forever(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.flush_interval_s
            while len(batch) < self.batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._write_with_retry(batch)
            for _ in batch:
                self._queue.task_done()
            await self._apply_retention()

    async def _write_with_retry(self, batch: list[Prediction]) -> None:
        rows = [prediction.row() for prediction in batch]
        delay = 0.1
        while True:
            try:
                await asyncio.to_thread(self._insert, rows)
                self.stats.written += len(rows)
                return
            except sa.exc.SQLAlchemyError as error:
                self.stats.write_failures += 1
                log.warning("prediction log write of %d rows failed (%s); retrying in %.1fs", len(rows), error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _insert(self, rows: list[dict]) -> None:
        assert self._engine is not None
        with self._engine.begin() as connection:
            connection.execute(PREDICTIONS.insert(), rows)

    async def _apply_retention(self) -> None:
        if not self.retention_days or time.monotonic() - self._last_retention < 60:
            return
        self._last_retention = time.monotonic()
        cutoff = time.time() - self.retention_days * 86400
        self.stats.deleted_by_retention += await asyncio.to_thread(delete_older_than, self._engine, cutoff)


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
                    received_at: float | None = None) -> tuple[int, list[str]]:
    """Store true labels of logged predictions, in one transaction.

    Args:
        items: (prediction_id, label) pairs; of an id given twice, the last label counts.
        received_at: unix seconds recorded with each label (default: now).

    Returns:
        How many labels were stored, and the ids that are not in the prediction log (not stored:
        never served, deleted by retention, or still queued for writing).
    """
    labels = dict(items)
    if not labels:
        return 0, []
    at = time.time() if received_at is None else received_at
    with engine.begin() as connection:
        known: set[str] = set()
        for chunk in _chunks(list(labels)):
            query = sa.select(PREDICTIONS.c.prediction_id).where(PREDICTIONS.c.prediction_id.in_(chunk))
            known.update(connection.execute(query).scalars())
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

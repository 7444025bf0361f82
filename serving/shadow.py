"""Shadow traffic: a challenger answers a copy of live requests beside the champion before any switch.

A promotion that asks for a shadow (``tasks/shadow.py``) loads the challenger's components beside the
serving ones and an ensemble named ``<model>_shadow`` over them. Each gateway notices that model
(it asks Triton whether it is ready every ``POLL_S``) and, while it is there, sends the texts of each
answered classify request to it as well, after the client has its answer: the copy never delays or
fails a client's request. At most ``max_in_flight`` copies run at once per gateway; a request that
finds them all busy is not copied (counted in ``ShadowMirror.skipped``), so a shadow adds a bounded
load.

Each copy writes one row to ``shadow_comparisons`` in the prediction log's database (shared by
every gateway replica): how many texts, on how many both models gave the same label, and each
model's call latency. The promotion reads the rows written since its shadow was loaded
(``read_comparisons``) and judges them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

log = logging.getLogger(__name__)

SHADOW_SUFFIX = "_shadow"
POLL_S = 2.0
# Copies sent once a shadow appears before any is recorded: the challenger's first calls are cold
# (its instances load lazily and allocate), and would be compared with a warm champion.
WARMUP_COPIES = 3

METADATA = sa.MetaData()
COMPARISONS = sa.Table(
    "shadow_comparisons",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("compared_at", sa.Float, nullable=False, index=True),  # unix seconds
    sa.Column("shadow_model", sa.String(160), nullable=False, index=True),
    sa.Column("champion_version", sa.String(32), nullable=False),
    sa.Column("shadow_version", sa.String(32), nullable=False),
    sa.Column("texts", sa.Integer, nullable=False),
    sa.Column("agreed", sa.Integer, nullable=False),
    sa.Column("champion_ms", sa.Float, nullable=False),
    sa.Column("shadow_ms", sa.Float, nullable=True),  # None: the shadow failed this request
    sa.Column("error", sa.String(500), nullable=True),
)


def shadow_model(model: str) -> str:
    """The Triton name of ``model``'s challenger while it shadows."""
    return f"{model}{SHADOW_SUFFIX}"


@dataclass(frozen=True)
class Comparison:
    """One copied request: the champion's answer against the shadow's."""

    champion_version: str
    shadow_version: str
    texts: int
    agreed: int
    champion_ms: float
    shadow_ms: float | None
    error: str | None = None


def agreement(champion_labels: Sequence[str], shadow_labels: Sequence[str]) -> int:
    """On how many texts the two models gave the same label."""
    return sum(1 for ours, theirs in zip(champion_labels, shadow_labels, strict=True) if ours == theirs)


def create_table(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        METADATA.create_all(engine)
    finally:
        engine.dispose()


def write_comparison(engine: sa.Engine, model: str, comparison: Comparison, at: float | None = None) -> None:
    """One row for a request of served ``model`` copied to its shadow."""
    with engine.begin() as connection:
        connection.execute(COMPARISONS.insert().values(
            compared_at=time.time() if at is None else at, shadow_model=shadow_model(model),
            champion_version=comparison.champion_version, shadow_version=comparison.shadow_version,
            texts=comparison.texts, agreed=comparison.agreed, champion_ms=comparison.champion_ms,
            shadow_ms=comparison.shadow_ms, error=(comparison.error or None) and comparison.error[:500]))


def read_comparisons(url: str, model: str, since: float, shadow_version: str | None = None) -> list[Comparison]:
    """The comparisons gateways wrote for the shadow of ``model`` since ``since`` (unix seconds),
    of ``shadow_version`` only when given; [] when the table does not exist yet."""
    engine = sa.create_engine(url)
    try:
        if not sa.inspect(engine).has_table(COMPARISONS.name):
            return []
        query = sa.select(COMPARISONS).where(COMPARISONS.c.shadow_model == shadow_model(model),
                                             COMPARISONS.c.compared_at >= since).order_by(COMPARISONS.c.id)
        if shadow_version is not None:
            query = query.where(COMPARISONS.c.shadow_version == str(shadow_version))
        with engine.connect() as connection:
            rows = connection.execute(query).mappings().all()
    finally:
        engine.dispose()
    return [Comparison(row["champion_version"], row["shadow_version"], row["texts"], row["agreed"],
                       row["champion_ms"], row["shadow_ms"], row["error"]) for row in rows]


@dataclass(frozen=True)
class ShadowSummary:
    """What a set of comparisons says: requests, texts, agreement, and each model's call latency."""

    requests: int
    texts: int
    agreement: float
    failed: int
    champion_p95_ms: float
    shadow_p95_ms: float
    champion_p50_ms: float
    shadow_p50_ms: float

    @classmethod
    def of(cls, comparisons: Sequence[Comparison]) -> ShadowSummary:
        answered = [c for c in comparisons if c.shadow_ms is not None]
        texts = sum(c.texts for c in answered)
        champion = np.array([c.champion_ms for c in answered]) if answered else np.array([np.nan])
        shadow = np.array([c.shadow_ms for c in answered]) if answered else np.array([np.nan])
        return cls(requests=len(comparisons), texts=texts,
                   agreement=sum(c.agreed for c in answered) / texts if texts else float("nan"),
                   failed=len(comparisons) - len(answered),
                   champion_p95_ms=float(np.percentile(champion, 95)), shadow_p95_ms=float(np.percentile(shadow, 95)),
                   champion_p50_ms=float(np.percentile(champion, 50)), shadow_p50_ms=float(np.percentile(shadow, 50)))


def text_input(grpc, texts: Sequence[str]):
    """The ensemble's TEXT input for ``texts`` (``grpc``: the ``tritonclient.grpc.aio`` module): one UTF-8
    string per row. The gateway's requests and the shadow's copies are built the same way."""
    text = grpc.InferInput("TEXT", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1))
    return text


class ShadowMirror:
    """One gateway's copies of its answered requests to the shadow model, while Triton has one."""

    def __init__(self, triton_grpc_url: str, model: str, database_url: str, timeout_s: float = 10.0,
                 max_in_flight: int = 1, poll_s: float = POLL_S) -> None:
        self.model, self.shadow = model, shadow_model(model)
        self.url, self.database_url, self.timeout_s = triton_grpc_url, database_url, timeout_s
        self.max_in_flight, self.poll_s = max_in_flight, poll_s
        self.active = False
        self.copied = self.skipped = self.failed = 0
        self.warmup_left = WARMUP_COPIES
        self._tasks: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        self._client = None
        self._engine: sa.Engine | None = None
        self._table_ready = False

    async def start(self) -> None:
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(self.url)
        # The database may be down now (the prediction journal absorbs that): its table is created
        # with the first comparison written.
        self._engine = sa.create_engine(self.database_url)
        self._poller = asyncio.create_task(self._poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *(t for t in (self._poller,) if t), return_exceptions=True)
        if self._client is not None:
            await self._client.close()
        if self._engine is not None:
            self._engine.dispose()

    async def _poll(self) -> None:
        """Keep ``active`` true while Triton has the shadow model loaded and ready."""
        while True:
            try:
                ready = await self._client.is_model_ready(self.shadow, client_timeout=self.timeout_s)
            except Exception:  # noqa: BLE001 - Triton away or no such model: no shadow
                ready = False
            if ready != self.active:
                log.info("shadow %s %s", self.shadow, "loaded: copying answered requests" if ready else "gone")
                self.warmup_left = WARMUP_COPIES
            self.active = bool(ready)
            await asyncio.sleep(self.poll_s)

    def offer(self, texts: list[str], champion_labels: list[str], champion_version: str, champion_ms: float) -> None:
        """Copy one answered request to the shadow, in the background, when one is loaded and a slot is free."""
        if not self.active:
            return
        if len(self._tasks) >= self.max_in_flight:
            self.skipped += 1
            return
        task = asyncio.create_task(self._compare(texts, champion_labels, champion_version, champion_ms))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _compare(self, texts: list[str], champion_labels: list[str], champion_version: str,
                       champion_ms: float) -> None:
        started = time.perf_counter()
        try:
            labels, version = await self._labels(texts)
            if self.warmup_left > 0:  # a warm-up copy: its answer counted nowhere (a failure still is)
                self.warmup_left -= 1
                return
            comparison = Comparison(champion_version, version, len(texts), agreement(champion_labels, labels),
                                    champion_ms, (time.perf_counter() - started) * 1000.0)
            self.copied += 1
        except Exception as error:  # noqa: BLE001 - a failed shadow call is a finding, never the client's problem
            self.failed += 1
            comparison = Comparison(champion_version, "?", len(texts), 0, champion_ms, None, str(error) or
                                    type(error).__name__)
        try:
            if not self._table_ready:
                await asyncio.to_thread(METADATA.create_all, self._engine)
                self._table_ready = True
            await asyncio.to_thread(write_comparison, self._engine, self.model, comparison)
        except Exception as error:  # noqa: BLE001 - losing a comparison only shortens the shadow's sample
            log.warning("shadow comparison not written: %s", error)

    async def _labels(self, texts: list[str]) -> tuple[list[str], str]:
        result = await self._client.infer(self.shadow, [text_input(self._grpc, texts)],
                                          outputs=[self._grpc.InferRequestedOutput("LABEL")],
                                          client_timeout=self.timeout_s)
        labels = [item.decode() if isinstance(item, bytes) else str(item)
                  for item in result.as_numpy("LABEL").reshape(-1)]
        return labels, result.get_response().model_version

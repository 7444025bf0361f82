"""The inference gateway: raw texts in, labels and probabilities out, every prediction logged.

    POST /v1/classify   {"texts": ["...", ...]}  -> labels, probabilities, prediction ids, model and version,
                        latency
    POST /v1/feedback   {"items": [{"prediction_id": "...", "label": "..."}, ...]}  -> the true labels of
                        logged predictions, for live accuracy in monitoring: {"stored": n, "unknown_ids": [...]}
    GET  /v1/models     the served models (``GATEWAY_MODELS``; the first is the default, the one the two
                        routes above serve)
    POST /v1/models/{name}/classify, /v1/models/{name}/feedback   the same, for the served model ``name``;
                        a model the gateway does not serve is a 404 that lists the served ones
    GET  /healthz       the process is up
    GET  /readyz        Triton is ready and the default model is loaded (503 with the reason if not); the other
                        served models not loaded are listed under ``unavailable``
    GET  /metrics       Prometheus (this replica's own counters, labelled by served model): requests by status,
                        latency, texts per request, in-flight,
                        texts answered with invalid (non-finite) outputs, the prediction journal
                        (bytes, bound, refusals) and the database writes behind it; feedback
                        requests by status and labels stored
    GET  /docs, /openapi.json

It talks to Triton over asynchronous gRPC. Bad input is a 4xx with a message that says what is
wrong (never a 500); an unexpected exception is a 500 ``{"error": ...}``, counted like every other
error status; Triton down or the model not loaded is a 503 with the reason, and the gateway
recovers by itself when Triton is back (the gRPC channel reconnects). A model that returns NaN or
infinite probabilities gets a 502 that says so; those predictions are not logged but counted
(``gateway_invalid_outputs_total``), and the monitor judges them as errors. Predictions are logged
through a durable local journal (``serving.prediction_log``): a database outage never stalls
serving; a full journal is a 503 that says so (nothing served that is not logged).

Run: ``uvicorn serving.gateway:app_from_env --factory`` with the ``GATEWAY_*`` settings below.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import ServingError
from serving.journal import JournalError
from serving.model_repository import DEFAULT_MODEL
from serving.prediction_log import FeedbackNotStored, FeedbackOfAnotherModel, Prediction, PredictionLog, encode_embedding
from serving.shadow import ShadowMirror, text_input
from serving.text import normalise_text

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
MODEL_ROUTE = re.compile(r"^/v1/models/([^/]+)/")
UNKNOWN_MODEL = "unknown"  # the metrics' model label of a request for a model the gateway does not serve


@dataclass(frozen=True)
class GatewaySettings:
    """Settings of one gateway process (environment variables ``GATEWAY_<FIELD>`` in upper case)."""

    triton_grpc_url: str = "127.0.0.1:8001"
    model: str = DEFAULT_MODEL
    models: str = ""  # comma list of served models, the default first; empty: only ``model``
    prediction_log_url: str = "sqlite:///predictions.db"
    max_texts: int = 32  # the ensemble's max_batch_size: one request is one Triton batch
    max_chars: int = 10_000
    max_body_bytes: int = 1 << 20
    triton_timeout_s: float = 10.0
    log_texts: bool = False
    journal_dir: str = ""  # empty: serving.prediction_log.default_journal_dir(prediction_log_url)
    journal_max_bytes: int = 512 << 20
    retention_days: float = 30.0
    max_feedback_items: int = 1000
    shadow_copies: int = 1  # copies to a shadow challenger in flight at once (serving/shadow.py); 0 = never copy

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> GatewaySettings:
        values: dict = {}
        for name, default in cls().__dict__.items():
            raw = env.get(f"GATEWAY_{name.upper()}")
            if raw is None:
                continue
            if isinstance(default, bool):
                values[name] = raw.strip().lower() in ("1", "true", "yes", "on")
            else:
                values[name] = type(default)(raw)
        return cls(**values)

    def served_models(self) -> tuple[str, ...]:
        """The served models, the default (the one ``/v1/classify`` serves) first; a ConfigError-like
        ValueError names a bad or repeated entry of ``models``."""
        names = tuple(name.strip() for name in self.models.split(",") if name.strip()) or (self.model,)
        bad = [name for name in names if not MODEL_NAME.match(name)]
        if bad:
            raise ValueError(f"GATEWAY_MODELS: {bad} are not Triton model names (letters, digits, '_' or '-')")
        if len(set(names)) != len(names):
            raise ValueError(f"GATEWAY_MODELS names a model twice: {self.models!r}")
        return names


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"texts": ["What a wonderful film"]}})

    texts: list[str] = Field(..., min_length=1, description="the texts to classify (one prediction each)")


class TextPrediction(BaseModel):
    label: str
    probabilities: dict[str, float]
    tokens: int | None = None
    prediction_id: str | None = None  # send it to /v1/feedback with the true label, when known


class ClassifyResponse(BaseModel):
    model: str
    model_version: str
    predictions: list[TextPrediction]
    latency_ms: float


FEEDBACK_PATH = "/v1/feedback"
CLASSIFY_EXPECTED = 'a JSON object like {"texts": ["some text"]}'
FEEDBACK_EXPECTED = 'a JSON object like {"items": [{"prediction_id": "<id from /v1/classify>", "label": "positive"}]}'


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(..., min_length=1, max_length=32, description="an id /v1/classify returned")
    label: str = Field(..., min_length=1, max_length=128, description="the true label of that text")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {"items": [
        {"prediction_id": "3f2c9a0e5b7d4c1e8a6f0b2d4e6c8a1b", "label": "positive"}]}})

    items: list[FeedbackItem] = Field(..., min_length=1, description="true labels of logged predictions")


class FeedbackResponse(BaseModel):
    stored: int
    unknown_ids: list[str]  # not in the prediction log (never served, past retention, or not written yet)


class ErrorResponse(BaseModel):
    error: str
    details: list | None = None
    models: list[str] | None = None  # a 404 for a model not served: the served ones


class TritonProblem(ServingError):
    """Triton could not answer: ``status`` is the HTTP status to return (503 or 502)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Metrics:
    """The gateway's Prometheus metrics in their own registry (several apps can live in one process)."""

    def __init__(self, prediction_log: PredictionLog, models: tuple[str, ...] = (DEFAULT_MODEL,)) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests_total", "Requests by served model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.latency = Histogram("gateway_request_latency_seconds", "Classify latency, request in to response out",
                                 ["model"], buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
                                 registry=self.registry)
        self.batch = Histogram("gateway_texts_per_request", "Texts per classify request", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.in_flight = Gauge("gateway_in_flight_requests", "Classify requests being served", ["model"],
                               registry=self.registry)
        self.predictions = Counter("gateway_predictions_total", "Texts classified", ["model"], registry=self.registry)
        self.invalid_outputs = Counter("gateway_invalid_outputs_total",
                                       "Texts the model answered with non-finite probabilities (NaN or Inf; "
                                       "answered 502, not logged)", ["model"], registry=self.registry)
        # Apart from gateway_requests_total: the monitor's error-rate SLO is about classify requests.
        self.feedback_requests = Counter("gateway_feedback_requests_total", "Feedback requests by HTTP status",
                                         ["model", "status"], registry=self.registry)
        self.feedback = Counter("gateway_feedback_total", "True labels stored from feedback", ["model"],
                                registry=self.registry)
        self.models = models
        for model in models:  # every served model's counters from 0, before its first request
            for counter in (self.predictions, self.invalid_outputs, self.feedback):
                counter.labels(model)
        journal, stats = prediction_log.journal, prediction_log.stats
        gauges = {
            "prediction_log_queue_depth": ("Predictions in the journal, not yet in the database",
                                           lambda: prediction_log.queue_depth),
            "prediction_log_written": ("Predictions written to the database", lambda: stats.written),
            "prediction_log_write_failures": ("Failed (and retried) database writes", lambda: stats.write_failures),
            "prediction_log_replayed_duplicates": ("Journal records the database already had (skipped)",
                                                   lambda: stats.replayed_duplicates),
            "prediction_journal_bytes": ("Bytes of the prediction journal on disk", lambda: journal.size_bytes),
            "prediction_journal_max_bytes": ("The journal's bound: at it, classify answers 503",
                                             lambda: journal.max_bytes),
            "prediction_journal_rejected": ("Predictions the journal refused (full or unwritable; answered 503)",
                                            lambda: stats.rejected),
            "prediction_journal_unreadable": ("Journal records skipped as unreadable (torn by a failed write)",
                                              lambda: journal.unreadable_lines + stats.unreadable_records),
        }
        for name, (description, read) in gauges.items():
            Gauge(name, description, registry=self.registry).set_function(read)


    def model_of(self, path: str) -> str:
        """The served model a request path is about: the one ``/v1/models/{name}/...`` names when it is
        served, ``UNKNOWN_MODEL`` when it is not, else the default model."""
        match = MODEL_ROUTE.match(path)
        if match is None:
            return self.models[0]
        return match.group(1) if match.group(1) in self.models else UNKNOWN_MODEL


class TritonClassifier:
    """Asynchronous gRPC calls to the classifier ensemble; label names come from its postprocess model."""

    OUTPUTS = ("LABEL", "PROBABILITIES")
    COUNTS = ("TOKENS", "UNKNOWN_TOKENS")
    EMBEDDING = "EMBEDDING"
    # Outputs added after the first release, by group: a version written before a group existed lacks
    # it. Each is asked for until the serving version turns out to lack it, and again once another
    # version serves (a promotion or a rollback).
    OPTIONAL = {"counts": COUNTS, "embedding": (EMBEDDING,)}

    def __init__(self, url: str, model: str, timeout_s: float) -> None:
        import tritonclient.grpc.aio as grpcclient

        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url)
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self._labels: dict[str, list[str]] = {}
        self._lacking: set[str] = set()  # groups of OPTIONAL the serving version lacks
        self._lacking_version: str | None = None  # the version found to lack them

    async def readiness(self) -> str | None:
        """None when Triton is ready and the model is loaded, else the reason."""
        from tritonclient.utils import InferenceServerException

        try:
            if not await self._client.is_server_ready(client_timeout=self.timeout_s):
                return f"Triton at {self.url} is not ready"
            if not await self._client.is_model_ready(self.model, client_timeout=self.timeout_s):
                return f"model {self.model!r} is not loaded in Triton (no champion promoted yet?)"
        except (InferenceServerException, OSError) as error:
            return f"Triton at {self.url} is unreachable: {_short(error)}"
        return None

    def requested_outputs(self) -> tuple[str, ...]:
        """The outputs asked for now: the classifier's and the optional ones not known to be lacking."""
        return self.OUTPUTS + tuple(name for group, names in self.OPTIONAL.items() if group not in self._lacking
                                    for name in names)

    async def _infer(self, texts: list[str], names: tuple[str, ...]):
        # No version: whichever version serves now; the response says which one it was.
        return await self._client.infer(self.model, [text_input(self._grpc, texts)], outputs=[self._grpc.InferRequestedOutput(n) for n in names],
                                        client_timeout=self.timeout_s)

    async def _infer_available(self, texts: list[str]):
        """Infer with every optional output the serving version has: an error that names one it lacks
        drops that output's group and asks again."""
        from tritonclient.utils import InferenceServerException

        while True:
            try:
                return await self._infer(texts, self.requested_outputs())
            except InferenceServerException as error:
                message = error.message() or ""
                lacking = [group for group, names in self.OPTIONAL.items()
                           if group not in self._lacking and any(name in message for name in names)]
                if not lacking:
                    raise
                self._lacking.add(lacking[0])
                self._lacking_version = None

    def note_version(self, version: str) -> None:
        """Remember which version lacked optional outputs; forget it when another version answers."""
        if not self._lacking:
            return
        if self._lacking_version is None:
            self._lacking_version = version
        elif version != self._lacking_version:
            self._lacking.clear()
            self._lacking_version = None

    async def _labels_of(self, version: str) -> list[str]:
        if version not in self._labels:
            config = (await self._client.get_model_config(f"{self.model}_postprocess", version, as_json=True,
                                                          client_timeout=self.timeout_s))["config"]
            self._labels[version] = config["parameters"]["labels"]["string_value"].split(",")
        return self._labels[version]

    async def known_labels(self) -> set[str] | None:
        """The label names of the versions served so far (feedback may be about any of them); before
        the first classify, those of the newest loaded version. None when Triton cannot say."""
        from tritonclient.utils import InferenceServerException

        try:
            if not self._labels:
                metadata = await self._client.get_model_metadata(self.model, as_json=True,
                                                                 client_timeout=self.timeout_s)
                versions = sorted(metadata.get("versions") or [], key=int)
                if versions:
                    await self._labels_of(versions[-1])
        except (InferenceServerException, OSError, KeyError, ValueError, TypeError) as error:
            log.warning("labels of %s unknown (%s): feedback labels are not checked", self.model, _short(error))
            return None
        return {label for labels in self._labels.values() for label in labels} or None

    async def classify(self, texts: list[str]) -> dict:
        from tritonclient.utils import InferenceServerException

        try:
            result = await self._infer_available(texts)
            version = result.get_response().model_version
            self.note_version(version)
            labels = await self._labels_of(version)
        except InferenceServerException as error:
            raise _triton_problem(error, self.model) from error
        except OSError as error:
            raise TritonProblem(503, f"Triton at {self.url} is unreachable: {_short(error)}") from error
        return classified(result, version, labels)

    async def close(self) -> None:
        await self._client.close()


def classified(result, version: str, labels: list[str]) -> dict:
    """The gateway's view of one ensemble response (``result.as_numpy(name)``: None for an output
    the response lacks): labels, probabilities, token counts and logged embeddings per text."""
    counts = {name: result.as_numpy(name) for name in TritonClassifier.COUNTS}
    embeddings = result.as_numpy(TritonClassifier.EMBEDDING)
    return {
        "version": version,
        "labels": labels,
        "label": [item.decode() if isinstance(item, bytes) else str(item)
                  for item in result.as_numpy("LABEL").reshape(-1)],
        "probabilities": result.as_numpy("PROBABILITIES").tolist(),
        "tokens": counts["TOKENS"].reshape(-1).tolist() if counts["TOKENS"] is not None else None,
        "unknown": counts["UNKNOWN_TOKENS"].reshape(-1).tolist() if counts["UNKNOWN_TOKENS"] is not None else None,
        # float16 bytes per text; None for a text without one (a version served without a table)
        "embeddings": [encode_embedding(row) for row in embeddings] if embeddings is not None else None,
    }


def _short(error: BaseException) -> str:
    return (getattr(error, "message", None) and error.message()) or str(error) or type(error).__name__


def _triton_problem(error, model: str) -> TritonProblem:
    status = str(error.status() or "")
    message = error.message() or str(error)
    if "UNAVAILABLE" in status or "DEADLINE" in status or "unknown model" in message.lower() \
            or "not ready" in message.lower() or "unavailable" in message.lower():
        return TritonProblem(503, f"Triton cannot serve {model!r} now: {message}")
    return TritonProblem(502, f"Triton failed the request: {message}")


def create_app(settings: GatewaySettings,
               classifier: Callable[[GatewaySettings], TritonClassifier] | None = None) -> FastAPI:
    """The gateway app; ``classifier`` builds the Triton client of one served model at startup, from the
    settings with ``model`` set to that model (default: TritonClassifier)."""
    models = settings.served_models()
    prediction_log = PredictionLog(settings.prediction_log_url, Path(settings.journal_dir) if settings.journal_dir
                                   else None, settings.journal_max_bytes, retention_days=settings.retention_days)
    metrics = Metrics(prediction_log, models)
    state: dict = {"models": models, "triton": {}, "shadow": {}}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await prediction_log.start()
        for name in models:
            model_settings = replace(settings, model=name)
            state["triton"][name] = classifier(model_settings) if classifier else \
                TritonClassifier(settings.triton_grpc_url, name, settings.triton_timeout_s)
            state["shadow"][name] = await _start_shadow(model_settings)  # a shadow of this model copies its traffic
        try:
            yield
        finally:
            for mirror in state["shadow"].values():
                if mirror is not None:
                    await mirror.close()
            await prediction_log.close()
            for triton in state["triton"].values():
                await triton.close()

    app = FastAPI(title="Text classification gateway", version="1.0",
                  description="Raw texts in, labels and probabilities out, served by the promoted champion "
                              "on Triton.", lifespan=lifespan)
    app.state.settings = settings
    app.state.prediction_log = prediction_log
    app.state.metrics = metrics
    _add_error_handling(app, settings, metrics, state["models"])
    _add_classify_route(app, settings, prediction_log, metrics, state)
    _add_feedback_route(app, settings, prediction_log, metrics, state)
    _add_model_routes(app, settings, prediction_log, metrics, state)
    _add_probe_routes(app, settings, metrics, state)
    return app


def _add_error_handling(app: FastAPI, settings: GatewaySettings, metrics: Metrics, models: tuple[str, ...]) -> None:
    """The body size limit, and every error answered as ``{"error": ...}`` with a 4xx or 5xx status,
    counted: an exception no handler below takes is a counted 500 (logged with its traceback). A
    request for a model not served is a 404 whatever its body (``models``: the served ones)."""

    @app.middleware("http")
    async def unhandled_is_500(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as error:  # noqa: BLE001 - the last resort: answered and counted, never a bare 500
            log.exception("%s %s failed", request.method, request.url.path)
            return _error(500, f"internal error ({type(error).__name__}); it is logged, try again", metrics,
                          path=request.url.path)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method == "POST":
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > settings.max_body_bytes):
                return _error(413, f"request body over {settings.max_body_bytes} bytes", metrics, path=request.url.path)
            body = await request.body()
            if len(body) > settings.max_body_bytes:
                return _error(413, f"request body over {settings.max_body_bytes} bytes", metrics, path=request.url.path)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        details = [{"loc": list(item.get("loc", ())), "msg": item.get("msg", "")} for item in error.errors()]
        json_broken = any(item.get("type") == "json_invalid" for item in error.errors())
        unserved = unserved_model(request.url.path, models)
        if unserved is not None:  # the model is the first thing wrong, whatever the body holds
            return _unknown_model(unserved, models, metrics, request.url.path)
        expected = FEEDBACK_EXPECTED if is_feedback_path(request.url.path) else CLASSIFY_EXPECTED
        message = "the body is not valid JSON (UTF-8)" if json_broken else f"expected {expected}"
        return _error(400 if json_broken else 422, message, metrics, details, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, error: StarletteHTTPException):
        message = str(error.detail)
        if error.status_code == 400 and "parsing the body" in message:
            message = "the body is not valid JSON (UTF-8)"
        return _error(error.status_code, message, metrics, path=request.url.path)

    @app.exception_handler(TritonProblem)
    async def triton_problem(request: Request, error: TritonProblem):
        return _error(error.status, error.message, metrics, path=request.url.path)

    @app.exception_handler(JournalError)
    async def not_logged(request: Request, error: JournalError):
        # Not served: a prediction that cannot be logged is not given out (never a silent loss).
        return _error(503, f"{error}; the prediction was not served, try again later", metrics,
                      path=request.url.path)


ERROR_RESPONSES = {400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                   502: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


def _add_classify_route(app: FastAPI, settings: GatewaySettings, prediction_log: PredictionLog, metrics: Metrics,
                        state: dict) -> None:
    @app.post("/v1/classify", response_model=ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(body: ClassifyRequest) -> ClassifyResponse | JSONResponse:
        """Classify one or more texts with the default model's serving champion."""
        return await classify_texts(state["models"][0], body.texts, "/v1/classify", settings, prediction_log,
                                    metrics, state)


async def classify_texts(model: str, texts: list[str], path: str, settings: GatewaySettings,
                         prediction_log: PredictionLog, metrics: Metrics,
                         state: dict) -> ClassifyResponse | JSONResponse:
    """Classify ``texts`` with the served ``model``, log the predictions and count the request under it."""
    problem = _unacceptable_texts(texts, settings)
    if problem:
        return _error(422, problem, metrics, path=path)
    started = time.perf_counter()
    metrics.in_flight.labels(model).inc()
    try:
        result = await state["triton"][model].classify(texts)
    finally:
        metrics.in_flight.labels(model).dec()
    latency_ms = (time.perf_counter() - started) * 1000.0
    invalid = non_finite_rows(result["probabilities"])
    if invalid:
        # The model's fault, not the server's or the caller's: no answer, nothing logged, counted.
        metrics.invalid_outputs.labels(model).inc(len(invalid))
        return _error(502, invalid_outputs_message(len(invalid), len(texts)), metrics, path=path)
    labels = result["labels"]
    ids = [uuid.uuid4().hex for _ in texts]
    predictions = [
        TextPrediction(label=label, probabilities=dict(zip(labels, probabilities, strict=False)),
                       tokens=result["tokens"][i] if result["tokens"] else None, prediction_id=ids[i])
        for i, (label, probabilities) in enumerate(zip(result["label"], result["probabilities"], strict=True))
    ]
    await prediction_log.record(_logged_predictions(texts, result, latency_ms, settings, ids, model))
    if state["shadow"].get(model) is not None:  # a challenger of this model shadowing: it answers a copy, after
        state["shadow"][model].offer(texts, result["label"], result["version"], latency_ms)
    metrics.requests.labels(model, "200").inc()
    metrics.latency.labels(model).observe(latency_ms / 1000.0)
    metrics.batch.labels(model).observe(len(texts))
    metrics.predictions.labels(model).inc(len(texts))
    return ClassifyResponse(model=model, model_version=result["version"], predictions=predictions,
                            latency_ms=latency_ms)


def _add_model_routes(app: FastAPI, settings: GatewaySettings, prediction_log: PredictionLog, metrics: Metrics,
                      state: dict) -> None:
    """``/v1/models`` and the classify and feedback routes of each served model by name."""
    models = state["models"]

    @app.get("/v1/models")
    async def list_models() -> dict:
        """The served models; the first is the default (the one /v1/classify and /v1/feedback serve)."""
        return {"default": models[0], "models": list(models)}

    @app.post("/v1/models/{name}/classify", response_model=ClassifyResponse,
              responses={404: {"model": ErrorResponse}, **ERROR_RESPONSES})
    async def classify_model(name: str, body: ClassifyRequest, request: Request) -> ClassifyResponse | JSONResponse:
        """Classify one or more texts with the serving champion of the served model ``name``."""
        if name not in models:
            return _unknown_model(name, models, metrics, request.url.path)
        return await classify_texts(name, body.texts, request.url.path, settings, prediction_log, metrics, state)

    @app.post("/v1/models/{name}/feedback", response_model=FeedbackResponse,
              responses={404: {"model": ErrorResponse}, **ERROR_RESPONSES})
    async def feedback_model(name: str, body: FeedbackRequest, request: Request) -> FeedbackResponse | JSONResponse:
        """True labels of predictions the served model ``name`` made (as /v1/feedback)."""
        if name not in models:
            return _unknown_model(name, models, metrics, request.url.path)
        return await store_feedback(name, body.items, request.url.path, settings, prediction_log, metrics, state)


def _unknown_model(name: str, models: tuple[str, ...], metrics: Metrics, path: str) -> JSONResponse:
    return _error(404, f"model {name!r} is not served here; the served models: {', '.join(models)}", metrics,
                  path=path, models=list(models))


async def _start_shadow(settings: GatewaySettings) -> ShadowMirror | None:
    """The mirror that copies answered requests to a shadow challenger while one is loaded (None: off)."""
    if settings.shadow_copies <= 0:
        return None
    mirror = ShadowMirror(settings.triton_grpc_url, settings.model, settings.prediction_log_url,
                          settings.triton_timeout_s, max_in_flight=settings.shadow_copies)
    try:
        await mirror.start()
    except Exception as error:  # noqa: BLE001 - serving goes on without shadows; promotions asking for one fail
        log.warning("shadow copies off: %s", error)
        return None
    return mirror


def _unacceptable_texts(texts: list[str], settings: GatewaySettings) -> str | None:
    """Why the texts of one request cannot be classified (too many, too long, not Unicode), or None."""
    if len(texts) > settings.max_texts:
        return f"{len(texts)} texts in one request; the limit is {settings.max_texts}"
    too_long = [i for i, text in enumerate(texts) if len(text) > settings.max_chars]
    if too_long:
        return f"texts {too_long[:10]} are longer than {settings.max_chars} characters"
    not_unicode = [i for i, text in enumerate(texts) if not _encodable(text)]
    if not_unicode:
        return f"texts {not_unicode[:10]} are not valid Unicode (lone surrogate escapes)"
    return None


def non_finite_rows(probabilities: list[list[float]]) -> list[int]:
    """The indexes of the texts whose probabilities hold a NaN or an infinity."""
    rows = [np.asarray(row, dtype=np.float64) for row in probabilities]
    return [index for index, row in enumerate(rows) if not np.isfinite(row).all()]


def invalid_outputs_message(invalid: int, texts: int) -> str:
    return (f"the model returned non-finite outputs for {invalid} of {texts} texts; nothing was served "
            "(a fault of the serving model version: it needs a rollback or a fix, not a retry)")


def _logged_predictions(texts: list[str], result: dict, latency_ms: float, settings: GatewaySettings,
                        prediction_ids: list[str], model: str | None = None) -> Iterator[Prediction]:
    """The prediction log's rows for one answered request (texts only when ``settings.log_texts``);
    the length is the normalised text's (``serving.text``), as the model and the reference see it."""
    served_at, model = time.time(), model or settings.model
    return (
        Prediction(served_at=served_at, model=model, model_version=result["version"],
                   text_chars=len(normalise_text(text)), token_count=result["tokens"][i] if result["tokens"] else None,
                   unknown_tokens=result["unknown"][i] if result["unknown"] else None, label=label,
                   probabilities=tuple(probabilities), latency_ms=latency_ms,
                   text=text if settings.log_texts else None, prediction_id=prediction_ids[i],
                   embedding=result["embeddings"][i] if result.get("embeddings") else None)
        for i, (text, label, probabilities) in enumerate(zip(texts, result["label"], result["probabilities"],
                                                             strict=True)))


def _add_feedback_route(app: FastAPI, settings: GatewaySettings, prediction_log: PredictionLog, metrics: Metrics,
                        state: dict) -> None:
    @app.post(FEEDBACK_PATH, response_model=FeedbackResponse,
              responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
                         503: {"model": ErrorResponse}})
    async def feedback(body: FeedbackRequest) -> FeedbackResponse | JSONResponse:
        """Attach true labels to logged predictions by their ids (a later label for an id replaces the
        earlier one); ids not in the prediction log are returned in ``unknown_ids``, not stored."""
        return await store_feedback(state["models"][0], body.items, FEEDBACK_PATH, settings, prediction_log, metrics,
                                    state)


async def store_feedback(model: str, items: list[FeedbackItem], path: str, settings: GatewaySettings,
                         prediction_log: PredictionLog, metrics: Metrics,
                         state: dict) -> FeedbackResponse | JSONResponse:
    """Store true labels given for the served ``model`` (checked against its labels), counted under it."""
    problem = unacceptable_feedback(items, settings.max_feedback_items, await state["triton"][model].known_labels(),
                                    model)
    if problem:
        return _error(422, problem, metrics, path=path)
    try:
        stored, unknown = await prediction_log.record_feedback([(i.prediction_id, i.label) for i in items], model)
    except FeedbackNotStored as error:
        return _error(503, str(error), metrics, path=path)
    except FeedbackOfAnotherModel as error:
        return _error(422, str(error), metrics, path=path)
    metrics.feedback_requests.labels(model, "200").inc()
    metrics.feedback.labels(model).inc(stored)
    return FeedbackResponse(stored=stored, unknown_ids=unknown)


def unacceptable_feedback(items: list[FeedbackItem], max_items: int, labels: set[str] | None, model: str) -> str | None:
    """Why a feedback request cannot be stored (too many items, labels the model does not have), or
    None. ``labels`` None: the model's labels are unknown now (Triton down), any label is taken."""
    if len(items) > max_items:
        return f"{len(items)} items in one request; the limit is {max_items}"
    not_unicode = [i for i, item in enumerate(items) if not (_encodable(item.label) and _encodable(item.prediction_id))]
    if not_unicode:
        return f"items {not_unicode[:10]} are not valid Unicode (lone surrogate escapes)"
    unknown = sorted({item.label for item in items} - labels) if labels else []
    if unknown:
        return f"labels {unknown[:10]} are not labels of {model!r} (its labels: {', '.join(sorted(labels))})"
    return None


def _add_probe_routes(app: FastAPI, settings: GatewaySettings, metrics: Metrics, state: dict) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        """The gateway process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Triton is ready and the default model is loaded (the others not loaded are listed)."""
        default, *others = state["models"]
        reason = await state["triton"][default].readiness()
        if reason:
            return JSONResponse(status_code=503, content={"error": reason})
        # Another model not loaded yet (never trained, say) does not stop the default one from serving.
        unavailable = {model: await state["triton"][model].readiness() for model in others}
        return {"status": "ready", "model": default, "models": list(state["models"]),
                "unavailable": {model: reason for model, reason in unavailable.items() if reason}}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unserved_model(path: str, models: tuple[str, ...]) -> str | None:
    """The model a ``/v1/models/{name}/...`` path names when the gateway does not serve it, else None."""
    match = MODEL_ROUTE.match(path)
    return match.group(1) if match is not None and match.group(1) not in models else None


def is_feedback_path(path: str) -> bool:
    return path == FEEDBACK_PATH or (MODEL_ROUTE.match(path) is not None and path.endswith("/feedback"))


def _error(status: int, message: str, metrics: Metrics, details: list | None = None, path: str = "",
           models: list[str] | None = None) -> JSONResponse:
    """An error answer, counted by served model (the one the path names, else the default) and status:
    feedback's in gateway_feedback_requests_total, every other request's in gateway_requests_total (the
    classify error rate the monitor judges)."""
    counter = metrics.feedback_requests if is_feedback_path(path) else metrics.requests
    counter.labels(metrics.model_of(path), str(status)).inc()
    content: dict = {"error": message}
    if details:
        content["details"] = details
    if models is not None:
        content["models"] = models
    return JSONResponse(status_code=status, content=content)


def app_from_env() -> FastAPI:
    """The uvicorn factory: settings from ``GATEWAY_*`` environment variables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = GatewaySettings.from_env(os.environ)
        settings.served_models()
    except ValueError as error:  # a bad GATEWAY_* value: say which, without a traceback
        raise SystemExit(f"error: {error}") from None
    return create_app(settings)


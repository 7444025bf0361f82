"""The models served side by side: each a Triton ensemble (its served name, the gateway's route
``/v1/models/{served}/classify``) that follows the ``champion`` alias of one MLflow registered model,
with its own monitor. The default one is ``PIPELINE_SERVING_MODEL`` / ``PIPELINE_REGISTERED_MODEL``;
``PIPELINE_EXTRA_MODELS`` adds others as a comma list of ``served=registered``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.config import REGISTERED_MODEL, SERVED_MODEL
from tasks.errors import ConfigError

DEFAULT_EXTRA_MODELS = "topic_classifier=topic-classifier"
SERVED_NAME = re.compile(r"^[A-Za-z0-9_-]+$")  # a Triton model name (promote.triton_model's pattern)
REGISTERED_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ServedModel:
    """One served model: its Triton ensemble name and the MLflow registered model it follows."""

    served: str
    registered: str

    def __post_init__(self) -> None:
        if not SERVED_NAME.match(self.served):
            raise ConfigError(f"served model name {self.served!r} must be letters, digits, '_' or '-'")
        if not REGISTERED_NAME.match(self.registered):
            raise ConfigError(f"registered model name {self.registered!r} must be letters, digits, '_', '-' or '.'")


def parse_model_entry(entry: str) -> ServedModel:
    """``served=registered`` (for example ``topic_classifier=topic-classifier``) as a ServedModel."""
    served, separator, registered = entry.strip().partition("=")
    if not separator or not served.strip() or not registered.strip():
        raise ConfigError(f"model entry {entry.strip()!r} is not served=registered (for example "
                          f"{DEFAULT_EXTRA_MODELS})")
    return ServedModel(served.strip(), registered.strip())


def parse_model_list(text: str) -> tuple[ServedModel, ...]:
    """A comma list of ``served=registered`` entries (empty entries are skipped)."""
    return tuple(parse_model_entry(entry) for entry in text.split(",") if entry.strip())


def unique_models(models: tuple[ServedModel, ...]) -> tuple[ServedModel, ...]:
    """``models`` unchanged, or a ConfigError naming a served or registered name given twice."""
    for kind in ("served", "registered"):
        names = [getattr(model, kind) for model in models]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ConfigError(f"{kind} model names {twice} are given more than once: each served model needs its "
                              "own served and registered name")
    return models


def served_models(env: Mapping[str, str]) -> tuple[ServedModel, ...]:
    """Every served model: the default one first, then ``PIPELINE_EXTRA_MODELS`` (an empty value: none)."""
    default = ServedModel(env.get("PIPELINE_SERVING_MODEL") or SERVED_MODEL,
                          env.get("PIPELINE_REGISTERED_MODEL") or REGISTERED_MODEL)
    extra = env.get("PIPELINE_EXTRA_MODELS", DEFAULT_EXTRA_MODELS)
    return unique_models((default, *parse_model_list(extra)))


def monitor_dag_id(model: ServedModel, default: ServedModel) -> str:
    """``monitor_serving`` for the default model, ``monitor_serving__<served>`` for each other."""
    return "monitor_serving" if model == default else f"monitor_serving__{model.served}"


def model_params(model: ServedModel) -> dict[str, str]:
    """The optimize_model params that make a run train, register and serve ``model``."""
    return {"registered_model": model.registered, "triton_model": model.served}

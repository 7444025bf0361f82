"""The optimize_model DAG's params, generated from the config dataclasses' field metadata.

A config field that carries ``tasks.config.param(...)`` metadata is a param of the Airflow form:
its name, description, JSON-schema type and bounds, and its default (the field's default) come
from the field, so the form, ``config_from_params`` and the dataclasses cannot disagree.
Standard library only: the DAG file imports this when the scheduler parses it.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from typing import Any, get_type_hints

from tasks.config import PipelineConfig

JSON_TYPES = {"bool": "boolean", "int": "integer", "float": "number", "str": "string",
              "tuple[float, ...]": "array"}
# The JSON-schema items of a list param (the form shows one entry per line).
ITEM_TYPES = {"tuple[float, ...]": {"type": "number"}}

# Params about the run rather than a step: why it started (monitor_serving fills them in), and
# whether to train although nothing changed.
RUN_PARAMS: dict[str, dict[str, Any]] = {
    "trigger_reason": {"default": "manual or nightly", "type": "string",
                       "description": "why this run started (monitor_serving fills it in when drift or an SLO breach "
                                      "persisted)"},
    "trigger_kind": {"default": "", "type": "string", "enum": ["", "errors", "accuracy", "latency", "drift"],
                     "description": "the breach that triggered this run (monitor_serving fills it in; empty: manual or "
                                    "nightly): latency re-optimizes, drift and accuracy retrain on new labels, errors "
                                    "roll back or alert"},
    "trigger_evidence": {"default": "{}", "type": "string",
                         "description": "the monitoring evidence behind the trigger (JSON)"},
    "force_retrain": {"default": False, "type": "boolean",
                      "description": "train even when the champion was built from the same data, configuration, "
                                     "teacher and code (or, after drift or an accuracy drop, from the same labelled "
                                     "data)"},
}
TRIGGER_PARAMS = ("trigger_reason", "trigger_kind", "trigger_evidence")


@dataclass(frozen=True)
class ParamSpec:
    """One param of the form and the config field it sets."""

    name: str
    section: str
    key: str
    default: Any
    type: str
    description: str
    schema: dict[str, Any]


def _section_types() -> dict[str, type]:
    """Config section name -> its dataclass, in PipelineConfig's order."""
    hints = get_type_hints(PipelineConfig)
    return {item.name: hints[item.name] for item in fields(PipelineConfig)}


def _spec(section: str, item: Any) -> ParamSpec:
    meta = dict(item.metadata["param"])
    schema = dict(meta["schema"])
    default = schema.pop("default") if "default" in schema else item.default
    if default is MISSING:
        raise TypeError(f"{section}.{item.name} is a param without a default")
    annotation = str(item.type)
    if annotation not in JSON_TYPES:
        raise TypeError(f"{section}.{item.name}: params must be bool, int, float, str or a tuple of floats, "
                        f"not {annotation}")
    if annotation in ITEM_TYPES:  # JSON has lists, not tuples: the form's default and its items' type
        default, schema = list(default), {"items": ITEM_TYPES[annotation], **schema}
    return ParamSpec(meta["name"], section, item.name, default, JSON_TYPES[annotation], meta["description"], schema)


def pipeline_params() -> dict[str, ParamSpec]:
    """Every config param, in section and field order; names are unique across sections."""
    specs: dict[str, ParamSpec] = {}
    for section, kind in _section_types().items():
        for item in fields(kind):
            if "param" not in item.metadata:
                continue
            spec = _spec(section, item)
            if spec.name in specs or spec.name in RUN_PARAMS:
                raise TypeError(f"param {spec.name!r} is declared twice")
            specs[spec.name] = spec
    return specs


def default_params() -> dict[str, Any]:
    """Param name -> default, config params only."""
    return {name: spec.default for name, spec in pipeline_params().items()}


def form(defaults: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every param of the form (config params, then run params) as keyword arguments of Airflow's
    ``Param``: ``{"default": ..., "type": ..., "description": ..., **schema}``. ``defaults``
    replaces some defaults (the deployment's data source, say)."""
    defaults = defaults or {}
    entries = {name: {"default": spec.default, "type": spec.type, "description": spec.description, **spec.schema}
               for name, spec in pipeline_params().items()}
    entries |= {name: dict(entry) for name, entry in RUN_PARAMS.items()}
    for name, value in defaults.items():
        entries[name]["default"] = value
    return entries


def markdown_table() -> str:
    """The params table of ``docs/dags/optimize_model.md`` (between its ``params`` markers; a test
    keeps it in sync: ``python -m tasks.params`` prints it)."""
    lines = ["| param | default | config field | meaning |", "|---|---|---|---|"]
    for name, spec in pipeline_params().items():
        lines.append(f"| `{name}` | {_shown(spec.default)} | `{spec.section}.{spec.key}` | {_text(spec.description)} |")
    for name, entry in RUN_PARAMS.items():
        lines.append(f"| `{name}` | {_shown(entry['default'])} | (the run) | {_text(entry['description'])} |")
    return "\n".join(lines) + "\n"


def _text(description: str) -> str:
    return description.replace("<", "&lt;").replace("|", "\\|")


def _shown(value: Any) -> str:
    if value == "":
        return "(empty)"
    return f"`{str(value).lower() if isinstance(value, bool) else value}`"


if __name__ == "__main__":
    print(markdown_table(), end="")

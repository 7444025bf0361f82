"""Encoder families: where each supported architecture keeps the modules that distillation and
structured pruning work on, looked up by the Hugging Face ``config.model_type``.

Everything family-specific lives here; ``tasks.modeling`` reads these paths and never names a
module of its own. Paths are dotted attribute paths (``encoder.layer``, ``attention.self.query``):
``layers`` from the model's base model (``model.base_model``) to the list of transformer blocks,
the rest from one block.

ALBERT shares one block's weights across its whole depth (``num_hidden_layers`` applications of
``encoder.albert_layer_groups[0].albert_layers[0]``). Its student is the same shared block applied
fewer times: the depth falls (faster), the parameter count barely moves. Structured pruning resizes
the shared block, so a removed head or neuron is removed at every depth. ALBERT configurations with
more than one layer group or more than one layer per group (no released checkpoint has them) are
not supported: distillation and pruning end SKIPPED saying so.

Standard library only: the lookup raises ``ConfigError`` naming the family and the supported ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.errors import ConfigError


@dataclass(frozen=True)
class EncoderFamily:
    """The modules of one encoder architecture that distillation and structured pruning touch.

    Attributes:
        name: the family as the docs name it.
        model_types: the ``config.model_type`` values it covers.
        tokenizer: the kind of tokenizer its checkpoints ship (for the docs and the tiny test models).
        layers: base model -> the ``ModuleList`` of transformer blocks (the unique blocks when shared).
        attention: block -> the module that holds query/key/value and the head-count attributes.
        query, key, value: attention module -> its projections (output rows grouped by head).
        attention_output: block -> the projection after attention (input columns grouped by head).
        ffn_in, ffn_out: block -> the feed-forward layers (neurons are ``ffn_in`` rows, ``ffn_out`` columns).
        head_count: attention-module attributes holding the number of heads, set after pruning.
        head_width: attention-module attributes holding heads x head size, set after pruning.
        shared_layers: one block's weights are applied at every depth (ALBERT).
    """

    name: str
    model_types: tuple[str, ...]
    tokenizer: str
    layers: str
    attention: str
    query: str
    key: str
    value: str
    attention_output: str
    ffn_in: str
    ffn_out: str
    head_count: tuple[str, ...] = ("num_attention_heads",)
    head_width: tuple[str, ...] = ("all_head_size",)
    shared_layers: bool = False


def _bert_style(name: str, model_types: tuple[str, ...], tokenizer: str) -> EncoderFamily:
    """BERT's module layout, which RoBERTa, XLM-RoBERTa and ELECTRA copy."""
    return EncoderFamily(name, model_types, tokenizer, layers="encoder.layer", attention="attention.self",
                         query="query", key="key", value="value", attention_output="attention.output.dense",
                         ffn_in="intermediate.dense", ffn_out="output.dense")


FAMILIES: tuple[EncoderFamily, ...] = (
    _bert_style("BERT", ("bert",), "WordPiece"),
    _bert_style("RoBERTa", ("roberta",), "byte-level BPE"),
    _bert_style("XLM-RoBERTa", ("xlm-roberta",), "SentencePiece (Unigram)"),
    _bert_style("ELECTRA", ("electra",), "WordPiece"),
    EncoderFamily("DistilBERT", ("distilbert",), "WordPiece", layers="transformer.layer", attention="attention",
                  query="q_lin", key="k_lin", value="v_lin", attention_output="attention.out_lin",
                  ffn_in="ffn.lin1", ffn_out="ffn.lin2", head_count=("n_heads",), head_width=("dim",)),
    EncoderFamily("ALBERT", ("albert",), "SentencePiece (Unigram)", layers="encoder.albert_layer_groups.0.albert_layers",
                  attention="attention", query="query", key="key", value="value", attention_output="attention.dense",
                  ffn_in="ffn", ffn_out="ffn_output", shared_layers=True),
)


def supported_model_types() -> list[str]:
    return [model_type for family in FAMILIES for model_type in family.model_types]


def supported_families() -> str:
    """The supported families as the docs name them, each with its model_types: "BERT (bert), ..."."""
    return ", ".join(f"{family.name} ({'/'.join(family.model_types)})" for family in FAMILIES)


def family_of(config: Any) -> EncoderFamily:
    """The family of a Hugging Face config (by ``model_type``); ConfigError for one not supported."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise ConfigError(reason)
    model_type = getattr(config, "model_type", "")
    return next(family for family in FAMILIES if model_type in family.model_types)


def unsupported_reason(config: Any) -> str | None:
    """Why distillation and structured pruning cannot work on this config's encoder (None: they can)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    family = next((family for family in FAMILIES if model_type in family.model_types), None)
    if family is None:
        return (f"model_type {model_type!r} is not a supported encoder family for layer-copy distillation and "
                f"structured pruning; supported: {supported_families()}. Add its module paths to tasks/families.py")
    if family.shared_layers and (getattr(config, "num_hidden_groups", 1), getattr(config, "inner_group_num", 1)) != (1, 1):
        return (f"{family.name} with num_hidden_groups={config.num_hidden_groups} and inner_group_num="
                f"{config.inner_group_num}: only one shared layer (1 and 1, as every released checkpoint) is supported")
    return None

"""Texts -> classifier inputs with a Hugging Face tokenizer, truncated by the run's strategy.

Every step that tokenizes texts for a classifier (training, evaluation, export, quantization
calibration, the benchmarks that measure served models) calls ``encode``, so a model is trained,
evaluated and calibrated on the same tokens, and the Triton tokenizer model selects them by the same
rule (``serving.truncation.kept_positions``).
"""

from __future__ import annotations

from typing import Any

from serving.truncation import DEFAULT_TRUNCATION, check_truncation, kept_positions

# The keys of an encoding that are per position (selected by kept_positions); the rest are dropped.
POSITION_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def encode(tokenizer, texts: list[str], max_length: int, truncation: str = DEFAULT_TRUNCATION, *,
           padding: bool | str = True, return_tensors: str | None = "np",
           return_token_type_ids: bool = False) -> Any:
    """``texts`` tokenized to at most ``max_length`` tokens each, padded by ``padding``.

    ``head`` is the tokenizer's own truncation (the inputs every run before ``head_tail`` trained on,
    unchanged). ``head_tail`` tokenizes without truncation, keeps ``kept_positions`` of every
    positional key and pads with ``tokenizer.pad``. ``padding`` is ``True`` (to the longest text) or
    ``"max_length"``; ``return_tensors`` as the tokenizer takes it (``"np"``, ``"pt"``, None).
    """
    check_truncation(truncation)
    if truncation == "head":
        return tokenizer(texts, truncation=True, max_length=max_length, padding=padding,
                         return_tensors=return_tensors, return_token_type_ids=return_token_type_ids)
    full = tokenizer(texts, truncation=False, padding=False, return_special_tokens_mask=True,
                     return_token_type_ids=return_token_type_ids, verbose=False)
    kept = {key: [] for key in POSITION_KEYS if key in full}
    for row, mask in enumerate(full["special_tokens_mask"]):
        positions = kept_positions(mask, max_length, truncation)
        for key, rows in kept.items():
            values = full[key][row]
            rows.append([values[position] for position in positions])
    return tokenizer.pad(kept, padding=padding, max_length=max_length, return_tensors=return_tensors, verbose=False)

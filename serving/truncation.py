"""The one truncation rule: which tokens of a long text a classifier reads.

``head`` keeps the first tokens of a text, as a tokenizer's own truncation does. ``head_tail`` keeps
the first quarter of the token budget and the last three quarters (Sun et al. 2019, "How to
Fine-Tune BERT for Text Classification": the best of their strategies on IMDB), because a long
review often gives its verdict at the end. The special tokens around the text (``[CLS]``/``[SEP]``,
``<s>``/``</s>``) are always kept, whatever the strategy.

Training, evaluation, export, quantization (``tasks.tokens``) and the Triton tokenizer model all
select positions with ``kept_positions``, so the served model reads what the evaluated one read.
Standard library only: the Triton tokenizer model ships a copy of this file in its version folder
(``serving.model_repository``) and imports it from there.
"""

from __future__ import annotations

from collections.abc import Sequence

TRUNCATIONS = ("head", "head_tail")
DEFAULT_TRUNCATION = "head"


def check_truncation(strategy: str) -> str:
    """``strategy`` if it is one of ``TRUNCATIONS``; a ``ValueError`` naming them otherwise."""
    if strategy not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {list(TRUNCATIONS)}, got {strategy!r}")
    return strategy


def _leading_specials(special_tokens_mask: Sequence[int]) -> int:
    count = 0
    while count < len(special_tokens_mask) and special_tokens_mask[count]:
        count += 1
    return count


def kept_positions(special_tokens_mask: Sequence[int], max_length: int, strategy: str) -> list[int]:
    """Positions of an untruncated, unpadded encoding that a ``max_length``-token input keeps.

    Args:
        special_tokens_mask: 1 for a special token, 0 for a token of the text (one per position).
        max_length: the most positions kept, special tokens included.
        strategy: ``head`` (the body's first tokens) or ``head_tail`` (the first budget // 4 and the
            last budget - budget // 4, where budget is ``max_length`` less the special tokens).

    Returns:
        Increasing positions: all of them for a text that fits, else the leading special tokens, the
        body's kept tokens and the trailing special tokens.
    """
    check_truncation(strategy)
    size = len(special_tokens_mask)
    if size <= max_length:
        return list(range(size))
    leading = _leading_specials(special_tokens_mask)
    trailing = min(_leading_specials(special_tokens_mask[::-1]), size - leading)
    body_start, body_end = leading, size - trailing
    budget = max(max_length - leading - trailing, 0)
    head = budget if strategy == "head" else budget // 4
    tail = budget - head
    body = list(range(body_start, body_start + head)) + list(range(body_end - tail, body_end))
    return list(range(leading)) + body + list(range(body_end, size))

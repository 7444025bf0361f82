"""The one text normalisation: what training, evaluation, the Triton tokenizer model and the
gateway's logged features all apply to a raw text before anything else looks at it.

HTML line breaks (``<br />``, as in scraped reviews) become spaces, runs of whitespace become one
space, and the ends are stripped. Nothing else: the tokenizer does its own lower-casing and unicode
normalisation, and anything more here would change what a trained model sees.

Standard library only: the Triton tokenizer model ships a copy of this file in its version folder
(``serving.model_repository``) and imports it from there.
"""

from __future__ import annotations

import re

_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """``text`` as every model of the project reads it (see the module's docstring)."""
    return _SPACES.sub(" ", _HTML_BREAK.sub(" ", text)).strip()

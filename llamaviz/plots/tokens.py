"""Token strings made readable: visible whitespace, unique axis labels, HTML escaping.

Display rule (one rule for every figure, the HTML view and the static twins): a token keeps its
raw piece, except that whitespace is shown with a visible mark. Space, SentencePiece "▁" and
byte-level BPE "Ġ" become "␣"; newline and byte-level "Ċ" become "⏎"; tab and byte-level "ĉ"
become "⇥"; carriage return becomes "↵"; SentencePiece byte tokens <0x20>, <0x0A>, <0x09> and
<0x0D> get the same marks. The empty string is shown as "∅". Special tokens (<s>, <|im_start|>)
keep their text, escaped wherever they end up in HTML.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

_WHITESPACE = str.maketrans({
    " ": "␣", "▁": "␣", "Ġ": "␣",
    "\n": "⏎", "Ċ": "⏎",
    "\t": "⇥", "ĉ": "⇥",
    "\r": "↵",
})
_BYTE_TOKENS = {"<0x20>": "␣", "<0x0A>": "⏎", "<0x09>": "⇥", "<0x0D>": "↵"}


def display_token(token: str) -> str:
    """The token as shown in figures: its raw piece with whitespace made visible (see module doc)."""
    if token == "":
        return "∅"
    return _BYTE_TOKENS.get(token) or token.translate(_WHITESPACE)


def token_labels(tokenizer, ids: Sequence[int], raw_tokens: bool = False) -> list[str]:
    """Each token's text with whitespace marked (the tokenizer's display_tokens, else decode, through
    display_token), or with raw_tokens the vocabulary's pieces: the terminal's and the mask tab's labels."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if raw_tokens and convert is not None:
        return [str(t) for t in convert(list(ids))]
    display = getattr(tokenizer, "display_tokens", None)
    texts = display(list(ids)) if display is not None else [tokenizer.decode([i]) for i in ids]
    return [display_token(text) for text in texts]


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, ending in "…" when cut (long special tokens, URLs)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def position_labels(tokens: Sequence[str], limit: int = 32) -> list[str]:
    """Unique labels "i: token" for categorical axes (the same token may appear twice).

    Tokens longer than `limit` characters are shortened; the index keeps the labels unique."""
    return [f"{index}: {shorten(display_token(token), limit)}" for index, token in enumerate(tokens)]


def escape_html(text: str, quote: bool = False) -> str:
    """Escape &, < and > (and quotes when `quote`) so a token never renders as markup."""
    return html.escape(text, quote=quote)


def escape_all(texts: Sequence[str]) -> list[str]:
    """escape_html over a list of labels (plotly renders a subset of HTML in text)."""
    return [escape_html(text) for text in texts]

"""Where the model's Hugging Face methods find the code that lives in the layers above the model core.

`from_pretrained`, `save_pretrained`, `generate` and the tokenizer a model loads on first use need
checkpoint readers, decoding loops and tokenizers, which import the model. The model core names them
only as slots here; the package's root (llamaviz/__init__.py, the top of the layers, which Python
runs before any submodule) fills each slot with "module:attribute", imported on first use. This is
transformers' lazy auto-mapping turned around: the lower layer defines the table, the top fills it.
This module imports nothing from llamaviz and no torch, so filling it costs nothing at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

SLOTS = ("load_pretrained", "open_checkpoint", "save_pretrained", "generate", "generate_with_cache",
         "auto_tokenizer")
_PROVIDERS: dict[str, str] = {}


def provide(slot: str, target: str) -> None:
    """Fill `slot` with "package.module:attribute" (imported when first called)."""
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
    _PROVIDERS[slot] = target


def provided(slot: str) -> Callable:
    """The callable that fills `slot`."""
    if slot not in _PROVIDERS:
        raise RuntimeError(f"nothing provides {slot!r}: import llamaviz (its root fills the model's slots)")
    module, _, attribute = _PROVIDERS[slot].partition(":")
    return getattr(importlib.import_module(module), attribute)

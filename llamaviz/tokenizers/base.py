"""The API every llamaviz tokenizer shares: batching, padding, special tokens, chat templates, saving.

A backend subclass supplies only the vocabulary work: `_encode_plain` (text -> ids, special-token
strings recognised, nothing added), `_decode_ids`, id/token lookups, `vocab_size`, `get_vocab`,
`save_vocabulary`. Special tokens are added here, from `add_bos_token`/`add_eos_token`, so the
three backends (SentencePiece, tokenizer.json, GGUF vocabularies) behave the same way.

Padding defaults to the left: llamaviz is decoder-only, and a batch for generation is left-padded
so that every row's last position is a real token. Pass `padding_side="right"` to change it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamaviz.tokenizers.chat import cut_after_final_message, render_chat
from llamaviz.tokenizers.special import SPECIAL_TOKEN_NAMES, SpecialTokensMixin, special_token, special_token_id
from llamaviz.tokenizers.encoding import (
    CLEANUPS, PADDING_OPTIONS, RETURN_TENSORS, TRUNCATION_OPTIONS, BatchEncoding, as_id_lists, as_texts, checked_side,
    batch_encoding, lookup_option,
)

VERY_LARGE_INTEGER = int(1e30)  # model_max_length when nothing says (as transformers does)
_LOADER = None  # tokenizers.loading.load, registered by it: it imports the backends, which import this module


def register_loader(loader) -> None:
    """Set the function behind from_pretrained (called once, by llamaviz.tokenizers.loading)."""
    global _LOADER
    _LOADER = loader

class TokenizerBase(SpecialTokensMixin):
    """Shared behaviour of LlamaTokenizer and LlamaTokenizerFast (see the module docstring)."""

    vocab_file_name = ""  # what save_vocabulary writes, e.g. "tokenizer.json"
    tokenizer_class_name = ""  # written to tokenizer_config.json

    bos_token, eos_token = special_token("bos_token"), special_token("eos_token")
    unk_token, pad_token = special_token("unk_token"), special_token("pad_token")
    bos_token_id, eos_token_id = special_token_id("bos_token"), special_token_id("eos_token")
    unk_token_id, pad_token_id = special_token_id("unk_token"), special_token_id("pad_token")

    def __init__(self, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None, add_bos_token=True,
                 add_eos_token=False, padding_side="left", truncation_side="right", chat_template=None,
                 model_max_length=VERY_LARGE_INTEGER, clean_up_tokenization_spaces=False, name_or_path=""):
        self._special_tokens = dict.fromkeys(SPECIAL_TOKEN_NAMES)
        for name, token in zip(SPECIAL_TOKEN_NAMES, (bos_token, eos_token, unk_token, pad_token)):
            self._special_tokens[name] = self._checked_special_token(name, token)
        self._add_bos_token, self._add_eos_token = bool(add_bos_token), bool(add_eos_token)
        self.padding_side = checked_side("padding_side", padding_side)
        self.truncation_side = checked_side("truncation_side", truncation_side)
        self.chat_template = chat_template
        self.model_max_length = int(model_max_length) if model_max_length is not None else VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.name_or_path = str(name_or_path)
        self._special_tokens_changed()

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """Load from a Hugging Face folder, a .gguf file, or a folder holding one .gguf; kwargs override the files."""
        if _LOADER is None:
            raise RuntimeError("no tokenizer loader: import llamaviz.tokenizers (its __init__ registers it)")
        return _LOADER(path, cls if cls is not TokenizerBase else None, **kwargs)

    # --- what a backend provides -------------------------------------------------------------------------------
    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text with no special tokens added (special-token strings in it are read as such)."""
        raise NotImplementedError

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of one id sequence."""
        raise NotImplementedError

    def _id_to_token(self, index: int) -> str | None:
        raise NotImplementedError

    def _token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (tokens added on top not counted)."""
        raise NotImplementedError

    def get_vocab(self) -> dict[str, int]:
        """{token: id} including added tokens."""
        raise NotImplementedError

    def _special_tokens_changed(self) -> None:
        """Hook: a special token or add_bos/add_eos flag changed (the fast backend rebuilds its post-processor)."""

    # --- encoding ------------------------------------------------------------------------------------------------
    def __call__(self, text, return_tensors=None, padding=False, max_length=None, truncation=False,
                 add_special_tokens=True, padding_side=None) -> BatchEncoding:
        """Encode a text or a list of texts: {"input_ids", "attention_mask"} as lists, or [b, p] tensors."""
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; use None (lists), 'pt' or 'np'")
        strategy = lookup_option("padding", padding, PADDING_OPTIONS)
        truncate = lookup_option("truncation", truncation, TRUNCATION_OPTIONS)
        batched, texts = as_texts(text)
        ids = self._encode_plain(texts)
        if truncate:
            ids = [self._truncated(row, max_length, add_special_tokens) for row in ids]
        if add_special_tokens:
            ids = [self.build_inputs_with_special_tokens(row) for row in ids]
        ids, mask = self._padded(ids, strategy, max_length, padding_side)
        return batch_encoding(ids, mask, batched, return_tensors)

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors=None, **kwargs):
        """The ids of one text (a [1, p] tensor with return_tensors="pt")."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes one string, got {type(text).__name__}; call the tokenizer for batches")
        return self(text, add_special_tokens=add_special_tokens, return_tensors=return_tensors, **kwargs)["input_ids"]

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of `text`."""
        return self.convert_ids_to_tokens(self.encode(text, add_special_tokens=add_special_tokens))

    def _truncated(self, ids: list[int], max_length: int | None, add_special_tokens: bool) -> list[int]:
        """`ids` cut (on truncation_side) so that with its special tokens it fits max_length."""
        limit = (self.model_max_length if max_length is None else max_length) - (
            self.num_special_tokens_to_add() if add_special_tokens else 0
        )
        if limit < 0:
            count = self.num_special_tokens_to_add()
            raise ValueError(f"max_length={max_length} cannot hold the {count} special tokens added to each text")
        if len(ids) <= limit:
            return ids
        return ids[:limit] if self.truncation_side == "right" else ids[len(ids) - limit :]

    def _padded(self, ids: list[list[int]], strategy, max_length, padding_side):
        """Pad every row to a common length on padding_side; returns (ids, attention_mask)."""
        mask = [[1] * len(row) for row in ids]
        if strategy is None:
            return ids, mask
        if self.pad_token_id is None:
            raise ValueError(
                "padding needs a pad token and this tokenizer has none; "
                "set one first, e.g. tok.pad_token = tok.eos_token"
            )
        side = checked_side("padding_side", padding_side or self.padding_side)
        target = max(map(len, ids), default=0) if strategy == "longest" else self._max_length_for_padding(max_length)
        for row, row_mask in zip(ids, mask):
            extra = max(target - len(row), 0)
            at = 0 if side == "left" else len(row)
            row[at:at] = [self.pad_token_id] * extra
            row_mask[at:at] = [0] * extra
        return ids, mask

    def _max_length_for_padding(self, max_length: int | None) -> int:
        """max_length, else model_max_length; padding="max_length" with neither is an error."""
        if max_length is not None:
            return int(max_length)
        if self.model_max_length >= VERY_LARGE_INTEGER:
            raise ValueError("padding='max_length' needs max_length=N (this tokenizer has no model_max_length)")
        return self.model_max_length

    # --- decoding ------------------------------------------------------------------------------------------------
    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        """The text of one id sequence (list, tensor, array or int); a list of texts for a batch of sequences."""
        ids = as_id_lists(token_ids)
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        if ids and not 0 <= min(ids) <= max(ids) < len(self):
            raise ValueError(f"token ids must lie in [0, {len(self)}), got {min(ids)}..{max(ids)}")
        text = self._decode_ids(ids, skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        for before, after in CLEANUPS if clean_up_tokenization_spaces else ():
            text = text.replace(before, after)
        return text

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=None) -> list[str]:
        """decode() of each row of a [b, p] tensor or list of id lists."""
        rows = as_id_lists(sequences)
        return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces) for row in rows]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """Token string of an id, or the list of token strings of a list of ids."""
        if isinstance(ids, int) or getattr(ids, "ndim", None) == 0:
            return self._checked_id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._checked_id_to_token(int(i)) for i in as_id_lists(ids) if int(i) not in special]

    def display_tokens(self, ids) -> list[str]:
        """Each id as the text it stands for, for figures: 'Ġcreate' -> ' create', '▁Hi' -> ' Hi'.

        Special tokens keep their written form; a piece holding part of a multi-byte character
        shows as the replacement character.
        """
        ids = [int(i) for i in as_id_lists(ids)]
        special = set(self.all_special_ids)
        return [self._display_piece(i) if i not in special else self._checked_id_to_token(i) for i in ids]

    def _display_piece(self, index: int) -> str:
        text = self._decode_ids([index], False)
        if self._checked_id_to_token(index).startswith("\u2581") and not text.startswith(" "):
            text = " " + text  # SentencePiece drops the space of a text's first word
        return text

    def _checked_id_to_token(self, index: int) -> str:
        token = self._id_to_token(index)
        if token is None:
            raise ValueError(f"token id {index} is out of range; ids run from 0 to {len(self) - 1}")
        return token

    def convert_tokens_to_ids(self, tokens):
        """Id of a token string (unk_token_id when unknown), or the list of ids of a list of tokens."""
        if isinstance(tokens, str):
            index = self._token_to_id(tokens)
            return index if index is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """The text that a list of token strings spells."""
        return self.decode(self.convert_tokens_to_ids(list(tokens)))

    # --- chat templates ------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=True, return_tensors=None,
                            return_dict=True, chat_template=None, continue_final_message=False, padding=False,
                            truncation=False, max_length=None, tools=None, documents=None, **kwargs):
        """Render messages with the chat template; the text, or (tokenize=True) its encoding without added specials.

        Like transformers 5: a BatchEncoding by default, the ids alone with return_dict=False; a list of
        conversations gives a batch.
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError(
                f"this tokenizer ({self.name_or_path or type(self).__name__}) has no chat template: none in "
                "tokenizer_config.json 'chat_template', chat_template.jinja or GGUF 'tokenizer.chat_template'; "
                "pass chat_template='...' or set tok.chat_template"
            )
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be True")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        if not conversations or not all(conversations):
            raise ValueError("apply_chat_template needs at least one message, e.g. [{'role': 'user', 'content': 'Hi'}]")
        variables = {**self.special_tokens_map, **kwargs, "tools": tools, "documents": documents}
        texts = [render_chat(template, list(chat), add_generation_prompt=add_generation_prompt, **variables)
                 for chat in conversations]
        if continue_final_message:
            texts = [cut_after_final_message(text, chat) for text, chat in zip(texts, conversations)]
        if not tokenize:
            return texts if batched else texts[0]
        encoding = self(texts if batched else texts[0], return_tensors=return_tensors, padding=padding,
                        truncation=truncation, max_length=max_length, add_special_tokens=False)
        return encoding if return_dict else encoding["input_ids"]

    # --- saving --------------------------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the vocabulary file into an existing folder; returns the paths written."""
        raise NotImplementedError

    def _vocabulary_path(self, save_directory, filename_prefix: str | None) -> Path:
        """Where save_vocabulary writes; the folder must exist."""
        folder = Path(save_directory)
        if not folder.is_dir():
            raise ValueError(f"save_vocabulary needs an existing folder; {folder} is not one")
        return folder / ((f"{filename_prefix}-" if filename_prefix else "") + self.vocab_file_name)

    def _config(self) -> dict[str, Any]:
        """The tokenizer_config.json this tokenizer reloads from (transformers reads it too)."""
        return {
            "tokenizer_class": self.tokenizer_class_name,
            **{name: self._special_tokens[name] for name in SPECIAL_TOKEN_NAMES},
            "add_bos_token": self._add_bos_token,
            "add_eos_token": self._add_eos_token,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
        }

    def save_pretrained(self, save_directory) -> tuple[str, ...]:
        """Write vocabulary, tokenizer_config.json and special_tokens_map.json; from_pretrained reads them back."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"save_pretrained needs a folder; {folder} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        files = {"tokenizer_config.json": self._config(), "special_tokens_map.json": self.special_tokens_map}
        for name, content in files.items():
            (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return tuple(str(folder / name) for name in files) + self.save_vocabulary(folder)

    # --- sizes ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Vocabulary size including added tokens."""
        return len(self.get_vocab())

    def __repr__(self) -> str:
        tokens = ", ".join(f"{name}={token!r}" for name, token in self.special_tokens_map.items())
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"padding_side={self.padding_side!r}, add_bos_token={self._add_bos_token}, {tokens})")

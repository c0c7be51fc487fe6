"""LlamaTokenizer: a SentencePiece vocabulary (tokenizer.model or a GGUF "llama" one), run by sentencepiece."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from llamaviz.tokenizers.base import TokenizerBase
from llamaviz.tokenizers.spm_proto import without_dummy_prefix

SPIECE_UNDERLINE = "▁"


class LlamaTokenizer(TokenizerBase):
    """SentencePiece tokenizer with special-token strings in the text read as those tokens.

    The text is split on special tokens first (sentencepiece itself would spell "<s>" out as
    pieces), then each stretch goes through sentencepiece. legacy=True (Llama 2, llama.cpp): every
    stretch gets SentencePiece's dummy-prefix space; legacy=False: only one at the start of the text.

    decode() follows transformers' SentencePiece LlamaTokenizer (4.x) by default, since that is the
    documented behaviour: the first piece loses one "▁" (the prefix space encoding added), so a
    word-initial first token is unspaced ("▁Banana" -> "Banana") and a text that began with
    whitespace comes back one space shorter (" Banana" -> "Banana", "  two" -> " two"); with
    legacy=True a special token after text gets a space before that text's run. It is not
    lossless. lossless_decode=True decodes through sentencepiece alone instead, so
    decode(encode(text)) gives text back for text without special tokens (" Banana" -> " Banana").
    """

    vocab_file_name = "tokenizer.model"
    tokenizer_class_name = "LlamaTokenizer"

    def __init__(self, vocab_file=None, *, model_proto: bytes | None = None, legacy: bool = True,
                 added_tokens: dict[str, int] | None = None, lossless_decode: bool = False, **kwargs):
        if model_proto is None:
            if vocab_file is None:
                raise ValueError("LlamaTokenizer needs vocab_file (a tokenizer.model path) or model_proto bytes")
            model_proto = Path(vocab_file).read_bytes()
        self._model_proto = model_proto
        self.sp_model = _processor(model_proto, vocab_file)
        self._sp_without_prefix = None
        self.legacy = bool(legacy)
        self.lossless_decode = bool(lossless_decode)
        size = self.sp_model.get_piece_size()
        self._added = {token: index for token, index in (added_tokens or {}).items() if index >= size}
        self._added_tokens = {index: token for token, index in self._added.items()}
        self._control_tokens = [self.sp_model.id_to_piece(index) for index in range(size)
                                if self.sp_model.is_control(index) or self.sp_model.is_unknown(index)]
        for name, token in _model_special_tokens(self.sp_model).items():
            kwargs.setdefault(name, token)
        super().__init__(**kwargs)

    def _special_tokens_changed(self) -> None:
        """Recompute which strings split the text: control pieces, added tokens, named special tokens."""
        tokens = [*self._control_tokens, *self._added, *self.special_tokens_map.values()]
        self._split_ids = {token: self._token_to_id(token) for token in tokens}
        self._splitter = _splitter(tuple(sorted(self._split_ids)))
        self._special_ids = {index: token for token, index in self._split_ids.items()}
        self._named_special_tokens = set(self.all_special_tokens)  # what transformers spells verbatim
        self._named_special_ids = {self._token_to_id(token) for token in self._named_special_tokens}

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_text(text) for text in texts]

    def _encode_text(self, text: str) -> list[int]:
        """Ids of one text: special-token strings become their ids, the rest goes through sentencepiece."""
        ids = []
        for position, chunk in enumerate(self._splitter.split(text) if self._splitter else [text]):
            if position % 2:  # re.split puts the captured special tokens at odd positions
                ids.append(self._split_ids[chunk])
            elif chunk:
                model = self.sp_model if self.legacy or position == 0 else self._model_without_prefix()
                ids.extend(model.encode(chunk))
        return ids

    def _model_without_prefix(self):
        """A second processor with the dummy prefix off, for legacy=False text after a special token."""
        if self._sp_without_prefix is None:
            self._sp_without_prefix = _processor(without_dummy_prefix(self._model_proto), "model without prefix")
        return self._sp_without_prefix

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of ids: transformers' SentencePiece rule, or sentencepiece alone with lossless_decode."""
        if skip_special_tokens:
            ids = [index for index in ids if index not in self._special_ids]
        if self.lossless_decode:
            return self._decode_lossless(ids)
        parts, run = [], []
        for index in ids:  # added (non-special) tokens cut the ids into texts decoded one by one
            if index in self._added_tokens and index not in self._named_special_ids:
                parts += [self._decode_pieces([self._id_to_token(i) for i in run]), self._id_to_token(index)]
                run = []
            else:
                run.append(index)
        return "".join(parts) + self._decode_pieces([self._id_to_token(i) for i in run])

    def _decode_pieces(self, pieces: list[str]) -> str:
        """transformers 4.x LlamaTokenizer.convert_tokens_to_string: pieces -> text, special pieces verbatim.

        The first piece drops one "▁"; the pieces between special tokens go through sentencepiece
        (which drops the "▁" of the first word-initial piece it sees); with legacy=True a special
        token after text has a space put in front of that text; a piece right after a leading special
        token that does not start a word gets a space. legacy=False decodes without the dummy prefix,
        so only the first "▁" is dropped.
        """
        if pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = [pieces[0][1:], *pieces[1:]]
        model = self.sp_model if self.legacy else self._model_without_prefix()
        parts, run, after_special = [], [], False
        for position, piece in enumerate(pieces):
            if piece in self._named_special_tokens:
                if self.legacy and position and not after_special:
                    parts.append(" ")
                parts += [model.decode(run), piece]
                run, after_special = [], True
            else:
                if after_special and position == 1 and not piece.startswith(SPIECE_UNDERLINE):
                    parts.append(" ")
                run.append(piece)
                after_special = False
        return "".join(parts) + model.decode(run)

    def _decode_lossless(self, ids: list[int]) -> str:
        """Special/added tokens spelled as is, pieces between them through sentencepiece.

        sentencepiece drops the dummy-prefix space of the first piece; a stretch that follows other
        output keeps its space, as the Hugging Face Llama decoder (strip one leading space) does.
        """
        parts, run = [], []
        for index in ids:
            if index in self._special_ids or index in self._added_tokens:
                parts.append(self._decode_run(run, after_text=bool(parts)))
                parts.append(self._id_to_token(index))
                run = []
            else:
                run.append(index)
        parts.append(self._decode_run(run, after_text=bool(parts)))
        return "".join(parts)

    def _decode_run(self, ids: list[int], after_text: bool) -> str:
        if not ids:
            return ""
        text = self.sp_model.decode(ids)
        return " " + text if after_text and self.sp_model.id_to_piece(ids[0]).startswith(SPIECE_UNDERLINE) else text

    def _display_piece(self, index: int) -> str:
        """One piece's own text, every "▁" a space ("▁▁" -> two spaces), bytes through sentencepiece."""
        if index in self._added_tokens:
            return self._added_tokens[index]
        text = self.sp_model.decode([index])  # drops the piece's first "▁", if any
        return " " + text if self.sp_model.id_to_piece(index).startswith(SPIECE_UNDERLINE) else text

    def _id_to_token(self, index: int) -> str | None:
        if 0 <= index < self.sp_model.get_piece_size():
            return self.sp_model.id_to_piece(index)
        return self._added_tokens.get(index)

    def _token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        index = self.sp_model.piece_to_id(token)
        return index if index != self.sp_model.unk_id() or token == self.sp_model.id_to_piece(index) else None

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary (added tokens not counted)."""
        return self.sp_model.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size + len(self._added)

    def get_vocab(self) -> dict[str, int]:
        """{token: id} for every piece and added token."""
        vocab = {self.sp_model.id_to_piece(index): index for index in range(self.vocab_size)}
        return {**vocab, **self._added}

    def save_vocabulary(self, save_directory, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write the SentencePiece model as tokenizer.model (rebuilt from GGUF when it came from one)."""
        path = self._vocabulary_path(save_directory, filename_prefix)
        path.write_bytes(self._model_proto)
        return (str(path),)

    def _config(self) -> dict:
        flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        added = {str(index): {"content": token, **flags} for index, token in self._added_tokens.items()}
        return {**super()._config(), "legacy": self.legacy, **({"added_tokens_decoder": added} if added else {})}


def _processor(model_proto: bytes, source):
    """A SentencePieceProcessor over serialized model bytes; a clear error for bytes that are no model."""
    import sentencepiece

    try:
        return sentencepiece.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as err:
        raise ValueError(f"{source} is not a SentencePiece model (tokenizer.model): {err}") from None


def _model_special_tokens(sp_model) -> dict[str, str | None]:
    """bos/eos/unk/pad tokens as the SentencePiece model's trainer spec names them (None where id is -1)."""
    ids = {"bos_token": sp_model.bos_id(), "eos_token": sp_model.eos_id(), "unk_token": sp_model.unk_id(),
           "pad_token": sp_model.pad_id()}
    return {name: sp_model.id_to_piece(index) if index >= 0 else None for name, index in ids.items()}


@lru_cache(maxsize=32)
def _splitter(tokens: tuple[str, ...]) -> re.Pattern | None:
    """A regex whose split() isolates the given tokens, longest first (leftmost-longest match)."""
    if not tokens:
        return None
    return re.compile("(" + "|".join(re.escape(token) for token in sorted(tokens, key=len, reverse=True)) + ")")

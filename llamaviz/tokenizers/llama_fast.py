"""LlamaTokenizerFast: a `tokenizers` (Rust) tokenizer, from tokenizer.json or built from a GGUF BPE vocabulary."""

from __future__ import annotations

from llamaviz.tokenizers.base import SPECIAL_TOKEN_NAMES, TokenizerBase


class LlamaTokenizerFast(TokenizerBase):
    """A tokenizers.Tokenizer behind the shared API; encoding and decoding run in Rust.

    add_bos_token/add_eos_token default to what the file's post-processor does; changing them
    (or bos/eos) rebuilds the post-processor (`update_post_processor`), as transformers does.
    """

    vocab_file_name = "tokenizer.json"
    tokenizer_class_name = "LlamaTokenizerFast"

    def __init__(self, tokenizer_file=None, *, tokenizer_object=None, tokenizer_class: str | None = None,
                 legacy: bool | None = None, **kwargs):
        from tokenizers import Tokenizer

        if tokenizer_object is None:
            if tokenizer_file is None:
                raise ValueError("LlamaTokenizerFast needs tokenizer_file (a tokenizer.json path) or tokenizer_object")
            try:
                tokenizer_object = Tokenizer.from_file(str(tokenizer_file))
            except Exception as err:  # tokenizers raises a bare Exception for unreadable JSON
                raise ValueError(f"{tokenizer_file} is not a valid tokenizer.json: {err}") from None
        self._tokenizer = tokenizer_object
        self._tokenizer.no_padding()  # padding and truncation happen in TokenizerBase
        self._tokenizer.no_truncation()
        self.tokenizer_class_name = tokenizer_class or self.tokenizer_class_name
        self.legacy = legacy  # kept only to write back: tokenizer.json already says how to split
        for name in SPECIAL_TOKEN_NAMES:  # {"content": "<s>", ...} as older configs write them
            if isinstance(kwargs.get(name), dict):
                kwargs[name] = kwargs[name].get("content")
        self._add_special_tokens_to_backend(kwargs)
        for flag, present in zip(("add_bos_token", "add_eos_token"), self._post_processor_flags(kwargs)):
            kwargs.setdefault(flag, present)
        super().__init__(**kwargs)

    @property
    def backend_tokenizer(self):
        """The tokenizers.Tokenizer doing the work."""
        return self._tokenizer

    def _add_special_tokens_to_backend(self, kwargs: dict) -> None:
        """Make the named special tokens whole-match added tokens, so their strings in text read as them."""
        from tokenizers import AddedToken

        added = {token.content for token in self._tokenizer.get_added_tokens_decoder().values()}
        named = [str(kwargs[name]) for name in SPECIAL_TOKEN_NAMES if kwargs.get(name) is not None]
        missing = [token for token in dict.fromkeys(named) if token not in added]
        if missing:
            self._tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])

    def _post_processor_flags(self, kwargs: dict) -> tuple[bool, bool]:
        """(adds bos, adds eos): what the file's post-processor puts around an empty text."""
        ids = self._tokenizer.encode("", add_special_tokens=True).ids
        bos, eos = (self._tokenizer.token_to_id(str(kwargs.get(name) or "")) for name in ("bos_token", "eos_token"))
        return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos

    def _special_tokens_changed(self) -> None:
        self.update_post_processor()

    def update_post_processor(self) -> None:
        """Rebuild the backend's post-processor from bos/eos and add_bos_token/add_eos_token."""
        from tokenizers import processors

        bos, eos = self._bos_eos()
        single = [f"{self.bos_token}:0"] * len(bos) + ["$A:0"] + [f"{self.eos_token}:0"] * len(eos)
        pair = single + [f"{self.bos_token}:1"] * len(bos) + ["$B:1"] + [f"{self.eos_token}:1"] * len(eos)
        special = [(self.bos_token, index) for index in bos] + [(self.eos_token, index) for index in eos]
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(special))
        )

    def _encode_plain(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _id_to_token(self, index: int) -> str | None:
        return self._tokenizer.id_to_token(index) if index >= 0 else None

    def _token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (added tokens outside it not counted)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """{token: id} including added tokens."""
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def _config(self) -> dict:
        return {**super()._config(), **({"legacy": self.legacy} if self.legacy is not None else {})}

    def save_vocabulary(self, save_directory, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write tokenizer.json (vocabulary, merges, pre-tokenizer, decoder, current post-processor)."""
        path = self._vocabulary_path(save_directory, filename_prefix)
        self._tokenizer.save(str(path))
        return (str(path),)

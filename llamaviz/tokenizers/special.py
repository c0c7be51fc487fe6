"""Special tokens: the named bos/eos/unk/pad tokens as properties, and where encoding puts them."""

from __future__ import annotations

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def special_token(name: str) -> property:
    """A settable property for one named special token (a string of the vocabulary, or None)."""

    def get(self):
        return self._special_tokens[name]

    def set(self, token):
        self._special_tokens[name] = self._checked_special_token(name, token)
        self._special_tokens_changed()

    return property(get, set, doc=f"The {name.split('_')[0]} token as a string, or None.")


def special_token_id(name: str) -> property:
    """The id of a named special token; setting an id sets the token."""

    def get(self):
        token = self._special_tokens[name]
        return None if token is None else self.convert_tokens_to_ids(token)

    def set(self, index):
        setattr(self, name, None if index is None else self.convert_ids_to_tokens(int(index)))

    return property(get, set, doc=f"The id of {name}, or None.")


class SpecialTokensMixin:
    """What TokenizerBase knows about special tokens; needs _special_tokens, _token_to_id and the id lookups."""

    def _checked_special_token(self, name: str, token) -> str | None:
        """`token` as a string of this vocabulary (AddedToken-like objects and dicts accepted), or None."""
        if isinstance(token, dict):
            token = token.get("content")
        if token is None:
            return None
        token = str(token)
        if self._token_to_id(token) is None:
            raise ValueError(
                f"{name}={token!r} is not in this tokenizer's vocabulary; use a token it has, "
                f"e.g. tok.{name} = tok.eos_token ({self._special_tokens.get('eos_token')!r})"
            )
        return token

    @property
    def add_bos_token(self) -> bool:
        """Whether encoding with add_special_tokens=True puts bos_token first."""
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self._special_tokens_changed()

    @property
    def add_eos_token(self) -> bool:
        """Whether encoding with add_special_tokens=True puts eos_token last."""
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self._special_tokens_changed()

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...} for the named special tokens that are set."""
        return {name: token for name, token in self._special_tokens.items() if token is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, without repeats, in bos/eos/unk/pad order."""
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of `all_special_tokens`."""
        return [self.convert_tokens_to_ids(token) for token in self.all_special_tokens]

    def _bos_eos(self) -> tuple[list[int], list[int]]:
        """The ids put before and after each sequence: ([bos] or [], [eos] or [])."""
        bos = [self.bos_token_id] if self._add_bos_token and self.bos_token is not None else []
        eos = [self.eos_token_id] if self._add_eos_token and self.eos_token is not None else []
        return bos, eos

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        """[bos] + ids0 + [eos] (+ [bos] + ids1 + [eos]), each special as add_bos_token/add_eos_token say."""
        bos, eos = self._bos_eos()
        output = bos + list(token_ids_0) + eos
        return output if token_ids_1 is None else output + bos + list(token_ids_1) + eos

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False) -> list[int]:
        """1 where build_inputs_with_special_tokens puts a special token, 0 on sequence tokens."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("already_has_special_tokens=True takes one formatted sequence; got token_ids_1 too")
            special = set(self.all_special_ids)
            return [int(int(index) in special) for index in token_ids_0]
        bos, eos = self._bos_eos()
        mask = [1] * len(bos) + [0] * len(token_ids_0) + [1] * len(eos)
        return mask if token_ids_1 is None else mask + [1] * len(bos) + [0] * len(token_ids_1) + [1] * len(eos)

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None) -> list[int]:
        """0 over the first sequence and its special tokens, 1 over the second's."""
        bos, eos = self._bos_eos()
        first = [0] * (len(bos) + len(token_ids_0) + len(eos))
        return first if token_ids_1 is None else first + [1] * (len(bos) + len(token_ids_1) + len(eos))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        """How many special tokens encoding adds to one sequence (or a pair)."""
        bos, eos = self._bos_eos()
        return (len(bos) + len(eos)) * (2 if pair else 1)

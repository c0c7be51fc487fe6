"""BatchEncoding and the argument checks and conversions behind TokenizerBase.__call__ and decode."""

from __future__ import annotations

PADDING_OPTIONS = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
TRUNCATION_OPTIONS = {False: False, "do_not_truncate": False, True: True, "longest_first": True, "only_first": True}
RETURN_TENSORS = (None, "pt", "np")
# clean_up_tokenization_spaces: (before, after) replacements, as transformers makes them
CLEANUPS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


class BatchEncoding(dict):
    """`input_ids` and `attention_mask` as a dict, also readable as attributes; `.to(device)` for tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no {name!r}; it holds {sorted(self)}") from None

    def to(self, device) -> BatchEncoding:
        """The same encoding with every tensor moved to `device`."""
        return BatchEncoding({key: value.to(device) if hasattr(value, "to") else value for key, value in self.items()})


def checked_side(name: str, side: str) -> str:
    """`side` if it is "left" or "right"; an error naming the option otherwise."""
    if side not in ("left", "right"):
        raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
    return side


def lookup_option(name: str, value, accepted: dict):
    """Look `value` up in the accepted options table, with an error listing them."""
    try:
        return accepted[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name}={value!r} is not supported; use one of {list(accepted)}") from None


def as_texts(text) -> tuple[bool, list[str]]:
    """(batched, texts) for a string or a list/tuple of strings."""
    if isinstance(text, str):
        return False, [text]
    if isinstance(text, (list, tuple)) and all(isinstance(item, str) for item in text):
        return True, list(text)
    raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")


def as_id_lists(token_ids) -> list:
    """Plain Python ids: a list of ints (or of lists, for a batch) from an int, list, array or tensor."""
    ids = plain_ids(token_ids)
    return [ids] if isinstance(ids, int) else ids


def plain_ids(value):
    """`value` with tensors/arrays turned into (nested) lists of ints."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [plain_ids(item) for item in value]
    return int(value)


def batch_encoding(ids: list[list[int]], mask: list[list[int]], batched: bool, return_tensors) -> BatchEncoding:
    """Lists (flat for one text) or [b, p] tensors."""
    if return_tensors is None:
        return BatchEncoding(input_ids=ids if batched else ids[0], attention_mask=mask if batched else mask[0])
    lengths = sorted({len(row) for row in ids})
    if len(lengths) > 1:
        raise ValueError(
            f"return_tensors={return_tensors!r} needs rows of one length, got lengths {lengths}; pass padding=True"
        )
    if return_tensors == "pt":
        import torch

        return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long),  # [b, p]
                             attention_mask=torch.tensor(mask, dtype=torch.long))  # [b, p]
    import numpy as np

    return BatchEncoding(input_ids=np.array(ids, dtype=np.int64),  # [b, p]
                         attention_mask=np.array(mask, dtype=np.int64))  # [b, p]

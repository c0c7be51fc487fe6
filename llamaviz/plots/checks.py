"""Input checks shared by every figure: each failure is a ValueError naming the argument,
what was expected and what was given."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

def to_numpy(tensor: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """A float64 numpy copy of a tensor or array (any device or dtype, gradients dropped)."""
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to("cpu", torch.float64).numpy()
    if isinstance(tensor, (np.ndarray, list, tuple)):
        try:
            return np.asarray(tensor, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name} must be numeric; got {type(tensor).__name__}: {err}") from None
    raise ValueError(f"{name} must be a torch.Tensor or numpy array; got {type(tensor).__name__}")


def check_ndim(array: np.ndarray, name: str, shapes: dict[int, str], hint: str = "") -> None:
    """Require one of the ranks in `shapes` (rank -> shape in DESIGN letters, e.g. {3: "[h, p, k]"})."""
    if array.ndim not in shapes:
        accepted = " or ".join(shapes.values())
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be {accepted}; got shape {list(array.shape)}{extra}")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty; got shape {list(array.shape)}")


def check_values(array: np.ndarray, name: str, allow_nan: bool = False,
                 low: float | None = None, high: float | None = None) -> None:
    """Require finite values (NaN too when `allow_nan`) within [low, high] where given."""
    bad = np.isinf(array) if allow_nan else ~np.isfinite(array)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        allowed = "finite values or NaN" if allow_nan else "finite values"
        raise ValueError(f"{name} must hold {allowed}; got {array[where]} at index {list(where)}")
    present = array[~np.isnan(array)]
    if low is not None and present.size and present.min() < low:
        raise ValueError(f"{name} must be >= {low}; got minimum {present.min():.6g}")
    if high is not None and present.size and present.max() > high:
        raise ValueError(f"{name} must be <= {high}; got maximum {present.max():.6g}")


def check_tokens(tokens: Sequence[str], name: str, length: int, what: str) -> list[str]:
    """Require a sequence of `length` strings matching `what` (e.g. "pattern's p=6 query positions")."""
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise ValueError(f"{name} must be a list of token strings; got {type(tokens).__name__}")
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            raise ValueError(f"{name}[{index}] must be a str; got {type(token).__name__}")
    if len(tokens) != length:
        raise ValueError(f"{name} has {len(tokens)} tokens but {what} is {length}")
    return list(tokens)


def check_index(value: object, name: str, size: int, what: str) -> int:
    """Require an int in [0, size) (`what` names the axis, e.g. "heads")."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int in [0, {size}); got {value!r}")
    if not 0 <= value < size:
        raise ValueError(f"{name} must be in [0, {size}) ({size} {what}); got {value}")
    return int(value)


def check_layer(layer: object, name: str = "layer") -> int:
    """Require a non-negative int layer index (the figure does not know how many layers exist)."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
        raise ValueError(f"{name} must be a non-negative int; got {layer!r}")
    return int(layer)


def check_name(value: object, name: str, accepted: Sequence[str]) -> str:
    """Require one of the `accepted` strings."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {list(accepted)}; got {value!r}")
    return str(value)


def check_positive(value: object, name: str) -> int:
    """Require a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


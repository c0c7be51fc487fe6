"""The inputs of a mask printout, checked and normalised: token strings, masks, padding, weights.

Shapes: b = sequences, p = query rows (new tokens), k = key columns (past + new), so a row i
sits at absolute position k - p + i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

SCALES = ("row", "absolute")  # weights divided by their row's max, or shown as they are


@dataclass
class Grid:
    sequences: list[list[str]]  # b lists of k token strings (column and row labels)
    panels: list[tuple[str, torch.Tensor]]  # (panel title, bool [b, p, k] True = may attend), side by side
    padding: torch.Tensor  # bool [b, k], True where the key is padding
    weights: torch.Tensor | None  # float [b, p, k] attention weights shading the single panel, or None
    scale: str = "row"

    @property
    def keys(self) -> int:
        return len(self.sequences[0])

    @property
    def queries(self) -> int:
        return self.panels[0][1].shape[1]

    @property
    def past(self) -> int:
        """Key columns before the first query row: the KV cache's length."""
        return self.keys - self.queries


def make_grid(tokens, mask, weights=None, attention_mask=None, scale: str = "row") -> Grid:
    """Check and normalise what the renderers take; ValueError naming the first thing that is wrong."""
    sequences = _sequences(tokens)
    keys = len(sequences[0])
    named = mask.items() if isinstance(mask, Mapping) else [("", mask)]
    panels = [(str(title), _as_bpk(value, "mask", len(sequences), keys).bool()) for title, value in named]
    if not panels:
        raise ValueError("mask is an empty mapping; pass a bool tensor [p, k] or {title: tensor}")
    shape = panels[0][1].shape
    for title, panel in panels:
        if panel.shape != shape:
            raise ValueError(f"mask panel {title!r} has shape {tuple(panel.shape)}, the first has {tuple(shape)}")
    if weights is not None:
        weights = _check_weights(weights, len(sequences), keys, shape, len(panels))
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return Grid(sequences, panels, _padding(attention_mask, len(sequences), keys), weights, scale)


def _sequences(tokens) -> list[list[str]]:
    """One list of token strings per sequence, all the same length."""
    if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not tokens:
        raise ValueError("tokens must be a non-empty list of token strings, or a list of such lists (a batch)")
    sequences = [list(tokens)] if all(isinstance(t, str) for t in tokens) else [list(s) for s in tokens]
    for index, sequence in enumerate(sequences):
        if not sequence or not all(isinstance(t, str) for t in sequence):
            raise ValueError(f"tokens[{index}] must be a non-empty list of strings, got {sequence!r:.80}")
        if len(sequence) != len(sequences[0]):
            raise ValueError(f"every sequence needs the same (padded) length: tokens[0] has {len(sequences[0])} "
                             f"tokens, tokens[{index}] has {len(sequence)}")
    return sequences


def _as_bpk(tensor, name: str, batch: int, keys: int) -> torch.Tensor:
    """[p, k], [b, p, k] or [b, 1, p, k] (build_mask's shape) -> [b, p, k] on the CPU, batch broadcast."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.dim() == 2:
        tensor = tensor[None]
    if tensor.dim() != 3:
        raise ValueError(f"{name} must be [p, k], [b, p, k] or [b, 1, p, k], got shape {tuple(tensor.shape)}")
    b, p, k = tensor.shape
    if k != keys:
        raise ValueError(f"{name} has {k} key columns but there are {keys} tokens; they must match")
    if not 0 < p <= k:
        raise ValueError(f"{name} has {p} query rows for {k} keys; need 1 <= rows <= keys")
    if b not in (1, batch):
        raise ValueError(f"{name} has batch size {b} but there are {batch} token sequences")
    return tensor.detach().cpu().expand(batch, p, k)


def _check_weights(weights, batch: int, keys: int, shape, panels: int) -> torch.Tensor:
    if panels != 1:
        raise ValueError(f"weights shade a single mask panel, got {panels} panels")
    weights = _as_bpk(weights, "weights", batch, keys).float()
    if weights.shape != shape:
        raise ValueError(f"weights have shape {tuple(weights.shape)} but the mask has {tuple(shape)}")
    return weights


def _padding(attention_mask, batch: int, keys: int) -> torch.Tensor:
    """bool [b, k] True at padding keys, from a 0/1 attention_mask [b, k] (None = no padding)."""
    if attention_mask is None:
        return torch.zeros(batch, keys, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask)
    if attention_mask.dim() == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != (batch, keys):
        raise ValueError(f"attention_mask must be [batch, keys] = [{batch}, {keys}], "
                         f"got shape {tuple(attention_mask.shape)}")
    return ~attention_mask.detach().cpu().bool()

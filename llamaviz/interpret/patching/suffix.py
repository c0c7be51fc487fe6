"""Patched copies that start at the patched position: what comes before it is the corrupted run's.

Attention is causal, so a cell patched at position p changes nothing before p. The copies of one
layer's sweep are packed into one sequence of their suffixes [p, T): each suffix attends to the
corrupted run's keys and values before p (kept from that run, per layer) and to its own keys, never
to another copy's. The layers and the unembedding then work on sum(T - p) rows instead of n * T, and
each copy's logits before p are the corrupted run's.

Used for the sweeps whose cells sit at one position (resid_*, attn_out, mlp_out, head q/k/v/z by
position); the all-position and pattern sweeps patch from position 0 and keep the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CorruptedRun:
    """What the packed copies reuse: per layer the corrupted resid_pre [b, T, m], rot_k and v [b, g, T, d]; logits."""

    resid: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [b, T, v]


class PrefixCache:
    """The attention's cache for packed copies: the corrupted keys/values of every position, then the packed ones."""

    def __init__(self, run: CorruptedRun):
        self.run = run

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value [b, g, Q, d] of the packed suffixes -> [b, g, T + Q, d]."""
        return (torch.cat([self.run.keys[layer], key], dim=2), torch.cat([self.run.values[layer], value], dim=2))


class PackedMask:
    """Which keys each packed query sees: the corrupted positions before its copy's start, and its own suffix so far.

    Offers what attention asks of a mask (dense() and for_sdpa()); keys are [T corrupted | Q packed].
    """

    is_plain = False

    def __init__(self, starts: list[int], length: int, window: int | None, device):
        copy = torch.cat([torch.full((length - s,), r, device=device) for r, s in enumerate(starts)])  # [Q]
        position = torch.cat([torch.arange(s, length, device=device) for s in starts])  # [Q] absolute
        start = torch.tensor(starts, device=device)[copy]  # [Q]
        prefix = torch.arange(length, device=device)[None] < start[:, None]  # [Q, T]: before the copy's start
        own = (copy[:, None] == copy[None]) & (position[None] <= position[:, None])  # [Q, Q]
        allowed = torch.cat([prefix, own], dim=1)
        if window is not None:
            keys = torch.cat([torch.arange(length, device=device), position])
            allowed &= position[:, None] - keys[None] < window
        self.positions = position
        self._dense = allowed[None, None]  # [1, 1, Q, T + Q]

    def dense(self) -> torch.Tensor:
        return self._dense

    def for_sdpa(self) -> torch.Tensor:
        return self._dense


def suffix_start(axes: tuple[str, ...], cell: tuple[int, ...]) -> int | None:
    """The position a cell is patched at (its copy can start there), or None when it patches every position."""
    return dict(zip(axes, cell)).get("pos")


@torch.no_grad()
def packed_logits(model, run: CorruptedRun, layer: int, name: str, patch_at, starts: list[int],
                  last_only: bool = False) -> tuple[torch.Tensor, list[int]]:
    """(logits [b, Q, v] of the packed suffixes of copies starting at `starts`, patched at `layer`; offsets).

    patch_at(activation, offsets) patches the packed activation of `name`; offsets[r] is where copy
    r's suffix (its patched position) sits in the packed sequence. last_only: logits [b, n, v] of
    each copy's last position only.
    """
    length = run.resid[layer].shape[1]
    decoder = model.model
    x = torch.cat([run.resid[layer][:, s:] for s in starts], dim=1)  # [b, Q, m]
    windows = model.config.layer_windows
    masks = {w: PackedMask(starts, length, w, x.device) for w in set(windows[layer:])}
    positions = next(iter(masks.values())).positions
    cos, sin = decoder.rotary_emb(positions[None], x.dtype)  # [1, Q, d]
    ends = torch.tensor([length - s for s in starts]).cumsum(0).tolist()  # where each suffix stops
    offsets = [0] + ends[:-1]
    cache = PrefixCache(run)
    with model.hooks(fwd_hooks=[(name, lambda activation, hook: patch_at(activation, offsets))]):
        for block, window in zip(decoder.layers[layer:], windows[layer:]):
            x, _ = block(x, cos, sin, masks[window], cache)
    if last_only:
        x = x[:, [end - 1 for end in ends]]  # [b, n, m]
    return model.lm_head(decoder.norm(x)), offsets


def copy_logits(run: CorruptedRun, packed: torch.Tensor, start: int, offset: int) -> torch.Tensor:
    """One copy's logits [b, T, v]: the corrupted run's before `start`, its packed suffix from there."""
    length = run.logits.shape[1]
    return torch.cat([run.logits[:, :start], packed[:, offset:offset + length - start]], dim=1)

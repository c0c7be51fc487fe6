"""Attention patterns computed when read, from the rotated queries/keys and the mask recipe.

A pattern is a function of rot_q [b, p, h, d], rot_k [b, k, g, d], the mask and the scale, so a
cache can keep those (linear in T) instead of [b, h, p, k] matrices (quadratic). Reading goes
through `masked_scores` / `softmax_pattern`, the eager path's own arithmetic, so the numbers equal
a captured pattern. One head or a window of queries computes only that head and those rows.
"""

from __future__ import annotations

import torch

from llamaviz.llama.attention import masked_scores, repeat_kv, softmax_pattern
from llamaviz.llama.hook_points import layer_of
from llamaviz.llama.masks import AttentionMask
from llamaviz.llama.rope import apply_rope

KINDS = {"hook_pattern": "pattern", "hook_attn_scores": "attn_scores"}


def unique_nbytes(tensors) -> int:
    """Bytes of the distinct tensors in `tensors` (one storage counted once)."""
    return sum({t.untyped_storage().data_ptr(): t.nbytes for t in tensors}.values())


def lazy_piece_names(layer: int) -> tuple[str, str]:
    """The hooks a lazy pattern of `layer` is computed from."""
    return f"blocks.{layer}.attn.hook_rot_q", f"blocks.{layer}.attn.hook_rot_k"


def query_window(queries, length: int) -> tuple[int, int]:
    """A slice (step 1) or an int of query rows -> (start, stop) inside 0..length; anything else raises."""
    if isinstance(queries, int) and not isinstance(queries, bool):
        index = queries + length if queries < 0 else queries
        if not 0 <= index < length:
            raise IndexError(f"query {queries} is outside the sequence of {length} positions")
        return index, index + 1
    if not isinstance(queries, slice) or queries.step not in (None, 1):
        raise TypeError(f"queries must be an int or a slice with step 1 (e.g. slice(0, 512)), got {queries!r}")
    start = 0 if queries.start is None else queries.start + (length if queries.start < 0 else 0)
    stop = length if queries.stop is None else queries.stop + (length if queries.stop < 0 else 0)
    if not 0 <= start < stop <= length:
        raise IndexError(f"query window {queries.start}:{queries.stop} is outside the sequence of {length} "
                         f"positions (accepted: 0 <= start < stop <= {length})")
    return start, stop


class StoredPieces:
    """One layer's rot_q [b, p, h, d] and rot_k [b, k, g, d] as captured."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor):
        self.q, self.k = q, k

    @property
    def queries(self) -> int:
        return self.q.shape[1]

    @property
    def heads(self) -> int:
        return self.q.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.k]

    def rot_q(self, start: int, stop: int, heads: slice) -> torch.Tensor:
        return self.q[:, start:stop, heads]  # [b, c, h', d]

    def rot_k(self, key_stop: int | None, groups: slice) -> torch.Tensor:
        return self.k[:, :key_stop, groups]  # [b, k', g', d]

    def to(self, device) -> "StoredPieces":
        return StoredPieces(self.q.to(device), self.k.to(device))

    def stored(self) -> "StoredPieces":
        return self


class ResidualPieces:
    """rot_q / rot_k recomputed from the layer's resid_pre [b, p, m] by its own norm, projections and RoPE.

    The cache then holds nothing beyond the residual stream it keeps anyway. The numbers are the
    forward's as long as no hook edited this layer's q / k / normalized input during the capture.
    """

    def __init__(self, layer, resid_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.layer, self.resid_pre, self.cos, self.sin = layer, resid_pre, cos, sin  # cos/sin [b|1, p, d]
        attn = layer.self_attn
        self.head_dim, self.heads, self.kv_heads = attn.head_dim, attn.num_heads, attn.kv_heads

    @property
    def queries(self) -> int:
        return self.resid_pre.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [self.resid_pre, self.cos, self.sin]  # resid_pre is usually the cache's own activation too

    def _rotated(self, proj, start: int, stop: int, heads: slice, count: int) -> torch.Tensor:
        """Rows start..stop-1 of proj(norm(resid_pre)), heads `heads` of `count`, rotated: [b, c, h', d]."""
        with torch.no_grad():
            x = self.layer.input_layernorm(self.resid_pre[:, start:stop])  # [b, c, m]
            first, last, _ = heads.indices(count)
            if (first, last) == (0, count):
                out = proj(x)  # the forward's own call
            else:
                rows = slice(first * self.head_dim, last * self.head_dim)
                bias = None if proj.bias is None else proj.bias[rows]
                out = torch.nn.functional.linear(x, proj.weight[rows], bias)
            out = out.view(*x.shape[:2], last - first, self.head_dim)
            out = self.layer.self_attn.qk_norm(out, "q" if proj is self.layer.self_attn.q_proj else "k")  # Qwen3
            return apply_rope(out, self.cos[:, start:stop], self.sin[:, start:stop])

    def rot_q(self, start: int, stop: int, heads: slice) -> torch.Tensor:
        return self._rotated(self.layer.self_attn.q_proj, start, stop, heads, self.heads)  # [b, c, h', d]

    def rot_k(self, key_stop: int | None, groups: slice) -> torch.Tensor:
        stop = self.queries if key_stop is None else min(key_stop, self.queries)
        return self._rotated(self.layer.self_attn.k_proj, 0, stop, groups, self.kv_heads)  # [b, k', g', d]

    def to(self, device) -> "ResidualPieces":
        return ResidualPieces(self.layer, self.resid_pre.to(device), self.cos.to(device), self.sin.to(device))

    def stored(self) -> StoredPieces:
        """The full rot_q / rot_k (for saving: a saved cache does not carry the model)."""
        every = slice(None)
        return StoredPieces(self.rot_q(0, self.queries, every), self.rot_k(None, every))


class LazyPatterns:
    """Per layer its rot_q / rot_k pieces (StoredPieces or ResidualPieces) plus one mask recipe; patterns on demand.

    `names` are the pattern-shaped hook names the capture asked for; each reads as the tensor the
    eager path would have produced. `batched=False` after remove_batch_dim (results drop dim 0).
    """

    def __init__(self, pieces: dict, mask: AttentionMask, scale: float, names: list[str], batched: bool = True):
        pieces = {layer: StoredPieces(*piece) if isinstance(piece, tuple) else piece for layer, piece in pieces.items()}
        self.pieces, self.mask, self.scale, self.batched = pieces, mask, scale, batched
        self.names = list(names)
        missing = [n for n in self.names if layer_of(n) not in self.pieces]
        if missing:
            raise ValueError(f"lazy patterns for {missing} have no rot_q/rot_k pieces")
        self.computed_heads = 0  # query heads computed so far: lets a test see that one head costs one head

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the pieces hold (shared ones, like the RoPE tables, may repeat)."""
        return [t for piece in self.pieces.values() for t in piece.tensors()]

    @property
    def nbytes(self) -> int:
        return unique_nbytes(self.tensors())

    def read(self, name: str) -> torch.Tensor:
        """The whole activation `name` ([b, h, p, k], or [h, p, k] without the batch dim)."""
        return self.compute(layer_of(name), KINDS[name.rsplit(".", 1)[-1]])

    def compute(self, layer: int, kind: str = "pattern", head: int | None = None, queries=slice(None),
                key_stop: int | None = None) -> torch.Tensor:
        """Pattern or scores of `layer`: [b, h, q, k], or [b, q, k] for one head (no b when unbatched).

        key_stop cuts the keys (for causal blocks, whose later keys are masked: mask.visible_keys).
        """
        if layer not in self.pieces:
            q_name, k_name = lazy_piece_names(layer)
            raise KeyError(f"no lazy pattern for layer {layer}: capture {q_name} and {k_name} (or the layer's "
                           f"hook_pattern with patterns='lazy'); layers held: {sorted(self.pieces)}")
        piece = self.pieces[layer]
        start, stop = query_window(queries, piece.queries)
        heads = piece.heads
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads):
            raise IndexError(f"head {head!r} is out of range; accepted: 0..{heads - 1}")
        groups = heads // piece.kv_heads
        if head is None:
            q = piece.rot_q(start, stop, slice(None)).transpose(1, 2)  # [b, h, c, d]
            k = repeat_kv(self._keys(piece.rot_k(key_stop, slice(None)), key_stop), groups)  # [b, h, k, d]
        else:
            group = head // groups
            q = piece.rot_q(start, stop, slice(head, head + 1)).transpose(1, 2)  # [b, 1, c, d]
            k = self._keys(piece.rot_k(key_stop, slice(group, group + 1)), key_stop)  # [b, 1, k, d]
        self.computed_heads += q.shape[1]
        with torch.no_grad():
            mask = self.mask.rows(start, stop, key_stop).to(q.device)  # [b|1, 1, q, k]
            result = masked_scores(q, k, mask, self.scale)
            if kind == "pattern":
                result = softmax_pattern(result, in_place=True)  # the scores are this call's own
            elif kind != "attn_scores":
                raise ValueError(f"kind must be 'pattern' or 'attn_scores', got {kind!r}")
        if head is not None:
            result = result[:, 0]
        return result if self.batched else result[0]

    def _keys(self, rot_k: torch.Tensor, key_stop: int | None) -> torch.Tensor:
        """rot_k [b, k', g, d] -> [b, g, keys, d] with keys = key_stop or key_length; a static cache's
        unwritten tail is zeros, as there."""
        k = rot_k.transpose(1, 2)
        missing = (self.mask.key_length if key_stop is None else key_stop) - k.shape[2]
        if missing > 0:
            k = torch.cat([k, k.new_zeros(*k.shape[:2], missing, k.shape[3])], dim=2)
        return k

    def to(self, device) -> "LazyPatterns":
        pieces = {layer: piece.to(device) for layer, piece in self.pieces.items()}
        return LazyPatterns(pieces, self.mask.to(device), self.scale, self.names, self.batched)

    def without_batch(self) -> "LazyPatterns":
        """For remove_batch_dim: results lose their batch dimension of 1."""
        batch = self.mask.attention_mask.shape[0] if self.mask.attention_mask is not None else (
            next(iter(self.pieces.values())).stored().q.shape[0] if self.pieces else 1)
        if not self.batched or batch != 1:
            raise ValueError(f"remove_batch_dim needs a batch of 1, the lazy patterns hold {batch}")
        return LazyPatterns(self.pieces, self.mask, self.scale, self.names, batched=False)

    # ----- saving: tensors under "lazy." names, the recipe in JSON -----

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for layer, piece in self.pieces.items():
            stored = piece.stored()
            tensors[f"lazy.{layer}.rot_q"], tensors[f"lazy.{layer}.rot_k"] = stored.q, stored.k
        if self.mask.attention_mask is not None:
            tensors["lazy.attention_mask"] = self.mask.attention_mask
        m = self.mask
        meta = {"names": self.names, "scale": self.scale, "batched": self.batched, "query_length": m.query_length,
                "past_length": m.past_length, "key_length": m.key_length, "sliding_window": m.sliding_window}
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "LazyPatterns":
        layers = {int(name.split(".")[1]) for name in tensors if name.endswith(".rot_q")}
        pieces = {layer: (tensors[f"lazy.{layer}.rot_q"], tensors[f"lazy.{layer}.rot_k"]) for layer in layers}
        mask = AttentionMask(meta["query_length"], meta["past_length"], tensors.get("lazy.attention_mask"),
                             meta["sliding_window"], meta["key_length"])
        return cls(pieces, mask, meta["scale"], meta["names"], meta["batched"])


def pattern_rows(cache, layer: int, start: int, stop: int, head: int | None = None,
                 visible_only: bool = True) -> torch.Tensor:
    """Rows start..stop-1 of a cache's pattern (lazy or stored): [b, h, c, k'], or [b, c, k'] for one head.

    With visible_only, a lazy block is computed over the keys its causal queries can see
    (k' = mask.visible_keys(stop) <= k; the later keys are exact zeros): half the work on average.
    """
    lazy = cache.lazy
    if lazy is not None and layer in lazy.pieces:
        key_stop = lazy.mask.visible_keys(stop) if visible_only else None
        block = lazy.compute(layer, "pattern", head, slice(start, stop), key_stop)
        return block if lazy.batched else block[None]
    block = cache.pattern(layer, head, slice(start, stop))
    return block if block.dim() == (4 if head is None else 3) else block[None]

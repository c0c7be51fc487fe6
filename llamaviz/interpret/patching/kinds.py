"""What each patching sweep patches: the activation, the axes it sweeps and where a cell sits in the tensor.

Shared by the exact sweeps and attribution patching, so both give the same shapes for the same name.
Axes after "layer": "pos" (a query position), "head" (a query head; a key/value head for k and v,
as TransformerLens does under grouped-query attention) and "dest_pos" (a pattern's query row).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PatchKind:
    act: str  # short activation name: get_act_name(act, layer)
    axes: tuple[str, ...]  # swept axes after the layer, in output order

    @property
    def pattern_shaped(self) -> bool:  # [b, h, q, k] rather than [b, p, ...]
        return self.act == "pattern"

    def index(self, cell: tuple[int, ...]) -> tuple:
        """Indexer of one cell into the activation, after the batch axis."""
        named = dict(zip(self.axes, cell))
        if self.pattern_shaped:
            return (named["head"],) + ((named["dest_pos"],) if "dest_pos" in named else ())
        if "head" in named:
            return (named.get("pos", slice(None)), named["head"])
        return (named["pos"],)


KINDS: dict[str, PatchKind] = {
    "resid_pre": PatchKind("resid_pre", ("pos",)),
    "resid_mid": PatchKind("resid_mid", ("pos",)),
    "attn_out": PatchKind("attn_out", ("pos",)),
    "mlp_out": PatchKind("mlp_out", ("pos",)),
    "attn_head_out_by_pos": PatchKind("z", ("pos", "head")),
    "attn_head_q_by_pos": PatchKind("q", ("pos", "head")),
    "attn_head_k_by_pos": PatchKind("k", ("pos", "head")),
    "attn_head_v_by_pos": PatchKind("v", ("pos", "head")),
    "attn_head_pattern_by_pos": PatchKind("pattern", ("head", "dest_pos")),
    "attn_head_out_all_pos": PatchKind("z", ("head",)),
    "attn_head_q_all_pos": PatchKind("q", ("head",)),
    "attn_head_k_all_pos": PatchKind("k", ("head",)),
    "attn_head_v_all_pos": PatchKind("v", ("head",)),
    "attn_head_pattern_all_pos": PatchKind("pattern", ("head",)),
}
BLOCK_EVERY = ("resid_pre", "attn_out", "mlp_out")
HEAD_EVERY = ("out", "q", "k", "v", "pattern")


def axis_sizes(config, positions: int, act: str) -> dict[str, int]:
    heads = config.num_key_value_heads if act in ("k", "v") else config.num_attention_heads
    return {"pos": positions, "dest_pos": positions, "head": heads}

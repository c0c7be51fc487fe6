"""Short activation names -> hook names, TransformerLens' `utils.get_act_name` rules and aliases.

    get_act_name("pattern", 3)          -> "blocks.3.attn.hook_pattern"
    get_act_name("scale", 2, "ln1")     -> "blocks.2.ln1.hook_scale"
    get_act_name("scale")               -> "ln_final.hook_scale"
    get_act_name("resid_pre", -1, n_layers=30) -> "blocks.29.hook_resid_pre"
"""

from __future__ import annotations

import re

_ATTN = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")
_MLP = ("pre", "pre_linear", "post")
_BLOCK = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_in")
_NORM = ("scale", "normalized")
_MODEL = ("embed", "logits")
ACT_NAME_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "scores": "attn_scores", "key": "k",
                    "query": "q", "value": "v", "mlp_pre": "pre", "mlp_post": "post", "mlp_pre_linear": "pre_linear",
                    "in": "resid_pre", "out": "resid_post"}  # in / out: a block's input and output
LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "attention": "attn", "b": "", "block": "", "blocks": ""}
SHORT_NAMES = (*_ATTN, *_MLP, *_BLOCK, *_NORM, *_MODEL, *ACT_NAME_ALIASES)


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None,
                 n_layers: int | None = None) -> str:
    """The full hook name of a short one; a full name (with a dot or 'hook_') is returned as it is."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    packed = re.fullmatch(r"([a-z_]+?)(\d+)([a-z0-9]*)", name)  # TransformerLens' "pattern3", "scale4ln1"
    if packed and layer is None and packed.group(1) in SHORT_NAMES:
        name, layer, layer_type = packed.group(1), int(packed.group(2)), packed.group(3) or None
    name = ACT_NAME_ALIASES.get(name, name)
    if name not in (*_ATTN, *_MLP, *_BLOCK, *_NORM, *_MODEL):
        raise KeyError(f"unknown activation name {name!r}; accepted short names: {', '.join(SHORT_NAMES)} "
                       "(or a full hook name such as 'blocks.0.attn.hook_pattern')")
    if name in _MODEL:
        return f"hook_{name}"
    if name in _NORM and layer is None:
        return f"ln_final.hook_{name}"
    if layer is None:
        raise KeyError(f"{name!r} needs a layer: get_act_name({name!r}, layer) or cache[{name!r}, layer]")
    layer = _layer_index(layer, n_layers)
    return f"blocks.{layer}.{_sublayer(name, layer_type)}hook_{name}"


def _sublayer(name: str, layer_type: str | None) -> str:
    if name in _ATTN:
        return "attn."
    if name in _MLP:
        return "mlp."
    if name in _NORM:
        kind = LAYER_TYPE_ALIASES.get(layer_type, layer_type) if layer_type else "ln1"
        if kind not in ("ln1", "ln2"):
            raise KeyError(f"{name!r} of a layer lives in 'ln1' or 'ln2', not {layer_type!r}")
        return f"{kind}."
    return ""


def _layer_index(layer, n_layers: int | None) -> int:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise KeyError(f"a layer must be an integer, got {layer!r}")
    if layer < 0:
        if n_layers is None:
            raise KeyError(f"negative layer {layer} needs the number of layers (a cache with its model)")
        if layer < -n_layers:
            raise KeyError(f"layer {layer} is out of range for {n_layers} layers; accepted: {-n_layers}..{n_layers - 1}")
        return layer + n_layers
    if n_layers is not None and layer >= n_layers:
        raise KeyError(f"layer {layer} is out of range for {n_layers} layers; accepted: {-n_layers}..{n_layers - 1}")
    return layer

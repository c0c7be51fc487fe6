"""The frozen replacement model of one prompt: attention patterns and norm scales fixed at their values on
the prompt, each MLP replaced by its transcoder's output with the features' activations fixed, plus an
error term (what the transcoder misses), the skip path left linear.

In it the residual stream is linear in the token embeddings and in whatever is added to each MLP's
output, so a feature's direct effect on a target is (activation x decoder row) . d target / d mlp_out,
exactly. `ReplacementRun` records the prompt once and then runs the frozen forward on copies of the
prompt (one target per copy), with leaf tensors added at hook_embed and every hook_mlp_out whose
gradients are those derivatives.
"""

from __future__ import annotations

import contextlib

import torch

from llamaviz.features.transcoder_set import TranscoderSet


class ReplacementRun:
    """The prompt's frozen pieces: patterns, scales, MLP inputs, feature activations and errors."""

    def __init__(self, model, transcoders: TranscoderSet, ids: torch.Tensor):
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise ValueError(f"attribute one prompt: ids must be [1, p], got {list(ids.shape)}")
        if len(transcoders) != model.config.num_hidden_layers:
            raise ValueError(f"the transcoder set has {len(transcoders)} layers; the model has "
                             f"{model.config.num_hidden_layers}")
        self.model, self.transcoders, self.ids = model, transcoders, ids
        self.layers = model.config.num_hidden_layers
        names = [n for n in model.hook_points() if n.endswith(("attn.hook_pattern", "hook_scale", "mlp.hook_in",
                                                                 "hook_mlp_out", "hook_embed"))]
        with torch.no_grad(), _eager(model):
            self.logits, cache = model.run_with_cache(ids, names_filter=names)
        self.frozen = {n: cache[n].detach() for n in names if not n.endswith(("mlp.hook_in", "hook_mlp_out"))}
        self.mlp_in = [cache[f"blocks.{L}.mlp.hook_in"][0] for L in range(self.layers)]  # [p, m] each
        self.acts, self.constant, self.error = [], [], []
        with torch.no_grad():
            for layer, tc in enumerate(transcoders):
                acts = tc.encode(self.mlp_in[layer])  # [p, d_tc]
                decoded = acts @ tc.W_dec + tc.b_dec  # [p, m]: the features' part, b_dec included
                skip = self.mlp_in[layer] @ tc.W_skip.T if hasattr(tc, "W_skip") else torch.zeros_like(decoded)
                self.acts.append(acts)
                self.constant.append(decoded)
                self.error.append(cache[f"blocks.{layer}.hook_mlp_out"][0] - decoded - skip)
        self.embed = cache["hook_embed"][0]  # [p, m]

    def forward(self, copies: int, additions: dict | None = None):
        """(logits [c, p, v], mlp_in list of [c, p, m], leaves {"embed": [c, p, m], layer: [c, p, m]}) of the frozen model.

        additions {layer: [c, p, m]} are added to those MLP outputs (a brute-force perturbation)."""
        model, p = self.model, self.ids.shape[1]
        like = {"dtype": self.embed.dtype, "device": self.embed.device, "requires_grad": True}
        leaves = {"embed": torch.zeros(copies, p, self.embed.shape[-1], **like)}
        leaves |= {layer: torch.zeros(copies, p, self.embed.shape[-1], **like) for layer in range(self.layers)}
        live_in: dict[int, torch.Tensor] = {}
        hooks = [(name, _constant(value)) for name, value in self.frozen.items() if name != "hook_embed"]
        hooks.append(("hook_embed", lambda x, hook: x + leaves["embed"]))
        for layer, tc in enumerate(self.transcoders):
            hooks.append((f"blocks.{layer}.mlp.hook_in", _keep(live_in, layer)))
            hooks.append((f"blocks.{layer}.hook_mlp_out", self._mlp_out(layer, tc, live_in, leaves, additions or {})))
        with _eager(model), model.hooks(fwd_hooks=hooks):
            logits = model(self.ids.expand(copies, -1), return_type="logits")
        return logits, [live_in[layer] for layer in range(self.layers)], leaves

    def _mlp_out(self, layer: int, tc, live_in: dict, leaves: dict, additions: dict):
        def replace(out, hook):
            value = self.constant[layer] + self.error[layer] + leaves[layer]
            if hasattr(tc, "W_skip"):
                value = value + live_in[layer] @ tc.W_skip.T  # the skip path stays linear and live
            return value + additions[layer] if layer in additions else value

        return replace


def _constant(value: torch.Tensor):
    def frozen(x, hook):
        return value.expand_as(x) if value.shape[0] == 1 else value

    return frozen


def _keep(store: dict, layer: int):
    def keep(x, hook):
        store[layer] = x
        return x

    return keep


@contextlib.contextmanager
def _eager(model):
    """Every layer on the written-out attention path, so a replaced pattern is the one the values see."""
    layers = model.model.layers
    saved = [layer.self_attn.attn_implementation for layer in layers]
    try:
        for layer in layers:
            layer.self_attn.attn_implementation = "eager"
        yield
    finally:
        for layer, name in zip(layers, saved):
            layer.self_attn.attn_implementation = name

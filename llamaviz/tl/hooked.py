"""HookedTransformer: TransformerLens' module paths and forward over the same llamaviz model.

The model keeps transformers' module tree (`model.layers[i].self_attn.q_proj`); TransformerLens
scripts reach hook points as `model.blocks[L].attn.hook_z` and call `model(tokens)` for logits.
This face holds the model (no second copy of the weights) and exposes the very HookPoint objects
under TransformerLens' paths; its forward is the model's with return_type="logits" by default.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from llamaviz.llama.hook_points import HookPoint
from llamaviz.tl.conveniences import FaceConfig, TransformerLensDefaults, unembed_bias

# weights of one layer under TransformerLens' names -> the model's stacked [L, ...] property
_ATTN_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
_MLP_WEIGHTS = {"W_gate": "W_gate", "W_in": "W_in", "W_out": "W_out", "b_in": "b_in", "b_out": "b_out"}


class HookNamespace(nn.Module):
    """One level of TransformerLens' tree (a block, its attn / mlp / ln1 / ln2, ln_final): its hook
    points as attributes, and the layer's weights read from the model's stacked views."""

    def __init__(self, model, prefix: str, layer: int | None = None, weights: dict[str, str] | None = None):
        super().__init__()
        self._model_ref = (model,)  # a tuple: not registered, so parameters are not listed twice
        self._layer, self._weights = layer, weights or {}
        for name, hook in model.hook_points().items():
            rest = name.removeprefix(prefix)
            if name.startswith(prefix) and "." not in rest:
                self.add_module(rest, hook)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            weights = self.__dict__.get("_weights", {})
            if name in weights:
                stacked = getattr(self.__dict__["_model_ref"][0], weights[name])
                return stacked if self.__dict__["_layer"] is None else stacked[self.__dict__["_layer"]]
            raise


class Block(HookNamespace):
    """blocks[L]: hook_resid_pre/mid/post, hook_attn_out, hook_mlp_out, and .attn .mlp .ln1 .ln2."""

    def __init__(self, model, layer: int):
        super().__init__(model, f"blocks.{layer}.", layer)
        self.attn = HookNamespace(model, f"blocks.{layer}.attn.", layer, {w: w for w in _ATTN_WEIGHTS})
        self.mlp = HookNamespace(model, f"blocks.{layer}.mlp.", layer, _MLP_WEIGHTS)
        self.ln1 = HookNamespace(model, f"blocks.{layer}.ln1.", layer)
        self.ln2 = HookNamespace(model, f"blocks.{layer}.ln2.", layer)


class HookedTransformer(TransformerLensDefaults, nn.Module):
    """TransformerLens' HookedTransformer API on a llamaviz LlamaForCausalLM (or a family member).

    `HookedTransformer.from_pretrained(path)` (None = the default model) or `HookedTransformer(model)`
    around a model from llamaviz.load. Everything TransformerLens has on the model itself
    (run_with_cache, run_with_hooks, hooks, to_tokens, W_Q, generate, ...) is the model's own, called
    with TransformerLens' defaults where they differ (BOS prepended to text: cfg.default_prepend_bos;
    generate samples): see llamaviz/tl/conveniences.py.
    """

    def __init__(self, model):
        super().__init__()
        if not hasattr(model, "hook_points") or not hasattr(model, "lm_head"):
            raise TypeError(f"HookedTransformer wraps a llamaviz causal LM (llamaviz.load's model); "
                            f"got {type(model).__name__}")
        self.lm = model  # named lm: `face.model` is then the model's own LlamaModel, as code written for it expects
        self.cfg = FaceConfig(model.config, model)
        self.blocks = nn.ModuleList(Block(model, layer) for layer in range(model.config.num_hidden_layers))
        self.ln_final = HookNamespace(model, "ln_final.")
        self.embed = _Weights(model, {"W_E": "W_E"})
        self.unembed = _Weights(model, {"W_U": "W_U", "b_U": unembed_bias})

    @classmethod
    def from_pretrained(cls, path=None, **kwargs) -> HookedTransformer:
        """The checkpoint at `path` (a folder or .gguf; None = the default model); kwargs as for llamaviz.load."""
        from llamaviz.run.loading import load

        model, _ = load(path, **kwargs)
        return cls(model.eval())

    def forward(self, input, return_type: str | None = "logits", *, prepend_bos: bool | None = None,
                padding_side: str | None = None, stop_at_layer: int | None = None, **kwargs):
        """TransformerLens' forward: tokens [b, p] or text in; logits [b, p, v] by default, or "loss",
        "both", None; stop_at_layer=L gives the residual stream entering block L."""
        return self.lm(input, return_type=return_type, prepend_bos=self._bos(prepend_bos),
                       padding_side=self._side(padding_side), stop_at_layer=stop_at_layer, **kwargs)

    @property
    def hook_embed(self) -> HookPoint:
        return self.lm.hook_points()["hook_embed"]

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return self.lm.hook_points()

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("lm"), name)

    def __repr__(self) -> str:
        return f"HookedTransformer({type(self.lm).__name__}, {self.lm.config.num_hidden_layers} blocks)"


class _Weights(nn.Module):
    """model.embed / model.unembed: their weights (W_E, W_U, b_U: zeros without a bias) from the model's views."""

    def __init__(self, model, weights: dict[str, str]):
        super().__init__()
        self._model_ref, self._weights = (model,), weights

    def __getattr__(self, name: str):
        weights = self.__dict__.get("_weights", {})
        if name in weights:
            model, source = self.__dict__["_model_ref"][0], weights[name]
            return source(model) if callable(source) else getattr(model, source)
        return super().__getattr__(name)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.__dict__["_model_ref"][0]
        if "W_E" in self.__dict__["_weights"]:
            return model.model.embed_tokens(tokens)
        return model.lm_head(tokens)


class HookedSAETransformer(HookedTransformer):
    """SAELens's HookedSAETransformer API on the face: add_sae / reset_saes / saes() / run_with_saes /
    run_with_cache_with_saes, through llamaviz.features.attached (the SAEs' hook points join the model's)."""

    def __init__(self, model):
        super().__init__(model)
        self._attached: list = []
        self._stack = contextlib.ExitStack()

    def add_sae(self, sae, use_error_term: bool = False):
        """Attach `sae` until reset_saes()."""
        from llamaviz.features import attached

        self._stack.enter_context(attached(self.lm, sae, use_error_term=use_error_term))
        self._attached.append(sae)
        return sae

    def reset_saes(self) -> None:
        self._stack.close()
        self._stack, self._attached = contextlib.ExitStack(), []

    @property
    def acts_to_saes(self) -> dict:
        return {sae.cfg.hook_name: sae for sae in self._attached}

    @contextlib.contextmanager
    def saes(self, saes=(), use_error_term: bool = False):
        """Attach `saes` for the block only."""
        from llamaviz.features import attached

        with attached(self.lm, *saes, use_error_term=use_error_term):
            yield self

    def run_with_saes(self, input, saes=(), use_error_term: bool = False, **kwargs):
        with self.saes(saes, use_error_term):
            return self(input, **kwargs)

    def run_with_cache_with_saes(self, input, saes=(), use_error_term: bool = False, **kwargs):
        with self.saes(saes, use_error_term):
            return self.run_with_cache(input, **kwargs)

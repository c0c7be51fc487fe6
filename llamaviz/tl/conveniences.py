"""TransformerLens' defaults on the face: BOS prepended to text, sampled generation, loss_fn, tl_named_parameters.

The model's own methods follow its tokenizer (SmolLM2 adds no BOS) and transformers (greedy
unless do_sample=True); a TransformerLens script expects `cfg.default_prepend_bos` (True) and
TransformerLens' generate (sampling, text in and text out). These wrappers pass TransformerLens'
defaults to the very same methods; nothing is computed twice.
"""

from __future__ import annotations

from typing import Iterator

import torch

from llamaviz.llama.conveniences import ConfigView
from llamaviz.llama.outputs import next_token_loss

GENERATE_RETURN_TYPES = ("input", "str", "tokens")


class FaceConfig(ConfigView):
    """The model's cfg plus TransformerLens' settable `default_prepend_bos` (True) and `default_padding_side` ("right")."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.default_prepend_bos = True
        self.default_padding_side = "right"


def _is_text(input) -> bool:
    return isinstance(input, str) or (isinstance(input, (list, tuple)) and bool(input)
                                      and all(isinstance(t, str) for t in input))


class TransformerLensDefaults:
    """Mixed into HookedTransformer; `self.lm` is the model, `self.cfg` a FaceConfig."""

    def _bos(self, prepend_bos: bool | None) -> bool:
        return self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos

    def _side(self, padding_side: str | None) -> str:
        return self.cfg.default_padding_side if padding_side is None else padding_side

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = False) -> torch.Tensor:
        """Token ids [b, p]; BOS first unless prepend_bos=False (cfg.default_prepend_bos), a batch padded on the right."""
        return self.lm.to_tokens(input, self._bos(prepend_bos), self._side(padding_side), move_to_device, truncate)

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None):
        return self.lm.to_str_tokens(input, self._bos(prepend_bos), self._side(padding_side))

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None) -> int:
        return self.lm.get_token_position(single_token, input, mode, self._bos(prepend_bos))

    def run_with_cache(self, input, *args, prepend_bos: bool | None = None, padding_side: str | None = None,
                       **kwargs):
        return self.lm.run_with_cache(input, *args, prepend_bos=self._bos(prepend_bos),
                                      padding_side=self._side(padding_side), **kwargs)

    def run_with_hooks(self, input, *args, prepend_bos: bool | None = None, padding_side: str | None = None,
                       **kwargs):
        return self.lm.run_with_hooks(input, *args, prepend_bos=self._bos(prepend_bos),
                                      padding_side=self._side(padding_side), **kwargs)

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """-log p(tokens[i + 1]) from logits[i]: [b, p - 1] with per_token, else the mean."""
        return next_token_loss(logits, tokens, attention_mask, per_token)

    def generate(self, input="", max_new_tokens: int = 10, stop_at_eos: bool = True, eos_token_id=None,
                 do_sample: bool = True, top_k: int | None = None, top_p: float | None = None,
                 temperature: float = 1.0, freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                 prepend_bos: bool | None = None, padding_side: str | None = None, return_type: str = "input",
                 verbose: bool = True, **kwargs):
        """TransformerLens' generate: samples by default; text in gives text out (the prompt's too, special
        tokens dropped) unless return_type="tokens". A KV cache is always used (use_past_kv_cache only
        chooses speed in TransformerLens; the tokens are the same)."""
        if return_type not in GENERATE_RETURN_TYPES:
            raise ValueError(f"return_type {return_type!r} is not supported; accepted: {', '.join(GENERATE_RETURN_TYPES)}")
        if freq_penalty:
            raise ValueError(f"freq_penalty={freq_penalty} is not supported; use repetition_penalty= instead")
        text = _is_text(input)
        ids, mask = self.lm.text_input(input, kwargs.pop("attention_mask", None), self._bos(prepend_bos),
                                       padding_side)
        eos = [] if not stop_at_eos else eos_token_id
        out = self.lm.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                               top_k=top_k, top_p=top_p, temperature=temperature, eos_token_id=eos, **kwargs)
        if return_type == "tokens" or (return_type == "input" and not text):
            return out
        decoded = [self.lm.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in out]
        return decoded[0] if len(decoded) == 1 else decoded

    def tl_named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(TransformerLens name, tensor) of every weight, TransformerLens' shapes; absent biases are zeros."""
        lm = self.lm
        yield "embed.W_E", lm.W_E
        names = {**_BLOCK_WEIGHTS, **({"b_gate": "mlp"} if lm._has_bias("b_gate") else {})}
        stacked = {name: _stacked_or_zeros(lm, name) for name in names}
        for layer, block in enumerate(lm.model.layers):
            for name, part in names.items():
                yield f"blocks.{layer}.{part}.{name}", stacked[name][layer]
            yield f"blocks.{layer}.ln1.w", block.input_layernorm.weight.detach()
            yield f"blocks.{layer}.ln2.w", block.post_attention_layernorm.weight.detach()
        yield "ln_final.w", lm.model.norm.weight.detach()
        yield "unembed.W_U", lm.W_U
        yield "unembed.b_U", unembed_bias(lm)


# TransformerLens' order within a block; the gate's bias is listed only when the model has one
_BLOCK_WEIGHTS = {"W_Q": "attn", "W_K": "attn", "W_V": "attn", "W_O": "attn", "b_Q": "attn", "b_K": "attn",
                  "b_V": "attn", "b_O": "attn", "W_in": "mlp", "W_out": "mlp", "b_in": "mlp", "b_out": "mlp",
                  "W_gate": "mlp"}
_ZERO_SHAPES = {"b_Q": ("n_heads", "d_head"), "b_K": ("n_heads", "d_head"), "b_V": ("n_heads", "d_head"),
                "b_O": ("d_model",), "b_in": ("d_mlp",), "b_out": ("d_model",)}


def _stacked_or_zeros(lm, name: str) -> torch.Tensor:
    if not name.startswith("b_") or lm._has_bias(name):
        return getattr(lm, name)
    cfg = lm.cfg
    shape = [cfg.n_layers, *(getattr(cfg, dim) for dim in _ZERO_SHAPES[name])]
    return torch.zeros(shape, dtype=lm.dtype, device=lm.device)


def unembed_bias(lm) -> torch.Tensor:
    """unembed.b_U [v]: the lm_head's bias, zeros when it has none (as TransformerLens gives)."""
    bias = lm.lm_head.bias
    return bias.detach() if bias is not None else torch.zeros(lm.config.vocab_size, dtype=lm.dtype, device=lm.device)

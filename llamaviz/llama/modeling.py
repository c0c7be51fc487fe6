"""The Llama decoder: RMSNorm, SwiGLU MLP, decoder layer, LlamaModel and LlamaForCausalLM.

The module tree and state-dict keys are those of transformers' LlamaForCausalLM, so checkpoints
load without renaming. Every interesting activation passes through a named HookPoint.
Shapes: b batch, p query positions, k key positions, h query heads, g kv heads, d head_dim,
m hidden_size, f intermediate_size, v vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaviz.llama.capture import CachingMixin
from llamaviz.llama.attention import LlamaAttention
from llamaviz.llama.cache import DynamicCache
from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.conveniences import TransformerLensMixin
from llamaviz.llama.hook_points import HookedRootModule, HookPoint
from llamaviz.llama.masks import AttentionMask
from llamaviz.llama.pretrained import provided
from llamaviz.llama.outputs import HF_OUTPUT, BaseModelOutput, CausalLMOutput, causal_lm_loss, check_return_type, tl_output
from llamaviz.llama.quantize import quantization_request, quantize_model
from llamaviz.llama.rope import RotaryEmbedding, default_position_ids, rotary_embedding

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class LlamaRMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32.

    hook_scale sees rms(x) = sqrt(mean(x^2) + eps) [b, p, 1] (TransformerLens' convention: the
    normalized stream is x / scale, so a cached scale can be frozen and reapplied to any stack of
    residual components); hook_normalized sees x / rms(x) before the weight.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.hook_scale = HookPoint()  # [b, p, 1] rms(x)
        self.hook_normalized = HookPoint()  # [b, p, m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hook_scale.active:  # written out, so a hook can read or replace the scale
            x32 = x.float()
            scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())  # [b, p, 1]
            normalized = (x32 / scale.float()).to(x.dtype)
        else:
            normalized = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)  # x * rsqrt(mean(x^2) + eps)
        return self.weight * self.hook_normalized(normalized)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        m, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(m, f, bias=bias)
        self.up_proj = nn.Linear(m, f, bias=bias)
        self.down_proj = nn.Linear(f, m, bias=bias)
        self.hook_in = HookPoint()  # [b, p, m] what the MLP reads: ln2's output, its weight applied
        self.hook_pre = HookPoint()  # [b, p, f] gate_proj output, before SiLU
        self.hook_pre_linear = HookPoint()  # [b, p, f] up_proj output
        self.hook_post = HookPoint()  # [b, p, f] silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_in(x)
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(F.silu(gate) * up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, attn_implementation: str,
                 attention_class: type[LlamaAttention] = LlamaAttention):
        super().__init__()
        self.self_attn = attention_class(config, layer_idx, attn_implementation)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_resid_pre = HookPoint()  # [b, p, m]
        self.hook_attn_out = HookPoint()  # [b, p, m]
        self.hook_resid_mid = HookPoint()  # [b, p, m]
        self.hook_mlp_in = HookPoint()  # [b, p, m] the residual stream entering ln2 and the MLP
        self.hook_mlp_out = HookPoint()  # [b, p, m]
        self.hook_resid_post = HookPoint()  # [b, p, m]

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None, output_attentions=False):
        """x [b, p, m] -> (x [b, p, m], pattern [b, h, p, k] or None)."""
        resid_pre = self.hook_resid_pre(x)
        attn_out, pattern = self.self_attn(self.input_layernorm(resid_pre), cos, sin, mask, cache,
                                           output_attentions)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_in = self.hook_mlp_in(resid_mid)
        mlp_out = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out), pattern


class LlamaPreTrainedModel(CachingMixin, HookedRootModule):
    """What every Llama model shares: config, init, loading, saving, dtype and device."""

    config: LlamaConfig
    name_or_path: str = ""

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def post_load(self) -> None:
        """After weights were filled in on the meta device: recompute RoPE tables, tie embeddings."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        pass

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, attn_implementation: str = "sdpa",
                        quantization: str | None = None, group_size: int | None = None,
                        quantization_config=None, **kwargs):
        """Load a HF folder, a .gguf file or a folder holding one (readers in llamaviz.checkpoints).

        quantization="int4" | "int8" then stores the linear weights as per-group integer codes
        (see llamaviz.llama.quantize; group_size=None picks one, any other size >= 1 fits every layer).
        quantization_config=TorchAoConfig("int4_weight_only", group_size=128) says the same in
        transformers' spelling.
        """
        # checked before the slow load
        quantization, group_size = quantization_request(quantization, group_size, quantization_config)
        if quantization is not None and kwargs.get("tp_plan") is not None:
            raise ValueError("quantization= and tp_plan= cannot be combined: the integer codes are not "
                             "sharded; load in bfloat16/float16 with tp_plan, or quantize without it")
        model = provided("load_pretrained")(cls, path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                **kwargs)
        return quantize_model(model, quantization, group_size) if quantization is not None else model

    def save_pretrained(self, folder, **kwargs):
        """Write model.safetensors + config.json that transformers can read."""
        return provided("save_pretrained")(self, folder, **kwargs)


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is not supported; accepted: {', '.join(ATTN_IMPLEMENTATIONS)}")
    return name


class LlamaModel(LlamaPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns the last hidden state."""

    attention_class: type[LlamaAttention] = LlamaAttention  # a variant (llama.variants) swaps in its own

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        check_attn_implementation(attn_implementation)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, attn_implementation, self.attention_class)
                                    for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = rotary_embedding(config)
        self.hook_embed = HookPoint()  # [b, p, m]
        self.apply(self._init_weights)
        self.setup_hooks()

    def _hook_names(self) -> dict[str, HookPoint]:
        names = {"hook_embed": self.hook_embed}
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            names.update({
                f"blocks.{i}.hook_resid_pre": layer.hook_resid_pre,
                f"blocks.{i}.ln1.hook_scale": layer.input_layernorm.hook_scale,
                f"blocks.{i}.ln1.hook_normalized": layer.input_layernorm.hook_normalized,
                **{f"blocks.{i}.attn.hook_{n}": getattr(attn, f"hook_{n}")
                   for n in attn.hook_suffixes},
                f"blocks.{i}.hook_attn_out": layer.hook_attn_out,
                f"blocks.{i}.hook_resid_mid": layer.hook_resid_mid,
                f"blocks.{i}.hook_mlp_in": layer.hook_mlp_in,
                f"blocks.{i}.ln2.hook_scale": layer.post_attention_layernorm.hook_scale,
                f"blocks.{i}.ln2.hook_normalized": layer.post_attention_layernorm.hook_normalized,
                f"blocks.{i}.mlp.hook_in": mlp.hook_in,
                f"blocks.{i}.mlp.hook_pre": mlp.hook_pre,
                f"blocks.{i}.mlp.hook_pre_linear": mlp.hook_pre_linear,
                f"blocks.{i}.mlp.hook_post": mlp.hook_post,
                f"blocks.{i}.hook_mlp_out": layer.hook_mlp_out,
                f"blocks.{i}.hook_resid_post": layer.hook_resid_post,
            })
        names["ln_final.hook_scale"] = self.norm.hook_scale
        names["ln_final.hook_normalized"] = self.norm.hook_normalized
        return names

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_attentions=False, output_hidden_states=False, inputs_embeds=None,
                start_at_layer: int | None = None, stop_at_layer: int | None = None) -> BaseModelOutput:
        """Embed (or, with start_at_layer, take the residual stream [b, p, m] as input), run the layers, norm.

        stop_at_layer=L returns the residual stream entering layer L un-normed (TransformerLens' semantics:
        exclusive, negative counts from the end).
        """
        start, stop = self.layer_range(start_at_layer, stop_at_layer)
        if start_at_layer is None:
            x = self.hook_embed(self.embed(input_ids, inputs_embeds))  # [b, p, m]
        else:
            x = self._residual_input(input_ids if input_ids is not None else inputs_embeds)
        b, p = x.shape[:2]
        cache = past_key_values if past_key_values is not None else (DynamicCache() if use_cache else None)
        past = cache.get_seq_length() if cache is not None else 0
        self._check_length(past + p)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, p, x.device)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # [b, p, d] each
        windows = self.config.layer_windows  # one mask per distinct window (Qwen2 mixes full and sliding layers)
        masks = {w: AttentionMask(p, past, attention_mask, w, getattr(cache, "key_length", None), x.device)
                 for w in set(windows)}
        hidden, attentions = [], []
        for layer, window in zip(self.layers[start:stop], windows[start:stop]):
            if output_hidden_states:
                hidden.append(x)
            x, pattern = layer(x, cos, sin, masks[window], cache, output_attentions)
            if output_attentions:
                attentions.append(pattern)
        if stop_at_layer is None:
            x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return BaseModelOutput(last_hidden_state=x, past_key_values=cache if use_cache or past_key_values else None,
                               hidden_states=tuple(hidden) if output_hidden_states else None,
                               attentions=tuple(attentions) if output_attentions else None)

    def layer_range(self, start_at_layer: int | None, stop_at_layer: int | None) -> tuple[int, int]:
        """(start, stop) block indices from TransformerLens' start_at_layer / stop_at_layer (negatives count back)."""
        layers = self.config.num_hidden_layers
        bounds = []
        for name, value, default in (("start_at_layer", start_at_layer, 0), ("stop_at_layer", stop_at_layer, layers)):
            if value is None:
                bounds.append(default)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not -layers <= value <= layers:
                raise ValueError(f"{name}={value!r} is out of range for a model of {layers} layers; "
                                 f"accepted: an integer from {-layers} to {layers}")
            bounds.append(value + layers if value < 0 else value)
        if bounds[0] > bounds[1]:
            raise ValueError(f"start_at_layer ({start_at_layer}) comes after stop_at_layer ({stop_at_layer})")
        return bounds[0], bounds[1]

    def _residual_input(self, resid) -> torch.Tensor:
        m = self.config.hidden_size
        if not isinstance(resid, torch.Tensor) or not resid.is_floating_point() or resid.dim() != 3 \
                or resid.shape[-1] != m:
            got = tuple(resid.shape) if isinstance(resid, torch.Tensor) else type(resid).__name__
            raise ValueError(f"with start_at_layer the input is the residual stream, a float tensor "
                             f"[batch, positions, {m}]; got {got}")
        return resid

    def embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [b, p] and inputs_embeds [b, p, m]")
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, positions] with at least one position, "
                             f"got shape {tuple(input_ids.shape)}")
        return self.embed_tokens(input_ids)

    def _check_length(self, total: int) -> None:
        limit = self.config.max_position_embeddings
        if total > limit and self.config.rope_type != "dynamic":
            raise ValueError(f"sequence of {total} tokens is longer than the model's context of {limit} "
                             "(config.max_position_embeddings)")


class LlamaForCausalLM(TransformerLensMixin, LlamaPreTrainedModel):
    """LlamaModel + lm_head: next-token logits [b, p, v] and the language-modelling loss.

    Also TransformerLens' model API: to_tokens / to_str_tokens / W_Q ... (llama.conveniences),
    return_type / start_at_layer / stop_at_layer on forward, logits from run_with_hooks.
    """

    tl_return_type = "logits"

    base_model_class: type[LlamaModel] = LlamaModel  # a variant (llama.variants) swaps in its own

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.model = self.base_model_class(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.hook_logits = HookPoint()  # [b, p, v]
        self._init_weights(self.lm_head)
        self.tie_weights()
        self.setup_hooks()

    def _hook_names(self) -> dict[str, HookPoint]:
        return {**self.model._hook_names(), "hook_logits": self.hook_logits}

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_attentions=False, output_hidden_states=False, labels=None,
                inputs_embeds=None, logits_to_keep: int = 0, return_dict: bool | None = None, *,
                return_type: str | None = HF_OUTPUT, loss_per_token: bool = False,
                start_at_layer: int | None = None, stop_at_layer: int | None = None, tokens=None,
                prepend_bos: bool | None = None, padding_side: str | None = None):
        """transformers' forward (a CausalLMOutput), or TransformerLens' when return_type is given.

        input_ids may be text or a list of texts (tokenized by to_tokens). return_type="logits" |
        "loss" | "both" | None returns the logits [b, p, v], the next-token loss (per token with
        loss_per_token), both, or nothing; stop_at_layer returns the residual stream [b, p, m].
        """
        return_type = check_return_type(return_type)
        input_ids, attention_mask = self.text_input(input_ids, attention_mask, prepend_bos, padding_side)
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                         output_attentions, output_hidden_states, inputs_embeds, start_at_layer, stop_at_layer)
        if stop_at_layer is not None:
            return out.last_hidden_state  # the residual stream entering layer stop_at_layer
        x = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        logits = self.hook_logits(self.lm_head(x))  # [b, p, v]
        if return_type != HF_OUTPUT:
            tokens = tokens if tokens is not None else (input_ids if start_at_layer is None else None)
            return tl_output(logits, return_type, tokens, attention_mask, loss_per_token)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        output = CausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                hidden_states=out.hidden_states, attentions=out.attentions)
        return output.to_tuple() if return_dict is False else output

    def generate(self, input_ids=None, prepend_bos: bool | None = None, padding_side: str | None = None,
                 stop_at_eos: bool = True, verbose: bool = False, **kwargs):
        """Greedy or sampled continuation with a KV cache; see llamaviz.run.generation.generate.

        Text in, text out (prompt + continuation), as TransformerLens' generate; ids in, ids out.
        stop_at_eos=False keeps going past the end-of-sequence token. Sampling stays opt-in
        (do_sample=True), as in transformers.
        """
        text = isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and bool(input_ids)
                                              and all(isinstance(t, str) for t in input_ids))
        input_ids, mask = self.text_input(input_ids, kwargs.pop("attention_mask", None), prepend_bos, padding_side)
        if not stop_at_eos:
            kwargs["eos_token_id"] = []
        out = provided("generate")(self, input_ids, attention_mask=mask, **kwargs)
        if not text:
            return out
        decoded = self.to_string(out)
        return decoded[0] if isinstance(decoded, list) and len(decoded) == 1 else decoded

    def generate_with_cache(self, input_ids=None, **kwargs):
        """generate() that also returns an ActivationCache of the whole sequence."""
        return provided("generate_with_cache")(self, input_ids, **kwargs)

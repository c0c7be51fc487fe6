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

from .capture import CachingMixin
from .attention import LlamaAttention
from .cache import DynamicCache
from .config import LlamaConfig
from .hook_points import HookedRootModule, HookPoint
from .masks import AttentionMask
from .outputs import BaseModelOutput, CausalLMOutput
from .quantize import check_quantization, quantize_model
from .rope import RotaryEmbedding, rotary_embedding

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


class LlamaRMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32; hook_normalized sees x / rms(x) before the weight."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.hook_normalized = HookPoint()  # [b, p, m]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        self.hook_pre = HookPoint()  # [b, p, f] gate_proj output, before SiLU
        self.hook_pre_linear = HookPoint()  # [b, p, f] up_proj output
        self.hook_post = HookPoint()  # [b, p, f] silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.hook_pre(self.gate_proj(x))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(F.silu(gate) * up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int, attn_implementation: str):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, attn_implementation)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_resid_pre = HookPoint()  # [b, p, m]
        self.hook_attn_out = HookPoint()  # [b, p, m]
        self.hook_resid_mid = HookPoint()  # [b, p, m]
        self.hook_mlp_out = HookPoint()  # [b, p, m]
        self.hook_resid_post = HookPoint()  # [b, p, m]

    def forward(self, x, cos, sin, mask: AttentionMask, cache=None, output_attentions=False):
        """x [b, p, m] -> (x [b, p, m], pattern [b, h, p, k] or None)."""
        resid_pre = self.hook_resid_pre(x)
        attn_out, pattern = self.self_attn(self.input_layernorm(resid_pre), cos, sin, mask, cache,
                                           output_attentions)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out), pattern


def default_position_ids(attention_mask: torch.Tensor | None, past_length: int, query_length: int,
                         device) -> torch.Tensor:
    """[b|1, p] positions: counted over non-padding tokens when a mask is given (left padding)."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + query_length, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -query_length:]


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
                        quantization: str | None = None, group_size: int | None = None, **kwargs):
        """Load a HF folder, a .gguf file or a folder holding one (readers in llamaviz.checkpoints).

        quantization="int4" | "int8" then stores the linear weights as per-group integer codes
        (see llamaviz.llama.quantize; group_size=None picks one that divides every layer).
        """
        from llamaviz.checkpoints import load_pretrained  # readers live outside the pure-torch model package

        if quantization is not None:
            check_quantization(quantization)  # fail before the slow load
        model = load_pretrained(cls, path, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                **kwargs)
        return quantize_model(model, quantization, group_size) if quantization is not None else model

    def save_pretrained(self, folder, **kwargs):
        """Write model.safetensors + config.json that transformers can read."""
        from llamaviz.checkpoints import save_pretrained

        return save_pretrained(self, folder, **kwargs)


def check_attn_implementation(name: str) -> str:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation {name!r} is not supported; accepted: {', '.join(ATTN_IMPLEMENTATIONS)}")
    return name


class LlamaModel(LlamaPreTrainedModel):
    """Embeddings, decoder layers and the final norm; returns the last hidden state."""

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        check_attn_implementation(attn_implementation)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, attn_implementation)
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
                f"blocks.{i}.ln1.hook_normalized": layer.input_layernorm.hook_normalized,
                **{f"blocks.{i}.attn.hook_{n}": getattr(attn, f"hook_{n}")
                   for n in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z")},
                f"blocks.{i}.hook_attn_out": layer.hook_attn_out,
                f"blocks.{i}.hook_resid_mid": layer.hook_resid_mid,
                f"blocks.{i}.ln2.hook_normalized": layer.post_attention_layernorm.hook_normalized,
                f"blocks.{i}.mlp.hook_pre": mlp.hook_pre,
                f"blocks.{i}.mlp.hook_pre_linear": mlp.hook_pre_linear,
                f"blocks.{i}.mlp.hook_post": mlp.hook_post,
                f"blocks.{i}.hook_mlp_out": layer.hook_mlp_out,
                f"blocks.{i}.hook_resid_post": layer.hook_resid_post,
            })
        names["ln_final.hook_normalized"] = self.norm.hook_normalized
        return names

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, output_attentions=False, output_hidden_states=False, inputs_embeds=None,
                **unused) -> BaseModelOutput:
        x = self.hook_embed(self.embed(input_ids, inputs_embeds))  # [b, p, m]
        b, p = x.shape[:2]
        cache = past_key_values if past_key_values is not None else (DynamicCache() if use_cache else None)
        past = cache.get_seq_length() if cache is not None else 0
        self._check_length(past + p)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past, p, x.device)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # [b, p, d] each
        mask = AttentionMask(p, past, attention_mask, self.config.sliding_window,
                             getattr(cache, "key_length", None), x.device)
        hidden, attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x, pattern = layer(x, cos, sin, mask, cache, output_attentions)
            if output_attentions:
                attentions.append(pattern)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return BaseModelOutput(last_hidden_state=x, past_key_values=cache if use_cache or past_key_values else None,
                               hidden_states=tuple(hidden) if output_hidden_states else None,
                               attentions=tuple(attentions) if output_attentions else None)

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


class LlamaForCausalLM(LlamaPreTrainedModel):
    """LlamaModel + lm_head: next-token logits [b, p, v] and the language-modelling loss."""

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, attn_implementation)
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
                inputs_embeds=None, logits_to_keep: int = 0, **unused) -> CausalLMOutput:
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache,
                         output_attentions, output_hidden_states, inputs_embeds)
        x = out.last_hidden_state if not logits_to_keep else out.last_hidden_state[:, -logits_to_keep:]
        logits = self.hook_logits(self.lm_head(x))  # [b, p, v]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, attentions=out.attentions)

    def generate(self, input_ids=None, **kwargs):
        """Greedy or sampled continuation with a KV cache; see llamaviz.generation.generate."""
        from llamaviz.generation import generate  # decoding loops live outside the model package

        return generate(self, input_ids, **kwargs)

    def generate_with_cache(self, input_ids=None, **kwargs):
        """generate() that also returns an ActivationCache of the whole sequence."""
        from llamaviz.generation import generate_with_cache

        return generate_with_cache(self, input_ids, **kwargs)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position i predicts labels[i + 1]; -100 is ignored."""
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]  # [b, p]
    return F.cross_entropy(logits.float().flatten(0, 1), shifted.flatten().to(logits.device), ignore_index=-100)

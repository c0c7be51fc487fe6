"""The Llama family: Mistral, Qwen2 / Qwen2.5 and Qwen3 as subclasses of the Llama classes.

Each variant changes data, never the forward's branches: Mistral is a Llama with MistralConfig's
sliding window; Qwen2 biases q/k/v but not o_proj and slides only on the layers its config names;
Qwen3 adds an RMSNorm over each query and key head before RoPE, seen by two more hook points:

    blocks.{L}.attn.hook_q_normalized   [b, p, h, d]   q_norm(q), the input to RoPE
    blocks.{L}.attn.hook_k_normalized   [b, p, g, d]   k_norm(k), the input to RoPE

Module trees and state-dict keys are transformers' (`self_attn.q_norm.weight`, ...), so checkpoints
load and save without renaming.
"""

from __future__ import annotations

import torch

from llamaviz.llama.attention import LlamaAttention
from llamaviz.llama.config import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from llamaviz.llama.hook_points import HookPoint
from llamaviz.llama.pretrained import provided
from llamaviz.llama.modeling import LlamaForCausalLM, LlamaModel, LlamaRMSNorm


class Qwen2Attention(LlamaAttention):
    """Llama attention whose q/k/v projections carry biases and whose o_proj does not."""

    @staticmethod
    def projection_biases(config: LlamaConfig) -> tuple[bool, bool]:
        return True, False


class Qwen3Attention(LlamaAttention):
    """Llama attention with a per-head RMSNorm (weight [d]) on queries and keys before RoPE."""

    # Llama's hooks, with the two norm outputs after q, k, v (forward order)
    hook_suffixes = (*LlamaAttention.hook_suffixes[:3], "q_normalized", "k_normalized",
                     *LlamaAttention.hook_suffixes[3:])

    def __init__(self, config: LlamaConfig, layer_idx: int, attn_implementation: str = "sdpa"):
        super().__init__(config, layer_idx, attn_implementation)
        self.q_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = LlamaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.hook_q_normalized = HookPoint()  # [b, p, h, d] q_norm(q), before RoPE
        self.hook_k_normalized = HookPoint()  # [b, p, g, d] k_norm(k), before RoPE

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [b, p, m] -> q [b, p, h, d], k [b, p, g, d] (each head RMS-normalised), v [b, p, g, d]."""
        q, k, v = super().project(x)
        return self.hook_q_normalized(self.qk_norm(q, "q")), self.hook_k_normalized(self.qk_norm(k, "k")), v

    def qk_norm(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        return (self.q_norm if kind == "q" else self.k_norm)(x)


class MistralModel(LlamaModel):
    """LlamaModel under a MistralConfig (its sliding window reaches the mask builder through layer_windows)."""


class Qwen2Model(LlamaModel):
    attention_class = Qwen2Attention


class Qwen3Model(LlamaModel):
    attention_class = Qwen3Attention


def check_family_config(model, config: LlamaConfig) -> None:
    """A family member's class (causal LM or task head) needs a config of its family's config class."""
    wanted = model.config_class
    if not isinstance(config, wanted):
        raise ValueError(f"{type(model).__name__} needs a {wanted.__name__} (model_type {wanted.model_type!r}), got "
                         f"a {type(config).__name__} (model_type {config.model_type!r}); AutoModelForCausalLM "
                         "picks the class for a config")


class _VariantForCausalLM(LlamaForCausalLM):
    """A family member's causal LM: checks that its config is of the variant's config class."""

    config_class: type[LlamaConfig] = LlamaConfig

    def __init__(self, config: LlamaConfig, attn_implementation: str = "sdpa"):
        check_family_config(self, config)
        super().__init__(config, attn_implementation)


class MistralForCausalLM(_VariantForCausalLM):
    config_class = MistralConfig
    base_model_class = MistralModel


class Qwen2ForCausalLM(_VariantForCausalLM):
    config_class = Qwen2Config
    base_model_class = Qwen2Model


class Qwen3ForCausalLM(_VariantForCausalLM):
    config_class = Qwen3Config
    base_model_class = Qwen3Model


def causal_lm_classes() -> dict[str, type[LlamaForCausalLM]]:
    """config model_type -> the causal-LM class that runs it."""
    return {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
            "qwen3": Qwen3ForCausalLM}


def causal_lm_class_for(config: LlamaConfig) -> type[LlamaForCausalLM]:
    """The causal-LM class for a config (Qwen2Config -> Qwen2ForCausalLM, ...)."""
    classes = causal_lm_classes()
    if config.model_type not in classes:
        raise ValueError(f"model_type {config.model_type!r} is not supported; "
                         f"accepted: {', '.join(map(repr, classes))}")
    return classes[config.model_type]


class AutoModelForCausalLM:
    """Picks the causal-LM class from a checkpoint's config (config.json model_type, GGUF general.architecture)."""

    def __init__(self):
        raise TypeError("AutoModelForCausalLM is not built directly; use AutoModelForCausalLM.from_pretrained(path) "
                        "or AutoModelForCausalLM.from_config(config)")

    @staticmethod
    def from_config(config: LlamaConfig, attn_implementation: str = "sdpa") -> LlamaForCausalLM:
        """A freshly initialised model of the config's family member."""
        return causal_lm_class_for(config)(config, attn_implementation=attn_implementation)

    @staticmethod
    def from_pretrained(path, **kwargs) -> LlamaForCausalLM:
        """The checkpoint at `path` in the class its config names; kwargs as for LlamaForCausalLM.from_pretrained."""
        checkpoint = provided("open_checkpoint")(path)
        return causal_lm_class_for(checkpoint.config).from_pretrained(checkpoint, **kwargs)

"""The Llama model in pure torch: config, RoPE, masks, hook points, attention, caches, modeling."""

from .activation_cache import ActivationCache
from .cache import DynamicCache, StaticCache
from .config import LlamaConfig
from .hook_points import HookPoint
from .masks import build_mask
from .modeling import LlamaForCausalLM, LlamaModel

__all__ = ["ActivationCache", "DynamicCache", "StaticCache", "LlamaConfig", "HookPoint", "build_mask",
           "LlamaForCausalLM", "LlamaModel"]

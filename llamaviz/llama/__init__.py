"""The model core, pure torch: config, RoPE, masks, attention, hook points and names, caches, capture,
lazy patterns, outputs, variants and task heads, quantized linears, the TransformerLens conveniences.

May import: torch, safetensors and the standard library; nothing else of llamaviz. The Hugging Face
methods that need the layers above (from_pretrained, save_pretrained, generate, the tokenizer) go
through the slots of llama/pretrained.py, which the package's root fills.
The names below are imported on first use, so filling those slots does not load torch.
"""

from __future__ import annotations

import importlib

_NAMES = {
    "ActivationCache": "activation_cache", "DynamicCache": "cache", "StaticCache": "cache",
    "LlamaConfig": "config", "HookPoint": "hook_points", "build_mask": "masks",
    "LlamaForCausalLM": "modeling", "LlamaModel": "modeling",
}


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"llamaviz.llama.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'llamaviz.llama' has no attribute {name!r}")


__all__ = list(_NAMES)

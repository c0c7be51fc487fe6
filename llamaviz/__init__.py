"""llamaviz: a Llama whose every activation is a named hook point, and three ways to look inside it."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every public name is imported on first use, so `llamaviz --help` starts without loading torch.
_LAZY = {
    **{name: "llamaviz.llama" for name in ("ActivationCache", "DynamicCache", "HookPoint", "LlamaConfig",
                                           "LlamaForCausalLM", "LlamaModel", "StaticCache", "build_mask")},
    "AutoTokenizer": "llamaviz.tokenizer",
    "LlamaTokenizer": "llamaviz.tokenizer",
    "LlamaTokenizerFast": "llamaviz.tokenizer",
    "LlamaForSequenceClassification": "llamaviz.llama.heads",
    "LlamaForTokenClassification": "llamaviz.llama.heads",
    "LlamaForQuestionAnswering": "llamaviz.llama.heads",
    "AttentionMaskVisualizer": "llamaviz.terminal",
    "pipeline": "llamaviz.pipelines",  # the module is plural, as in transformers, so it never shadows this
    "TextStreamer": "llamaviz.streamers",
    "TextIteratorStreamer": "llamaviz.streamers",
    "TorchAoConfig": "llamaviz.llama.quantize",
    "default_model_path": "llamaviz.checkpoints.default",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaviz' has no attribute {name!r}")


def load(path=None, dtype=None, device=None, attn_implementation: str = "sdpa", **kwargs):
    """(model, tokenizer) from a checkpoint folder or .gguf file; None loads the default model."""
    from .checkpoints.default import default_model_path
    from .llama import LlamaForCausalLM
    from .tokenizer import AutoTokenizer

    path = default_model_path() if path is None else path
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, device=device,
                                             attn_implementation=attn_implementation, **kwargs)
    return model, AutoTokenizer.from_pretrained(path)


__all__ = ["load", *_LAZY]

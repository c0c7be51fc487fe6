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
    "default_model_path": "llamaviz.checkpoints.default",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaviz' has no attribute {name!r}")


def load(path=None, dtype=None, device=None, attn_implementation: str = "sdpa", **kwargs):
    """(model, tokenizer) from a checkpoint folder or .gguf file; None loads the default model.

    The checkpoint is opened once: the tokenizer is built from what that opening found (a GGUF's
    header is parsed once). tp_plan= and device_map= pass through to from_pretrained.
    """
    from .checkpoints import open_checkpoint
    from .checkpoints.paths import model_path
    from .llama import LlamaForCausalLM
    from .tokenizers.loading import from_checkpoint

    checkpoint = open_checkpoint(model_path(path))
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device,
                                             attn_implementation=attn_implementation, **kwargs)
    return model, from_checkpoint(checkpoint)


__all__ = ["load", *_LAZY]

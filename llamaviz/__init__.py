"""llamaviz: a Llama whose every activation is a named hook point, and three ways to look inside it."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every public name is imported on first use, so `llamaviz --help` starts without loading torch.
_LAZY = {
    **{name: "llamaviz.llama" for name in ("ActivationCache", "DynamicCache", "HookPoint", "LlamaConfig",
                                           "LlamaForCausalLM", "LlamaModel", "StaticCache", "build_mask")},
    **{name: "llamaviz.llama.variants" for name in ("AutoModelForCausalLM", "MistralForCausalLM",
                                                    "Qwen2ForCausalLM", "Qwen3ForCausalLM")},
    **{name: "llamaviz.llama.config" for name in ("MistralConfig", "Qwen2Config", "Qwen3Config")},
    "AutoTokenizer": "llamaviz.tokenizer",
    "LlamaTokenizer": "llamaviz.tokenizer",
    "LlamaTokenizerFast": "llamaviz.tokenizer",
    "LlamaForSequenceClassification": "llamaviz.llama.heads",
    "LlamaForTokenClassification": "llamaviz.llama.heads",
    "LlamaForQuestionAnswering": "llamaviz.llama.heads",
    **{f"{family}{head}": "llamaviz.llama.variant_heads" for family in ("Mistral", "Qwen2", "Qwen3")
       for head in ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")},
    "AttentionMaskVisualizer": "llamaviz.terminal",
    "pipeline": "llamaviz.pipelines",  # the module is plural, as in transformers, so it never shadows this
    "TextStreamer": "llamaviz.streamers",
    "TextIteratorStreamer": "llamaviz.streamers",
    "TorchAoConfig": "llamaviz.llama.quantize",
    "default_model_path": "llamaviz.checkpoints.default",
    "get_act_name": "llamaviz.llama.names",
    "FactoredMatrix": "llamaviz.llama.factored_matrix",
    "test_prompt": "llamaviz.utils",
}
# Submodules reachable as attributes (llamaviz.patching.get_act_patch_resid_pre) without an import line.
_MODULES = ("analysis", "attribution", "flow", "interventions", "notebook", "patching", "plots", "utils")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"llamaviz.{name}")
    raise AttributeError(f"module 'llamaviz' has no attribute {name!r}")


def load(path=None, dtype=None, device=None, attn_implementation: str = "sdpa", **kwargs):
    """(model, tokenizer) from a checkpoint folder or .gguf file (Llama, Mistral, Qwen2, Qwen3); None = the default.

    The checkpoint is opened once: the tokenizer is built from what that opening found (a GGUF's
    header is parsed once). tp_plan= and device_map= pass through to from_pretrained.
    """
    from .checkpoints import open_checkpoint
    from .checkpoints.paths import model_path
    from .llama import LlamaForCausalLM
    from .tokenizers.loading import from_checkpoint

    checkpoint = open_checkpoint(model_path(path))
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device,  # picks the family member
                                             attn_implementation=attn_implementation, **kwargs)
    model.tokenizer = from_checkpoint(checkpoint)  # to_tokens / to_str_tokens use it
    return model, model.tokenizer


__all__ = ["load", *_LAZY]

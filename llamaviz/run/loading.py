"""llamaviz.load: a model and its tokenizer from one opening of a checkpoint."""

from __future__ import annotations

from llamaviz.checkpoints import open_checkpoint
from llamaviz.checkpoints.paths import model_path
from llamaviz.llama import LlamaForCausalLM
from llamaviz.tokenizers.loading import from_checkpoint


def load(path=None, dtype=None, device=None, attn_implementation: str = "sdpa", **kwargs):
    """(model, tokenizer) from a checkpoint folder or .gguf file (Llama, Mistral, Qwen2, Qwen3); None = the default.

    The checkpoint is opened once: the tokenizer is built from what that opening found (a GGUF's
    header is parsed once). tp_plan= and device_map= pass through to from_pretrained.
    """
    checkpoint = open_checkpoint(model_path(path))
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=dtype, device=device,  # picks the family member
                                             attn_implementation=attn_implementation, **kwargs)
    model.tokenizer = from_checkpoint(checkpoint)  # to_tokens / to_str_tokens use it
    return model, model.tokenizer

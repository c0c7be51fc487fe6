"""Checkpoint readers: HF folders (safetensors, .bin), GGUF files, Meta's original format; and saving.

open_checkpoint(path) streams a checkpoint's tensors under Hugging Face names; load_pretrained fills a
model built on the meta device from that stream; save_pretrained writes a folder transformers reads.

May import: llamaviz.llama (configs, model classes, quantized linears) and llamaviz.distributed
(a tensor-parallel plan shards what is read). The model reaches these readers through its slots.
"""

from llamaviz.checkpoints.base import Checkpoint, TensorInfo, permute_rope_rows, unpermute_rope_rows
from llamaviz.checkpoints.loading import load_pretrained, open_checkpoint
from llamaviz.checkpoints.options import ProgressBar, resolve_device, resolve_dtype
from llamaviz.checkpoints.saving import save_pretrained

__all__ = [
    "Checkpoint", "TensorInfo", "ProgressBar", "load_pretrained", "open_checkpoint", "permute_rope_rows",
    "resolve_device", "resolve_dtype", "save_pretrained", "unpermute_rope_rows",
]

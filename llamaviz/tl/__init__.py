"""The TransformerLens face: HookedTransformer over a llamaviz model, so TransformerLens scripts port
by changing their import and loading lines only.

May import: every layer below it (llama .. app are not needed: llama, checkpoints, tokenizers, run).
"""

from llamaviz.tl.hooked import HookedTransformer

__all__ = ["HookedTransformer"]

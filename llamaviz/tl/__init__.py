"""The TransformerLens face: HookedTransformer over a llamaviz model, so TransformerLens scripts port
by changing their import and loading lines only.

May import: every layer below it (it uses llama, run and features).
"""

from llamaviz.tl.hooked import HookedSAETransformer, HookedTransformer
from llamaviz.tl.root import HookedRootModule

__all__ = ["HookedRootModule", "HookedSAETransformer", "HookedTransformer"]

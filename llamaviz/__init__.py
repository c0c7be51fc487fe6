"""llamaviz: a Llama whose every activation is a named hook point, and three ways to look inside it.

This file is the top of the layers (see llamaviz/layers.py): it re-exports the public API lazily,
fills the model core's slots for the Hugging Face methods (llamaviz/llama/pretrained.py), and keeps
the module paths of earlier releases importable (llamaviz.patching, llamaviz.interventions, ...).
Nothing inside the package imports it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

from llamaviz.llama import pretrained as _pretrained

__version__ = "0.1.0"

# Every public name is imported on first use, so `llamaviz --help` starts without loading torch.
_LAZY = {
    **{name: "llamaviz.llama" for name in ("ActivationCache", "DynamicCache", "HookPoint", "LlamaConfig",
                                           "LlamaForCausalLM", "LlamaModel", "StaticCache", "build_mask")},
    **{name: "llamaviz.llama.variants" for name in ("AutoModelForCausalLM", "MistralForCausalLM",
                                                    "Qwen2ForCausalLM", "Qwen3ForCausalLM")},
    **{name: "llamaviz.llama.config" for name in ("MistralConfig", "Qwen2Config", "Qwen3Config")},
    "AutoTokenizer": "llamaviz.tokenizers",
    "LlamaTokenizer": "llamaviz.tokenizers",
    "LlamaTokenizerFast": "llamaviz.tokenizers",
    "LlamaForSequenceClassification": "llamaviz.llama.heads",
    "LlamaForTokenClassification": "llamaviz.llama.heads",
    "LlamaForQuestionAnswering": "llamaviz.llama.heads",
    **{f"{family}{head}": "llamaviz.llama.variant_heads" for family in ("Mistral", "Qwen2", "Qwen3")
       for head in ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")},
    "AttentionMaskVisualizer": "llamaviz.terminal",
    "pipeline": "llamaviz.run.pipelines",  # the module is plural, as in transformers, so it never shadows this
    "TextStreamer": "llamaviz.run.streamers",
    "TextIteratorStreamer": "llamaviz.run.streamers",
    "TorchAoConfig": "llamaviz.llama.quantize",
    "default_model_path": "llamaviz.checkpoints.default",
    "get_act_name": "llamaviz.llama.names",
    "FactoredMatrix": "llamaviz.llama.factored_matrix",
    "test_prompt": "llamaviz.interpret.utils",
    "load": "llamaviz.run.loading",
    "HookedTransformer": "llamaviz.tl",
    "HookedSAETransformer": "llamaviz.tl",
    "SAE": "llamaviz.features",
    "TranscoderSet": "llamaviz.features",
}
# Modules that moved into the layered packages, still importable and reachable as attributes under their old names.
MOVED = {
    "analysis": "llamaviz.interpret.detectors", "attribution": "llamaviz.interpret.attribution",
    "causal_scores": "llamaviz.interpret.causal_scores", "flow": "llamaviz.interpret.flow",
    "interventions": "llamaviz.interpret.interventions", "pairs": "llamaviz.interpret.pairs",
    "patching": "llamaviz.interpret.patching", "readouts": "llamaviz.interpret.readouts",
    "utils": "llamaviz.interpret.utils", "generation": "llamaviz.run.generation",
    "pipelines": "llamaviz.run.pipelines", "streamers": "llamaviz.run.streamers",
    "tokenizer": "llamaviz.tokenizers", "notebook_explain": "llamaviz.notebook.explain",
}
# Packages reachable as attributes (llamaviz.plots.head_grid) without an import line.
_PACKAGES = ("checkpoints", "distributed", "interpret", "llama", "notebook", "plots", "run", "terminal",
             "tokenizers", "tl", "features", "graphs")

for _slot, _target in {
    "load_pretrained": "llamaviz.checkpoints.loading:load_pretrained",
    "open_checkpoint": "llamaviz.checkpoints.loading:open_checkpoint",
    "save_pretrained": "llamaviz.checkpoints.saving:save_pretrained",
    "generate": "llamaviz.run.generation:generate",
    "generate_with_cache": "llamaviz.run.generation:generate_with_cache",
    "auto_tokenizer": "llamaviz.tokenizers.loading:AutoTokenizer",
}.items():
    _pretrained.provide(_slot, _target)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import llamaviz.patching` gives the module now at llamaviz.interpret.patching (the same object)."""

    @staticmethod
    def new_name(fullname: str) -> str | None:
        root, _, old = fullname.partition(".")
        first, dot, rest = old.partition(".")
        return MOVED[first] + dot + rest if root == "llamaviz" and first in MOVED else None

    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if self.new_name(fullname) else None

    def create_module(self, spec):
        return importlib.import_module(self.new_name(spec.name))

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finder, so no module loads twice


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in MOVED:
        return importlib.import_module(MOVED[name])
    if name in _PACKAGES:
        return importlib.import_module(f"llamaviz.{name}")
    raise AttributeError(f"module 'llamaviz' has no attribute {name!r}")


__all__ = list(_LAZY)

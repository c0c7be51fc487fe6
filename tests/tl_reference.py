"""TransformerLens' TransformerBridge around a transformers model: the reference for the analysis tests.

The bridge wraps the very model we compare against (same weights), with the default model's
tokenizer read from its GGUF by transformers (the tiny configs use only token ids).
"""

import copy
import functools

import pytest


@functools.cache
def gguf_tokenizer():
    import transformers

    from llamaviz.checkpoints.default import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def bridge(hf_model, fold_ln: bool = False):
    """A TransformerBridge over hf_model: raw weights, or with only the norms folded (fold_ln=True, on a copy)."""
    bridge_module = pytest.importorskip("transformer_lens.model_bridge")
    hf_model = copy.deepcopy(hf_model) if fold_ln else hf_model  # folding rewrites the wrapped weights
    tl = bridge_module.TransformerBridge.boot_transformers("llamaviz-reference", hf_model=hf_model,
                                                           tokenizer=gguf_tokenizer())
    if fold_ln:
        tl.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=False,
                                     center_unembed=False, fold_value_biases=False)
    else:
        tl.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    return tl

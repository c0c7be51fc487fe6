"""Dictionaries: sparse autoencoders and transcoders on a hook point, in SAELens's and circuit-tracer's
file formats, attached to a model as hook points.

    sae = features.load("model/sae-resid-15")              # a SAELens folder (cfg.json + safetensors)
    with features.attached(model, sae):                      # adds {hook}.hook_sae_acts_post, ...
        logits, cache = model.run_with_cache(ids)
    transcoders = features.load_transcoder_set("model/transcoders")   # circuit-tracer's layout

May import: llamaviz.llama, distributed, checkpoints, tokenizers, run, interpret.
Inside: dictionary, sparsity (the math), file_checks (symlinks, safetensors headers) <- saelens_files,
transcoder_set <- attach <- analysis (logit effects, attribution, ablation, patching of features), data,
harvest, training <- job <- command (features.train, what `llamaviz features train` runs).
"""

from llamaviz.features.attach import attached
from llamaviz.features.command import train
from llamaviz.features.dictionary import ARCHITECTURES, NORMALIZATIONS, Dictionary
from llamaviz.features.saelens_files import SAE, load, save
from llamaviz.features.transcoder_set import TranscoderSet, load_transcoder_set, save_transcoder_set

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "SAE", "Dictionary", "TranscoderSet", "attached", "load",
           "load_transcoder_set", "save", "save_transcoder_set", "train"]

"""features.train: what `llamaviz features train` runs, callable from Python with the same names.

    features.train(model=None, hook="blocks.15.hook_resid_post", data="notes/", width="8x", k=32, out="model/sae-15")
    features.train(transcoders="all", data="notes/", out="model/transcoders")   # every layer's MLP, with skip
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from llamaviz.features.data import generated, read_corpus, windows as make_windows
from llamaviz.features.job import train_dictionary, train_streamed
from llamaviz.features.stream import Target
from llamaviz.features.training import TrainConfig
from llamaviz.features.transcoder_set import TranscoderSet, save_transcoder_set


def parse_width(width: str | int, d_model: int) -> int:
    """ "8x" -> 8 * d_model; "4608" or 4608 -> 4608."""
    text = str(width).strip().lower()
    try:
        value = int(float(text[:-1]) * d_model) if text.endswith("x") else int(text)
    except ValueError:
        raise ValueError(f"--width {width!r}: a number of latents (4608) or a multiple of the model width (8x)") from None
    if value < 1:
        raise ValueError(f"--width must give at least one latent, got {width!r}")
    return value


def train(model=None, hook: str | None = None, data=None, out=None, width="8x", k: int = 32, tokens: int = 200_000,
          seed: int = 0, architecture: str = "topk", resume: bool = False, context: int = 128, field: str = "text",
          generate: int | None = None, keep_special: bool = False, transcoders: str | None = None,
          dtype: str = "float32", progress: bool = True, **options) -> dict:
    """Train one dictionary (hook=) or a transcoder set (transcoders="all") and write it to `out`; returns a summary."""
    from llamaviz.run.loading import load

    if out is None:
        raise ValueError("--out is required: the folder the dictionary is written to")
    if (hook is None) == (transcoders is None):
        raise ValueError("give --hook NAME (one dictionary) or --transcoders all (every layer's MLP), not both")
    if data is None and generate is None:
        raise ValueError("give --data PATH (a .txt/.md/.jsonl file or folder) or --generate N tokens")
    lm, tokenizer = load(model) if model is None or isinstance(model, (str, Path)) else (model, model.tokenizer)
    lm.eval()
    corpus = read_corpus(data, field) if data is not None else None
    ids = (make_windows(tokenizer, corpus.documents, context, max_tokens=tokens) if corpus is not None
           else generated(lm, tokenizer, generate, context, seed))
    cfg = TrainConfig(architecture=architecture, width=parse_width(width, lm.config.hidden_size), k=k, seed=seed,
                      **options)
    cfg.check()
    summary = {"corpus": corpus.summary() if corpus else f"{generate:,} tokens sampled from the model",
               "windows": len(ids), "out": str(out)}
    if hook is not None:
        lm._check_name(hook)
        dictionary, status = train_dictionary(lm, tokenizer, ids, hook, out, cfg, resume, dtype=dtype,
                                              keep_special=keep_special, progress=progress)
        return summary | {"status": status, "evaluation": dictionary.cfg.metadata.get("evaluation", {})}
    if transcoders != "all":
        raise ValueError(f"--transcoders {transcoders!r}: only 'all' (every layer's MLP input -> output) is accepted")
    # every layer from one streamed pass: one forward per chunk feeds all the trainers, nothing spilled to disk
    targets = [Target(f"layer_{layer}", f"blocks.{layer}.mlp.hook_in", dataclasses.replace(cfg),
                      f"blocks.{layer}.hook_mlp_out") for layer in range(lm.config.num_hidden_layers)]
    done, status = train_streamed(lm, tokenizer, ids, targets, out, resume=resume, keep_special=keep_special,
                                  progress=progress)
    if status != "done":
        return summary | {"status": status, "layers trained": 0}
    layers = [done[target.name] for target in targets]
    save_transcoder_set(TranscoderSet(layers, str(getattr(lm, "name_or_path", ""))), out)
    return summary | {"status": status, "layers trained": len(layers),
                      "evaluation": [d.cfg.metadata.get("evaluation", {}) for d in layers]}

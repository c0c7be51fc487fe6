"""The default model's default dictionaries, from text every machine has: residual SAEs at a few layers and
a transcoder set, all trained in one streamed pass (stream.py) and cached in the checkpoints folder.

    python -m llamaviz features defaults        # or `make dictionaries`; Ctrl-C, then --resume, continues

The corpus is Python's own documentation: pydoc_data's topics and the standard library's docstrings
(read from the source files with ast, nothing imported), in a fixed order, so every machine trains on
the same text. Written to {checkpoints}/dictionaries/: sae-resid-{L} (SAELens folders) and transcoders
(circuit-tracer's layout, with each layer also as a SAELens folder under transcoders/layer_{L}).
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

from llamaviz.features.command import parse_width
from llamaviz.features.data import windows as make_windows
from llamaviz.features.stream import Target
from llamaviz.features.training import TrainConfig

SAE_LAYERS = (5, 15, 25)
SAE = {"architecture": "topk", "width": "8x", "k": 32}
TRANSCODERS = {"architecture": "batchtopk", "width": "2x", "k": 16}  # saved as jumprelu transcoders
TOKENS = 150_000
MODEL_DIR_ENV = "LLAMAVIZ_MODEL_DIR"


def default_folder() -> Path:
    """{checkpoints}/dictionaries: $LLAMAVIZ_MODEL_DIR or the project's model/ folder."""
    root = os.environ.get(MODEL_DIR_ENV) or Path(__file__).resolve().parents[2] / "model"
    return Path(root) / "dictionaries"


def python_docs(max_chars: int | None = None) -> list[str]:
    """pydoc_data's topics, then every module, class and function docstring of the standard library."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    total = sum(map(len, documents))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for file in sorted(stdlib.rglob("*.py")):
        if max_chars is not None and total >= max_chars:
            break
        if "site-packages" in file.parts or "test" in file.parts or "tests" in file.parts:
            continue
        for text in _docstrings(file):
            documents.append(text)
            total += len(text)
    return documents


def _docstrings(file: Path) -> list[str]:
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found = (ast.get_docstring(n) for n in nodes)
    return [text for text in found if text and len(text) > 80]


def targets(model, sae_layers=SAE_LAYERS, seed: int = 0, batch_size: int = 1024, transcoders: bool = True
            ) -> list[Target]:
    """The SAEs at sae_layers' resid_post and (transcoders) one transcoder per layer (mlp.hook_in ->
    hook_mlp_out, with skip)."""
    d = model.config.hidden_size

    def cfg(spec: dict) -> TrainConfig:
        return TrainConfig(architecture=spec["architecture"], width=parse_width(spec["width"], d), k=spec["k"],
                           seed=seed, batch_size=batch_size)

    found = [Target(f"sae-resid-{layer}", f"blocks.{layer}.hook_resid_post", cfg(SAE)) for layer in sae_layers]
    found += [Target(f"transcoders/layer_{layer}", f"blocks.{layer}.mlp.hook_in", cfg(TRANSCODERS),
                     f"blocks.{layer}.hook_mlp_out") for layer in range(model.config.num_hidden_layers) if transcoders]
    return found


def build(model=None, out=None, tokens: int = TOKENS, resume: bool = False, progress: bool = True,
          sae_layers=SAE_LAYERS, context: int = 128, seed: int = 0, on_chunk=None, transcoders: bool = True) -> dict:
    """Train the default dictionaries into out (default_folder()); returns a summary of the scores. Fewer
    tokens, fewer sae_layers and transcoders=False make a quick build of the same dictionaries (tests)."""
    from llamaviz.features.job import train_streamed
    from llamaviz.run.loading import load

    lm, tokenizer = load(model) if model is None or isinstance(model, (str, Path)) else (model, model.tokenizer)
    lm.eval()
    bad = [layer for layer in sae_layers if not 0 <= layer < lm.config.num_hidden_layers]
    if bad:
        raise ValueError(f"SAE layers {bad} are not layers of this model (0..{lm.config.num_hidden_layers - 1})")
    out = Path(out) if out is not None else default_folder()
    ids = make_windows(tokenizer, python_docs(max_chars=tokens * 6), context, max_tokens=tokens)
    done, status = train_streamed(lm, tokenizer, ids, targets(lm, sae_layers, seed, transcoders=transcoders), out,
                                  resume=resume, progress=progress, transcoder_set="transcoders" if transcoders else None,
                                  on_chunk=on_chunk)
    scores = {name: d.cfg.metadata["evaluation"] for name, d in done.items()}
    return {"status": status, "out": str(out), "windows": len(ids), "scores": scores}

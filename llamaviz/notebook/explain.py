"""One-call explanations for notebooks: what the app's workbench tabs show, from the same library calls.

show_dla (direct logit attribution), show_patching (a clean/corrupted pair), show_saliency (input
attribution), show_flow (the contribution graph) and open_patching (results the app exported).
Re-exported by llamaviz.notebook.
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go
import torch

from llamaviz.interpret import readouts
from llamaviz.notebook.runs import Run, enable_offline, encode
from llamaviz.plots.checks import check_name

def _explain_run(model, tok, text: str) -> Run:
    """`text` run with every hook point the logit attribution and the information flow read."""
    ids, tokens = encode(tok, text)
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids.to(model.device), names_filter=readouts.explain_filter)
    return Run(ids, tokens, logits, cache)


def _token_id(model, token, what: str) -> int:
    """A token given as an id or as text that is exactly one token."""
    if isinstance(token, str):
        return model.to_single_token(token)
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < model.config.vocab_size:
        raise ValueError(f"{what} must be one-token text or an id in 0..{model.config.vocab_size - 1}; got {token!r}")
    return token


def show_dla(model, tok, text: str, token=None, foil=None, position: int = -1) -> go.Figure:
    """Direct logit attribution of `token` (default: the model's top next token) at `position`, minus `foil`'s."""
    from llamaviz.plots import analysis as figures

    enable_offline()
    result = _explain_run(model, tok, text)
    p = result.input_ids.shape[1]
    if isinstance(position, bool) or not isinstance(position, int) or not -p <= position < p:
        raise ValueError(f"position {position!r} is out of range for {p} tokens; accepted: {-p}..{p - 1}")
    token = int(result.logits[0, position].argmax()) if token is None else _token_id(model, token, "token")
    foil = None if foil is None else _token_id(model, foil, "foil")
    dla = readouts.direct_logit_attribution(result.cache, position, token, foil)
    shown = tok.display_tokens([token]) + ([] if foil is None else tok.display_tokens([foil]))
    title = f"Direct logit attribution of {' − '.join(shown)} at position {dla.position} (total {dla.total:.3f})"
    return figures.dla_figure(dla.labels, dla.components, dla.heads, dla.accumulated, dla.accumulated_labels, title)


def show_patching(model, tok, clean: str, corrupted: str, answer, wrong, mode: str = "both") -> dict:
    """Patch a clean/corrupted pair: {"blocks": figure, "heads": figure, "result": llamaviz.interpret.pairs.PatchingResult}.

    mode "exact", "attribution" (one backward, fast) or "both"; maps are the normalised logit difference.
    """
    from llamaviz.interpret import pairs
    from llamaviz.plots import analysis as figures

    check_name(mode, "mode", ["exact", "attribution", "both"])
    enable_offline()
    clean_ids, tokens = encode(tok, clean)
    corrupted_ids, _ = encode(tok, corrupted)
    result = pairs.patch_pair(model, clean_ids.to(model.device), corrupted_ids.to(model.device),
                              _token_id(model, answer, "answer"), _token_id(model, wrong, "wrong"),
                              exact=mode != "attribution", attribution=mode != "exact", progress=None)
    maps, how = (result.exact, "exact") if result.exact else (result.attribution, "attribution (estimate)")
    blocks = {name: maps[name] for name in pairs.BLOCKS}
    return {"blocks": figures.patching_heatmap(blocks, tokens, f"Normalised logit difference, {how}"),
            "heads": figures.head_heatmap(maps["heads"], f"Normalised logit difference per head, {how}"),
            "result": result}


def show_saliency(model, tok, text: str, target=None, method: str = "integrated_gradients", steps: int = 32):
    """The text's tokens coloured by their attribution to the next token `target` (default: the top one); HTML."""
    from llamaviz.interpret import attribution
    from llamaviz.plots import analysis as figures

    check_name(method, "method", list(attribution.METHODS))
    ids, tokens = encode(tok, text)
    target = None if target is None else _token_id(model, target, "target")
    extra = {"steps": steps} if method == "integrated_gradients" else {}
    result = attribution.METHODS[method](model, ids.to(model.device), target=target, **extra)
    if target is None:
        with torch.no_grad():
            target = int(model(ids.to(model.device)).logits[0, -1].argmax())
    page = figures.saliency_html(tokens, result.scores[0], method, tok.display_tokens([target])[0])
    try:
        from IPython.display import HTML
    except ImportError:
        return page
    return HTML(page)


def show_flow(model, tok, text: str, position: int = -1, threshold: float = 0.04) -> go.Figure:
    """The information-flow graph into `position` (edges with a share >= threshold)."""
    from llamaviz.interpret import flow
    from llamaviz.plots import analysis as figures

    enable_offline()
    result = _explain_run(model, tok, text)
    graph = flow.information_flow(result.cache, position, threshold)
    return figures.flow_figure(graph, result.tokens, model.config.num_hidden_layers)


def open_patching(path: str | Path) -> dict:
    """Reopen patching results saved by the web app (patching.json beside patching.safetensors).

    Returns the JSON's fields (prompts' tokens and ids, answer ids, logit differences) plus "maps":
    {"exact.resid_pre": tensor [L, p], "attribution.heads": tensor [L, h], ...}.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no patching file at {path}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON patching file: {err}") from None
    weights = path.with_suffix(".safetensors")
    if not isinstance(meta, dict) or not weights.is_file():
        raise ValueError(f"{path} must be a JSON object saved with {weights.name} beside it")
    tensors = load_file(str(weights))
    return {**meta, "maps": {name: t for name, t in tensors.items() if name.startswith(("exact.", "attribution."))}}

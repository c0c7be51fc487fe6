"""What the Features tab shows, from a run and a dictionary: active features, text shading, dashboards,
steering, ablation and attribution. Every number comes from llamaviz.features (one path for each).

The dictionary is attached with its error term (features.attached(use_error_term=True)), so a run's
logits are the model's own until a feature is edited; the run's whole sequence (prompt + generation)
is read once per dictionary and kept on the run.
"""

from __future__ import annotations

import bisect
import html
import itertools
import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch

from llamaviz import features
from llamaviz.features import analysis
from llamaviz.features import dashboards
from llamaviz.plots.tokens import display_token

from llamaviz.app import models, views
from llamaviz.app.state import LIVE_RUNS, Run

TOP_FEATURES = 12
DICTIONARY_SHARE = 4  # loaded dictionaries take at most 1/DICTIONARY_SHARE of the live-runs budget
_LOADED: OrderedDict[str, "Loaded"] = OrderedDict()  # shared by every session, least recently used first
_LOADED_LOCK = threading.Lock()


class Loaded(NamedTuple):
    """A dictionary loaded for all sessions and what is memoised on it (its logit effects, by model)."""

    sae: object
    effects: dict  # model key -> [F, 3] promoted token ids

    def nbytes(self) -> int:
        weights = sum(t.numel() * t.element_size() for t in self.sae.state_dict().values())
        return weights + sum(ids.numel() * ids.element_size() for ids in self.effects.values())


class RunActs(NamedTuple):
    """A run's feature activations, kept sparse: token t's active features are features[starts[t]:starts[t + 1]]."""

    starts: torch.Tensor  # [T + 1]
    features: torch.Tensor  # [nnz]
    values: torch.Tensor  # [nnz]
    width: int  # F

    def row(self, position: int) -> torch.Tensor:
        """[F] activations at one token."""
        low, high = int(self.starts[position]), int(self.starts[position + 1])
        return torch.zeros(self.width).index_put_((self.features[low:high],), self.values[low:high])

    def column(self, feature: int) -> torch.Tensor:
        """[T] activations of one feature at every token."""
        tokens = torch.repeat_interleave(torch.arange(len(self.starts) - 1), self.starts.diff())
        hit = self.features == feature
        return torch.zeros(len(self.starts) - 1).index_put_((tokens[hit],), self.values[hit])


def found_dictionaries(model_path: str | None) -> list[str]:
    """SAELens folders (cfg.json) in the app's checkpoints folder (models.model_dir()), its dictionaries/ (where
    `llamaviz features defaults` writes) and beside the checkpoint."""
    roots = {models.model_dir(), models.model_dir() / "dictionaries"}
    if model_path:
        checkpoint = Path(model_path)
        roots |= {checkpoint.parent, checkpoint.resolve().parent}
        roots |= {checkpoint} if checkpoint.is_dir() else set()
    found = {str(cfg.parent) for root in roots if root.is_dir() for cfg in root.glob("*/cfg.json")}
    found |= {str(cfg.parent) for root in roots if root.is_dir() for cfg in root.glob("*/layer_*/cfg.json")}
    return sorted(found)


def _loaded(path: str) -> Loaded:
    """The dictionary at `path`, loaded once per process and counted in the live-runs budget (app/state.py)."""
    if not path:
        raise ValueError("pick a dictionary: a SAELens folder (cfg.json + sae_weights.safetensors)")
    key = str(Path(path).resolve())
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    entry = Loaded(features.load(path).eval(), {})
    with _LOADED_LOCK:
        entry = _LOADED.setdefault(key, entry)
    _settle_dictionaries()
    return entry


def _settle_dictionaries() -> None:
    """Drop the least recently used dictionaries past their share of the budget; count the rest in it."""
    limit = LIVE_RUNS.max_bytes // DICTIONARY_SHARE
    with _LOADED_LOCK:
        while len(_LOADED) > 1 and sum(e.nbytes() for e in _LOADED.values()) > limit:
            _LOADED.popitem(last=False)  # sessions still holding it keep their reference; it is loaded again if asked
        held = sum(e.nbytes() for e in _LOADED.values())
    LIVE_RUNS.hold("feature dictionaries", held)


def dictionary(path: str):
    """The dictionary at `path`, shared by every session (a SAELens folder)."""
    return _loaded(path).sae


def activations(run: Run, path: str) -> RunActs:
    """The activations of every feature over the run's sequence, memoised on the run (its bytes in the budget)."""
    def compute() -> RunActs:
        sae = dictionary(path)
        with run.entry.lock:
            acts = dashboards.feature_acts(run.entry.model, sae, run.ids)[0]  # [T, F]
        rows, cols = acts.nonzero(as_tuple=True)
        starts = torch.zeros(acts.shape[0] + 1, dtype=torch.long)
        starts[1:] = torch.bincount(rows, minlength=acts.shape[0]).cumsum(0)
        return RunActs(starts, cols, acts[rows, cols], acts.shape[1])

    return views.memo(run, ("feature-acts", str(Path(path).resolve())), compute)


def promoted(run: Run, path: str, chosen: list[int], count: int = 3) -> dict[int, list[int]]:
    """The `count` tokens each chosen feature promotes most: from the dashboards file when present, else
    from the decoder (computed once per dictionary and model, kept with the dictionary)."""
    board = _dashboards(path)
    if board is not None:
        return {f: ids[:count].tolist() for f, ids in zip(chosen, board.values("promoted_ids", chosen))}
    entry, model_key = _loaded(path), run.entry.path
    if model_key not in entry.effects:
        entry.effects[model_key] = dashboards.logit_effects(run.entry.model, entry.sae, count)["promoted_ids"]
        _settle_dictionaries()
    return {f: entry.effects[model_key][f, :count].tolist() for f in chosen}


def check_position(run: Run, position) -> int:
    n = run.ids.shape[1]
    if position is None or not -n <= int(position) < n:
        raise ValueError(f"the token position must be in 0..{n - 1}; got {position!r}")
    return int(position) % n


def check_feature(path: str, feature) -> int:
    width = dictionary(path).cfg.d_sae
    if feature is None or isinstance(feature, bool) or not 0 <= int(feature) < width:
        raise ValueError(f"feature {feature!r} is out of range; accepted: 0..{width - 1}")
    return int(feature)


def _dashboards(path: str):
    try:
        return dashboards.DashboardFile(path)
    except FileNotFoundError:
        return None


def top_features(run: Run, path: str, position) -> list[tuple[int, float, float | None]]:
    """[(feature, activation, density or None)] of the most active features at `position`."""
    acts = activations(run, path).row(check_position(run, position))
    values, indices = acts.topk(min(TOP_FEATURES, acts.numel()))
    rows = [(int(i), float(v)) for v, i in zip(values, indices) if v > 0]
    board = _dashboards(path)
    density = board.values("density", [f for f, _ in rows]).tolist() if board and rows else [None] * len(rows)
    return [(f, a, d) for (f, a), d in zip(rows, density)]


def feature_list_html(run: Run, path: str, position) -> str:
    rows = top_features(run, path, position)
    if not rows:
        return "<p>No feature is active at this token.</p>"
    effects = promoted(run, path, [f for f, _, _ in rows])
    word = lambda t: display_token(run.entry.tokenizer.decode([t]))  # noqa: E731
    body = "".join(
        f'<tr data-feature="{f}"><td>{f}</td><td>{a:.3f}</td><td>{"" if d is None else f"{d:.2%}"}</td>'
        f'<td>{html.escape(" ".join(word(t) for t in effects[f]))}</td></tr>' for f, a, d in rows)
    return ('<table class="lv-features"><tr><th>feature</th><th>activation</th><th>density</th>'
            f"<th>promotes</th></tr>{body}</table>")


def word_positions(run: Run, word: str) -> list[int]:
    """Positions of the tokens covering each occurrence of `word` in the run's text (prompt + generation, any case)."""
    word = str(word or "").strip()
    pieces = [run.entry.tokenizer.decode([int(i)]) for i in run.ids[0].tolist()]
    lowered = [piece.lower() for piece in pieces]
    ends = list(itertools.accumulate(map(len, lowered)))  # character offset after each token
    text, positions = "".join(lowered), set()
    for match in re.finditer(re.escape(word.lower()), text) if word else ():
        first, last = bisect.bisect_right(ends, match.start()), bisect.bisect_left(ends, match.end())
        positions |= set(range(first, last + 1))
    if not positions:
        sample = next((p.strip() for p in pieces[run.prompt_length // 2:] if p.strip().isalpha()), "the")
        raise ValueError(f"{word!r} is not in the run's text; type a word of the prompt or the generation "
                         f"(e.g. {sample!r}), or leave the box empty for the token at the picked position")
    return sorted(positions)


def features_on(run: Run, path: str, word: str, position) -> tuple[list[int], list[tuple[int, float, int]]]:
    """The features that fire most on `word` (every token of each occurrence; empty: the token at `position`):
    (positions, [(feature, largest activation there, the position where it is reached)])."""
    positions = word_positions(run, word) if str(word or "").strip() else [check_position(run, position)]
    acts = activations(run, path)
    block = torch.stack([acts.row(p) for p in positions])  # [k, F]
    best, where = block.max(0)
    values, indices = best.topk(min(TOP_FEATURES, acts.width))
    return positions, [(int(f), float(v), positions[int(where[f])]) for v, f in zip(values, indices) if v > 0]


def token_id(run: Run, text: str) -> int:
    """The vocabulary id of `text`: a text that is one token (' cat'), or a raw vocabulary piece ('Ġcat')."""
    tok = run.entry.tokenizer
    ids = tok.encode(str(text or ""), add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    piece = tok.get_vocab().get(str(text or ""))
    if piece is not None:
        return int(piece)
    pieces = [tok.decode([i]) for i in ids]
    raise ValueError(f"{text!r} is not one token of the vocabulary"
                     + (f": it splits into {pieces}" if pieces else "")
                     + "; give a single token (a leading space belongs to the token: ' cat' differs from 'cat')")


def promoting(run: Run, path: str, text: str) -> tuple[int, list[tuple[int, float, float]]]:
    """The features whose logit effect on one token is largest: decoder row x final norm weight . W_U[token]
    (the dashboards' convention): (token id, [(feature, effect, largest activation in the run)])."""
    token, sae, model = token_id(run, text), dictionary(path), run.entry.model
    with torch.no_grad():
        direction = model.model.norm.weight.detach().float() * model.lm_head.weight[token].detach().float()  # [m]
        effects = sae.W_dec.detach().float().to(direction.device) @ direction  # [F]
    values, indices = effects.cpu().topk(min(TOP_FEATURES, sae.cfg.d_sae))
    acts = activations(run, path)
    return token, [(int(f), float(v), float(acts.column(int(f)).max())) for v, f in zip(values, indices)]


def search_html(run: Run, path: str, kind: str, query: str, position) -> str:
    """The search results as a table (kind "word": features_on; "token": promoting)."""
    tok = run.entry.tokenizer
    if kind == "word":
        positions, rows = features_on(run, path, query, position)
        where = ", ".join(str(p) for p in positions[:12]) + (" ..." if len(positions) > 12 else "")
        head = f"<p>Features firing most on {html.escape(repr(str(query or '').strip() or run.tokens[positions[0]]))} (positions {where})</p>"
        body = "".join(f'<tr data-feature="{f}"><td>{f}</td><td>{a:.3f}</td><td>{p}: '
                       f"{html.escape(display_token(tok.decode([int(run.ids[0, p])])))}</td></tr>" for f, a, p in rows)
        return (f'<div class="lv-search">{head}<table><tr><th>feature</th><th>activation</th><th>at</th></tr>'
                f"{body or '<tr><td colspan=3>none active</td></tr>'}</table></div>")
    token, rows = promoting(run, path, query)
    body = "".join(f'<tr data-feature="{f}"><td>{f}</td><td>{e:+.3f}</td><td>{a:.3f}</td></tr>' for f, e, a in rows)
    return (f'<div class="lv-search"><p>Features promoting {html.escape(display_token(tok.decode([token])))} '
            f"(token {token})</p><table><tr><th>feature</th><th>logit effect</th><th>max activation in this run</th>"
            f"</tr>{body}</table></div>")


def text_html(run: Run, path: str, feature) -> str:
    """The run's text shaded by one feature's activation at every token."""
    feature = check_feature(path, feature)
    acts = activations(run, path).column(feature)
    top = float(acts.max()) or 1.0
    spans = "".join(
        f'<span data-pos="{i}" title="{i}: {float(a):.3f}" style="background: rgba(217, 119, 6, {float(a) / top:.3f})">'
        f'{html.escape(display_token(token).replace("␣", " "))}</span>'
        for i, (token, a) in enumerate(zip(run.tokens, acts)))
    return f'<div class="lv-feature-text"><p>Feature {feature}: darker = more active (max {top:.3f}).</p>{spans}</div>'


def dashboard_html(run: Run, path: str, feature) -> str:
    feature = check_feature(path, feature)
    board = _dashboards(path)
    if board is None:
        return (f"<p>No dashboards beside {html.escape(path)}: build them with "
                "<code>llamaviz features dashboards --dictionary DIR --data PATH</code>.</p>")
    data, tok = board.feature(feature), run.entry.tokenizer
    word = lambda i: html.escape(display_token(tok.decode([int(i)])))  # noqa: E731
    contexts = []
    for ids, acts, value in zip(data["top_ids"], data["top_acts"], data["top_values"]):
        if value < 0:
            continue
        peak = float(acts.max()) or 1.0
        contexts.append("<div>" + "".join(f'<span style="background: rgba(217, 119, 6, {float(a) / peak:.3f})">'
                                          f"{word(i)}</span>" for i, a in zip(ids, acts) if i >= 0) + "</div>")
    promoted = ", ".join(f"{word(i)} ({v:+.2f})" for i, v in zip(data["promoted_ids"], data["promoted_values"].tolist()))
    suppressed = ", ".join(f"{word(i)} ({v:+.2f})" for i, v in zip(data["suppressed_ids"], data["suppressed_values"].tolist()))
    bars = "".join(f'<span style="display:inline-block;width:6px;height:{int(40 * h / max(1.0, float(data["histogram"].max())))}px;'
                   f'background:#d97706"></span>' for h in data["histogram"].tolist())
    return (f'<div class="lv-dashboard"><h4>Feature {feature}</h4><p>density {float(data["density"]):.3%}, '
            f'max activation {float(data["peak"]):.3f}</p><div class="lv-histogram">{bars}</div>'
            f"<p>promotes: {promoted}</p><p>suppresses: {suppressed}</p><h5>Top contexts</h5>{''.join(contexts)}</div>")


def steering_hook(run: Run, path: str, feature, scale: float, position) -> tuple[str, object]:
    """(hook name, fn) adding scale x the feature's decoder row to what the dictionary writes, from `position` on."""
    feature, sae = check_feature(path, feature), dictionary(path)
    position = check_position(run, position)
    direction = float(scale) * sae.W_dec[feature].detach()

    def add(x, hook):
        if x.shape[1] > 1:  # the prompt's forward: from `position` on
            x = x.clone()
            x[:, position:] += direction.to(x.dtype)
            return x
        return x + direction.to(x.dtype)  # every generated token

    return sae.cfg.hook_name_out or sae.cfg.hook_name, add


def steered(run: Run, path: str, feature, scale: float, position, new_tokens: int = 24) -> tuple[str, str]:
    """(plain, steered) continuations of the run's prompt: scale x the feature's decoder row added from position on."""
    hook = steering_hook(run, path, feature, scale, position)
    prompt = run.ids[:, :run.prompt_length]
    model, tok = run.entry.model, run.entry.tokenizer
    with run.entry.lock, torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        with model.hooks(fwd_hooks=[hook]):
            pushed = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    decode = lambda ids: tok.decode(ids[0, prompt.shape[1]:].tolist())  # noqa: E731
    return decode(plain), decode(pushed)


def _logits_with(run: Run, sae, edit=None) -> torch.Tensor:
    """Next-token logits [T, v] of the run's sequence with the dictionary attached, a latent edit optional."""
    hooks = [] if edit is None else [(f"{sae.cfg.hook_name}.hook_sae_acts_post", edit)]
    with features.attached(run.entry.model, sae, use_error_term=True):
        return run.entry.model.run_with_hooks(run.ids, return_type="logits", fwd_hooks=hooks)[0]


def ablation(run: Run, path: str, chosen: list[int], positions: list[int] | None, position) -> dict:
    """The answer's logit and the top next tokens at `position`, before and after zeroing `chosen` features."""
    sae, at = dictionary(path), check_position(run, position)
    chosen = [check_feature(path, f) for f in chosen]
    if not chosen:
        raise ValueError("name at least one feature to ablate, e.g. 12, 40")
    where = slice(None) if not positions else [check_position(run, p) for p in positions]

    def zero(acts, hook):
        acts = acts.clone()
        acts[0, where, chosen] = 0.0
        return acts

    with run.entry.lock, torch.no_grad():
        before, after = _logits_with(run, sae)[at], _logits_with(run, sae, zero)[at]
    answer = int(run.ids[0, at + 1]) if at + 1 < run.ids.shape[1] else int(before.argmax())
    top = lambda logits: [(run.entry.tokenizer.decode([i]), float(v)) for v, i in zip(*logits.topk(5))]  # noqa: E731
    return {"answer": run.entry.tokenizer.decode([answer]), "before": float(before[answer]),
            "after": float(after[answer]), "top before": top(before), "top after": top(after)}


def attribution(run: Run, path: str, position, foil_id: int | None = None, exact: int = 5) -> list[dict]:
    """Active features ranked by activation x gradient of the answer's logit (minus the foil's), the exact
    ablation effect of the `exact` largest beside the estimate (features.analysis, the library's one path).
    A BOS first token is left out: dictionaries are trained without special tokens."""
    sae, at = dictionary(path), check_position(run, position)
    model = run.entry.model
    with run.entry.lock:
        if at + 1 < run.ids.shape[1]:
            answer = int(run.ids[0, at + 1])
        else:
            with torch.no_grad():
                answer = int(_logits_with(run, sae)[at].argmax())

        def metric(logits):  # later tokens cannot move this logit: their scores are zero
            return logits[0, at, answer] - (logits[0, at, foil_id] if foil_id is not None else 0)

        result = analysis.feature_attribution(model, run.ids, sae, metric)
        start = int(run.ids[0, 0] == run.entry.tokenizer.bos_token_id)
        rows = [{"feature": feature, "position": position, "estimate": score}
                for _, position, feature, score in result.top(20, start)]
        cells = result.top_cells(exact, start)
        effects = analysis.ablation_effects(model, run.ids, sae, metric, cells) if exact else []
    for row, effect in zip(rows, effects):
        row["exact"] = float(effect)
    return rows


def export(run: Run, name: str, payload) -> str:
    """Write what the tab shows as JSON into the run's private export folder; returns the file's path."""
    folder = Path(run.export_folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"features-{name}.json"
    path.write_text(json.dumps(payload, indent=1))
    return str(path)

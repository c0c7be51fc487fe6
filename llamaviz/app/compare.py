"""Compare & patch: the run's prompt (clean) against a corrupted prompt of the same token length.

Patching sweeps come from llamaviz.interpret.pairs (itself llamaviz.interpret.patching) and hold the model's lock while
they run; a page's results and its Stop flag live in its own `Workbench` (a gr.State), so two pages
patching at once never see each other's numbers. The side-by-side view reruns both prompts once
(clean and corrupted caches, memoised on the workbench).
"""

from __future__ import annotations

import json
import threading
import torch

from llamaviz.interpret import pairs, readouts
from llamaviz.plots import analysis as figures
from llamaviz.plots.tokens import display_token, position_labels

from llamaviz.app.explain import single_token
from llamaviz.app.generating import encode_prompt
from llamaviz.app.state import Run

MODES = ("exact", "attribution", "both")
# A worked indirect-object pair: the clean prompt says who gets the drink, the corrupted one swaps the giver.
IOI_EXAMPLE = {"prompt": "When Mary and John went to the store, John gave a drink to",
               "corrupted": "When Mary and John went to the store, Mary gave a drink to",
               "answer": " Mary", "wrong": " John"}


class Stopped(Exception):
    """Raised from the progress callback when the page pressed Stop."""


class Workbench:
    """One page's analysis results: the last patching run, its Stop flag and the side-by-side caches.

    A plain class, not a dataclass: gr.State turns dataclass values into dicts for its config.
    """

    def __init__(self):
        self.result: pairs.PatchingResult | None = None
        self.tokens: list[str] = []  # [p] clean prompt pieces
        self.corrupted_tokens: list[str] = []
        self.stop = threading.Event()
        self.running = False
        self.caches: dict = {}  # "clean" / "corrupted" -> ActivationCache for the diff view
        self.explained_run: int | None = None  # run_id of the run the picker and logit attribution show

    def __deepcopy__(self, memo) -> "Workbench":
        return Workbench()  # gr.State copies its initial value per session: start empty


def clean_ids(run: Run) -> torch.Tensor:
    """The run's prompt tokens [1, p] (what was fed to the model before generating)."""
    return run.ids[:, :run.prompt_length]


def corrupted_ids(run: Run, corrupted: str) -> torch.Tensor:
    """The corrupted prompt encoded as the run's prompt was (chat template or not): [1, p]."""
    if not isinstance(corrupted, str) or not corrupted.strip():
        raise ValueError("the corrupted prompt is empty: type the clean prompt with a change, e.g. the "
                         f"indirect-object pair {IOI_EXAMPLE['corrupted']!r}")
    ids, _ = encode_prompt(run.entry, corrupted, run.settings.chat_template)
    return ids


def answer_ids(run: Run, answer: str, wrong: str) -> tuple[int, int]:
    model = run.entry.model
    if not (answer or "").strip() or not (wrong or "").strip():
        raise ValueError("type the answer and the wrong answer, each one token (e.g. ' Mary' and ' John')")
    answer_id, wrong_id = single_token(model, answer, "answer"), single_token(model, wrong, "wrong answer")
    if answer_id == wrong_id:
        raise ValueError(f"the answer and the wrong answer are the same token {answer!r}: the logit difference is 0")
    return answer_id, wrong_id


def run_patching(bench: Workbench, run: Run, corrupted: str, answer: str, wrong: str, mode: str,
                 progress=None, sweeps=tuple(pairs.SWEEPS)) -> pairs.PatchingResult:
    """Patch the pair under the model's lock; `progress(share, text)` is called often, and Stop raises Stopped.

    `sweeps` are the exact ones (the costly part); attribution patching always estimates all four.
    """
    if mode not in MODES:
        raise ValueError(f"unknown patching mode {mode!r}; accepted: {', '.join(MODES)}")
    sweeps = tuple(sweeps or ())
    if mode != "attribution" and not sweeps:
        raise ValueError(f"tick at least one exact sweep ({', '.join(pairs.SWEEPS)}) or choose attribution patching")
    clean, bad = clean_ids(run), corrupted_ids(run, corrupted)
    answer_id, wrong_id = answer_ids(run, answer, wrong)
    model = run.entry.model
    pairs.patching.sweeps.check_pair(model, bad, clean)
    bench.stop = threading.Event()

    def report(share: float, text: str) -> None:
        if bench.stop.is_set():
            raise Stopped("patching stopped")
        if progress is not None:
            progress(share, text)

    bench.running = True
    try:
        with run.entry.lock:
            result = pairs.patch_pair(model, clean.to(model.device), bad.to(model.device), answer_id, wrong_id,
                                      exact=mode != "attribution", attribution=mode != "exact",
                                      exact_names=sweeps, progress=report)
    finally:
        bench.running = False
    tok = run.entry.tokenizer
    bench.result, bench.caches = result, {}
    bench.tokens = tok.convert_ids_to_tokens(clean[0].tolist())
    bench.corrupted_tokens = tok.convert_ids_to_tokens(bad[0].tolist())
    return result


def shown_map(result: pairs.PatchingResult, name: str, mode: str) -> tuple[torch.Tensor, str]:
    """The map of one sweep the page shows (exact when it ran, else the attribution estimate) and how it was made."""
    if mode != "attribution" and name in result.exact:
        return result.exact[name], "exact"
    if name in result.attribution:
        return result.attribution[name], "attribution"
    raise ValueError(f"the {name} sweep did not run exactly: tick it, or choose attribution or both")


def block_figure(bench: Workbench, mode: str):
    blocks = {}
    for name in pairs.BLOCKS:
        try:
            values, how = shown_map(bench.result, name, mode)
        except ValueError:
            continue
        blocks[f"{name} ({how})"] = values
    if not blocks:
        raise ValueError("no block sweep ran exactly: tick resid_pre, attn_out or mlp_out, or choose attribution")
    return figures.patching_heatmap(blocks, bench.tokens, "Normalised logit difference by layer x position "
                                                          "(1 = clean, 0 = corrupted)")


def head_figure(bench: Workbench, mode: str):
    values, how = shown_map(bench.result, "heads", mode)
    return figures.head_heatmap(values, f"Normalised logit difference, each head's output at all positions ({how})")


def summary(bench: Workbench) -> str:
    """The logit differences and, when both ran, the exact-vs-attribution correlations (plain text)."""
    r = bench.result
    text = (f"clean logit difference {r.clean_diff:.3f}, corrupted {r.corrupted_diff:.3f} "
            f"(normalised: 1 = clean, 0 = corrupted)")
    correlations = {name: r.correlation(name) for name in pairs.SWEEPS}
    both = {name: c for name, c in correlations.items() if c is not None}
    if both:
        text += "; correlation exact vs attribution: " + ", ".join(f"{n} {c:.3f}" for n, c in both.items())
    return text


def tokenizations(bench: Workbench) -> str:
    shown = lambda pieces: " | ".join(display_token(p) for p in pieces)  # noqa: E731
    return f"clean: {shown(bench.tokens)}\ncorrupted: {shown(bench.corrupted_tokens)}"


# ---------------------------------------------------------------- side by side


def pair_caches(bench: Workbench, run: Run, layer: int) -> dict:
    """Clean and corrupted caches with the pattern of `layer`, the residual stream and the final scale."""
    model = run.entry.model
    layer = model.config.check_layer(layer)
    layers = model.config.num_hidden_layers
    names = readouts.resid_names(layers) + ["ln_final.hook_scale", f"blocks.{layer}.attn.hook_pattern"]
    missing = any(f"blocks.{layer}.attn.hook_pattern" not in c for c in bench.caches.values()) or not bench.caches
    if missing:
        r = bench.result
        with run.entry.lock, torch.no_grad():
            for key, ids in (("clean", r.clean_ids), ("corrupted", r.corrupted_ids)):
                _, bench.caches[key] = model.run_with_cache(ids, names_filter=names, return_type=None)
    return bench.caches


def diff_figures(bench: Workbench, run: Run, layer, head):
    """(attention of one head: clean, corrupted, difference; the logit lens of the logit difference: same)."""
    if bench.result is None:
        raise ValueError("run patching first: the side-by-side view compares the last patched pair")
    layer, head = int(layer), run.entry.config.check_head(int(head))
    caches = pair_caches(bench, run, layer)
    clean_pattern = caches["clean"]["pattern", layer][0, head].float()  # [p, k]
    bad_pattern = caches["corrupted"]["pattern", layer][0, head].float()
    labels = position_labels(bench.tokens)
    attention = figures.side_by_side({"clean": clean_pattern, "corrupted": bad_pattern,
                                      "clean − corrupted": clean_pattern - bad_pattern}, labels, labels,
                                     f"Attention of L{layer}H{head}")
    r = bench.result
    lens = {key: readouts.lens_logit_diff(caches[key], r.answer, r.wrong) for key in ("clean", "corrupted")}
    lens["clean − corrupted"] = lens["clean"] - lens["corrupted"]
    layers = run.entry.config.num_hidden_layers
    lens_figure = figures.side_by_side(lens, labels, readouts.lens_labels(layers),
                                       "Logit lens of logit(answer) − logit(wrong answer)")
    return attention, lens_figure


# ---------------------------------------------------------------- one activation from the corrupted run


def parse_positions(text, length: int) -> list[int] | None:
    """"3, 5" -> [3, 5]; empty -> None (every position); ValueError naming the range otherwise."""
    text = (text or "").replace(",", " ").split()
    if not text:
        return None
    try:
        positions = [int(t) for t in text]
    except ValueError:
        raise ValueError(f"positions must be whole numbers such as '3, 5' (0..{length - 1}); got {' '.join(text)!r}") from None
    bad = [p for p in positions if not 0 <= p < length]
    if bad:
        raise ValueError(f"positions {bad} are out of range: the prompt has positions 0..{length - 1}")
    return positions


def patch_one(bench: Workbench, run: Run, name: str, positions_text: str) -> str:
    """The clean run with one activation from the corrupted run: its logit difference and normalised metric."""
    from llamaviz.interpret.interventions import patch_activation

    r = bench.result
    if r is None:
        raise ValueError("run patching first: this patches one activation of the last patched pair")
    model = run.entry.model
    name = (name or "").strip()
    if name not in model.hook_points():
        raise ValueError(f"unknown hook point {name!r}; write a name such as 'blocks.12.hook_resid_pre' or "
                         "'blocks.9.attn.hook_z'")
    positions = parse_positions(positions_text, r.clean_ids.shape[1])
    with run.entry.lock, torch.no_grad():
        _, corrupted = model.run_with_cache(r.corrupted_ids, names_filter=[name], return_type=None)
        with model.hooks(fwd_hooks=patch_activation(name, corrupted, positions)):
            logits = model(r.clean_ids, return_type="logits")
    diff = float(pairs.logit_diff(r.answer, r.wrong)(logits))
    share = float(r.normalise(torch.tensor(diff)))
    where = "every position" if positions is None else f"positions {positions}"
    return (f"clean run with {name} at {where} from the corrupted run: logit difference {diff:.3f} "
            f"(clean {r.clean_diff:.3f}, corrupted {r.corrupted_diff:.3f}; normalised {share:.3f})")


# ---------------------------------------------------------------- export


def export_result(bench: Workbench, folder) -> tuple:
    """The patching maps as safetensors and the pair (prompts, tokens, answers, logit differences) as JSON."""
    from safetensors.torch import save_file

    r = bench.result
    if r is None:
        raise ValueError("run patching first: there is no result to export")
    tensors = {f"exact.{n}": t.contiguous() for n, t in r.exact.items()}
    tensors |= {f"attribution.{n}": t.contiguous() for n, t in r.attribution.items()}
    tensors |= {"clean_ids": r.clean_ids.cpu().contiguous(), "corrupted_ids": r.corrupted_ids.cpu().contiguous()}
    weights = folder / "patching.safetensors"
    save_file(tensors, str(weights))
    meta = {"clean_tokens": bench.tokens, "corrupted_tokens": bench.corrupted_tokens,
            "clean_ids": r.clean_ids[0].tolist(), "corrupted_ids": r.corrupted_ids[0].tolist(),
            "answer": r.answer, "wrong": r.wrong, "clean_diff": r.clean_diff, "corrupted_diff": r.corrupted_diff,
            "maps": sorted(tensors), "metric": "normalised logit difference at the last position"}
    info = folder / "patching.json"
    info.write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    return weights, info

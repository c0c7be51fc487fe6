"""A clean and a corrupted prompt side by side: their logit differences, exact and attribution patching,
and steering vectors from contrast prompts; for the notebook helpers and the web app alike.

The patching metric is the normalised logit difference, (metric - corrupted) / (clean - corrupted)
of logit(answer) - logit(wrong) at the last position: 0 = the corrupted run, 1 = the clean run.
Sweeps come from llamaviz.interpret.patching; this module only runs them and normalises.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from llamaviz.interpret import patching
from llamaviz.llama.names import get_act_name

# What the compare view sweeps: name shown -> the llamaviz.interpret.patching kind ([L, p] or [L, h]).
SWEEPS = {"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out", "heads": "attn_head_out_all_pos"}
BLOCKS = ("resid_pre", "attn_out", "mlp_out")
Progress = Callable[[float, str], None]  # progress(fraction done, what is running); raise from it to stop


def logit_diff(answer: int, wrong: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """metric(logits [b, p, v]) = logit(answer) - logit(wrong) at the last position, averaged over b."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[:, -1, answer] - logits[:, -1, wrong]).float().mean()

    return metric


@dataclass
class PatchingResult:
    """Normalised patching metric of every sweep: exact and/or estimated by attribution patching."""

    clean_ids: torch.Tensor  # [1, p]
    corrupted_ids: torch.Tensor  # [1, p]
    answer: int
    wrong: int
    clean_diff: float  # logits
    corrupted_diff: float
    exact: dict[str, torch.Tensor] = field(default_factory=dict)  # name of SWEEPS -> [L, p] or [L, h]
    attribution: dict[str, torch.Tensor] = field(default_factory=dict)

    def normalise(self, values: torch.Tensor, change: bool = False) -> torch.Tensor:
        """Metric values (or changes of it, `change`) as the share of the clean-corrupted gap they recover."""
        gap = self.clean_diff - self.corrupted_diff
        if abs(gap) < 1e-6:
            raise ValueError(f"clean and corrupted logit differences are equal ({self.clean_diff:.4f}): the "
                             "corruption changes nothing to normalise against; pick another pair")
        return (values - (0.0 if change else self.corrupted_diff)) / gap

    def correlation(self, name: str) -> float | None:
        """Pearson correlation between the exact and the attribution map of one sweep (None unless both ran)."""
        if name not in self.exact or name not in self.attribution:
            return None
        a, b = self.exact[name].flatten().double(), self.attribution[name].flatten().double()
        a, b = a - a.mean(), b - b.mean()
        denominator = float(a.norm() * b.norm())
        return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _hook_names(model, kinds) -> list[str]:
    acts = {patching.KINDS[kind].act for kind in kinds}
    return [get_act_name(act, layer) for act in acts for layer in range(model.config.num_hidden_layers)]


def patch_pair(model, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, answer: int, wrong: int,
               exact: bool = True, attribution: bool = True, names=tuple(SWEEPS), exact_names=None,
               progress: Progress | None = None) -> PatchingResult:
    """Both runs' logit differences and the normalised maps of the sweeps `names` (keys of SWEEPS).

    `exact_names` (default: `names`) limits the exact sweeps, the costly part; attribution covers `names`.
    """
    exact_names = tuple(names if exact_names is None else exact_names)
    unknown = [n for n in (*names, *exact_names) if n not in SWEEPS]
    if unknown or not names or (exact and not exact_names):
        raise ValueError(f"unknown or no sweeps {unknown or list(names)}; accepted: {', '.join(SWEEPS)}")
    if not (exact or attribution):
        raise ValueError("choose exact patching, attribution patching, or both")
    patching.sweeps.check_pair(model, corrupted_ids, clean_ids)
    for what, token in (("answer", answer), ("wrong answer", wrong)):
        if not 0 <= int(token) < model.config.vocab_size:
            raise ValueError(f"the {what} token id {token} is outside the vocabulary 0..{model.config.vocab_size - 1}")
    report = progress or (lambda share, text: None)
    metric = logit_diff(int(answer), int(wrong))
    kinds = [SWEEPS[n] for n in dict.fromkeys((*names, *exact_names))]
    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_ids, names_filter=_hook_names(model, kinds))
        corrupted_logits = model(corrupted_ids, return_type="logits")
    result = PatchingResult(clean_ids, corrupted_ids, int(answer), int(wrong), float(metric(clean_logits)),
                            float(metric(corrupted_logits)))
    result.normalise(torch.zeros(()))  # a pair the corruption does not change fails before any sweep
    if attribution:
        report(0.0, "attribution patching")
        estimates = patching.attribution_patch(model, clean_ids, corrupted_ids, metric, names=[SWEEPS[n] for n in names])
        result.attribution = {n: result.normalise(estimates[SWEEPS[n]], change=True) for n in names}
    if exact:
        for index, name in enumerate(exact_names):
            def step(done: int, total: int, index=index, name=name) -> None:
                report((index + done / total) / len(exact_names), f"exact patching: {name}")

            values = patching.generic_activation_patch(model, corrupted_ids, clean_cache, metric, SWEEPS[name], step,
                                                       last_position_only=True)  # the metric reads the last position
            result.exact[name] = result.normalise(values)
    report(1.0, "done")
    return result


# ---------------------------------------------------------------- steering


def contrast_vector(model, plus_ids: torch.Tensor, minus_ids: torch.Tensor, layer: int,
                    position: int = -1) -> torch.Tensor:
    """Activation addition's steering vector [m]: resid_pre of `layer` at `position`, plus prompt minus minus prompt."""
    layer = model.config.check_layer(layer)
    name = f"blocks.{layer}.hook_resid_pre"
    rows = []
    for what, ids in (("first", plus_ids), ("second", minus_ids)):
        p = ids.shape[1]
        if isinstance(position, bool) or not isinstance(position, int) or not -p <= position < p:
            raise ValueError(f"position {position!r} is out of range for the {what} contrast prompt ({p} tokens); "
                             f"accepted: {-p}..{p - 1}")
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=[name], return_type=None)
        rows.append(cache[name][0, position].float())
    return rows[0] - rows[1]


def check_coefficient(value) -> float:
    """The steering coefficient as a finite float; ValueError otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"the steering coefficient must be a number; got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"the steering coefficient must be a finite number; got {value!r}")
    return number

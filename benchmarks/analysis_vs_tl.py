"""llamaviz's patching vs TransformerLens' on the default model (SmolLM2-135M-Instruct GGUF), CPU, float32.

TransformerLens wraps transformers' model read from the same GGUF (a TransformerBridge in
compatibility mode, no weight processing); both get the same 15 token ids (BOS included) of an
indirect-object pair whose clean and corrupted prompts differ in one name. Runs alternate between
the libraries; the table gives medians and ratios of medians (> 1 means llamaviz is faster), and
the largest difference between the two libraries' numbers.

TransformerLens runs one full forward per patched cell, so its by-position head sweep (30 x 15 x 9
cells) takes far too long to repeat; for that row it is timed on the cells of `--tl-layers` layers
and its time scaled to the full sweep by the cell count (each of its cells costs the same forward).

    .venv/bin/python benchmarks/analysis_vs_tl.py [--runs 3] [--threads 1] [--tl-layers 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's llamaviz; tl_reference.bridge

import torch  # noqa: E402

CLEAN = "When John and Mary went to the shops, John gave the bag to"
CORRUPTED = "When John and Mary went to the shops, Mary gave the bag to"


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternate(ours, theirs, runs: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """Median seconds of llamaviz and TransformerLens, run in turn; and the last results of each."""
    times = {"ours": [], "theirs": []}
    for _ in range(runs):
        seconds, mine = timed(ours)
        times["ours"].append(seconds)
        seconds, reference = timed(theirs)
        times["theirs"].append(seconds)
    return statistics.median(times["ours"]), statistics.median(times["theirs"]), mine, reference


def load(threads: int):
    import transformers

    import llamaviz
    from tl_reference import bridge

    torch.set_num_threads(threads)
    path = llamaviz.default_model_path()
    ours, _ = llamaviz.load(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    return ours, bridge(hf)


def prompt_pair(ours, tl):
    """Token ids [1, 15] of the clean and corrupted prompts, the same for both libraries."""
    clean, corrupted = ours.to_tokens(CLEAN, prepend_bos=True), ours.to_tokens(CORRUPTED, prepend_bos=True)
    if clean.shape != corrupted.shape or not torch.equal(clean, tl.to_tokens(CLEAN)):
        raise SystemExit(f"the prompts do not tokenize alike: {ours.to_str_tokens(clean)} vs "
                         f"{ours.to_str_tokens(corrupted)} vs {tl.to_str_tokens(CLEAN)}")
    return clean, corrupted


def tl_attribution(tl, clean, corrupted, metric) -> torch.Tensor:
    """Attribution patching of every head's z, the TransformerLens way: hooks, one backward. [L, h]."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(tl.cfg.n_layers)]
    with torch.no_grad():
        _, clean_cache = tl.run_with_cache(clean, names_filter=lambda n: n in names)
    acts, grads = {}, {}

    def keep(x, hook):
        acts[hook.name] = x.detach()

    def keep_grad(grad, hook):
        grads[hook.name] = grad.detach()

    def leaf(x, hook):  # gradients flow to the activations, not to the frozen weights
        return x.detach().requires_grad_(True)

    with torch.enable_grad():
        for p in tl.parameters():
            p.requires_grad_(False)
        tl.add_hook("hook_embed", leaf)
        for name in names:
            tl.add_hook(name, keep)
            tl.add_hook(name, keep_grad, dir="bwd")
        try:
            metric(tl(corrupted)).backward()
        finally:
            tl.reset_hooks()
    return torch.stack([((clean_cache[n] - acts[n]) * grads[n]).sum(dim=(0, 1, 3)) for n in names])


def sweep_rows(ours, tl, clean, corrupted, metric, runs: int, tl_layers: int) -> list[tuple]:
    import pandas as pd
    import transformer_lens.patching as tl_patching

    from llamaviz import patching

    with torch.no_grad():
        _, cache = ours.run_with_cache(clean)
        _, tl_cache = tl.run_with_cache(clean)
    rows = []
    for name in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_all_pos"):
        mine_s, theirs_s, mine, theirs = alternate(lambda: getattr(patching, name)(ours, corrupted, cache, metric),
                                                   lambda: getattr(tl_patching, name)(tl, corrupted, tl_cache, metric),
                                                   runs)
        rows.append((f"`{name}` {tuple(mine.shape)}", mine_s, theirs_s, float((mine - theirs).abs().max())))
        report(rows[-1])
    name = "get_act_patch_attn_head_out_by_pos"
    layers, positions, heads = ours.config.num_hidden_layers, clean.shape[1], ours.config.num_attention_heads
    sample = pd.DataFrame([(layer, pos, head) for layer in range(layers // 2, layers // 2 + tl_layers)
                           for pos in range(positions) for head in range(heads)], columns=["layer", "pos", "head"])
    mine_s, sample_s, mine, theirs = alternate(
        lambda: patching.get_act_patch_attn_head_out_by_pos(ours, corrupted, cache, metric),
        lambda: tl_patching.generic_activation_patch(tl, corrupted, tl_cache, metric,
                                                     tl_patching.layer_pos_head_vector_patch_setter, "z",
                                                     index_df=sample), 1)
    mine_cells = mine[sample["layer"].tolist(), sample["pos"].tolist(), sample["head"].tolist()]
    theirs_s = sample_s * layers * positions * heads / len(sample)
    rows.append((f"`{name}` {tuple(mine.shape)} (TL: {len(sample)} cells, scaled)", mine_s, theirs_s,
                 float((mine_cells - theirs).abs().max())))
    report(rows[-1])
    return rows


def attribution_row(ours, tl, clean, corrupted, metric, runs: int) -> tuple:
    from llamaviz import patching

    mine_s, theirs_s, mine, theirs = alternate(
        lambda: patching.attribution_patch(ours, clean, corrupted, metric, names="attn_head_out_all_pos")[
            "attn_head_out_all_pos"],
        lambda: tl_attribution(tl, clean, corrupted, metric), runs)
    row = ("attribution patching, every head [L, h]", mine_s, theirs_s, float((mine - theirs).abs().max()))
    report(row)
    return row


def report(row: tuple) -> None:
    print(f"  {row[0]}: llamaviz {row[1]:.2f} s, TL {row[2]:.2f} s, ratio {row[2] / row[1]:.2f}x, "
          f"max |diff| {row[3]:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tl-layers", type=int, default=1, help="layers of cells TL runs in the by-position sweep")
    args = parser.parse_args()
    from importlib.metadata import version

    ours, tl = load(args.threads)
    print("llamaviz from", sys.modules["llamaviz"].__file__)
    clean, corrupted = prompt_pair(ours, tl)
    john, mary = ours.to_single_token(" John"), ours.to_single_token(" Mary")

    def metric(logits):  # logit difference of the clean answer over the repeated name
        return logits[0, -1, mary] - logits[0, -1, john]

    print(f"prompt pair ({clean.shape[1]} tokens): {ours.to_str_tokens(clean)} / ...{ours.to_str_tokens(corrupted)[-5:]}")
    rows = [attribution_row(ours, tl, clean, corrupted, metric, args.runs)]
    rows += sweep_rows(ours, tl, clean, corrupted, metric, args.runs, args.tl_layers)
    print(f"\nllamaviz vs TransformerLens {version('transformer-lens')} (TransformerBridge, no processing), "
          f"torch {torch.__version__}, {args.threads} thread(s), median of {args.runs} alternating runs, "
          f"default model float32, {clean.shape[1]}-token prompt pair (by-position row: one run each):\n")
    print("| measure | llamaviz (s) | TransformerLens (s) | ratio (>1 = llamaviz faster) | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, mine, theirs, diff in rows:
        print(f"| {label} | {mine:.2f} | {theirs:.2f} | {theirs / mine:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()

"""Feature dashboards vs a plain forward over the same tokens (default model), and the build's peak memory.

The same [n, context] windows of Python's own documentation (pydoc_data.topics, repeated when more
tokens are asked for) go through `model(batch)` under no_grad in the dashboards' batches, and through
llamaviz.features.dashboards.build of every feature of a dictionary. Runs alternate; the table gives
the ratio of medians (target <= 1.3x the forward). Without --dictionary a TopK dictionary of 8x the
residual width (k = 32, random weights: the build's cost depends on the width and the L0, not on what
the features mean) is made for each --hook. --memory runs each pass once more in a fresh process and
reports its peak RSS beyond what the process held before it (ru_maxrss), beside memory_bound().

    .venv/bin/python benchmarks/dashboards.py [--tokens 65536] [--context 128] [--runs 3] [--threads 2]
        [--hook blocks.15.hook_resid_post --hook blocks.29.hook_resid_post] [--dictionary DIR] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

HOOKS = ["blocks.15.hook_resid_post", "blocks.29.hook_resid_post"]


def python_docs() -> list[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


def corpus(tokenizer, tokens: int, context: int) -> torch.Tensor:
    """[n, context] windows, n = tokens // context, the documentation repeated as often as needed."""
    from llamaviz.features.data import windows

    ids = windows(tokenizer, python_docs(), context)
    n = tokens // context
    return ids.repeat((n + len(ids) - 1) // len(ids), 1)[:n]


def dictionary(model, hook: str, path: str | None):
    from llamaviz import features
    from llamaviz.features.dictionary import Dictionary, DictionaryConfig

    if path:
        return features.load(path).eval()
    width = model.config.hidden_size
    torch.manual_seed(0)
    sae = Dictionary(DictionaryConfig("topk", d_in=width, d_sae=8 * width, hook_name=hook, k=32))
    with torch.no_grad():
        sae.W_dec.normal_(0, 0.05)
        sae.W_enc.copy_(sae.W_dec.T * 4)
    return sae.eval()


def forward(model, ids: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            model(ids[start:start + batch])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """One pass in this fresh process; prints {"peak": bytes beyond the RSS before it, "bound": ...}."""
    import llamaviz
    from llamaviz.features import dashboards

    torch.set_num_threads(args.threads)
    model, tokenizer = llamaviz.load(None)
    model.eval()
    ids = corpus(tokenizer, args.tokens, args.context)
    sae = dictionary(model, args.hook[0], args.dictionary)
    before = rss_bytes()
    with tempfile.TemporaryDirectory() as folder:
        if args.child == "build":
            dashboards.build(model, sae, ids, folder)
        else:
            forward(model, ids, dashboards.BATCH)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    k = getattr(sae.cfg, "k", None)
    print(json.dumps({"peak": peak, "bound": dashboards.memory_bound(sae.cfg.d_sae, args.context, k, model.config.vocab_size)}))


def memory(args, hook: str) -> dict:
    common = [sys.executable, __file__, "--tokens", str(args.tokens), "--context", str(args.context),
              "--threads", str(args.threads), "--hook", hook] + (["--dictionary", args.dictionary] if args.dictionary else [])
    out = {}
    for name in ("forward", "build"):
        result = subprocess.run(common + ["--child", name], capture_output=True, text=True, check=True)
        out[name] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hook", action="append")
    parser.add_argument("--dictionary", help="a SAELens folder (its own hook) instead of a random 8x TopK")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--child", choices=["build", "forward"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.hook = args.hook or HOOKS
    if args.child:
        return child(args)
    import llamaviz
    from llamaviz.features import dashboards

    torch.set_num_threads(args.threads)
    model, tokenizer = llamaviz.load(None)
    model.eval()
    ids = corpus(tokenizer, args.tokens, args.context)
    saes = {hook: dictionary(model, hook, args.dictionary) for hook in (args.hook[:1] if args.dictionary else args.hook)}
    forward(model, ids[:dashboards.BATCH], dashboards.BATCH)  # warm-up
    times = {"forward": []} | {hook: [] for hook in saes}
    with tempfile.TemporaryDirectory() as folder:
        for run in range(args.runs):
            for name in (["forward", *saes] if run % 2 == 0 else [*saes, "forward"]):
                start = time.perf_counter()
                forward(model, ids, dashboards.BATCH) if name == "forward" else dashboards.build(model, saes[name], ids, folder)
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["forward"])
    print(f"\n{ids.numel():,} tokens ({len(ids)} windows of {args.context}, batches of {dashboards.BATCH}), "
          f"{args.threads} thread(s), median of {args.runs} alternating runs\n")
    print("| dictionary | dashboards vs plain forward (target <= 1.3x) | peak MiB: build / forward / bound |")
    print("| --- | ---: | ---: |")
    for hook, sae in saes.items():
        peaks = memory(args, sae.cfg.hook_name) if args.memory else None
        shown = (f"{peaks['build']['peak'] / 2**20:.0f} / {peaks['forward']['peak'] / 2**20:.0f} / "
                 f"{peaks['build']['bound'] / 2**20:.0f}") if peaks else "-"
        print(f"| {sae.cfg.architecture} {sae.cfg.d_sae} features at {sae.cfg.hook_name} | "
              f"{statistics.median(times[hook]) / plain:.2f}x | {shown} |")


if __name__ == "__main__":
    main()

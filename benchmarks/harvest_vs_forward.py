"""Harvesting activations to memory-mapped shards vs a plain forward over the same tokens (default model, CPU).

The same [n, context] windows of Python's own documentation (pydoc_data.topics) go through
`model(batch)` under no_grad, in the harvest's batches, and through llamaviz.features.harvest
writing one hook (float32) and every layer's resid_post (float16) to a fresh folder. Runs
alternate; the table gives tokens/s medians and the ratio of medians (target >= 0.9x of the
forward). `--profile` prints a cProfile of one harvest of the last configuration.

    .venv/bin/python benchmarks/harvest_vs_forward.py [--windows 48] [--context 128] [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def python_docs() -> list[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


def forward(model, ids: torch.Tensor, batch: int) -> None:
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            model(ids[start:start + batch])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=48)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import llamaviz
    from llamaviz.features import harvest as harvesting
    from llamaviz.features.data import windows

    torch.set_num_threads(args.threads)
    model, tokenizer = llamaviz.load(None)
    model.eval()
    ids = windows(tokenizer, python_docs(), args.context, max_tokens=args.windows * args.context)[:args.windows]
    batch = getattr(harvesting, "BATCH_WINDOWS", 8)
    layers = model.config.num_hidden_layers
    configs = {"1 hook (blocks.10.hook_resid_post), float32": (["blocks.10.hook_resid_post"], "float32"),
               f"{layers} hooks (every resid_post), float16": ([f"blocks.{i}.hook_resid_post" for i in range(layers)],
                                                            "float16")}
    work = Path(tempfile.mkdtemp(prefix="harvest_vs_forward-"))

    def harvest(hooks, dtype):
        folder = work / "h"
        shutil.rmtree(folder, ignore_errors=True)
        harvesting.harvest(model, tokenizer, ids, hooks, folder, dtype)

    forward(model, ids[:batch], batch)  # warm-up
    times = {"forward": []} | {name: [] for name in configs}
    for run in range(args.runs):
        for name in (["forward", *configs] if run % 2 == 0 else [*configs, "forward"]):
            start = time.perf_counter()
            forward(model, ids, batch) if name == "forward" else harvest(*configs[name])
            times[name].append(time.perf_counter() - start)
    tokens = ids.numel()
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"\n{tokens:,} tokens ({len(ids)} windows of {args.context}, batches of {batch}), {args.threads} thread(s), "
          f"median of {args.runs} alternating runs\n")
    print("| pass | tokens/s | vs plain forward (target >= 0.9x) |\n| --- | ---: | ---: |")
    for name in times:
        print(f"| {'plain forward' if name == 'forward' else 'harvest, ' + name} | {rate[name]:,.0f} | "
              f"{rate[name] / rate['forward']:.2f}x |")
    if args.profile:
        profile = cProfile.Profile()
        profile.runcall(harvest, *configs[list(configs)[-1]])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

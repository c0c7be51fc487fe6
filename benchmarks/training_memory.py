"""Peak memory of training a dictionary on a 1M- vs a 10M-token harvest: it must not grow with the corpus.

Writes two synthetic harvests (float16 memmaps of the default model's width, 576: ~1.15 GB and
~11.5 GB, in harvest.json + {hook}.npy form) under --dir, then trains a TopK SAE (8x, k 32, batch
1024) for --steps steps on each, each write and each run in a fresh process. Each run reports
ru_maxrss (which counts the pages of the memory-mapped file it touched: reclaimable page cache,
not the process's own memory), the peak anonymous RSS (RssAnon, the process's own memory, what
must not grow; sampled every 2 ms in a thread, so a buffer that lives for part of a step counts),
the median step time, and one permutation of all the tokens (the trainer draws one per step) as a
share of a step; the table gives the 10M / 1M ratios.
The harvests are deleted at the end unless --keep.

    .venv/bin/python benchmarks/training_memory.py [--dir /tmp] [--small 1000000] [--large 10000000]
        [--steps 30] [--threads 1] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

HOOK, D = "blocks.10.hook_resid_post", 576
CHUNK = 1 << 16


def write_harvest(folder: Path, tokens: int) -> None:
    """A harvest folder of `tokens` synthetic float16 rows: one random block, each chunk a multiple of it."""
    if (folder / "harvest.json").exists() and json.loads((folder / "harvest.json").read_text())["tokens"] == tokens:
        return
    need = tokens * D * 2
    if shutil.disk_usage(folder.parent).free < need * 1.05:
        raise SystemExit(f"{folder.parent} has too little free disk for {need / 2**30:.1f} GiB")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((CHUNK, D), dtype=np.float32)
    array = np.lib.format.open_memmap(folder / f"{HOOK}.npy", mode="w+", dtype=np.float16, shape=(tokens, D))
    for index, start in enumerate(range(0, tokens, CHUNK)):
        rows = min(CHUNK, tokens - start)
        array[start:start + rows] = block[:rows] * (1 + index % 7)
    array.flush()
    del array
    (folder / "harvest.json").write_text(json.dumps({"hooks": [HOOK], "tokens": tokens, "d": D, "dtype": "float16",
                                                     "windows": 0, "keep_special": False}))


def status_kib(field: str = "RssAnon") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak(threading.Thread):
    """Samples RssAnon every 2 ms, so a buffer that lives for part of a step is seen too."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = status_kib(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, status_kib())
            time.sleep(0.002)


def child(folder: Path, steps: int, threads: int) -> dict:
    """(In a fresh process) train `steps` steps; ru_maxrss, peak RssAnon, baseline RssAnon, step seconds."""
    import torch

    from llamaviz.features.harvest import open_harvest
    from llamaviz.features.training import TrainConfig, Trainer

    torch.set_num_threads(threads)
    x = open_harvest(folder, HOOK)
    baseline, sampler, seconds = status_kib(), AnonPeak(), []
    sampler.start()
    trainer = Trainer(TrainConfig(width=8 * D, k=32, batch_size=1024, steps=steps), x)
    while trainer.step < trainer.steps:
        start = time.perf_counter()
        trainer.train_step()
        seconds.append(time.perf_counter() - start)
    sampler.running = False
    sampler.join()
    start = time.perf_counter()  # what a permutation of every token costs, as the trainer draws one per step
    torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return {"ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "peak_anon_kib": sampler.peak,
            "baseline_anon_kib": baseline, "step_seconds": statistics.median(seconds[1:] or seconds),
            "permutation_seconds": time.perf_counter() - start, "tokens": len(x)}


def measure(folder: Path, args, write: int | None = None) -> dict:
    """A fresh process (Linux keeps ru_maxrss across fork + exec, so the writer runs apart too)."""
    command = [sys.executable, __file__, "--child", str(folder), "--steps", str(args.steps),
               "--threads", str(args.threads)] + (["--write", str(write)] if write else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env=os.environ | {"OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise SystemExit(f"the training run on {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--small", type=int, default=1_000_000)
    parser.add_argument("--large", type=int, default=10_000_000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the synthetic harvests")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.write:
        write_harvest(args.child, args.write)
        print("{}")
        return
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.threads)))
        return
    folders = {size: args.dir / f"training_memory-{size}" for size in (args.small, args.large)}
    try:
        for size, folder in folders.items():
            start = time.perf_counter()
            measure(folder, args, write=size)
            print(f"{size:,} tokens ready in {time.perf_counter() - start:.0f} s", flush=True)
        results = {size: measure(folder, args) for size, folder in folders.items()}
    finally:
        if not args.keep:
            for folder in folders.values():
                shutil.rmtree(folder, ignore_errors=True)
    table(results, args)


def table(results: dict, args) -> None:
    small, large = results[args.small], results[args.large]
    print(f"\nTopK SAE, width {8 * D}, k 32, batch 1024, {args.steps} steps, float16 harvest of width {D}, "
          f"{args.threads} thread(s)\n")
    print(f"| measure | {args.small:,} tokens | {args.large:,} tokens | ratio |\n| --- | ---: | ---: | ---: |")
    for key, label in (("peak_anon_kib", "peak anonymous RSS, training (MiB)"),
                       ("baseline_anon_kib", "anonymous RSS before the trainer (MiB)"),
                       ("ru_maxrss_kib", "ru_maxrss, mapped file pages included (MiB)")):
        print(f"| {label} | {small[key] / 1024:,.0f} | {large[key] / 1024:,.0f} | {large[key] / small[key]:.2f}x |")
    grow = (large["peak_anon_kib"] - large["baseline_anon_kib"]) - (small["peak_anon_kib"] - small["baseline_anon_kib"])
    print(f"| median step time | | | {large['step_seconds'] / small['step_seconds']:.2f}x |")
    for size, result in results.items():
        print(f"| one permutation of all {size:,} tokens / median step | "
              f"{result['permutation_seconds'] / result['step_seconds']:.2f} | | |")
    print(f"\ngrowth of the trainer's own memory from {args.small:,} to {args.large:,} tokens: {grow / 1024:+,.0f} MiB "
          f"(an int64 permutation of every token would be {(args.large - args.small) * 8 / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()

"""Training a TopK SAE: llamaviz's Trainer vs SAELens's own SAETrainer on the same cached activations.

The default model's blocks.<L>.hook_resid_post is harvested once over Python's own documentation
(pydoc_data.topics) into a folder (or `--harvest DIR` reuses one); both trainers read the same
memory-mapped .npy file, rows [0, 95%), with the same architecture (topk), width, k, batch size,
learning rate, steps, warm-up and decay steps, dead-latent window and thread count. SAELens runs in
the peers environment (.venv-peers, sae-lens 6.54) through benchmarks/saelens_train_worker.py.
Each side runs in a fresh process and is timed from building the SAE to the last step (its
input-scale estimate included).
Runs alternate (and swap which goes first); the table gives medians and the ratio of medians.
Both dictionaries are saved in SAELens's format and read back with llamaviz.features.load, and
the same code computes their explained variance and L0 on the held-out 5%.

    .venv/bin/python benchmarks/train_vs_saelens.py [--harvest DIR] [--layer 10] [--tokens 60000]
        [--width 8x] [--k 32] [--batch 1024] [--lr 4e-4] [--steps 100] [--runs 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

PEERS = ROOT / ".venv-peers" / "bin" / "python"
WORKER = ROOT / "benchmarks" / "saelens_train_worker.py"
HELD_OUT = 0.05


def python_docs() -> list[str]:
    """Text every machine has: the reference topics Python's help() shows."""
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


def harvest_docs(folder: Path, hook: str, tokens: int, context: int, threads: int) -> dict:
    """Harvest `hook` of the default model over Python's docs into folder; returns harvest.json plus the seconds."""
    import llamaviz
    from llamaviz.features.data import windows
    from llamaviz.features.harvest import harvest

    torch.set_num_threads(threads)
    model, tokenizer = llamaviz.load(None)
    model.eval()
    ids = windows(tokenizer, python_docs(), context, max_tokens=tokens)
    start = time.perf_counter()
    harvest(model, tokenizer, ids, [hook], folder, "float32")
    return json.loads((folder / "harvest.json").read_text()) | {"seconds": time.perf_counter() - start}


def run_llamaviz(x: np.ndarray, split: int, args, out: Path) -> float:
    """(In the worker process) seconds to build llamaviz's Trainer and run every step; the dictionary
    saved to out (SAELens's files)."""
    from llamaviz.features import save
    from llamaviz.features.job import to_dictionary
    from llamaviz.features.training import TrainConfig, Trainer

    import torch._dynamo  # noqa: F401  (Adam imports it on first use; SAELens's process has it before its timer)

    cfg = TrainConfig(architecture="topk", width=args.width, k=args.k, lr=args.lr, batch_size=args.batch,
                      steps=args.steps, seed=args.seed, dead_steps=args.dead_window)
    start = time.perf_counter()
    trainer = Trainer(cfg, x[:split])
    while trainer.step < trainer.steps:
        trainer.train_step()
    seconds = time.perf_counter() - start
    save(to_dictionary(trainer, args.hook, None, None), out)
    return seconds


def schedule(args) -> tuple[int, int]:
    """(warm-up steps, decay steps) of llamaviz's default schedule, given to SAELens too."""
    from llamaviz.features.training import TrainConfig

    cfg = TrainConfig()
    return max(1, int(cfg.warmup * args.steps)), args.steps - int((1 - cfg.decay) * args.steps)


def run_saelens(npy: Path, split: int, args, out: Path) -> float:
    """Seconds SAELens's SAETrainer took (measured in its process); its inference SAE saved to out."""
    warmup, decay = schedule(args)
    command = [str(PEERS), str(WORKER), "--npy", str(npy), "--split", str(split), "--width", str(args.width),
               "--k", str(args.k), "--batch", str(args.batch), "--lr", str(args.lr), "--steps", str(args.steps),
               "--seed", str(args.seed), "--threads", str(args.threads), "--warmup", str(warmup),
               "--decay", str(decay), "--dead-window", str(args.dead_window), "--out", str(out)]
    return worker(command, args)


def worker(command: list[str], args) -> float:
    """Run one side in a fresh process (each pays its own start-up alike); the seconds it printed."""
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "WANDB_MODE": "disabled"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{Path(command[1]).name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def held_out_scores(folder: Path, x: np.ndarray, split: int, hook: str) -> dict:
    """Explained variance and L0 on rows [split, end) of a SAELens folder read by llamaviz."""
    from llamaviz import features
    from llamaviz.features.job import evaluate

    dictionary = features.load(folder)
    dictionary.cfg.hook_name = dictionary.cfg.hook_name or hook
    scores = evaluate(dictionary, x[split:], x[split:])
    return {"explained variance": scores["explained variance"], "L0": scores["L0"],
            "dead fraction": scores["dead fraction"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--harvest", type=Path, help="a harvest folder holding the hook (made if missing)")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=60_000, help="tokens to harvest when the folder is new")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", default="8x", help="latents, or a multiple of d_model (8x)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dead-window", type=int, default=100, help="steps unfired before a latent counts as dead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # the llamaviz side, in its own process
    args = parser.parse_args()
    if not PEERS.exists():
        raise SystemExit(f"{PEERS} is missing: `make peers` builds the peers environment with sae-lens")
    args.hook = f"blocks.{args.layer}.hook_resid_post"
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="train_vs_saelens-"))
    folder = args.harvest or work / "harvest"
    info = folder / "harvest.json"
    if not info.exists() or args.hook not in json.loads(info.read_text())["hooks"]:
        info = harvest_docs(folder, args.hook, args.tokens, args.context, args.threads)
        print(f"harvested {info['tokens']:,} tokens of {args.hook} in {info['seconds']:.1f} s -> {folder}")
    from llamaviz.features.command import parse_width
    from llamaviz.features.harvest import open_harvest

    x = open_harvest(folder, args.hook)
    args.width = parse_width(args.width, x.shape[1])
    split = int(len(x) * (1 - HELD_OUT))
    if args.worker_out:
        print(json.dumps({"seconds": run_llamaviz(x, split, args, args.worker_out)}))
        return
    table(compare(x, folder / f"{args.hook}.npy", split, args, work), args, split, len(x) - split)


def compare(x: np.ndarray, npy: Path, split: int, args, work: Path) -> dict:
    """{side: {"seconds": [...], "scores": [...]}} over alternating runs."""
    sides = {"llamaviz": lambda out: worker([sys.executable, __file__, *sys.argv[1:], "--harvest",
                                             str(npy.parent), "--worker-out", str(out)], args),
             "SAELens": lambda out: run_saelens(npy, split, args, out)}
    results = {name: {"seconds": [], "scores": []} for name in sides}
    for run in range(args.runs):
        for name in (list(sides) if run % 2 == 0 else list(sides)[::-1]):
            out = work / f"{name}-{run}"
            seconds = sides[name](out)
            results[name]["seconds"].append(seconds)
            results[name]["scores"].append(held_out_scores(out, x, split, args.hook))
            print(f"run {run + 1} {name}: {seconds:.1f} s, EV {results[name]['scores'][-1]['explained variance']:.4f}",
                  flush=True)
    return results


def table(results: dict, args, split: int, held: int) -> None:
    tokens = args.steps * args.batch
    rate = {name: tokens / statistics.median(r["seconds"]) for name, r in results.items()}
    print(f"\nTopK SAE on {args.hook}: width {args.width}, k {args.k}, batch {args.batch}, lr {args.lr}, "
          f"{args.steps} steps ({tokens:,} tokens) of {split:,} training tokens; {held:,} held out; "
          f"{args.threads} thread(s); median of {args.runs} alternating runs\n")
    print("| measure | llamaviz | SAELens | llamaviz vs SAELens |\n| --- | ---: | ---: | ---: |")
    print(f"| training (tokens/s) | {rate['llamaviz']:,.0f} | {rate['SAELens']:,.0f} | "
          f"{rate['llamaviz'] / rate['SAELens']:.2f}x |")
    for key in ("explained variance", "L0", "dead fraction"):
        ours, theirs = (statistics.median(s[key] for s in results[n]["scores"]) for n in ("llamaviz", "SAELens"))
        ratio = f"{ours - theirs:+.4f}" if key != "L0" else ""
        print(f"| held-out {key} | {ours:.4f} | {theirs:.4f} | {ratio} |")


if __name__ == "__main__":
    main()

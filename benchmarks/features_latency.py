"""The Features tab's handlers on the default model, timed in this process (what the server spends per click).

    .venv/bin/python benchmarks/features_latency.py [--dictionary DIR] [--runs 5] [--threads 2]

Rows: the top features at a picked token on a fresh run (the run's feature activations are computed
by this click; target < 0.3 s) and at another token of the same run (memoised); a feature's dashboard
(target < 0.5 s); a steered 64-token greedy generation beside the plain one (alternating, ratio of
medians, target <= 1.2x; both run the full 64 tokens). Without --dictionary, model/dictionaries/sae-resid-15 (a default dictionary) is
used when present, else a dictionary is trained quickly (`llamaviz features train ... --tokens 20000`
on Python's documentation) into a temporary folder. Dashboards are built (8,192 tokens) into a copy
of the dictionary's folder when it has none. Medians are reported: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app_latency import fresh_run  # benchmarks/ is the script's folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT = " ".join(["The old lighthouse keeper climbed the stairs every night to light the lamp."] * 7)  # ~100 tokens
HOOK = "blocks.10.hook_resid_post"


def python_docs() -> list[str]:
    import pydoc_data.topics

    return [text for _, text in sorted(pydoc_data.topics.topics.items())]


def trained_dictionary(work: Path) -> Path:
    """A dictionary trained quickly on 20,000 tokens of Python's documentation (the CLI, as a user runs it)."""
    data = work / "docs.txt"
    data.write_text("\n\n".join(python_docs()))
    out = work / "sae"
    subprocess.run([sys.executable, "-m", "llamaviz", "features", "train", "--data", str(data), "--hook", HOOK,
                    "--width", "8x", "--k", "32", "--tokens", "20000", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def with_dashboards(folder: Path, work: Path) -> Path:
    """`folder` when it holds dashboards, else a copy of it with dashboards built over 8,192 tokens."""
    from llamaviz import features, load
    from llamaviz.features import dashboards
    from llamaviz.features.data import windows

    if (folder / dashboards.FILE).exists():
        return folder
    copy = work / "with-dashboards"
    shutil.copytree(folder, copy)
    model, tokenizer = load(None)
    ids = windows(tokenizer, python_docs(), 128, max_tokens=8192)
    dashboards.build(model.eval(), features.load(copy), ids, copy)
    return copy


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(folder: str, runs: int) -> dict[str, list[float]]:
    from llamaviz.app import features as fx
    from llamaviz.checkpoints.default import default_model_path

    path, rows = str(default_model_path()), {}
    add = lambda name, value: rows.setdefault(name, []).append(value)  # noqa: E731
    for _ in range(runs):
        run = fresh_run(path, PROMPT, 16).run  # app_latency's: a browser state after a generation
        add("top features at a picked token, fresh run (s)", timed(lambda: fx.feature_list_html(run, folder, -1)))
        add("  another token of the same run (s)", timed(lambda: fx.feature_list_html(run, folder, 40)))
        feature = fx.top_features(run, folder, -1)[0][0]
        add("a feature's dashboard (s)", timed(lambda: fx.dashboard_html(run, folder, feature)))
    model, prompt = run.entry.model, run.ids[:, :run.prompt_length]
    hook = fx.steering_hook(run, folder, feature, 8.0, run.prompt_length - 1)
    generate = lambda: model.generate(prompt, max_new_tokens=64, do_sample=False, stop_at_eos=False)  # noqa: E731

    def steered():
        with model.hooks(fwd_hooks=[hook]):
            generate()

    with torch.no_grad():
        generate()  # warm-up
        for index in range(runs):
            for name, fn in ([("plain", generate), ("steered", steered)] if index % 2 == 0 else
                             [("steered", steered), ("plain", generate)]):
                add(f"generate 64 tokens, {name} (s)", timed(fn))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionary", help="a SAELens folder (default: model/dictionaries/sae-resid-15, else trained quickly)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="features_latency-"))
    shipped = ROOT / "model" / "dictionaries" / "sae-resid-15"
    folder = Path(args.dictionary) if args.dictionary else shipped if (shipped / "cfg.json").exists() else \
        trained_dictionary(work)
    folder = with_dashboards(folder, work)
    rows = measure(str(folder), args.runs)
    targets = {"top features at a picked token, fresh run (s)": 0.3, "a feature's dashboard (s)": 0.5}
    print(f"\nFeatures tab handlers, default model on CPU ({os.cpu_count()} cores, {args.threads} torch threads), "
          f"dictionary {folder.name} ({folder}), median of {args.runs}\n")
    print("| measure | median | target |\n| --- | ---: | ---: |")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.3f} | {targets.get(name, '')} |")
    ratio = statistics.median(rows["generate 64 tokens, steered (s)"]) / statistics.median(rows["generate 64 tokens, plain (s)"])
    print(f"| steered / plain generation (ratio of medians) | {ratio:.2f}x | <= 1.2x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""llamaviz vs transformers on the default model (SmolLM2-135M-Instruct GGUF), CPU, float32.

Both libraries read the same GGUF file. Timings alternate between the two and report the median
of several runs; the table gives ratios (> 1 means llamaviz is better). Load time and peak memory
are measured in fresh child processes, everything else in this one.

    .venv/bin/python benchmarks/compare.py [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CHILD_LOAD = """
import json, os, resource, sys, time, torch
os.environ["HF_HUB_OFFLINE"] = "1"
torch.set_num_threads({threads})
path = {path!r}
start = time.perf_counter()
if {library!r} == "llamaviz":
    import llamaviz
    model = llamaviz.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
else:
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternate(fns: dict, runs: int) -> dict[str, float]:
    """Median seconds of each function, running them in turn `runs` times (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_in_child(library: str, path: str, threads: int) -> dict:
    code = CHILD_LOAD.format(library=library, path=path, threads=threads)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_load(path: str, runs: int, threads: int) -> list[tuple]:
    results = {"llamaviz": [], "transformers": []}
    for _ in range(runs):
        for library in results:
            results[library].append(load_in_child(library, path, threads))
    ours = {k: statistics.median(r[k] for r in results["llamaviz"]) for k in ("seconds", "peak_mib")}
    theirs = {k: statistics.median(r[k] for r in results["transformers"]) for k in ("seconds", "peak_mib")}
    return [("load time (s)", ours["seconds"], theirs["seconds"], theirs["seconds"] / ours["seconds"]),
            ("peak memory after load (MiB)", ours["peak_mib"], theirs["peak_mib"], theirs["peak_mib"] / ours["peak_mib"])]


def bench_forward_and_decode(ours, theirs, runs: int, new_tokens: int) -> list[tuple]:
    prompt = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prefill = alternate({"ours": lambda: ours(prompt), "theirs": lambda: theirs(prompt)}, runs)
    short = prompt[:, :16]
    decode = alternate({
        "ours": lambda: ours.generate(short, max_new_tokens=new_tokens, eos_token_id=[]),
        "theirs": lambda: theirs.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False, pad_token_id=0),
    }, runs)
    ours_tps, theirs_tps = new_tokens / decode["ours"], new_tokens / decode["theirs"]
    compiled = alternate({
        "ours": lambda: ours.generate(short, max_new_tokens=new_tokens, eos_token_id=[], compile=True),
        "theirs": lambda: theirs.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          do_sample=False, pad_token_id=0),
    }, runs)
    compiled_tps, theirs_again = new_tokens / compiled["ours"], new_tokens / compiled["theirs"]
    return [("prefill 512 tokens (s)", prefill["ours"], prefill["theirs"], prefill["theirs"] / prefill["ours"]),
            (f"decode, greedy {new_tokens} new (tok/s)", ours_tps, theirs_tps, ours_tps / theirs_tps),
            (f"decode, greedy {new_tokens} new, compile=True (tok/s)", compiled_tps, theirs_again,
             compiled_tps / theirs_again),
            *decode_ceilings(ours, theirs_tps, runs)]


def decode_ceilings(ours, theirs_tps: float, runs: int) -> list[tuple]:
    """What a decode step could reach if it did nothing but read the weights it multiplies.

    Two floors: the step's matrix-vector products alone, run back to back in forward order; and the
    bytes of those weights over the bandwidth of one matrix-vector product on a 512 MB matrix (no
    cache holds it). The ratio column is each ceiling over transformers' decode tokens/s.
    """
    weights = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)]  # 7 per layer + lm_head
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}

    def products_only():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    big = torch.randn(512 * 2**20 // 4 // 1024, 1024)
    vector = torch.randn(1024)
    with torch.no_grad():
        products = alternate({"products": products_only}, runs)["products"]
        seconds = alternate({"mv": lambda: torch.mv(big, vector)}, runs)["mv"]
    bandwidth = big.numel() * big.element_size() / seconds  # bytes/s
    step_bytes = sum(w.numel() * w.element_size() for w in weights)
    return [("decode ceiling: the step's matrix-vector products alone (tok/s)", 1 / products, theirs_tps,
             1 / products / theirs_tps),
            (f"decode ceiling: {step_bytes / 2**20:.0f} MiB of weights at {bandwidth / 1e9:.1f} GB/s (tok/s)",
             bandwidth / step_bytes, theirs_tps, bandwidth / step_bytes / theirs_tps)]


def bench_hooks(ours, theirs_eager, runs: int, new_tokens: int) -> list[tuple]:
    """Idle hook points, capturing every pattern, and capture while generating."""
    from llamaviz.llama.hook_points import HookPoint

    prompt = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(1))
    idle_call = HookPoint.__call__

    def compiled_out():
        HookPoint.__call__ = lambda self, x: x  # what the forward costs with no hook points at all
        try:
            ours(prompt)
        finally:
            HookPoint.__call__ = idle_call

    is_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731
    with torch.no_grad():
        forward = alternate({"hooks": lambda: ours(prompt), "none": compiled_out}, runs)
        patterns = alternate({
            "ours": lambda: ours.run_with_cache(prompt, names_filter=is_pattern),
            "theirs": lambda: theirs_eager(prompt, output_attentions=True),
        }, runs)
    short = prompt[:, :16]
    capture = alternate({
        "plain": lambda: ours.generate(short, max_new_tokens=new_tokens, eos_token_id=[]),
        "cached": lambda: ours.generate_with_cache(short, max_new_tokens=new_tokens, names_filter=is_pattern,
                                                   eos_token_id=[]),
    }, runs)
    return [
        ("forward 512, idle hook points vs none (s)", forward["hooks"], forward["none"], forward["none"] / forward["hooks"]),
        ("all patterns 512: run_with_cache vs eager output_attentions (s)", patterns["ours"], patterns["theirs"],
         patterns["theirs"] / patterns["ours"]),
        (f"generate {new_tokens}: with all patterns vs plain (s)", capture["cached"], capture["plain"],
         capture["plain"] / capture["cached"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    import llamaviz
    from llamaviz.checkpoints.default import default_model_path

    path = str(default_model_path())
    rows = [] if args.skip_load else bench_load(path, max(3, args.runs // 2), args.threads)
    ours = llamaviz.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    folder, name = os.path.split(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                               attn_implementation="sdpa").eval()
    rows += bench_forward_and_decode(ours, theirs, args.runs, args.new_tokens)
    theirs.set_attn_implementation("eager")
    rows += bench_hooks(ours, theirs, args.runs, 64)
    print(f"\nllamaviz vs transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.runs} alternating runs, default model float32\n")
    print("| measure | llamaviz | reference | ratio (>1 = llamaviz better) |")
    print("| --- | ---: | ---: | ---: |")
    for label, mine, reference, ratio in rows:
        print(f"| {label} | {mine:.3f} | {reference:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

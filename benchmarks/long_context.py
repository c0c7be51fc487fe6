"""Attention at long contexts: capture memory, view and head-score speed, and TransformerLens at 512 tokens.

    .venv/bin/python benchmarks/long_context.py memory [--tokens 2048 8192]
    .venv/bin/python benchmarks/long_context.py speed [--tokens 8192] [--runs 3]
    .venv/bin/python benchmarks/long_context.py tl [--tokens 512] [--new 64]

Default model, float32, CPU. Every measurement runs in a fresh process; memory is the process's
peak RSS (VmHWM, reset after the model is loaded and warmed up) minus its RSS at that point, so
it counts what the capture adds beyond the model. Speeds are medians of alternating runs.
A script, not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 2**20


# ----------------------------------------------------------------- inside one measured process

def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> int:
    """Return freed heap to the system (what loading left behind would hide new allocations), then
    reset VmHWM to the current RSS; returns that RSS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def load_ours():
    import llamaviz

    model, tok = llamaviz.load(dtype=torch.float32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    return model, tok


def prompt_ids(vocab: int, tokens: int) -> torch.Tensor:
    return torch.randint(10, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))


def app_capture(model, ids: torch.Tensor):
    """What the app keeps for a prompt: lazy patterns, the residual stream once, running statistics."""
    from llamaviz.app.run_stats import RunStats, kept_names

    stats = RunStats(model.config.num_hidden_layers)
    with torch.no_grad(), model.hooks(fwd_hooks=stats.hooks()):
        _, cache = model.run_with_cache(ids, names_filter=kept_names(model.config.num_hidden_layers),
                                        patterns="recompute", logits_to_keep=1)
    return cache, stats


def child_memory(case: str, tokens: int, new: int) -> dict:
    from llamaviz.llama.capture import capture_sizes

    if case == "app":  # the app process sets glibc's allocator at launch (llamaviz.app.release_freed_memory)
        from llamaviz.app import release_freed_memory

        release_freed_memory()
    model, _ = load_ours()
    ids = prompt_ids(model.config.vocab_size, tokens)
    every_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731
    base = reset_peak()
    with torch.no_grad():
        if case == "app":
            cache, _ = app_capture(model, ids)
        elif case in ("stored", "lazy"):
            _, cache = model.run_with_cache(ids, names_filter=every_pattern, patterns=case, logits_to_keep=1)
        elif case in ("generate-stored", "generate-lazy"):
            _, cache = model.generate_with_cache(ids, max_new_tokens=new, names_filter=every_pattern,
                                                 patterns=case.split("-")[1], eos_token_id=[])
        else:
            raise ValueError(case)
    names = model.resolve_hook_names(every_pattern)
    stored = sum(capture_sizes(model, names, 1, tokens, tokens, torch.float32, "stored").values())
    return {"case": case, "tokens": tokens, "peak_MiB": (rss_bytes("VmHWM") - base) / MiB,
            "stored_patterns_MiB": stored / MiB}


def child_tl(case: str, tokens: int, new: int) -> dict:
    """TransformerLens' bridge on the same GGUF weights (read by transformers), eager attention."""
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    from llamaviz.checkpoints.default import default_model_path

    path = default_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    bridge = TransformerBridge.boot_transformers(str(path.parent), hf_model=hf, tokenizer=hf_tok)
    ids = prompt_ids(hf.config.vocab_size, tokens)
    with torch.no_grad():
        bridge(torch.tensor([[1, 2, 3]]))
    every_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731
    base = reset_peak()
    with torch.no_grad():
        if case == "tl-stored":
            bridge.run_with_cache(ids, names_filter=every_pattern)
        else:  # generate with every pattern captured (TransformerLens 4: generate(return_cache=True))
            bridge.generate(ids, max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False,
                            return_type="tokens", return_cache=True, names_filter=every_pattern)
    return {"case": case, "tokens": tokens, "peak_MiB": (rss_bytes("VmHWM") - base) / MiB}


def child_speed(tokens: int, runs: int) -> dict:
    from llamaviz import analysis, plots
    from llamaviz.app.run_stats import kept_names
    from llamaviz.plots import pooling

    model, _ = load_ours()
    ids = prompt_ids(model.config.vocab_size, tokens)
    plain, capture = [], []
    with torch.no_grad():
        for _ in range(runs):  # alternating, so drift in the machine's load hits both alike
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            _, cache = model.run_with_cache(ids, names_filter=kept_names(model.config.num_hidden_layers),
                                            patterns="lazy", logits_to_keep=1)
            capture.append(time.perf_counter() - start)
    tokens_text = [f"t{i}" for i in range(tokens)]
    overview, window = [], []
    for layer, head in [(0, 0), (14, 4), (29, 8)]:
        start = time.perf_counter()
        pooled = pooling.pooled_pattern(cache, layer, head, tokens)
        plots.pooled_attention_heatmap(pooled, tokens_text, title=f"L{layer} H{head}").to_json()
        overview.append(time.perf_counter() - start)
        start = time.perf_counter()
        q0 = tokens - 64
        plots.attention_window(pooling.pattern_reader(cache, layer, head), tokens_text, (q0, tokens),
                               (q0 - 64, tokens)).to_json()
        window.append(time.perf_counter() - start)
    start = time.perf_counter()
    analysis.head_scores(cache, ids)
    scores = time.perf_counter() - start
    median = statistics.median
    return {"tokens": tokens, "plain_forward_s": median(plain), "forward_with_capture_s": median(capture),
            "capture_ratio": median(capture) / median(plain), "pooled_overview_ms": 1000 * median(overview),
            "zoomed_window_ms": 1000 * median(window), "head_scores_every_head_s": scores}


# ----------------------------------------------------------------- the driver

def measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "args": args}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["memory", "speed", "tl", "_child"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--tokens", type=int, nargs="+")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    if args.what == "_child":
        kind, case, tokens, new, runs = args.rest
        result = (child_speed(int(tokens), int(runs)) if kind == "speed" else
                  child_tl(case, int(tokens), int(new)) if kind == "tl" else child_memory(case, int(tokens), int(new)))
        print(json.dumps(result))
        return
    if args.what == "memory":
        for tokens in args.tokens or [2048, 8192]:
            print(json.dumps(measure("memory", "app", str(tokens), "0", "0")))
    elif args.what == "speed":
        for tokens in args.tokens or [8192]:
            print(json.dumps(measure("speed", "-", str(tokens), "0", str(args.runs))))
    else:
        tokens = (args.tokens or [512])[0]
        try:
            import transformer_lens  # noqa: F401
            peers = ["tl-stored", "tl-generate"]
        except ImportError:
            print("transformer_lens is not installed: measuring llamaviz alone")
            peers = []
        for case in ["stored", "lazy", "generate-stored", "generate-lazy", *peers]:
            kind = "tl" if case.startswith("tl") else "memory"
            print(json.dumps(measure(kind, case, str(tokens), str(args.new), "0")))


if __name__ == "__main__":
    main()

"""Decode speed of the static KV cache (eager and compiled) and of int4 weights, against the dynamic cache.

On the default model (SmolLM2-135M-Instruct, float32): greedy decode tokens/s, the median over
alternating rounds (every configuration runs once per round, so drifting machine load hits all
alike), and the bytes of parameters + buffers. Prints a markdown table of ratios, then how often
each int4 model (group_size 64, chosen; and 128, with a shorter last group on 576-wide rows) picks
float32's next token along float32's own greedy continuation.

    .venv/bin/python benchmarks/static_and_int4.py [--new-tokens 48] [--rounds 5] [--no-compile] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import llamaviz
from llamaviz.llama.quantize import quantize_model, weight_bytes

PROMPT = "Plants create energy through a process known as"


def decode_rate(model, ids: torch.Tensor, new_tokens: int, **options) -> float:
    """Tokens/s of the one-token steps: from the first chosen token to the last (the prompt excluded)."""
    stamps: list[float] = []

    def note(_chosen) -> None:
        if _chosen.is_cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], on_step=note, **options)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def greedy_agreement(model, quantized, ids: torch.Tensor, new_tokens: int = 256) -> float:
    """Share of float32's greedy continuation (new_tokens steps) where `quantized` picks the same next token."""
    sequence = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])  # [1, p + new_tokens]
    start = ids.shape[1] - 1  # the logits that chose the first new token
    chosen = sequence[0, ids.shape[1]:]  # [new_tokens] float32's greedy picks
    return (quantized(sequence).logits[0, start:-1].argmax(-1) == chosen).float().mean().item()


def configurations(model, int4_models: dict, compile_too: bool) -> dict[str, tuple]:
    runs = {
        "float32, dynamic cache": (model, {}),
        "float32, static cache": (model, {"cache_implementation": "static"}),
        **{f"{name}, dynamic cache": (int4_model, {}) for name, int4_model in int4_models.items()},
    }
    first_name, first_int4 = next(iter(int4_models.items()))
    if compile_too:
        runs["float32, static cache, compiled"] = (model, {"compile": True})
        runs[f"{first_name}, static cache, compiled"] = (first_int4, {"compile": True})
    return runs


def measure(runs: dict, ids: torch.Tensor, new_tokens: int, rounds: int) -> dict[str, float]:
    """Median tokens/s per configuration over `rounds` alternating rounds (after one warm-up each)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for name, (model, options) in runs.items():
        started = time.perf_counter()
        decode_rate(model, ids, new_tokens, **options)  # warm-up; compiles the compiled one
        print(f"warm-up {name}: {time.perf_counter() - started:.1f} s")
    for _ in range(rounds):
        for name, (model, options) in runs.items():
            rates[name].append(decode_rate(model, ids, new_tokens, **options))
    return {name: statistics.median(values) for name, values in rates.items()}


def table(rates: dict[str, float], sizes: dict[str, int]) -> str:
    base_rate, base_size = rates["float32, dynamic cache"], sizes["float32, dynamic cache"]
    lines = ["| configuration | decode tokens/s | speed vs float32 dynamic | weight MB | memory vs float32 |",
             "|---|---:|---:|---:|---:|"]
    for name, rate in rates.items():
        size = sizes[name]
        lines.append(f"| {name} | {rate:.1f} | {rate / base_rate:.2f}x | {size / 2**20:.0f} "
                     f"| {size / base_size:.3f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = llamaviz.load(dtype=torch.float32, device=args.device)
    int4_models = {f"int4 (group {size})": quantize_model(copy.deepcopy(model), "int4", group_size=size)
                   for size in (64, 128)}
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    runs = configurations(model, int4_models, compile_too=not args.no_compile)
    with torch.no_grad():
        rates = measure(runs, ids, args.new_tokens, args.rounds)
        agreements = {name: greedy_agreement(model, int4_model, ids) for name, int4_model in int4_models.items()}
    sizes = {name: weight_bytes(run_model) for name, (run_model, _) in runs.items()}
    print(f"\n{llamaviz.default_model_path().name} on {args.device} ({torch.get_num_threads()} threads), "
          f"{ids.shape[1]}-token prompt, {args.new_tokens} new tokens, median of {args.rounds} rounds\n")
    print(table(rates, sizes))
    print("\ngreedy next-token agreement with float32, along float32's 256-token greedy continuation:")
    for name, agreement in agreements.items():
        print(f"- {name}: {agreement:.1%}")


if __name__ == "__main__":
    main()

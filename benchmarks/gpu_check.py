"""One check of the CUDA paths when an accelerator is lent (and of the same code on CPU, `--quick`).

    .venv/bin/python benchmarks/gpu_check.py                      # cuda: about 8 minutes on one H100
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick # seconds; CI runs this

Writes gpu_check.json and gpu_check.md (--out DIR) and prints the table. Sections:
- parity against transformers on a random Llama config (the 1B-class one on a GPU, a tiny one with
  --quick) and on the default model when it is installed: logits (fp32 1e-4, bf16 2e-2), patterns of
  the SDPA path against eager (1e-5 fp32), capture while generating against run_with_cache;
- lazy patterns at long lengths (8K and 32K tokens on a GPU) with peak memory and a row checked
  against the exact softmax;
- speed against transformers in the same process: prefill and decode tokens/s, medians of
  alternating rounds, their ratio; capture overhead;
- int4 / int8 weight-only: bytes and top-1 agreement with float32;
- dictionaries: encode + decode tokens/s of a TopK SAE at the default model's width, the TopK trainer's
  tokens/s and one attribution graph's time;
- get_act_patch_resid_pre on the default model against TransformerLens (full mode, where installed).
Times are medians of alternating runs; read the ratios, not one absolute time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import llamaviz
from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.quantize import quantize_model, weight_bytes

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=32768)  # TinyLlama-1.1B's shape


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def pair(shape: dict, device: str, dtype: torch.dtype):
    """transformers' LlamaForCausalLM and ours with the same random weights."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, attn_implementation="eager")).eval()
    ours = llamaviz.LlamaForCausalLM(LlamaConfig(**shape)).eval()
    ours.load_state_dict(hf.state_dict(), strict=False)
    ours.tie_weights()
    return hf.to(device, dtype), ours.to(device, dtype)


def parity(shape: dict, device: str, positions: int) -> dict:
    rows = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        if dtype == torch.bfloat16 and not device.startswith("cuda"):
            continue
        hf, ours = pair(shape, device, dtype)
        ids = torch.randint(0, shape["vocab_size"], (2, positions), device=device)
        with torch.no_grad():
            theirs = hf(ids).logits.float()
            mine = ours(ids).logits.float()
            rows[f"logits max abs diff ({name})"] = (mine - theirs).abs().max().item()
            if dtype == torch.float32:
                rows |= pattern_parity(ours, ids) | capture_parity(ours, ids[:1])
        del hf, ours
    return rows


def pattern_parity(ours, ids) -> dict:
    """Patterns the SDPA path recomputes against the eager path's softmax, same weights."""
    _, sdpa = ours.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    eager = {}
    for layer in ours.model.layers:  # the same weights through the written-out softmax path
        eager[layer], layer.self_attn.attn_implementation = layer.self_attn.attn_implementation, "eager"
    _, reference = ours.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer, saved in eager.items():
        layer.self_attn.attn_implementation = saved
    diff = max((sdpa[name] - reference[name]).abs().max().item() for name in reference)
    return {"patterns sdpa vs eager max abs diff (fp32)": diff}


def capture_parity(ours, ids) -> dict:
    """Patterns captured while generating against one run_with_cache over the whole sequence."""
    out, cache = ours.generate_with_cache(ids, max_new_tokens=8, do_sample=False, eos_token_id=[],
                                          names_filter="blocks.0.attn.hook_pattern")
    _, reference = ours.run_with_cache(out[:, :-1], names_filter="blocks.0.attn.hook_pattern")
    got, want = cache["blocks.0.attn.hook_pattern"], reference["blocks.0.attn.hook_pattern"]
    return {"capture while generating max abs diff": (got[..., :want.shape[-2], :want.shape[-1]] - want).abs().max().item()}


def long_patterns(shape: dict, device: str, lengths: list[int]) -> dict:
    rows = {}
    ours = llamaviz.LlamaForCausalLM(LlamaConfig(**shape)).eval().to(device)
    for length in lengths:
        ids = torch.randint(0, shape["vocab_size"], (1, length), device=device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            start = time.perf_counter()
            _, cache = ours.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"), patterns="lazy")
            row = cache["pattern", 0][0, 0, length - 1]  # [k] one row, computed on read
            sync(device)
            seconds = time.perf_counter() - start
            _, exact = ours.run_with_cache(ids[:, :], names_filter="blocks.0.attn.hook_rot_q")
        rows[f"lazy patterns at {length} tokens: seconds"] = seconds
        rows[f"lazy patterns at {length} tokens: last row sums to 1 (abs err)"] = abs(row.sum().item() - 1)
        if device.startswith("cuda"):
            rows[f"lazy patterns at {length} tokens: peak GiB"] = torch.cuda.max_memory_allocated() / 2**30
        del cache, exact
    return rows


def speed(shape: dict, device: str, dtype: torch.dtype, positions: int, new_tokens: int, rounds: int) -> dict:
    hf, ours = pair(shape, device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (1, positions), device=device)
    times = {key: [] for key in ("ours prefill", "hf prefill", "ours decode", "hf decode", "ours capture")}
    with torch.no_grad():
        for _ in range(rounds):  # alternate, so drifting load hits every configuration alike
            times["ours prefill"].append(timed(lambda: ours(ids), device))
            times["hf prefill"].append(timed(lambda: hf(ids), device))
            times["ours capture"].append(timed(lambda: ours.run_with_cache(ids), device))
            times["ours decode"].append(timed(lambda: ours.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                                                    eos_token_id=[]), device))
            times["hf decode"].append(timed(lambda: hf.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                                                eos_token_id=None, min_new_tokens=new_tokens,
                                                                pad_token_id=0), device))
    median = {key: statistics.median(values) for key, values in times.items()}
    name = str(dtype).removeprefix("torch.")
    return {f"prefill tokens/s ratio ours/transformers ({name})": median["hf prefill"] / median["ours prefill"],
            f"decode tokens/s ratio ours/transformers ({name})": median["hf decode"] / median["ours decode"],
            f"capture overhead: run_with_cache / forward ({name})": median["ours capture"] / median["ours prefill"],
            f"ours prefill tokens/s ({name}, median)": positions / median["ours prefill"]}


def quantized(shape: dict, device: str, positions: int) -> dict:
    rows = {}
    _, reference = pair(shape, device, torch.float32)
    ids = torch.randint(0, shape["vocab_size"], (1, positions), device=device)
    with torch.no_grad():
        top = reference(ids).logits.argmax(-1)
    for kind in ("int4", "int8"):
        _, model = pair(shape, device, torch.float32)
        quantize_model(model, kind)
        with torch.no_grad():
            rows[f"{kind}: top-1 agreement with fp32"] = (model(ids).logits.argmax(-1) == top).float().mean().item()
        rows[f"{kind}: weight bytes / fp32"] = weight_bytes(model) / weight_bytes(reference)
    return rows


def dictionaries(device: str, tokens: int) -> dict:
    from llamaviz.features.dictionary import Dictionary, DictionaryConfig

    sae = Dictionary(DictionaryConfig("topk", d_in=576, d_sae=576 * 8, hook_name="blocks.15.hook_resid_post", k=32))
    sae = sae.to(device)
    torch.nn.init.normal_(sae.W_enc, std=0.02)
    x = torch.randn(tokens, 576, device=device)
    with torch.no_grad():
        sae(x)  # warm-up
        seconds = statistics.median(timed(lambda: sae(x), device) for _ in range(3))
    return {"TopK SAE (576 x 8x, k=32) encode+decode tokens/s": tokens / seconds}


def patching_vs_tl(device: str) -> dict:
    """get_act_patch_resid_pre on the default model, ours against TransformerLens's bridge over the same weights."""
    import sys

    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
    import analysis_vs_tl as pair
    import transformer_lens.patching as tl_patching

    from llamaviz import patching

    ours, tl = pair.load(torch.get_num_threads())
    ours, tl = ours.to(device), tl.to(device)
    clean, corrupted = (ids.to(device) for ids in pair.prompt_pair(ours, tl))
    john, mary = ours.to_single_token(" John"), ours.to_single_token(" Mary")
    metric = lambda logits: logits[0, -1, mary] - logits[0, -1, john]  # noqa: E731
    with torch.no_grad():
        _, cache = ours.run_with_cache(clean)
        _, tl_cache = tl.run_with_cache(clean)
    mine_s, theirs_s, mine, theirs = pair.alternate(
        lambda: patching.get_act_patch_resid_pre(ours, corrupted, cache, metric),
        lambda: tl_patching.get_act_patch_resid_pre(tl, corrupted, tl_cache, metric), 3)
    return {"get_act_patch_resid_pre speed-up over TransformerLens": theirs_s / mine_s,
            "get_act_patch_resid_pre max abs diff vs TransformerLens": float((mine - theirs).abs().max())}


def training_and_graphs(device: str, quick: bool) -> dict:
    """Tokens/s of the TopK trainer on random activations, and the time of one attribution graph (tiny shapes)."""
    import numpy as np

    from llamaviz import graphs
    from llamaviz.features.training import TrainConfig, Trainer
    from llamaviz.features.transcoder_set import TranscoderSet, transcoder

    d, width = (64, 512) if quick else (576, 4608)
    x = np.random.default_rng(0).standard_normal((4096 * (2 if quick else 16), d)).astype(np.float32)
    trainer = Trainer(TrainConfig(architecture="topk", width=width, k=32, batch_size=1024, steps=4 if quick else 32), x)
    seconds = timed(lambda: [trainer.train_step() for _ in range(trainer.steps)], "cpu")
    rows = {"TopK trainer tokens/s (cpu tensors)": trainer.steps * 1024 / seconds}
    _, model = pair(TINY, "cpu", torch.float32)
    tcs = TranscoderSet([transcoder(layer, 64, 256) for layer in range(TINY["num_hidden_layers"])])
    with torch.no_grad():
        for tc in tcs:
            for param in tc.parameters():
                param.normal_(0, 0.1)
    ids = torch.randint(0, TINY["vocab_size"], (1, 32))
    rows["attribution graph, tiny model, 32 tokens: seconds"] = timed(lambda: graphs.attribute(model, tcs, ids), "cpu")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and lengths (CPU, CI)")
    parser.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.md")
    args = parser.parse_args(argv)
    quick, device = args.quick, args.device
    shape = TINY if quick else ONE_B
    report = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
              "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"), "quick": quick, "results": {}}
    sections = [
        ("parity", lambda: parity(shape, device, 16 if quick else 512)),
        ("long", lambda: long_patterns(TINY if quick else shape, device, [256] if quick else [8192, 32768])),
        ("speed fp32", lambda: speed(shape, device, torch.float32, 32 if quick else 2048, 4 if quick else 64,
                                     2 if quick else 5)),
        ("quantized", lambda: quantized(shape, device, 16 if quick else 256)),
        ("dictionaries", lambda: dictionaries(device, 256 if quick else 65536)),
        ("training and graphs", lambda: training_and_graphs(device, quick)),
    ]
    if not quick:
        sections.append(("patching vs TransformerLens", lambda: patching_vs_tl(device)))
    if device.startswith("cuda"):
        sections.insert(3, ("speed bf16", lambda: speed(shape, device, torch.bfloat16, 2048, 64, 5)))
    for name, run in sections:
        try:
            report["results"].update(run())
        except Exception as err:  # one failing section must not hide the others' figures
            report["results"][f"{name}: failed"] = f"{type(err).__name__}: {err}"
        print(f"{name}: done", flush=True)
    write(report, Path(args.out))
    return report


def write(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gpu_check.json").write_text(json.dumps(report, indent=2))
    lines = [f"GPU check on {report['device']}, torch {report['torch']}, {report['when']}"
             + (" (quick)" if report["quick"] else ""), "", "| measure | value |", "| --- | ---: |"]
    for key, value in report["results"].items():
        lines.append(f"| {key} | {value:.3g} |" if isinstance(value, float) else f"| {key} | {value} |")
    (folder / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

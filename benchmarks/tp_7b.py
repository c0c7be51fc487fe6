"""Tensor-parallel loading on Llama-2-7B's shapes: peak memory per rank, a captured forward, the mask printout.

Writes a random checkpoint with Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000)
in bfloat16 safetensors, sharded in 1 GiB files, to a temporary folder (the Llama 2 tokenizer from
../shared/fixtures beside it), then measures, each in fresh processes:

- single-process load: peak RSS growth / the weights' bytes (target <= 1.15);
- TP over --ranks ranks (torchrun, gloo on CPU): each rank's peak RSS growth / the weights' bytes (target <= 0.6 for 2);
- a forward of 16 tokens capturing layer 0's attention pattern, one process and TP;
- the mask-only AttentionMaskVisualizer on the folder (reads config + tokenizer only; target < 2 s).

    .venv/bin/python benchmarks/tp_7b.py [--layers 32] [--ranks 2] [--runs 3]

--layers N keeps every per-layer shape and uses N decoder layers (the full model is 32: 13.5 GB),
for machines without the memory for the whole model and its two copies' worth of loading.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "fixtures" / "llama2-tokenizer"
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                 torch_dtype="bfloat16", architectures=["LlamaForCausalLM"], model_type="llama")
SHARD_BYTES = 1 << 30
PROMPT = "Plants create energy through a process known as photosynthesis, which turns light into sugar"


def write_checkpoint(folder: Path, layers: int) -> int:
    """Random bf16 weights in 1 GiB safetensors shards + index + config + tokenizer; returns the weights' bytes."""
    import torch
    from safetensors.torch import save_file

    config = {**LLAMA2_7B, "num_hidden_layers": layers}
    m, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, m)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (m, m), p + "self_attn.k_proj.weight": (m, m),
                       p + "self_attn.v_proj.weight": (m, m), p + "self_attn.o_proj.weight": (m, m),
                       p + "mlp.gate_proj.weight": (f, m), p + "mlp.up_proj.weight": (f, m),
                       p + "mlp.down_proj.weight": (m, f), p + "input_layernorm.weight": (m,),
                       p + "post_attention_layernorm.weight": (m,)})
    shapes.update({"model.norm.weight": (m,), "lm_head.weight": (v, m)})
    weight_map, shard, shard_bytes, total, index = {}, {}, 0, 0, 0
    generator = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, shard_bytes, index
        index += 1
        save_file(shard, str(folder / f"model-{index:05d}.safetensors"), metadata={"format": "pt"})
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) if len(shape) == 2 \
            else torch.ones(shape, dtype=torch.bfloat16)
        if shard and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        weight_map[name] = index + 1
        shard_bytes += tensor.nbytes
        total += tensor.nbytes
    flush()
    count = index
    names = {name: f"model-{i:05d}.safetensors" for name, i in weight_map.items()}
    for i in range(1, count + 1):  # HF's names say how many shards there are
        os.rename(folder / f"model-{i:05d}.safetensors", folder / f"model-{i:05d}-of-{count:05d}.safetensors")
    names = {name: file.replace(".safetensors", f"-of-{count:05d}.safetensors") for name, file in names.items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": names}))
    (folder / "config.json").write_text(json.dumps(config))
    for file in TOKENIZER.iterdir():
        shutil.copy(file, folder / file.name)
    return total


CHILD = """
import json, os, resource, sys, time
sys.path.insert(0, {repo!r})
import torch
import llamaviz
from llamaviz.llama import LlamaForCausalLM

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

tp = {tp!r}
before = rss()
start = time.perf_counter()
model = LlamaForCausalLM.from_pretrained({folder!r}, **({{"tp_plan": "auto"}} if tp else {{}}))
load_s = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
tok = llamaviz.AutoTokenizer.from_pretrained({folder!r})
ids = torch.tensor([tok.encode({prompt!r})[:16]])
times = []
for _ in range({runs}):
    start = time.perf_counter()
    logits, cache = model.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
    times.append(time.perf_counter() - start)
rank = int(os.environ.get("RANK", 0))  # each process writes its own file: ranks' stdout lines interleave
after_forward = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"rank": rank, "load_s": load_s, "peak_growth": peak - before,
                  "forward_peak_growth": after_forward - before,
                  "forward_s": sorted(times)[len(times) // 2], "threads": torch.get_num_threads(),
                  "pattern_shape": list(cache["blocks.0.attn.hook_pattern"].shape)}}),
      file=open(os.path.join({results!r}, f"{{'tp' if tp else 'single'}}{{rank}}.json"), "w"))
"""

CHILD_MASK = """
import sys, time
sys.path.insert(0, {repo!r})
import contextlib, io
from llamaviz import AttentionMaskVisualizer
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    AttentionMaskVisualizer({folder!r})({prompt!r})
print(time.perf_counter() - start)
"""


def run_child(code: str, torchrun_ranks: int = 0) -> list[str]:
    if torchrun_ranks:
        script = Path(tempfile.mkstemp(suffix=".py")[1])
        script.write_text(code)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun_ranks),
                   "--master-addr", "127.0.0.1", "--master-port", "29617", str(script)]
    else:
        script, command = None, [sys.executable, "-c", code]
    try:
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        if script is not None:
            script.unlink()
    if out.returncode:
        raise SystemExit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (Llama-2-7B has 32)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="forwards per measurement (the median is reported)")
    parser.add_argument("--keep", metavar="FOLDER", help="write the checkpoint here and keep it")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="llamaviz-7b-"))
    folder.mkdir(parents=True, exist_ok=True)
    results = None
    try:
        start = time.perf_counter()
        if (folder / "model.safetensors.index.json").is_file():  # --keep FOLDER from an earlier run
            total = json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        else:
            total = write_checkpoint(folder, args.layers)
        print(f"checkpoint: {args.layers} layers of Llama-2-7B's shapes, {total / 2**30:.2f} GiB bf16, "
              f"ready in {time.perf_counter() - start:.0f} s in {folder}")
        results = Path(tempfile.mkdtemp(prefix="llamaviz-7b-results-"))
        fields = dict(repo=str(REPO), folder=str(folder), prompt=PROMPT, runs=args.runs, results=str(results))
        run_child(CHILD.format(tp=False, **fields))
        single = json.loads((results / "single0.json").read_text())
        run_child(CHILD.format(tp=True, **fields), args.ranks)
        ranks = [json.loads((results / f"tp{rank}.json").read_text()) for rank in range(args.ranks)]
        masks = [float(run_child(CHILD_MASK.format(**fields))[-1]) for _ in range(args.runs)]
        report(total, single, sorted(ranks, key=lambda r: r["rank"]), masks)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        if results is not None:
            shutil.rmtree(results, ignore_errors=True)


def report(total: int, single: dict, ranks: list[dict], masks: list[float]) -> None:
    gib = 2**30
    print(f"| measurement | value | ratio to weights ({total / gib:.2f} GiB) |")
    print("|---|---|---|")
    print(f"| single-process load: peak RSS growth | {single['peak_growth'] / gib:.2f} GiB "
          f"({single['load_s']:.1f} s) | {single['peak_growth'] / total:.3f} (target <= 1.15) |")
    print(f"| single process, peak RSS growth once forwards touched every weight | "
          f"{single['forward_peak_growth'] / gib:.2f} GiB | {single['forward_peak_growth'] / total:.3f} |")
    for r in ranks:
        print(f"| TP rank {r['rank']} of {len(ranks)}: peak RSS growth, load / after forwards | "
              f"{r['peak_growth'] / gib:.2f} / {r['forward_peak_growth'] / gib:.2f} GiB ({r['load_s']:.1f} s) | "
              f"{r['peak_growth'] / total:.3f} / {r['forward_peak_growth'] / total:.3f} (target <= 0.6) |")
    print(f"| forward, 16 tokens, layer 0 pattern captured, 1 process ({single['threads']} thread(s)), median | "
          f"{single['forward_s']:.2f} s | pattern {single['pattern_shape']} |")
    print(f"| forward, same, TP {len(ranks)} ranks ({ranks[0]['threads']} thread each) | "
          f"{max(r['forward_s'] for r in ranks):.2f} s | pattern {ranks[0]['pattern_shape']} |")
    print(f"| AttentionMaskVisualizer(folder)(prompt), mask only, after imports | "
          f"{statistics.median(masks):.2f} s (median of {len(masks)}) | target < 2 s |")


if __name__ == "__main__":
    main()

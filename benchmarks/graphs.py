"""Attribution graphs: llamaviz vs circuit-tracer 0.5 (nnsight backend, in .venv-peers), default model, CPU, float32.

Both build the graph of the same prompt (BOS first) with the same transcoder set and node budget;
each run is a fresh child process (time of each phase, peak resident memory from ru_maxrss), the two
libraries alternate, and the table gives medians and the ratio of medians (> 1: llamaviz is faster).
circuit-tracer reads the model as a transformers LlamaForCausalLM folder written from the GGUF.

    .venv/bin/python benchmarks/graphs.py [--set DIR] [--lengths 32 256 1024] [--budgets 7500 512 256]
        [--peer-lengths 32] [--runs 1] [--threads 2]

--set defaults to model/dictionaries/transcoders when present, else a random JumpReLU set 2x the
model's width (thresholds at each layer's 98.9th percentile of pre-activations on a calibration text,
so about 13 features fire per position) written to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / ".venv-peers" / "bin" / "python"
TEXT = ("The quick brown fox jumps over the lazy dog while the river runs to the sea and the children "
        "count the boats that pass under the old stone bridge near the market square. ")


def prompt_ids(model_tokenizer, length: int, bos: int):
    import torch

    ids = model_tokenizer.encode(TEXT * (1 + length // 20))
    return torch.tensor([bos] + [i for i in ids if i != bos][: length - 1])


def random_set(model, tokenizer, folder: Path):
    """A JumpReLU set 2x wide whose thresholds let ~1.1% of features fire on ordinary text."""
    import torch

    from llamaviz import features
    from llamaviz.features.transcoder_set import transcoder

    m, layers = model.config.hidden_size, model.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    ids = prompt_ids(tokenizer, 128, model.config.bos_token_id)[None]
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("mlp.hook_in"))
        sets = []
        for layer in range(layers):
            tc = transcoder(layer, m, 2 * m, "jumprelu", skip=False)
            tc.W_enc.copy_(torch.randn(m, 2 * m, generator=generator) / m ** 0.5)
            tc.W_dec.copy_(torch.randn(2 * m, m, generator=generator) / (2 * m) ** 0.5)
            tc.b_enc.zero_(), tc.b_dec.zero_()
            pre = cache[f"blocks.{layer}.mlp.hook_in"][0, 1:] @ tc.W_enc
            tc.threshold.fill_(float(pre.flatten().quantile(0.989)))
            sets.append(tc)
    features.save_transcoder_set(features.TranscoderSet(sets, model_name="SmolLM2-135M-Instruct"), folder)


def transformers_folder(model, folder: Path) -> None:
    """The model as a transformers folder with a stand-in word-level tokenizer (ids are passed directly)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    bos = model.config.bos_token_id
    vocab = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.config.vocab_size)}, unk_token="t0"))
    vocab.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=vocab, bos_token=f"t{bos}", unk_token="t0").save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def ours(work: Path, set_dir: Path, threads: int) -> dict:
    """One llamaviz graph in this (child) process: phases in seconds and peak memory."""
    import resource

    import torch
    from safetensors.torch import load_file, save_file

    import llamaviz
    from llamaviz import features, graphs
    from llamaviz.graphs.attribution import _batches, _Rows
    from llamaviz.graphs.replacement import ReplacementRun

    torch.set_num_threads(threads)
    inputs = load_file(str(work / "graph_inputs.safetensors"))
    start = time.perf_counter()
    model, _ = llamaviz.load(None, dtype=torch.float32)
    transcoders = features.load_transcoder_set(set_dir)
    loaded = time.perf_counter()
    with torch.no_grad():
        run = ReplacementRun(model, transcoders, inputs["ids"][None])
        rows = _Rows(run, 10, 0.95, int(inputs["budget"]) or None)
    setup = time.perf_counter()
    batch = int(inputs["batch"])
    for chunk in _batches(list(range(rows.n_l)), batch):
        rows.compute([rows.n_f + rank for rank in chunk])
    logits = time.perf_counter()
    while rows.visited.sum() < rows.budget:
        for chunk in _batches(rows.ranking(4 * batch), batch):
            rows.compute(chunk)
    feature_rows = time.perf_counter()
    graph = rows.graph()
    packaged = time.perf_counter()
    graphs.prune(graph)
    pruned = time.perf_counter()
    save_file({"rows": graph.rows.contiguous(), "features": graph.features.contiguous(),
               "logit_tokens": graph.logit_tokens.contiguous()}, str(work / "llamaviz_graph.safetensors"))
    return {"load": loaded - start, "setup": setup - loaded, "logit rows": logits - setup,
            "feature rows": feature_rows - logits, "package": packaged - feature_rows,
            "graph": packaged - loaded, "prune": pruned - packaged,
            "active": rows.n_f, "nodes": len(graph.features),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


PHASES = {"setup": r"Precomputation completed in ([\d.]+)s", "forward": r"Forward pass completed in ([\d.]+)s",
          "logit rows": r"Logit attributions completed in ([\d.]+)s",
          "feature rows": r"Feature attributions completed in ([\d.]+)s", "graph": r"Attribution completed in ([\d.]+)s"}


def run_child(library: str, work: Path, set_dir: Path, threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if library == "llamaviz":
        command = [sys.executable, __file__, "--child", str(work), "--set", str(set_dir), "--threads", str(threads)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    command = [str(PEERS), str(ROOT / "tests" / "peers_check.py"), "graph", str(work)]
    done = subprocess.run(command, capture_output=True, text=True, env=env | {"PEERS_VERBOSE": "1"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    found = {name: float(m.group(1)) for name, pattern in PHASES.items()
             if (m := re.search(pattern, done.stdout + done.stderr))}
    peak = re.search(r"peak_mib ([\d.]+)", done.stdout + done.stderr)
    return found | {"peak_mib": float(peak.group(1)) if peak else float("nan")}


def prepare(args) -> tuple:
    import torch

    import llamaviz
    from safetensors.torch import save_file

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = llamaviz.load(None, dtype=torch.float32)
    default = ROOT / "model" / "dictionaries" / "transcoders"
    set_dir = Path(args.set) if args.set else default if (default / "config.yaml").exists() else work / "set"
    if not (set_dir / "config.yaml").exists():
        random_set(model, tokenizer, set_dir)
    if args.peer_lengths and not (work / "model" / "config.json").exists():
        transformers_folder(model, work / "model")
    return work, set_dir, tokenizer, model, save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default=None)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--budgets", type=int, nargs="+", default=[7500, 512, 256])
    parser.add_argument("--peer-lengths", type=int, nargs="*", default=[32])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--work", default="/tmp/llamaviz-graph-bench")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ours(Path(args.child), Path(args.set), args.threads)))
        return
    import torch

    work, set_dir, tokenizer, model, save_file = prepare(args)
    print(f"transcoder set: {set_dir}; threads {args.threads}; batch {args.batch}")
    for length, budget in zip(args.lengths, args.budgets):
        ids = prompt_ids(tokenizer, length, model.config.bos_token_id)
        save_file({"ids": ids, "budget": torch.tensor(budget), "batch": torch.tensor(args.batch)},
                  str(work / "graph_inputs.safetensors"))
        libraries = ["llamaviz"] + (["circuit-tracer"] if length in args.peer_lengths else [])
        results = {name: [] for name in libraries}
        for _ in range(args.runs):
            for name in libraries:  # alternating
                results[name].append(run_child(name, work, set_dir, args.threads))
        report(length, budget, results)
        if "circuit-tracer" in results:
            print("  " + same_adjacency(work))


def same_adjacency(work: Path) -> str:
    """How the last runs' graphs compare: their visited features, and the adjacency over every node, with
    circuit-tracer's nodes put in our order (its position-0 error columns are zero by its convention)."""
    import torch
    from safetensors.torch import load_file

    ours_, theirs = load_file(str(work / "llamaviz_graph.safetensors")), load_file(str(work / "graph.safetensors"))
    their_features = theirs["active"][theirs["selected"]].tolist()
    where = {tuple(f): i for i, f in enumerate(their_features)}
    mine = [tuple(f) for f in ours_["features"].tolist()]
    if sorted(mine) != sorted(where) or not torch.equal(ours_["logit_tokens"], theirs["logit_tokens"]):
        common = len(set(mine) & set(where))
        return f"adjacency: not compared, the visited features differ ({common} of {len(mine)} in common)"
    n_f, n = len(mine), ours_["rows"].shape[1]
    order = torch.tensor([where[f] for f in mine] + list(range(n_f, n)))
    targets = torch.cat([torch.arange(n_f), torch.arange(n - len(ours_["logit_tokens"]), n)])
    their_rows = theirs["adjacency"][order[targets]][:, order].to(ours_["rows"].dtype)
    p = load_file(str(work / "graph_inputs.safetensors"))["ids"].numel()
    compared = torch.ones(n, dtype=torch.bool)
    compared[n_f: n_f + ((n - n_f - len(ours_["logit_tokens"])) // p - 1) * p: p] = False  # position-0 errors
    difference = float((ours_["rows"] - their_rows)[:, compared].abs().max())
    scale = float(ours_["rows"].abs().max())
    return (f"adjacency: the same {n_f} visited features; max |difference| {difference:.2e} "
            f"(largest entry {scale:.2e}, relative {difference / max(scale, 1e-30):.1e})")


def report(length: int, budget: int, results: dict) -> None:
    print(f"\n{length} tokens, node budget {budget}")
    for name, runs in results.items():
        keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
        print(f"  {name}: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in keys))
    if "circuit-tracer" in results:
        ours_, theirs = (statistics.median(r["graph"] for r in results[n]) for n in ("llamaviz", "circuit-tracer"))
        print(f"  graph time ratio (circuit-tracer / llamaviz, medians): {theirs / ours_:.2f}")


if __name__ == "__main__":
    main()

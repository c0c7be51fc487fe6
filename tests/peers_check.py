"""Run inside .venv-peers (sae-lens, circuit-tracer): read llamaviz's files with the peers, write their numbers.

    .venv-peers/bin/python tests/peers_check.py WORK

WORK holds inputs.safetensors ("x" [n, d]), saes/<name>/ (SAELens folders written by llamaviz) and
set/ (a circuit-tracer transcoder set written by llamaviz). Writes WORK/peers.safetensors with each
SAE's acts and reconstruction as SAELens computes them, each transcoder layer's as circuit-tracer
does, and saes_resaved/<name>/ as SAELens's save_model writes them.
"""

import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def main(work: Path) -> None:
    from sae_lens import SAE

    x = load_file(str(work / "inputs.safetensors"))["x"]
    out = {}
    for folder in sorted((work / "saes").iterdir()):
        sae = SAE.load_from_disk(str(folder), device="cpu")
        with torch.no_grad():
            acts = sae.encode(x)
            out[f"{folder.name}.acts"], out[f"{folder.name}.recons"] = acts, sae(x)  # forward: skip paths too
        sae.save_model(str(work / "saes_resaved" / folder.name))
        meta = sae.cfg.metadata  # what SAELens read from our cfg.json, as SAELens spells it
        out[f"{folder.name}.metadata"] = torch.tensor([ord(c) for c in "|".join(
            str(meta.get(key)) for key in ("hook_name", "model_name", "context_size", "prepend_bos"))])
    from circuit_tracer.utils.hf_utils import load_transcoders

    config = yaml.safe_load((work / "set" / "config.yaml").read_text())
    transcoders = load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False)
    with torch.no_grad():
        for layer, tc in enumerate(transcoders):
            acts = tc.encode(x)
            out[f"set.{layer}.acts"], out[f"set.{layer}.out"] = acts, tc.decode(acts, x)
    out["set.input_hook"] = torch.tensor([ord(c) for c in transcoders.feature_input_hook])
    save_file({k: v.contiguous() for k, v in out.items()}, str(work / "peers.safetensors"))


if __name__ == "__main__" and len(sys.argv) == 2:
    main(Path(sys.argv[1]))


def graph_main(work: Path) -> None:
    """WORK holds model/ (a transformers folder), set/ (a transcoder set) and graph_inputs.safetensors ("ids" [p],
    "budget", "batch"); writes graph.safetensors: circuit-tracer's adjacency, active and selected features,
    logit tokens, and each phase's seconds (nnsight backend, float32)."""
    import os
    import resource
    import time

    from circuit_tracer import attribute
    from circuit_tracer.replacement_model import ReplacementModel
    from circuit_tracer.utils.hf_utils import load_transcoders

    inputs = load_file(str(work / "graph_inputs.safetensors"))
    config = yaml.safe_load((work / "set" / "config.yaml").read_text())
    dtype = torch.float64 if int(inputs.get("float64", torch.tensor(0))) else torch.float32
    start = time.perf_counter()
    transcoders = load_transcoders(config, device=torch.device("cpu"), dtype=dtype, lazy_decoder=False)
    model = ReplacementModel.from_pretrained_and_transcoders(str(work / "model"), transcoders, backend="nnsight",
                                                             device=torch.device("cpu"), dtype=dtype)
    loaded = time.perf_counter()
    budget = int(inputs["budget"])
    graph = attribute(inputs["ids"], model, max_feature_nodes=budget or None, batch_size=int(inputs["batch"]),
                      verbose=bool(os.environ.get("PEERS_VERBOSE")))  # the benchmark reads its phase lines
    done = time.perf_counter()
    print(f"peak_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    save_file({"adjacency": graph.adjacency_matrix.contiguous(), "active": graph.active_features.contiguous(),
               "selected": graph.selected_features.contiguous(), "logit_tokens": torch.tensor(
                   [int(getattr(t, "vocab_idx", t)) for t in graph.logit_targets]),
               "seconds": torch.tensor([loaded - start, done - loaded])}, str(work / "graph.safetensors"))


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "graph":
    graph_main(Path(sys.argv[2]))

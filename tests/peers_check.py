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


if __name__ == "__main__":
    main(Path(sys.argv[1]))

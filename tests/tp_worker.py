"""One rank of a tensor-parallel run, started by tests/test_parallel.py the way torchrun starts it.

    python tests/tp_worker.py CHECKPOINT OUT_FOLDER [fail]

Loads CHECKPOINT with tp_plan="auto", runs the checks of test_parallel.py and writes what it saw to
OUT_FOLDER/rank{R}.safetensors; then what the web app does, from rank 0 alone with the other
ranks following its forwards, to OUT_FOLDER/led{R}.safetensors; `fail` makes rank 1 raise after
loading, before its first forward.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamaviz.interpret.interventions import ablate_heads, patch_activation, steer  # noqa: E402
from llamaviz.llama import LlamaForCausalLM  # noqa: E402

PROMPT = [[5, 17, 33, 2, 48, 9, 71, 12]]  # [1, p] ids inside every vocabulary used here
OTHER = [[5, 60, 33, 8, 48, 19, 71, 30]]  # the patching donor


def ablated_head(config) -> tuple[int, int]:
    """(layer, head): the last query head, which the last rank holds."""
    return config.num_hidden_layers - 1, config.num_attention_heads - 1


def run_checks(model) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor the test compares with the single-process model, and what the hooks saw."""
    ids, other = torch.tensor(PROMPT), torch.tensor(OTHER)
    results = {"logits": model(ids).logits}
    logits, cache = model.run_with_cache(ids)
    results.update({f"cache.{name}": tensor for name, tensor in cache.items()})
    layer, head = ablated_head(model.config)
    with model.hooks(fwd_hooks=ablate_heads([(layer, head)], model=model)):
        results["ablated"] = model(ids).logits
    with model.hooks(fwd_hooks=ablate_heads({0: [0, head]}, mode="mean", model=model)):
        results["mean_ablated"] = model(ids).logits
    _, donor = model.run_with_cache(other, names_filter=f"blocks.{layer}.attn.hook_z")
    with model.hooks(fwd_hooks=patch_activation(f"blocks.{layer}.attn.hook_z", donor, positions=[2, 5])):
        results["patched"] = model(ids).logits
    vector = torch.linspace(-1, 1, model.config.hidden_size)
    with model.hooks(fwd_hooks=steer(0, vector, scale=2.0)):
        results["steered"] = model(ids).logits
    results["generated"] = model.generate(ids, max_new_tokens=6)
    results["generated_static"] = model.generate(ids, max_new_tokens=6, cache_implementation="static")
    sequences, generated_cache = model.generate_with_cache(ids, max_new_tokens=4,
                                                           names_filter=lambda n: n.endswith("hook_pattern"))
    results["generated_with_cache"] = sequences
    results.update({f"generated_cache.{name}": tensor for name, tensor in generated_cache.items()})
    results["attentions.0"] = model(ids, output_attentions=True).attentions[0]
    return {name: tensor.detach().clone() for name, tensor in results.items()}, seen_by_hooks(model, ids)


def seen_by_hooks(model, ids) -> dict:
    """Shape and global heads each head-shaped hook of layer 0 saw on this rank."""
    seen = {}

    def note(x, hook):
        seen[hook.name] = {"shape": list(x.shape), "heads": list(hook.shard.indices) if hook.shard else None}

    with model.hooks(fwd_hooks=[(lambda n: n.startswith("blocks.0."), note)]):
        model(ids, output_attentions=True)
    return seen


def led_by_rank0(model) -> dict[str, torch.Tensor]:
    """What the web app does, with only rank 0 calling the model: capture while generating, then an ablation."""
    from llamaviz.distributed.requests import follow, lead, stop_followers

    if torch.distributed.get_rank() != 0:
        follow(model)
        return {}
    lead(model)
    ids = torch.tensor(PROMPT)
    sequences, cache = model.generate_with_cache(ids, max_new_tokens=4, names_filter=lambda n: n.endswith("hook_z"))
    layer, head = ablated_head(model.config)
    with model.hooks(fwd_hooks=ablate_heads([(layer, head)], mode="mean", model=model, mean_cache=cache)):
        ablated = model(sequences).logits
    stop_followers()
    return {"led.sequences": sequences, "led.ablated": ablated, **{f"led.{n}": t for n, t in cache.items()}}


def led_reference(model) -> dict[str, torch.Tensor]:
    """led_by_rank0's results computed by one process."""
    ids = torch.tensor(PROMPT)
    sequences, cache = model.generate_with_cache(ids, max_new_tokens=4, names_filter=lambda n: n.endswith("hook_z"))
    layer, head = ablated_head(model.config)
    with model.hooks(fwd_hooks=ablate_heads([(layer, head)], mode="mean", model=model, mean_cache=cache)):
        ablated = model(sequences).logits
    return {"led.sequences": sequences, "led.ablated": ablated, **{f"led.{n}": t for n, t in cache.items()}}


def main() -> None:
    checkpoint, out, *flags = sys.argv[1:]
    rank = int(os.environ["RANK"])
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, tp_plan="auto")
    if "fail" in flags and rank == 1:
        raise RuntimeError("rank 1 fails on purpose")  # rank 0 is left waiting in its first all-reduce
    tensors, seen = run_checks(model)
    led = {k: v.detach().clone() for k, v in led_by_rank0(model).items()}  # only rank 0 has results
    save_file(tensors, str(Path(out) / f"rank{rank}.safetensors"))
    save_file(led, str(Path(out) / f"led{rank}.safetensors"))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

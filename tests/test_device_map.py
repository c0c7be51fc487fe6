"""device_map: whole layers placed on devices, hooks and caches unchanged; explicit maps checked."""

import pytest
import torch

from llamaviz.llama import LlamaConfig, LlamaForCausalLM
from llamaviz.distributed.placement import _to, plan_placement
from tiny import config_kwargs

IDS = torch.tensor([[5, 17, 33, 2, 48, 9, 71, 12]])  # [1, p]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config_kwargs("gqa")))
    folder = tmp_path_factory.mktemp("tiny-map")
    model.save_pretrained(folder)
    return folder


def layer_map(devices: list[str], layers: int = 3) -> dict[str, str]:
    """Embeddings on the first device, layers spread in order, final norm and lm_head on the last."""
    mapping = {"model.embed_tokens": devices[0]}
    mapping.update({f"model.layers.{i}": devices[i * len(devices) // layers] for i in range(layers)})
    return {**mapping, "model.norm": devices[-1], "lm_head": devices[-1]}


def assert_same_run(model, reference, cache_device=None):
    torch.testing.assert_close(model(IDS).logits.cpu(), reference(IDS).logits)
    _, cache = model.run_with_cache(IDS, device=cache_device)
    _, expected = reference.run_with_cache(IDS)
    assert set(cache) == set(expected)
    for name in expected:
        torch.testing.assert_close(cache[name].cpu(), expected[name], msg=name)
    assert torch.equal(model.generate(IDS, max_new_tokens=5).cpu(), reference.generate(IDS, max_new_tokens=5))


@pytest.mark.parametrize("device_map", [layer_map(["cpu"]), "auto", "balanced", {"": "cpu"}])
def test_every_entry_on_the_cpu(tiny_folder, device_map):
    reference = LlamaForCausalLM.from_pretrained(tiny_folder)
    model = LlamaForCausalLM.from_pretrained(tiny_folder, device_map=device_map)
    assert_same_run(model, reference)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (this machine has "
                    f"{torch.cuda.device_count()})")
def test_layers_on_two_gpus(tiny_folder):
    reference = LlamaForCausalLM.from_pretrained(tiny_folder)
    model = LlamaForCausalLM.from_pretrained(tiny_folder, device_map=layer_map(["cuda:0", "cuda:1"]))
    assert model.model.layers[0].mlp.up_proj.weight.device == torch.device("cuda:0")
    assert model.lm_head.weight.device == torch.device("cuda:1")
    assert_same_run(model, reference, cache_device="cpu")


def test_inputs_move_to_the_module_device():
    moved = _to(torch.ones(2), torch.device("cpu"))
    assert moved.device == torch.device("cpu")
    build = _to(lambda: torch.zeros(3), torch.device("cpu"))  # the lazily built mask stays lazy
    assert callable(build) and torch.equal(build(), torch.zeros(3))


def test_bad_maps_are_refused(tiny_folder):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config_kwargs("gqa")))
    with pytest.raises(ValueError, match=r"'model.layers.9', which LlamaForCausalLM does not have; closest: model.layers"):
        plan_placement(model, {**layer_map(["cpu"]), "model.layers.9": "cpu"}, torch.float32)
    with pytest.raises(ValueError, match=r"CUDA device\(s\)"):
        plan_placement(model, layer_map(["cpu", "cuda:7"]), torch.float32)
    with pytest.raises(ValueError, match=r"places no device for .* parameter\(s\), e.g. lm_head.weight"):
        plan_placement(model, {k: v for k, v in layer_map(["cpu"]).items() if k != "lm_head"}, torch.float32)
    with pytest.raises(ValueError, match="device_map 'sequential' is not supported; accepted: 'auto', 'balanced'"):
        plan_placement(model, "sequential", torch.float32)
    with pytest.raises(ValueError, match="not a device"):
        plan_placement(model, {"": "gpu0"}, torch.float32)


def test_device_and_device_map_together_are_refused(tiny_folder):
    with pytest.raises(ValueError, match="pass device= or device_map=, not both"):
        LlamaForCausalLM.from_pretrained(tiny_folder, device="cpu", device_map="auto")

"""The TransformerLens face: a TransformerLens-style script runs on llamaviz with only its loading line changed,
and gives TransformerLens' own numbers (its TransformerBridge over the same transformers weights)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

from llamaviz import HookedTransformer, utils
from tiny import hf_and_ours
from tl_reference import bridge


def tl_script(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """What every TransformerLens notebook does, written against TransformerLens' API only."""
    out = {"logits": model(tokens), "loss": model(tokens, return_type="loss")}
    out["last"] = model(tokens)[:, -1]
    out["resid_2"] = model(tokens, stop_at_layer=2)
    stored = {}

    def keep(activation, hook):
        stored[f"{hook.name}@{hook.layer() if 'blocks' in hook.name else '-'}"] = activation.detach().clone()

    for point in (model.blocks[1].attn.hook_z, model.blocks[1].attn.hook_pattern, model.blocks[2].hook_resid_pre,
                  model.blocks[0].mlp.hook_post, model.blocks[0].ln1.hook_normalized, model.blocks[1].hook_attn_out,
                  model.blocks[1].hook_mlp_out, model.ln_final.hook_scale, model.hook_embed):
        point.add_hook(keep)
    model(tokens)
    model.reset_hooks()
    out |= {name.replace("hook_in", "hook_resid_pre"): value for name, value in stored.items()}

    def zero_head(z, hook, head):
        z[:, :, head] = 0.0
        return z

    model.blocks[1].attn.hook_z.add_hook(functools.partial(zero_head, head=2))
    out["ablated"] = model(tokens)
    model.reset_hooks()
    out["ablated_by_name"] = model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[
        (utils.get_act_name("z", 1), functools.partial(zero_head, head=2))])
    out["W_Q1"], out["W_O1"] = model.blocks[1].attn.W_Q, model.blocks[1].attn.W_O
    out["W_E"], out["W_U"] = model.embed.W_E, model.unembed.W_U
    return out


@pytest.fixture(scope="module")
def faces():
    hf, ours = hf_and_ours("bias", num_key_value_heads=2, hf_attn="eager")
    return HookedTransformer(ours), bridge(hf), ours


def test_a_transformer_lens_script_gives_transformer_lens_numbers(faces):
    ours, theirs, _ = faces
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, reference = tl_script(ours, tokens), tl_script(theirs, tokens)
    assert set(mine) == set(reference)
    for name in reference:
        assert_close(mine[name].float(), reference[name].float(), atol=1e-4, rtol=1e-4, msg=name)
    assert not torch.allclose(mine["ablated"], mine["logits"])  # the module-path hook did something
    assert_close(mine["ablated"], mine["ablated_by_name"])


def test_the_face_shares_the_models_weights_hooks_and_output_convention(faces):
    face, _, model = faces
    assert face.blocks[1].attn.hook_z is model.hook_points()["blocks.1.attn.hook_z"]
    assert {id(p) for p in face.parameters()} == {id(p) for p in model.parameters()}  # no second copy
    tokens = torch.randint(0, 100, (1, 5))
    assert isinstance(face(tokens), torch.Tensor) and hasattr(model(tokens), "logits")  # each face its convention
    assert face.cfg.n_layers == model.config.num_hidden_layers and len(face.blocks) == 3
    logits, cache = face.run_with_cache(tokens)
    assert_close(cache["blocks.1.attn.hook_z"], cache["z", 1])


def test_wrapping_something_else_is_refused():
    with pytest.raises(TypeError, match="wraps a llamaviz causal LM"):
        HookedTransformer(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_the_default_model_ports_by_its_loading_line(default_with_reference):
    _, _, _, theirs = default_with_reference
    ours = HookedTransformer.from_pretrained(None)  # TransformerLens: HookedTransformer.from_pretrained("...")
    tokens = ours.to_tokens("When John and Mary went to the shops, John gave the bag to")
    with torch.no_grad():
        mine, reference = tl_script(ours, tokens), tl_script(theirs, tokens)
    for name in reference:
        assert_close(mine[name].float(), reference[name].float(), atol=1e-3, rtol=1e-3, msg=name)
    assert ours.to_str_tokens(ours(tokens)[0, -1].argmax()) == theirs.to_str_tokens(theirs(tokens)[0, -1].argmax())

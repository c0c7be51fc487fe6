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


@pytest.mark.parametrize("variant", ["bias", "gqa"])
def test_weights_under_transformer_lens_names_match_the_bridge(variant):
    hf, model = hf_and_ours(variant, hf_attn="eager")
    ours, theirs = dict(HookedTransformer(model).tl_named_parameters()), dict(bridge(hf).tl_named_parameters())
    assert list(ours) == list(theirs)  # the same names, in TransformerLens' order
    for name, value in theirs.items():
        assert_close(ours[name], value.detach(), msg=name)  # absent biases are zeros in both
    assert_close(HookedTransformer(model).unembed.b_U, theirs["unembed.b_U"].detach())


def test_loss_fn_and_the_in_alias_match_the_bridge(faces):
    ours, theirs, _ = faces
    tokens = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = theirs(tokens)
        for per_token in (False, True):
            assert_close(ours.loss_fn(logits, tokens, per_token=per_token),
                         theirs.loss_fn(logits, tokens, per_token=per_token))
        seen = {}
        keep = lambda x, hook, face: seen.__setitem__(face, x.clone())  # noqa: E731
        ours.run_with_hooks(tokens, fwd_hooks=[(utils.get_act_name("in", 2), functools.partial(keep, face="ours"))])
        theirs.run_with_hooks(tokens, fwd_hooks=[(tl_utils().get_act_name("in", 2),
                                                  functools.partial(keep, face="theirs"))])
    assert_close(seen["ours"], seen["theirs"], atol=1e-4, rtol=1e-4)  # "in" is the block's input, resid_pre


def tl_utils():
    return pytest.importorskip("transformer_lens.utilities")


def _two_layer(root_class, hook_point):
    """TransformerLens' own toy: two layers that square then add an offset, with hook points around them."""

    class SquareThenAdd(torch.nn.Module):
        def __init__(self, offset):
            super().__init__()
            self.offset = torch.nn.Parameter(torch.tensor(offset))
            self.hook_square = hook_point()

        def forward(self, x):
            return self.offset + self.hook_square(x * x)

    class TwoLayer(root_class):
        def __init__(self):
            super().__init__()
            self.layer1, self.layer2 = SquareThenAdd(3.0), SquareThenAdd(-4.0)
            self.hook_in, self.hook_mid, self.hook_out = hook_point(), hook_point(), hook_point()
            self.setup()

        def forward(self, x):
            return self.hook_out(self.layer2(self.hook_mid(self.layer1(self.hook_in(x)))))

    return TwoLayer()


def test_a_hooked_root_module_of_ones_own_behaves_as_transformer_lens():
    tl_root = pytest.importorskip("transformer_lens.HookedRootModule")
    tl_hooks = pytest.importorskip("transformer_lens.hook_points")
    from llamaviz import HookPoint
    from llamaviz.tl import HookedRootModule

    ours, theirs = _two_layer(HookedRootModule, HookPoint), _two_layer(tl_root.HookedRootModule, tl_hooks.HookPoint)
    x = torch.tensor(5.0)
    (out, cache), (ref_out, ref_cache) = ours.run_with_cache(x), theirs.run_with_cache(x)
    assert list(cache) == list(ref_cache) and out == ref_out  # names by path, in forward order
    assert all(cache[name] == ref_cache[name] for name in ref_cache)
    zero = [("layer2.hook_square", lambda t, hook: torch.zeros_like(t))]
    assert ours.run_with_hooks(x, fwd_hooks=zero) == theirs.run_with_hooks(x, fwd_hooks=zero)
    assert ours(x) == theirs(x)  # the hooks are gone afterwards


def test_a_root_module_without_setup_says_so():
    from llamaviz.tl import HookedRootModule

    with pytest.raises(RuntimeError, match=r"call self.setup\(\)"):
        HookedRootModule().run_with_cache(torch.tensor(1.0))


@pytest.mark.slow
def test_text_methods_follow_transformer_lens_defaults(default_with_reference):
    _, _, _, theirs = default_with_reference
    ours = HookedTransformer.from_pretrained(None)
    texts = ["The cat sat on the mat.", "The cat sat on the mat really hard."]
    assert torch.equal(ours.to_tokens(texts), theirs.to_tokens(texts))  # BOS first, padded on the right
    for kwargs in ({}, {"prepend_bos": False}):
        assert ours.to_str_tokens("Hello World", **kwargs) == theirs.to_str_tokens("Hello World", **kwargs)
        assert ours.get_token_position(" cat", "The cat sat on the mat", **kwargs) == \
            theirs.get_token_position(" cat", "The cat sat on the mat", **kwargs)
        with torch.no_grad():
            assert_close(ours("Hello World", **kwargs), theirs("Hello World", **kwargs), atol=1e-3, rtol=1e-3)
    assert ours.to_string(256) == theirs.to_string(256)
    prompt = "(CNN) President Barack Obama caught in embarrassing new scandal\n"
    # the bridge's own KV-cache loop departs from its full forwards at the 2nd token here (4.3.0); without it,
    # greedy decoding is argmax of its forwards
    reference = functools.partial(theirs.generate, prompt, do_sample=False, verbose=False, use_past_kv_cache=False)
    assert ours.generate(prompt, max_new_tokens=8, do_sample=False) == reference(max_new_tokens=8)
    assert torch.equal(ours.generate(prompt, max_new_tokens=3, do_sample=False, return_type="tokens"),
                       reference(max_new_tokens=3, return_type="tokens"))
    with pytest.raises(ValueError, match="return_type 'text' is not supported"):
        ours.generate(prompt, return_type="text")

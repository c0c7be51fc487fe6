"""Dictionaries: SAELens's encode/decode for every architecture and normalisation (against the formulas
written out plainly), SAELens and circuit-tracer files both ways, and attaching as hook points."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch.testing import assert_close

from llamaviz import features
from llamaviz.features.dictionary import Dictionary, DictionaryConfig
from llamaviz.features.transcoder_set import TranscoderSet, transcoder
from tiny import hf_and_ours

M, S = 64, 96  # tiny model width, latents


def random_dictionary(architecture: str, hook: str = "blocks.1.hook_resid_post", seed: int = 0, **cfg) -> Dictionary:
    torch.manual_seed(seed)
    d = Dictionary(DictionaryConfig(architecture=architecture, d_in=M, d_sae=S, hook_name=hook, **cfg))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.2)
        if hasattr(d, "threshold"):
            d.threshold.uniform_(0.0, 0.3)
    return d


def reference(d: Dictionary, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts, reconstruction) by SAELens's definitions, one step per line."""
    cfg, shift, scale, undo = d.cfg, torch.zeros(()), torch.ones(()), None
    if cfg.normalize_activations == "constant_norm_rescale":
        scale = M ** 0.5 / x.norm(dim=-1, keepdim=True)
    if cfg.normalize_activations == "layer_norm":
        shift = x.mean(-1, keepdim=True)
        undo = (x - shift).std(-1, keepdim=True)
        scale = 1 / (undo + 1e-5)
    sae_in = (x - shift) * scale - (d.b_dec if cfg.apply_b_dec_to_input and not cfg.is_transcoder else 0)
    if cfg.architecture == "gated":
        magnitude = torch.relu(sae_in @ (d.W_enc * torch.exp(d.r_mag)) + d.b_mag)
        acts = ((sae_in @ d.W_enc + d.b_gate) > 0).float() * magnitude
    else:
        pre = sae_in @ d.W_enc + d.b_enc
        if cfg.architecture == "topk":
            norms = d.W_dec.norm(dim=-1)
            ranked = pre * norms if cfg.rescale_acts_by_decoder_norm else pre
            acts = torch.zeros_like(pre)
            for index in itertools.product(*map(range, pre.shape[:-1])):
                top = ranked[index].topk(cfg.k)
                acts[index][top.indices] = top.values.clamp(min=0)
        elif "jumprelu" in cfg.architecture:
            acts = torch.where(pre > d.threshold, pre, torch.zeros_like(pre)).clamp(min=0)
        else:
            acts = pre.clamp(min=0)
    decoded = (acts / d.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else acts) @ d.W_dec + d.b_dec
    out = decoded / scale + shift if undo is None else decoded * undo + shift
    if cfg.architecture in ("skip_transcoder", "jumprelu_skip_transcoder"):
        out = out + x @ d.W_skip.T
    return acts, out


CASES = [("standard", {}), ("topk", {"k": 7}), ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
         ("jumprelu", {}), ("gated", {}), ("standard", {"normalize_activations": "constant_norm_rescale"}),
         ("standard", {"normalize_activations": "layer_norm"}), ("standard", {"apply_b_dec_to_input": False}),
         ("transcoder", {"apply_b_dec_to_input": False}), ("skip_transcoder", {"apply_b_dec_to_input": False}),
         ("jumprelu_transcoder", {"apply_b_dec_to_input": False}),
         ("jumprelu_skip_transcoder", {"apply_b_dec_to_input": False})]


@pytest.mark.parametrize("architecture, cfg", CASES)
def test_encode_decode_follow_saelens_definitions(architecture, cfg):
    d = random_dictionary(architecture, **cfg)
    x = torch.randn(2, 5, M)
    with torch.no_grad():
        acts, out = d.encode(x), d.decode(d.encode(x), x)
        expected_acts, expected_out = reference(d, x)
    assert_close(acts, expected_acts, atol=1e-5, rtol=1e-5)
    assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    if architecture == "topk":
        assert int((acts[0, 0] != 0).sum()) <= cfg["k"]
    assert (acts > 0).any() and (acts == 0).any()  # the cases are sparse, not trivial


@pytest.mark.parametrize("architecture, cfg", CASES)
def test_the_saelens_folder_round_trips(architecture, cfg, tmp_path):
    d = random_dictionary(architecture, **cfg)
    d.cfg.metadata |= {"model_name": "tiny", "context_size": 128, "prepend_bos": True}
    sparsity = torch.linspace(-5, 0, S)
    features.save(d, tmp_path / "sae", sparsity=sparsity)
    written = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert written["architecture"] == architecture and written["metadata"]["hook_name"] == d.cfg.hook_name
    assert written["metadata"]["context_size"] == 128 and written["d_sae"] == S
    loaded = features.load(tmp_path / "sae")
    x = torch.randn(3, M)
    with torch.no_grad():
        assert_close(loaded(x), d(x), atol=0, rtol=0)
    from llamaviz.features.saelens_files import load_sparsity
    assert_close(load_sparsity(tmp_path / "sae"), sparsity)


def test_bad_folders_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary folder"):
        features.load(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        features.load(tmp_path / "empty")
    d = random_dictionary("standard")
    folder = features.save(d, tmp_path / "sae")
    config = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(config | {"architecture": "mystery"}))
    with pytest.raises(ValueError, match="'mystery' is not supported; accepted: standard, topk"):
        features.load(folder)
    (folder / "cfg.json").write_text(json.dumps(config | {"d_sae": S + 1}))
    with pytest.raises(ValueError, match=r"W_enc has shape \[64, 96\], cfg.json says \[64, 97\]"):
        features.load(folder)
    (folder / "cfg.json").write_text(json.dumps(config))
    (folder / "sae_weights.safetensors").write_bytes((folder / "sae_weights.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"sae_weights.safetensors is truncated: its safetensors header length says"):
        features.load(folder)
    with pytest.raises(ValueError, match="needs k in 1..d_sae"):
        random_dictionary("topk", k=0)


def random_set(layers: int = 3, skip: bool = True, activation: str = "relu") -> TranscoderSet:
    torch.manual_seed(1)
    tcs = [transcoder(layer, M, S, activation, skip=skip, k=6 if activation == "topk" else None)
           for layer in range(layers)]
    with torch.no_grad():
        for tc in tcs:
            for p in tc.parameters():
                p.normal_(0, 0.1)
    return TranscoderSet(tcs, model_name="tiny")


@pytest.mark.parametrize("activation, skip", [("relu", True), ("relu", False), ("jumprelu", False)])
def test_the_circuit_tracer_layout_round_trips(tmp_path, activation, skip):
    import yaml
    from safetensors.torch import load_file

    tcs = random_set(skip=skip, activation=activation)
    folder = features.save_transcoder_set(tcs, tmp_path / "set")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["feature_input_hook"] == "mlp.hook_in"
    on_disk = load_file(str(folder / "layer_1.safetensors"))
    assert_close(on_disk["W_enc"], tcs[1].W_enc.T)  # circuit-tracer stores [d_tc, d_model]
    assert ("W_skip" in on_disk) == skip and ("activation_function.threshold" in on_disk) == (activation == "jumprelu")
    loaded = features.load_transcoder_set(folder)
    x = torch.randn(4, M)
    with torch.no_grad():
        for ours, theirs in zip(loaded, tcs):
            assert_close(ours(x), theirs(x))
            expected = torch.relu(x @ on_disk["W_enc"].T + on_disk["b_enc"]) if activation == "relu" else None
            if expected is not None and ours is loaded[1]:
                assert_close(ours.encode(x), expected, atol=1e-6, rtol=1e-6)  # circuit-tracer's encode
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):
        features.load_transcoder_set(tmp_path)


@pytest.fixture(scope="module")
def tiny():
    _, ours = hf_and_ours("gqa")
    return ours.eval()


def test_mlp_hook_in_is_what_the_mlp_reads(tiny):
    ids = torch.randint(3, 113, (1, 6))
    _, cache = tiny.run_with_cache(ids, names_filter=["blocks.1.mlp.hook_in", "blocks.1.ln2.hook_normalized",
                                                      "blocks.1.mlp.hook_pre", "blocks.1.hook_mlp_out"])
    x = cache["blocks.1.mlp.hook_in"]
    mlp = tiny.model.layers[1].mlp
    assert_close(mlp.gate_proj(x), cache["blocks.1.mlp.hook_pre"])
    assert_close(mlp(x), cache["blocks.1.hook_mlp_out"])


def test_an_attached_sae_is_spliced_in_with_hook_points(tiny):
    ids = torch.randint(3, 113, (2, 6))
    sae = random_dictionary("topk", k=8)
    with torch.no_grad():
        manual = tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=[("blocks.1.hook_resid_post",
                                                                            lambda x, hook: sae(x))])
        with features.attached(tiny, sae):
            logits, cache = tiny.run_with_cache(ids)
            assert "blocks.1.hook_resid_post.hook_sae_acts_post" in tiny.hook_points()
        assert_close(logits, manual)
        assert_close(cache["blocks.1.hook_resid_post.hook_sae_acts_post"], sae.encode(cache["blocks.1.hook_resid_post.hook_sae_input"]))
        assert "blocks.1.hook_resid_post.hook_sae_acts_post" not in tiny.hook_points()  # removed on exit
        plain = tiny(ids, return_type="logits")
        with features.attached(tiny, sae, use_error_term=True):
            assert_close(tiny(ids, return_type="logits"), plain, atol=1e-5, rtol=1e-5)  # the error term adds it back
            latent = int(cache["blocks.1.hook_resid_post.hook_sae_acts_post"][0, -1].argmax())

            def ablate(acts, hook):
                acts[..., latent] = 0.0
                return acts

            ablated = tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=[
                ("blocks.1.hook_resid_post.hook_sae_acts_post", ablate)])

        def by_hand(x, hook):  # x minus the latent's decoder contribution
            acts = sae.encode(x)
            return x - acts[..., latent:latent + 1] * sae.W_dec[latent]

        expected = tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=[("blocks.1.hook_resid_post", by_hand)])
    assert_close(ablated, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ablated, plain)


def test_an_attached_transcoder_set_replaces_each_mlp(tiny):
    ids = torch.randint(3, 113, (1, 7))
    tcs = random_set(layers=tiny.config.num_hidden_layers)
    with torch.no_grad():
        def replace(layer):
            def fn(out, hook):
                return tcs[layer](stored[layer])
            return fn

        stored = {}
        keep = [(f"blocks.{L}.mlp.hook_in", lambda x, hook: stored.__setitem__(hook.layer(), x)) for L in range(3)]
        manual = tiny.run_with_hooks(ids, return_type="logits", fwd_hooks=keep + [
            (f"blocks.{L}.hook_mlp_out", replace(L)) for L in range(3)])
        with features.attached(tiny, tcs):
            assert_close(tiny(ids, return_type="logits"), manual)
        with pytest.raises(KeyError, match="closest"):
            with features.attached(tiny, random_dictionary("standard", hook="blocks.1.hook_resid_postt")):
                pass
        assert "blocks.1.hook_resid_postt.hook_sae_input" not in tiny.hook_points()


def test_saelens_spellings_port(tmp_path, tiny):
    from llamaviz import SAE, HookedSAETransformer, TranscoderSet

    sae = random_dictionary("topk", k=8)
    features.save(sae, tmp_path / "sae")
    loaded = SAE.load_from_disk(tmp_path / "sae")
    loaded.save_model(tmp_path / "again")
    x = torch.randn(2, M)
    with torch.no_grad():
        assert_close(SAE.load_from_disk(tmp_path / "again")(x), sae(x))
    tcs = random_set(layers=2)
    tcs.save(tmp_path / "set")
    assert len(TranscoderSet.load(tmp_path / "set")) == 2
    model = HookedSAETransformer(tiny)
    ids = torch.randint(3, 113, (1, 6))
    plain = model(ids)
    with torch.no_grad():
        logits, cache = model.run_with_cache_with_saes(ids, saes=[loaded], use_error_term=True)
        assert_close(logits, plain, atol=1e-5, rtol=1e-5)
        assert "blocks.1.hook_resid_post.hook_sae_acts_post" in cache
        model.add_sae(loaded)
        assert "blocks.1.hook_resid_post.hook_sae_output" in model.hook_dict and model.acts_to_saes
        spliced = model(ids)
        model.reset_saes()
        assert "blocks.1.hook_resid_post.hook_sae_output" not in model.hook_dict
        assert_close(model(ids), plain)
    assert not torch.allclose(spliced, plain)


def test_nan_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = features.save(random_dictionary("standard"), tmp_path / "sae")
    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights["b_enc"][3] = float("nan")
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="b_enc holds NaN or infinite values"):
        features.load(folder)


@pytest.fixture(scope="module")
def narrow_heads():
    """Heads whose h * d_head (4 x 24 = 96) is not the residual width (64); kv heads are 24 wide."""
    _, ours = hf_and_ours("mqa_head_dim")
    return ours.eval()


def test_hook_widths_from_the_config_are_the_tensors_widths(narrow_heads):
    from llamaviz.features.attach import hook_width

    _, cache = narrow_heads.run_with_cache(torch.randint(3, 113, (2, 5)))
    for name, tensor in cache.items():
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            with pytest.raises(ValueError, match="attention over key positions"):
                hook_width(narrow_heads, name)
        else:
            assert hook_width(narrow_heads, name) * 10 == tensor.numel(), name


def hook_table(model) -> dict:
    return {name: (point, list(point.fwd_fns)) for name, point in model.hook_points().items()}


@pytest.mark.parametrize("hook, d_in, cfg, error, message", [
    ("blocks.1.mlp.hook_post", M, {}, ValueError, r"d_in is 64 but blocks.1.mlp.hook_post holds 96 features per position"),
    ("blocks.1.attn.hook_z", M, {"reshape_activations": "hook_z"}, ValueError,
     r"d_in is 64 but blocks.1.attn.hook_z holds 96 features per position \(4 heads x 24\)"),
    ("blocks.1.attn.hook_k", 96, {"reshape_activations": "hook_z"}, ValueError,
     r"blocks.1.attn.hook_k holds 24 features per position \(1 heads x 24\)"),
    ("blocks.1.attn.hook_z", 96, {}, ValueError, r"reshape_activations must be hook_z, got 'none'"),
    ("blocks.1.hook_resid_post", M, {"reshape_activations": "hook_z"}, ValueError, r"must be none, got 'hook_z'"),
    ("blocks.1.attn.hook_pattern", M, {}, ValueError, r"attention over key positions"),
    ("blocks.1.hook_resid_psot", M, {}, KeyError, r"unknown hook point 'blocks.1.hook_resid_psot'; closest: "
                                                  r"blocks.1.hook_resid_post"),
    ("blocks.1.mlp.hook_in", M, {"hook_name_out": "blocks.1.hook_mlp_outt", "d_out": M}, KeyError,
     r"closest: blocks.1.hook_mlp_out"),
    ("blocks.1.mlp.hook_in", M, {"hook_name_out": "blocks.1.mlp.hook_post", "d_out": M}, ValueError,
     r"d_out is 64 but blocks.1.mlp.hook_post holds 96"),
])
def test_a_dictionary_that_does_not_fit_its_hook_attaches_nothing(narrow_heads, hook, d_in, cfg, error, message):
    from llamaviz import HookedSAETransformer

    architecture = "transcoder" if "hook_name_out" in cfg else "standard"
    torch.manual_seed(0)
    bad = Dictionary(DictionaryConfig(architecture=architecture, d_in=d_in, d_sae=S, hook_name=hook, **cfg))
    good = random_dictionary("standard")
    before = hook_table(narrow_heads)
    with pytest.raises(error, match=message):
        with features.attached(narrow_heads, good, bad):  # the good one first: it must come off again
            pass
    assert hook_table(narrow_heads) == before
    face = HookedSAETransformer(narrow_heads)
    face.add_sae(good)
    with pytest.raises(error, match=message):
        face.add_sae(bad)
    assert list(face.acts_to_saes) == [good.cfg.hook_name]
    face.reset_saes()
    assert hook_table(narrow_heads) == before


def test_a_hook_z_dictionary_reads_the_heads_flattened(narrow_heads):
    torch.manual_seed(3)
    sae = Dictionary(DictionaryConfig("topk", d_in=96, d_sae=S, hook_name="blocks.1.attn.hook_z", k=6,
                                      reshape_activations="hook_z"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
    flat = Dictionary(DictionaryConfig("topk", d_in=96, d_sae=S, hook_name="blocks.1.attn.hook_z", k=6))
    flat.load_state_dict(sae.state_dict())  # the same SAE on [..., h * d] inputs
    ids = torch.randint(3, 113, (2, 5))
    with torch.no_grad():
        def by_hand(z, hook):  # [b, p, h, d] -> [b, p, h * d] -> SAE -> back
            return flat(z.flatten(-2)).unflatten(-1, (4, 24))

        expected = narrow_heads.run_with_hooks(ids, return_type="logits", fwd_hooks=[("blocks.1.attn.hook_z", by_hand)])
        with features.attached(narrow_heads, sae):
            logits, cache = narrow_heads.run_with_cache(ids)
    assert_close(logits, expected)
    assert cache["blocks.1.attn.hook_z.hook_sae_acts_post"].shape == (2, 5, S)


def test_metadata_reads_as_saelens_spells_it(tmp_path):
    d = random_dictionary("standard")
    d.cfg.metadata |= {"model_name": "tiny", "context_size": 128, "prepend_bos": True}
    loaded = features.load(features.save(d, tmp_path / "sae"))
    meta = loaded.cfg.metadata
    assert (meta.hook_name, meta.model_name, meta.context_size, meta.prepend_bos) == (
        "blocks.1.hook_resid_post", "tiny", 128, True)
    assert meta["hook_name"] == loaded.cfg.hook_name and meta.sae_lens_training_version is None  # missing: None
    meta.hook_name = "blocks.2.hook_resid_post"  # one field, two spellings
    assert loaded.cfg.hook_name == "blocks.2.hook_resid_post"
    config = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    del config["metadata"]["hook_name"]  # what SAELens's save_model writes
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(config))
    again = features.load(tmp_path / "sae")
    assert again.cfg.hook_name == "" and again.cfg.metadata.hook_name == "" and again.cfg.metadata.model_name == "tiny"


def test_a_hook_split_across_ranks_is_refused(narrow_heads):
    from types import SimpleNamespace

    point = narrow_heads.hook_points()["blocks.1.mlp.hook_post"]
    sae = Dictionary(DictionaryConfig("standard", d_in=96, d_sae=S, hook_name="blocks.1.mlp.hook_post"))
    point.shard = SimpleNamespace(unit="features")  # what tensor parallelism sets on the MLP's hooks
    try:
        with pytest.raises(ValueError, match="holds only this rank's features under tensor parallelism"):
            with features.attached(narrow_heads, sae):
                pass
    finally:
        point.shard = None
    with features.attached(narrow_heads, sae):  # whole again: an intermediate-width SAE fits mlp.hook_post
        assert "blocks.1.mlp.hook_post.hook_sae_acts_post" in narrow_heads.hook_points()

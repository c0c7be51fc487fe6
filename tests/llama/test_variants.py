"""Mistral, Qwen2 and Qwen3 against transformers' own classes: logits, patterns, hooks, generation, save/load."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import llamaviz
from llamaviz.llama.config import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from tiny_variants import CASES, FAMILIES, hf_and_ours

IDS = torch.randint(3, 113, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_patterns_and_hidden_states_match_transformers(case, attn):
    hf, ours = hf_and_ours(case, attn_implementation=attn)
    with torch.no_grad():
        ref = hf(IDS, output_attentions=True, output_hidden_states=True)
        out = ours(IDS, output_attentions=True, output_hidden_states=True)
        plain = ours(IDS)
    assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    assert_close(plain.logits, ref.logits, atol=1e-4, rtol=0)  # sdpa, no pattern asked for
    for mine, theirs in zip(out.attentions, ref.attentions, strict=True):
        assert_close(mine, theirs, atol=1e-5, rtol=0)
    for mine, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert_close(mine, theirs, atol=1e-4, rtol=0)


def test_sliding_windows_are_per_layer_as_the_config_says():
    _, ours = hf_and_ours("qwen2_sliding")
    assert ours.config.layer_windows == [None, 5, 5]
    with torch.no_grad():
        patterns = ours(IDS, output_attentions=True).attentions
    assert (patterns[0][:, :, -1, :6] > 0).all()  # full causal: the last query sees the first key
    assert (patterns[1][:, :, -1, :7] == 0).all() and (patterns[1][:, :, -1, 7:] > 0).all()  # 5 keys back


@pytest.mark.parametrize("case", ["mistral", "qwen2_sliding", "qwen3_sliding"])
def test_left_padded_batch_matches_on_valid_positions(case):
    hf, ours = hf_and_ours(case)
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    ids[0, :4], mask[0, :4] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, output_attentions=True)
        out = ours(ids, attention_mask=mask, output_attentions=True)
    valid = mask.bool()
    assert_close(out.logits[valid], ref.logits[valid], atol=1e-4, rtol=0)
    for mine, theirs in zip(out.attentions, ref.attentions):
        assert_close(mine[1], theirs[1], atol=1e-5, rtol=0)
        assert_close(mine[0, :, 4:], theirs[0, :, 4:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen2_sliding", "qwen3_sliding"])
def test_greedy_generation_over_the_window_is_identical_to_transformers(case):
    hf, ours = hf_and_ours(case, hf_attn="sdpa")
    ids = IDS[:1, :7]  # 7 prompt + 16 new tokens: far past every window, so the cache slides
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None,
                      max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(ours.generate(ids, max_new_tokens=16, eos_token_id=[]), ref)
    assert torch.equal(ours.generate(ids, max_new_tokens=16, eos_token_id=[], cache_implementation="static"), ref)


def test_left_padded_batch_generation_is_identical_to_transformers():
    hf, ours = hf_and_ours("qwen3_sliding", hf_attn="sdpa")
    ids, mask = IDS[:, :9].clone(), torch.ones_like(IDS[:, :9])
    ids[0, :3], mask[0, :3] = 0, 0
    ref = hf.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, max_new_tokens=10,
                      min_new_tokens=10, do_sample=False)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[]), ref)


def expected_shapes(config) -> dict[str, tuple]:
    """Every hook point of layer 1 and the ends, with the shape DESIGN.md and llama.variants document."""
    b, p, h, g, d = *IDS.shape, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    m, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    per_layer = {"hook_resid_pre": (b, p, m), "ln1.hook_scale": (b, p, 1), "ln1.hook_normalized": (b, p, m),
                 "attn.hook_q": (b, p, h, d), "attn.hook_k": (b, p, g, d), "attn.hook_v": (b, p, g, d),
                 "attn.hook_rot_q": (b, p, h, d), "attn.hook_rot_k": (b, p, g, d),
                 "attn.hook_attn_scores": (b, h, p, p), "attn.hook_pattern": (b, h, p, p), "attn.hook_z": (b, p, h, d),
                 "attn.hook_result": (b, p, h, m), "hook_attn_out": (b, p, m), "hook_resid_mid": (b, p, m),
                 "hook_mlp_in": (b, p, m), "ln2.hook_scale": (b, p, 1), "ln2.hook_normalized": (b, p, m),
                 "mlp.hook_in": (b, p, m), "mlp.hook_pre": (b, p, f), "mlp.hook_pre_linear": (b, p, f), "mlp.hook_post": (b, p, f),
                 "hook_mlp_out": (b, p, m), "hook_resid_post": (b, p, m)}
    if config.model_type == "qwen3":
        per_layer.update({"attn.hook_q_normalized": (b, p, h, d), "attn.hook_k_normalized": (b, p, g, d)})
    return {"hook_embed": (b, p, m), **{f"blocks.1.{name}": shape for name, shape in per_layer.items()},
            "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, m), "hook_logits": (b, p, v)}


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3"])
def test_every_hook_point_has_its_documented_shape(case):
    _, ours = hf_and_ours(case)
    shapes = expected_shapes(ours.config)
    per_layer = len([name for name in shapes if name.startswith("blocks.1.")])
    assert len(ours.hook_points()) == 4 + 3 * per_layer
    logits, cache = ours.run_with_cache(IDS, names_filter=list(ours.hook_points()))  # hook_result only if named
    assert set(cache) == set(ours.hook_points())
    assert {name: tuple(cache[name].shape) for name in shapes} == shapes
    assert_close(cache["hook_logits"], logits)


def test_qwen3_norm_hooks_hold_the_normed_heads_and_patching_them_changes_the_output():
    _, ours = hf_and_ours("qwen3")
    _, cache = ours.run_with_cache(IDS)
    attn = ours.model.layers[1].self_attn
    names = list(ours.hook_points())
    assert names.index("blocks.1.attn.hook_k") < names.index("blocks.1.attn.hook_q_normalized") \
        < names.index("blocks.1.attn.hook_rot_q")  # listed in forward order
    assert_close(cache["blocks.1.attn.hook_q_normalized"], attn.q_norm(cache["q", 1]))
    assert_close(cache["blocks.1.attn.hook_k_normalized"], attn.k_norm(cache["k", 1]))
    rms = cache["blocks.1.attn.hook_q_normalized"].div(attn.q_norm.weight).pow(2).mean(-1)
    assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)  # each head has unit RMS before the weight
    zero_keys = [("blocks.1.attn.hook_k_normalized", lambda k, hook: k * 0)]
    with ours.hooks(fwd_hooks=zero_keys):
        zeroed, patched = ours.run_with_cache(IDS, names_filter=["blocks.1.attn.hook_attn_scores"])
    assert not torch.allclose(zeroed, cache["hook_logits"])
    assert (patched["attn_scores", 1][:, :, -1] == 0).all()  # zero keys: every causal score is 0


@pytest.mark.parametrize("case", ["qwen2_sliding", "qwen3"])
def test_the_decomposition_still_sums_to_the_residual(case):
    _, ours = hf_and_ours(case)
    _, cache = ours.run_with_cache(IDS)
    for layer in range(ours.config.num_hidden_layers):
        attn = ours.model.layers[layer].self_attn
        per_head = torch.einsum("bphd,mhd->bphm", cache["z", layer],
                                attn.o_proj.weight.view(-1, attn.num_heads, attn.head_dim))  # [b, p, h, m]
        bias = attn.o_proj.bias if attn.o_proj.bias is not None else 0
        assert_close(per_head.sum(2) + bias, cache["attn_out", layer], atol=1e-5, rtol=0)
        assert_close(cache["resid_pre", layer] + cache["attn_out", layer] + cache["mlp_out", layer],
                     cache["resid_post", layer], atol=1e-5, rtol=0)
    last = cache["resid_post", ours.config.num_hidden_layers - 1]
    assert_close(cache.accumulated_resid()[-1], last)  # [layers + 1, b, p, m]
    assert_close(cache.decompose_resid().sum(0), last, atol=1e-5, rtol=0)  # embed + attn_out + mlp_out
    _, full = ours.run_with_cache(IDS, names_filter=list(ours.hook_points()))  # per-head results, neurons, biases
    assert_close(full.get_full_resid_decomposition().sum(0), last, atol=1e-4, rtol=0)


def test_qwen2_biases_sit_on_q_k_v_only():
    _, ours = hf_and_ours("qwen2")
    attn = ours.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None
    assert not any(n.endswith("bias") and "mlp" in n for n in ours.state_dict())


@pytest.mark.parametrize("case", ["mistral", "qwen2_sliding", "qwen3_sliding"])
def test_save_pretrained_is_read_by_transformers_and_by_every_loader(case, tmp_path):
    hf, ours = hf_and_ours(case)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    family = CASES[case][0]
    assert written["model_type"] == family and written["architectures"] == [FAMILIES[family][1]]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == FAMILIES[family][1]
    with torch.no_grad():
        reference = hf(IDS).logits
        assert_close(theirs(IDS).logits, reference, atol=1e-5, rtol=0)
        for loader in (llamaviz.AutoModelForCausalLM.from_pretrained, llamaviz.LlamaForCausalLM.from_pretrained,
                       getattr(llamaviz, FAMILIES[family][1]).from_pretrained):
            loaded = loader(tmp_path)
            assert type(loaded) is type(ours) and type(loaded.config) is type(ours.config)
            assert loaded.config.layer_windows == ours.config.layer_windows
            assert_close(loaded(IDS).logits, reference, atol=1e-4, rtol=0)


def test_hf_written_folders_load_as_their_variant(tmp_path):
    hf, _ = hf_and_ours("qwen3_sliding")
    hf.save_pretrained(tmp_path)
    model = llamaviz.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, llamaviz.Qwen3ForCausalLM) and model.config.head_dim == 16
    assert model.config.layer_windows == [None, None, 4]
    with torch.no_grad():
        assert_close(model(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)


def test_config_classes_follow_model_type(tmp_path):
    for config_class in (MistralConfig, Qwen2Config, Qwen3Config):
        config = config_class(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=96,
                              vocab_size=100, head_dim=16)
        config.save_pretrained(tmp_path)
        assert type(LlamaConfig.from_pretrained(tmp_path)) is config_class
        assert type(config_class.from_pretrained(tmp_path)) is config_class
    assert MistralConfig().sliding_window == 4096 and Qwen2Config().sliding_window is None  # transformers' defaults
    assert Qwen2Config(use_sliding_window=True, max_window_layers=30).layer_windows == [None] * 30 + [4096] * 2


def test_unsupported_model_types_and_mismatched_classes_are_named(tmp_path):
    _, ours = hf_and_ours("qwen2")
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'qwen2' is not a Qwen3Config"):
        Qwen3Config.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Qwen2ForCausalLM needs a Qwen2Config"):
        llamaviz.Qwen2ForCausalLM(LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match="layer_types must list one of full_attention, sliding_attention"):
        Qwen2Config(num_hidden_layers=2, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="'qwen2' checkpoint.*LlamaForSequenceClassification runs model_type 'llama'"):
        llamaviz.LlamaForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Qwen3ForCausalLM runs model_type 'qwen3'. Load it with Qwen2ForCausalLM"):
        llamaviz.Qwen3ForCausalLM.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(ValueError, match=r"model_type 'gemma2' is not supported; accepted: 'llama', 'mistral', "
                                         r"'qwen2', 'qwen3'"):
        llamaviz.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_qwen3_checkpoint_without_its_norm_weights_is_refused(tmp_path):
    _, ours = hf_and_ours("qwen3")
    ours.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith(("q_norm.weight", "k_norm.weight"))},
              tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 6 weight\(s\) Qwen3ForCausalLM needs: "
                                         r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        llamaviz.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_start_and_stop_at_layer_and_patching_sweeps_keep_each_layers_window():
    _, ours = hf_and_ours("qwen2_sliding")
    from llamaviz import patching

    clean, corrupted = IDS[:1], IDS[1:]
    with torch.no_grad():
        full = ours(clean, return_type="logits")
        resid = ours(clean, stop_at_layer=1)  # [b, p, m] entering layer 1, the first sliding layer
        assert_close(ours(resid, start_at_layer=1, return_type="logits"), full, atol=1e-5, rtol=0)
    _, clean_cache = ours.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, 5] - logits[0, -1, 7]

    sweep = patching.get_act_patch_resid_pre(ours, corrupted, clean_cache, metric)  # [L, p]
    for layer, position in [(1, 3), (2, 11)]:  # brute force: one cell of the clean residual written in
        def write_clean(resid_pre, hook, layer=layer, position=position):
            resid_pre[:, position] = clean_cache["resid_pre", layer][:, position]
            return resid_pre

        with torch.no_grad():
            patched = ours.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", write_clean)])
        assert_close(sweep[layer, position], metric(patched), atol=1e-5, rtol=0)

"""LlamaModel / LlamaForCausalLM against transformers on tiny random configs (float32, CPU)."""

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.modeling import LlamaForCausalLM
from tiny import VARIANTS, hf_and_ours


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_hidden_states_and_attentions_match_transformers(variant, attn):
    hf, ours = hf_and_ours(variant, attn_implementation=attn)
    length = 24 if variant == "dynamic_rope" else 12  # dynamic: past the 16 trained positions
    ids = torch.randint(0, 113, (2, length))
    with torch.no_grad():
        ref = hf(ids, output_attentions=True, output_hidden_states=True)
        out = ours(ids, output_attentions=True, output_hidden_states=True)
        plain = ours(ids)
    assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    assert_close(plain.logits, ref.logits, atol=1e-4, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close(mine, theirs, atol=1e-4, rtol=0)
    assert len(out.attentions) == 3
    for mine, theirs in zip(out.attentions, ref.attentions):
        assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_sdpa_logits_match_transformers_sdpa():
    hf, ours = hf_and_ours("gqa", hf_attn="sdpa")
    ids = torch.randint(0, 113, (3, 20))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_on_valid_positions():
    hf, ours = hf_and_ours("gqa")
    ids = torch.randint(3, 113, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, output_attentions=True)
        out = ours(ids, attention_mask=mask, output_attentions=True)
        alone = ours(ids[:1, 4:])
    valid = mask.bool()
    assert_close(out.logits[valid], ref.logits[valid], atol=1e-4, rtol=0)
    assert_close(out.logits[0, 4:], alone.logits[0], atol=1e-4, rtol=0)
    for mine, theirs in zip(out.attentions, ref.attentions):
        assert_close(mine[1], theirs[1], atol=1e-5, rtol=0)
        assert_close(mine[0, :, 4:], theirs[0, :, 4:], atol=1e-5, rtol=0)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_kv_cache_steps_equal_full_forward(attn):
    _, ours = hf_and_ours("gqa", attn_implementation=attn)
    ids = torch.randint(0, 113, (2, 14))
    with torch.no_grad():
        full = ours(ids).logits
        first = ours(ids[:, :9], use_cache=True)
        cache = first.past_key_values
        steps = [first.logits]
        for i in range(9, 14):
            steps.append(ours(ids[:, i:i + 1], past_key_values=cache, use_cache=True).logits)
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_loss_matches_transformers():
    hf, ours = hf_and_ours("tied")
    ids = torch.randint(0, 113, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        assert_close(ours(ids, labels=labels).loss, hf(ids, labels=labels).loss, atol=1e-5, rtol=0)


def test_output_supports_attribute_key_and_index_access():
    _, ours = hf_and_ours()
    out = ours(torch.randint(0, 113, (1, 5)))
    assert out["logits"] is out.logits is out[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_transformers(dtype):
    hf, ours = hf_and_ours("gqa", hf_attn="sdpa")
    hf, ours = hf.to(dtype), ours.to(dtype)
    ids = torch.randint(0, 113, (2, 12))
    with torch.no_grad():
        mine, theirs = ours(ids).logits, hf(ids).logits
    assert mine.dtype == dtype
    assert_close(mine.float(), theirs.float(), atol=3e-2, rtol=0)


def test_gradients_flow_to_parameters():
    _, ours = hf_and_ours()
    ids = torch.randint(0, 113, (1, 6))
    ours(ids, labels=ids).loss.backward()
    assert ours.model.embed_tokens.weight.grad.abs().sum() > 0


def test_bad_config_and_inputs_are_named():
    with pytest.raises(ValueError, match="unknown rope_scaling type 'yarnish'"):
        LlamaConfig(rope_scaling={"rope_type": "yarnish", "factor": 2.0})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="attn_implementation 'flash'"):
        LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=10), attn_implementation="flash")
    _, ours = hf_and_ours()
    with pytest.raises(ValueError, match="longer than the model's context of 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one position"):
        ours(torch.zeros(1, 0, dtype=torch.long))


def test_layer_and_head_checks_accept_integers_and_name_the_range():
    config = LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=10)
    assert [config.check_layer(2), config.check_layer(np.int64(0)), config.check_head(torch.tensor(3))] == [2, 0, 3]
    with pytest.raises(ValueError, match=r"^layer 3 is out of range: the model has 3 layers, 0\.\.2$"):
        config.check_layer(3)
    with pytest.raises(ValueError, match=r"^head -1 is out of range: the model has 4 heads per layer, 0\.\.3$"):
        config.check_head(-1)
    assert config.check_head("mean", mean=True) == "mean"
    with pytest.raises(ValueError, match=r"^head must be an integer in 0\.\.3 \(or 'mean'\), got 'max'$"):
        config.check_head("max", mean=True)
    with pytest.raises(ValueError, match=r"^head must be an integer in 0\.\.3, got 'mean'$"):
        config.check_head("mean")
    for bad in (1.0, "1", True, None):
        with pytest.raises(ValueError, match=r"^layer must be an integer in 0\.\.2, got "):
            config.check_layer(bad)


def test_config_json_round_trip_is_read_by_transformers(tmp_path):
    import transformers

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5000.0,
                         rope_scaling={"type": "linear", "factor": 3.0}, tie_word_embeddings=True)
    config.save_pretrained(tmp_path)
    assert LlamaConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    theirs = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert (theirs.head_dim, theirs.num_key_value_heads, theirs.tie_word_embeddings) == (16, 2, True)

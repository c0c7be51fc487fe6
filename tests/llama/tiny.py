"""Tiny random Llama configs and a transformers twin for parity tests."""

import torch

# Each variant exercises one feature of the math; values are small so a forward takes milliseconds.
BASE = dict(vocab_size=113, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
VARIANTS = {
    "default": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa_head_dim": dict(num_key_value_heads=1, head_dim=24),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "dynamic_rope": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "llama3_rope": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def config_kwargs(variant: str = "default", **overrides) -> dict:
    return {**BASE, **VARIANTS[variant], **overrides}


def hf_and_ours(variant: str = "default", attn_implementation: str = "sdpa", hf_attn: str = "eager",
                model_class: str = "LlamaForCausalLM", **overrides):
    """A random transformers model and ours holding the same weights, both in eval mode."""
    import transformers

    import llamaviz
    from llamaviz.llama.config import LlamaConfig

    kwargs = config_kwargs(variant, **overrides)
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(transformers.LlamaConfig(**kwargs, attn_implementation=hf_attn)).eval()
    ours = getattr(llamaviz, model_class)(LlamaConfig(**kwargs), attn_implementation=attn_implementation).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k == "lm_head.weight" for k in result.missing_keys), result
    return hf, ours

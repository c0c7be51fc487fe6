"""Tiny random Mistral / Qwen2 / Qwen3 configs and their transformers twins, for parity tests."""

import torch

from tiny import BASE

# family -> (transformers config and model class names, llamaviz class names, settings of each case)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}
# Each case exercises what its family adds; windows are shorter than the test sequences so they bite.
CASES = {
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
    "mistral_full": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_sliding": ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)),
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=24)),
    "qwen3_sliding": ("qwen3", dict(num_key_value_heads=1, head_dim=16, use_sliding_window=True, sliding_window=4,
                                    max_window_layers=2, attention_bias=True)),
}


def case_kwargs(case: str, **overrides) -> tuple[str, dict]:
    family, extra = CASES[case]
    return family, {**BASE, **extra, **overrides}


def hf_and_ours(case: str, attn_implementation: str = "sdpa", hf_attn: str = "eager", **overrides):
    """A random transformers model of the case's family and llamaviz's holding the same weights, in eval mode."""
    import transformers

    import llamaviz

    family, kwargs = case_kwargs(case, **overrides)
    config_name, model_name = FAMILIES[family]
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_name)(**kwargs, attn_implementation=hf_attn)
    hf = getattr(transformers, model_name)(hf_config).eval()
    ours = getattr(llamaviz, model_name)(getattr(llamaviz, config_name)(**kwargs),
                                         attn_implementation=attn_implementation).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k == "lm_head.weight" for k in result.missing_keys), result
    return hf, ours

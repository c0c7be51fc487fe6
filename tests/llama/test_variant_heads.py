"""The family's task heads against transformers' Mistral/Qwen2/Qwen3 For{SequenceClassification,TokenClassification,QuestionAnswering}."""

import pytest
import torch
from torch.testing import assert_close

import llamaviz
from tiny_variants import FAMILIES, case_kwargs

HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def pair(case: str, head: str, **overrides):
    """transformers' head of the case's family with random weights, and ours holding the same ones."""
    import transformers

    family, kwargs = case_kwargs(case, num_labels=3, **overrides)
    config_name, causal = FAMILIES[family]
    name = causal.replace("ForCausalLM", head)
    torch.manual_seed(0)
    hf = getattr(transformers, name)(getattr(transformers, config_name)(**kwargs, attn_implementation="eager")).eval()
    ours = getattr(llamaviz, name)(getattr(llamaviz, config_name)(**kwargs)).eval()
    result = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not result.unexpected_keys and not result.missing_keys
    return hf, ours


@pytest.mark.parametrize("case", ["mistral", "qwen2", "qwen3_sliding"])
@pytest.mark.parametrize("head", HEADS)
def test_family_heads_equal_transformers_on_a_padded_batch(case, head):
    hf, ours = pair(case, head)
    ids = torch.randint(3, 113, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding with pad id 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref, out = hf(ids, attention_mask=mask, position_ids=positions), ours(ids, attention_mask=mask)
    for field in ("logits",) if head != "ForQuestionAnswering" else ("start_logits", "end_logits"):
        mine, theirs = getattr(out, field), getattr(ref, field)
        if head != "ForSequenceClassification":  # per position: padded ones hold nothing either model promises
            mine, theirs = mine[mask.bool()], theirs[mask.bool()]
        assert_close(mine, theirs, atol=1e-4, rtol=0, msg=f"{case} {head} {field}")


@pytest.mark.parametrize("case", ["mistral", "qwen2"])
def test_a_saved_family_qa_checkpoint_loads_under_its_own_module_names(case, tmp_path):
    hf, _ = pair(case, "ForQuestionAnswering")
    hf.save_pretrained(tmp_path)
    name = type(hf).__name__
    loaded = getattr(llamaviz, name).from_pretrained(tmp_path).eval()
    assert hasattr(loaded, "transformer" if case.startswith("qwen") else "model")
    ids = torch.randint(3, 113, (1, 7))
    with torch.no_grad():
        assert_close(loaded(ids).start_logits, hf(ids).start_logits, atol=1e-4, rtol=0)


def test_a_family_head_refuses_another_familys_config():
    _, kwargs = case_kwargs("qwen2")
    with pytest.raises(ValueError, match="Qwen2ForSequenceClassification needs a Qwen2Config"):
        llamaviz.Qwen2ForSequenceClassification(llamaviz.LlamaConfig(**kwargs))

"""Task heads against transformers' LlamaFor{SequenceClassification,TokenClassification,QuestionAnswering}."""

import pytest
import torch
from torch.testing import assert_close

from tiny import hf_and_ours

SEQ, TOK, QA = "LlamaForSequenceClassification", "LlamaForTokenClassification", "LlamaForQuestionAnswering"


def padded_batch(left: bool):
    """ids [3, 10] with pad id 0 on one side of rows 0 and 1, its attention mask and HF's position ids."""
    ids = torch.randint(3, 113, (3, 10))
    mask = torch.ones_like(ids)
    for row, pads in ((0, 4), (1, 2)):
        cols = slice(0, pads) if left else slice(10 - pads, 10)
        ids[row, cols], mask[row, cols] = 0, 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("variant", ["default", "gqa", "bias"])
@pytest.mark.parametrize("left", [True, False])
def test_sequence_classification_pools_like_transformers(variant, left):
    hf, ours = hf_and_ours(variant, model_class=SEQ, num_labels=3)
    ids, mask, positions = padded_batch(left)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions)
        out = ours(ids, attention_mask=mask)
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)


def test_sequence_classification_without_pad_id():
    hf, ours = hf_and_ours(model_class=SEQ, pad_token_id=None)
    ids = torch.randint(3, 113, (1, 7))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
        with pytest.raises(ValueError, match="pad_token_id"):
            ours(torch.randint(3, 113, (2, 7)))


@pytest.mark.parametrize("problem_type, num_labels, make_labels", [
    (None, 1, lambda: torch.randn(3)),  # inferred: regression
    (None, 3, lambda: torch.tensor([0, 2, 1])),  # inferred: single label
    (None, 3, lambda: torch.randint(0, 2, (3, 3)).float()),  # inferred: multi label
    ("regression", 2, lambda: torch.randn(3, 2)),
    ("single_label_classification", 4, lambda: torch.tensor([3, 0, 1])),
    ("multi_label_classification", 2, lambda: torch.randint(0, 2, (3, 2)).float()),
])
def test_sequence_classification_loss_matches_transformers(problem_type, num_labels, make_labels):
    hf, ours = hf_and_ours("gqa", model_class=SEQ, num_labels=num_labels, problem_type=problem_type)
    ids, mask, positions = padded_batch(left=True)
    labels = make_labels()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
    assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_unknown_problem_type_is_rejected():
    _, ours = hf_and_ours(model_class=SEQ)
    ours.config.problem_type = "ranking"
    with pytest.raises(ValueError, match="regression, single_label_classification"):
        ours(torch.randint(3, 113, (1, 5)), labels=torch.tensor([1]))


@pytest.mark.parametrize("variant", ["default", "mqa_head_dim"])
def test_token_classification_logits_and_loss_match_transformers(variant):
    hf, ours = hf_and_ours(variant, model_class=TOK, num_labels=5)
    ids, mask, positions = padded_batch(left=False)
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    assert out.logits.shape == (3, 10, 5)
    assert_close(out.logits[valid], ref.logits[valid], atol=1e-4, rtol=0)
    assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_question_answering_logits_and_loss_match_transformers():
    hf, ours = hf_and_ours("gqa", model_class=QA)
    assert hasattr(ours, "transformer") and hasattr(ours, "qa_outputs")
    ids = torch.randint(3, 113, (3, 9))
    start, end = torch.tensor([1, 4, 30]), torch.tensor([[2], [8], [5]])  # 30: outside, ignored
    with torch.no_grad():
        ref = hf(ids, start_positions=start, end_positions=end)
        out = ours(ids, start_positions=start, end_positions=end)
    assert_close(out.start_logits, ref.start_logits, atol=1e-4, rtol=0)
    assert_close(out.end_logits, ref.end_logits, atol=1e-4, rtol=0)
    assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_class", [SEQ, TOK, QA])
def test_heads_have_the_causal_models_hook_points(model_class):
    _, causal = hf_and_ours()
    _, ours = hf_and_ours(model_class=model_class)
    assert list(ours.hook_points()) == list(causal.hook_points())
    ids = torch.randint(3, 113, (2, 6))
    primary, cache = ours.run_with_cache(ids, names_filter=["blocks.1.attn.hook_pattern", "hook_logits"])
    assert cache["pattern", 1].shape == (2, 4, 6, 6)
    assert cache["hook_logits"].shape[:2] == (2, 6)
    zero_head = lambda z, hook: z * 0  # noqa: E731
    with torch.no_grad():
        plain = ours(ids)
        ablated = ours.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_mlp_out", zero_head)])
    assert not torch.allclose(plain[0], ablated[0])


@pytest.mark.parametrize("extra", [{}, {"classifier_dropout": 0.25}, {"hidden_dropout": 0.3}])
def test_token_classification_dropout_and_bias_follow_the_config_like_transformers(extra):
    import transformers

    from llamaviz import LlamaForTokenClassification
    from llamaviz.llama.config import LlamaConfig
    from tiny import config_kwargs

    values = {**config_kwargs(), **extra}
    ref = transformers.LlamaForTokenClassification(transformers.LlamaConfig(**values))
    ours = LlamaForTokenClassification(LlamaConfig.from_dict(values))
    assert ours.dropout.p == ref.dropout.p
    assert (ours.score.bias is None) == (ref.score.bias is None)


# ----- loading head checkpoints through from_pretrained -----

def saved_by_transformers(folder, model_class, dtype=torch.float32, **overrides):
    """A random transformers model of `model_class` saved to `folder` in `dtype`; returns the model (float32)."""
    import transformers

    from tiny import config_kwargs

    torch.manual_seed(0)
    model = getattr(transformers, model_class)(transformers.LlamaConfig(**config_kwargs("gqa", **overrides),
                                                                        attn_implementation="eager")).eval()
    model.to(dtype).save_pretrained(folder)
    return model.float()


@pytest.mark.parametrize("model_class", [SEQ, TOK, QA])
def test_head_checkpoints_saved_by_transformers_load_and_match(tmp_path, model_class):
    import llamaviz

    hf = saved_by_transformers(tmp_path, model_class)
    ours = getattr(llamaviz, model_class).from_pretrained(tmp_path)
    ids = torch.randint(3, 113, (2, 8))
    with torch.no_grad():
        assert_close(ours(ids)[0], hf(ids)[0], atol=1e-4, rtol=0)


def test_a_three_label_checkpoint_gets_num_labels_from_id2label(tmp_path):
    from llamaviz import LlamaForSequenceClassification

    saved_by_transformers(tmp_path, SEQ, num_labels=3)
    assert LlamaForSequenceClassification.from_pretrained(tmp_path).score.out_features == 3


@pytest.mark.parametrize("model_class, head_keys", [(SEQ, ["score.weight"]), (TOK, ["score.weight", "score.bias"]),
                                                     (QA, ["qa_outputs.weight", "qa_outputs.bias"])])
def test_a_base_checkpoint_loads_into_a_head_with_a_warning(tmp_path, model_class, head_keys):
    import llamaviz

    causal = saved_by_transformers(tmp_path, "LlamaForCausalLM")
    with pytest.warns(UserWarning, match="newly initialized") as caught:
        ours = getattr(llamaviz, model_class).from_pretrained(tmp_path)
    message = next(str(w.message) for w in caught if "newly initialized" in str(w.message))
    assert all(key in message for key in head_keys)
    assert_close(ours.base_model.layers[1].mlp.up_proj.weight, causal.model.layers[1].mlp.up_proj.weight)
    head = ours.qa_outputs if model_class == QA else ours.score
    assert 0.005 < head.weight.std() < 0.05  # normal(0, initializer_range=0.02), as transformers initialises it


def test_from_pretrained_dtype_and_device(tmp_path):
    from llamaviz import LlamaForSequenceClassification

    saved_by_transformers(tmp_path, SEQ, dtype=torch.bfloat16)
    assert LlamaForSequenceClassification.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert LlamaForSequenceClassification.from_pretrained(tmp_path).dtype == torch.bfloat16  # None = "auto"
    assert LlamaForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float16).dtype == torch.float16
    assert LlamaForSequenceClassification.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert LlamaForSequenceClassification.from_pretrained(tmp_path, device="auto").device.type == expected
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        LlamaForSequenceClassification.from_pretrained(tmp_path, dtype="int8")

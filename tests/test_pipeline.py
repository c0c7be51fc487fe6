"""pipeline("text-generation"): transformers' output format on a tiny checkpoint, and the default model."""

import json
import shutil

import pytest
import torch

import llamaviz
from llamaviz.run.pipelines import pipeline

PROMPT = "Plants create energy through a process known as"
# A small Llama-2-style template (the fixture tokenizer ships none); the same text for both libraries.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} Answer:{% endif %}")
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, llama2_tokenizer_dir):
    """A random 2-layer Llama with the Llama 2 tokenizer (+ a chat template), saved by transformers."""
    import transformers

    folder = tmp_path_factory.mktemp("tiny-chat")
    for name in ("tokenizer.json", "tokenizer.model", "special_tokens_map.json"):
        shutil.copy(llama2_tokenizer_dir / name, folder / name)
    config = json.loads((llama2_tokenizer_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         bos_token_id=1, eos_token_id=2)
    model = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # sharper logits: greedy choices are not near-ties
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def both_pipelines(tiny_checkpoint):
    import transformers

    hf = transformers.pipeline("text-generation", model=str(tiny_checkpoint), dtype=torch.float32)
    return hf, pipeline("text-generation", model=tiny_checkpoint, dtype=torch.float32)


@pytest.mark.parametrize("inputs, options", [
    (PROMPT, {}),
    (PROMPT, {"return_full_text": False}),
    (["Hello there", PROMPT], {}),
    (CHAT, {}),
    (CHAT, {"return_full_text": False}),
    (CHAT + [{"role": "assistant", "content": "Blue and"}], {}),  # an assistant prefill is continued
    ([CHAT, CHAT + [{"role": "assistant", "content": "Red"}]], {}),
])
def test_outputs_match_transformers_pipeline(both_pipelines, inputs, options):
    hf, ours = both_pipelines
    expected = hf(inputs, max_new_tokens=8, do_sample=False, **options)
    assert ours(inputs, max_new_tokens=8, **options) == expected


def test_loaded_model_and_tokenizer_can_be_passed(both_pipelines, tiny_checkpoint):
    hf, ours = both_pipelines
    again = pipeline("text-generation", model=ours.model, tokenizer=ours.tokenizer)
    by_path = pipeline("text-generation", model=ours.model, tokenizer=str(tiny_checkpoint))
    found = pipeline("text-generation", model=ours.model)  # the tokenizer found through model.name_or_path
    expected = hf(PROMPT, max_new_tokens=5, do_sample=False)
    for pipe in (again, by_path, found):
        assert pipe(PROMPT, max_new_tokens=5) == expected


def test_max_length_counts_the_prompt_like_transformers(both_pipelines):
    hf, ours = both_pipelines
    assert ours(PROMPT, max_length=16) == hf(PROMPT, max_length=16, do_sample=False)


def test_bad_requests(both_pipelines):
    _, ours = both_pipelines
    with pytest.raises(ValueError, match="unknown pipeline task 'summarization'; supported tasks: text-generation"):
        pipeline("summarization")
    with pytest.raises(ValueError, match="disagree"):
        pipeline("text-generation", dtype=torch.float16, torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown generation option.*max_tokens"):
        ours(PROMPT, max_tokens=5)
    with pytest.raises(ValueError, match="a prompt string, a chat"):
        ours(42)
    with pytest.raises(ValueError, match="num_return_sequences"):
        ours(PROMPT, num_return_sequences=0)


# ----- the default model -----

@pytest.fixture(scope="module")
def default_pipe(default_gguf):
    return pipeline("text-generation", model=default_gguf, dtype=torch.float32, device="cpu")


def test_greedy_output_is_model_generate_decoded(default_pipe):
    tokenizer, model = default_pipe.tokenizer, default_pipe.model
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    continuation = tokenizer.decode(model.generate(ids, max_new_tokens=12)[0, ids.shape[1]:].tolist(),
                                    skip_special_tokens=True)
    assert default_pipe(PROMPT, max_new_tokens=12) == [{"generated_text": PROMPT + continuation}]
    assert default_pipe(PROMPT, max_new_tokens=12, return_full_text=False) == [{"generated_text": continuation}]
    assert default_pipe([PROMPT, PROMPT], max_new_tokens=12) == [[{"generated_text": PROMPT + continuation}]] * 2


def test_chat_goes_through_the_chat_template(default_pipe):
    tokenizer, model = default_pipe.tokenizer, default_pipe.model
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)])
    answer = tokenizer.decode(model.generate(ids, max_new_tokens=10)[0, ids.shape[1]:].tolist(),
                              skip_special_tokens=True)
    out = default_pipe(chat, max_new_tokens=10)
    assert out == [{"generated_text": chat + [{"role": "assistant", "content": answer}]}]


def test_sampling_options_pass_through(default_pipe):
    tokenizer, model = default_pipe.tokenizer, default_pipe.model
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
    options = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8, seed=3)
    expected = tokenizer.decode(model.generate(ids, **options)[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    assert default_pipe(PROMPT, return_full_text=False, **options) == [{"generated_text": expected}]
    several = default_pipe(PROMPT, num_return_sequences=3, max_new_tokens=6, do_sample=True, seed=1)
    assert len(several) == 3 and all(record["generated_text"].startswith(PROMPT) for record in several)


def test_torch_dtype_alias_and_auto_device(default_gguf):
    pipe = pipeline("text-generation", model=default_gguf, torch_dtype=torch.bfloat16, device="auto")
    assert pipe.model.dtype == torch.bfloat16
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else
                                "mps" if torch.backends.mps.is_available() else "cpu")
    assert pipe(PROMPT, max_new_tokens=3)[0]["generated_text"].startswith(PROMPT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_zero_is_the_first_gpu(default_gguf):
    pipe = pipeline("text-generation", model=default_gguf, device=0)
    assert pipe.device == torch.device("cuda:0")


def test_default_model_when_no_model_is_given(default_gguf):
    pipe = pipeline("text-generation", model=None, dtype="float32")
    assert pipe.model.config.num_hidden_layers == 30 and isinstance(pipe.model, llamaviz.LlamaForCausalLM)


def test_llamaviz_pipeline_is_the_function_even_after_importing_the_module():
    import llamaviz.run.pipelines  # noqa: F401

    assert llamaviz.pipeline is pipeline

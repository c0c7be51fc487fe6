"""GGUF files of Mistral (arch 'llama'), Qwen2 and Qwen3, written as llama.cpp writes them, against their HF twins."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from gguf import GGUFWriter
from torch.testing import assert_close

import llamaviz
from llamaviz.checkpoints import open_checkpoint, permute_rope_rows

sys.path.insert(0, str(Path(__file__).parent / "llama"))  # the tiny configs live beside the model tests
from tiny_variants import case_kwargs, hf_and_ours  # noqa: E402

IDS = torch.randint(3, 113, (2, 12), generator=torch.Generator().manual_seed(2))
# llama.cpp's tensor names (gguf-py's TensorNameMap), HF name -> GGUF name
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
ARCH = {"mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # llama.cpp converts Mistral to 'llama'


def write_gguf(path: Path, hf, family: str, skip=(), tokenizer_fields=None, arch=None) -> Path:
    """The twin's weights as llama.cpp's converter writes them: q/k rows interleaved for 'llama' files only."""
    config, arch = hf.config, arch or ARCH[family]
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {family}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if getattr(config, "head_dim", None):  # Qwen2's config has none: llama.cpp then writes no key_length
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if family == "mistral" and config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    for key, value in (tokenizer_fields or {}).items():
        getattr(writer, key)(value)
    tied = config.tie_word_embeddings
    for name, tensor in hf.state_dict().items():
        if (tied and name == "lm_head.weight") or name.endswith(skip):
            continue
        parts = name.split(".")
        gguf_name = TOP.get(name) or f"blk.{parts[2]}.{LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
        if arch == "llama" and ".q_proj." in name:
            tensor = permute_rope_rows(tensor, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            tensor = permute_rope_rows(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# transformers' GGUF reader takes Qwen3's head_dim from its default (128), so that case uses 128
@pytest.mark.parametrize("case, overrides", [("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 128})])
def test_gguf_loads_to_the_twins_tensors_and_logits(case, overrides, tmp_path):
    hf, ours = hf_and_ours(case, **overrides)
    family = case_kwargs(case)[0]
    path = write_gguf(tmp_path / f"{case}.gguf", hf, family)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).state_dict()
    checkpoint = open_checkpoint(path)
    assert type(checkpoint.config) is type(ours.config)
    assert checkpoint.config.layer_windows == ours.config.layer_windows
    state = hf.state_dict()
    streamed = dict(checkpoint.tensors())
    expected = {k for k in state if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(streamed) == expected
    for name, tensor in streamed.items():
        assert torch.equal(tensor, state[name]), name  # F32: exact, q/k rows back in HF order
        assert torch.equal(tensor, theirs[name]), name  # as transformers' own GGUF reader lays them out
    with torch.no_grad():
        reference = hf(IDS).logits
        for loader in (llamaviz.AutoModelForCausalLM.from_pretrained, llamaviz.LlamaForCausalLM.from_pretrained):
            model = loader(path)
            assert type(model) is type(ours)
            assert_close(model(IDS).logits, reference, atol=1e-4, rtol=0)


def test_a_llama_gguf_named_mistral_without_a_window_is_mistral_with_full_attention(tmp_path):
    hf, _ = hf_and_ours("mistral_full")
    config = open_checkpoint(write_gguf(tmp_path / "m.gguf", hf, "mistral")).config
    assert type(config) is llamaviz.MistralConfig and config.sliding_window is None


def test_gguf_errors_name_what_is_accepted(tmp_path):
    hf, _ = hf_and_ours("qwen3")
    path = write_gguf(tmp_path / "phi.gguf", hf, "qwen3", arch="phi3")
    with pytest.raises(ValueError, match=r"GGUF architecture 'phi3' is not supported; accepted: 'llama', 'qwen2', "
                                         r"'qwen3'"):
        open_checkpoint(path)
    path = write_gguf(tmp_path / "qwen3.gguf", hf, "qwen3", skip=("q_norm.weight", "k_norm.weight"))
    with pytest.raises(ValueError, match=r"lacks 6 weight\(s\) Qwen3ForCausalLM needs: "
                                         r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        llamaviz.load(path)


# ----- a Qwen2-style byte-level BPE tokenizer, as tokenizer.json and as GGUF metadata -----

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's tokenizer.json pre-tokenizer pattern
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["Plants create energy through a process known as photosynthesis.", "The 12345 numbers split digit by digit.",
         "Don't they'll we've? Spaces   and\nnew lines\n\n end."]


def train_tokenizer(folder: Path):
    """A tiny BPE with Qwen2's pre-tokenizer, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    folder.mkdir(exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "chat_template": CHATML}))
    return tokenizer


def gguf_tokenizer_fields(tokenizer) -> dict:
    """The tokenizer.ggml.* keys llama.cpp's converter writes for a Qwen2 vocabulary (GGUFWriter method -> value)."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return {"add_tokenizer_model": "gpt2", "add_tokenizer_pre": "qwen2", "add_token_list": tokens,
            "add_token_types": [3 if token in SPECIALS else 1 for token in tokens],
            "add_token_merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
            "add_eos_token_id": vocab["<|im_end|>"], "add_pad_token_id": vocab["<|endoftext|>"],
            "add_add_bos_token": False, "add_chat_template": CHATML}


@pytest.mark.parametrize("case", ["qwen2", "qwen3"])  # Qwen3 ships Qwen2's tokenizer
def test_qwen_tokenizer_from_tokenizer_json_and_from_gguf_metadata_match_transformers(case, tmp_path):
    folder = tmp_path / case
    tokenizer = train_tokenizer(folder)
    hf, ours_model = hf_and_ours(case, vocab_size=tokenizer.get_vocab_size())
    hf.save_pretrained(folder)  # a complete HF folder: weights, config, tokenizer
    path = write_gguf(tmp_path / f"{case}.gguf", hf, case, tokenizer_fields=gguf_tokenizer_fields(tokenizer))
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TEXTS[0]}]
    expected_chat = reference.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    for source in (folder, path):
        model, ours = llamaviz.load(source)
        assert type(model) is type(ours_model)
        prompt = reference.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
        assert torch.equal(model.generate(torch.tensor([prompt]), max_new_tokens=5, eos_token_id=[]),
                           hf.generate(torch.tensor([prompt]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                       pad_token_id=0, eos_token_id=None))
        for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>"]:
            assert ours(text)["input_ids"] == reference(text)["input_ids"], (source, text)
            assert ours.decode(ours(text)["input_ids"]) == text
        assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == reference.eos_token_id
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == expected_chat
        assert ours.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == \
            reference.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]


def test_terminal_notebook_app_analysis_and_patching_run_unchanged_on_a_qwen3_folder(tmp_path):
    import io

    from llamaviz import analysis, notebook
    from llamaviz.app.models import ModelRegistry
    from llamaviz.interpret.interventions import ablate_heads
    from llamaviz.terminal import AttentionMaskVisualizer

    folder = tmp_path / "qwen3"
    tokenizer = train_tokenizer(folder)
    hf, ours = hf_and_ours("qwen3_sliding", vocab_size=tokenizer.get_vocab_size())
    ours.save_pretrained(folder)
    printed = io.StringIO()
    AttentionMaskVisualizer(str(folder))(TEXTS[0], file=printed)
    assert "3 layers · 4 heads (1 KV)" in printed.getvalue()
    entry = ModelRegistry().get(str(folder))
    assert isinstance(entry.model, llamaviz.Qwen3ForCausalLM) and "(Qwen3ForCausalLM)" in entry.describe()
    model, tok = entry.model, entry.tokenizer
    assert notebook.show_attention(model, tok, TEXTS[0], layer=2, head=0).data
    assert set(analysis.detect_heads(model, length=8)) >= {"previous-token", "induction"}
    ids = tok(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad(), model.hooks(fwd_hooks=ablate_heads([(1, 0)], model=model)):
        ablated = model(ids).logits
    with torch.no_grad():
        # the same ablation in transformers: head 0's columns of layer 1's o_proj set to zero
        hf.model.layers[1].self_attn.o_proj.weight[:, :16] = 0
        assert_close(ablated, hf(ids).logits, atol=1e-4, rtol=0)
    sequences, cache = model.generate_with_cache(ids, max_new_tokens=6, eos_token_id=[])
    assert cache["pattern", 2].shape[-1] == sequences.shape[1] - 1
    assert cache["blocks.2.attn.hook_q_normalized"].shape[-2:] == (4, 16)

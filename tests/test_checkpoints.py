"""Checkpoint readers against references: transformers (HF folders, GGUF), gguf-py (dequantization, header)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, RopeScalingType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from llamaviz.checkpoints import (
    load_pretrained,
    open_checkpoint,
    permute_rope_rows,
    resolve_device,
    resolve_dtype,
    save_pretrained,
)
from llamaviz.checkpoints import quants
from llamaviz.checkpoints.gguf import llama3_rope_factors
from llamaviz.checkpoints.gguf_header import gguf_metadata, open_gguf, read_gguf_header
from llamaviz.llama.heads import LlamaForQuestionAnswering, LlamaForSequenceClassification
from llamaviz.llama.modeling import LlamaForCausalLM, LlamaModel

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                 "tie_word_embeddings")


def hf_twin(tie: bool = False, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random transformers Llama (weights perturbed so norms are not all ones)."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tie))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def streamed(checkpoint) -> dict[str, torch.Tensor]:
    return dict(checkpoint.tensors())


def assert_same_tensors(ours: dict, reference: dict, skip=("lm_head.weight",)) -> None:
    reference = {k: v for k, v in reference.items() if k not in skip or k in ours}
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    for name, tensor in reference.items():
        assert ours[name].shape == tensor.shape, name
        if not torch.equal(ours[name], tensor):  # assert_close only to explain a difference (it is slow)
            torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)


def transformers_config_values(config) -> dict:
    values = {field: getattr(config, field) for field in CONFIG_FIELDS if field != "rope_theta"}
    rope = getattr(config, "rope_parameters", None) or {}
    values["rope_theta"] = rope.get("rope_theta", getattr(config, "rope_theta", None))
    return values


# ----- the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' GGUF loader -----

@pytest.fixture(scope="module")
def default_reference(default_gguf):
    model = transformers.LlamaForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return model.config, model.dtype, model.state_dict()


@pytest.mark.slow
def test_default_gguf_tensors_equal_transformers(default_gguf, default_reference):
    _, _, reference = default_reference
    checkpoint = open_checkpoint(default_gguf)
    assert checkpoint.format == "gguf" and checkpoint.tokenizer_path == default_gguf
    ours = streamed(checkpoint)
    assert_same_tensors(ours, reference)  # lm_head is tied: transformers' is embed_tokens itself
    assert "lm_head.weight" not in ours and checkpoint.config.tie_word_embeddings


@pytest.mark.slow
def test_default_gguf_config_and_dtype_equal_transformers(default_gguf, default_reference):
    reference_config, reference_dtype, _ = default_reference
    checkpoint = open_checkpoint(default_gguf)
    ours = {field: getattr(checkpoint.config, field) for field in CONFIG_FIELDS}
    assert ours == transformers_config_values(reference_config)
    for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(checkpoint.config, field) == getattr(reference_config, field), field
    assert resolve_dtype(None, checkpoint) == reference_dtype == torch.float32


@pytest.mark.slow
def test_default_gguf_loads_into_model_identically(default_gguf, default_reference):
    _, _, reference = default_reference
    model = LlamaForCausalLM.from_pretrained(default_gguf)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training
    assert model.name_or_path == str(default_gguf)
    assert_same_tensors(model.state_dict(), reference, skip=())


def test_header_parser_equals_gguf_reader(default_gguf):
    header = read_gguf_header(default_gguf)
    reader = GGUFReader(default_gguf)
    assert header.metadata == gguf_metadata(reader)
    table = [(t.name, tuple(int(n) for n in reversed(t.shape)), t.tensor_type, int(t.data_offset), int(t.n_bytes))
             for t in reader.tensors]
    assert [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in header.tensors] == table


# ----- dequantization: torch kernels equal gguf-py's numpy reference bit for bit -----

SCALE_BYTES = {  # where each block keeps its float16 scales (random bytes there could be inf/nan)
    GGMLQuantizationType.Q4_0: [0], GGMLQuantizationType.Q4_1: [0, 2], GGMLQuantizationType.Q5_0: [0],
    GGMLQuantizationType.Q5_1: [0, 2], GGMLQuantizationType.Q8_0: [0], GGMLQuantizationType.Q4_K: [0, 2],
    GGMLQuantizationType.Q5_K: [0, 2], GGMLQuantizationType.Q6_K: [208],
}


@pytest.mark.parametrize("ggml_type", list(SCALE_BYTES), ids=lambda t: t.name)
def test_torch_dequantize_equals_gguf(ggml_type):
    block_size, type_size = quants.GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(0)
    rows, blocks_per_row = 6, 2
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    for start in SCALE_BYTES[ggml_type]:
        raw[:, start:start + 2] = rng.normal(0, 0.05, size=(len(raw), 1)).astype(np.float16).view(np.uint8)
    raw = raw.reshape(rows, -1)
    ours = quants.dequantize(raw, ggml_type, (rows, blocks_per_row * block_size))
    reference = torch.from_numpy(gguf_dequantize(raw, ggml_type))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("ggml_type", ["F16", "BF16"])
def test_float_types_dequantize_equals_gguf(ggml_type):
    ggml_type = GGMLQuantizationType[ggml_type]
    values = torch.randn(4, 32).to(torch.float16 if ggml_type.name == "F16" else torch.bfloat16)
    raw = values.view(torch.uint8).numpy()
    ours = quants.dequantize(raw, ggml_type, (4, 32))
    torch.testing.assert_close(ours, torch.from_numpy(np.asarray(gguf_dequantize(raw, ggml_type))).reshape(4, 32),
                               rtol=0, atol=0)
    torch.testing.assert_close(ours, values.float(), rtol=0, atol=0)


# ----- tiny GGUF files written with gguf-py -----

def write_gguf(path, state: dict, config: dict, types: dict | None = None, arch: str = "llama", extra=None):
    """An HF state dict as llama.cpp writes it: GGUF names, q/k rows permuted, chosen tensors quantized."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for add in extra or ():
        add(writer)
    for name, tensor in state.items():
        parts = name.split(".")
        gguf_name = names.get(name) or f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        if "q_proj" in name:
            tensor = permute_rope_rows(tensor, config["num_attention_heads"])
        if "k_proj" in name:
            tensor = permute_rope_rows(tensor, config["num_key_value_heads"])
        ggml_type = (types or {}).get(name, GGMLQuantizationType.F32)
        array = tensor.detach().float().numpy()
        if ggml_type == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, array)
        else:
            writer.add_tensor(gguf_name, gguf_quantize(array, ggml_type), raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_f32_round_trip_and_transformers_parity(tmp_path):
    twin = hf_twin()
    state = twin.state_dict()
    path = write_gguf(tmp_path / "tiny.gguf", state, TINY)
    checkpoint = open_checkpoint(path)
    assert_same_tensors(streamed(checkpoint), state, skip=())  # the permutation is undone exactly
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert_same_tensors(streamed(checkpoint), reference.state_dict(), skip=())
    config = {f: getattr(checkpoint.config, f) for f in CONFIG_FIELDS}
    assert config == transformers_config_values(reference.config)
    assert config["rms_norm_eps"] == np.float32(TINY["rms_norm_eps"])  # GGUF stores it as float32


def test_tiny_gguf_quantized_equals_gguf_dequantize_and_transformers(tmp_path):
    twin = hf_twin(tie=True)
    state = {k: v for k, v in twin.state_dict().items() if k != "lm_head.weight"}
    types = {name: (GGMLQuantizationType.Q8_0 if "proj" in name else GGMLQuantizationType.Q4_0)
             for name, tensor in state.items() if tensor.ndim == 2}
    path = write_gguf(tmp_path / "tiny-q.gguf", state, TINY, types)
    checkpoint = open_checkpoint(tmp_path)  # a folder holding one .gguf
    assert checkpoint.config.tie_word_embeddings and checkpoint.path == path
    ours = streamed(checkpoint)
    reference = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name).state_dict()
    assert_same_tensors(ours, reference)
    for name, ggml_type in types.items():  # and close to the float weights they came from
        step = 0.15 if ggml_type == GGMLQuantizationType.Q4_0 else 0.01
        torch.testing.assert_close(ours[name], state[name], rtol=0, atol=step * state[name].abs().max().item())
    model = load_pretrained(LlamaForCausalLM, path, dtype="bfloat16")  # cast on the way in
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_tensors(model.state_dict(), {k: v.to(torch.bfloat16) for k, v in reference.items()}, skip=())


def test_gguf_linear_rope_scaling(tmp_path):
    extra = [lambda w: w.add_rope_scaling_type(RopeScalingType.LINEAR), lambda w: w.add_rope_scaling_factor(4.0)]
    path = write_gguf(tmp_path / "linear.gguf", hf_twin().state_dict(), TINY, extra=extra)
    assert open_checkpoint(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_gguf_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    reference = transformers.LlamaConfig(**{**TINY, "rope_theta": 500000.0}, rope_scaling=dict(scaling))
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
    default = 1.0 / 500000.0 ** (torch.arange(0, 16, 2).float() / 16)
    freqs = (default / scaled).float()  # what llama.cpp stores: the divisor per frequency
    torch.testing.assert_close(llama3_rope_factors(scaling, 500000.0, 16).float(), freqs)
    extra = [lambda w: w.add_tensor("rope_freqs.weight", freqs.numpy()),
             lambda w: w.add_uint32("llama.rope.scaling.original_context_length", 64)]
    path = write_gguf(tmp_path / "llama3.gguf", hf_twin().state_dict(), {**TINY, "rope_theta": 500000.0}, extra=extra)
    checkpoint = open_checkpoint(path)
    assert checkpoint.config.rope_scaling == scaling
    assert "rope_freqs.weight" not in checkpoint.tensor_names()


# ----- Hugging Face folders -----

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    twin = hf_twin()
    twin.save_pretrained(folder)
    return folder, twin


def test_hf_safetensors_folder(hf_folder):
    folder, twin = hf_folder
    checkpoint = open_checkpoint(folder)
    assert checkpoint.format == "safetensors" and checkpoint.tokenizer_path == folder
    assert_same_tensors(streamed(checkpoint), twin.state_dict(), skip=())
    assert {f: getattr(checkpoint.config, f) for f in CONFIG_FIELDS} == transformers_config_values(twin.config)
    assert checkpoint.source_dtype == torch.float32
    assert checkpoint.total_bytes == sum(t.nbytes for t in twin.state_dict().values())


def test_hf_sharded_safetensors_folder(tmp_path):
    twin = hf_twin(rope_theta=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    twin.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    checkpoint = open_checkpoint(tmp_path)
    assert_same_tensors(streamed(checkpoint), twin.state_dict(), skip=())
    assert checkpoint.config.rope_theta == 5000.0  # transformers 5 writes rope_parameters
    assert checkpoint.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_hf_bin_folders(tmp_path):
    twin = hf_twin()
    state = twin.state_dict()
    twin.config.save_pretrained(tmp_path / "single")
    torch.save(state, tmp_path / "single" / "pytorch_model.bin")
    twin.config.save_pretrained(tmp_path / "sharded")
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:7], "pytorch_model-00002-of-00002.bin": names[7:]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / "sharded" / file)
    index = {"metadata": {}, "weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (tmp_path / "sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    for folder in ("single", "sharded"):
        checkpoint = open_checkpoint(tmp_path / folder)
        assert checkpoint.format == "bin"
        assert_same_tensors(streamed(checkpoint), state, skip=())


def test_dtype_none_follows_transformers(tmp_path):
    hf_twin().to(torch.bfloat16).save_pretrained(tmp_path)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path)  # dtype defaults to "auto"
    checkpoint = open_checkpoint(tmp_path)
    assert resolve_dtype(None, checkpoint) == resolve_dtype("auto", checkpoint) == reference.dtype == torch.bfloat16
    model = load_pretrained(LlamaForCausalLM, tmp_path)
    assert model.dtype == torch.bfloat16
    assert_same_tensors(model.state_dict(), reference.state_dict(), skip=())
    assert load_pretrained(LlamaForCausalLM, tmp_path, dtype="float32").dtype == torch.float32


def test_resolve_dtype_and_device():
    assert resolve_dtype("bfloat16") == resolve_dtype(torch.bfloat16) == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(None) == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8' is not supported; accepted: torch.float32"):
        resolve_dtype("int8")
    assert resolve_device(None) == resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    with pytest.raises(ValueError, match="device 'tpu' is not supported; accepted: 'cpu', 'cuda'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(0)


# ----- loading into the model, saving for transformers -----

def test_load_pretrained_matches_transformers_logits(hf_folder):
    folder, twin = hf_folder
    model = load_pretrained(LlamaForCausalLM, folder)
    assert_same_tensors(model.state_dict(), twin.state_dict(), skip=())
    ids = torch.randint(0, TINY["vocab_size"], (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.warns(UserWarning, match="1 weight.* were not used by LlamaModel: lm_head.weight"):
        base = load_pretrained(LlamaModel, folder)  # keys without the `model.` prefix; lm_head left unused
    assert_same_tensors(base.state_dict(), twin.model.state_dict(), skip=())


def test_missing_task_head_is_initialised_with_a_warning(hf_folder):
    folder, _ = hf_folder
    with pytest.warns(UserWarning) as caught:
        model = load_pretrained(LlamaForSequenceClassification, folder, num_labels=3)
    messages = [str(w.message) for w in caught]
    assert any("newly initialized: ['score.weight']" in m for m in messages), messages
    assert any("not used by LlamaForSequenceClassification: lm_head.weight" in m for m in messages), messages
    _, info = transformers.LlamaForSequenceClassification.from_pretrained(folder, num_labels=3,
                                                                          output_loading_info=True)
    assert set(info["missing_keys"]) == {"score.weight"}  # the same head is new in transformers
    assert model.score.weight.shape == (3, TINY["hidden_size"])
    assert abs(model.score.weight.std().item() - model.config.initializer_range) < 0.005


def test_question_answering_reads_the_base_model_under_its_prefix(hf_folder):
    folder, twin = hf_folder  # transformers leaves `transformer.*` random here; we map `model.*` onto it
    with pytest.warns(UserWarning) as caught:
        model = load_pretrained(LlamaForQuestionAnswering, folder)
    assert any("newly initialized: ['qa_outputs.weight', 'qa_outputs.bias']" in str(w.message) for w in caught)
    assert_same_tensors(model.transformer.state_dict(), twin.model.state_dict(), skip=())
    assert torch.count_nonzero(model.qa_outputs.bias) == 0 and model.qa_outputs.weight.std() > 0


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, hf_folder, tie):
    folder, twin = hf_folder
    source = tmp_path / "source"
    hf_twin(tie=tie).save_pretrained(source)
    model = load_pretrained(LlamaForCausalLM, source)
    save_pretrained(model, tmp_path / "out", max_shard_size="30KB" if tie else None)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() == tie
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert reference.config.tie_word_embeddings == tie
    assert_same_tensors(reference.state_dict(), model.state_dict(), skip=())
    assert_same_tensors(streamed(open_checkpoint(tmp_path / "out")), model.state_dict())


def test_progress_bar_when_asked(hf_folder, capsys):
    folder, _ = hf_folder
    load_pretrained(LlamaForCausalLM, folder, progress=True)
    assert "100%" in capsys.readouterr().err
    load_pretrained(LlamaForCausalLM, folder)  # small: no bar by default
    assert capsys.readouterr().err == ""
    told = []
    load_pretrained(LlamaForCausalLM, folder, progress=lambda fraction, text: told.append((fraction, text)))
    assert capsys.readouterr().err == "" and told[-1][0] == 1.0 and "Loading" in told[-1][1]
    assert [fraction for fraction, _ in told] == sorted(fraction for fraction, _ in told)


# ----- Meta's original format -----

def to_meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF half-split rows -> Meta's interleaved rows by explicit indices: meta[2j] = hf[j], meta[2j+1] = hf[j + d/2]."""
    d = weight.shape[0] // heads
    order = [h * d + (j // 2 if j % 2 == 0 else d // 2 + j // 2) for h in range(heads) for j in range(d)]
    return weight[order]


def test_meta_format_two_shards(tmp_path):
    twin = hf_twin()
    state = twin.state_dict()
    heads, kv_heads = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    meta = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"],
            "output.weight": state["lm_head.weight"]}
    for i in range(TINY["num_hidden_layers"]):
        hf = lambda name: state[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        meta |= {f"layers.{i}.attention.wq.weight": to_meta_rows(hf("self_attn.q_proj"), heads),
                 f"layers.{i}.attention.wk.weight": to_meta_rows(hf("self_attn.k_proj"), kv_heads),
                 f"layers.{i}.attention.wv.weight": hf("self_attn.v_proj"),
                 f"layers.{i}.attention.wo.weight": hf("self_attn.o_proj"),
                 f"layers.{i}.feed_forward.w1.weight": hf("mlp.gate_proj"),
                 f"layers.{i}.feed_forward.w3.weight": hf("mlp.up_proj"),
                 f"layers.{i}.feed_forward.w2.weight": hf("mlp.down_proj"),
                 f"layers.{i}.attention_norm.weight": hf("input_layernorm"),
                 f"layers.{i}.ffn_norm.weight": hf("post_attention_layernorm")}
    row_parallel = ("attention.wo", "feed_forward.w2", "tok_embeddings")  # Llama 2 splits the embedding by columns
    for shard in range(2):
        part = {}
        for name, tensor in meta.items():
            dim = None if tensor.ndim == 1 else 1 if any(p in name for p in row_parallel) else 0
            part[name] = tensor.clone() if dim is None else tensor.chunk(2, dim=dim)[shard].clone()
        torch.save(part, tmp_path / f"consolidated.{shard:02d}.pth")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
              "norm_eps": 1e-5, "max_seq_len": 256}
    (tmp_path / "params.json").write_text(json.dumps(params))
    checkpoint = open_checkpoint(tmp_path)
    assert checkpoint.format == "meta"
    assert_same_tensors(streamed(checkpoint), state, skip=())
    assert {f: getattr(checkpoint.config, f) for f in CONFIG_FIELDS} == transformers_config_values(twin.config)


# ----- bad input: one clear error each -----

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nowhere; expected an HF folder \(config.json"):
        open_checkpoint(tmp_path / "nowhere")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
    with pytest.raises(FileNotFoundError, match="no weights in .*; looked for model.safetensors"):
        open_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*empty; expected an HF folder \(config.json with"):
        open_checkpoint(tmp_path / "empty")


def test_truncated_safetensors(tmp_path, hf_folder):
    folder, _ = hf_folder
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        open_checkpoint(tmp_path)


def test_truncated_and_corrupt_gguf(tmp_path):
    path = write_gguf(tmp_path / "good.gguf", hf_twin().state_dict(), TINY)
    data = path.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"half.gguf is truncated: tensor '.*' ends at byte \d+ but the file has"):
        open_checkpoint(tmp_path / "half.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:200])
    with pytest.raises(ValueError, match="header.gguf is not a readable GGUF file"):
        open_checkpoint(tmp_path / "header.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(ValueError, match="bad magic"):
        open_checkpoint(tmp_path / "magic.gguf")


def test_folder_with_two_ggufs(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 2 .gguf files \(a.gguf, b.gguf\); pass the path of the one"):
        open_checkpoint(tmp_path)


def test_gguf_of_another_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", hf_twin().state_dict(), TINY, arch="gpt2")
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; accepted: 'llama'"):
        open_checkpoint(path)


def test_gguf_tensor_of_unsupported_type(tmp_path):
    extra = [lambda w: w.add_tensor("blk.0.attn_q_norm.weight", np.arange(16, dtype=np.int32))]
    path = write_gguf(tmp_path / "i32.gguf", hf_twin().state_dict(), TINY, extra=extra)
    with pytest.raises(ValueError, match="tensor 'blk.0.attn_q_norm.weight' has GGML type I32, which cannot be "
                                         "dequantized; supported: F32, F16"):
        open_checkpoint(path)


def test_shapes_that_disagree_with_config(tmp_path, hf_folder):
    folder, _ = hf_folder
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 32, "head_dim": 16}))
    with pytest.raises(ValueError, match=r"\S+\.weight in .*model.safetensors has shape \(128, 64\), "
                                         r"but LlamaForCausalLM built from the config expects \(128, 32\): the "
                                         r"config's hidden_size gives 32 but the weights have 64"):
        load_pretrained(LlamaForCausalLM, tmp_path)


def test_missing_weights_are_named(tmp_path, hf_folder):
    folder, twin = hf_folder
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers is 3 but the file's tensors hold layers "
                                         r"0..1 \(1 layers missing, e.g. layer 2\)"):
        load_pretrained(LlamaForCausalLM, tmp_path)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])  # transformers 5 and 4 spellings
def test_unknown_rope_type_in_config(tmp_path, hf_folder, key):
    folder, _ = hf_folder
    config = json.loads((folder / "config.json").read_text())
    config[key] = {"rope_type": "wobbly", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="config.json: unknown rope_scaling type 'wobbly'; accepted: default"):
        open_checkpoint(tmp_path)


def test_open_gguf_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        open_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(10))
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        open_gguf(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="junk.gguf is not a readable GGUF file"):
        read_gguf_header(tmp_path / "junk.gguf")

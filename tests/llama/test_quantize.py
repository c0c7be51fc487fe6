"""Weight-only int4/int8 quantization: storage, the math, the model surgery, and the default model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from llamaviz.llama.quantize import (QUANTIZED_LINEARS, QuantizedLinear, TorchAoConfig, pack_codes, quantization_of,
                                     quantize_model, quantize_weight, unpack_codes, weight_bytes)
from tiny import hf_and_ours

# A few hundred tokens of ordinary English for the top-1 agreement check.
ORDINARY_TEXT = (
    "The history of the city begins in the early Middle Ages, when a small group of farmers settled on the banks "
    "of the river. Over the following centuries the settlement grew into a market town, and by the fourteenth "
    "century it had a stone bridge, a church and a busy harbour. Merchants brought wool, salt and timber from the "
    "surrounding villages, and the town council built new walls to protect the growing population. In the "
    "nineteenth century the arrival of the railway changed everything. Factories were built along the river, "
    "workers moved in from the countryside, and the population doubled in less than thirty years. Today the old "
    "town is a popular destination for visitors, who come to see the medieval streets, the cathedral and the "
    "museum of local history.\n"
    "Plants create energy through a process known as photosynthesis. During photosynthesis, plants use sunlight, "
    "water and carbon dioxide to make glucose and oxygen. The glucose is used by the plant for growth, while the "
    "oxygen is released into the air. Most of this process takes place in the leaves, inside small structures "
    "called chloroplasts, which contain a green pigment named chlorophyll.\n"
    "My grandmother kept a small garden behind her house. Every spring she planted tomatoes, beans and potatoes, "
    "and every summer she spent her mornings pulling weeds and watering the rows. When I visited her as a child, "
    "she would hand me a basket and ask me to pick whatever was ripe. In the evening we cooked dinner together "
    "with the vegetables we had picked, and she told me stories about the village where she grew up.")


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_round_trip_and_error_is_at_most_half_a_step(bits):
    weight = torch.randn(24, 96) * 0.05
    codes, scales, zeros = quantize_weight(weight, bits, 32)
    assert codes.dtype == zeros.dtype == torch.uint8 and int(codes.max()) <= 2 ** bits - 1
    assert scales.shape == zeros.shape == (24, 3)
    packed = pack_codes(codes, bits)
    assert packed.shape == (24, 96 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    dequantized = (codes.view(24, 3, 32).float() - zeros[..., None]) * scales[..., None]  # [o, n, g]
    error = (dequantized - weight.view(24, 3, 32)).abs()
    assert bool((error <= scales[..., None] / 2 + 1e-7).all())


def reference_dequantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """What the codes must decode to, one group of columns at a time: round to nearest on the group's
    [min, max] range widened to hold 0; the last group of a row is whatever width is left. float32
    throughout, like the quantizer: GGUF-derived weights sit exactly on rounding ties."""
    top, columns = 2 ** bits - 1, []
    for start in range(0, weight.shape[1], group_size):
        group = weight[:, start:start + group_size].float()  # [o, g or fewer]
        low, high = group.min(1, keepdim=True).values.clamp(max=0), group.max(1, keepdim=True).values.clamp(min=0)
        scale = ((high - low) / top).clamp(min=torch.finfo(torch.float32).tiny)
        zero = (-low / scale).round().clamp(0, top)
        codes = ((group / scale).round() + zero).clamp(0, top)
        columns.append((codes - zero) * scale)
    return torch.cat(columns, dim=1).to(weight.dtype)


@pytest.mark.parametrize("bits, width, group_size", [(4, 96, 40), (4, 75, 32), (8, 50, 128), (4, 576, 128), (4, 7, 1),
                                                        (4, 50, 4096)])
def test_groups_that_do_not_divide_the_width_match_a_reference_dequantization(bits, width, group_size):
    linear = torch.nn.Linear(width, 24, bias=False)
    quantized = QuantizedLinear.from_linear(linear, bits, group_size)
    groups = -(-width // group_size)
    assert quantized.scales.shape == quantized.zeros.shape == (24, groups)
    assert quantized.qweight.shape == (24, -(-width * bits // 8))
    assert_close(quantized.weight, reference_dequantize(linear.weight.detach(), bits, group_size))
    assert quantized.weight.is_contiguous()  # for code that views .weight; forward reads the strided one
    x = torch.randn(3, width)
    assert_close(quantized(x), x @ reference_dequantize(linear.weight.detach(), bits, group_size).T)


def test_int4_group_128_on_a_tiny_model_whose_widths_128_does_not_divide():
    """Ours quantized vs transformers holding the reference-dequantized weights (192 = 128 + 64, 200 = 128 + 72)."""
    hf, ours = hf_and_ours("gqa", hidden_size=192, intermediate_size=200)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in QUANTIZED_LINEARS:
                module.weight.copy_(reference_dequantize(module.weight, 4, 128))
        quantize_model(ours, "int4", group_size=128)
        ids = torch.randint(3, 113, (2, 9))
        assert_close(ours(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)
        _, cache = ours.run_with_cache(ids)
        assert torch.isfinite(cache.head_logit_attribution(5)).all()  # reads o_proj.weight and lm_head.weight
    assert ours.model.layers[0].mlp.down_proj.scales.shape == (192, 2)
    assert quantization_of(ours) == "int4, group_size 128"


@pytest.mark.parametrize("bits, bias", [(4, False), (4, True), (8, True)])
def test_quantized_linear_is_a_linear_with_the_dequantized_weight(bits, bias):
    linear = torch.nn.Linear(64, 40, bias=bias)
    quantized = QuantizedLinear.from_linear(linear, bits, 16)
    x = torch.randn(2, 5, 64)
    assert_close(quantized(x), F.linear(x, quantized.weight, quantized.bias))
    relative = (quantized.weight - linear.weight).norm() / linear.weight.norm()
    assert relative < (0.1 if bits == 4 else 0.01)
    assert quantized.qweight.dtype == torch.uint8 and quantized.qweight.shape == (40, 64 * bits // 8)


@pytest.mark.parametrize("variant, lm_head_quantized", [("default", True), ("tied", False), ("bias", True)])
def test_quantize_model_replaces_the_projections(variant, lm_head_quantized):
    _, model = hf_and_ours(variant)
    quantize_model(model, "int4")
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert isinstance(linear, QuantizedLinear) and linear.group_size == 32  # 64 and 96 wide: 32 fits both
    assert isinstance(model.lm_head, QuantizedLinear) == lm_head_quantized
    if not lm_head_quantized:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert quantization_of(model) == "int4, group_size 32"


@pytest.mark.parametrize("quantization, tolerance", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_logits_stay_close_to_float(quantization, tolerance):
    _, model = hf_and_ours("gqa")
    ids = torch.randint(3, 113, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        quantize_model(model, quantization, group_size=16)
        logits = model(ids).logits
    assert (logits - reference).abs().max() < tolerance * reference.abs().max()


def test_quantized_model_hooks_cache_generation_and_gradients():
    _, model = hf_and_ours("gqa")
    quantize_model(model, "int4")
    ids = torch.randint(3, 113, (1, 8))
    logits, cache = model.run_with_cache(ids)
    assert cache["pattern", 2].shape == (1, 4, 8, 8)
    assert_close(logits, model(ids).logits)
    attribution = cache.head_logit_attribution(5)  # reads o_proj.weight and lm_head.weight
    assert attribution.shape == (1, 3, 4) and torch.isfinite(attribution).all()
    dynamic = model.generate(ids, max_new_tokens=6)
    assert torch.equal(model.generate(ids, max_new_tokens=6, cache_implementation="static"), dynamic)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits[0, -1, 7].backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_quantized_model_in_bfloat16():
    _, model = hf_and_ours()
    model.to(torch.bfloat16)
    quantize_model(model, "int4")
    assert model.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    assert model(torch.randint(3, 113, (1, 6))).logits.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_quantized_model_on_cuda_matches_cpu():
    _, model = hf_and_ours()
    quantize_model(model, "int4")
    ids = torch.randint(3, 113, (1, 6))
    with torch.no_grad():
        assert_close(model.cuda()(ids.cuda()).logits.cpu(), model.cpu()(ids).logits, atol=1e-4, rtol=1e-4)


def test_bad_quantization_requests_are_refused():
    _, model = hf_and_ours()
    with pytest.raises(ValueError, match="quantization 'int3' is not supported; accepted: 'int4', 'int8'"):
        quantize_model(model, "int3")
    for size in (0, -128, 2.5, True, "128"):
        with pytest.raises(ValueError, match="group_size must be a positive integer"):
            quantize_model(model, "int4", group_size=size)
    assert quantization_of(model) is None  # a refused request leaves the model untouched
    quantize_model(model, "int8")
    with pytest.raises(ValueError, match=r"already quantized \(int8, group_size 32\)"):
        quantize_model(model, "int4")


def test_from_pretrained_rejects_bad_requests_before_loading(tmp_path):
    from llamaviz import LlamaForCausalLM

    nowhere = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="quantization 'nf4' is not supported"):
        LlamaForCausalLM.from_pretrained(nowhere, quantization="nf4")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        LlamaForCausalLM.from_pretrained(nowhere, quantization="int4", group_size=0)
    with pytest.raises(ValueError, match="group_size=64 needs quantization='int4' or 'int8'"):
        LlamaForCausalLM.from_pretrained(nowhere, group_size=64)
    with pytest.raises(ValueError, match="either quantization=/group_size= or quantization_config="):
        LlamaForCausalLM.from_pretrained(nowhere, quantization="int4", quantization_config=TorchAoConfig("int4_weight_only"))
    with pytest.raises(ValueError, match="quantization_config must be a TorchAoConfig .* got str"):
        LlamaForCausalLM.from_pretrained(nowhere, quantization_config="int4_weight_only")


# ----- TorchAoConfig: the documentation's spelling -----

def test_torchao_config_spellings():
    import llamaviz

    assert llamaviz.TorchAoConfig is TorchAoConfig
    config = TorchAoConfig("int4_weight_only", group_size=128)
    assert (config.quantization, config.group_size) == ("int4", 128)
    assert TorchAoConfig("int4_weight_only").group_size == 128  # torchao's int4 default
    assert (TorchAoConfig("int8_weight_only").quantization, TorchAoConfig("int8_weight_only").group_size) == ("int8", None)
    with pytest.raises(ValueError, match="quant_type 'float8_weight_only' is not implemented by llamaviz; supported: "
                                         "'int4_weight_only', 'int8_weight_only'"):
        TorchAoConfig("float8_weight_only")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        TorchAoConfig("int4_weight_only", group_size=0)
    with pytest.raises(ValueError, match="accepts quant_type and group_size; layout is not supported"):
        TorchAoConfig("int4_weight_only", layout="tile_packed")


@pytest.mark.parametrize("quant_type, quantization", [("int4_weight_only", "int4"), ("int8_weight_only", "int8")])
def test_quantization_config_equals_quantization(tmp_path, quant_type, quantization):
    from llamaviz import LlamaForCausalLM

    _, ours = hf_and_ours("gqa", hidden_size=192, intermediate_size=200)
    ours.save_pretrained(tmp_path)
    spelled = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=TorchAoConfig(quant_type, group_size=128))
    plain = LlamaForCausalLM.from_pretrained(tmp_path, quantization=quantization, group_size=128)
    assert quantization_of(spelled) == quantization_of(plain) == f"{quantization}, group_size 128"
    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(spelled.named_buffers())[name], buffer), name


def test_a_torchao_config_object_is_read_for_its_fields():
    """torchao's Int4WeightOnlyConfig when installed; else a same-named class from a torchao module path."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig
    except ImportError:
        Int4WeightOnlyConfig = type("Int4WeightOnlyConfig", (), {"__module__": "torchao.quantization.quant_api",
                                                                 "__init__": lambda self, group_size=128:
                                                                 setattr(self, "group_size", group_size)})
    config = TorchAoConfig(Int4WeightOnlyConfig(group_size=32))
    assert (config.quantization, config.group_size) == ("int4", 32)


def test_transformers_torchao_config_is_accepted():
    torchao = pytest.importorskip("torchao", reason="transformers' TorchAoConfig needs torchao installed")
    import transformers

    from llamaviz.llama.quantize import as_torchao_config

    theirs = transformers.TorchAoConfig(torchao.quantization.Int4WeightOnlyConfig(group_size=64))
    assert (as_torchao_config(theirs).quantization, as_torchao_config(theirs).group_size) == ("int4", 64)


# ----- the default model (SmolLM2-135M-Instruct) -----

@pytest.fixture(scope="module")
def default_models(default_gguf):
    """(float32 model, int4 model loaded with quantization=, tokenizer), loaded once for this module."""
    import llamaviz

    float_model, tokenizer = llamaviz.load(default_gguf, dtype=torch.float32)
    int4_model = llamaviz.LlamaForCausalLM.from_pretrained(default_gguf, dtype=torch.float32, quantization="int4")
    return float_model, int4_model, tokenizer


@pytest.mark.parametrize("group_size", [None, 128])
def test_int4_default_model_memory_and_top1_agreement(default_models, group_size):
    float_model, int4_model, tokenizer = default_models
    if group_size is not None:  # 576-wide layers: four groups of 128 and a last one of 64 per row
        int4_model = quantize_model(copy.deepcopy(float_model), "int4", group_size=group_size)
    ratio = weight_bytes(int4_model) / weight_bytes(float_model)
    ids = torch.tensor([tokenizer.encode(ORDINARY_TEXT)])
    with torch.no_grad():
        agreement = (int4_model(ids).logits.argmax(-1) == float_model(ids).logits.argmax(-1)).float().mean().item()
    print(f"\nint4 (group_size {int4_model.model.layers[0].mlp.up_proj.group_size}): {ratio:.3f}x float32 bytes, "
          f"top-1 agreement {agreement:.1%} over {ids.shape[1]} tokens")
    assert ids.shape[1] >= 250
    assert ratio <= 0.35
    assert agreement >= 0.6


def test_int4_default_model_generates_and_caches(default_models):
    _, int4_model, tokenizer = default_models
    ids = torch.tensor([tokenizer.encode("Plants create energy through a process known as")])
    out = int4_model.generate(ids, max_new_tokens=4)
    assert out.shape == (1, ids.shape[1] + 4)
    logits, cache = int4_model.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.29."))
    assert cache["pattern", 29].shape == (1, 9, ids.shape[1], ids.shape[1])
    assert torch.equal(logits[0, -1].argmax(), out[0, ids.shape[1]])


def test_default_model_group_128_matches_the_reference_dequantization(default_models):
    float_model, _, _ = default_models
    layer = copy.deepcopy(float_model.model.layers[0])
    expected = {name: reference_dequantize(getattr(layer.self_attn, name).weight.detach(), 4, 128)
                for name in ("q_proj", "o_proj")}
    quantize_model(layer, "int4", group_size=128)
    assert layer.self_attn.q_proj.scales.shape == (576, 5)  # 576 = 4 * 128 + 64
    for name, weight in expected.items():
        assert_close(getattr(layer.self_attn, name).weight, weight)


def test_quantize_model_equals_from_pretrained_quantization(default_models):
    float_model, int4_model, _ = default_models
    again = quantize_model(copy.deepcopy(float_model).model.layers[3], "int4", group_size=64)
    loaded = int4_model.model.layers[3]
    assert torch.equal(again.mlp.down_proj.qweight, loaded.mlp.down_proj.qweight)
    assert torch.equal(again.self_attn.k_proj.scales, loaded.self_attn.k_proj.scales)


def test_a_model_without_projections_is_refused():
    with pytest.raises(ValueError, match="Embedding has no layer to quantize"):
        quantize_model(torch.nn.Embedding(10, 4), "int8")


def test_a_quantized_model_is_not_saved_as_a_transformers_checkpoint(tmp_path):
    _, ours = hf_and_ours("gqa")
    quantize_model(ours, "int8", group_size=32)
    with pytest.raises(ValueError, match=r"cannot save a quantized model \(int8, group_size 32\)"):
        ours.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())

"""Long views: max-pooled overviews (against a loop over blocks), exact windows, the notebook's long path."""

import numpy as np
import pytest
import torch

import llamaviz
from llamaviz import notebook, plots
from llamaviz.llama.config import LlamaConfig
from llamaviz.plots import pooling

from tiny import config_kwargs


def brute_force_pool(weights: np.ndarray, row_size: int, col_size: int) -> np.ndarray:
    rows, cols = -(-weights.shape[0] // row_size), -(-weights.shape[1] // col_size)
    out = np.zeros((rows, cols))
    for i in range(rows):
        for j in range(cols):
            out[i, j] = weights[i * row_size:(i + 1) * row_size, j * col_size:(j + 1) * col_size].max()
    return out


def test_max_pool_equals_a_loop_over_blocks_and_keeps_one_sharp_far_attention(monkeypatch):
    weights = (torch.rand(37, 37) * 0.01).tril()  # causal: keys after the query are zero
    weights[33, 2] = 1.0  # a late query attending hard to an early key
    monkeypatch.setattr(pooling, "BAND_ROWS", 10)  # several bands, the last one short
    pooled = pooling.max_pool(lambda s, e: weights[s:e, :e], 37, 37, cells=8)  # each band reads its visible keys
    np.testing.assert_allclose(pooled.values, brute_force_pool(weights.numpy(), 5, 5), rtol=0, atol=0)
    assert pooled.values.shape == (8, 8) and list(pooled.row_edges[:3]) == [0, 5, 10] and pooled.row_edges[-1] == 37
    assert pooled.values[pooled.block_of(33, 2)] == 1.0
    assert weights[30:35, 0:5].mean() < 0.1  # what a mean-pooled cell would show


def test_lazy_pooled_overview_and_window_equal_the_stored_pattern():
    torch.manual_seed(0)
    model = llamaviz.LlamaForCausalLM(LlamaConfig(**config_kwargs("gqa"))).eval()
    ids = torch.randint(3, 113, (1, 50), generator=torch.Generator().manual_seed(2))
    _, stored = model.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    _, lazy = model.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern", patterns="lazy")
    tokens = [f"t{i}" for i in range(50)]
    for head in (2, "mean"):
        full = stored["pattern", 1][0]
        full = (full.mean(0) if head == "mean" else full[head]).numpy()
        pooled = pooling.max_pool(pooling.pattern_reader(lazy, 1, head), 50, 50, cells=16)
        np.testing.assert_allclose(pooled.values, brute_force_pool(full, 4, 4), atol=1e-6, rtol=0)
        lazy.lazy.computed_heads = 0
        in_log_space = pooling.pooled_pattern(lazy, 1, head, 50, cells=16)  # a head: max of s - lse, no softmax
        assert lazy.lazy.computed_heads == (1 if head == 2 else model.config.num_attention_heads)
        np.testing.assert_allclose(in_log_space.values, brute_force_pool(full, 4, 4), atol=1e-6, rtol=0)
        np.testing.assert_allclose(pooling.pooled_pattern(stored, 1, head, 50, cells=16).values,
                                   brute_force_pool(full, 4, 4), atol=1e-6, rtol=0)
        fig = plots.pooled_attention_heatmap(pooled, tokens, title="L1")
        assert np.asarray(fig.data[0].z).shape == (13, 13) and fig.data[0].y[1] == "4–7: t4…t7"
        window = plots.attention_window(pooling.pattern_reader(lazy, 1, head), tokens, (40, 45), (30, 42))
        np.testing.assert_allclose(np.asarray(window.data[0].z), full[40:45, 30:42], atol=1e-6, rtol=0)
        assert window.data[0].y[0] == "40: t40" and window.data[0].x[-1] == "41: t41"
    with pytest.raises(ValueError, match=r"window queries 40:60, keys 0:5 is outside the sequence of 50 tokens"):
        pooling.window_panel(pooling.pattern_reader(lazy, 1, 0), tokens, (40, 60), (0, 5))


def test_notebook_pools_long_texts_and_zooms_on_request(default_gguf):
    model, tok = llamaviz.load(default_gguf)
    text = "The cat sat on the mat, and then the dog sat on the cat. " * 3
    ids, tokens = notebook.encode(tok, text)
    _, stored = model.run_with_cache(ids, names_filter="blocks.3.attn.hook_pattern")
    full = stored["pattern", 3][0, 4].numpy()
    fig = notebook.show_attention(model, tok, text, 3, 4, max_cells=16)
    size = -(-len(tokens) // 16)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), brute_force_pool(full, size, size), atol=1e-5, rtol=0)
    zoom = notebook.show_attention(model, tok, text, 3, 4, queries=(20, 30), keys=(0, 30))
    np.testing.assert_allclose(np.asarray(zoom.data[0].z), full[20:30, :30], atol=1e-5, rtol=0)
    grid = notebook.show_head_grid(model, tok, text, 3, max_cells=8)
    assert len(grid.data) == model.config.num_attention_heads and np.asarray(grid.data[4].z).shape[0] <= 8
    with pytest.raises(ValueError, match="drop_first / log_scale apply to exact views"):
        notebook.show_attention(model, tok, text, 3, 4, max_cells=16, log_scale=True)

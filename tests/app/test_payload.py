"""Figures sent to the page: small at long runs, exact at short ones (checked against the pattern)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamaviz import plots
from llamaviz.app import payload


def causal_pattern(heads: int, positions: int, seed: int = 0) -> torch.Tensor:
    """Random causal attention probabilities [h, p, p]."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, positions, positions, generator=generator)
    mask = torch.ones(positions, positions, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def brute_max_pool(values: np.ndarray, block: int) -> np.ndarray:
    """Max over each block x block square, NaN where a square has no number."""
    rows, cols = -(-values.shape[0] // block), -(-values.shape[1] // block)
    out = np.full((rows, cols), np.nan)
    for i in range(rows):
        for j in range(cols):
            square = values[i * block:(i + 1) * block, j * block:(j + 1) * block]
            if not np.isnan(square).all():
                out[i, j] = np.nanmax(square)
    return out


def test_the_head_grid_at_431_positions_is_small_and_its_cells_are_block_maxima():
    pattern = causal_pattern(9, 431)
    tokens = [f"t{i}" for i in range(431)]
    full = plots.head_grid(pattern, tokens, layer=3)
    before = len(full.to_json())
    small = payload.compact_figure(plots.head_grid(pattern, tokens, layer=3), payload.GRID_CELLS)
    after = len(small.to_json())
    assert before > 50e6 and after < 0.5e6, (before, after)
    block, blocks = payload.pooled_size(431, payload.GRID_CELLS)
    for head, trace in enumerate(small.data):
        z = np.asarray(trace.z, dtype=np.float64)
        assert z.shape == (blocks, blocks) and trace.customdata is None and trace.meta["head"] == head
        expected = brute_max_pool(pattern[head].double().numpy(), block)
        np.testing.assert_allclose(z, expected, rtol=1e-6, equal_nan=True)
        assert len(trace.x) == blocks and trace.x[1] == f"{block}: t{block} +{block - 1}"
    assert f"{block}x{block} positions per cell" in small.layout.title.text


@pytest.mark.parametrize("log_scale", [False, True])
def test_a_short_heatmap_keeps_every_cell_and_hover_reads_the_weight(log_scale):
    pattern = causal_pattern(2, 12)
    tokens = [f"t{i}" for i in range(12)]
    fig = payload.compact_figure(plots.attention_heatmap(pattern, tokens, head=1, layer=0, log_scale=log_scale),
                                 payload.ATTENTION_CELLS, log_scale)
    trace = fig.data[0]
    assert np.asarray(trace.z).dtype == np.float32 and np.asarray(trace.z).shape == (12, 12)
    if log_scale:  # z is log10 of the weight; hover shows the weight itself from customdata
        np.testing.assert_allclose(np.asarray(trace.customdata), pattern[1].numpy(), rtol=1e-6)
        assert "%{customdata" in trace.hovertemplate
    else:  # z is the weight: no second copy in customdata
        np.testing.assert_allclose(np.asarray(trace.z), pattern[1].numpy(), rtol=1e-6)
        assert trace.customdata is None and "%{z" in trace.hovertemplate

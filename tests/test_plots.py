"""Figures from random tensors: data placement, escaping, validation, static export. No model."""

from __future__ import annotations

import json
import math
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from llamaviz import plots  # noqa: E402
from llamaviz.plots import panels  # noqa: E402
from llamaviz.plots.tokens import escape_all  # noqa: E402

EVIL = "<img src=x onerror=alert(1)>"
EVIL_ESCAPED = "&lt;img␣src=x␣onerror=alert(1)&gt;"          # spaces shown as "␣" (plots.tokens)
TOKENS = ["<s>", "▁The", "Ġcat", EVIL, "▁&amp;", "Ċ", "$x$", "▁The"]


def causal_pattern(heads: int, queries: int, keys: int | None = None) -> torch.Tensor:
    """Random softmax pattern [h, p, k] where query i sees keys up to i + (k - p)."""
    keys = keys or queries
    scores = torch.randn(heads, queries, keys) * 2
    offset = keys - queries
    future = torch.ones(queries, keys, dtype=torch.bool).triu(offset + 1)   # [p, k]
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def strings_in(fig: go.Figure) -> list[str]:
    """Every string in the figure's JSON, decoded."""
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, str):
            found.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(fig.to_json()))
    return found


@pytest.fixture
def pattern() -> torch.Tensor:
    return causal_pattern(4, len(TOKENS))


# ---------------------------------------------------------------- tokens


@pytest.mark.parametrize("token, shown", [
    ("▁the", "␣the"), ("Ġcat", "␣cat"), (" a b", "␣a␣b"), ("Ċ", "⏎"), ("ĊĊ", "⏎⏎"),
    ("a\nb", "a⏎b"), ("\t", "⇥"), ("ĉ", "⇥"), ("<0x0A>", "⏎"), ("<0x20>", "␣"), ("", "∅"),
    ("<s>", "<s>"), ("<|im_start|>", "<|im_start|>"), ("é", "é"),
])
def test_display_token_makes_whitespace_visible(token, shown):
    assert plots.display_token(token) == shown


def test_position_labels_are_unique_and_shortened():
    labels = plots.position_labels(["▁The", "▁The", "x" * 100])
    assert labels[:2] == ["0: ␣The", "1: ␣The"]
    assert len(set(labels)) == 3 and labels[2].endswith("…") and len(labels[2]) < 40


# ---------------------------------------------------------------- attention heatmap


def test_attention_heatmap_one_head(pattern):
    fig = plots.attention_heatmap(pattern, TOKENS, head=2, layer=5)
    trace = fig.data[0]
    np.testing.assert_allclose(trace.z, pattern[2].numpy(), rtol=1e-6)
    np.testing.assert_allclose(trace.customdata, pattern[2].numpy(), rtol=1e-6)
    assert list(trace.y) == list(trace.x) == escape_all(plots.position_labels(TOKENS))
    assert len(set(trace.x)) == len(TOKENS)                  # "▁The" twice, still unique
    assert "L5 H2" in fig.layout.title.text
    assert "query" in trace.hovertemplate and "key" in trace.hovertemplate
    assert "weight" in trace.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"


def test_attention_heatmap_mean_and_2d(pattern):
    mean = plots.attention_heatmap(pattern, TOKENS, head="mean")
    np.testing.assert_allclose(mean.data[0].z, pattern.mean(0).numpy(), rtol=1e-6)
    single = plots.attention_heatmap(pattern[1], TOKENS)
    np.testing.assert_allclose(single.data[0].z, pattern[1].numpy(), rtol=1e-6)


def test_attention_heatmap_key_tokens_for_cached_keys():
    pattern = causal_pattern(2, 3, 7)                       # 3 new queries over 7 keys
    keys = [f"k{i}" for i in range(7)]
    fig = plots.attention_heatmap(pattern, ["a", "b", "c"], keys, head=0)
    assert np.asarray(fig.data[0].z).shape == (3, 7)
    assert list(fig.data[0].x) == plots.position_labels(keys)


def test_drop_first_renormalises_rows(pattern):
    fig = plots.attention_heatmap(pattern, TOKENS, head=1, drop_first=True)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (len(TOKENS), len(TOKENS) - 1)
    assert np.isnan(z[0]).all()                              # query 0 saw only the sink
    np.testing.assert_allclose(z[1:].sum(axis=1), 1.0, rtol=1e-9)
    expected = pattern[1, 1:, 1:] / pattern[1, 1:, 1:].sum(-1, keepdim=True)
    np.testing.assert_allclose(z[1:], expected.numpy(), rtol=1e-6)
    assert list(fig.data[0].x) == escape_all(plots.position_labels(TOKENS)[1:])


def test_log_scale_colours_log10_and_hovers_weights(pattern):
    fig = plots.attention_heatmap(pattern, TOKENS, head=0, log_scale=True)
    trace, weights = fig.data[0], pattern[0].double().numpy()
    z = np.asarray(trace.z, dtype=float)
    positive = weights > 0
    floor = max(panels.LOG_FLOOR, weights[positive].min())
    np.testing.assert_allclose(z[positive], np.log10(np.maximum(weights[positive], floor)))
    assert np.isnan(z[~positive]).all()                      # masked future keys stay blank
    np.testing.assert_allclose(trace.customdata, weights, rtol=1e-6)
    assert trace.zmax == 0.0 and trace.zmin == pytest.approx(math.log10(floor))
    assert "1" in trace.colorbar.ticktext and "log" in trace.colorbar.title.text


def bad_attention_calls():
    p = causal_pattern(3, 4)
    tokens = ["a", "b", "c", "d"]
    nan = p.clone()
    nan[0, 1, 0] = float("nan")
    return [
        ((p[None], tokens), {}, r"pattern must be \[p, k\] or \[h, p, k\].*\[1, 3, 4, 4\].*pattern\[0\]"),
        ((p[0, 0], tokens), {}, r"pattern must be .*got shape \[4\]"),
        ((p, tokens[:3]), {}, r"tokens has 3 tokens but pattern's query length p is 4"),
        ((p, tokens, ["a"]), {}, r"key_tokens has 1 tokens but pattern's key length k is 4"),
        ((causal_pattern(3, 2, 4), ["a", "b"]), {}, r"k=4 key positions but p=2 queries: pass key_tokens"),
        ((nan, tokens), {}, r"pattern must hold finite values; got nan at index \[0, 1, 0\]"),
        ((-p, tokens), {}, r"pattern must be >= 0.0"),
        ((p, tokens), {"head": 3}, r"head must be in \[0, 3\) \(3 heads in pattern\); got 3"),
        ((p, tokens), {"head": -1}, r"head must be in \[0, 3\)"),
        ((p, tokens), {"head": "max"}, r"head must be an int in \[0, 3\); got 'max'"),
        ((p[0], tokens), {"head": 0}, r"head=0 needs a pattern \[h, p, k\]"),
        ((p, tokens), {"layer": -2}, r"layer must be a non-negative int; got -2"),
        ((p, [1, 2, 3, 4]), {}, r"tokens\[0\] must be a str; got int"),
        ((p, "abcd"), {}, r"tokens must be a list of token strings; got str"),
        ((p[:, :, :1], tokens, ["a"]), {"drop_first": True}, r"drop_first needs at least 2 key positions"),
        (("not a tensor", tokens), {}, r"pattern must be a torch.Tensor or numpy array; got str"),
    ]


@pytest.mark.parametrize("args, kwargs, message", bad_attention_calls())
@pytest.mark.parametrize("figure", [plots.attention_heatmap, plots.attention_heatmap_mpl])
def test_attention_heatmap_rejects_bad_input(figure, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        figure(*args, **kwargs)


def test_accepts_numpy_and_bfloat16(pattern):
    from_numpy = plots.attention_heatmap(pattern.numpy(), TOKENS, head=0)
    from_bf16 = plots.attention_heatmap(pattern.bfloat16(), TOKENS, head=0)
    np.testing.assert_allclose(from_bf16.data[0].z, from_numpy.data[0].z, atol=1e-2)


# ---------------------------------------------------------------- escaping


def every_figure(pattern):
    """One plotly figure of each kind, all fed the hostile TOKENS."""
    p = len(TOKENS)
    logprobs = torch.log(torch.rand(p))
    logprobs[0] = float("nan")
    alternatives = [[]] + [[(EVIL, 0.4), ("▁&", 0.2)]] * (p - 1)
    return {
        "attention": plots.attention_heatmap(pattern, TOKENS, head=0),
        "head_grid": plots.head_grid(pattern, TOKENS, layer=0),
        "logit_lens": plots.logit_lens(torch.rand(3, p), [TOKENS] * 3, TOKENS),
        "resid_heatmap": plots.resid_norms(torch.rand(3, p), TOKENS),
        "resid_line": plots.resid_norms(torch.rand(3, p), TOKENS, kind="line"),
        "tokens": plots.token_logprobs(TOKENS, logprobs, alternatives),
        "overview": plots.head_overview(torch.rand(2, 3), EVIL),
    }


def test_every_figure_escapes_token_markup(pattern):
    for name, fig in every_figure(pattern).items():
        strings = strings_in(fig)
        assert not any("<img" in s for s in strings), name
        escaped = "&lt;img src=x onerror=alert(1)&gt;" if name == "overview" else EVIL_ESCAPED
        assert any(escaped in s for s in strings), name      # a score name is not a token
        assert "\\u003cimg" not in fig.to_json(), name
        # "&amp;" typed by the user is escaped again, so plotly shows it literally
        if name not in ("overview",):
            assert any("&amp;amp;" in s for s in strings), name


def test_tokens_html_escapes_and_marks_lines():
    logprobs = torch.tensor([float("nan"), -0.1, -5.0, -2.0, -1.0, -3.0, -0.5, -0.2])
    alternatives = [[]] + [[(EVIL, 0.5), ('"quoted"', 0.1)]] * 7
    page = plots.tokens_html(TOKENS, logprobs, alternatives)
    assert "<img" not in page and EVIL_ESCAPED in page
    assert '"quoted"' not in page and "&quot;quoted&quot;" in page
    assert page.count('class="llamaviz-token"') == len(TOKENS)
    assert "⏎</span><br>" in page                            # "Ċ" ends a line
    assert "no prediction (first token)" in page
    backgrounds = re.findall(r'background:rgb\((\d+), (\d+), (\d+)\)', page)
    likely, unlikely = (tuple(map(int, backgrounds[i])) for i in (0, 1))  # -0.1 and -5.0
    assert likely[1] - likely[0] > unlikely[1] - unlikely[0]   # greener when more likely


# ---------------------------------------------------------------- head grid


def test_head_grid_titles_and_customdata_map_to_heads(pattern):
    fig = plots.head_grid(pattern, TOKENS, layer=7)
    assert len(fig.data) == 4
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [f"L7 H{h}" for h in range(4)]
    for head, trace in enumerate(fig.data):
        custom = np.asarray(trace.customdata, dtype=float)                 # [p, k, 3]
        assert custom.shape == (len(TOKENS), len(TOKENS), 3)
        assert (custom[..., 0] == 7).all() and (custom[..., 1] == head).all()
        np.testing.assert_allclose(custom[..., 2], pattern[head].numpy(), rtol=1e-6)
        assert trace.meta == {"layer": 7, "head": head} and trace.name == f"L7 H{head}"
        assert trace.coloraxis == "coloraxis"


def test_head_grid_log_scale_shares_one_floor(pattern):
    fig = plots.head_grid(pattern, TOKENS, layer=0, log_scale=True, drop_first=True)
    weights = np.stack([panels.drop_first_key(w) for w in pattern.double().numpy()])
    positive = weights[np.nan_to_num(weights) > 0]
    assert fig.layout.coloraxis.cmin == pytest.approx(math.log10(max(panels.LOG_FLOOR, positive.min())))
    assert fig.layout.coloraxis.cmax == 0.0


def test_head_grid_rejects_one_head(pattern):
    with pytest.raises(ValueError, match=r"pattern must be \[h, p, k\] for a head grid"):
        plots.head_grid(pattern[0], TOKENS, layer=0)
    with pytest.raises(ValueError, match="layer must be a non-negative int"):
        plots.head_grid(pattern, TOKENS, layer="3")


# ---------------------------------------------------------------- layer x head overview


def test_head_overview_cells_map_to_layer_and_head():
    scores = torch.rand(5, 3)
    scores[2, 1] = float("nan")
    fig = plots.head_overview(scores, "induction")
    trace = fig.data[0]
    np.testing.assert_allclose(trace.z, scores.numpy(), rtol=1e-6)
    custom = np.asarray(trace.customdata)
    layers, heads = np.indices((5, 3))
    assert (custom[..., 0] == layers).all() and (custom[..., 1] == heads).all()
    assert (trace.zmin, trace.zmax) == (0.0, 1.0)
    assert list(trace.y) == [f"L{i}" for i in range(5)] and list(trace.x) == ["H0", "H1", "H2"]


@pytest.mark.parametrize("scores, name, message", [
    (torch.rand(3), "sink", r"scores must be \[layers, heads\]; got shape \[3\]"),
    (torch.tensor([[1.0, float("inf")]]), "sink", "scores must hold finite values or NaN"),
    (torch.rand(2, 2), "", "score_name must be a non-empty str"),
])
def test_head_overview_rejects_bad_input(scores, name, message):
    with pytest.raises(ValueError, match=message):
        plots.head_overview(scores, name)


def test_entropy_overview_range_starts_at_zero():
    entropy = torch.rand(3, 4) * 2 + 0.5                   # nats, as analysis.head_entropy gives
    trace = plots.head_overview(entropy, "entropy").data[0]
    assert trace.zmin == 0.0 and trace.zmax == pytest.approx(float(entropy.max()))


# ---------------------------------------------------------------- logit lens


def test_logit_lens_cells():
    probs = torch.rand(4, 3)
    top = [["▁a", "Ġb", "<c>"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k", "l" * 40]]
    fig = plots.logit_lens(probs, top, ["x", "y", "z"])
    trace = fig.data[0]
    np.testing.assert_allclose(trace.z, probs.numpy(), rtol=1e-6)
    assert list(trace.text[0]) == ["␣a", "␣b", "&lt;c&gt;"]
    assert trace.text[3][2].endswith("…")                              # long tokens shortened
    assert ("l" * 40) in trace.customdata[3][2]                         # ...but whole on hover
    assert list(trace.y) == ["L0", "L1", "L2", "L3"] and fig.layout.yaxis.autorange is True
    labelled = plots.logit_lens(probs, top, ["x", "y", "z"], ["embed", "L0", "L1", "L2"])
    assert list(labelled.data[0].y) == ["embed", "L0", "L1", "L2"]


@pytest.mark.parametrize("probs, top, tokens, labels, message", [
    (torch.rand(2, 3) + 1.5, [["a"] * 3] * 2, ["x"] * 3, None, r"probs must be <= 1"),
    (torch.rand(2, 3), [["a"] * 3], ["x"] * 3, None, r"top_tokens must be a list of 2 rows"),
    (torch.rand(2, 3), [["a"] * 3, ["a"] * 2], ["x"] * 3, None, r"top_tokens\[1\] has 2 tokens"),
    (torch.rand(2, 3), [["a"] * 3] * 2, ["x"] * 2, None, r"tokens has 2 tokens but probs' position"),
    (torch.rand(2, 3), [["a"] * 3] * 2, ["x"] * 3, ["L0"], r"layer_labels has 1 tokens"),
    (torch.rand(2, 3, 1), [["a"] * 3] * 2, ["x"] * 3, None, r"probs must be \[layers, p\]"),
])
def test_logit_lens_rejects_bad_input(probs, top, tokens, labels, message):
    with pytest.raises(ValueError, match=message):
        plots.logit_lens(probs, top, tokens, labels)


# ---------------------------------------------------------------- residual norms


def test_resid_norms_heatmap_and_lines():
    norms = torch.rand(4, 5) * 10
    tokens = ["a", "b", "c", "d", "e"]
    heat = plots.resid_norms(norms, tokens)
    np.testing.assert_allclose(heat.data[0].z, norms.numpy(), rtol=1e-6)
    assert list(heat.data[0].y) == ["embed", "after L0", "after L1", "after L2"]
    lines = plots.resid_norms(norms, tokens, kind="line")
    assert len(lines.data) == 5
    for position, trace in enumerate(lines.data):
        np.testing.assert_allclose(trace.y, norms[:, position].numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"kind must be one of \['heatmap', 'line'\]; got 'bar'"):
        plots.resid_norms(norms, tokens, kind="bar")
    with pytest.raises(ValueError, match="norms must be >= 0.0"):
        plots.resid_norms(-norms, tokens)


# ---------------------------------------------------------------- tokens by log-probability


def test_token_logprobs_grid_and_hover():
    tokens = [f"t{i}" for i in range(7)]
    logprobs = torch.log(torch.rand(7))
    logprobs[0] = float("nan")
    alternatives = [[]] + [[("▁x", 0.5), ("<y>", 0.25)]] * 6
    fig = plots.token_logprobs(tokens, logprobs, alternatives, tokens_per_row=3)
    trace = fig.data[0]
    z = np.asarray(trace.z, dtype=float)
    assert z.shape == (3, 3)
    np.testing.assert_allclose(z.ravel()[1:7], logprobs[1:].numpy(), rtol=1e-6)
    assert np.isnan(z.ravel()[0]) and np.isnan(z.ravel()[7:]).all()
    text = np.asarray(trace.text).ravel().tolist()
    assert text[:7] == tokens and text[7:] == ["", ""]
    hover = np.asarray(trace.customdata).ravel().tolist()
    assert "␣x" in hover[1] and "&lt;y&gt;" in hover[1] and "0.2500" in hover[1]
    assert f"{logprobs[1].item():.3f}" in hover[1]
    assert trace.zmax == 0.0 and trace.zmin <= float(np.nanmin(logprobs.numpy()))


@pytest.mark.parametrize("logprobs, alternatives, message", [
    (torch.tensor([0.0, 0.5]), None, r"logprobs must be <= 0.0001"),
    (torch.tensor([float("nan"), -float("inf")]), None, r"logprobs must hold finite values or NaN"),
    (torch.zeros(2, 1), None, r"logprobs must be \[p\]"),
    (torch.zeros(2), [[]], r"alternatives must have one list per token \(2\); got 1"),
    (torch.zeros(2), [[], [("a", 2.0)]], r"alternatives\[1\] must hold \(token str, prob in \[0, 1\]\)"),
    (torch.zeros(2), [[], ["a"]], r"alternatives\[1\] must hold"),
])
def test_token_logprobs_rejects_bad_input(logprobs, alternatives, message):
    with pytest.raises(ValueError, match=message):
        plots.token_logprobs(["a", "b"], logprobs, alternatives)
    with pytest.raises(ValueError, match=message):
        plots.tokens_html(["a", "b"], logprobs, alternatives)


# ---------------------------------------------------------------- matplotlib twins


def static_figures(pattern):
    p = len(TOKENS)
    logprobs = torch.log(torch.rand(p))
    logprobs[0] = float("nan")
    return {
        "attention": plots.attention_heatmap_mpl(pattern, TOKENS, head=1, layer=2, log_scale=True),
        "head_grid": plots.head_grid_mpl(causal_pattern(5, p), TOKENS, layer=2, drop_first=True),
        "overview": plots.head_overview_mpl(torch.rand(4, 5), "sink"),
        "logit_lens": plots.logit_lens_mpl(torch.rand(3, p), [TOKENS] * 3, TOKENS),
        "resid_line": plots.resid_norms_mpl(torch.rand(3, p), TOKENS, kind="line"),
        "tokens": plots.token_logprobs_mpl(TOKENS, logprobs, tokens_per_row=5),
    }


MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<svg"}


def test_static_twins_save_png_svg_pdf(pattern, tmp_path):
    for name, fig in static_figures(pattern).items():
        for fmt, magic in MAGIC.items():
            path = tmp_path / f"{name}.{fmt}"
            fig.savefig(path)
            head = path.read_bytes()[:4096]
            assert path.stat().st_size > 1000 and magic in head, (name, fmt)


def test_static_twin_draws_the_same_panel(pattern):
    fig = plots.attention_heatmap_mpl(pattern, TOKENS, head=1, drop_first=True)
    ax = fig.axes[0]
    drawn = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    plotly_z = np.asarray(plots.attention_heatmap(pattern, TOKENS, head=1, drop_first=True).data[0].z,
                          dtype=float)
    np.testing.assert_allclose(drawn, plotly_z, rtol=1e-9)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[3] == "3: " + EVIL.replace(" ", "␣")           # raw text: matplotlib draws no HTML
    assert labels[6] == r"6: \$x\$"                              # "$" kept out of mathtext
    log_fig = plots.attention_heatmap_mpl(pattern, TOKENS, head=1, log_scale=True)
    assert isinstance(log_fig.axes[0].images[0].norm, LogNorm)


def test_head_grid_twin_has_one_titled_axis_per_head(pattern):
    fig = plots.head_grid_mpl(pattern, TOKENS, layer=4)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [f"L4 H{h}" for h in range(4)]

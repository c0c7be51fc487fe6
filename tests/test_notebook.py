"""Notebook helpers: offline HTML, view files, figures from the default model, the quickstart."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import plotly.io as pio
import pytest
import torch
from plotly.offline import get_plotlyjs

from llamaviz import LlamaConfig, notebook, plots
from llamaviz.plots.tokens import escape_html
from notebooks import execute

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
PROMPT = "The cat sat on the mat. The cat sat on the"
TINY = SimpleNamespace(config=LlamaConfig(num_hidden_layers=2, num_attention_heads=3, hidden_size=6,
                                          intermediate_size=8, vocab_size=10))  # a config, no weights


@pytest.fixture(scope="module")
def model_and_tok(default_gguf):
    import llamaviz

    return llamaviz.load(default_gguf)


@pytest.fixture(scope="module")
def clean_run(model_and_tok):
    """The prompt run once with every pattern and residual stream cached."""
    model, tok = model_and_tok
    layers = model.config.num_hidden_layers
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(layers)] + notebook._resid_names(model)
    return notebook.run(model, tok, PROMPT, names)


# ---------------------------------------------------------------- no model needed


def test_save_html_inlines_plotlyjs(tmp_path):
    fig = plots.attention_heatmap(torch.eye(3), ["a", "b", "<c>"])
    path = notebook.save_html(fig, tmp_path / "attention.html")
    page = path.read_text(encoding="utf-8")
    assert get_plotlyjs() in page                      # the whole library, inlined
    # plotly.js itself names cdn.plot.ly (a default for geo maps); the page around it must not
    rest = page.replace(get_plotlyjs(), "")
    assert "cdn.plot.ly" not in rest and "<script src" not in rest and "http" not in rest
    assert rest.count("Plotly.newPlot") == 1 and "&lt;c&gt;" in rest


def test_save_html_rejects_other_figures(tmp_path):
    static = plots.attention_heatmap_mpl(torch.eye(2), ["a", "b"])
    with pytest.raises(ValueError, match="fig must be a plotly Figure; got Figure; save a matplotlib"):
        notebook.save_html(static, tmp_path / "x.html")


def test_enable_offline_inlines_plotlyjs_once_in_ipython(monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    scripts, bundles = [], []
    monkeypatch.setattr("IPython.display.display_html", lambda html, raw: scripts.append(html))
    monkeypatch.setattr("IPython.display.display", lambda bundle, raw: bundles.append(bundle))
    monkeypatch.setattr(notebook.runs, "_offline_ready", False)
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    assert notebook.enable_offline() is False               # no IPython shell: nothing to do
    InteractiveShell.instance()
    try:
        assert notebook.enable_offline() and notebook.enable_offline()
        for _ in range(2):
            plots.attention_heatmap(torch.eye(2), ["a", "b"])._ipython_display_()
    finally:
        InteractiveShell.clear_instance()
    assert pio.renderers.default == notebook.OFFLINE_RENDERERS
    assert len(scripts) == 1 and get_plotlyjs() in scripts[0]          # plotly.js inlined once
    assert len(bundles) == 2
    for bundle in bundles:
        assert set(bundle) == {"application/vnd.plotly.v1+json", "text/html"}
        assert "http" not in bundle["text/html"]                      # no CDN, no MathJax


@pytest.mark.parametrize("call, message", [
    (lambda: notebook.show_attention(TINY, None, PROMPT, 2), r"layer 2 is out of range: the model has 2 layers, 0\.\.1"),
    (lambda: notebook.show_attention(TINY, None, PROMPT, 0, 3), r"head 3 is out of range: the model has 3 heads per layer, 0\.\.2 \(or 'mean'\)"),
    (lambda: notebook.show_attention(TINY, None, PROMPT, 0, "all"), r"head must be an integer in 0\.\.2 \(or 'mean'\), got 'all'"),
    (lambda: notebook.show_head_grid(TINY, None, PROMPT, -1), r"layer -1 is out of range"),
    (lambda: notebook.show_attention(TINY, None, "  ", 0), "text must be a non-empty string"),
    (lambda: notebook.show_tokens(TINY, None, PROMPT, top_k=0), "top_k must be a positive int"),
    (lambda: notebook.show_resid_norms(TINY, None, PROMPT, kind="bar"), "kind must be one of"),
])
def test_helpers_check_their_arguments_first(call, message):
    # TINY has no weights and the tokenizer is None: each call must fail before running anything
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a JSON view file"),
    ("[1, 2]", "must hold a JSON object; got list"),
    ('{"prompt": ""}', '"prompt" must be a non-empty string'),
    ('{"prompt": "hi", "seed": "1"}', '"seed" must be an int or null'),
    ('{"prompt": "hi", "settings": []}', '"settings" must be an object'),
    ('{"prompt": "hi", "model": 3}', '"model" must be a path string or null'),
])
def test_read_view_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "view.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        notebook.read_view(path)
    with pytest.raises(FileNotFoundError, match="no view file"):
        notebook.read_view(tmp_path / "missing.json")


def test_read_view_fills_defaults_and_resolves_the_model_beside_it(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"")
    path = tmp_path / "view.json"
    path.write_text(json.dumps({"model": "model.gguf", "prompt": "hi", "settings": {"layer": 4}}))
    view = notebook.read_view(path)
    assert view["model"] == tmp_path / "model.gguf" and view["seed"] is None
    assert view["settings"] == {**notebook.VIEW_SETTINGS, "layer": 4}


# ---------------------------------------------------------------- with the default model


@pytest.mark.slow
def test_show_attention_and_head_grid_match_the_cache(model_and_tok, clean_run):
    model, tok = model_and_tok
    pattern = clean_run.cache["pattern", 3][0]                               # [h, p, k]
    labels = plots.position_labels(tok.convert_ids_to_tokens(clean_run.input_ids[0].tolist()))
    one = notebook.show_attention(model, tok, PROMPT, 3, 2)
    np.testing.assert_allclose(one.data[0].z, pattern[2].numpy(), rtol=1e-5, atol=1e-7)
    assert len(one.data[0].y) == len(labels) and one.data[0].y[1] == labels[1]
    mean = notebook.show_attention(model, tok, PROMPT, 3, drop_first=True)
    z = np.asarray(mean.data[0].z, dtype=float)
    np.testing.assert_allclose(np.nansum(z[1:], axis=1), 1.0, rtol=1e-6)
    grid = notebook.show_head_grid(model, tok, PROMPT, 3)
    assert len(grid.data) == model.config.num_attention_heads
    for head, trace in enumerate(grid.data):
        np.testing.assert_allclose(np.asarray(trace.customdata)[..., 2], pattern[head].numpy(),
                                   rtol=1e-5, atol=1e-7)
        assert trace.meta == {"layer": 3, "head": head}


@pytest.mark.slow
def test_logit_lens_rows_are_the_unembedded_residual_stream(model_and_tok, clean_run):
    model, tok = model_and_tok
    fig = notebook.show_logit_lens(model, tok, PROMPT)
    trace = fig.data[0]
    layers = model.config.num_hidden_layers
    assert list(trace.y) == ["embed"] + [f"L{i}" for i in range(layers)]
    # the top row is the model's own prediction; the bottom row reads the embeddings directly
    final = clean_run.logits[0].float().softmax(-1)                          # [p, v]
    with torch.no_grad():
        embed = model.lm_head(model.model.norm(clean_run.cache["blocks.0.hook_resid_pre"]))
    first = embed[0].float().softmax(-1)                                     # [p, v]
    for row, probs in ((layers, final), (0, first)):
        np.testing.assert_allclose(trace.z[row], probs.max(-1).values.numpy(), rtol=1e-4, atol=1e-6)
        tops = tok.convert_ids_to_tokens(probs.argmax(-1).tolist())
        assert list(trace.customdata[row]) == [escape_html(f"top token {plots.display_token(t)}")
                                               for t in tops]


@pytest.mark.slow
def test_show_tokens_colours_by_the_models_logprobs(model_and_tok, clean_run):
    model, tok = model_and_tok
    fig = notebook.show_tokens(model, tok, PROMPT, top_k=3)
    logprobs = torch.log_softmax(clean_run.logits[0].float(), dim=-1)        # [p, v]
    ids = clean_run.input_ids[0]
    expected = logprobs[:-1].gather(-1, ids[1:, None])[:, 0]                  # [p-1]
    z = np.asarray(fig.data[0].z, dtype=float).ravel()
    assert np.isnan(z[0])
    np.testing.assert_allclose(z[1:len(ids)], expected.numpy(), rtol=1e-5, atol=1e-6)
    best = tok.convert_ids_to_tokens([logprobs[-2].argmax().item()])[0]      # guess for the last token
    assert plots.display_token(best) in np.asarray(fig.data[0].customdata).ravel()[len(ids) - 1]


@pytest.mark.slow
def test_open_view_regenerates_the_figures(model_and_tok, clean_run, default_gguf, tmp_path,
                                           monkeypatch):
    from llamaviz.run import loading

    model, tok = model_and_tok
    loaded = []
    monkeypatch.setattr(loading, "load", lambda path=None: loaded.append(path) or (model, tok))
    path = tmp_path / "view.json"
    path.write_text(json.dumps({"model": str(default_gguf), "prompt": PROMPT, "seed": 1234,
                                "settings": {"layer": 5, "head": 1, "log_scale": True}}))
    view = notebook.open_view(path)
    assert loaded == [default_gguf] and torch.initial_seed() == 1234
    assert view.prompt == PROMPT and view.settings["head"] == 1
    assert set(view.figures) == {"attention", "head_grid", "logit_lens", "tokens", "resid_norms"}
    expected = clean_run.cache["pattern", 5][0, 1].double().numpy()
    np.testing.assert_allclose(view.figures["attention"].data[0].customdata, expected,
                               rtol=1e-5, atol=1e-7)
    assert "L5 H1" in view.figures["attention"].layout.title.text
    assert view.figures["attention"].data[0].colorbar.ticktext      # log scale kept
    torch.testing.assert_close(view.run.logits, clean_run.logits, rtol=1e-4, atol=1e-4)


def test_open_view_reruns_the_exact_token_ids_the_app_stored(model_and_tok, tmp_path):
    model, tok = model_and_tok
    ids = tok(PROMPT + " photosynthesis, which", return_tensors="pt")["input_ids"]
    path = tmp_path / "view.json"
    path.write_text(json.dumps({"model": None, "prompt": PROMPT, "seed": None, "token_ids": ids[0].tolist(),
                                "settings": {"layer": 2, "head": "mean"}}))
    view = notebook.open_view(path, model=model, tok=tok)
    assert torch.equal(view.run.input_ids, ids)
    torch.testing.assert_close(view.run.logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    path.write_text(json.dumps({"prompt": PROMPT, "token_ids": ["a"]}))
    with pytest.raises(ValueError, match="token_ids"):
        notebook.read_view(path)


@pytest.mark.slow
def test_quickstart_executes(default_gguf, tmp_path):
    from llamaviz import features
    from llamaviz.features.dictionary import Dictionary, DictionaryConfig

    torch.manual_seed(0)  # the features cell reads model/dictionaries/sae-resid-<L> under the notebook's folder
    sae = Dictionary(DictionaryConfig("topk", d_in=576, d_sae=1152, hook_name="blocks.10.hook_resid_post", k=24))
    with torch.no_grad():
        for weight in sae.parameters():
            weight.normal_(0, 0.05)
    features.save(sae, tmp_path / "model" / "dictionaries" / "sae-resid-10")
    _, outputs = execute(QUICKSTART, tmp_path, timeout=600)
    html = [out.data.get("text/html", "") for out in outputs if "data" in out]
    assert sum(get_plotlyjs() in page for page in html) == 1            # inlined once
    assert not any("cdn.plot.ly" in page.replace(get_plotlyjs(), "") for page in html)
    figures = [out for out in outputs if "application/vnd.plotly.v1+json" in out.get("data", {})]
    assert len(figures) == 4
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "KL(clean || ablated)" in printed
    assert "most active features at the last token" in printed and printed.count(": attribution ") == 5

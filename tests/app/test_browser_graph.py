"""The Graph tab in a real browser with every non-local request refused: a bad set shown in the page, then
a random sparse JumpReLU transcoder set of the default model's shapes: build, re-prune, pin by a click and
by id, QK view, intervene."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import llamaviz
from llamaviz import features
from llamaviz.features.transcoder_set import TranscoderSet, transcoder
from test_browser import browser, move_slider, open_page, server, start_generation, wait_for_status  # noqa: F401

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCREENSHOT = Path(__file__).resolve().parents[2] / "assets" / "screenshot-graph.png"
PROMPT = "The cat sat on the mat. The dog"
WIDTH, ACTIVE = 32, 2  # features per layer; about this many fire per layer on the prompt


@pytest.fixture(scope="module")
def transcoder_folder(default_gguf, tmp_path_factory) -> tuple[str, int]:
    """(folder, layers): random JumpReLU transcoders whose thresholds let about ACTIVE features per layer fire on PROMPT."""
    model, tok = llamaviz.load(default_gguf)
    config = model.config
    names = [f"blocks.{layer}.mlp.hook_in" for layer in range(config.num_hidden_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([tok.encode(PROMPT)]), names_filter=names)
    generator, layers = torch.Generator().manual_seed(0), []
    for layer, name in enumerate(names):
        tc = transcoder(layer, config.hidden_size, WIDTH, "jumprelu", skip=False)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(config.hidden_size, WIDTH, generator=generator) / config.hidden_size ** 0.5)
            tc.W_dec.copy_(torch.randn(WIDTH, config.hidden_size, generator=generator) * 0.05)
            tc.b_enc.zero_(), tc.b_dec.zero_()
            pre = cache[name][0, 1:] @ tc.W_enc  # [p - 1, WIDTH]
            tc.threshold.fill_(float(pre.flatten().topk(ACTIVE + 1).values[-1]))
        layers.append(tc)
    folder = features.save_transcoder_set(TranscoderSet(layers, "SmolLM2-135M-Instruct"),
                                          tmp_path_factory.mktemp("graph") / "transcoders")
    return str(folder), config.num_hidden_layers


def open_graph(page) -> None:
    """Click the Graph tab, from the tabs' overflow menu when the row has no room for it."""
    tab = page.get_by_role("tab", name="Graph")
    if tab.count() and tab.first.is_visible():
        tab.first.click()
        return
    page.click(".overflow-menu > button")
    page.locator(".overflow-dropdown button", has_text="Graph").first.click()


def save_screenshot(page) -> None:
    """assets/screenshot-graph.png (README shows it): the tab from its top to the pinned subgraph, at 3/4 size."""
    page.evaluate("window.scrollTo(0, 0)")
    top, bottom = page.locator("#tab-graph").bounding_box(), page.locator("#graph-subgraph").bounding_box()
    clip = {"x": top["x"], "y": top["y"], "width": top["width"], "height": bottom["y"] + bottom["height"] - top["y"]}
    page.screenshot(path=str(SCREENSHOT), clip=clip, full_page=True)
    from PIL import Image

    shot = Image.open(SCREENSHOT).convert("RGB")
    shot.resize((shot.width * 3 // 4, shot.height * 3 // 4), Image.LANCZOS).quantize(256).save(SCREENSHOT, optimize=True)


def choose_set(page, path: str) -> None:
    page.fill("#graph-set input", path)
    page.press("#graph-set input", "Enter")


def test_the_graph_tab_builds_prunes_pins_explains_and_intervenes_offline(browser, server, transcoder_folder,  # noqa: F811
                                                                         tmp_path):
    folder, layers = transcoder_folder
    logits = f"{layers + 1}_"  # the logit nodes' ids start with the layer above the last
    refused = []
    page = open_page(browser, server)
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server)
               else (refused.append(route.request.url), route.abort()))
    start_generation(page, PROMPT, max_new_tokens=2)
    wait_for_status(page, "Done")
    open_graph(page)
    choose_set(page, str(tmp_path / "missing"))
    page.click("#graph-build")
    assert "no transcoder set at" in wait_for_status(page, "no transcoder set at")

    choose_set(page, folder)
    page.click("#graph-build")
    wait_for_status(page, "Graph built")
    nodes = page.locator("#graph-plot svg g[data-node]")
    before = nodes.count()
    assert before > 10 and page.locator("#graph-plot svg line").count() > 0
    assert "replacement score" in page.inner_text("#graph-caption")

    move_slider(page, "#graph-prune", 0.3)
    wait_for_status(page, "Pruned at 0.3")
    assert nodes.count() < before

    ids = "() => [...document.querySelectorAll('#graph-plot g[data-node]')].map(g => g.dataset.node)"
    shown = page.evaluate(ids)
    last = max(int(i.rsplit("_", 1)[1]) for i in shown)
    feature = next(i for i in shown if i.count("_") == 2 and "error" not in i and i[0] != "E"
                   and not i.startswith(logits) and int(i.rsplit("_", 1)[1]) < last)  # an earlier position
    title = page.locator(f'#graph-plot g[data-node="{feature}"] title').text_content()
    assert "activation" in title and "promotes" in title  # the hover summary
    page.locator(f'#graph-plot g[data-node="{feature}"]').click()
    wait_for_status(page, f"Pinned {feature}")
    logit = next(i for i in page.evaluate(ids) if i.startswith(logits))
    page.fill("#graph-node input", logit)
    page.press("#graph-node input", "Enter")
    page.click("#graph-pin")
    wait_for_status(page, "2 pinned")
    assert feature in page.inner_text("#graph-subgraph") and logit in page.inner_text("#graph-subgraph")

    assert page.input_value("#graph-qk-key input") == feature.rsplit("_", 1)[1]  # the pinned edge's key
    strongest = page.get_attribute("#graph-loadings tr[data-head]", "data-head")  # the head carrying most of it
    assert "Heads carrying" in page.inner_text("#graph-loadings")
    assert page.input_value("#graph-qk-layer input") + "." + page.input_value("#graph-qk-head input") == strongest
    page.fill("#graph-qk-layer input", "2")  # an early layer: fewer parts to run than at the last
    page.click("#graph-qk")
    wait_for_status(page, "QK attribution done")
    head = strongest.split(".")[1]
    assert f"L2 H{head}," in page.inner_text("#graph-qk-view") and "terms sum to" in page.inner_text("#graph-qk-view")
    page.click("#graph-intervene")
    wait_for_status(page, "Intervened")
    assert "top tokens before" in page.inner_text("#graph-intervention")
    save_screenshot(page)
    assert not refused or all(url.startswith(("data:", "blob:")) for url in refused), refused
    page.context.close()

"""AttentionMaskVisualizer and the terminal renderers: the grid parsed back from the plain printout and
checked against build_mask, colour rules, and the weights view against run_with_cache's patterns."""

import io
import re
import shutil

import pytest
import torch

from llamaviz.llama.config import LlamaConfig
from llamaviz.llama.masks import build_mask
from llamaviz.llama.modeling import LlamaForCausalLM
from llamaviz.plots.tokens import display_token
from llamaviz.terminal import (MASKED, MAY_ATTEND, PADDING, SHADES, AttentionMaskVisualizer, render_html,
                               render_mask, render_plain, render_weights)
from llamaviz.terminal.colors import GREEN, gradient_rgb
from llamaviz.terminal.render import PANEL_GAP, visible_length

PROMPT = "Plants create energy through a process known as"
# Llama 2's vocabulary so its tokenizer fits; a wide initializer makes attention patterns far from uniform.
TINY = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.5, bos_token_id=1,
            eos_token_id=2)
ROW = re.compile(r"^(?P<label>'.*?'|\".*?\")\s*: +(?P<position>\d+) ?(?P<cells>.*)$")
UNMARK = str.maketrans({"␣": " ", "⏎": "\n", "⇥": "\t"})  # display_token's whitespace marks, undone


def save_tiny(folder, tokenizer_dir, **overrides):
    """A random tiny Llama saved as an HF folder, with the Llama 2 tokenizer files beside it."""
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).save_pretrained(folder)
    for source in tokenizer_dir.iterdir():
        shutil.copy(source, folder / source.name)
    return folder


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, llama2_tokenizer_dir):
    return save_tiny(tmp_path_factory.mktemp("tiny"), llama2_tokenizer_dir)


@pytest.fixture(scope="module")
def viz(tiny_dir):
    return AttentionMaskVisualizer(tiny_dir)


def parse(text: str) -> list[list[tuple[str, int, list[str]]]]:
    """The grid rows of a plain printout, one block per sequence: (label, position, [cells of each panel])."""
    blocks, header = [[]], ""
    for line in text.splitlines():
        if line.startswith("sequence ") and blocks[-1]:
            blocks.append([])
        match = ROW.match(line)
        if not match:
            header = line
            continue
        panels = header.strip().split("│")
        columns = len(panels[0].split())  # the last header line holds one digit per column
        cells = [panel.ljust(2 * columns)[: 2 * columns][0::2] for panel in match["cells"].split(PANEL_GAP)]
        blocks[-1].append((match["label"], int(match["position"]), cells))
    return blocks


def expected_cells(mask_row: torch.Tensor, padding=None) -> str:
    """The glyphs a row of build_mask's output must print as."""
    padding = torch.zeros_like(mask_row) if padding is None else padding
    return "".join(PADDING if pad else MAY_ATTEND if ok else MASKED for ok, pad in zip(mask_row.tolist(),
                                                                                       padding.tolist()))


# ----- the mask view -----

def test_one_row_per_token_bos_included(viz):
    ids = viz.tokenizer.encode(PROMPT)
    assert ids[0] == viz.tokenizer.bos_token_id
    [rows] = parse(viz.render(PROMPT, color=False, width=200))
    labels = [label for label, _, _ in rows]
    assert labels == [repr(display_token(t)) for t in viz.tokenizer.display_tokens(ids)]  # the app's rule
    assert labels[:3] == ["'<s>'", "'␣Pl'", "'ants'"]
    assert "".join(eval(label) for label in labels[1:]).translate(UNMARK) == " " + PROMPT  # SentencePiece's prefix
    [weight_rows] = parse(viz.render(PROMPT, layer=0, color=False, width=200))
    assert [label for label, _, _ in weight_rows] == labels
    [raw_rows] = parse(viz.render(PROMPT, raw_tokens=True, color=False, width=200))
    assert [label for label, _, _ in raw_rows] == [repr(t) for t in viz.tokenizer.convert_ids_to_tokens(ids)]
    assert [label for label, _, _ in raw_rows][1] == "'▁Pl'"
    assert [position for _, position, _ in rows] == list(range(len(ids)))
    mask = build_mask(len(ids))[0, 0]  # [p, k]
    for i, (_, _, [cells]) in enumerate(rows):
        assert cells.count(MAY_ATTEND) == i + 1
        assert cells == expected_cells(mask[i])


def test_mask_reads_no_weights(tiny_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the mask view must not read weights")

    monkeypatch.setattr("llamaviz.checkpoints.base.Checkpoint.tensors", refuse)
    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(refuse))
    fresh = AttentionMaskVisualizer(tiny_dir)
    assert parse(fresh.render(PROMPT, color=False, width=200))[0]
    assert fresh._model is None


def test_batch_left_padding_rows_and_columns(viz):
    texts = ["short", "a much longer prompt than the first"]
    lengths = [len(viz.tokenizer.encode(t)) for t in texts]
    n = max(lengths)
    blocks = parse(viz.render(texts, color=False, width=200))
    assert len(blocks) == 2
    for rows, length, text in zip(blocks, lengths, texts):
        pad = n - length
        attention_mask = torch.tensor([[0] * pad + [1] * length])
        mask = build_mask(n, attention_mask=attention_mask)[0, 0]  # [p, k]
        assert len(rows) == n
        assert [label for label, _, _ in rows[:pad]] == ["'<pad>'"] * pad
        tokens = viz.tokenizer.display_tokens(viz.tokenizer.encode(text))
        assert [label for label, _, _ in rows[pad:]] == [repr(display_token(t)) for t in tokens]
        for i, (_, _, [cells]) in enumerate(rows):
            assert cells[:pad] == PADDING * pad  # padding columns are distinct in every row
            assert cells.count(MAY_ATTEND) == max(0, i - pad + 1)
            assert cells == expected_cells(mask[i], attention_mask[0] == 0)


def test_sliding_window_side_by_side_with_causal(viz):
    window = 3
    model = LlamaForCausalLM(LlamaConfig(**TINY, sliding_window=window))
    windowed = AttentionMaskVisualizer(model, tokenizer=viz.tokenizer)
    text = windowed.render(PROMPT, color=False, width=200)
    assert f"sliding window ({window})" in text
    [rows] = parse(text)
    n = len(viz.tokenizer.encode(PROMPT))
    causal, sliding = build_mask(n)[0, 0], build_mask(n, sliding_window=window)[0, 0]
    assert len(rows) == n
    for i, (_, _, [left, right]) in enumerate(rows):
        assert left == expected_cells(causal[i])
        assert right == expected_cells(sliding[i])
        assert right.count(MAY_ATTEND) == min(i + 1, window)


def test_past_length_rectangular(viz):
    n = len(viz.tokenizer.encode(PROMPT))
    past = n - 2
    text = viz.render(PROMPT, past_length=past, color=False, width=200)
    [rows] = parse(text)
    mask = build_mask(2, past_length=past)[0, 0]  # [2, n]
    assert [position for _, position, _ in rows] == [past, past + 1]
    for i, (_, position, [cells]) in enumerate(rows):
        assert len(cells) == n
        assert cells.count(MAY_ATTEND) == position + 1
        assert cells == expected_cells(mask[i])
    assert f"{past} cached + 2 new" in text
    with pytest.raises(ValueError, match=rf"0\.\.{n - 1}"):
        viz.render(PROMPT, past_length=n)


# ----- colour -----

class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_color_on_off(viz):
    colored = viz.render(PROMPT, color=True)
    assert "\x1b[" in colored and f"{GREEN}{MAY_ATTEND}" in colored  # the diagonal is green
    plain = viz.render(PROMPT, color=False)
    assert "\x1b" not in plain
    assert "\x1b" not in viz.render(PROMPT, layer=0, head=0, color=False)


@pytest.mark.parametrize("env, tty, colored", [
    ({}, True, True),
    ({}, False, False),
    ({"NO_COLOR": "1"}, True, False),
    ({"FORCE_COLOR": "1"}, False, True),
])
def test_color_follows_tty_and_environment(viz, monkeypatch, env, tty, colored):
    for name in ("NO_COLOR", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stream = FakeTTY() if tty else io.StringIO()
    viz(PROMPT, file=stream)
    assert ("\x1b[" in stream.getvalue()) == colored
    assert parse(re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue()))[0]


# ----- the weights view -----

def reference_pattern(viz, text, layer):
    ids = torch.tensor([viz.tokenizer.encode(text)])
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = viz.model.run_with_cache(ids, names_filter=name)
    return cache[name][0].float()  # [h, p, k]


@pytest.mark.parametrize("layer, head", [(0, 1), (1, "mean")])
def test_weights_shading_follows_the_pattern(viz, layer, head):
    pattern = reference_pattern(viz, PROMPT, layer)
    weights = pattern.mean(0) if head == "mean" else pattern[head]  # [p, k]
    [rows] = parse(viz.render(PROMPT, layer=layer, head=head, color=False, width=200))
    assert len(rows) == weights.shape[0]
    for i, (_, _, [cells]) in enumerate(rows):
        allowed = weights[i, : i + 1]
        assert cells[i + 1:] == MASKED * (len(cells) - i - 1)
        assert cells[int(allowed.argmax())] == SHADES[-1]  # the largest weight gets the darkest shade
        levels = [SHADES.index(c) for c in cells[: i + 1]]
        order = allowed.argsort().tolist()
        assert [levels[j] for j in order] == sorted(levels)  # shade never decreases as the weight grows
    assert len({c for _, _, [cells] in rows for c in cells} & set(SHADES)) >= 3  # a pattern, not a flat grid


def test_weights_truecolor_and_256(viz, monkeypatch):
    pattern = reference_pattern(viz, PROMPT, 1)[2]  # [p, k]
    monkeypatch.setenv("COLORTERM", "truecolor")
    text = viz.render(PROMPT, layer=1, head=2, color=True, width=200)
    last_row = [line for line in text.splitlines() if ROW.match(re.sub(r"\x1b\[[0-9;]*m", "", line))][-1]
    colours = [tuple(map(int, c)) for c in re.findall(r"\x1b\[48;2;(\d+);(\d+);(\d+)m", last_row)]
    assert len(colours) == pattern.shape[1]
    assert colours[int(pattern[-1].argmax())] == gradient_rgb(1.0)
    monkeypatch.setenv("COLORTERM", "")
    assert "\x1b[48;5;" in viz.render(PROMPT, layer=1, head=2, color=True)


def test_weights_of_a_padded_batch(viz):
    texts = ["short", PROMPT]
    encoded = viz.encode(texts)
    name = "blocks.0.attn.hook_pattern"
    with torch.no_grad():
        _, cache = viz.model.run_with_cache(encoded.input_ids, names_filter=name,
                                            attention_mask=encoded.attention_mask)
    pattern = cache[name][:, 3]  # [b, p, k]
    blocks = parse(viz.render(texts, layer=0, head=3, color=False, width=200))
    pad = int((encoded.attention_mask[0] == 0).sum())
    for rows, weights, padded in zip(blocks, pattern, (pad, 0)):
        for i, (_, _, [cells]) in enumerate(rows[padded:], padded):
            assert cells[:padded] == PADDING * padded
            allowed = weights[i, padded: i + 1]
            assert cells[padded + int(allowed.argmax())] == SHADES[-1]


# ----- long prompts -----

def test_truncation_keeps_the_last_columns_with_a_note(viz):
    text = " ".join(["energy"] * 60)
    n = len(viz.tokenizer.encode(text))
    printout = viz.render(text, color=False, width=60)
    assert all(visible_length(line) <= 60 for line in printout.splitlines())
    [rows] = parse(printout)
    shown = len(rows[-1][2][0])
    first = n - shown
    assert 0 < shown < n and f"{first} earlier token(s) left out" in " ".join(printout.split())
    assert [position for _, position, _ in rows] == list(range(first, n))
    for _, position, [cells] in rows:
        assert cells.count(MAY_ATTEND) == position - first + 1
    [rows] = parse(viz.render(text, color=False, width=500, max_tokens=5))
    assert [position for _, position, _ in rows] == list(range(n - 5, n))
    assert "max_tokens=5" in viz.render(text, color=False, width=500, max_tokens=5)


# ----- errors and inputs -----

@pytest.mark.parametrize("kwargs, message", [
    (dict(text=""), "empty"),
    (dict(text="   "), "empty"),
    (dict(text=[]), "non-empty list"),
    (dict(text=PROMPT, layer=2), r"2 layers, 0\.\.1"),
    (dict(text=PROMPT, layer=-1), r"0\.\.1"),
    (dict(text=PROMPT, layer=0, head=4), r"0\.\.3"),
    (dict(text=PROMPT, head=0), "needs layer"),
    (dict(text=PROMPT, width=0), "width"),
])
def test_bad_input_raises_value_error(viz, kwargs, message):
    text = kwargs.pop("text")
    with pytest.raises(ValueError, match=message):
        viz.render(text, **kwargs)


def test_loaded_model_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer="):
        AttentionMaskVisualizer(LlamaForCausalLM(LlamaConfig(**TINY)))


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AttentionMaskVisualizer(tmp_path / "nowhere")


def test_pure_renderers_plain_and_html():
    tokens = ["<s>", "▁a", "▁b"]
    mask = build_mask(3)
    plain = render_plain(tokens, mask, width=80)
    assert plain == render_mask(tokens, mask, color=False, width=80) and "\x1b" not in plain
    page = render_html(tokens, mask, weights=torch.full((3, 3), 1 / 3), width=80)
    assert page.startswith('<pre class="llamaviz-mask">') and "&#x27;&lt;s&gt;&#x27;" in page and "\x1b" not in page
    assert "\x1b" not in render_weights(tokens, torch.eye(3), mask, color=False)


@pytest.mark.parametrize("call, message", [
    (lambda: render_mask(["a", "b"], build_mask(3)), "3 key columns but there are 2 tokens"),
    (lambda: render_mask("ab", build_mask(2)), "list of token strings"),
    (lambda: render_mask(["a", "b"], build_mask(2), attention_mask=torch.ones(2, 2)), r"\[1, 2\]"),
    (lambda: render_weights(["a", "b"], torch.ones(3, 2), build_mask(2)), "3 query rows"),
    (lambda: render_weights(["a", "b"], torch.ones(2, 2), build_mask(2), scale="log"), "scale"),
    (lambda: render_mask(["a", "b"], build_mask(2), color="16"), "color"),
])
def test_pure_renderers_validate(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_default_model_mask_without_weights(default_gguf):
    viz = AttentionMaskVisualizer(default_gguf)
    ids = viz.tokenizer.encode(PROMPT)
    [rows] = parse(viz.render(PROMPT, color=False, width=200))
    assert [label for label, _, _ in rows] == [repr(display_token(t)) for t in viz.tokenizer.display_tokens(ids)]
    assert viz._model is None


def test_byte_level_labels_are_the_tokens_text(default_gguf):
    viz = AttentionMaskVisualizer(default_gguf)
    text = "Ask John\tabout the bell\x07 ringing"
    ids = viz.tokenizer.encode(text)
    labels = [label for label, _, _ in parse(viz.render(text, color=False, width=300))[0]]
    raw = [label for label, _, _ in parse(viz.render(text, raw_tokens=True, color=False, width=300))[0]]
    assert "'␣John'" in labels and "'ĠJohn'" in raw and "'ĠJohn'" not in labels
    assert raw == [repr(t) for t in viz.tokenizer.convert_ids_to_tokens(ids)]
    assert any("\\x07" in label for label in labels)  # a control character is escaped, never printed raw
    assert "\x07" not in viz.render(text, color=False, width=300)
    assert "".join(eval(label) for label in labels).translate(UNMARK) == viz.tokenizer.decode(ids) == text


def test_rows_window_shows_and_computes_only_those_queries(viz):
    text = " ".join(["energy", "plants", "light"] * 8)
    n = len(viz.tokenizer.encode(text))
    pattern = reference_pattern(viz, text, 1)[2]  # [n, n]
    [rows] = parse(viz.render(text, layer=1, head=2, color=False, width=300, rows=(10, 14)))
    assert [position for _, position, _ in rows] == [10, 11, 12, 13]
    for _, position, [cells] in rows:
        assert len(cells) == 14  # keys up to the last row shown
        assert cells[int(pattern[position, : position + 1].argmax())] == SHADES[-1]
    [mask_rows] = parse(viz.render(text, color=False, width=300, rows=(0, 3)))
    assert [position for _, position, _ in mask_rows] == [0, 1, 2]
    with pytest.raises(ValueError, match=rf"rows must be \(start, stop\) with 0 <= start < stop <= {n}"):
        viz.render(text, layer=1, rows=(5, n + 1))
    with pytest.raises(ValueError, match="rows= and past_length= both"):
        viz.render(text, rows=(1, 3), past_length=1)

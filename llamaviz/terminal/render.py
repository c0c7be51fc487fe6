"""Pure renderers: (token strings, mask / weights tensors, options) -> the printout as a string.

The look follows transformers' AttentionMaskVisualizer: a title box, a legend, column indices
written vertically, then one row per query token with its repr, its position and one cell per key:
`■` may attend, `⬚` masked, `·` padding; the diagonal is green. The weights view shades each
allowed cell by its attention weight (background colour, or ` ░▒▓█` in plain text).
"""

from __future__ import annotations

import html
import re
import shutil
import textwrap
from typing import Mapping, Sequence

import torch

from llamaviz.terminal.colors import BOLD, GREEN, GREY, background, paint, resolve_palette
from llamaviz.terminal.grid import Grid, make_grid

MAY_ATTEND = "■"
MASKED = "⬚"
PADDING = "·"
SHADES = " ░▒▓█"  # plain-text shades, weight (scaled to [0, 1]) low -> high
PANEL_GAP = " │  "
LABEL_LIMIT = 24  # longest token repr shown in the row labels, in characters
CELL = 2  # columns per key cell: the glyph and a space
_ESCAPE = re.compile(r"\033\[[0-9;]*m")

Tokens = Sequence[str] | Sequence[Sequence[str]]  # k strings, or one list per sequence of a batch
Masks = torch.Tensor | Mapping[str, torch.Tensor]  # one mask, or {panel title: mask} side by side


def render_mask(tokens: Tokens, mask: Masks, *, attention_mask: torch.Tensor | None = None,
                title: str | None = None, info=(), color=False, width: int | None = None,
                max_tokens: int | None = None, stream=None) -> str:
    """The mask printout. tokens: k strings (or a batch of such lists); mask: bool [p, k], [b, 1, p, k]
    (build_mask's output) or {panel title: mask} to print several side by side; attention_mask [b, k]
    marks padding keys (0). color: False | True | None (auto for `stream`) | "256" | "truecolor"."""
    grid = make_grid(tokens, mask, attention_mask=attention_mask)
    return _render(grid, title, info, resolve_palette(color, stream), width, max_tokens)


def render_weights(tokens: Tokens, weights: torch.Tensor, mask: torch.Tensor, *,
                   attention_mask: torch.Tensor | None = None, title: str | None = None, info=(),
                   color=False, scale: str = "row", width: int | None = None, max_tokens: int | None = None,
                   stream=None) -> str:
    """The weights printout: allowed cells shaded by weights [p, k] / [b, p, k] (probabilities), masked
    cells still `⬚`. scale="row" divides each row by its largest allowed weight; "absolute" shows 0..1."""
    grid = make_grid(tokens, mask, weights=weights, attention_mask=attention_mask, scale=scale)
    return _render(grid, title, info, resolve_palette(color, stream), width, max_tokens)


def render_plain(tokens: Tokens, mask: Masks, weights: torch.Tensor | None = None, **options) -> str:
    """The printout without any escape codes (for a web page's <pre>, logs, files)."""
    options["color"] = False
    if weights is None:
        return render_mask(tokens, mask, **options)
    return render_weights(tokens, weights, mask, **options)


def render_html(tokens: Tokens, mask: Masks, weights: torch.Tensor | None = None, **options) -> str:
    """render_plain, HTML-escaped inside <pre class="llamaviz-mask">; safe to put in a page."""
    text = render_plain(tokens, mask, weights, **options)
    return f'<pre class="llamaviz-mask">{html.escape(text)}</pre>'


# ----- layout -----

def _render(grid: Grid, title, info, palette, width, max_tokens) -> str:
    width = _check_positive("width", width) if width is not None else shutil.get_terminal_size().columns
    max_tokens = _check_positive("max_tokens", max_tokens) if max_tokens is not None else None
    label_width = min(LABEL_LIMIT, max(len(repr(t)) for s in grid.sequences for t in s))
    prefix_width = label_width + len(str(grid.keys - 1)) + 3  # "label: position "
    shown = _columns_that_fit(grid, width - prefix_width, max_tokens)
    first = grid.keys - shown
    lines = _title_box(title, info, palette, width) if title or info else []
    lines += _fill(_legend(grid, palette), width, "   ")
    for note in _notes(grid, first, width, max_tokens, shown):
        lines += textwrap.wrap(note, width, subsequent_indent="  ")
    for index in range(len(grid.sequences)):
        lines += _sequence_block(grid, index, first, label_width, palette)
    return "\n".join(lines)


def _check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _panel_width(title: str, columns: int) -> int:
    return max(CELL * columns, len(title) + 1)


def _columns_that_fit(grid: Grid, room: int, max_tokens: int | None) -> int:
    """How many of the last key columns to show: all that fit in `room` characters, at most max_tokens."""
    shown = min(grid.keys, max_tokens or grid.keys)
    gaps = len(PANEL_GAP) * (len(grid.panels) - 1)
    while shown > 1 and sum(_panel_width(t, shown) for t, _ in grid.panels) + gaps > room:
        shown -= 1
    return shown


def visible_length(text: str) -> int:
    """Terminal columns `text` takes: its length without escape codes."""
    return len(_ESCAPE.sub("", text))


def _fill(parts: list[str], width: int, separator: str) -> list[str]:
    """Join parts with separator into as few lines as fit in `width` columns (a part is never split)."""
    lines: list[str] = []
    for part in parts:
        if lines and visible_length(lines[-1] + separator + part) <= width:
            lines[-1] += separator + part
        else:
            lines.append(part)
    return lines


def _title_box(title, info, palette, width: int) -> list[str]:
    rows = [title or ""] + [str(line) for line in info]
    inner = min(max(len(row) for row in rows), max(width - 4, 8))
    rows = [row if len(row) <= inner else row[: inner - 1] + "…" for row in rows]
    body = [f"│ {paint(rows[0].ljust(inner), BOLD, palette)} │"]
    body += [f"│ {row.ljust(inner)} │" for row in rows[1:]]
    return ["╭" + "─" * (inner + 2) + "╮", *body, "╰" + "─" * (inner + 2) + "╯"]


def _legend(grid: Grid, palette) -> list[str]:
    """The legend's entries (glyph and meaning), to be filled into lines."""
    has_padding = bool(grid.padding.any())
    if grid.weights is not None:
        parts = [*_scale_legend(grid.scale, palette), f"{MASKED} masked"]
    else:
        parts = [f"{MAY_ATTEND} may attend", f"{MASKED} masked"]
        if palette:
            parts.append(f"{paint(MAY_ATTEND, GREEN, palette)} diagonal (i == j)")
    if has_padding:
        parts.append(f"{paint(PADDING, GREY, palette)} padding (left)")
    return parts


def _scale_legend(scale: str, palette) -> list[str]:
    """The shading scale: a colour bar from 0 to 1, or each plain shade with its upper bound."""
    unit = "weight ÷ row max" if scale == "row" else "attention weight"
    if palette:
        bar = "".join(paint("  ", background(step / 9, palette), palette) for step in range(10))
        return [f"{unit}: 0 {bar} 1"]
    bounds = [f"<{(i + 1) / len(SHADES):.1f}" for i in range(len(SHADES) - 1)] + ["≤1"]
    return [f"{unit}:"] + [f"{shade!r} {bound}" if shade == " " else f"{shade} {bound}"
                           for shade, bound in zip(SHADES, bounds)]


def _notes(grid: Grid, first: int, width: int, max_tokens, shown: int) -> list[str]:
    notes = []
    if grid.past:
        notes.append(f"KV cache: rows are the {grid.queries} new token(s) at positions {grid.past}–{grid.keys - 1}; "
                     f"columns are {grid.past} cached + {grid.queries} new keys")
    if first:
        reason = (f"max_tokens={max_tokens}" if max_tokens is not None and shown == max_tokens
                  else f"to fit {width} columns; set width= or max_tokens=")
        notes.append(f"⋯ {first} earlier token(s) left out (positions 0–{first - 1}): "
                     f"showing the last {shown} of {grid.keys}, {reason}")
    return notes


# ----- one sequence -----

def _sequence_block(grid: Grid, index: int, first: int, label_width: int, palette) -> list[str]:
    """Heading (batch only), panel titles, vertical column indices, then the rows."""
    columns = range(first, grid.keys)
    padding = grid.padding[index]  # [k]
    position_width = len(str(grid.keys - 1))
    indent = " " * (label_width + position_width + 3)
    lines = [""]
    if len(grid.sequences) > 1:
        lines.append(f"sequence {index}: {int(padding.sum())} padding token(s), {grid.keys} positions")
    if any(title for title, _ in grid.panels):
        titles = [title.ljust(_panel_width(title, len(columns))) for title, _ in grid.panels]
        lines.append((indent + PANEL_GAP.replace("│", " ").join(titles)).rstrip())
    for digit in range(position_width):
        cells = [paint(str(j).rjust(position_width)[digit], GREY, palette if padding[j] else None) + " "
                 for j in columns]
        lines.append(_join_panels(grid, indent, ["".join(cells)] * len(grid.panels), len(columns)).rstrip())
    for row in range(grid.queries):
        position = grid.past + row
        if position >= first:
            lines.append(_row(grid, index, row, columns, label_width, position_width, palette))
    return lines


def _join_panels(grid: Grid, prefix: str, texts: list[str], columns: int) -> str:
    """prefix + the panels' texts (each padded to its panel width) separated by PANEL_GAP."""
    padded = [text + " " * (_panel_width(title, columns) - CELL * columns)
              for text, (title, _) in zip(texts, grid.panels)]
    return prefix + PANEL_GAP.join(padded)


def _row(grid: Grid, index: int, row: int, columns: range, label_width: int, position_width: int, palette) -> str:
    position = grid.past + row
    token = grid.sequences[index][position]
    label = repr(token)
    label = label if len(label) <= label_width else label[: label_width - 1] + "…"
    is_padding = bool(grid.padding[index, position])
    prefix = paint(f"{label.ljust(label_width)}: {position:>{position_width}}", GREY, palette if is_padding else None)
    texts = [_panel_cells(grid, panel[index, row], index, row, position, columns, palette) for _, panel in grid.panels]
    return _join_panels(grid, prefix + " ", texts, len(columns)).rstrip()


def _panel_cells(grid: Grid, allowed: torch.Tensor, index: int, row: int, position: int, columns: range,
                 palette) -> str:
    """One row of one panel: CELL characters per key column. allowed: bool [k]."""
    shades = _row_shades(grid, allowed, index, row) if grid.weights is not None else None
    cells = []
    for j in columns:
        if grid.padding[index, j]:
            cells.append(paint(PADDING, GREY, palette) + " ")
        elif not allowed[j]:
            cells.append(MASKED + " ")
        elif shades is not None:
            cells.append(_shade_cell(float(shades[j]), palette))
        else:
            cells.append(paint(MAY_ATTEND, GREEN if j == position else "", palette) + " ")
    return "".join(cells)


def _row_shades(grid: Grid, allowed: torch.Tensor, index: int, row: int) -> torch.Tensor:
    """The row's weights [k] in [0, 1]: divided by the row's largest allowed weight for scale="row"."""
    weights = grid.weights[index, row].nan_to_num(0.0).clamp(min=0.0)  # [k]
    if grid.scale == "absolute":
        return weights.clamp(max=1.0)
    peak = weights.masked_fill(~allowed, 0.0).max()
    return weights / peak if peak > 0 else torch.zeros_like(weights)


def shade_level(value: float) -> int:
    """Index into SHADES of a weight in [0, 1]: five equal bins, 1.0 in the top one."""
    return min(len(SHADES) - 1, max(0, int(value * len(SHADES))))


def _shade_cell(value: float, palette) -> str:
    if palette:
        return paint(" " * CELL, background(value, palette), palette)
    return SHADES[shade_level(value)] + " "

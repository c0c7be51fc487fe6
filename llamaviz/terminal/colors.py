"""Terminal colour: when to use it (TTY, NO_COLOR, FORCE_COLOR) and the escape codes the renderers emit.

A palette is None (plain text, no escape codes), "256" (xterm 256-colour) or "truecolor" (24-bit).
"""

from __future__ import annotations

import os
import sys

PALETTES = ("256", "truecolor")
RESET = "\033[0m"
BOLD = "\033[1m"
GREEN = "\033[92m"
GREY = "\033[90m"

# Weight 0 -> 1 runs through these colours (viridis anchors): dark purple, blue, teal, green, yellow.
GRADIENT = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_CUBE_LEVELS = (0, 95, 135, 175, 215, 255)  # channel values of xterm's 6x6x6 colour cube


def wants_color(stream=None) -> bool:
    """The `color=None` rule: NO_COLOR turns colour off, FORCE_COLOR on, else only on a TTY (not TERM=dumb)."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM") == "dumb":
        return False
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def palette_from_env() -> str:
    """"truecolor" when COLORTERM says the terminal has 24-bit colour, else "256"."""
    return "truecolor" if os.environ.get("COLORTERM", "").lower() in ("truecolor", "24bit") else "256"


def resolve_palette(color, stream=None) -> str | None:
    """color=None (auto) | True | False | "256" | "truecolor" -> the palette to draw with, None for plain."""
    if color is None:
        color = wants_color(stream)
    if color is False:
        return None
    if color is True:
        return palette_from_env()
    if color in PALETTES:
        return color
    raise ValueError(f"color must be None (auto), True, False, '256' or 'truecolor', got {color!r}")


def paint(text: str, code: str, palette: str | None) -> str:
    """`text` wrapped in an escape code and a reset; unchanged in plain mode."""
    return f"{code}{text}{RESET}" if palette and code and text else text


def gradient_rgb(weight: float) -> tuple[int, int, int]:
    """The colour of a weight in [0, 1] (clamped), interpolated between the GRADIENT anchors."""
    weight = min(max(float(weight), 0.0), 1.0)
    position = weight * (len(GRADIENT) - 1)
    low = min(int(position), len(GRADIENT) - 2)
    frac = position - low
    return tuple(round(a + (b - a) * frac) for a, b in zip(GRADIENT[low], GRADIENT[low + 1]))


def rgb_to_256(rgb: tuple[int, int, int]) -> int:
    """The nearest colour of xterm's 6x6x6 cube (indices 16-231)."""
    index = [min(range(6), key=lambda level: abs(_CUBE_LEVELS[level] - channel)) for channel in rgb]
    return 16 + 36 * index[0] + 6 * index[1] + index[2]


def background(weight: float, palette: str) -> str:
    """Escape code setting the background to the colour of `weight` in [0, 1]."""
    rgb = gradient_rgb(weight)
    if palette == "truecolor":
        return "\033[48;2;{};{};{}m".format(*rgb)
    return f"\033[48;5;{rgb_to_256(rgb)}m"

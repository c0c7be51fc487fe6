"""The Gradio web app: `build_app()` makes the page, `launch()` serves it (what `llamaviz app` runs).

layout.py lays the page out and wires events; handlers.py holds the thin event handlers; state.py
the per-browser state; models.py the process-wide model cache; views.py, intervene.py and
export.py compute what the tabs show from a run's activations.

May import: every layer below it (llama .. notebook, except notebook itself, which it does not use).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import threading

import gradio  # noqa: F401  (the [app] extra: fail at import, where `llamaviz app` reports it)

__all__ = ["build_app", "launch"]

log = logging.getLogger("llamaviz.app")
CONCURRENCY = 4  # events of one kind running at once; forwards that use hooks still take turns per model
SESSIONS_KEPT = 64  # browser sessions whose page values Gradio keeps (the oldest are dropped past this)


def build_app(model_path: str | None = None):
    """The app as a gr.Blocks (not launched); `model_path` is preselected in the model list.

    Serve it with `launch()`: under Gradio 6 the css, the head-grid click script, the theme and
    run_history=False are launch() arguments (layout.style_arguments("launch")).
    """
    from llamaviz.app.layout import build

    return build(None if model_path is None else str(model_path))


def launch(model_path: str | None = None, host: str = "127.0.0.1", port: int = 7860, **launch_kwargs):
    """Build and serve the app on host:port (local only by default; never shared through Gradio's tunnel)."""
    from llamaviz.app.layout import style_arguments
    from llamaviz.app.models import REGISTRY

    release_freed_memory()
    demo = build_app(model_path)
    preselected = demo.llamaviz_model_path
    if preselected:  # load in the background: the page is up at once and the first Generate waits for it
        threading.Thread(target=_preload, args=(REGISTRY, preselected), daemon=True).start()
    demo.queue(default_concurrency_limit=CONCURRENCY)
    launch_kwargs.pop("share", None)
    launch_kwargs.setdefault("state_session_capacity", SESSIONS_KEPT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` closes the server and removes the exports
    return demo.launch(server_name=host, server_port=port, share=False, **style_arguments("launch"),
                       **launch_kwargs)


def release_freed_memory() -> bool:
    """Make glibc hand large freed blocks back to the system (True when it took the settings).

    Runs allocate and free activations of hundreds of MB; with glibc's default sliding mmap
    threshold those land in the heap after the first free and stay there as slack. A fixed 1 MiB
    threshold keeps every large tensor in its own mapping, returned on free; two arenas (instead
    of eight per core) keep the request threads from each holding their own slack.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        settings = [(_M_MMAP_THRESHOLD, 2**20), (_M_TRIM_THRESHOLD, 2**24), (_M_ARENA_MAX, 2)]
        return all(libc.mallopt(option, value) == 1 for option, value in settings)
    except (OSError, AttributeError, TypeError):  # not glibc: the allocator keeps its own policy
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # mallopt parameters of glibc's malloc.h


def _interrupt(signum, frame) -> None:
    """SIGTERM as Ctrl-C: Gradio closes the server, then the exit handlers delete the export folder."""
    raise KeyboardInterrupt


def _preload(registry, path: str) -> None:
    try:
        registry.get(path)
    except Exception as err:  # reported in the page when the model is used
        log.warning("could not preload %s: %s", path, err)

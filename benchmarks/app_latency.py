"""Web app latency in a real browser: Generate click -> first streamed token, and head slider -> redrawn heatmap.

    .venv/bin/python benchmarks/app_latency.py [--runs 7] [--url http://127.0.0.1:7860/]

Without --url it starts `python app.py` on a free port with the default model on CPU. Timings are
taken inside the page (performance.now() from the event to the change on screen), so playwright's
own round trips are not counted. Targets: first token < 1 s, redraw < 300 ms. A script, not a test.

    .venv/bin/python benchmarks/app_latency.py --workbench [--runs 5]

times the workbench tabs' handlers in this process instead (what the server spends per click): the
logit attribution of a picked token (< 500 ms), integrated gradients with 32 steps (< 3 s), the
information-flow graph at 100 tokens (< 2 s), an exact resid_pre + per-head patching sweep of a
15-token pair (< 20 s) and attribution patching of it (< 2 s). Each run uses a fresh generation, so
nothing is memoised; medians are reported (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROMPT = "The cat sat on the mat. The cat sat on the mat. The cat"

# Click Generate, resolve with the ms until the output box holds more than the prompt.
FIRST_TOKEN_JS = """prompt => new Promise(resolve => {
  const box = document.querySelector('#output textarea');
  box.value = '';  // the last run's text; the new run shows the prompt first, then its tokens
  const start = performance.now();
  document.querySelector('#generate').click();
  const check = () => box.value.length > prompt.length && box.value.startsWith(prompt)
    ? resolve(performance.now() - start) : requestAnimationFrame(check);
  requestAnimationFrame(check);
})"""

# Move the head slider, resolve with [ms until the heatmap's title names the new head, ms until the
# server's answer arrived].
REDRAW_JS = """([head, title]) => new Promise(resolve => {
  performance.clearResourceTimings();
  const slider = document.querySelector('#head input[type=range]');
  const start = performance.now();
  slider.value = head;
  slider.dispatchEvent(new Event('input', {bubbles: true}));
  const answered = () => Math.max(0, ...performance.getEntriesByType('resource')
    .filter(e => e.name.includes('/run/predict')).map(e => e.responseEnd - start));
  const check = () => (document.querySelector('#attention-plot .gtitle') || {}).textContent === title
    ? resolve([performance.now() - start, answered()]) : requestAnimationFrame(check);
  requestAnimationFrame(check);
})"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(360):
        try:
            urllib.request.urlopen(url, timeout=2)
            return process, url
        except OSError:
            if process.poll() is not None:
                sys.exit(f"the app exited with {process.returncode}")
            time.sleep(0.5)
    process.kill()
    sys.exit("the app did not start within 3 minutes")


def wait_idle(page) -> None:
    """Until the last generation's follow-up redraws are on screen."""
    page.wait_for_function("() => (document.querySelector('#status') || {innerText: ''}).innerText.includes('Done')")
    page.wait_for_function("() => (document.querySelector('#attention-plot .gtitle') || {}).textContent")
    page.wait_for_timeout(5000)  # the tabs' redraws chained after the generation, drawn in the page


def measure(url: str, runs: int, new_tokens: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_function("() => (document.querySelector('#status') || {innerText: ''}).innerText.includes('Ready')")
        page.fill("#prompt textarea", PROMPT)
        if page.is_checked("#chat-template input"):
            page.click("#chat-template input")
        page.fill("#max-new-tokens input[type=number]", str(new_tokens))
        page.press("#max-new-tokens input[type=number]", "Enter")
        page.evaluate(FIRST_TOKEN_JS, PROMPT)  # one generation to browse
        wait_idle(page)
        redraw, answer, head = [], [], 0
        for _ in range(2 * runs + 1):  # the first move is dropped (warm-up)
            head = (head + 4) % 9
            on_screen, answered = page.evaluate(REDRAW_JS, [head, f"L0 H{head}"])
            redraw.append(on_screen)
            answer.append(answered)
            page.wait_for_timeout(300)
        first_token = []
        for _ in range(runs):
            first_token.append(page.evaluate(FIRST_TOKEN_JS, PROMPT))
            wait_idle(page)
        browser.close()
    return {"first token (ms)": first_token, "head slider redraw (ms)": redraw[1:],
            "  of which server answer": answer[1:]}


IOI = ("When Mary and John went to the store, John gave a drink to",  # 14 tokens + the generated one
       "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
LONG = " ".join(["The old lighthouse keeper climbed the stairs every night to light the lamp."] * 7)  # ~100 tokens


def fresh_run(path: str, prompt: str, new_tokens: int):
    """A browser state after a greedy generation (nothing memoised on it yet)."""
    from llamaviz.app import handlers, state

    session = state.BrowserState()
    for _, message, _ in handlers.generate(session, path, prompt, False, new_tokens, 1.0, 0, 1.0, 0, False,
                                           progress=lambda *a, **k: None):
        pass
    assert "lv-error" not in message, message
    return session


def timed(fn) -> float:
    started = time.perf_counter()
    result = fn()
    took = time.perf_counter() - started
    if isinstance(result, dict) and "lv-error" in str(result.get("status", "")):
        raise RuntimeError(result["status"])
    return took


def measure_workbench(runs: int) -> dict[str, tuple[list[float], float]]:
    """{row: (seconds per run, target seconds)} of the workbench handlers on the default model."""
    sys.path.insert(0, str(REPO))  # this checkout's llamaviz, as app.py sees it
    from llamaviz.app import compare, workbench as wb
    from llamaviz.checkpoints.default import default_model_path

    path, rows = str(default_model_path()), {}
    quiet = lambda *a, **k: None  # noqa: E731

    def add(name: str, target: float, value: float) -> None:
        rows.setdefault(name, ([], target))[0].append(value)

    for _ in range(runs):
        ioi = fresh_run(path, IOI[0], 1)
        wb.draw_dla(ioi, None, None)  # the first view also captures the explanation hooks (once per run)
        add("logit attribution, picked token (s)", 0.5, timed(lambda: wb.draw_dla(ioi, 5, None)))
        fresh = fresh_run(path, IOI[0], 1)
        add("  first view after a generation (s)", 0.5, timed(lambda: wb.draw_dla(fresh, None, None)))
        add("integrated gradients, 32 steps (s)", 3.0, timed(lambda: wb.draw_saliency(ioi, 14, "integrated gradients")))
        long = fresh_run(path, LONG, 1)
        wb.draw_dla(long, None, None)
        add("information flow, 100 tokens (s)", 2.0, timed(lambda: wb.draw_flow(long, None, 0.04)))
        add("attribution patching, 15 tokens (s)", 2.0, timed(lambda: wb.run_patching(
            ioi, compare.Workbench(), IOI[1], IOI[2], IOI[3], "attribution", progress=quiet)))
        add("exact resid_pre + heads, 15 tokens (s)", 20.0, timed(lambda: wb.run_patching(
            ioi, compare.Workbench(), IOI[1], IOI[2], IOI[3], "exact", ("resid_pre", "heads"), progress=quiet)))
    return rows


def report_workbench(runs: int) -> None:
    import torch

    rows = measure_workbench(runs)
    print(f"llamaviz workbench handlers, default model on CPU ({os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}), {runs} runs, seconds")
    for name, (values, target) in rows.items():
        median = statistics.median(values)
        verdict = "ok" if median < target else "over target"
        print(f"  {name:40s} median {median:7.3f}  min {min(values):7.3f}  max {max(values):7.3f}  "
              f"target < {target:g} ({verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--url", help="an app already serving (default: start one)")
    parser.add_argument("--workbench", action="store_true", help="time the workbench handlers in this process")
    args = parser.parse_args()
    if args.workbench:
        report_workbench(args.runs)
        return
    process, url = (None, args.url) if args.url else start_server()
    try:
        results = measure(url, args.runs, args.new_tokens)
    finally:
        if process is not None:
            process.terminate()
    targets = {"first token (ms)": 1000, "head slider redraw (ms)": 300, "  of which server answer": 300}
    print(f"llamaviz app latency, default model on CPU ({os.cpu_count()} cores), prompt of "
          f"{len(PROMPT.split())} words, {args.new_tokens} new tokens, {args.runs} runs")
    for name, values in results.items():
        median = statistics.median(values)
        verdict = "ok" if median < targets[name] else "over target"
        print(f"  {name:26s} median {median:7.1f}  min {min(values):7.1f}  max {max(values):7.1f}  "
              f"target < {targets[name]} ({verdict})")
        print(f"  {'':26s} runs: {', '.join(f'{v:.0f}' for v in values)}")


if __name__ == "__main__":
    main()

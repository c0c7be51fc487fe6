"""Web app latency in a real browser: Generate click -> first streamed token, and head slider -> redrawn heatmap.

    .venv/bin/python benchmarks/app_latency.py [--runs 7] [--url http://127.0.0.1:7860/]

Without --url it starts `python app.py` on a free port with the default model on CPU. Timings are
taken inside the page (performance.now() from the event to the change on screen), so playwright's
own round trips are not counted. Targets: first token < 1 s, redraw < 300 ms. A script, not a test.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--url", help="an app already serving (default: start one)")
    args = parser.parse_args()
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

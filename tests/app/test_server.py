"""The app as a server (`python app.py` in a subprocess) driven through gradio_client: two Generates
in one session, memory over many sessions that never close, and the export folder after exit."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")

REPO = Path(__file__).resolve().parents[2]
SERVER_START_S = 180
LIVE_RUNS_MB = 400  # the budget the soak server runs with (LLAMAVIZ_LIVE_RUNS_MB)
MARGIN_MB = 1024  # README: the fixed margin over the baseline (model loaded) + the live-runs budget
SESSIONS = 30
LONG_PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 23  # ~430 tokens
GREEDY = dict(chat_template=False, temperature=1.0, top_k=0, top_p=1.0, seed=0, do_sample=False)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    """(url, process, model path, its temp folder) of the app with a live-runs budget of LIVE_RUNS_MB."""
    folder = tmp_path_factory.mktemp("model")
    temp = tmp_path_factory.mktemp("server-tmp")  # the server's TMPDIR: its export folder is made here
    model = folder / default_gguf.name
    model.symlink_to(default_gguf)
    port, log = free_port(), folder.parent / "server.log"
    env = {**os.environ, "LLAMAVIZ_MODEL_DIR": str(folder), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1", "TMPDIR": str(temp), "LLAMAVIZ_LIVE_RUNS_MB": str(LIVE_RUNS_MB)}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not serve {url}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield url, process, str(model), temp
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


def generate(client, model: str, prompt: str, max_new_tokens: int):
    """A job running the /generate endpoint in the client's session."""
    g = GREEDY
    return client.submit(model, prompt, g["chat_template"], max_new_tokens, g["temperature"], g["top_k"], g["top_p"],
                         g["seed"], g["do_sample"], api_name="/generate")


def test_a_second_generate_in_one_session_stops_the_first_and_completes_fully(server):
    url, _, model, _ = server
    prompt, new = "Once upon a time, in a small village by the sea,", 40
    alone = gradio_client.Client(url, verbose=False)
    reference_text, reference_status = generate(alone, model, prompt, new).result()
    client = gradio_client.Client(url, verbose=False)
    first = generate(client, model, "The history of the Roman empire begins", 400)
    time.sleep(1.0)  # the first is generating
    second = generate(client, model, prompt, new)
    text, message = second.result(timeout=300)
    first.result(timeout=300)
    assert "Done:" in message and f"{new} new tokens" in message, message
    assert text == reference_text and "Done:" in reference_status
    view, _ = client.predict(0, 0, False, False, False, "entropy", 0, api_name="/export_view")
    saved = json.loads(Path(view).read_text())
    assert saved["prompt"] == prompt and len(saved["token_ids"]) > new  # the session kept the second run


def test_memory_stays_under_the_documented_bound_over_many_sessions(server):
    """SESSIONS sessions in sequence, none closed, each a ~430-token run drawn as the page draws it."""
    url, process, model, _ = server
    client = gradio_client.Client(url, verbose=False)
    client.predict(model, api_name="/load_model")
    baseline = rss_mb(process.pid)
    bound = baseline + LIVE_RUNS_MB + MARGIN_MB
    samples = []
    for step in range(SESSIONS):
        client = gradio_client.Client(url, verbose=False)  # a new session; the old ones stay open
        _, message = generate(client, model, LONG_PROMPT, 2).result(timeout=300)
        assert "Done:" in message, message
        client.predict(3, 0, False, False, False, "entropy", api_name="/show_run")
        client.predict(api_name="/draw_run_tabs")
        client.predict(5, False, False, api_name="/draw_layer")
        if step % 5 == 0:
            client.predict(400, api_name="/draw_lens")
        samples.append(rss_mb(process.pid))
        assert samples[-1] < bound, f"step {step}: RSS {samples[-1]:.0f} MiB over the bound {bound:.0f} MiB " \
                                    f"(baseline {baseline:.0f}); so far {[round(s) for s in samples]}"
    print(f"\nbaseline {baseline:.0f} MiB, bound {bound:.0f} MiB, RSS per session: {[round(s) for s in samples]}")


def test_the_export_folder_is_private_and_removed_when_the_server_exits(server):
    url, process, _, temp = server
    client = gradio_client.Client(url, verbose=False)
    _, message = generate(client, server[2], "The capital of France is", 3).result(timeout=300)
    client.predict(api_name="/export_cache")
    folders = [p for p in Path(temp).iterdir() if p.name.startswith("llamaviz-app-")]
    assert len(folders) == 1 and folders[0].stat().st_mode & 0o777 == 0o700
    assert any(folders[0].glob("run-*/activations-run*.safetensors"))
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert not folders[0].exists()

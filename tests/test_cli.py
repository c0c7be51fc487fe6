"""The llamaviz command run as a subprocess (`python -m llamaviz`): mask printouts equal the library's,
`run` streams the pipeline's generated_text (prompt + greedy continuation), `app --help`, and bad input -> one stderr line, exit 2.

Every subprocess is started at once (a module fixture) so their start-up overlaps.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_terminal import PROMPT, parse, save_tiny

import llamaviz
from llamaviz import cli
from llamaviz.terminal import AttentionMaskVisualizer

PYTHON = sys.executable
SECOND_PROMPT = "The capital of France is"
CHAT_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, llama2_tokenizer_dir) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"), llama2_tokenizer_dir)


@pytest.fixture(scope="module")
def chat_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny model again, with a chat template in its tokenizer_config.json."""
    folder = tmp_path_factory.mktemp("chat")
    shutil.copytree(tiny_dir, folder, dirs_exist_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return folder


def default_model():
    try:
        return llamaviz.default_model_path()
    except FileNotFoundError:
        return None


def commands(tiny: Path, chat: Path, nowhere: Path, not_a_model: Path) -> dict:
    """name -> (arguments, stdin) of every run this module checks."""
    tiny, text = str(tiny), ["--no-color", "--width", "200"]
    runs = {
        "mask": (["mask", PROMPT, "--model", tiny, "--width", "200"], ""),  # stdout is a pipe: no colour
        "weights": (["mask", PROMPT, "--model", tiny, "--layer", "1", "--head", "0", *text], ""),
        "batch_past": (["mask", "short", PROMPT, "--model", tiny, "--past-length", "2", "--max-tokens", "6",
                        *text], ""),
        "color": (["mask", PROMPT, "--model", tiny, "--color"], ""),
        "raw_tokens": (["mask", PROMPT, "--model", tiny, "--raw-tokens", *text], ""),
        "chat": (["run", "--model", str(chat), "--chat", "--max-new-tokens", "4"], PROMPT + "\n"),
        "chat_continuation": (["run", "--model", str(chat), "--chat", "--continuation-only", "--max-new-tokens", "4"],
                              PROMPT + "\n"),
        "two_lines": (["run", "--model", tiny, "--max-new-tokens", "4"], f"{PROMPT}\n{SECOND_PROMPT}\n"),
        "two_lines_continuation": (["run", "--model", tiny, "--max-new-tokens", "4", "--continuation-only"],
                                   f"{PROMPT}\n\n{SECOND_PROMPT}\n"),
        "app_help": (["app", "--help"], ""),
        "script_help": (["--help"], ""),  # through the console script
        "bad_missing_model": (["mask", "hi", "--model", str(nowhere)], ""),
        "bad_not_a_model": (["mask", "hi", "--model", str(not_a_model)], ""),
        "bad_empty_text": (["mask", "", "--model", tiny], ""),
        "bad_layer": (["mask", "hi", "--model", tiny, "--layer", "2"], ""),
        "bad_head": (["mask", "hi", "--model", tiny, "--layer", "0", "--head", "4"], ""),
        "bad_task": (["run", "--task", "summarization", "--model", tiny], PROMPT + "\n"),
        "bad_empty_stdin": (["run", "--model", tiny], "\n"),
        "bad_run_model": (["run", "--model", str(nowhere)], PROMPT + "\n"),
    }
    if default_model() is not None:
        runs["generate"] = (["run", "--task", "text-generation", "--device", "cpu", "--max-new-tokens", "5"],
                            f"{PROMPT}\n\n{SECOND_PROMPT}\n")
    return runs


class Launched:
    """Subprocesses started together; result(name) waits for one and returns (status, stdout, stderr)."""

    def __init__(self, runs: dict):
        env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLORTERM")}
        self.processes, self.results = {}, {}
        script = Path(PYTHON).with_name("llamaviz")
        for name, (args, stdin) in runs.items():
            runner = [str(script)] if name == "script_help" and script.exists() else [PYTHON, "-m", "llamaviz"]
            process = subprocess.Popen([*runner, *args], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            process.stdin.write(stdin)
            process.stdin.close()
            self.processes[name] = process

    def result(self, name: str) -> tuple[int, str, str]:
        if name not in self.results:
            process = self.processes[name]
            out, err = process.stdout.read(), process.stderr.read()
            self.results[name] = (process.wait(timeout=240), out, err)
        return self.results[name]

    def close(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait()


@pytest.fixture(scope="module")
def launched(tiny_dir, chat_dir, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("bad")
    (scratch / "notes.txt").write_text("not a checkpoint")
    runs = Launched(commands(tiny_dir, chat_dir, scratch / "nowhere", scratch / "notes.txt"))
    yield runs
    runs.close()


def pipeline_lines(path, prompts, max_new_tokens, return_full_text=True) -> str:
    """What the text-generation pipeline returns for each prompt (greedy), one line each."""
    generator = llamaviz.pipeline("text-generation", model=str(path))
    return "".join(generator(prompt, max_new_tokens=max_new_tokens, return_full_text=return_full_text)[0]
                   ["generated_text"] + "\n" for prompt in prompts)


def test_run_prints_the_pipelines_generated_text(launched, default_gguf):
    expected = pipeline_lines(default_gguf, (PROMPT, SECOND_PROMPT), 5)  # loads while the subprocess does the same
    status, out, err = launched.result("generate")
    assert status == 0, err
    assert out == expected
    assert out.startswith(PROMPT + " ")


@pytest.mark.parametrize("name, full", [("two_lines", True), ("two_lines_continuation", False)])
def test_run_two_stdin_lines_on_a_sentencepiece_model(launched, tiny_dir, name, full):
    status, out, err = launched.result(name)
    assert status == 0, err
    assert out == pipeline_lines(tiny_dir, (PROMPT, SECOND_PROMPT), 4, return_full_text=full)
    assert out.startswith(PROMPT) == full


@pytest.mark.parametrize("name, full", [("chat", True), ("chat_continuation", False)])
def test_run_chat_uses_the_template(launched, chat_dir, name, full):
    model, tokenizer = llamaviz.load(chat_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.endswith("[assistant] ")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=4)[0, ids.shape[1]:], skip_special_tokens=True)
    status, out, err = launched.result(name)
    assert status == 0, err
    assert out == (text if full else "") + expected + "\n"


@pytest.mark.parametrize("name, options", [
    ("mask", dict(color=False, width=200)),
    ("weights", dict(layer=1, head=0, color=False, width=200)),
    ("batch_past", dict(past_length=2, max_tokens=6, color=False, width=200)),
    ("raw_tokens", dict(raw_tokens=True, color=False, width=200)),
])
def test_mask_prints_what_the_library_renders(launched, tiny_dir, name, options):
    status, out, err = launched.result(name)
    assert status == 0, err
    text = ["short", PROMPT] if name == "batch_past" else PROMPT
    assert out == AttentionMaskVisualizer(tiny_dir).render(text, **options) + "\n"
    assert parse(out)[0]


def test_mask_color_flag(launched):
    status, out, err = launched.result("color")
    assert status == 0, err
    assert "\x1b[" in out and parse(re.sub(r"\x1b\[[0-9;]*m", "", out))[0]


def test_app_help(launched):
    status, out, err = launched.result("app_help")
    assert status == 0, err
    assert "--host" in out and "--port" in out and "--model" in out


@pytest.mark.parametrize("name, names", [
    ("bad_missing_model", "nowhere"),
    ("bad_not_a_model", "notes.txt"),
    ("bad_empty_text", "empty"),
    ("bad_layer", "0..1"),
    ("bad_head", "0..3"),
    ("bad_task", "summarization"),
    ("bad_empty_stdin", "empty"),
    ("bad_run_model", "nowhere"),
])
def test_bad_input_one_line_exit_2(launched, name, names):
    status, out, err = launched.result(name)
    assert status == 2, err
    assert "Traceback" not in err
    assert err.startswith("llamaviz: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert names in err


def test_console_script_help(launched):
    status, out, err = launched.result("script_help")
    assert status == 0, err
    assert all(name in out for name in ("mask", "run", "app", "--model"))


def test_app_calls_launch_with_model_host_port(monkeypatch, tiny_dir, tmp_path):
    calls = []
    monkeypatch.setattr("llamaviz.app.launch", lambda *args: calls.append(args))
    assert cli.main(["app", "--model", str(tiny_dir), "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert calls == [(str(tiny_dir), "0.0.0.0", 8123)]
    if default_model() is not None:
        assert cli.main(["app"]) == 0
        assert calls[-1] == (str(default_model()), "127.0.0.1", 7860)
    assert cli.main(["app", "--model", str(tmp_path / "nowhere")]) == 2
    assert len(calls) == 2 if default_model() is not None else 1


def test_rows_flag_reads_start_end():
    import argparse

    from llamaviz import cli

    assert cli._rows("100:120") == (100, 120)
    with pytest.raises(argparse.ArgumentTypeError, match=r"invalid rows '100-120': START:END"):
        cli._rows("100-120")

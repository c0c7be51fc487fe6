"""The `llamaviz` command (also `python -m llamaviz`): mask | run | app | features train | graph.

Bad input (a missing model, an empty text, a layer out of range, an unknown task) ends with one line
on stderr, `llamaviz: error: ...`, and exit status 2, never a traceback. Set LLAMAVIZ_DEBUG=1 to see
the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import os
import sys

TASKS = ("text-generation",)
DTYPES = ("auto", "float32", "bfloat16", "float16")
BAD_INPUT = (ValueError, FileNotFoundError, KeyError, IndexError, IsADirectoryError, NotADirectoryError, PermissionError)


class UsageError(Exception):
    """A problem with what the user asked for; main() prints it on one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `llamaviz: error: <what> (see <command> --help)`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"llamaviz: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> Parser:
    parser = Parser(prog="llamaviz", description="Look inside a Llama: attention masks and weights in the "
                    "terminal, text generation from stdin, and the web app.",
                    epilog="--model takes an HF checkpoint folder, a .gguf file or a folder holding one .gguf; "
                    "without it the default model (SmolLM2-135M-Instruct) is used.")
    parser.add_argument("--version", action="version", version=f"llamaviz {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_mask(commands)
    _add_run(commands)
    _add_app(commands)
    _add_features(commands)
    from llamaviz.graphs import command as graph_command  # `llamaviz graph`

    graph_command.add_parser(commands)
    return parser


def _add_mask(commands) -> None:
    mask = commands.add_parser(
        "mask", help="print the attention mask (or, with --layer, the attention weights) of a prompt",
        description="Print which tokens each token may attend to. Only the config and tokenizer are read, "
        "unless --layer asks for the attention weights (then the model is loaded). Several TEXTs make a "
        "left-padded batch.")
    mask.add_argument("text", nargs="+", metavar="TEXT", help="the prompt (give several for a padded batch)")
    _add_model(mask)
    mask.add_argument("--layer", type=int, metavar="L", help="show layer L's attention weights instead of the mask")
    mask.add_argument("--head", type=_head, metavar="H", help="a head index, or 'mean' (default) over all heads")
    mask.add_argument("--past-length", type=int, default=0, metavar="N",
                      help="treat the first N tokens as already in the KV cache: rows are only the new tokens")
    mask.add_argument("--max-tokens", type=int, metavar="N", help="show at most the last N tokens")
    mask.add_argument("--rows", type=_rows, metavar="START:END",
                      help="show only query rows START..END-1 of a long prompt (keys up to END-1)")
    mask.add_argument("--width", type=int, metavar="COLUMNS", help="fit this many columns (default: the terminal's)")
    mask.add_argument("--scale", choices=("row", "absolute"), default="row",
                      help="weights view: shade by weight / row max (default) or by the raw weight")
    mask.add_argument("--raw-tokens", action="store_true",
                      help="label rows with the vocabulary's pieces ('ĠJohn') instead of their text ('␣John')")
    colors = mask.add_mutually_exclusive_group()
    colors.add_argument("--no-color", dest="color", action="store_false", default=None,
                        help="no escape codes (default: colour on a terminal unless NO_COLOR is set)")
    colors.add_argument("--color", dest="color", action="store_true", help="colour even when not on a terminal")


def _add_run(commands) -> None:
    run = commands.add_parser(
        "run", help="generate text for each prompt read from stdin",
        description="Read prompts from stdin, one per line, and stream one result per line to stdout: the "
        "prompt followed by its continuation, as the text-generation pipeline returns it (with --chat, the "
        "prompt is the chat-templated text). "
        'Example: echo "Plants create energy through a process known as" | llamaviz run --task text-generation')
    run.add_argument("--task", choices=TASKS, default="text-generation", help="what to run (default: %(default)s)")
    _add_model(run)
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: %(default)s)")
    run.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the checkpoint's)")
    run.add_argument("--max-new-tokens", type=int, default=50, metavar="N", help="tokens to generate (default: 50)")
    run.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    run.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default: 1.0)")
    run.add_argument("--top-k", type=int, metavar="K", help="sample among the K likeliest tokens")
    run.add_argument("--top-p", type=float, metavar="P", help="sample among the likeliest tokens covering P")
    run.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="default: 1.0 (off)")
    run.add_argument("--seed", type=int, help="random seed for sampling")
    run.add_argument("--chat", action="store_true",
                     help="wrap each line as a user message with the tokenizer's chat template")
    run.add_argument("--continuation-only", action="store_true",
                     help="print only the generated continuation, not the prompt before it")


def _add_app(commands) -> None:
    app = commands.add_parser("app", help="start the web app", description="Start the llamaviz web app (Gradio).")
    _add_model(app)
    app.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    app.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")


def _add_features(commands) -> None:
    features = commands.add_parser("features", help="train dictionaries (SAEs, transcoders)",
                                   description="Dictionaries of features for a model.")
    actions = features.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = actions.add_parser("train", help="train an SAE on one hook point, or a transcoder set",
                               description="Harvest activations once (to DIR/harvest), train a dictionary on them and "
                               "write it to DIR in SAELens's format (a transcoder set: circuit-tracer's layout). "
                               "Ctrl-C writes a checkpoint; --resume continues from it.")
    _add_model(train)
    train.add_argument("--hook", help="the hook point to train on, e.g. blocks.15.hook_resid_post")
    train.add_argument("--transcoders", choices=["all"], help="every layer's MLP: mlp.hook_in -> hook_mlp_out, with skip")
    train.add_argument("--data", help=".txt/.md/.jsonl file or folder, or a datasets dataset saved to disk")
    train.add_argument("--field", default="text", help="the jsonl / dataset field holding the text (default: text)")
    train.add_argument("--generate", type=int, metavar="N", help="train on N tokens sampled from the model instead")
    train.add_argument("--out", required=True, metavar="DIR", help="the dictionary's folder")
    train.add_argument("--width", default="8x", help="latents: a number, or a multiple of the model width (default 8x)")
    train.add_argument("--k", type=int, default=32, help="topk / batchtopk: latents active per token (default 32)")
    train.add_argument("--architecture", default="topk", choices=["topk", "batchtopk", "jumprelu", "relu"],
                       help="topk (default, AuxK revives dead latents), batchtopk (saved as jumprelu), jumprelu, relu+L1")
    train.add_argument("--tokens", type=int, default=200_000, help="tokens to harvest (default 200,000)")
    train.add_argument("--context", type=int, default=128, help="tokens per context window (default 128)")
    train.add_argument("--batch-size", type=int, default=1024, help="tokens per step (default 1024)")
    train.add_argument("--lr", type=float, default=4e-4, help="Adam's learning rate (default 4e-4)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    train.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="of the harvested activations")
    train.add_argument("--keep-special", action="store_true", help="train on BOS/EOS/pad positions too")
    train.add_argument("--resume", action="store_true", help="continue from DIR's harvest and checkpoint")
    build = actions.add_parser("dashboards", help="build every feature's dashboard from a corpus",
                               description="One pass of the model over the corpus (up to the hook); writes DIR/dashboards.safetensors.")
    _add_model(build)
    build.add_argument("--dictionary", required=True, metavar="DIR", help="a SAELens dictionary folder")
    build.add_argument("--data", required=True, help=".txt/.md/.jsonl file or folder")
    build.add_argument("--tokens", type=int, default=50_000, help="tokens to read (default 50,000)")
    build.add_argument("--context", type=int, default=128, help="tokens per window (default 128)")
    top = actions.add_parser("top", help="print the top features of every token of a text")
    _add_model(top)
    top.add_argument("text", help="the text to read")
    top.add_argument("--dictionary", required=True, metavar="DIR", help="a SAELens dictionary folder")
    top.add_argument("--count", type=int, default=3, help="features per token (default 3)")
    show = actions.add_parser("show", help="print one feature's dashboard in the terminal")
    _add_model(show)
    show.add_argument("--dictionary", required=True, metavar="DIR", help="a folder with dashboards.safetensors")
    show.add_argument("--feature", type=int, required=True, help="the feature's index")
    defaults = actions.add_parser("defaults", help="train the default model's dictionaries (SAEs + a transcoder set)",
                                  description="One streamed pass over Python's own documentation trains residual SAEs "
                                  "at a few layers and a transcoder set, into model/dictionaries (or --out). Ctrl-C "
                                  "finishes the chunk in hand and writes a checkpoint; --resume continues.")
    _add_model(defaults)
    defaults.add_argument("--out", metavar="DIR", help="where to write them (default: model/dictionaries)")
    defaults.add_argument("--tokens", type=int, default=150_000, help="tokens to train on (default 150,000)")
    defaults.add_argument("--layers", default="5,15,25", help="layers of the residual SAEs (default 5,15,25)")
    defaults.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint")


def _add_model(parser) -> None:
    parser.add_argument("--model", metavar="PATH", help="HF checkpoint folder, .gguf file, or folder holding one "
                        ".gguf (default: the default model, SmolLM2-135M-Instruct)")


def _head(value: str):
    if value == "mean":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid head {value!r}: an integer or 'mean'") from None


def _rows(value: str) -> tuple[int, int]:
    start, sep, stop = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(start), int(stop)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rows {value!r}: START:END, e.g. 100:120") from None


# ----- commands -----

def run_mask(args) -> int:
    from llamaviz.terminal import AttentionMaskVisualizer

    if args.head is not None and args.layer is None:
        raise UsageError("--head needs --layer")
    viz = AttentionMaskVisualizer(args.model)
    text = args.text[0] if len(args.text) == 1 else args.text
    viz(text, layer=args.layer, head=args.head, past_length=args.past_length, color=args.color,
        width=args.width, max_tokens=args.max_tokens, scale=args.scale, raw_tokens=args.raw_tokens,
        rows=args.rows)
    return 0


def run_generation(args) -> int:
    from llamaviz.run.loading import load
    from llamaviz.run.streamers import TextStreamer

    if args.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    placement = {"tp_plan": "auto"} if _tensor_parallel() else {"device": args.device}  # under torchrun: sharded
    model, tokenizer = load(_model_path(args.model), dtype=None if args.dtype == "auto" else args.dtype,
                            **placement)
    model.eval()
    printing = _rank() == 0  # under torchrun rank 0 reads stdin and prints; the others follow its prompts
    if printing and sys.stdin.isatty():
        print("llamaviz: reading prompts from stdin, one per line (Ctrl-D to end)", file=sys.stderr)
    prompts = 0
    for line in _prompt_lines():
        prompt = line.rstrip("\r\n")
        if not prompt.strip():
            continue
        prompts += 1
        text, ids = _prompt(tokenizer, prompt, args.chat)
        if not args.continuation_only:
            print(text, end="", flush=True)  # the pipeline's generated_text starts with the prompt
        model.generate(ids.to(model.device), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.seed,
                       streamer=TextStreamer(tokenizer) if printing else None)
    if not prompts:
        raise UsageError("no prompt on stdin: the text is empty; pipe in one prompt per line")
    return 0


def _prompt(tokenizer, prompt: str, chat: bool):
    """(prompt text, [1, p] ids) of one line; with chat=True, the line as a user turn plus the assistant header."""
    import torch

    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return text, torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    return prompt, torch.tensor([tokenizer.encode(prompt)])


def run_app(args) -> int:
    try:
        from llamaviz.app import launch
    except ImportError as err:
        raise UsageError(f"the web app is not available ({err}); install it with: pip install 'llamaviz[app]'") \
            from None
    if _tensor_parallel():  # rank 0 serves the page, the other ranks follow its requests
        from llamaviz.app.parallel import launch_parallel

        launch_parallel(str(_model_path(args.model)), args.host, args.port)
        return 0
    launch(str(_model_path(args.model)), args.host, args.port)
    return 0


def _tensor_parallel() -> bool:
    """Started by torchrun with several ranks: the model is sharded over them (tp_plan="auto")."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _prompt_lines():
    """stdin's lines; under torchrun rank 0's lines, sent to every rank."""
    if not _tensor_parallel():
        return sys.stdin
    from llamaviz.distributed.requests import rank0_items

    return rank0_items(sys.stdin if _rank() == 0 else ())


def _model_path(path):
    """The --model path, checked to exist; None -> the default model's file."""
    from llamaviz.checkpoints.paths import model_path

    return model_path(path)


def run_features(args) -> int:
    from llamaviz.features import terminal_view, train

    if args.action == "defaults":
        return _train_defaults(args)
    if args.action != "train":
        return terminal_view.run(args.action, _model_path(args.model), args)

    summary = train(model=_model_path(args.model), hook=args.hook, data=args.data, out=args.out, width=args.width,
                    k=args.k, tokens=args.tokens, seed=args.seed, architecture=args.architecture, resume=args.resume,
                    context=args.context, field=args.field, generate=args.generate, keep_special=args.keep_special,
                    transcoders=args.transcoders, dtype=args.dtype, batch_size=args.batch_size, lr=args.lr)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0 if summary["status"] == "done" else 130


def _train_defaults(args) -> int:
    from llamaviz.features import defaults

    try:
        layers = tuple(int(x) for x in args.layers.split(","))
    except ValueError:
        raise UsageError(f"--layers {args.layers!r}: comma-separated layer numbers, e.g. 5,15,25") from None
    summary = defaults.build(model=_model_path(args.model), out=args.out, tokens=args.tokens, resume=args.resume,
                             sae_layers=layers)
    print(f"status: {summary['status']}\nout: {summary['out']}\nwindows: {summary['windows']}")
    for name, scores in summary["scores"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in ("explained variance", "L0", "ce loss score"))
        print(f"{name}: {shown}")
    return 0 if summary["status"] == "done" else 130


COMMANDS = {"mask": run_mask, "run": run_generation, "app": run_app, "features": run_features,
            "graph": lambda args: __import__("llamaviz.graphs.command", fromlist=["run"]).run(args)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, *BAD_INPUT) as err:
        return _fail(err, 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:  # an unexpected failure: still one line unless debugging
        if os.environ.get("LLAMAVIZ_DEBUG"):
            raise
        return _fail(err, 1, f"{type(err).__name__}: ", " (set LLAMAVIZ_DEBUG=1 for the traceback)")


def _fail(err: BaseException, status: int, before: str = "", after: str = "") -> int:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = " ".join(str(message).split())  # one line
    print(f"llamaviz: error: {before}{message}{after}", file=sys.stderr)
    return status


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llamaviz")
    except PackageNotFoundError:
        return "0.1.0"


if __name__ == "__main__":
    sys.exit(main())

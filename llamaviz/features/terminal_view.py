"""`llamaviz features dashboards` and `llamaviz features show`: build dashboards, print one in the terminal."""

from __future__ import annotations

from llamaviz.features import dashboards
from llamaviz.features.data import read_corpus, windows
from llamaviz.features.saelens_files import load


def run(action: str, model_path, args) -> int:
    from llamaviz.run.loading import load as load_model

    model, tokenizer = load_model(model_path)
    model.eval()
    if action == "dashboards":
        corpus = read_corpus(args.data)
        ids = windows(tokenizer, corpus.documents, args.context, max_tokens=args.tokens)
        bar = _bar(len(ids))
        path = dashboards.build(model, load(args.dictionary), ids, args.dictionary, progress=bar)
        print(f"\n{corpus.summary()}\nwrote {path}")
        return 0
    if action == "top":
        print(top_text(model, tokenizer, load(args.dictionary), args.text, args.count))
        return 0
    print(feature_text(dashboards.DashboardFile(args.dictionary), args.feature, tokenizer))
    return 0


def top_text(model, tokenizer, dictionary, text: str, count: int = 3) -> str:
    """One line per token: the token and its `count` most active features (index=activation)."""
    if not text.strip():
        raise ValueError("the text is empty; give some words to read")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    acts = dashboards.feature_acts(model, dictionary, ids)[0]  # [p, F]
    values, indices = acts.topk(min(count, acts.shape[-1]), dim=-1)
    lines = []
    for position, token in enumerate(ids[0].tolist()):
        found = [f"#{int(i)}={float(v):.2f}" for v, i in zip(values[position], indices[position]) if v > 0]
        lines.append(f"{position:4d} {tokenizer.decode([token])!r:>16}  {'  '.join(found) or '-'}")
    return "\n".join(lines)


def _bar(windows_count: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * windows_count, unit="window")

    def update(done: int, total: int) -> None:
        bar.n = done
        bar.refresh()

    return update


def feature_text(board: dashboards.DashboardFile, index: int, tokenizer, contexts: int = 8) -> str:
    """Density, logit effects and the top contexts with each context's peak token in [brackets]."""
    data = board.feature(index)
    word = lambda i: tokenizer.decode([int(i)]).replace("\n", "⏎")  # noqa: E731
    lines = [f"feature {index} of {board.metadata.get('hook_name', '?')}: density {float(data['density']):.3%}, "
             f"max activation {float(data['peak']):.3f}",
             "promotes:   " + ", ".join(word(i) for i in data["promoted_ids"]),
             "suppresses: " + ", ".join(word(i) for i in data["suppressed_ids"]), "top contexts:"]
    for ids, acts, value in list(zip(data["top_ids"], data["top_acts"], data["top_values"]))[:contexts]:
        if value < 0:
            continue
        peak = int(acts.argmax())
        text = "".join(f"[{word(i)}]" if k == peak else word(i) for k, i in enumerate(ids.tolist()) if i >= 0)
        lines.append(f"  {float(value):7.3f}  {text}")
    return "\n".join(lines)

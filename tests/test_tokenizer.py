"""Tokenizers against their references: transformers (same files), the sentencepiece library, tokenizers."""

import json
import random

import pytest
import torch

from llamaviz.tokenizers import AutoTokenizer, BatchEncoding, LlamaTokenizer, LlamaTokenizerFast

transformers = pytest.importorskip("transformers")

# Varied text: accents, CJK, Arabic, emoji (with ZWJ and skin tone), code with indentation and tabs,
# runs of spaces and newlines, numbers, punctuation, special-token strings written in the text, nothing.
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström Çà et là",
    "中文字符测试，日本語のテキスト、한국어",
    "مرحبا بالعالم، كيف حالك؟",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    if x:\n        return x * 2\n\treturn None  # tab",
    "  multiple   spaces  and\n\n\nnewlines\r\n trailing  ",
    "numbers 12345 3.14159 -42 1e10 2024-01-31 0xFF",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "Hello , world . isn 't it ? I 'm sure",
    "",
]
# For the Llama 2 (SentencePiece) vocabulary: text without a leading space or a space after a special
# token, where transformers 5 departs from sentencepiece (see test_llama2_leading_space_follows_sentencepiece).
LLAMA_TEXTS = [
    "Hello world",
    "Banana split",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé Ångström",
    "中文字符测试 日本語のテキスト",
    "مرحبا بالعالم",
    "𝔘nicode 😀 ☃ 🦙 rare: ꙮ 𓀀",
    "def f(x):\n    return x * 2\n\tindented",
    "multiple   spaces\n\n\nnewlines",
    "numbers 12345 3.14159 -42",
]
LLAMA_SPECIAL_TEXTS = ["<s>Hello world", "Hello<s>world</s>", "Question:</s>Answer<unk>end", "</s>"]
CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
]


# ----- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_pair(default_gguf):
    """(ours, transformers') tokenizers from the default model's GGUF."""
    theirs = transformers.AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return AutoTokenizer.from_pretrained(default_gguf), theirs


@pytest.fixture(scope="module")
def llama2(llama2_tokenizer_dir):
    """Ours (SentencePiece and fast) and the references for the Llama 2 tokenizer fixture."""
    import sentencepiece

    folder = str(llama2_tokenizer_dir)
    return {
        "slow": LlamaTokenizer.from_pretrained(llama2_tokenizer_dir),
        "fast": LlamaTokenizerFast.from_pretrained(llama2_tokenizer_dir),
        "hf_slow": transformers.LlamaTokenizer.from_pretrained(folder, legacy=True),
        "hf_fast": transformers.LlamaTokenizerFast.from_pretrained(folder),
        "spm": sentencepiece.SentencePieceProcessor(model_file=str(llama2_tokenizer_dir / "tokenizer.model")),
    }


def write_gguf(path, model="llama", tokens=(), scores=None, types=None, ids=None, merges=None, pre=None,
               add_bos=None):
    """A tokenizer-only GGUF file (no tensors) with the given vocabulary."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(list(tokens))
    for values, add in ((scores, writer.add_token_scores), (types, writer.add_token_types),
                        (merges, writer.add_token_merges)):
        if values is not None:
            add(list(values))
    for name, index in (ids or {}).items():
        getattr(writer, f"add_{name}_token_id")(index)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama_gguf(llama2, tmp_path_factory):
    """The Llama 2 SentencePiece vocabulary written as a GGUF "llama" tokenizer."""
    sp = llama2["spm"]
    size = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(size)]
    return write_gguf(tmp_path_factory.mktemp("llama-gguf") / "llama2-vocab.gguf", "llama",
                      [sp.id_to_piece(i) for i in range(size)], [sp.get_score(i) for i in range(size)], types,
                      ids={"bos": 1, "eos": 2, "unk": 0})


# ----- the default model's GGUF (byte-level BPE, pre-tokenizer "smollm") ------------------------------------------


def test_gguf_loads_fast_and_quickly(default_gguf, gguf_pair):
    import time

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(default_gguf)
    elapsed = time.perf_counter() - start
    assert isinstance(tok, LlamaTokenizerFast)
    assert elapsed < 2.0, f"AutoTokenizer.from_pretrained on the default GGUF took {elapsed:.2f} s"


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_match_transformers(gguf_pair, text):
    ours, theirs = gguf_pair
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.tokenize(text) == theirs.tokenize(text)


def test_gguf_batch_and_decode_match_transformers(gguf_pair):
    ours, theirs = gguf_pair
    ids = theirs(TEXTS)["input_ids"]
    assert ours(TEXTS)["input_ids"] == ids
    for row in ids:
        for skip in (False, True):
            assert ours.decode(row, skip_special_tokens=skip) == theirs.decode(row, skip_special_tokens=skip)
    rng = random.Random(0)
    arbitrary = list(range(300)) + [rng.randrange(len(theirs)) for _ in range(2000)]
    for skip in (False, True):
        assert ours.decode(arbitrary, skip_special_tokens=skip) == theirs.decode(arbitrary, skip_special_tokens=skip)
    assert ours.batch_decode(torch.tensor([ids[0][:2], ids[1][:2]])) == theirs.batch_decode([ids[0][:2], ids[1][:2]])


def test_gguf_special_tokens_and_vocab_match_transformers(gguf_pair):
    ours, theirs = gguf_pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert getattr(ours, f"{name}_id") == getattr(theirs, f"{name}_id"), name
    assert ours.all_special_ids == theirs.all_special_ids
    assert ours.add_bos_token == theirs.add_bos_token and ours.add_eos_token == theirs.add_eos_token
    assert (ours.vocab_size, len(ours)) == (theirs.vocab_size, len(theirs))
    assert ours.get_vocab() == theirs.get_vocab()
    tokens = theirs.convert_ids_to_tokens(list(range(0, 49152, 97)))
    assert ours.convert_ids_to_tokens(list(range(0, 49152, 97))) == tokens
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_string(tokens) == theirs.convert_tokens_to_string(tokens)


def test_gguf_chat_template_matches_transformers(gguf_pair):
    ours, theirs = gguf_pair
    text = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == text
    assert ours.apply_chat_template(CHAT[:2], tokenize=False) == theirs.apply_chat_template(CHAT[:2], tokenize=False)
    expected = theirs.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"] == expected
    assert ours.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False) == expected
    tensor = ours.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    assert tensor.tolist() == [expected]
    continued = theirs.apply_chat_template(CHAT[:2], continue_final_message=True, tokenize=False)
    assert ours.apply_chat_template(CHAT[:2], continue_final_message=True, tokenize=False) == continued


def test_gguf_batched_chat_matches_transformers(gguf_pair):
    ours, theirs = gguf_pair
    theirs.padding_side = "left"
    try:
        ref = theirs.apply_chat_template([CHAT, CHAT[:1]], add_generation_prompt=True, padding=True, return_tensors="pt")
    finally:
        theirs.padding_side = "right"
    mine = ours.apply_chat_template([CHAT, CHAT[:1]], add_generation_prompt=True, padding=True, return_tensors="pt")
    torch.testing.assert_close(mine["input_ids"], ref["input_ids"])
    torch.testing.assert_close(mine["attention_mask"], ref["attention_mask"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_gguf_padding_and_truncation_match_transformers(gguf_pair, side):
    ours, theirs = gguf_pair
    batch = ["short", "a much longer sentence with many words", ""]
    mine = ours(batch, padding=True, padding_side=side, return_tensors="pt")
    ref = theirs(batch, padding=True, padding_side=side, return_tensors="pt")
    torch.testing.assert_close(mine["input_ids"], ref["input_ids"])
    torch.testing.assert_close(mine["attention_mask"], ref["attention_mask"])
    mine = ours(batch, padding="max_length", max_length=6, truncation=True, padding_side=side)
    ref = theirs(batch, padding="max_length", max_length=6, truncation=True, padding_side=side)
    assert (mine["input_ids"], mine["attention_mask"]) == (ref["input_ids"], ref["attention_mask"])
    ours.truncation_side = theirs.truncation_side = "left"
    try:
        assert ours(batch, max_length=3, truncation=True) == dict(theirs(batch, max_length=3, truncation=True))
    finally:
        ours.truncation_side = theirs.truncation_side = "right"


def test_padding_side_defaults_to_left_and_can_be_overridden(default_gguf, gguf_pair):
    ours, _ = gguf_pair
    assert ours.padding_side == "left"
    left = ours(["hi", "hello there"], padding=True)
    assert left["attention_mask"][0][0] == 0 and left["input_ids"][0][0] == ours.pad_token_id
    right = AutoTokenizer.from_pretrained(default_gguf, padding_side="right")(["hi", "hello there"], padding=True)
    assert right["attention_mask"][0][-1] == 0


def test_batch_encoding_is_dict_like(gguf_pair):
    ours, _ = gguf_pair
    encoding = ours(["a b", "c"], padding=True, return_tensors="pt")
    assert isinstance(encoding, BatchEncoding) and set(encoding) == {"input_ids", "attention_mask"}
    assert encoding.input_ids is encoding["input_ids"] and encoding.to("cpu")["input_ids"].shape == (2, 2)
    assert ours.encode("a b", return_tensors="pt").tolist() == [ours.encode("a b")]


def test_pre_tokenizer_table_matches_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from llamaviz.tokenizers.gguf_vocab import PRE_TOKENIZER_SPLITS

    assert PRE_TOKENIZER_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


def test_gguf_with_split_pre_tokenizer_and_bos_matches_transformers(default_gguf, tmp_path):
    """A byte-level GGUF whose pre type has its own split regex ("llama-bpe") and add_bos_token set."""
    from llamaviz.checkpoints.gguf_header import gguf_metadata

    metadata = gguf_metadata(default_gguf)
    tokens, types = metadata["tokenizer.ggml.tokens"][:6000], metadata["tokenizer.ggml.token_type"][:6000]
    vocab = set(tokens)
    merges = [merge for merge in metadata["tokenizer.ggml.merges"]
              if all(part in vocab for part in (*merge.split(" "), merge.replace(" ", "")))]
    path = write_gguf(tmp_path / "llama-bpe.gguf", "gpt2", tokens, types=types, merges=merges,
                      ids={"bos": 1, "eos": 2}, pre="llama-bpe", add_bos=True)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = AutoTokenizer.from_pretrained(path)
    assert ours.add_bos_token
    for text in TEXTS + ["I'M HERE, don't 12345678 x=1;y=22\r\n"]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), text


# ----- Llama 2 SentencePiece fixture --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", LLAMA_TEXTS)
def test_llama2_matches_sentencepiece_and_transformers(llama2, text):
    reference = [llama2["spm"].bos_id()] + llama2["spm"].encode(text)  # BOS prepended, as the reference does
    for name in ("slow", "fast"):
        assert llama2[name](text)["input_ids"] == reference, name
    assert llama2["hf_slow"](text)["input_ids"] == reference
    assert llama2["slow"].tokenize(text) == llama2["hf_slow"].tokenize(text)


@pytest.mark.parametrize("text", LLAMA_SPECIAL_TEXTS)
def test_llama2_special_token_strings_match_transformers(llama2, text):
    expected = llama2["hf_slow"](text)["input_ids"]
    assert llama2["hf_fast"](text)["input_ids"] == expected
    for name in ("slow", "fast"):
        assert llama2[name](text)["input_ids"] == expected, name
    assert llama2["slow"]("<s>Hi")["input_ids"][:2] == [1, 1]  # "<s>" in text is the BOS token, not pieces


@pytest.mark.parametrize("text", [" Hi  there", "Hello <s> world", "a </s> b"])
def test_llama2_leading_space_follows_sentencepiece(llama2, llama2_tokenizer_dir, text):
    """A space at the start of a stretch: sentencepiece and the tokenizer.json file agree (transformers 5 drops it)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(llama2_tokenizer_dir / "tokenizer.json")).encode(text).ids
    assert llama2["slow"](text)["input_ids"] == raw
    assert llama2["fast"](text)["input_ids"] == raw
    if "<" not in text:
        assert raw == [1] + llama2["spm"].encode(text)


LEADING_WHITESPACE_TEXTS = [" Banana", "  two leading spaces", " ", "   ", "\tTab first", "\n newline first",
                            " Hello<s> world", " a </s> b"]


def spm_llama_decode(spm, ids, skip_special_tokens=False, special=("<s>", "</s>", "<unk>")):
    """The reference: transformers 4.x's SentencePiece LlamaTokenizer.decode (legacy=True, add_prefix_space),
    rebuilt from its documented rule on the sentencepiece library alone: ids -> pieces (special ids dropped
    when skipping); the first piece loses one "▁"; runs of ordinary pieces go through spm.decode(pieces);
    special pieces are written as they are, each one after text preceded by a space (legacy); a
    non-word-initial piece right after a leading special piece gets a space."""
    pieces = [spm.id_to_piece(i) for i in ids if not (skip_special_tokens and spm.id_to_piece(i) in special)]
    if not pieces:
        return ""
    pieces[0] = pieces[0][1:] if pieces[0].startswith("▁") else pieces[0]
    text, run = "", []
    for position, piece in enumerate(pieces):
        previous_special = position > 0 and pieces[position - 1] in special
        if piece in special:
            text += (" " if position > 0 and not previous_special else "") + spm.decode(run) + piece
            run = []
        else:
            text += " " if previous_special and position == 1 and not piece.startswith("▁") else ""
            run.append(piece)
    return text + spm.decode(run)


def test_llama2_decode_matches_transformers(llama2):
    """LlamaTokenizer follows transformers 4.x's SentencePiece class; LlamaTokenizerFast and the lossless
    option follow transformers 5's (tokenizers') LlamaTokenizer."""
    sp, hf = llama2["spm"], llama2["hf_slow"]
    lossless = LlamaTokenizer.from_pretrained(llama2["slow"].name_or_path, lossless_decode=True)
    banana = hf.encode("Banana split", add_special_tokens=False)
    assert hf.convert_ids_to_tokens(banana[0]).startswith("▁")
    rng = random.Random(0)
    normal = [rng.randrange(259, 32000) for _ in range(1000)]  # byte pieces excluded: see below
    for ours, reference in ((llama2["slow"], lambda ids, skip=False: spm_llama_decode(sp, ids, skip)),
                            (llama2["fast"], hf.decode), (lossless, hf.decode)):
        assert ours.decode(banana) == reference(banana) == sp.decode(banana) == "Banana split"
        for ids in ([1] + banana, normal, *(hf(text)["input_ids"] for text in LLAMA_TEXTS + LLAMA_SPECIAL_TEXTS)):
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == reference(ids, skip), (type(ours), ids[:8])
        assert ours.decode(torch.tensor(normal)) == ours.decode(normal)


@pytest.mark.parametrize("text", LEADING_WHITESPACE_TEXTS)
def test_llama2_decode_of_leading_whitespace_follows_the_sentencepiece_rule(llama2, text):
    """The documentation: a first token that starts a word gets no prefix space, whatever the text began with."""
    ours, sp = llama2["slow"], llama2["spm"]
    for ids in (ours.encode(text), ours.encode(text, add_special_tokens=False)):
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == spm_llama_decode(sp, ids, skip), ids
    lossless = LlamaTokenizer.from_pretrained(ours.name_or_path, lossless_decode=True)
    assert lossless.decode(lossless.encode(text.split("<")[0]), skip_special_tokens=True) == text.split("<")[0]


def test_llama2_banana_as_documented(llama2):
    ours = llama2["slow"]
    assert ours.decode(ours.encode(" Banana", add_special_tokens=False)) == "Banana"
    assert ours.decode(ours.encode("Banana", add_special_tokens=False)) == "Banana"
    ours.lossless_decode = True
    try:
        assert ours.decode(ours.encode(" Banana", add_special_tokens=False)) == " Banana"
    finally:
        ours.lossless_decode = False


def test_llama2_byte_fallback(llama2):
    text = "ꙮ 𓀀 🦙"
    ids = llama2["slow"].encode(text)
    assert ids == llama2["hf_slow"].encode(text) == [1] + llama2["spm"].encode(text)
    assert any(token.startswith("<0x") for token in llama2["slow"].convert_ids_to_tokens(ids))
    assert llama2["slow"].decode(ids, skip_special_tokens=True) == text
    # An invalid byte run decodes as sentencepiece does (tokenizers' ByteFallback differs here).
    assert llama2["slow"].decode([130, 131]) == llama2["spm"].decode([130, 131])


def test_llama2_special_token_helpers_match_transformers(llama2):
    hf = llama2["hf_slow"]
    first, second = "Hello there", "General Kenobi"
    reference = hf(first, second, return_special_tokens_mask=True, return_token_type_ids=True)
    single = hf(first, return_special_tokens_mask=True, return_token_type_ids=True)
    for name in ("slow", "fast"):
        ours = llama2[name]
        ids0, ids1 = ours.encode(first, add_special_tokens=False), ours.encode(second, add_special_tokens=False)
        assert ours.build_inputs_with_special_tokens(ids0, ids1) == reference["input_ids"]
        assert ours.build_inputs_with_special_tokens(ids0) == single["input_ids"]
        assert ours.get_special_tokens_mask(ids0, ids1) == reference["special_tokens_mask"]
        assert ours.get_special_tokens_mask(ids0) == single["special_tokens_mask"]
        assert ours.create_token_type_ids_from_sequences(ids0, ids1) == reference["token_type_ids"]
        assert ours.create_token_type_ids_from_sequences(ids0) == single["token_type_ids"]
        formatted = reference["input_ids"]
        assert ours.get_special_tokens_mask(formatted, already_has_special_tokens=True) == hf.get_special_tokens_mask(
            formatted, already_has_special_tokens=True
        )
        assert ours.all_special_ids == hf.all_special_ids
        assert (ours.vocab_size, len(ours)) == (hf.vocab_size, len(hf))


def test_llama2_left_padded_batch_matches_transformers(llama2_tokenizer_dir, llama2):
    batch = ["Hello world", "A much longer sentence about llamas", "Hi"]
    reference = transformers.LlamaTokenizer.from_pretrained(str(llama2_tokenizer_dir), legacy=True)
    reference.pad_token = reference.unk_token
    expected = reference(batch, padding=True, padding_side="left", return_tensors="pt")
    for cls in (LlamaTokenizer, LlamaTokenizerFast):
        ours = cls.from_pretrained(llama2_tokenizer_dir)
        ours.pad_token = ours.unk_token
        encoding = ours(batch, padding=True, return_tensors="pt")  # left is the default
        torch.testing.assert_close(encoding["input_ids"], expected["input_ids"])
        torch.testing.assert_close(encoding["attention_mask"], expected["attention_mask"])


def test_legacy_false_matches_transformers(llama2_tokenizer_dir):
    reference = transformers.LlamaTokenizer.from_pretrained(str(llama2_tokenizer_dir), legacy=False)
    ours = LlamaTokenizer.from_pretrained(llama2_tokenizer_dir, legacy=False)
    for text in ["Hello<s>world", "<s>Hi there", "Hi</s>there you", "Hello world"]:
        assert ours(text)["input_ids"] == reference(text)["input_ids"], text


def test_update_post_processor_adds_eos_like_transformers(llama2_tokenizer_dir):
    reference = transformers.LlamaTokenizerFast.from_pretrained(str(llama2_tokenizer_dir))
    reference.add_bos_token, reference.add_eos_token = True, True
    reference.update_post_processor()
    ours = LlamaTokenizerFast.from_pretrained(llama2_tokenizer_dir)
    assert ours("Hi there")["input_ids"][-1] != ours.eos_token_id
    ours.add_eos_token = True
    ours.update_post_processor()
    for text in ("Hi there", "Banana split"):
        assert ours(text)["input_ids"] == reference(text)["input_ids"]
        assert ours.backend_tokenizer.encode(text).ids == reference(text)["input_ids"]  # the Rust post-processor too
    first, second = ours.encode("a", add_special_tokens=False), ours.encode("b", add_special_tokens=False)
    assert ours.backend_tokenizer.encode("a", "b").ids == ours.build_inputs_with_special_tokens(first, second)


# ----- GGUF "llama" (SentencePiece) vocabulary ------------------------------------------------------------------------


def test_gguf_sentencepiece_vocabulary(llama_gguf, llama2):
    ours = AutoTokenizer.from_pretrained(llama_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(str(llama_gguf.parent), gguf_file=llama_gguf.name)
    assert isinstance(ours, LlamaTokenizer)
    for text in LLAMA_TEXTS:
        assert ours(text)["input_ids"] == [1] + llama2["spm"].encode(text) == reference(text)["input_ids"], text
        spm_round_trip = llama2["spm"].decode(llama2["spm"].encode(text))
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == spm_round_trip
    assert ours("Hello<s>world")["input_ids"] == llama2["slow"]("Hello<s>world")["input_ids"]
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")
    with pytest.raises(ValueError, match="LlamaTokenizer.from_pretrained or AutoTokenizer"):
        LlamaTokenizerFast.from_pretrained(llama_gguf)


# ----- saving ------------------------------------------------------------------------------------------------------


def test_save_round_trips(default_gguf, llama2_tokenizer_dir, llama_gguf, tmp_path):
    sources = {
        "gguf": (AutoTokenizer, default_gguf),
        "slow": (LlamaTokenizer, llama2_tokenizer_dir),
        "fast": (LlamaTokenizerFast, llama2_tokenizer_dir),
        "gguf-llama": (AutoTokenizer, llama_gguf),
    }
    for name, (cls, path) in sources.items():
        original = cls.from_pretrained(path)
        written = original.save_pretrained(tmp_path / name)
        assert all((tmp_path / name / file).is_file() for file in written)
        reloaded = AutoTokenizer.from_pretrained(tmp_path / name)
        for text in TEXTS + LLAMA_SPECIAL_TEXTS:
            assert reloaded(text)["input_ids"] == original(text)["input_ids"], (name, text)
            assert reloaded.decode(original.encode(text)) == original.decode(original.encode(text)), (name, text)
        assert reloaded.chat_template == original.chat_template
        assert reloaded.special_tokens_map == original.special_tokens_map
    vocab = LlamaTokenizer.from_pretrained(llama2_tokenizer_dir).save_vocabulary(tmp_path, filename_prefix="x")
    assert vocab == (str(tmp_path / "x-tokenizer.model"),)
    assert (tmp_path / "x-tokenizer.model").read_bytes() == (llama2_tokenizer_dir / "tokenizer.model").read_bytes()


def test_saved_gguf_tokenizer_reads_in_transformers(gguf_pair, tmp_path):
    ours, _ = gguf_pair
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert theirs(text)["input_ids"] == ours(text)["input_ids"], text
    assert theirs.apply_chat_template(CHAT, tokenize=False) == ours.apply_chat_template(CHAT, tokenize=False)


# ----- chat templates ------------------------------------------------------------------------------------------------


def test_chat_template_globals_and_sandbox(gguf_pair):
    ours, theirs = gguf_pair
    template = (
        "{% for m in messages %}{{ m | tojson }}{% if m.role == 'bad' %}{{ raise_exception('no bad') }}{% endif %}"
        "{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    assert ours.apply_chat_template(CHAT, chat_template=template, tokenize=False) == theirs.apply_chat_template(
        CHAT, chat_template=template, tokenize=False
    )
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="no bad"):
        ours.apply_chat_template([{"role": "bad", "content": "x"}], chat_template=template, tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHAT, chat_template="{{ messages.__class__.__mro__ }}", tokenize=False)


# ----- bad input -----------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does-not-exist.*does not exist.*tokenizer\.json"):
        AutoTokenizer.from_pretrained(tmp_path / "does-not-exist")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files in .*tokenizer\.json, tokenizer\.model"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        LlamaTokenizer.from_pretrained(tmp_path)


def test_folder_with_two_ggufs(tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\); pass the path"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_gguf_with_unsupported_tokenizer_model(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", "bert", ["[PAD]", "[UNK]", "hello"])
    with pytest.raises(ValueError, match=r"bert\.gguf: tokenizer\.ggml\.model is 'bert'.*\['gpt2', 'llama'\]"):
        AutoTokenizer.from_pretrained(path)


def test_padding_without_pad_token(llama2):
    with pytest.raises(ValueError, match=r"tok\.pad_token"):
        llama2["slow"](["a", "b c"], padding=True)


def test_bad_call_options(gguf_pair, llama2):
    ours, _ = gguf_pair
    with pytest.raises(ValueError, match=r"return_tensors='tf'.*'pt'"):
        ours("hi", return_tensors="tf")
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "b c d"], return_tensors="pt")
    with pytest.raises(ValueError, match=r"padding='sideways'"):
        ours("hi", padding="sideways")
    with pytest.raises(ValueError, match="'left' or 'right'"):
        ours(["a", "b c"], padding=True, padding_side="middle")
    with pytest.raises(ValueError, match="string or a list of strings"):
        ours(42)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49152\)"):
        ours.decode([5, 49152])
    with pytest.raises(ValueError, match="not in this tokenizer's vocabulary"):
        llama2["fast"].pad_token = "<pad>"


def test_special_token_setters(llama2_tokenizer_dir):
    tok = LlamaTokenizerFast.from_pretrained(llama2_tokenizer_dir)
    tok.pad_token_id = tok.unk_token_id
    assert tok.pad_token == tok.unk_token == "<unk>"
    tok.bos_token = "</s>"  # the rebuilt post-processor follows
    assert tok("hi")["input_ids"][0] == tok.eos_token_id == tok.backend_tokenizer.encode("hi").ids[0]


def test_unreadable_tokenizer_files(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        AutoTokenizer.from_pretrained(tmp_path / "json")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a SentencePiece model"):
        AutoTokenizer.from_pretrained(tmp_path / "model")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ValueError, match=r"bad\.gguf is not a readable GGUF file"):
        AutoTokenizer.from_pretrained(tmp_path / "bad.gguf")


def test_chat_template_missing(llama2):
    with pytest.raises(ValueError, match="has no chat template.*chat_template"):
        llama2["slow"].apply_chat_template(CHAT)
    with pytest.raises(ValueError, match="at least one message"):
        llama2["slow"].apply_chat_template([], chat_template="{{ messages }}")


def test_bad_tokenizer_config(llama2_tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer.model"):
        (tmp_path / name).write_bytes((llama2_tokenizer_dir / name).read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path)
    config = {"bos_token": "<s>", "chat_template": "{{ bos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(CHAT, tokenize=False) == "<s>"


def test_display_tokens_show_the_text_each_id_stands_for(default_gguf, llama2_tokenizer_dir):
    byte_level = AutoTokenizer.from_pretrained(default_gguf)
    ids = byte_level.encode("Plants’ grow<|im_end|>")
    shown = byte_level.display_tokens(ids)
    assert shown == [byte_level.decode([i]) for i in ids]
    assert "".join(shown) == byte_level.decode(ids) and " grow" in shown
    sentencepiece = AutoTokenizer.from_pretrained(llama2_tokenizer_dir)
    ids = sentencepiece.encode("Banana split\n")
    assert sentencepiece.display_tokens(ids) == ["<s>", " Ban", "ana", " split", "\n"]
    assert sentencepiece.convert_ids_to_tokens(ids)[1] == "▁Ban"
    slow = LlamaTokenizer.from_pretrained(llama2_tokenizer_dir)
    ids = slow.encode("  two\tx")  # pieces "▁▁" "▁two" "<0x09>" "x": every space shown, bytes decoded
    assert slow.display_tokens(ids) == ["<s>", "  ", " two", "\t", "x"]
    assert "".join(slow.display_tokens(ids[1:])) == " " + "  two\tx"  # the dummy prefix, then the text

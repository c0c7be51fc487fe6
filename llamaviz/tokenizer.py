"""Tokenizers: LlamaTokenizer (SentencePiece), LlamaTokenizerFast (tokenizers), and GGUF vocabularies.

`AutoTokenizer.from_pretrained(path)` picks one: a Hugging Face folder's tokenizer.json (fast) or
tokenizer.model (SentencePiece), or the vocabulary inside a .gguf file ("gpt2" byte-level BPE ->
LlamaTokenizerFast, "llama" SentencePiece -> LlamaTokenizer). Batches are left-padded by default
(llamaviz is decoder-only); pass padding_side="right" to change it. The code lives in
llamaviz/tokenizers/.
"""

from llamaviz.tokenizers import AutoTokenizer, BatchEncoding, LlamaTokenizer, LlamaTokenizerFast, TokenizerBase

__all__ = ["AutoTokenizer", "BatchEncoding", "LlamaTokenizer", "LlamaTokenizerFast", "TokenizerBase"]

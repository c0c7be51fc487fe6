"""Tokenizers: LlamaTokenizer (SentencePiece), LlamaTokenizerFast (tokenizers), and GGUF vocabularies.

`AutoTokenizer.from_pretrained(path)` picks one: a Hugging Face folder's tokenizer.json (fast) or
tokenizer.model (SentencePiece), or the vocabulary inside a .gguf file ("gpt2" byte-level BPE ->
LlamaTokenizerFast, "llama" SentencePiece -> LlamaTokenizer). Batches are left-padded by default
(llamaviz is decoder-only); pass padding_side="right" to change it.

May import: llamaviz.llama, llamaviz.distributed, llamaviz.checkpoints (the GGUF header reader).
Inside: special, encoding, chat <- base <- llama_fast, llama_sentencepiece <- loading (which
registers itself as base's from_pretrained, so base never imports it).
"""

from llamaviz.tokenizers.base import BatchEncoding, TokenizerBase
from llamaviz.tokenizers.llama_fast import LlamaTokenizerFast
from llamaviz.tokenizers.llama_sentencepiece import LlamaTokenizer
from llamaviz.tokenizers.loading import AutoTokenizer

__all__ = ["AutoTokenizer", "BatchEncoding", "LlamaTokenizer", "LlamaTokenizerFast", "TokenizerBase"]

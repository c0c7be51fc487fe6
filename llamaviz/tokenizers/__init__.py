"""llamaviz tokenizers; import them from llamaviz.tokenizer (or llamaviz)."""

from llamaviz.tokenizers.base import BatchEncoding, TokenizerBase
from llamaviz.tokenizers.llama_fast import LlamaTokenizerFast
from llamaviz.tokenizers.llama_sentencepiece import LlamaTokenizer
from llamaviz.tokenizers.loading import AutoTokenizer

__all__ = ["AutoTokenizer", "BatchEncoding", "LlamaTokenizer", "LlamaTokenizerFast", "TokenizerBase"]

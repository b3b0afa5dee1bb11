"""Corpus, tokenizer and batches: everything between text files on disk and (x, y) tensors.

The training loop calls ``prepare_data`` once, then draws training samples from a
``TrainBatcher`` by sample index and evaluates with ``iter_eval_batches``.
"""

from lmlab.data.batches import TrainBatcher, iter_eval_batches
from lmlab.data.tokenize import (
    BPETokenizer,
    ByteTokenizer,
    DataBundle,
    SplitStats,
    Tokenizer,
    build_tokenizer,
    count_words,
    prepare_data,
    tokenize_split,
)
from lmlab.data.wikitext import SPLITS, WIKITEXT2_SHA256, Corpus, cache_dir, locate_corpus

__all__ = [
    "SPLITS",
    "WIKITEXT2_SHA256",
    "BPETokenizer",
    "ByteTokenizer",
    "Corpus",
    "DataBundle",
    "SplitStats",
    "Tokenizer",
    "TrainBatcher",
    "build_tokenizer",
    "cache_dir",
    "count_words",
    "iter_eval_batches",
    "locate_corpus",
    "prepare_data",
    "tokenize_split",
]

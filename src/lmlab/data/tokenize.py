"""Tokenizers and the cached token arrays a run trains and evaluates on.

Three tokenizers, all byte-level so that ``decode(encode(text)) == text`` for any text:

- ``bpe``: byte-level BPE trained with HF ``tokenizers`` on the corpus's *train* split only (the
  evaluation splits must not shape the vocabulary), cached per (corpus, settings);
- ``gpt2``: OpenAI's GPT-2 BPE, 50,257 tokens, from ``encoder.json`` + ``vocab.bpe``;
- ``byte``: the UTF-8 bytes, 256 tokens.

A split is encoded once into a flat ``.bin`` of token ids (nanoGPT's format) keyed by the corpus
and tokenizer hashes; later runs memory-map it. Its ``SplitStats`` (tokens, bytes, words) turn a
summed NLL into bits per byte and word-level perplexity, which compare across tokenizers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmlab.config import (
    BYTE_VOCAB_SIZE,
    GPT2_VOCAB_SIZE,
    DataConfig,
    TokenizerConfig,
    expand_path,
)
from lmlab.data.wikitext import (
    SPLITS,
    Corpus,
    DownloadError,
    atomic_write,
    cache_dir,
    copy_into,
    hub_download,
    locate_corpus,
)
from lmlab.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

# Bump when the BPE recipe below changes, so cached vocabularies trained the old way are not reused.
BPE_RECIPE_VERSION = 1

GPT2_DIR = "gpt2-tokenizer"
GPT2_HF_REPO = "openai-community/gpt2"
# Each pair holds the same content under OpenAI's names and the hub's names.
GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
GPT2_HELLO_WORLD = [15496, 995]  # "Hello world" under the real GPT-2 tokenizer

# Chunks of text handed to encode_batch at once: big enough to keep the Rust side busy, small
# enough for a smooth progress bar.
ENCODE_BATCH = 2048
# Whitespace to Python and to the pre-tokenizer's regex alike (Unicode may differ at the edges).
ASCII_WHITESPACE = " \t\n\r\x0b\x0c"


# --------------------------------------------------------------------------------------------
# tokenizers


class Tokenizer(ABC):
    """Text <-> token ids. ``hash`` identifies the vocabulary and settings, so any two
    tokenizers with the same hash turn every text into the same ids."""

    kind: str
    vocab_size: int
    hash: str

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_stream(self, text: str, progress_label: str | None = None) -> np.ndarray:
        """``encode(text)`` as an int64 array, computed in parallel on independent pieces."""
        pieces = stream_pieces(text)
        out: list[np.ndarray] = []
        with _progress(progress_label, total=len(pieces)) as advance:
            for i in range(0, len(pieces), ENCODE_BATCH):
                batch = pieces[i:i + ENCODE_BATCH]
                out.extend(np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(batch))
                advance(len(batch))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class ByteTokenizer(Tokenizer):
    kind = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    hash = "byte-utf8"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # A window can cut a multi-byte character; show it as U+FFFD rather than fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_stream(self, text: str, progress_label: str | None = None) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


class BPETokenizer(Tokenizer):
    """A byte-level BPE held by HF ``tokenizers`` (trained ``bpe`` or ``gpt2``)."""

    def __init__(self, kind: str, tk: HFTokenizer) -> None:
        self.kind = kind
        self.tk = tk
        self.vocab_size = tk.get_vocab_size()
        self.hash = hashlib.sha256(tk.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)


def _byte_level(model: models.BPE) -> HFTokenizer:
    """GPT-2's pipeline around a BPE model: bytes mapped to printable characters, split with
    GPT-2's regex, no prefix space (so nothing is added to the text), decoded back to bytes."""
    tk = HFTokenizer(model)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return tk


def build_tokenizer(cfg: TokenizerConfig, corpus: Corpus, base: Path | None = None) -> Tokenizer:
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "gpt2":
        return load_gpt2(cfg, base)
    return load_or_train_bpe(corpus, cfg.vocab_size)


# -- trained BPE ------------------------------------------------------------------------------


def bpe_settings_hash(vocab_size: int) -> str:
    settings = {"kind": "bpe", "vocab_size": vocab_size, "recipe": BPE_RECIPE_VERSION}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def bpe_cache_path(corpus: Corpus, vocab_size: int) -> Path:
    return cache_dir() / "tokenizers" / f"{corpus.hash}-{bpe_settings_hash(vocab_size)}.json"


def load_or_train_bpe(corpus: Corpus, vocab_size: int) -> BPETokenizer:
    path = bpe_cache_path(corpus, vocab_size)
    if path.is_file():
        return BPETokenizer("bpe", HFTokenizer.from_file(str(path)))
    tk = train_bpe(corpus.read("train"), vocab_size)
    # Concurrent runs may both train; training is deterministic, so either file is the same.
    with atomic_write(path) as tmp:
        tk.save(str(tmp))
    return BPETokenizer("bpe", tk)


def train_bpe(text: str, vocab_size: int) -> HFTokenizer:
    """A byte-level BPE of ``vocab_size`` tokens learned from ``text``.

    The initial alphabet is all 256 byte symbols, so any text is encodable without an unknown
    token. Training sees the same pieces that ``encode_stream`` later encodes. HF's trainer breaks
    ties between equally frequent pairs by the pair itself, so the result does not depend on
    thread scheduling: the same text and settings give the same vocabulary (tested).
    """
    tk = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    pieces = stream_pieces(text)
    with _status(f"training a {vocab_size}-token BPE on {len(text) / 1e6:.1f} MB",
                 show=len(text) > 2_000_000):
        tk.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return tk


# -- GPT-2 ------------------------------------------------------------------------------------


def _gpt2_files(folder: Path) -> tuple[Path, Path] | None:
    for vocab, merges in GPT2_FILE_PAIRS:
        if (folder / vocab).is_file() and (folder / merges).is_file():
            return folder / vocab, folder / merges
    return None


def _gpt2_from_files(vocab: Path, merges: Path) -> BPETokenizer | None:
    """The tokenizer, or None if the files do not behave like GPT-2's."""
    try:
        tok = BPETokenizer("gpt2", _byte_level(models.BPE.from_file(str(vocab), str(merges))))
        if tok.vocab_size == GPT2_VOCAB_SIZE and tok.encode("Hello world") == GPT2_HELLO_WORLD:
            return tok
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        # Unreadable files raise; merges that build tokens missing from the vocabulary make
        # the Rust side panic, which surfaces as a BaseException. Either way: not GPT-2's.
        pass
    return None


def load_gpt2(cfg: TokenizerConfig, base: Path | None = None) -> BPETokenizer:
    """GPT-2's tokenizer from ``tokenizer.path`` (only there, if given), else
    ``$LMLAB_DATA_DIR/gpt2-tokenizer/``, the cache, or the hub (``openai-community/gpt2``)."""
    if cfg.path:
        folders = [expand_path(cfg.path, base)]
    else:
        folders = [cache_dir() / GPT2_DIR]
        if data_dir := os.environ.get("LMLAB_DATA_DIR"):
            folders.insert(0, Path(data_dir).expanduser() / GPT2_DIR)
    for folder in folders:
        if files := _gpt2_files(folder):
            tok = _gpt2_from_files(*files)
            if tok is None:
                raise UserError(
                    f"{files[0]} + {files[1]} do not give GPT-2's tokenizer "
                    f"({GPT2_VOCAB_SIZE} tokens, 'Hello world' -> {GPT2_HELLO_WORLD})",
                    field="tokenizer.path" if cfg.path else "tokenizer",
                )
            return tok

    how = (f"put encoder.json + vocab.bpe (or the hub's vocab.json + merges.txt) in "
           f"{' or '.join(str(f) for f in folders)}")
    if cfg.path:
        raise UserError(f"no GPT-2 tokenizer files found: {how}", field="tokenizer.path")
    try:
        return _download_gpt2(cache_dir() / GPT2_DIR)
    except DownloadError as e:
        raise UserError(f"no GPT-2 tokenizer files found and the download from {GPT2_HF_REPO} "
                        f"failed ({e}); {how}, or allow network access to the Hugging Face hub",
                        field="tokenizer") from None


def _download_gpt2(target: Path) -> BPETokenizer:
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as scratch:
        vocab = hub_download(GPT2_HF_REPO, "vocab.json", repo_type=None, cache=Path(scratch))
        merges = hub_download(GPT2_HF_REPO, "merges.txt", repo_type=None, cache=Path(scratch))
        tok = _gpt2_from_files(vocab, merges)
        if tok is None:
            raise DownloadError(f"the files from {GPT2_HF_REPO} do not give GPT-2's tokenizer")
        copy_into(vocab, target / "encoder.json")
        copy_into(merges, target / "vocab.bpe")
    return tok


# --------------------------------------------------------------------------------------------
# encoding a split as one stream


def stream_pieces(text: str) -> list[str]:
    """Cut ``text`` at line starts where GPT-2's pre-tokenizer always has a boundary, so that
    encoding the pieces separately and concatenating gives exactly ``encode(text)``.

    The pre-tokenizer regex is ``'s|'t|...| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
    Only the whitespace rule looks past a match, so the pieces agree with the whole text exactly
    when the whitespace run around the cut is matched the same way with or without the text after
    it. That holds at a line start p (text[p-1] is "\\n") when either
      - text[p] is ASCII whitespace and text[p+1] is not whitespace: the whole text splits the
        run before p (a last blank joins the next word, another character stands alone), and
        the left piece ends in a run that ``\\s+(?!\\S)`` takes whole either way; or
      - text[p] is not whitespace and text[p-2] is not whitespace: the run is the lone "\\n".
    A plain split into lines is not exact: " .\\n \\n = Title" is one pre-token " \\n \\n" as a
    stream but two, " \\n" and " \\n", line by line. WikiText lines start with " " and a word, so
    nearly every line is its own piece; the test suite checks the equality on real text.
    """
    pieces: list[str] = []
    start, n = 0, len(text)
    p = text.find("\n") + 1
    while 0 < p < n:
        c = text[p]
        if c in ASCII_WHITESPACE:
            safe = p + 1 < n and not text[p + 1].isspace()
        else:
            safe = not c.isspace() and (p < 2 or not text[p - 2].isspace())
        if safe:
            pieces.append(text[start:p])
            start = p
        p = text.find("\n", p) + 1
    pieces.append(text[start:])
    return [piece for piece in pieces if piece]


@dataclass
class SplitStats:
    """Sizes of one split: divide its summed NLL by these for per-token loss, bits per byte
    (``nll / ln 2 / n_bytes``) and word-level perplexity (``exp(nll / n_words)``)."""

    n_tokens: int
    n_bytes: int
    n_words: int


# A line that opens an article: " = Title = " (subsections are " = = Title = = ").
def _is_article_heading(line: str) -> bool:
    stripped = line.replace("= = =", "===").replace("= =", "==").strip()
    return stripped.startswith("= ") and stripped.endswith(" =")


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness's ``wikitext`` task counts them, for comparable word
    perplexities: the text is cut into articles at ``" = Title = "`` lines the way its
    ``wikitext_document_level`` dataset builds pages (lines split on "\\n", re-joined per page, a
    whitespace-only leading page dropped) and each page counts ``len(re.split(r"\\s+", page))``.
    That includes the empty strings at a page's edges (about 2 per article), as the harness
    does: 241,335 on the WikiText-2 test split, where ``len(text.split())`` gives 241,211. A text
    without headings is one page.
    """
    total = 0
    page: list[str] = []
    for line in text.split("\n"):
        if _is_article_heading(line):
            joined = "\n".join(page)
            if joined.strip():
                total += len(re.split(r"\s+", joined))
            page = []
        page.append(line)
    return total + len(re.split(r"\s+", "\n".join(page)))


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def tokens_dir(corpus: Corpus, tok: Tokenizer) -> Path:
    return cache_dir() / "tokens" / f"{corpus.hash}-{tok.hash}"


def tokenize_split(corpus: Corpus, split: str, tok: Tokenizer) -> tuple[np.ndarray, SplitStats]:
    """The whole split as one token stream, memory-mapped from the cache (encoded on a miss)."""
    folder = tokens_dir(corpus, tok)
    bin_path, meta_path = folder / f"{split}.bin", folder / f"{split}.json"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        stats = SplitStats(**meta["stats"])
        dtype = np.dtype(meta["dtype"])
        if bin_path.stat().st_size == stats.n_tokens * dtype.itemsize:
            return _open_tokens(bin_path, dtype, stats.n_tokens), stats
        # Wrong size: a file damaged outside our atomic writes. Encode again and replace it.

    text = corpus.read(split)
    ids = tok.encode_stream(text, progress_label=f"tokenizing {corpus.name} {split}")
    stats = SplitStats(n_tokens=len(ids), n_bytes=len(text.encode("utf-8")),
                       n_words=count_words(text))
    dtype = token_dtype(tok.vocab_size)
    # The .bin first, then the .json that vouches for it: a reader never sees a json whose
    # .bin is incomplete, and runs tokenizing concurrently write identical files.
    with atomic_write(bin_path) as tmp:
        ids.astype(dtype).tofile(tmp)
    meta = {"stats": asdict(stats), "dtype": dtype.name, "tokenizer": tok.kind,
            "corpus": corpus.name, "split": split}
    with atomic_write(meta_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    return _open_tokens(bin_path, dtype, stats.n_tokens), stats


def _open_tokens(path: Path, dtype: np.dtype, n_tokens: int) -> np.ndarray:
    # Memory-mapped: a warm start reads nothing up front, and parallel runs share the pages.
    if n_tokens == 0:  # mmap refuses empty files
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


# --------------------------------------------------------------------------------------------
# the entry point


@dataclass
class DataBundle:
    corpus: Corpus
    tokenizer: Tokenizer
    splits: dict[str, np.ndarray]  # "train" / "valid" / "test" -> token ids (memmap)
    stats: dict[str, SplitStats]


def prepare_data(data_cfg: DataConfig, tok_cfg: TokenizerConfig,
                 base: Path | None = None) -> DataBundle:
    """Locate and verify the corpus, build the tokenizer, and load (or make) the token arrays."""
    corpus = locate_corpus(data_cfg, base)
    tok = build_tokenizer(tok_cfg, corpus, base)
    splits: dict[str, np.ndarray] = {}
    stats: dict[str, SplitStats] = {}
    for split in SPLITS:
        splits[split], stats[split] = tokenize_split(corpus, split, tok)
    return DataBundle(corpus=corpus, tokenizer=tok, splits=splits, stats=stats)


# --------------------------------------------------------------------------------------------
# progress on stderr, only where a person is watching


def _stderr_console() -> Console | None:
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else None


@contextmanager
def _progress(label: str | None, total: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a bar for big jobs on a terminal, does nothing otherwise."""
    console = _stderr_console() if label and total > 4 * ENCODE_BATCH else None
    if console is None:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def _status(message: str, show: bool) -> Iterator[None]:
    """A spinner while HF's trainer runs (it reports no progress we could draw)."""
    console = _stderr_console() if show else None
    if console is None:
        yield
        return
    with console.status(message):
        yield
    console.print(f"{message}: done")

"""Corpus location, tokenizers, the token cache, split statistics and batch order.

Everything runs on the WikiText-2 test-articles corpus in $LMLAB_DATA_DIR (a 1.1 MB train split),
with a small BPE vocabulary to keep training quick.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.config import DataConfig, TokenizerConfig
from lmlab.data import (
    WIKITEXT2_SHA256,
    Corpus,
    SplitStats,
    Tokenizer,
    TrainBatcher,
    build_tokenizer,
    count_words,
    iter_eval_batches,
    locate_corpus,
    prepare_data,
    tokenize_split,
)
from lmlab.data.tokenize import stream_pieces, token_dtype, train_bpe
from lmlab.errors import UserError

BPE_VOCAB = 512
# Text the tokenizers must survive: non-ASCII, tabs, runs of blank lines, CRLF, no final newline.
TRICKY = "naïve café — 東京 🙂 x² 'tis\n\n\n  two  spaces\n\tTab\r\nCRLF\n \n = H = \nend"


@pytest.fixture(scope="module")
def corpus(data_dir: Path) -> Corpus:
    return locate_corpus(DataConfig(dataset="local", name="wikitext-2-test-articles",
                                    path=str(data_dir / "wikitext-2-test-articles")))


@pytest.fixture(scope="module")
def tokenizers(corpus: Corpus) -> dict[str, Tokenizer]:
    return {kind: build_tokenizer(TokenizerConfig(kind=kind, vocab_size=BPE_VOCAB), corpus)
            for kind in ("bpe", "gpt2", "byte")}


# --------------------------------------------------------------------------------------------
# corpus


def test_local_corpus_is_labelled_as_itself(corpus: Corpus, data_dir: Path) -> None:
    folder = data_dir / "wikitext-2-test-articles"
    assert corpus.name == "wikitext-2-test-articles"
    assert not corpus.is_wikitext2
    assert corpus.files == {s: folder / f"{s}.txt" for s in ("train", "valid", "test")}
    for split, path in corpus.files.items():
        assert corpus.sha256[split] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(corpus.hash) == 16
    # The default name is the folder's; a relative path is taken from `base`.
    unnamed = locate_corpus(DataConfig(dataset="local", path="wikitext-2-test-articles"),
                            base=data_dir)
    assert unnamed.name == "wikitext-2-test-articles" and unnamed.hash == corpus.hash


def test_local_corpus_accepts_raw_names_and_hash_follows_content(tmp_path: Path,
                                                                 corpus: Corpus) -> None:
    for split, path in corpus.files.items():
        shutil.copy(path, tmp_path / f"wiki.{split}.raw")
    same = locate_corpus(DataConfig(dataset="local", path=str(tmp_path), name="copy"))
    assert same.name == "copy" and same.hash == corpus.hash
    (tmp_path / "wiki.valid.raw").write_text("other text\n")
    assert locate_corpus(DataConfig(dataset="local", path=str(tmp_path))).hash != corpus.hash


def test_local_corpus_missing_parts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist") as err:
        locate_corpus(DataConfig(dataset="local", path=str(tmp_path / "nowhere")))
    assert err.value.field == "data.path"
    (tmp_path / "train.txt").write_text("a\n")
    (tmp_path / "test.txt").write_text("b\n")
    with pytest.raises(UserError, match=r"no valid split: expected valid\.txt or wiki\.valid\.raw"):
        locate_corpus(DataConfig(dataset="local", path=str(tmp_path)))


def test_wikitext2_search_order_and_verification(tmp_path: Path, data_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The test split comes from $LMLAB_DATA_DIR (the real file, really verified) even though the
    cache holds a different one; train/valid (not on this machine) come from the cache."""
    cache = tmp_path / "cache" / "wikitext-2-raw-v1"
    cache.mkdir(parents=True)
    (cache / "wiki.test.raw").write_text("never read: the data dir comes first\n")
    for split in ("train", "valid"):
        content = f"stand-in for {split}\n".encode()
        (cache / f"wiki.{split}.raw").write_bytes(content)
        monkeypatch.setitem(WIKITEXT2_SHA256, split, hashlib.sha256(content).hexdigest())
    monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LMLAB_DATA_DIR", str(data_dir))

    found = locate_corpus(DataConfig())
    assert found.is_wikitext2 and found.name == "wikitext-2-raw-v1"
    assert found.files["test"] == data_dir / "wikitext-2-raw-v1" / "wiki.test.raw"
    assert found.files["train"] == cache / "wiki.train.raw"
    assert found.sha256["test"] == hashlib.sha256(found.files["test"].read_bytes()).hexdigest()

    # A found file that is not the expected one is an error, not silently used or skipped.
    (cache / "wiki.valid.raw").write_text("tampered\n")
    with pytest.raises(UserError, match="is not WikiText-2's valid split") as err:
        locate_corpus(DataConfig())
    assert WIKITEXT2_SHA256["valid"] in str(err.value)


def test_wikitext2_explicit_folder_missing_train(data_dir: Path) -> None:
    # Only the test split exists on this machine: a clear error, no download attempt.
    with pytest.raises(UserError) as err:
        locate_corpus(DataConfig(path=str(data_dir / "wikitext-2-raw-v1")))
    message = str(err.value)
    assert "train, valid not found" in message
    assert WIKITEXT2_SHA256["train"] in message and "Salesforce/wikitext" in message
    assert "drop data.path" in message and err.value.field == "data.path"


# --------------------------------------------------------------------------------------------
# tokenizers


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "byte"])
def test_round_trip(kind: str, tokenizers: dict[str, Tokenizer], corpus: Corpus) -> None:
    tok = tokenizers[kind]
    for text in (corpus.read("valid"), TRICKY, ""):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert [tok.decode(ids) for ids in tok.encode_batch(["a b", TRICKY])] == ["a b", TRICKY]


def test_vocab_sizes_and_gpt2_ids(tokenizers: dict[str, Tokenizer]) -> None:
    assert tokenizers["bpe"].vocab_size == BPE_VOCAB
    assert tokenizers["byte"].vocab_size == 256
    gpt2 = tokenizers["gpt2"]
    assert gpt2.vocab_size == 50257
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("The\n the ") == [464, 198, 262, 220]
    assert len({t.hash for t in tokenizers.values()}) == 3


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_stream_encoding_equals_whole_text(kind: str, tokenizers: dict[str, Tokenizer],
                                           corpus: Corpus) -> None:
    """Encoding piece by piece (for speed) gives exactly the ids of the text as one string."""
    tok = tokenizers[kind]
    for text in (corpus.read("test"), TRICKY, TRICKY + "\n" + TRICKY):
        pieces = stream_pieces(text)
        assert "".join(pieces) == text
        assert tok.encode_stream(text).tolist() == tok.encode(text)
    # Random text dense in the awkward cases: whitespace runs of every kind around line starts.
    rng = np.random.default_rng(0)
    atoms = [" ", "\n", "\n", " \n", "\t", "\r\n", "\u00a0", "\u3000", "a", "Bc", ".", "'s", "7", "é"]
    for _ in range(20):
        text = "".join(rng.choice(atoms, size=400))
        assert tok.encode_stream(text).tolist() == tok.encode(text)
    # It does cut WikiText: a piece per non-blank line (blank lines join the one before), plus
    # the file's leading blank line.
    test_text = corpus.read("test")
    non_blank = sum(1 for line in test_text.split("\n") if line.strip())
    assert len(stream_pieces(test_text)) == non_blank + 1
    # A naive line split would not be exact here: " \n \n" is one pre-token in the stream.
    assert len(stream_pieces("a .\n \n = T\n")) == 2


def test_bpe_is_deterministic_and_trained_on_train_only(tokenizers: dict[str, Tokenizer],
                                                        corpus: Corpus, tmp_path: Path) -> None:
    train = corpus.read("train")
    first, second = train_bpe(train, BPE_VOCAB), train_bpe(train, BPE_VOCAB)
    assert first.to_str() == second.to_str()
    # The cached tokenizer the suite uses is that same vocabulary.
    assert first.to_str() == tokenizers["bpe"].tk.to_str()  # type: ignore[attr-defined]

    # Other valid/test text (a different corpus hash, so no cache hit) trains the same BPE.
    shutil.copy(corpus.files["train"], tmp_path / "train.txt")
    (tmp_path / "valid.txt").write_text("zebra zebra zebra\n")
    (tmp_path / "test.txt").write_text("quokka quokka\n")
    other = locate_corpus(DataConfig(dataset="local", path=str(tmp_path)))
    assert other.hash != corpus.hash
    retrained = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=BPE_VOCAB), other)
    assert retrained.hash == tokenizers["bpe"].hash


def test_bpe_warm_start_loads_the_cached_vocabulary(tokenizers: dict[str, Tokenizer],
                                                    corpus: Corpus,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object) -> None:
        raise AssertionError("a cached BPE must not be trained again")

    monkeypatch.setattr("lmlab.data.tokenize.train_bpe", no_training)
    loaded = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=BPE_VOCAB), corpus)
    assert loaded.hash == tokenizers["bpe"].hash
    assert loaded.encode(TRICKY) == tokenizers["bpe"].encode(TRICKY)
    with pytest.raises(AssertionError, match="must not be trained"):  # other settings: a miss
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=BPE_VOCAB + 1), corpus)


def test_gpt2_path_must_hold_the_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"encoder\.json") as err:
        build_tokenizer(TokenizerConfig(kind="gpt2", path=str(tmp_path)),
                        corpus=None)  # type: ignore[arg-type]  # gpt2 does not look at it
    assert err.value.field == "tokenizer.path"


# --------------------------------------------------------------------------------------------
# token cache and statistics


def test_token_cache_warm_start(tokenizers: dict[str, Tokenizer], corpus: Corpus,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    tok = tokenizers["bpe"]
    cold_map, cold_stats = tokenize_split(corpus, "valid", tok)
    assert cold_map.dtype == np.uint16 and cold_stats.n_tokens == len(cold_map)
    assert tok.decode(cold_map) == corpus.read("valid")
    cold = np.array(cold_map)  # a copy: the memmap would see the damage done below

    def no_encoding(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("a warm start must not encode again")

    monkeypatch.setattr(tok, "encode_stream", no_encoding)
    warm, warm_stats = tokenize_split(corpus, "valid", tok)
    assert isinstance(warm, np.memmap)
    assert np.array_equal(warm, cold) and warm_stats == cold_stats

    # A damaged .bin (wrong size) is noticed and rebuilt rather than trusted.
    monkeypatch.undo()
    bin_path = Path(warm.filename)
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    rebuilt, _ = tokenize_split(corpus, "valid", tok)
    assert np.array_equal(rebuilt, cold)


def test_split_stats(tokenizers: dict[str, Tokenizer], corpus: Corpus, data_dir: Path) -> None:
    _, stats = tokenize_split(corpus, "train", tokenizers["byte"])
    # README: the train split is 1,115,444 bytes and 208,818 whitespace-separated words in 50
    # articles; the harness's count adds its 2 empty edge strings per article.
    assert stats == SplitStats(n_tokens=1_115_444, n_bytes=1_115_444, n_words=208_818 + 2 * 50)
    # The real WikiText-2 test split: 62 articles.
    raw = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    assert count_words(raw) == len(raw.split()) + 2 * 62 == 241_335
    assert count_words("no headings here\n") == 3 + 1  # one page: ["no", "headings", "here", ""]

    _, gpt2_stats = tokenize_split(corpus, "train", tokenizers["gpt2"])
    assert (gpt2_stats.n_bytes, gpt2_stats.n_words) == (stats.n_bytes, stats.n_words)
    assert 3 < stats.n_bytes / gpt2_stats.n_tokens < 6  # GPT-2: ~4.5 bytes per token on English
    assert token_dtype(50257) == np.uint16 and token_dtype(100_000) == np.uint32


def test_prepare_data(articles_data: dict) -> None:
    bundle = prepare_data(DataConfig(**articles_data), TokenizerConfig(kind="byte"))
    assert bundle.corpus.name == "wikitext-2-test-articles"
    assert set(bundle.splits) == set(bundle.stats) == {"train", "valid", "test"}
    assert bundle.stats["valid"].n_bytes == 49_421 == len(bundle.splits["valid"])


# --------------------------------------------------------------------------------------------
# batches


TOKENS = np.arange(10_001, dtype=np.uint16)  # distinct values: a window's tokens name its place


def test_train_batches_are_deterministic_windows() -> None:
    a, b = TrainBatcher(TOKENS, seed=1, max_seq_len=64), TrainBatcher(TOKENS, seed=1, max_seq_len=64)
    x, y = a.batch(10, 8, 64)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 64)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x, b.batch(10, 8, 64)[0])
    # Every sample is a window of the fixed grid: starts at a multiple of max_seq_len.
    assert (x[:, 0] % 64 == 0).all() and torch.equal(y, x + 1)
    other = TrainBatcher(TOKENS, seed=2, max_seq_len=64)
    assert not torch.equal(x, other.batch(10, 8, 64)[0])


def test_micro_batches_equal_one_batch_and_resume() -> None:
    batcher = TrainBatcher(TOKENS, seed=0, max_seq_len=32)
    full_x, full_y = batcher.batch(100, 16, 32)
    parts = [batcher.batch(100 + 4 * i, 4, 32) for i in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
    assert torch.equal(torch.cat([p[1] for p in parts]), full_y)
    # A fresh batcher (a resumed run) given only the sample counter continues identically.
    resumed = TrainBatcher(TOKENS, seed=0, max_seq_len=32)
    assert torch.equal(resumed.batch(108, 8, 32)[0], full_x[8:])


def test_epochs_cover_every_window_once() -> None:
    batcher = TrainBatcher(TOKENS, seed=3, max_seq_len=100)
    n = batcher.n_windows
    assert n == 100 and batcher.tokens_per_epoch == 10_000
    epoch0, epoch1 = batcher.window_starts(0, n), batcher.window_starts(n, n)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(0, 10_000, 100))
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    # A batch straddling the epoch boundary is the end of one epoch and the start of the next.
    assert batcher.window_starts(n - 3, 6).tolist() == epoch0[-3:].tolist() + epoch1[:3].tolist()


def test_seq_len_warmup_reads_prefixes_of_the_same_windows() -> None:
    batcher = TrainBatcher(TOKENS, seed=0, max_seq_len=128)
    long_x, long_y = batcher.batch(5, 4, 128)
    short_x, short_y = batcher.batch(5, 4, 16)
    assert torch.equal(short_x, long_x[:, :16]) and torch.equal(short_y, long_y[:, :16])
    with pytest.raises(ValueError):
        batcher.batch(0, 1, 129)


def test_train_split_too_short() -> None:
    with pytest.raises(UserError, match="too few") as err:
        TrainBatcher(TOKENS[:64], seed=0, max_seq_len=64)
    assert err.value.field == "train.seq_len"
    assert TrainBatcher(TOKENS[:65], seed=0, max_seq_len=64).n_windows == 1


@pytest.mark.parametrize("n_tokens", [1001, 1000, 7])
def test_eval_batches_predict_every_token_once(n_tokens: int) -> None:
    tokens = TOKENS[:n_tokens]
    batches = list(iter_eval_batches(tokens, seq_len=50, batch_size=4))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert len(ys) == n_tokens - 1
    # In order and exactly once: inputs are tokens[:-1], targets are tokens[1:].
    assert xs.tolist() == tokens[:-1].tolist() and ys.tolist() == tokens[1:].tolist()
    assert all(x.shape[0] <= 4 for x, _ in batches)
    if (n_tokens - 1) % 50:  # the remainder is a shorter window in a batch of its own
        assert batches[-1][0].shape == (1, (n_tokens - 1) % 50)
    assert len(list(iter_eval_batches(tokens, 50, 4, max_batches=2))) == min(2, len(batches))


def test_batches_from_a_cached_memmap(tokenizers: dict[str, Tokenizer], corpus: Corpus) -> None:
    tokens, stats = tokenize_split(corpus, "test", tokenizers["bpe"])
    x, y = TrainBatcher(tokens, seed=0, max_seq_len=256).batch(0, 2, 256)
    assert x.shape == y.shape == (2, 256) and int(x.max()) < BPE_VOCAB
    predicted = sum(y.numel() for _, y in iter_eval_batches(tokens, 256, 8))
    assert predicted == stats.n_tokens - 1

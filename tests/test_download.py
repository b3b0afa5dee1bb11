"""Downloads from a local stand-in for the Hugging Face hub: WikiText-2 parquet -> raw file with
the real test-split checksum, refused corrupt downloads, clear errors offline, GPT-2's files."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hubserver import HubServer
from lmlab.config import DataConfig, TokenizerConfig
from lmlab.data.tokenize import GPT2_HELLO_WORLD, load_gpt2
from lmlab.data.wikitext import HF_FILES, HF_REPO, WIKITEXT2_SHA256, locate_corpus
from lmlab.errors import UserError


def hub_rows(raw: str) -> list[str]:
    """What the hub's builder made of a raw file: one row per line ("\\n" kept), with
    whitespace-only lines as "". Lines end at "\\n" only, as when it iterated the open file."""
    lines = [line + "\n" for line in raw.split("\n")[:-1]]
    return [line if line.strip() else "" for line in lines]


def to_parquet(raw: str) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": hub_rows(raw)}), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_test_raw(data_dir: Path) -> bytes:
    raw = (data_dir / "wikitext-2-raw-v1" / "wiki.test.raw").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == WIKITEXT2_SHA256["test"]
    return raw


@pytest.fixture
def fake_splits(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Small stand-ins for train/valid (the real ones are not on this machine), in WikiText's
    raw format, with the expected checksums patched to theirs. The test split stays real."""
    articles = (data_dir / "wikitext-2-test-articles" / "valid.txt").read_text(encoding="utf-8")
    lines = articles.split("\n")
    fakes = {"train": "\n".join(lines[:120]) + "\n", "valid": "\n".join(lines[120:])}
    assert all(text.endswith(" \n") for text in fakes.values())
    out = {split: text.encode() for split, text in fakes.items()}
    for split, data in out.items():
        monkeypatch.setitem(WIKITEXT2_SHA256, split, hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The stand-in hub at HF_ENDPOINT, an empty $LMLAB_DATA_DIR and a fresh cache."""
    with HubServer() as server:
        # lmlab reads HF_ENDPOINT at call time (huggingface_hub only reads it at import).
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        # Telemetry would look up an agent registry on the real hub; keep the test hermetic.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setenv("LMLAB_DATA_DIR", str(tmp_path / "data"))
        monkeypatch.setenv("LMLAB_CACHE_DIR", str(tmp_path / "cache"))
        yield server


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_download_rebuilds_exact_files(hub: HubServer, real_test_raw: bytes,
                                       fake_splits: dict[str, bytes], tmp_path: Path) -> None:
    hub.add(HF_REPO, HF_FILES["test"], to_parquet(real_test_raw.decode()), repo_type="dataset")
    for split, data in fake_splits.items():
        hub.add(HF_REPO, HF_FILES[split], to_parquet(data.decode()), repo_type="dataset")

    corpus = locate_corpus(DataConfig())

    cached = tmp_path / "cache" / "wikitext-2-raw-v1"
    assert corpus.is_wikitext2 and corpus.name == "wikitext-2-raw-v1"
    assert corpus.files == {s: cached / f"wiki.{s}.raw" for s in ("train", "valid", "test")}
    # The real test split comes back byte for byte: its published sha256, verified for real.
    assert corpus.files["test"].read_bytes() == real_test_raw
    assert hashlib.sha256(corpus.files["test"].read_bytes()).hexdigest() == (
        "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08")
    assert corpus.files["train"].read_bytes() == fake_splits["train"]
    # Only the verified raw files stay: no parquet, no scratch folders, no temporaries.
    assert files_under(cached) == ["wiki.test.raw", "wiki.train.raw", "wiki.valid.raw"]

    # A second run finds them in the cache and does not touch the network.
    n_requests = len(hub.requests)
    again = locate_corpus(DataConfig())
    assert again.files == corpus.files and again.hash == corpus.hash
    assert len(hub.requests) == n_requests


@pytest.mark.parametrize("served", ["altered", "garbage"])
def test_bad_download_is_refused_and_not_cached(served: str, hub: HubServer,
                                                real_test_raw: bytes,
                                                fake_splits: dict[str, bytes],
                                                tmp_path: Path) -> None:
    # train/valid are already supplied; only the test split is downloaded: with one word
    # changed, or not a parquet at all.
    data = tmp_path / "data" / "wikitext-2-raw-v1"
    data.mkdir(parents=True)
    for split, content in fake_splits.items():
        (data / f"wiki.{split}.raw").write_bytes(content)
    altered = real_test_raw.decode().replace(" Boulter ", " Bolter ", 1)
    body = to_parquet(altered) if served == "altered" else b"PAR1 this is not parquet PAR1"
    hub.add(HF_REPO, HF_FILES["test"], body, repo_type="dataset")

    with pytest.raises(UserError) as err:
        locate_corpus(DataConfig())

    assert err.value.field == "data"
    message = str(err.value)
    assert WIKITEXT2_SHA256["test"] in message  # the instructions name the expected checksum
    if served == "altered":
        assert f"rebuilds to sha256 {hashlib.sha256(altered.encode()).hexdigest()}" in message
        assert "nothing was cached" in message
    else:
        assert "not a readable parquet" in message
    assert ("GET", f"/datasets/{HF_REPO}/resolve/main/{HF_FILES['test']}") in hub.requests
    # Nothing at all is left in the cache: no raw file, no parquet, no scratch folder.
    cache = tmp_path / "cache"
    assert [str(p.relative_to(cache)) for p in cache.rglob("*")] == ["wikitext-2-raw-v1"]


def test_no_files_and_nothing_to_download_explains_how_to_supply(
        hub: HubServer, tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        locate_corpus(DataConfig())  # the hub answers 404 for everything

    message = str(err.value)
    assert err.value.field == "data"
    for needle in ("train", "valid", "test", "LMLAB_DATA_DIR", "Salesforce/wikitext",
                   "wikitext-2-raw-v1", str(tmp_path / "data" / "wikitext-2-raw-v1"),
                   str(tmp_path / "cache" / "wikitext-2-raw-v1"), WIKITEXT2_SHA256["train"],
                   WIKITEXT2_SHA256["valid"], WIKITEXT2_SHA256["test"]):
        assert needle in message
    # It gives up after the first split that cannot be fetched, rather than retrying each.
    assert [m for m, _ in hub.requests] == ["HEAD"]


def test_offline_mode_fails_fast_without_requests(hub: HubServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="offline or no network"):
        locate_corpus(DataConfig())
    assert hub.requests == []


def test_explicit_path_never_downloads(hub: HubServer, real_test_raw: bytes,
                                       tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "wiki.test.raw").write_bytes(real_test_raw)
    hub.add(HF_REPO, HF_FILES["train"], b"unused", repo_type="dataset")
    with pytest.raises(UserError) as err:
        locate_corpus(DataConfig(path=str(folder)))
    assert err.value.field == "data.path"
    assert "train, valid" in str(err.value) and str(folder) in str(err.value)
    assert hub.requests == []


def test_gpt2_tokenizer_downloaded_and_cached(hub: HubServer, data_dir: Path,
                                              tmp_path: Path) -> None:
    # The hub's vocab.json/merges.txt hold what OpenAI shipped as encoder.json/vocab.bpe.
    src = data_dir / "gpt2-tokenizer"
    hub.add("openai-community/gpt2", "vocab.json", (src / "encoder.json").read_bytes())
    hub.add("openai-community/gpt2", "merges.txt", (src / "vocab.bpe").read_bytes())

    tok = load_gpt2(TokenizerConfig(kind="gpt2"))
    assert tok.encode("Hello world") == GPT2_HELLO_WORLD
    cached = tmp_path / "cache" / "gpt2-tokenizer"
    assert files_under(cached) == ["encoder.json", "vocab.bpe"]

    n_requests = len(hub.requests)
    assert load_gpt2(TokenizerConfig(kind="gpt2")).hash == tok.hash
    assert len(hub.requests) == n_requests


@pytest.mark.parametrize("vocab, merges", [
    ('{"a": 0, "b": 1, "ab": 2}', "#version: 0.2\na b\n"),  # a vocabulary, not GPT-2's
    ('{"a": 0, "b": 1}', "#version: 0.2\na b\n"),  # inconsistent: "ab" is not in it
    ("not json", ""),
])
def test_gpt2_bad_files_are_refused(tmp_path: Path, vocab: str, merges: str) -> None:
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "encoder.json").write_text(vocab)
    (folder / "vocab.bpe").write_text(merges)
    with pytest.raises(UserError, match="do not give GPT-2's tokenizer") as err:
        load_gpt2(TokenizerConfig(kind="gpt2", path=str(folder)))
    assert err.value.field == "tokenizer.path"

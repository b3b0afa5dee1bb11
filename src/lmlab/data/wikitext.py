"""Find the corpus on disk (or download it), and prove it is the corpus we think it is.

WikiText-2 raw v1 is identified by the sha256 of its three files, so a run labelled "WikiText-2"
really trained and evaluated on those bytes. Each split is looked for in order:

1. ``data.path`` when the config gives one (and then nowhere else);
2. ``$LMLAB_DATA_DIR/wikitext-2-raw-v1/``;
3. ``<cache>/wikitext-2-raw-v1/`` (``$LMLAB_CACHE_DIR``, default ``~/.cache/lmlab``);
4. the Hugging Face hub dataset ``Salesforce/wikitext``, whose parquet rows are turned back into
   the original file byte for byte and written to the cache only once the checksum matches.

A ``local`` corpus is a user's own folder of text files: hashed for provenance, never checked.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lmlab.config import DataConfig, expand_path
from lmlab.errors import UserError

SPLITS = ("train", "valid", "test")

WIKITEXT2 = "wikitext-2-raw-v1"
WIKITEXT2_FILES = {split: f"wiki.{split}.raw" for split in SPLITS}
WIKITEXT2_SHA256 = {
    "train": "6707892fa3788b5ab9ed78ab5ff37d9fe825f6011a2ad4fcd6a6d467f0e7da57",
    "valid": "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7",
    "test": "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
}

HF_REPO = "Salesforce/wikitext"
# The hub's parquet conversion of the original builder; the hub calls the valid split "validation".
HF_FILES = {
    "train": f"{WIKITEXT2}/train-00000-of-00001.parquet",
    "valid": f"{WIKITEXT2}/validation-00000-of-00001.parquet",
    "test": f"{WIKITEXT2}/test-00000-of-00001.parquet",
}

# A local corpus may use either naming; the first that exists wins.
LOCAL_NAMES = {split: (f"{split}.txt", f"wiki.{split}.raw") for split in SPLITS}


def cache_dir() -> Path:
    """Where downloads, tokenizers and token arrays are kept between runs."""
    env = os.environ.get("LMLAB_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmlab"


@dataclass(frozen=True)
class Corpus:
    """Three text files and their checksums; ``hash`` keys every cache derived from them."""

    name: str
    is_wikitext2: bool
    files: dict[str, Path]  # "train" / "valid" / "test"
    sha256: dict[str, str]

    @property
    def hash(self) -> str:
        # Content only (not the name or the paths): the same bytes share tokenizers and tokens.
        joined = "\n".join(f"{split}:{self.sha256[split]}" for split in SPLITS)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    def read(self, split: str) -> str:
        # newline="" keeps the bytes as they are: "\r\n" must not silently become "\n".
        with self.files[split].open(encoding="utf-8", newline="") as f:
            return f.read()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def locate_corpus(cfg: DataConfig, base: Path | None = None) -> Corpus:
    """The corpus ``cfg`` names, verified (WikiText-2) or just hashed (local)."""
    if cfg.dataset == "local":
        return _locate_local(cfg, base)
    return _locate_wikitext2(cfg, base)


def with_fallback(cfg: DataConfig, base: Path | None, corpus: Path) -> tuple[DataConfig, str | None]:
    """``cfg``, or a ``local`` config for the folder ``corpus`` when ``cfg`` names WikiText-2
    and it can be neither found nor downloaded on this machine. The second value is why
    WikiText-2 was not used (None when it was). The substitute keeps the folder's own name, so
    nothing trained on it is ever labelled WikiText-2."""
    if cfg.dataset != WIKITEXT2:
        return cfg, None
    try:
        locate_corpus(cfg, base)
    except UserError as e:
        return DataConfig(dataset="local", path=str(corpus.expanduser().resolve())), str(e)
    return cfg, None


# --------------------------------------------------------------------------------------------
# local corpora


def _locate_local(cfg: DataConfig, base: Path | None) -> Corpus:
    assert cfg.path is not None  # DataConfig refuses 'local' without a path
    folder = expand_path(cfg.path, base)
    if not folder.is_dir():
        raise UserError(f"local corpus folder {folder} does not exist (data.path={cfg.path!r})",
                        field="data.path")
    files: dict[str, Path] = {}
    for split in SPLITS:
        found = [folder / n for n in LOCAL_NAMES[split] if (folder / n).is_file()]
        if not found:
            names = " or ".join(LOCAL_NAMES[split])
            raise UserError(f"local corpus {folder} has no {split} split: expected {names}",
                            field="data.path")
        files[split] = found[0]
    return Corpus(
        name=cfg.name or folder.resolve().name,
        is_wikitext2=False,
        files=files,
        sha256={split: sha256_file(p) for split, p in files.items()},
    )


# --------------------------------------------------------------------------------------------
# WikiText-2


def _search_dirs(cfg: DataConfig, base: Path | None) -> list[Path]:
    if cfg.path:
        return [expand_path(cfg.path, base)]
    dirs = []
    if data_dir := os.environ.get("LMLAB_DATA_DIR"):
        dirs.append(Path(data_dir).expanduser() / WIKITEXT2)
    dirs.append(cache_dir() / WIKITEXT2)
    return dirs


def _how_to_supply(searched: list[Path], explicit: bool) -> str:
    sums = ", ".join(f"{WIKITEXT2_FILES[s]} {WIKITEXT2_SHA256[s]}" for s in SPLITS)
    names = ", ".join(WIKITEXT2_FILES.values())
    if explicit:
        how = (f"put {names} there, or drop data.path to search $LMLAB_DATA_DIR/{WIKITEXT2}/ and "
               f"{cache_dir() / WIKITEXT2}/ and download what is missing from the Hugging Face "
               f"hub dataset {HF_REPO}")
    else:
        how = (f"put {names} in $LMLAB_DATA_DIR/{WIKITEXT2}/ or {cache_dir() / WIKITEXT2}/ (or "
               f"point data.path at a folder holding them), or give this machine network access "
               f"to the Hugging Face hub dataset {HF_REPO} (config {WIKITEXT2}; HF_ENDPOINT "
               f"selects a mirror) so they are downloaded")
    return (f"searched {', '.join(str(p) for p in searched)}. To supply WikiText-2 "
            f"({WIKITEXT2}), {how}. Expected sha256: {sums}")


def _locate_wikitext2(cfg: DataConfig, base: Path | None) -> Corpus:
    dirs = _search_dirs(cfg, base)
    files: dict[str, Path] = {}
    missing: list[str] = []
    for split in SPLITS:
        found = next((d / WIKITEXT2_FILES[split] for d in dirs
                      if (d / WIKITEXT2_FILES[split]).is_file()), None)
        if found is None:
            missing.append(split)
            continue
        digest = sha256_file(found)
        if digest != WIKITEXT2_SHA256[split]:
            raise UserError(
                f"{found} is not WikiText-2's {split} split: sha256 {digest}, expected "
                f"{WIKITEXT2_SHA256[split]}. Replace or delete it; "
                + _how_to_supply([d / WIKITEXT2_FILES[split] for d in dirs], bool(cfg.path)),
                field="data.path" if cfg.path else "data",
            )
        files[split] = found

    if missing:
        searched = [d / WIKITEXT2_FILES[s] for s in missing for d in dirs]
        if cfg.path:  # an explicit folder is the only place to look: no download
            raise UserError(f"WikiText-2 split(s) {', '.join(missing)} not found in "
                            f"{dirs[0]}; " + _how_to_supply(searched, True), field="data.path")
        target = cache_dir() / WIKITEXT2
        for split in missing:
            try:
                files[split] = download_split(split, target)
            except DownloadError as e:
                raise UserError(
                    f"WikiText-2 split(s) {', '.join(missing)} not found and the download of "
                    f"'{split}' failed ({e}); " + _how_to_supply(searched, False),
                    field="data",
                ) from None

    # Every file reaching this point matched its expected checksum.
    return Corpus(name=WIKITEXT2, is_wikitext2=True, files={s: files[s] for s in SPLITS},
                  sha256=dict(WIKITEXT2_SHA256))


class DownloadError(Exception):
    """A download that did not produce the verified file (network, hub, or checksum)."""


def download_split(split: str, target: Path) -> Path:
    """Fetch one WikiText-2 split from the hub, rebuild the raw file, verify it, and move it
    into ``target`` only if its sha256 is the expected one. Raises DownloadError otherwise."""
    target.mkdir(parents=True, exist_ok=True)
    dest = target / WIKITEXT2_FILES[split]
    # The parquet is only an intermediate: fetch it into a scratch folder that disappears with
    # everything in it, so a bad download leaves nothing behind that could pass for valid data.
    with tempfile.TemporaryDirectory(dir=target, prefix=".download-") as scratch:
        parquet = hub_download(HF_REPO, HF_FILES[split], repo_type="dataset",
                               cache=Path(scratch))
        raw = rows_to_raw(_read_text_column(parquet))
        digest = hashlib.sha256(raw).hexdigest()
        if digest != WIKITEXT2_SHA256[split]:
            raise DownloadError(
                f"{HF_REPO}/{HF_FILES[split]} rebuilds to sha256 {digest}, expected "
                f"{WIKITEXT2_SHA256[split]}; nothing was cached"
            )
        with atomic_write(dest) as tmp:
            tmp.write_bytes(raw)
    return dest


def rows_to_raw(rows: list[str]) -> bytes:
    """The original file from the hub's rows.

    The hub's builder yielded every line of ``wiki.*.raw`` as one row, newline included, except
    that whitespace-only lines became "". In WikiText-2 raw every such line is exactly " \\n"
    (checked on the real test split: all 1,467 of them), so that is what "" turns back into; the
    checksum afterwards catches any split where this would not hold.
    """
    return "".join(row if row else " \n" for row in rows).encode("utf-8")


def _read_text_column(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError, KeyError) as e:  # truncated or foreign: a bad download
        raise DownloadError(f"{path.name} is not a readable parquet with a 'text' column: {e}") from e


def hub_download(repo_id: str, filename: str, *, repo_type: str | None, cache: Path) -> Path:
    """``hf_hub_download`` with its many failure types folded into one DownloadError."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub 2.x speaks httpx2, 1.x httpx; older versions used requests (OSErrors).
    unreachable: tuple[type[Exception], ...] = ()
    failed: tuple[type[Exception], ...] = ()
    for name in ("httpx2", "httpx"):
        try:
            client = importlib.import_module(name)
        except ImportError:
            continue
        unreachable += (client.TransportError,)
        failed += (client.HTTPError,)

    # Read here, not at import: huggingface_hub fixes its endpoint when it is first imported.
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        # One quick look first: hf_hub_download retries a failed connection five times with
        # backoff (~25 s), which on a machine without network only delays the same error.
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type, endpoint=endpoint),
                             timeout=10)
        path = hf_hub_download(repo_id=repo_id, filename=filename, repo_type=repo_type,
                               cache_dir=cache, endpoint=endpoint)
    except (LocalEntryNotFoundError, ConnectionError, *unreachable) as e:
        raise DownloadError(f"could not reach the hub for {repo_id}/{filename} (offline or no "
                            f"network?): {_first_line(e)}") from e
    except (HfHubHTTPError, OSError, *failed) as e:
        raise DownloadError(f"{repo_id}/{filename}: {_first_line(e)}") from e
    return Path(path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextmanager
def atomic_write(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block
    succeeds. Readers (another run sharing the cache) see the old file or the whole new one."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; cached data is meant to be shared
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_into(src: Path, dest: Path) -> None:
    """Copy a file into the cache atomically."""
    with atomic_write(dest) as tmp:
        shutil.copyfile(src, tmp)

"""Document readers: every dataset is a deterministic stream of text documents.

A *document* is the unit that gets BOS/EOS around it, that the validation split and the data-parallel
sharding assign, and whose index the loader checkpoints. Each reader therefore defines a stable,
deterministic document order and can start at any document index (``start``) so a resumed run does
not re-read what it already consumed.

Datasets (``DATASETS``):

- ``stdlib``  the embedded default, needs no download: the ``.py`` files of the running interpreter's
  standard library (tens of MB of real text), one document per file, in a fixed pseudo-random order
  (sorted by a salted hash of the relative path) so neighbouring documents come from different packages.
- ``text``    a directory of ``.txt`` files (recursive): one document per file. A single ``.txt`` file:
  one document per blank-line-separated paragraph, because one document could be neither split for
  validation nor sharded across ranks.
- ``jsonl``   a ``.jsonl`` file or a directory of them: one document per non-blank line, an object with a
  string ``text`` field.
- ``parquet`` a ``.parquet`` file or a directory of them (needs ``pyarrow``): one document per row of the
  ``text`` column.
- ``hf``      a local Hugging Face ``datasets`` directory (``save_to_disk`` output or a directory of data
  files; needs ``datasets``): one document per row of the ``text`` column of its ``train`` split.

User data keeps its own order (files sorted by path). Bad input raises a one-line ``ValueError`` that
names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Iterator

DATASETS = ("stdlib", "text", "jsonl", "parquet", "hf")

# The held-out validation split: every VALIDATION_EVERY-th document (index 0, 100, 200, ...).
# Index based rather than hash based so the tokenizer trainer and the dataset agree without sharing state.
VALIDATION_EVERY = 100

# Changing the salt reshuffles the stdlib order (and so invalidates checkpointed data positions).
_STDLIB_ORDER_SALT = "titan_fp8-stdlib-v1"

# Directories of the stdlib tree that are not the interpreter's own Python source: installed packages,
# byte code, and test fixtures that are deliberately malformed or in legacy encodings.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "encoded_modules", "cjkencodings"}


def is_validation_document(doc_index: int) -> bool:
    return doc_index % VALIDATION_EVERY == 0


def split_position(doc_index: int) -> int:
    """Position of a document inside its own split (0, 1, 2, ... for train and for validation)."""
    if is_validation_document(doc_index):
        return doc_index // VALIDATION_EVERY
    return doc_index - doc_index // VALIDATION_EVERY - 1


def iter_documents(dataset: str, dataset_path: str | None, *, start: int = 0) -> Iterator[str]:
    """Documents of ``dataset`` in their fixed order, beginning at document index ``start``.

    Paths are checked now (missing path, no input files, missing optional package); file contents are
    checked as they are read. A dataset that turns out to hold no documents at all raises ``ValueError``.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    path = dataset_path or None  # an empty string from a config means "not given"
    if dataset == "stdlib":
        if path is not None:
            raise ValueError(f"dataset 'stdlib' reads the interpreter's standard library and takes no "
                             f"dataset_path (got {path!r}); use dataset 'text', 'jsonl', ... for your files")
        return _ensure_nonempty(_iter_stdlib(stdlib_files(), start), "the standard library", start)
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs a dataset_path ({_EXPECTED[dataset]})")
    if not os.path.exists(path):
        raise ValueError(f"dataset_path {path} does not exist (dataset {dataset!r} expects {_EXPECTED[dataset]})")
    # File listings and optional imports happen here, eagerly, so a bad path fails at build time.
    if dataset == "text":
        docs = _iter_text(path, _list_files(path, ".txt"), start)
    elif dataset == "jsonl":
        docs = _iter_jsonl(_list_files(path, ".jsonl"), start)
    elif dataset == "parquet":
        docs = _iter_parquet(_open_parquet(_list_files(path, ".parquet")), start)
    else:
        docs = _iter_hf(_load_hf(path), start)
    return _ensure_nonempty(docs, path, start)


_EXPECTED = {
    "text": "a .txt file or a directory of .txt files",
    "jsonl": "a .jsonl file or a directory of .jsonl files, one JSON object with a 'text' field per line",
    "parquet": "a .parquet file or a directory of .parquet files with a 'text' column",
    "hf": "a local Hugging Face datasets directory with a 'text' column",
}


def _ensure_nonempty(docs: Iterator[str], where: str, start: int) -> Iterator[str]:
    # Raise on an empty dataset instead of letting an infinite training loop spin on nothing.
    empty = True
    for doc in docs:
        empty = False
        yield doc
    if empty and start == 0:
        raise ValueError(f"{where} contains no documents")


# ---------------------------------------------------------------------------------------------- stdlib

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every stdlib document, in document order."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Test-data directories (tokenizedata, typinganndata, ...) hold fixtures, not representative code.
        rel_dir = Path(os.path.relpath(dirpath, root))
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not _is_test_data(rel_dir, d))
        for name in filenames:
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):  # build-machine specific
                continue
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            if size > 0:  # empty __init__.py files are not documents
                files.append((os.path.relpath(full, root), size))
    if not files:
        raise ValueError(f"no .py files found in the standard library at {root}; use dataset 'text' or 'jsonl'")
    files.sort(key=lambda item: hashlib.sha256(f"{_STDLIB_ORDER_SALT}:{item[0]}".encode()).hexdigest())
    return files


def _is_test_data(rel_dir: Path, name: str) -> bool:
    in_tests = any(part in ("test", "tests", "idle_test") for part in rel_dir.parts)
    return in_tests and name.endswith("data")


def _iter_stdlib(files: list[tuple[str, int]], start: int) -> Iterator[str]:
    root = stdlib_root()
    for rel, _ in files[start:]:
        # A few test modules use legacy encodings on purpose; replacement keeps one document per file
        # (so document indices never shift) and the byte-fallback tokenizer copes with U+FFFD.
        yield (root / rel).read_bytes().decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------ text files

def _list_files(path: str, suffix: str) -> list[Path]:
    """A single file as given, or every ``*suffix`` file under a directory, sorted by relative path."""
    p = Path(path)
    if p.is_file():
        if p.stat().st_size == 0:
            raise ValueError(f"{path} is empty (no documents)")
        return [p]
    files = sorted(f for f in p.rglob(f"*{suffix}") if f.is_file())
    if not files:
        raise ValueError(f"{path} contains no {suffix} files (no documents)")
    return files


def _read_utf8(path: Path, what: str) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte 0x{data[e.start]:02x} at offset {e.start}); "
                         f"{what}") from None
    if "\x00" in text:
        raise ValueError(f"{path}: looks binary (contains NUL bytes); {what}")
    return text


_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


def _iter_text(path: str, files: list[Path], start: int) -> Iterator[str]:
    what = "dataset 'text' expects UTF-8 .txt files"
    if Path(path).is_file():
        text = _read_utf8(Path(path), what)
        paragraphs = [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text)]
        yield from [p for p in paragraphs if p.strip()][start:]
        return
    for f in files[start:]:
        # Whitespace-only files still count as (empty) documents so indices depend on the listing alone.
        yield _read_utf8(f, what)


def _iter_jsonl(files: list[Path], start: int) -> Iterator[str]:
    index = 0
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                index += 1
                if index <= start:  # skipped documents were validated when they were first read
                    continue
                yield _jsonl_text(f, lineno, raw)


def _jsonl_text(f: Path, lineno: int, raw: bytes) -> str:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{f} line {lineno}: not UTF-8 text; dataset 'jsonl' expects UTF-8 JSON lines") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} line {lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or "text" not in obj:
        raise ValueError(f"{f} line {lineno}: expected a JSON object with a 'text' field")
    if not isinstance(obj["text"], str):
        raise ValueError(f"{f} line {lineno}: the 'text' field is {type(obj['text']).__name__}, expected a string")
    return obj["text"]


# ------------------------------------------------------------------------------------ optional readers

def _require(module: str, dataset: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ValueError(f"dataset {dataset!r} needs the {package!r} package: pip install {package}") from None


def _open_parquet(files: list[Path]) -> list:
    pq = _require("pyarrow.parquet", "parquet", "pyarrow")
    # Opening every file up front reports a non-parquet file or a missing column before training starts.
    tables = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for non-parquet input
            raise ValueError(f"{f}: not a parquet file ({type(e).__name__})") from None
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{f}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
        tables.append((f, pf))
    return tables


def _iter_parquet(tables: list, start: int) -> Iterator[str]:
    skip = start
    for f, pf in tables:
        rows = pf.metadata.num_rows
        if skip >= rows:  # whole files are skipped from metadata alone
            skip -= rows
            continue
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            texts = batch.column(0).to_pylist()
            if skip:
                dropped = min(skip, len(texts))
                texts, skip = texts[dropped:], skip - dropped
            for t in texts:
                if t is not None and not isinstance(t, str):
                    raise ValueError(f"{f}: the 'text' column holds {type(t).__name__}, expected strings")
                yield t or ""


def _iter_hf(ds, start: int) -> Iterator[str]:
    for i in range(start, len(ds), 1024):
        for t in ds[i:i + 1024]["text"]:
            yield t or ""


def _load_hf(path: str):
    datasets = _require("datasets", "hf", "datasets")
    p = Path(path)
    try:
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            ds = datasets.load_from_disk(path)  # save_to_disk output
        else:
            ds = datasets.load_dataset(path)  # a local directory of data files
    except Exception as e:
        raise ValueError(f"{path}: could not load as a Hugging Face dataset ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise ValueError(f"{path}: no 'text' column (columns: {', '.join(ds.column_names)})")
    return ds.select_columns(["text"])

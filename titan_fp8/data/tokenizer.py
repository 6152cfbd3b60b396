"""Sentencepiece tokenizer: a user's ``.model`` file, or a BPE model trained on the embedded corpus.

The embedded-corpus model is trained on first use and cached. Training is deterministic (a fixed
sample of the training split, fed in order, one thread — sentencepiece's BPE result depends on the
thread count), so every process on the same interpreter produces the same bytes; that is what lets two
ranks race to write the cache safely (atomic rename, identical content) and lets a checkpoint refer to
"the stdlib tokenizer" by its cache name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from .corpus import iter_documents, is_validation_document, stdlib_files

logger = logging.getLogger(__name__)

MIN_VOCAB_SIZE = 512  # 256 byte pieces + specials + the corpus' common characters must fit
_SAMPLE_CHARS = 8_000_000  # ~1.5 s of BPE training; more data barely changes compression (measured)
_SENTENCE_CHARS = 1000  # lines are grouped into sentences of about this size so pieces can span "\n"
# Bump when the training recipe below changes, so old cache files are not reused.
_RECIPE_VERSION = 1
_TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,  # any text encodes: unseen characters become byte pieces, never <unk>
    character_coverage=0.9995,  # rare characters go to byte fallback instead of wasting vocab
    # Source code: keep text byte-exact (no NFKC, no whitespace folding, no dummy-prefix space) so
    # decode(encode(text)) == text, and let runs of indentation become single pieces.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    num_threads=1,
    input_sentence_size=0,  # use every sentence we pass (we sample ourselves)
    shuffle_input_sentence=False,
    max_sentence_length=8192,
    minloglevel=2,  # keep the C++ trainer's INFO chatter off the console
)


class Tokenizer:
    """A loaded sentencepiece model. ``encode`` adds no BOS/EOS; the packing dataset adds them."""

    def __init__(self, model_path: str | os.PathLike):
        self._model_path = str(model_path)
        self._sp = _load_model(self._model_path)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int, add_bos=False, add_eos=False)

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):  # torch tensors / numpy arrays
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_path(self) -> str:
        return self._model_path

    def __repr__(self) -> str:
        return f"Tokenizer({self._model_path!r}, vocab_size={self.vocab_size})"

    # The processor is a C++ object; pickle by path (e.g. for DataLoader workers) and reload.
    def __getstate__(self) -> dict:
        return {"model_path": self._model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])


def _load_model(path: str) -> spm.SentencePieceProcessor:
    expected = "expected a sentencepiece .model file"
    p = Path(path)
    if not p.exists():
        raise ValueError(f"tokenizer file {path} does not exist ({expected})")
    if not p.is_file():
        raise ValueError(f"tokenizer path {path} is not a file ({expected})")
    data = p.read_bytes()
    if _looks_like_tiktoken(data):
        raise ValueError(f"tokenizer file {path} is a tiktoken BPE file (e.g. Llama 3's original tokenizer.model), "
                         f"not sentencepiece; {expected}")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
        ok = sp.get_piece_size() > 0
    except Exception:  # sentencepiece raises RuntimeError/OSError with a multi-line C++ status
        ok = False
    if not ok:
        raise ValueError(f"tokenizer file {path} is not a sentencepiece model ({expected})")
    return sp


def _looks_like_tiktoken(data: bytes) -> bool:
    # tiktoken files are lines of "<base64 token> <rank>"; a sentencepiece proto starts with a 0x0a tag.
    return re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", data[:200]) is not None


def build_tokenizer(tokenizer_path: str | None, *, cache_dir: str | None = None,
                    vocab_size: int = 4096) -> Tokenizer:
    """Load ``tokenizer_path``, or (None) train/cache the embedded-corpus BPE model of ``vocab_size``."""
    if tokenizer_path:
        return Tokenizer(tokenizer_path)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE} for the embedded-corpus tokenizer, "
                         f"got {vocab_size!r}")
    cache = Path(cache_dir or os.environ.get("TITAN_FP8_CACHE") or Path.home() / ".cache" / "titan_fp8")
    path = cache / f"stdlib-bpe{vocab_size}-{_corpus_fingerprint(vocab_size)}.model"
    if path.exists():
        try:
            tok = Tokenizer(path)
            logger.info("tokenizer: cached embedded-corpus BPE model %s", path)
            return tok
        except ValueError:
            logger.warning("tokenizer: cache file %s is unreadable; retraining", path)
    t0 = time.perf_counter()
    model = train_stdlib_bpe(vocab_size)
    _atomic_write(path, model)
    logger.info("tokenizer: trained %d-piece BPE on the embedded corpus in %.1fs, cached at %s",
                vocab_size, time.perf_counter() - t0, path)
    return Tokenizer(path)


def _corpus_fingerprint(vocab_size: int) -> str:
    # Identity of what training would see: interpreter build + exact file list (with sizes) + recipe.
    identity = {
        "recipe": _RECIPE_VERSION,
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "sentencepiece": spm.__version__,
        "vocab_size": vocab_size,
        "files": stdlib_files(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def train_stdlib_bpe(vocab_size: int) -> bytes:
    """Serialized sentencepiece model trained on a fixed sample of the stdlib training split."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=_training_sentences(), model_writer=buf,
                                   vocab_size=vocab_size, **_TRAINER_OPTIONS)
    return buf.getvalue()


def _training_sentences() -> Iterator[str]:
    # The first _SAMPLE_CHARS of training-split documents in corpus order: a fixed, diverse sample
    # (the corpus order is already shuffled) that never looks at validation documents.
    used = 0
    for index, doc in enumerate(iter_documents("stdlib", None)):
        if is_validation_document(index):
            continue
        yield from _sentences(doc)
        used += len(doc)
        if used >= _SAMPLE_CHARS:
            return


def _sentences(doc: str) -> Iterator[str]:
    chunk, size = [], 0
    for line in doc.splitlines(keepends=True):
        chunk.append(line)
        size += len(line)
        if size >= _SENTENCE_CHARS:
            yield "".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "".join(chunk)


def _atomic_write(path: Path, data: bytes) -> None:
    # tmp + rename in the same directory: readers see the old file or the whole new one, and two
    # processes writing identical bytes at once both succeed.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"cannot write the tokenizer cache in {path.parent} ({e.strerror or e}); "
                         f"set TITAN_FP8_CACHE to a writable directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache must be readable by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

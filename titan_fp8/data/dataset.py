"""Packing dataset: documents -> BOS + tokens + EOS -> one token stream -> windows of seq_len + 1.

Documents are tokenized one at a time, only when the buffer runs short, so a run starts in seconds
whatever the corpus size. Each window yields ``(window[:-1], window[1:])``; consecutive windows share
one token (the last target of a window is the first input of the next), so every token of the stream
is predicted exactly once. Attention is not masked at document boundaries: BOS/EOS mark them.

Which documents this instance reads (see ``corpus``): the split (every ``VALIDATION_EVERY``-th document
is validation, the rest train), then data-parallel rank r of W takes the documents whose position
within the split is r mod W, so ranks are disjoint.

State (``state_dict``): epoch, index of the next document to read, and the tokens already read but not
yet yielded. Restoring it reproduces the remaining stream token for token. A training (infinite) stream
continues where it stands when re-iterated; a finite (validation) stream starts over on every new
iteration unless a state was just loaded, so every evaluation sees the same batches.

Training streams are mixed by a shuffle buffer of windows (``shuffle_windows`` of them, fewer for long
sequences; a seeded RNG): without it the rows of a batch are consecutive windows of one document and the
loss jumps with every file. The buffer and RNG state are part of ``state_dict``, so resume stays exact.
Finite streams (validation, or a single pass) are not shuffled.

An infinite stream whose rank owns no document raises ``ValueError`` (it would spin forever); a finite
stream too short for one window is empty, with a warning. Finite streams of different ranks can differ
in length: the caller must not assume equal batch counts across ranks.
"""

from __future__ import annotations

import logging
import random
from typing import Iterator

import torch
from torch.utils.data import IterableDataset

from .corpus import VALIDATION_EVERY, iter_documents, is_validation_document, split_position
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_STATE_VERSION = 2
# The shuffle buffer holds at most this many tokens (per rank), whatever seq_len is.
_SHUFFLE_MAX_TOKENS = 1 << 20


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class PackedTokenDataset(IterableDataset):
    def __init__(self, *, dataset: str, dataset_path: str | None, tokenizer: Tokenizer, seq_len: int,
                 split: str = "train", dp_rank: int = 0, dp_world_size: int = 1, infinite: bool = True,
                 shuffle_windows: int = 256, seed: int = 0):
        _check_int("seq_len", seq_len, 2)
        _check_int("dp_world_size", dp_world_size, 1)
        _check_int("dp_rank", dp_rank, 0)
        if dp_rank >= dp_world_size:
            raise ValueError(f"dp_rank must be < dp_world_size ({dp_world_size}), got {dp_rank}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
            raise ValueError(f"tokenizer {tokenizer.model_path} defines no BOS or EOS id; "
                             f"packing needs both to mark document boundaries")
        self.dataset, self.dataset_path = dataset, dataset_path or None
        self.tokenizer, self.seq_len, self.split = tokenizer, seq_len, split
        self.dp_rank, self.dp_world_size, self.infinite = dp_rank, dp_world_size, infinite
        self.shuffle_capacity = (min(shuffle_windows, max(1, _SHUFFLE_MAX_TOKENS // (seq_len + 1)))
                                 if split == "train" and infinite and shuffle_windows > 1 else 0)
        self.seed = seed
        # Read the first document now: a bad path, an empty dataset or a missing package fails at
        # build time with its ValueError rather than at the first training step.
        next(iter_documents(dataset, self.dataset_path))
        self._reset()
        self._resume_pending = False

    # ------------------------------------------------------------------------------------- state
    def _reset(self) -> None:
        self._epoch = 0
        self._doc_index = 0  # next document to read
        self._buffer: list[int] = []  # tokens read, not yet yielded, from self._pos on
        self._pos = 0
        self._shuffle_buffer: list[torch.Tensor] = []
        self._rng = random.Random(self.seed * 1_000_003 + self.dp_rank)

    def state_dict(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "epoch": self._epoch,
            "doc_index": self._doc_index,
            "buffer": self._buffer[self._pos:],
            "shuffle_buffer": (torch.stack(self._shuffle_buffer) if self._shuffle_buffer
                               else torch.empty(0, self.seq_len + 1, dtype=torch.int64)),
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        # The document assignment depends on these; resuming under different ones would silently
        # repeat or skip data.
        for key in ("version", "dataset", "split", "dp_rank", "dp_world_size"):
            expected = _STATE_VERSION if key == "version" else getattr(self, key)
            if state.get(key) != expected:
                raise ValueError(f"data loader state has {key}={state.get(key)!r} but this run has "
                                 f"{key}={expected!r}; resuming requires the same value")
        self._epoch = int(state["epoch"])
        self._doc_index = int(state["doc_index"])
        self._buffer = [int(t) for t in state["buffer"]]
        self._pos = 0
        self._shuffle_buffer = list(torch.as_tensor(state["shuffle_buffer"]).unbind(0))
        self._rng.setstate(_as_rng_state(state["rng"]))
        self._resume_pending = True

    # ------------------------------------------------------------------------------------ stream
    def _owns(self, doc_index: int) -> bool:
        if is_validation_document(doc_index) != (self.split == "validation"):
            return False
        return split_position(doc_index) % self.dp_world_size == self.dp_rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for chunk in self._shuffled(self._windows()):
            yield chunk[:-1], chunk[1:]

    def _shuffled(self, windows: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Swap each new window into a random slot of the buffer and yield the one it replaces."""
        if not self.shuffle_capacity:
            yield from windows
            return
        for window in windows:
            if len(self._shuffle_buffer) < self.shuffle_capacity:
                self._shuffle_buffer.append(window)
                continue
            i = self._rng.randrange(self.shuffle_capacity)
            out, self._shuffle_buffer[i] = self._shuffle_buffer[i], window
            yield out

    def _windows(self) -> Iterator[torch.Tensor]:
        if not self.infinite and not self._resume_pending:
            self._reset()
        self._resume_pending = False
        window = self.seq_len + 1
        yielded = False
        while True:
            pass_start = self._doc_index
            owned = False
            docs = iter_documents(self.dataset, self.dataset_path, start=self._doc_index)
            for text in docs:
                index = self._doc_index
                self._doc_index += 1
                if not self._owns(index) or not text.strip():
                    continue
                owned = True
                # Compact, then append: the buffer never holds more than one document + one window.
                self._buffer = self._buffer[self._pos:]
                self._pos = 0
                self._buffer.append(self.tokenizer.bos_id)
                self._buffer.extend(self.tokenizer.encode(text))
                self._buffer.append(self.tokenizer.eos_id)
                while len(self._buffer) - self._pos >= window:
                    chunk = torch.tensor(self._buffer[self._pos:self._pos + window], dtype=torch.int64)
                    self._pos += self.seq_len  # state is updated before the yield: it is exact at suspension
                    yielded = True
                    yield chunk
            if not self.infinite:
                # An empty evaluation stream is reported, not raised: the caller sees an empty loader
                # instead of a crash in the middle of a training run.
                if not yielded and pass_start == 0:
                    logger.warning("%s", self._describe(f"has fewer than seq_len + 1 = {window} tokens"))
                self._reset()  # the next iteration is a fresh pass
                return
            if not owned and pass_start == 0:  # an infinite stream would spin forever
                raise ValueError(self._describe("has no documents"))
            self._epoch += 1
            self._doc_index = 0

    def _describe(self, problem: str) -> str:
        where = self.dataset_path or self.dataset
        return (f"the {self.split} split of {where} for dp rank {self.dp_rank} of {self.dp_world_size} {problem} "
                f"(every document whose index is a multiple of {VALIDATION_EVERY} is validation; add documents or use fewer ranks)")


def _as_rng_state(state) -> tuple:
    """random.Random state as setstate wants it (checkpoint formats may turn tuples into lists)."""
    version, internal, gauss = state
    return (int(version), tuple(int(x) for x in internal), gauss)

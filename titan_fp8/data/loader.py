"""The training/validation data loader: a ``StatefulDataLoader`` over ``PackedTokenDataset``.

``num_workers=0``: tokenizing a batch costs far less than a training step, and in-process loading keeps
the checkpointed state exact (no prefetched batches in flight). Batches are ``(input_ids, labels)``,
both ``(local_batch_size, seq_len)`` int64; only a finite (validation) stream can end with a smaller
last batch.
"""

from __future__ import annotations

import warnings

from torchdata.stateful_dataloader import StatefulDataLoader

from .dataset import PackedTokenDataset, _check_int
from .tokenizer import Tokenizer


def build_dataloader(*, dataset: str, dataset_path: str | None, tokenizer: Tokenizer, seq_len: int,
                     local_batch_size: int, dp_rank: int = 0, dp_world_size: int = 1, split: str = "train",
                     infinite: bool = True, seed: int = 0) -> StatefulDataLoader:
    _check_int("local_batch_size", local_batch_size, 1)
    ds = PackedTokenDataset(dataset=dataset, dataset_path=dataset_path, tokenizer=tokenizer, seq_len=seq_len,
                            split=split, dp_rank=dp_rank, dp_world_size=dp_world_size, infinite=infinite,
                            seed=seed)
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, deprecated in recent torch: noise on every run, not ours.
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(ds, batch_size=local_batch_size, num_workers=0)

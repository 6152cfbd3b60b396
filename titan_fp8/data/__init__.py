"""Data: tokenizer, corpus readers, packing dataset, the stateful loader and its prefetching wrapper (see each
module)."""

from .corpus import DATASETS, iter_documents
from .dataset import PackedTokenDataset
from .loader import build_dataloader
from .prefetch import PrefetchingLoader
from .tokenizer import Tokenizer, build_tokenizer

__all__ = ["DATASETS", "Tokenizer", "build_tokenizer", "iter_documents", "PackedTokenDataset", "build_dataloader",
           "PrefetchingLoader"]

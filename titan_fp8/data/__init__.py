"""Data: tokenizer, corpus readers, packing dataset and the stateful loader (see each module)."""

from .corpus import DATASETS, iter_documents
from .dataset import PackedTokenDataset
from .loader import build_dataloader
from .tokenizer import Tokenizer, build_tokenizer

__all__ = ["DATASETS", "Tokenizer", "build_tokenizer", "iter_documents", "PackedTokenDataset", "build_dataloader"]

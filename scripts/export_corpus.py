"""Write a dataset's documents, in document order, to one .jsonl file (dataset 'jsonl' reads it back).

The embedded 'stdlib' corpus is the running interpreter's standard library, so it differs between Python
versions (3.11: 9.7M training tokens; the GPU image's 3.12: 3.2M). Exporting it on one machine and training
with `--training.dataset jsonl --training.dataset_path FILE` elsewhere gives both the same documents, the
same order and the same validation split (every 100th document). `.xz` at the end of --output compresses.

    python scripts/export_corpus.py --output /tmp/stdlib311.jsonl.xz
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from titan_fp8.data.corpus import DATASETS, iter_documents  # noqa: E402


def export_corpus(dataset: str, dataset_path: str | None, output: str) -> int:
    """Writes every document of the dataset as {"text": ...} lines; returns the number of documents."""
    opener = lzma.open if output.endswith(".xz") else open
    n = 0
    with opener(output, "wt", encoding="utf-8") as f:
        for doc in iter_documents(dataset, dataset_path):
            # A blank document would be skipped by the jsonl reader and shift every later index.
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="stdlib", choices=DATASETS)
    p.add_argument("--dataset_path", default=None)
    p.add_argument("--output", required=True, help=".jsonl file to write (.jsonl.xz: compressed)")
    a = p.parse_args(argv)
    try:
        n = export_corpus(a.dataset, a.dataset_path, a.output)
    except ValueError as e:
        print(f"export_corpus: {e}", file=sys.stderr)
        return 1
    print(f"{n} documents -> {a.output} ({os.path.getsize(a.output) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

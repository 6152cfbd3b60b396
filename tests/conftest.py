import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Compiled graphs and the trained BPE tokenizer are cached across tests (and across CI runs on one machine).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join("/tmp", "titan_fp8_inductor_cache"))
os.environ.setdefault("TITAN_FP8_CACHE", os.path.join("/tmp", "titan_fp8_cache"))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO

"""titan_fp8.data: tokenizer, corpus readers, packing, sharding, splits, resumable loading, bad input."""

from __future__ import annotations

import ast
import copy
import json
import pickle
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from titan_fp8.data import (DATASETS, PackedTokenDataset, PrefetchingLoader, Tokenizer, build_dataloader,
                            build_tokenizer, iter_documents)
from titan_fp8.data import tokenizer as tokenizer_module
from titan_fp8.data.corpus import stdlib_files


def one_line_error(excinfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    # No chained sentencepiece/json traceback behind the one-line message.
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__context__ is None or excinfo.value.__suppress_context__
    return msg


# ------------------------------------------------------------------------------------------ tokenizer

@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tok_cache")


@pytest.fixture(scope="session")
def tok(tok_cache):
    # The real embedded-corpus BPE model, trained once per session.
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(None, cache_dir=str(tok_cache))
    print(f"stdlib BPE trained in {time.perf_counter() - t0:.1f}s")
    return tokenizer


def test_tokenizer_trained_properties(tok, tok_cache):
    assert tok.vocab_size == 4096
    assert {tok.bos_id, tok.eos_id} == {1, 2}
    assert tok.pad_id == -1
    path = Path(tok.model_path)
    assert path.parent == tok_cache and "4096" in path.name
    assert not list(tok_cache.glob("*.tmp"))  # the atomic write left nothing behind


def test_tokenizer_cache_hit_is_identical(tok, tok_cache, monkeypatch):
    before = Path(tok.model_path).read_bytes()

    def no_training(*_):
        raise AssertionError("the second build must hit the cache")

    monkeypatch.setattr(tokenizer_module, "train_stdlib_bpe", no_training)
    again = build_tokenizer(None, cache_dir=str(tok_cache))
    assert again.model_path == tok.model_path
    assert Path(again.model_path).read_bytes() == before
    # Different vocab sizes are different cache entries.
    with pytest.raises(AssertionError):
        build_tokenizer(None, cache_dir=str(tok_cache), vocab_size=1024)


def test_tokenizer_corrupt_cache_is_retrained(tok, tmp_path, monkeypatch):
    model = Path(tok.model_path).read_bytes()
    monkeypatch.setattr(tokenizer_module, "train_stdlib_bpe", lambda vocab_size: model)
    (tmp_path / Path(tok.model_path).name).write_bytes(b"truncated")
    again = build_tokenizer(None, cache_dir=str(tmp_path))
    assert Path(again.model_path).read_bytes() == model


def test_tokenizer_unwritable_cache_dir(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "train_stdlib_bpe", lambda vocab_size: b"")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError) as e:
        build_tokenizer(None, cache_dir=str(tmp_path / "a_file" / "cache"))
    one_line_error(e, "a_file", "TITAN_FP8_CACHE")


def test_tokenizer_training_is_deterministic(tok):
    assert tokenizer_module.train_stdlib_bpe(4096) == Path(tok.model_path).read_bytes()


def test_tokenizer_cache_dir_from_env(tok, tok_cache, monkeypatch):
    monkeypatch.setenv("TITAN_FP8_CACHE", str(tok_cache))
    assert build_tokenizer(None).model_path == tok.model_path


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn x ** 2  # square\n",
    "    indented\r\n\n\n  trailing   spaces   ",
    "Grüße, 東京, emoji 🚀, math ∑ and NUL-free control \x07 chars",
    "",
])
def test_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no BOS/EOS
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.int64)) == text


def test_tokenizer_compresses_python(tok):
    text = Path(__file__).read_text()
    assert len(text.encode()) / len(tok.encode(text)) > 2.0


def test_tokenizer_pickles(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("import os") == tok.encode("import os")


def test_user_sentencepiece_model_loads_via_path(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "user"), vocab_size=60,
                                   model_type="unigram", minloglevel=2)
    user = build_tokenizer(str(tmp_path / "user.model"))
    assert isinstance(user, Tokenizer) and user.vocab_size == 60
    assert user.model_path == str(tmp_path / "user.model")
    assert user.decode(user.encode("the lazy fox")) == "the lazy fox"


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage \x13\x37" * 50,
    b"this is a plain text file, not a model\n",
    b"",
    b"IQ== 0\nIg== 1\nIw== 2\n",  # tiktoken format (Llama 3's tokenizer.model)
])
def test_garbage_tokenizer_file_is_a_one_line_error(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError) as e:
        build_tokenizer(str(bad))
    one_line_error(e, str(bad), "sentencepiece")


def test_missing_tokenizer_file_and_directory(tmp_path):
    with pytest.raises(ValueError) as e:
        build_tokenizer(str(tmp_path / "nope.model"))
    one_line_error(e, "nope.model", "does not exist")
    with pytest.raises(ValueError) as e:
        build_tokenizer(str(tmp_path))
    one_line_error(e, str(tmp_path), "not a file")


@pytest.mark.parametrize("vocab_size", [0, 100, 511, "4096", True])
def test_bad_vocab_size(tmp_path, vocab_size):
    with pytest.raises(ValueError) as e:
        build_tokenizer(None, cache_dir=str(tmp_path), vocab_size=vocab_size)
    one_line_error(e, "vocab_size")


# -------------------------------------------------------------------------------------------- corpus

def test_stdlib_corpus_is_large_deterministic_and_shuffled():
    files = stdlib_files()
    assert len(files) > 500 and sum(size for _, size in files) > 10e6
    assert files == stdlib_files()
    assert not any("site-packages" in rel or "__pycache__" in rel for rel, _ in files)
    # Shuffled: neighbours come from different directories far more often than sorted order would give.
    dirs = [str(Path(rel).parent) for rel, _ in files]
    assert sum(a != b for a, b in zip(dirs, dirs[1:])) > 0.5 * len(dirs)
    docs = iter_documents("stdlib", None)
    first = next(docs)
    assert first == next(iter_documents("stdlib", None)) and first.strip()
    assert next(iter_documents("stdlib", None, start=1)) == next(docs)


def test_datasets_names():
    assert DATASETS == ("stdlib", "text", "jsonl", "parquet", "hf")


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_text_directory_one_document_per_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second\n\nstill second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "c.txt").write_text("third")
    (tmp_path / "ignored.md").write_text("not a txt")
    assert list(iter_documents("text", str(tmp_path))) == ["first", "second\n\nstill second", "third"]
    assert list(iter_documents("text", str(tmp_path), start=2)) == ["third"]


def test_text_single_file_splits_paragraphs(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("Para one\nline two.\n\n\n  \nPara two.\n\nPara three.\n")
    assert list(iter_documents("text", str(f))) == ["Para one\nline two.", "Para two.", "Para three."]


def test_jsonl_file_and_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["one", "two"])
    (tmp_path / "b.jsonl").write_text('\n{"text": "three"}\n\n')  # blank lines are not documents
    assert list(iter_documents("jsonl", str(tmp_path / "a.jsonl"))) == ["one", "two"]
    assert list(iter_documents("jsonl", str(tmp_path))) == ["one", "two", "three"]
    assert list(iter_documents("jsonl", str(tmp_path), start=1)) == ["two", "three"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.xz"])
def test_export_corpus_keeps_every_document_and_its_index(tmp_path, suffix):
    # scripts/export_corpus.py carries a corpus (e.g. one Python's stdlib) to another machine as jsonl: the
    # documents, their order and so the validation split must survive, blank and non-ASCII ones included.
    import lzma
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    docs = ["first", "   \n", "ünïcode \u2603 \"quoted\"\n\nparagraphs", "", "last\r\nline"]
    for i, doc in enumerate(docs):
        (src / f"{i:03d}.txt").write_bytes(doc.encode("utf-8"))
    out = tmp_path / f"corpus{suffix}"
    script = Path(__file__).resolve().parent.parent / "scripts" / "export_corpus.py"
    r = subprocess.run([sys.executable, str(script), "--dataset", "text", "--dataset_path", str(src), "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("5 documents")
    if suffix.endswith(".xz"):  # the reader takes plain .jsonl: decompress as the device script does
        plain = tmp_path / "corpus.jsonl"
        plain.write_bytes(lzma.decompress(out.read_bytes()))
        out = plain
    assert list(iter_documents("jsonl", str(out))) == list(iter_documents("text", str(src))) == docs
    r = subprocess.run([sys.executable, str(script), "--dataset", "text", "--dataset_path", str(tmp_path / "nope"),
                        "--output", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "nope" in r.stderr


def test_parquet_reader(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a", "b", None], "n": [1, 2, 3]}), tmp_path / "1.parquet")
    pq.write_table(pa.table({"text": ["c"]}), tmp_path / "2.parquet")
    assert list(iter_documents("parquet", str(tmp_path))) == ["a", "b", "", "c"]
    assert list(iter_documents("parquet", str(tmp_path), start=3)) == ["c"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "3.parquet")
    with pytest.raises(ValueError) as e:
        iter_documents("parquet", str(tmp_path))
    one_line_error(e, "3.parquet", "'text' column")


def test_hf_reader(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", ["a", "b", "c"])
    assert list(iter_documents("hf", str(files), start=1)) == ["b", "c"]  # a directory of data files
    datasets.load_dataset(str(files))["train"].save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents("hf", str(tmp_path / "saved"))) == ["a", "b", "c"]  # save_to_disk output
    (files / "train.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError) as e:
        iter_documents("hf", str(files))
    one_line_error(e, "files", "'text' column")


@pytest.mark.parametrize("dataset,module,package", [("parquet", "pyarrow.parquet", "pyarrow"),
                                                     ("hf", "datasets", "datasets")])
def test_missing_optional_package_says_what_to_install(tmp_path, monkeypatch, dataset, module, package):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == module:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError) as e:
        iter_documents(dataset, str(tmp_path))
    one_line_error(e, f"pip install {package}")


def bad_inputs(tmp_path: Path) -> list[tuple[str, Path, str]]:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "nul.txt").write_bytes(b"abc\x00\x01\x02def")
    (tmp_path / "bin_dir").mkdir()
    (tmp_path / "bin_dir" / "ok.txt").write_text("fine")
    (tmp_path / "bin_dir" / "zz.txt").write_bytes(bytes(range(256)))
    write_jsonl(tmp_path / "notext.jsonl", ["a", "b"]).open("a").write('{"content": "c"}\n')
    (tmp_path / "badjson.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "nonstr.jsonl").write_text('{"text": 5}\n')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    return [
        ("text", tmp_path / "missing.txt", "does not exist"),
        ("jsonl", tmp_path / "missing_dir", "does not exist"),
        ("text", tmp_path / "empty.txt", "empty"),
        ("text", tmp_path / "blank.txt", "no documents"),
        ("text", tmp_path / "empty_dir", "no .txt files"),
        ("jsonl", tmp_path / "empty_dir", "no .jsonl files"),
        ("text", tmp_path / "latin1.txt", "not UTF-8"),
        ("text", tmp_path / "nul.txt", "binary"),
        ("text", tmp_path / "bin_dir" / "zz.txt", "not UTF-8"),
        ("jsonl", tmp_path / "notext.jsonl", "line 3"),
        ("jsonl", tmp_path / "badjson.jsonl", "line 2"),
        ("jsonl", tmp_path / "nonstr.jsonl", "line 1"),
        ("jsonl", tmp_path / "empty.jsonl", "no documents"),
    ]


def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path):
    for dataset, path, needle in bad_inputs(tmp_path):
        with pytest.raises(ValueError) as e:
            list(iter_documents(dataset, str(path)))
        one_line_error(e, path.name, needle)
    # A bad file inside a directory is named too.
    with pytest.raises(ValueError) as e:
        list(iter_documents("text", str(tmp_path / "bin_dir")))
    one_line_error(e, "zz.txt")


def test_bad_input_fails_when_the_loader_is_built(tmp_path, tok):
    # Path-level problems surface at build time, not at the first training step.
    for dataset, path, needle in bad_inputs(tmp_path):
        if path.parent.name == "bin_dir" or needle in ("line 2", "line 3"):
            continue  # content problems further into the data surface when that data is read
        with pytest.raises(ValueError) as e:
            build_dataloader(dataset=dataset, dataset_path=str(path), tokenizer=tok, seq_len=8, local_batch_size=2)
        one_line_error(e, path.name, needle)


@pytest.mark.parametrize("dataset,path,needle", [
    ("nope", None, "unknown dataset"),
    ("stdlib", "/some/where", "takes no dataset_path"),
    ("jsonl", None, "needs a dataset_path"),
    ("text", "", "needs a dataset_path"),
])
def test_bad_dataset_arguments(dataset, path, needle):
    with pytest.raises(ValueError) as e:
        iter_documents(dataset, path)
    one_line_error(e, needle)


# ------------------------------------------------------------------------------------------- packing

def numbered_docs(tmp_path: Path, n: int) -> Path:
    # Every document names its index, so a decoded stream says which documents it came from.
    return write_jsonl(tmp_path / "docs.jsonl", [f"document {i} says {'hello ' * (i % 7)}".strip() for i in range(n)])


def stream_documents(tok: Tokenizer, windows) -> list[int]:
    """Document indices in a stream of windows (first window whole, then each window minus its overlap)."""
    tokens = []
    for k, (x, y) in enumerate(windows):
        tokens += (x.tolist() + y[-1:].tolist()) if k == 0 else y.tolist()
    text = tok.decode([t if t not in (tok.bos_id, tok.eos_id) else tok.encode("|")[0] for t in tokens])
    return [int(part.split()[1]) for part in text.split("|") if part.startswith("document ")]


def test_packing_windows_and_boundaries(tmp_path, tok):
    path = numbered_docs(tmp_path, 30)
    ds = PackedTokenDataset(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=16, infinite=False)
    windows = list(ds)
    expected = []
    for i, text in enumerate(iter_documents("jsonl", str(path))):
        if i % 100:  # document 0 is validation
            expected += [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    assert len(windows) == (len(expected) - 1) // 16
    for k, (x, y) in enumerate(windows):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,)
        assert torch.equal(x[1:], y[:-1])  # labels are the inputs shifted by one
        # Window k covers stream tokens [16k, 16k + 17): consecutive windows share one token.
        assert x.tolist() + [y[-1].item()] == expected[16 * k:16 * k + 17]
    assert windows[0][0][0].item() == tok.bos_id
    assert tok.eos_id in windows[0][0].tolist() + windows[1][0].tolist()


def test_train_and_validation_are_disjoint(tmp_path, tok):
    path = numbered_docs(tmp_path, 250)
    seen = {}
    for split in ("train", "validation"):
        ds = PackedTokenDataset(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=32, split=split,
                                infinite=False)
        seen[split] = set(stream_documents(tok, ds))
    assert seen["validation"] <= {0, 100, 200} and len(seen["validation"]) >= 2
    assert not seen["train"] & seen["validation"]
    assert len(seen["train"]) > 240


def test_data_parallel_shards_are_disjoint(tmp_path, tok):
    path = numbered_docs(tmp_path, 250)
    seen = []
    for rank in range(2):
        ds = PackedTokenDataset(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=32,
                                dp_rank=rank, dp_world_size=2, infinite=False)
        seen.append(set(stream_documents(tok, ds)))
    assert not seen[0] & seen[1]
    assert len(seen[0]) > 115 and len(seen[1]) > 115


def test_stdlib_shards_differ(tok):
    batches = [next(iter(build_dataloader(dataset="stdlib", dataset_path=None, tokenizer=tok, seq_len=64,
                                          local_batch_size=2, dp_rank=r, dp_world_size=2)))[0] for r in range(2)]
    assert not torch.equal(batches[0], batches[1])


def test_too_few_documents_for_a_rank(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "tiny.jsonl", ["a", "b", "c"])  # doc 0 validation, docs 1, 2 train
    ds = PackedTokenDataset(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=4,
                            dp_rank=2, dp_world_size=3)
    with pytest.raises(ValueError) as e:
        next(iter(ds))
    one_line_error(e, "tiny.jsonl", "rank 2 of 3", "no documents")
    # A finite (validation) stream that is too short is empty with a warning, not a mid-run crash.
    ds = PackedTokenDataset(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=64,
                            split="validation", infinite=False)
    assert list(ds) == []
    assert "tiny.jsonl" in caplog.text and "fewer than seq_len + 1" in caplog.text


def test_infinite_training_loops_epochs(tmp_path, tok):
    path = numbered_docs(tmp_path, 20)
    ds = PackedTokenDataset(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=8)
    it = iter(ds)
    for _ in range(200):
        next(it)
    assert ds.state_dict()["epoch"] >= 2


# ---------------------------------------------------------------------------------------- the loader

def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("consumed", [0, 3, 37])
def test_loader_resumes_exactly(tok, consumed):
    kwargs = dict(dataset="stdlib", dataset_path=None, tokenizer=tok, seq_len=96, local_batch_size=3)
    loader = build_dataloader(**kwargs)
    it = iter(loader)
    x, y = next(it)
    assert x.shape == y.shape == (3, 96) and x.dtype == torch.int64
    take(it, consumed)
    # Through pickle, as a checkpoint would store it.
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    reference = take(it, 4)

    resumed = build_dataloader(**kwargs)
    resumed.load_state_dict(state)
    assert_same_batches(take(iter(resumed), 4), reference)


def test_loader_state_before_iteration(tok):
    kwargs = dict(dataset="stdlib", dataset_path=None, tokenizer=tok, seq_len=32, local_batch_size=2)
    loader = build_dataloader(**kwargs)
    state = copy.deepcopy(loader.state_dict())
    reference = take(iter(loader), 2)
    resumed = build_dataloader(**kwargs)
    resumed.load_state_dict(state)
    assert_same_batches(take(iter(resumed), 2), reference)


def test_prefetching_loader_changes_no_batch_and_resumes_at_the_batch_held_ahead(tok):
    from titan_fp8.parallel import RowStreamLoader

    def rows():  # the trainer's loader: one stream per global-batch row
        return RowStreamLoader(lambda row, n: build_dataloader(dataset="stdlib", dataset_path=None, tokenizer=tok,
                                                               seq_len=64, local_batch_size=1, dp_rank=row,
                                                               dp_world_size=n),
                               global_batch=2, local_batch=2, dp_rank=0, dp_degree=1)

    plain = take(iter(rows()), 8)
    loader = PrefetchingLoader(rows())
    it = iter(loader)
    got = take(it, 3)
    it.fetch_ahead()
    it.fetch_ahead()  # already holding one: no-op
    # a checkpoint written now (after "step 3", batch 4 already read) must resume at batch 4
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    got += take(it, 3)
    assert_same_batches(got, plain[:6])
    resumed = PrefetchingLoader(rows())
    resumed.load_state_dict(state)
    resumed_it = iter(resumed)
    assert_same_batches(take(resumed_it, 3), plain[3:6])
    # holding nothing ahead, the state is the wrapped loader's own
    again = PrefetchingLoader(rows())
    again.load_state_dict(pickle.loads(pickle.dumps(resumed.state_dict())))
    assert_same_batches(take(iter(again), 2), plain[6:8])


def test_loader_resumes_across_epochs_and_ranks(tmp_path, tok):
    path = numbered_docs(tmp_path, 40)
    kwargs = dict(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=20, local_batch_size=2,
                  dp_rank=1, dp_world_size=2)
    loader = build_dataloader(**kwargs)
    it = iter(loader)
    take(it, 13)
    state = copy.deepcopy(loader.state_dict())
    reference = take(it, 30)  # crosses several epoch boundaries (each epoch is ~7 windows per rank)
    resumed = build_dataloader(**kwargs)
    resumed.load_state_dict(state)
    assert_same_batches(take(iter(resumed), 30), reference)
    # The state records the epoch and a partially consumed document.
    ds_state = state["dataset_state"]
    assert ds_state["epoch"] >= 1 and ds_state["buffer"]


def test_loader_state_from_another_world_size_is_rejected(tok):
    kwargs = dict(dataset="stdlib", dataset_path=None, tokenizer=tok, seq_len=16, local_batch_size=1)
    loader = build_dataloader(**kwargs)
    next(iter(loader))
    state = loader.state_dict()
    other = build_dataloader(**kwargs, dp_rank=0, dp_world_size=2)
    other.load_state_dict(state)
    with pytest.raises(ValueError) as e:
        next(iter(other))
    one_line_error(e, "dp_world_size")


def test_validation_loader_is_finite_and_repeatable(tmp_path, tok):
    path = numbered_docs(tmp_path, 250)
    loader = build_dataloader(dataset="jsonl", dataset_path=str(path), tokenizer=tok, seq_len=4,
                              local_batch_size=2, split="validation", infinite=False)
    first = list(loader)
    assert first and all(x.shape[1] == 4 for x, _ in first)
    take(iter(loader), 1)  # an evaluation that stops early ...
    assert_same_batches(list(loader), first)  # ... does not shift the next one


@pytest.mark.parametrize("arg,value", [
    ("seq_len", 1), ("seq_len", 0), ("seq_len", "8"), ("seq_len", 8.0),
    ("local_batch_size", 0), ("local_batch_size", -2), ("local_batch_size", None),
    ("dp_rank", 2), ("dp_rank", -1), ("dp_world_size", 0), ("split", "test"),
])
def test_bad_loader_arguments(tok, arg, value):
    kwargs = dict(dataset="stdlib", dataset_path=None, tokenizer=tok, seq_len=8, local_batch_size=2,
                  dp_rank=0, dp_world_size=2)
    kwargs[arg] = value
    with pytest.raises(ValueError) as e:
        build_dataloader(**kwargs)
    one_line_error(e, arg)


def test_data_package_does_not_import_the_trainer():
    # Architecture contract: components receive narrow arguments, never the job config.
    forbidden = ("titan_fp8.config", "titan_fp8.trainer", "titan_fp8.models", "titan_fp8.float8")
    for source in (Path(__file__).parents[1] / "titan_fp8" / "data").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                name = ("." * node.level) + (node.module or "")
                assert not name.startswith(forbidden) and not name.startswith("..")
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith(forbidden) for a in node.names), source

"""Hostile inputs: each is a one-line `error: ...` naming the problem, the documented exit code, no
traceback, and nothing that existed before the run is changed or removed.

Most cases call `train.py`'s `main(argv)` in-process; a few run it as a subprocess; the artifact cases call
`scripts/generate.py`'s `main(argv)` on an artifact written by `scripts/export.py`."""

import hashlib
import os
import shutil
import subprocess
import sys
from importlib.util import module_from_spec, spec_from_file_location

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402

TINY = ["--model.n_layers", "2", "--training.seq_len", "64", "--training.local_batch_size", "4",
        "--training.steps", "1", "--training.deterministic", "--metrics.no_enable_tensorboard",
        "--validation.no_enable"]


def _script(name):
    spec = spec_from_file_location(f"titan_fp8_hostile_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def one_thread():  # the tiny model on 2 shared cores: oversubscribed OpenMP threads only slow it down
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real 1-step checkpoint of the tiny model (dump folder) and a bf16 artifact exported from it."""
    dump = tmp_path_factory.mktemp("good")
    argv = ["--config", os.path.join(REPO, "configs", "debug.toml"), "--job.dump_folder", str(dump), *TINY,
            "--checkpoint.enable", "--checkpoint.no_last_save_model_only"]
    assert train.main(argv) == 0
    artifact = tmp_path_factory.mktemp("artifact") / "bf16"
    _script("export").export(str(dump / "checkpoint" / "step-1"), "bf16", str(artifact))
    return {"checkpoint": dump / "checkpoint", "artifact": artifact}


# -- case builders: (workspace, good) -> argv; they write their input files into the workspace --------------


def cfg(*extra):
    """Tiny trainer run with the dump folder in the workspace."""
    def make(ws, good):
        return ["--config", os.path.join(REPO, "configs", "debug.toml"), "--job.dump_folder", str(ws / "dump"),
                *TINY, *[a.format(ws=ws) for a in extra]]
    return make


def toml(text, *extra):
    def make(ws, good):
        path = ws / "job.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["--config", str(path), *extra]
    return make


def data(kind, content, name):
    def make(ws, good):
        path = ws / name
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        return cfg("--training.dataset", kind, "--training.dataset_path", str(path))(ws, good)
    return make


def tokenizer(content):
    def make(ws, good):
        path = ws / "tokenizer.model"
        path.write_bytes(content)
        return cfg("--model.tokenizer_path", str(path))(ws, good)
    return make


def with_checkpoint(corrupt=None, *extra):
    def make(ws, good):
        shutil.copytree(good["checkpoint"], ws / "dump" / "checkpoint")
        if corrupt:
            corrupt(ws / "dump" / "checkpoint" / "step-1")
        return cfg("--checkpoint.enable", *extra)(ws, good)
    return make


def truncate_shard(step_dir):
    shard = step_dir / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 1)


def dump_under_file(ws, good):
    (ws / "a_file").write_text("not a folder")
    return cfg()(ws, good)[:-len(TINY)] + ["--job.dump_folder", str(ws / "a_file" / "dump"), *TINY]


def dump_is_file(ws, good):
    (ws / "a_file").write_text("not a folder")
    return [a if a != str(ws / "dump") else str(ws / "a_file") for a in cfg()(ws, good)]


def checkpoint_folder_is_file(ws, good):
    (ws / "dump" / "ckpt").write_text("not a folder")
    return cfg("--checkpoint.enable", "--checkpoint.folder", "ckpt")(ws, good)


def artifact(tamper, *extra):
    def make(ws, good):
        art = ws / "artifact"
        shutil.copytree(good["artifact"], art)
        tamper(art / "model.safetensors")
        return ["--artifact", str(art), "--prompt", "def ", "--max_new_tokens", "1", "--no_warmup", *extra]
    return make


def flip_header_scheme(weights):
    data = weights.read_bytes()
    old = b'\\"scheme\\": \\"bf16\\"'  # inside the JSON string __metadata__.titan_fp8 of the header
    assert old in data
    weights.write_bytes(data.replace(old, b'\\"scheme\\": \\"bf17\\"', 1))  # same length


def grow_header_length(weights):
    data = bytearray(weights.read_bytes())
    data[0:8] = (int.from_bytes(data[0:8], "little") + 10 ** 9).to_bytes(8, "little")
    weights.write_bytes(bytes(data))


def run_main(argv, capsys):
    rc = train.main(argv)
    return rc, capsys.readouterr().err


def run_subprocess(argv, capsys):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *argv], capture_output=True, text=True,
                          timeout=180, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return proc.returncode, proc.stderr


def run_generate(argv, capsys):
    rc = _script("generate").main(argv)
    return rc, capsys.readouterr().err


SUB, GEN = run_subprocess, run_generate

CASES = [
    # id, argv builder, expected fragment of the error line, exit code, runner
    ("toml-malformed", toml("[training\nsteps = 3\n"), "job.toml: malformed TOML: ", 2, SUB),
    ("toml-duplicate-key", toml("[training]\nsteps = 1\nsteps = 2\n"), "malformed TOML: Cannot overwrite a value", 2, None),
    ("toml-binary", toml(b"\xff\xfe\x00\x01binary"), "job.toml: not a UTF-8 TOML file", 2, None),
    ("toml-not-a-table", toml("steps = 3\n"), "top-level key 'steps' must be a [section] table", 2, None),
    ("toml-unknown-key", toml("[optimizer]\nlrr = 1.0\n"), "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)", 2, None),
    ("toml-wrong-type", toml('[training]\nsteps = "many"\n'), "training.steps: expected an integer, got str 'many'", 2, None),
    ("cli-unknown-key", cfg("--training.stesp", "3"), "unknown key 'training.stesp' (did you mean 'training.steps'?)", 2, None),
    ("cli-unknown-section", cfg("--trainng.steps", "3"), "unknown section [trainng]", 2, None),
    ("cli-wrong-type-int", cfg("--training.steps", "ten"), "--training.steps: expected an integer, got 'ten'", 2, None),
    ("cli-wrong-type-bool", cfg("--training.deterministic=maybe"), "--training.deterministic: expected a boolean", 2, None),
    ("cli-wrong-type-list", cfg("--optimizer.betas", "a,b"), "--optimizer.betas: expected a number, got 'a'", 2, None),
    ("seq-len-1", cfg("--training.seq_len", "1"), "training.seq_len: must be >= 2, got 1", 2, None),
    ("seq-len-not-int", cfg("--training.seq_len", "6.4"), "--training.seq_len: expected an integer, got '6.4'", 2, None),
    ("seq-len-absurd", cfg("--training.seq_len", "1000000000"), "training.seq_len=1000000000 with local_batch_size=4: "
                                                                "one micro-batch's fp32 logits", 2, None),
    ("dp-shard-gt-world", cfg("--parallelism.data_parallel_shard_degree", "2"),
     "parallelism.data_parallel_shard_degree (2) x data_parallel_replicate_degree (1) = 2, but the world size is 1", 2, None),
    ("dp-replicate-gt-world", cfg("--parallelism.data_parallel_replicate_degree", "3"),
     "data_parallel_replicate_degree=3 does not divide the world size 1", 2, None),
    ("tp-degree", cfg("--parallelism.tensor_parallel_degree", "2"), "parallelism.tensor_parallel_degree > 1", 2, None),
    ("global-batch", cfg("--training.global_batch_size", "6"), "training.global_batch_size=6 must be a multiple", 2, None),
    ("data-missing", cfg("--training.dataset", "text", "--training.dataset_path", "{ws}/nope.txt"),
     "training.dataset_path: not found: ", 2, None),
    ("data-empty", data("text", b"", "empty.txt"), "empty.txt is empty (no documents)", 2, None),
    ("data-binary", data("text", b"\x7fELF\x00\x01\x02" * 100, "bin.txt"), "bin.txt: looks binary (contains NUL bytes)", 2, None),
    ("data-not-utf8", data("text", b"caf\xe9 au lait\n", "latin1.txt"), "latin1.txt: not UTF-8 text (invalid byte 0xe9", 2, None),
    ("data-empty-folder", data("text", None, "corpus"), "corpus contains no .txt files", 2, None),
    ("jsonl-bad-line", data("jsonl", b'{"text": "a"}\nnot json\n', "d.jsonl"), "d.jsonl line 2: not valid JSON", 2, None),
    ("jsonl-no-text", data("jsonl", b'{"body": "x"}\n', "d.jsonl"), "d.jsonl line 1: expected a JSON object with a 'text' field", 2, None),
    ("tokenizer-random-bytes", tokenizer(bytes(range(256)) * 16), "tokenizer.model is not a sentencepiece model", 2, None),
    ("tokenizer-text-file", tokenizer(b"hello world\n" * 50), "tokenizer.model is not a sentencepiece model", 2, None),
    ("tokenizer-missing", cfg("--model.tokenizer_path", "{ws}/none.model"), "model.tokenizer_path: file not found", 2, None),
    ("tokenizer-is-a-directory", cfg("--model.tokenizer_path", "{ws}"), "is a directory; expected a sentencepiece .model file",
     2, None),
    ("ckpt-other-n-layers", with_checkpoint(None, "--model.n_layers", "1"),
     "checkpoint/step-1: checkpoint was saved for a different model: it has 'layers.1.", 2, SUB),
    ("ckpt-other-vocab", with_checkpoint(None, "--model.vocab_size", "4352"),
     "checkpoint/step-1: checkpoint was saved for a different model: 'tok_embeddings.weight' has shape (4096, 256) "
     "in the checkpoint, (4352, 256) in this model (model args differ, checkpoint vs this run: vocab_size 4096 vs 4352)",
     2, None),
    ("ckpt-all-corrupted", with_checkpoint(truncate_shard), "dump/checkpoint: no usable checkpoint (step-1: "
                                                             "__0_0.distcp is truncated", 2, None),
    ("ckpt-load-step-missing", with_checkpoint(None, "--checkpoint.load_step", "7"),
     "checkpoint.load_step=7: no complete checkpoint at", 2, None),
    ("dump-under-a-file", dump_under_file, "job.dump_folder: cannot write to", 2, None),
    ("dump-is-a-file", dump_is_file, "job.dump_folder: cannot write to", 2, SUB),
    ("ckpt-folder-is-a-file", checkpoint_folder_is_file, "checkpoint.folder: cannot write to", 2, None),
    ("float8-filters-everything", cfg("--float8.enable", "--float8.filter_fqns", "layers,output"),
     "no Linear was converted to float8", 2, None),
    ("cli-nonfinite-number", cfg("--optimizer.lr", "inf"), "--optimizer.lr: expected a finite number, got 'inf'", 2, None),
    ("toml-nonfinite-number", toml("[optimizer]\nlr = nan\n"), "job.toml: optimizer.lr: expected a finite number, got nan",
     2, None),
    ("lr-huge-caught-by-nonfinite-guard", cfg("--optimizer.lr", "1e30", "--training.steps", "3"),
     "step 2: grad norm nan, first non-finite gradient in tok_embeddings.weight", 1, None),
    ("artifact-tampered-header", artifact(flip_header_scheme), "model.safetensors: sha256 mismatch", 2, GEN),
    ("artifact-tampered-header-no-verify", artifact(flip_header_scheme, "--no_verify"),
     "config.json and model.safetensors disagree on 'scheme'", 2, GEN),
    ("artifact-header-length", artifact(grow_header_length, "--no_verify"), "model.safetensors: cannot read", 2, GEN),
]


def snapshot(root):
    """{relative path: content} of every file under root (small files: the inputs of one case)."""
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest(), os.path.getsize(path)
    return out


def unchanged_or_appended(root, before):
    """Files that existed are still there, with their old bytes as a prefix (logs may grow)."""
    damaged = []
    for rel, (digest, size) in before.items():
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            damaged.append(f"{rel} removed")
            continue
        with open(path, "rb") as f:
            if hashlib.sha256(f.read(size)).hexdigest() != digest:
                damaged.append(f"{rel} changed")
    return damaged


@pytest.mark.parametrize("name,make,fragment,rc,runner", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_error_and_damages_nothing(tmp_path, good, capsys, name, make, fragment, rc,
                                                             runner):
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # an earlier run's results
    (dump / "notes.txt").write_text("precious")
    argv = make(tmp_path, good)
    before = snapshot(tmp_path)
    got_rc, err = (runner or run_main)(argv, capsys)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert got_rc == rc, err[-2000:]
    assert len(errors) == 1 and fragment in errors[0], err[-2000:]
    assert "Traceback" not in err
    assert unchanged_or_appended(tmp_path, before) == []


def test_at_least_25_hostile_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)

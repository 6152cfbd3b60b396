"""Config loading: defaults < TOML < CLI, --help, and one-line errors with exit code 2 for bad input."""

import os
import subprocess
import sys

import pytest

from titan_fp8.config import ConfigError, JobConfig, help_text, load_config
from titan_fp8.models import llama3_flavors


def test_defaults_toml_cli_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[training]\nsteps = 7\nseq_len = 64\n[optimizer]\nlr = 0.01\n')
    cfg = load_config(["--config", str(toml), "--training.steps", "9"])
    assert cfg.training.steps == 9            # CLI beats TOML
    assert cfg.training.seq_len == 64         # TOML beats defaults
    assert cfg.optimizer.lr == 0.01
    assert cfg.training.local_batch_size == JobConfig().training.local_batch_size  # default


def test_cli_forms():
    cfg = load_config(["--training.steps=3", "--float8.enable", "--checkpoint.no_last_save_model_only",
                       "--training.deterministic", "false", "--optimizer.betas", "0.8,0.9",
                       "--model.converters=float8", "--lr_scheduler.decay_ratio", "0.25"])
    assert cfg.training.steps == 3
    assert cfg.float8.enable is True and cfg.float8_enabled
    assert cfg.checkpoint.last_save_model_only is False
    assert cfg.training.deterministic is False
    assert cfg.optimizer.betas == [0.8, 0.9]
    assert cfg.model.converters == ["float8"]
    assert cfg.lr_scheduler.decay_ratio == 0.25
    assert load_config(["--lr_scheduler.decay_ratio", "none"]).lr_scheduler.decay_ratio is None


def test_help_lists_every_option():
    text = help_text()
    for section in ("job", "model", "optimizer", "lr_scheduler", "training", "parallelism", "checkpoint",
                    "activation_checkpoint", "compile", "float8", "qat", "metrics", "validation", "profiling"):
        assert f"[{section}]" in text
    assert "--training.global_batch_size" in text and "(default: -1" in text
    assert "--float8.recipe_name" in text and "tensorwise|rowwise|rowwise_with_gw_hp|delayed" in text


def test_configs_in_repo_load(repo_root):
    names = ("debug", "llama3_small", "llama3_8b", "llama3_70b", "llama3_405b")
    assert sorted(f"{n}.toml" for n in names) == sorted(os.listdir(os.path.join(repo_root, "configs")))
    for name in names:
        cfg = load_config(["--config", os.path.join(repo_root, "configs", f"{name}.toml")])
        assert cfg.model.name == "llama3"
        assert cfg.model.flavor in llama3_flavors


def _write(tmp_path, text):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    return str(p)


BAD_CASES = [
    # (name, argv builder, expected fragment)
    ("unknown key", lambda d: ["--training.stesp", "3"], "unknown key 'training.stesp' (did you mean 'training.steps'?)"),
    ("unknown section", lambda d: ["--trainng.steps", "3"], "unknown section [trainng] (did you mean 'training'?)"),
    ("wrong type cli", lambda d: ["--training.steps", "ten"], "--training.steps: expected an integer, got 'ten'"),
    ("bad bool", lambda d: ["--training.deterministic=maybe"], "expected a boolean"),
    ("bad choice", lambda d: ["--float8.recipe_name", "rowwse"], "float8.recipe_name: expected one of"),
    ("negative lr", lambda d: ["--optimizer.lr", "-1"], "optimizer.lr: must be > 0"),
    ("missing config file", lambda d: ["--config", os.path.join(d, "nope.toml")], "file not found"),
    ("malformed toml", lambda d: ["--config", _write_p(d, "[training\nsteps=1")], "malformed TOML"),
    ("wrong type toml", lambda d: ["--config", _write_p(d, '[training]\nsteps = "many"\n')],
     "training.steps: expected an integer, got str 'many'"),
    ("toml typo key", lambda d: ["--config", _write_p(d, "[optimizer]\nlrr = 1.0\n")],
     "unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"),
    ("missing tokenizer", lambda d: ["--model.tokenizer_path", os.path.join(d, "none.model")],
     "model.tokenizer_path: file not found"),
    ("dataset path missing", lambda d: ["--training.dataset", "jsonl"], "training.dataset_path: required"),
    ("dataset path not found", lambda d: ["--training.dataset", "text", "--training.dataset_path",
                                          os.path.join(d, "nothing.txt")], "training.dataset_path: not found"),
    ("bad seq_len", lambda d: ["--training.seq_len", "1"], "training.seq_len: must be >= 2"),
    ("betas", lambda d: ["--optimizer.betas", "0.9"], "optimizer.betas: expected two numbers"),
    ("selective option", lambda d: ["--activation_checkpoint.selective_ac_option", "some"],
     "activation_checkpoint.selective_ac_option"),
    ("group size", lambda d: ["--qat.group_size", "48"], "qat.group_size: expected 32, 64, 128 or 256"),
    ("range learning scheme", lambda d: ["--qat.scheme", "int4_weight_only", "--qat.range_learning"],
     "qat.range_learning: needs symmetric integer weights"),
    ("scale lr ratio", lambda d: ["--qat.scale_lr_ratio", "0"], "qat.scale_lr_ratio: must be > 0"),
    ("scale init without learned scales", lambda d: ["--qat.scale_init", "activation_mse"],
     "qat.scale_init: activation_mse sets the starting value of learned scales: it needs qat.range_learning"),
    ("scale init value", lambda d: ["--qat.range_learning", "--qat.scale_init", "best"], "qat.scale_init"),
    ("fp8 all-gather recipe", lambda d: ["--float8.enable", "--float8.recipe_name", "rowwise",
                                         "--float8.enable_fsdp_float8_all_gather"],
     "float8.enable_fsdp_float8_all_gather: needs recipe tensorwise or delayed"),
    ("converter typo", lambda d: ["--model.converters", "flaot8"], "unknown converter 'flaot8'"),
    ("stray argument", lambda d: ["configs/debug.toml"], "unexpected argument"),
    ("top-level key", lambda d: ["--config", _write_p(d, "steps = 3\n")], "must be a [section] table"),
]


def _write_p(d, text):
    path = os.path.join(d, f"bad_{abs(hash(text))}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("name,argv,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_one_line_error(tmp_path, name, argv, expected):
    with pytest.raises(ConfigError) as e:
        load_config(argv(str(tmp_path)))
    message = str(e.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("name,argv,expected", [BAD_CASES[0], BAD_CASES[7]], ids=["unknown-key", "malformed"])
def test_train_py_exits_2_with_one_line(tmp_path, repo_root, name, argv, expected):
    proc = subprocess.run([sys.executable, os.path.join(repo_root, "train.py"), *argv(str(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]


def test_train_py_help(repo_root):
    proc = subprocess.run([sys.executable, os.path.join(repo_root, "train.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--checkpoint.keep_latest_k" in proc.stdout

"""Export -> artifact -> generate: sizes, bit-identical save/load, QAT reproduction, hostile artifacts, CLI end to end.

One tiny QAT run (2 layers, seq 64, batch 4, 4 steps, 8da4w from step 2, checkpoints every 2 steps) is
shared by the module.
"""

import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
from importlib.util import module_from_spec, spec_from_file_location

import pytest
import torch

from titan_fp8.config import load_config
from titan_fp8.data import build_dataloader, build_tokenizer
from titan_fp8.quant import (QuantizedTensor, QuantScheme, install_state_, prepare_qat_, quantize_, read_artifact,
                             save_artifact)
from titan_fp8.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = ("bf16", "int4_weight_only", "int8_weight_only", "int8_dynamic_activation_int4_weight", "float8_dynamic")
QAT_SCHEME = "int8_dynamic_activation_int4_weight"


def _script(name):
    spec = spec_from_file_location(f"titan_fp8_script_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    mod = module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


export_script = _script("export")
generate_script = _script("generate")


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    dump = tmp_path_factory.mktemp("qat_run")
    argv = ["--config", os.path.join(REPO, "configs", "debug.toml"), "--job.dump_folder", str(dump),
            "--model.n_layers", "2", "--training.seq_len", "64", "--training.local_batch_size", "4",
            "--training.steps", "4", "--lr_scheduler.warmup_steps", "2", "--metrics.no_enable_tensorboard",
            "--validation.no_enable", "--checkpoint.enable", "--checkpoint.interval", "2",
            "--qat.enable", "--qat.scheme", QAT_SCHEME, "--qat.start_step", "2"]
    Trainer(load_config(argv)).train()
    ckpt = dump / "checkpoint" / "step-4"
    assert (ckpt / "manifest.json").is_file()
    return ckpt


@pytest.fixture(scope="module")
def artifacts(qat_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts")
    sizes = {}
    for scheme in SCHEMES:
        config, _ = export_script.export(str(qat_run), scheme, str(out / scheme))
        sizes[scheme] = config["files"]["model.safetensors"]["size"]
    return out, sizes


def run_generate(capsys, *argv):
    rc = generate_script.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def tokens(n=24):
    return torch.randint(0, 4096, (2, n), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------------
# Sizes, save/load, QAT reproduction
# --------------------------------------------------------------------------------------------------


def test_int4_artifacts_are_under_0_3x_bf16(artifacts):
    _, sizes = artifacts
    for scheme in ("int4_weight_only", "int8_dynamic_activation_int4_weight"):
        assert sizes[scheme] <= 0.3 * sizes["bf16"], (scheme, sizes)
    assert sizes["int8_weight_only"] <= 0.55 * sizes["bf16"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_load_gives_bit_identical_logits(qat_run, tmp_path, scheme):
    model, manifest = export_script.load_checkpoint(str(qat_run))
    if scheme != "bf16":
        quantize_(model, QuantScheme.from_name(scheme, 32), dtype=torch.bfloat16)
    state = {k: v if isinstance(v, QuantizedTensor) else v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_artifact(str(tmp_path / "a"), state, scheme=scheme, group_size=32, dtype=torch.bfloat16,
                  model_args=manifest["model_args"])
    _, loaded = read_artifact(str(tmp_path / "a"))
    for name, t in state.items():  # every stored tensor comes back bit for bit
        if isinstance(t, QuantizedTensor):
            assert all(torch.equal(a, b) for a, b in zip(t.fields().values(), loaded[name].fields().values()))
        else:
            assert torch.equal(t, loaded[name])
    in_memory = export_script.build_model(manifest["model_args"])
    install_state_(in_memory, state)
    from titan_fp8.models.llama3 import precompute_rope_cache
    in_memory.rope_cache = precompute_rope_cache(in_memory.args)
    reloaded, _, _, _ = generate_script.load_model(str(tmp_path / "a"), dtype=torch.bfloat16, kernels=False)
    with torch.no_grad():
        assert torch.equal(in_memory(tokens()), reloaded(tokens()))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_tensors_own_aligned_memory(artifacts, scheme):
    # safetensors maps the file and a tensor's offset depends on the header's length; the CPU int8/int4
    # kernels crashed (SIGSEGV) on such misaligned views, so the loader copies into fresh 64-byte-aligned memory.
    out, _ = artifacts
    _, state = read_artifact(str(out / scheme))
    for name, t in state.items():
        for field in (t.fields().values() if isinstance(t, QuantizedTensor) else [t]):
            assert field.data_ptr() % 64 == 0, name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_artifact_logits_are_identical_across_loads(artifacts, scheme):
    out, _ = artifacts
    a, _, _, ka = generate_script.load_model(str(out / scheme))
    b, _, _, _ = generate_script.load_model(str(out / scheme))
    with torch.no_grad():
        la, lb = a(tokens()), b(tokens())
    assert torch.equal(la, lb)
    if scheme != "bf16":
        assert ka.converted and not ka.skipped  # every Linear runs a low-precision kernel on CPU


def test_qat_export_reproduces_fake_quantised_forward(qat_run, tmp_path):
    # Export with the QAT run's scheme, group and filter, in fp32: the artifact's reference path is the
    # fake-quantised forward bit for bit; the CPU kernels stay within 40 dB SQNR of it.
    model, _ = export_script.load_checkpoint(str(qat_run))
    prepare_qat_(model, QuantScheme.from_name(QAT_SCHEME, 32), ["output"])
    export_script.export(str(qat_run), QAT_SCHEME, str(tmp_path / "a"), filter_fqns=["output"], dtype="float32")
    ref, _, _, _ = generate_script.load_model(str(tmp_path / "a"), kernels=False)
    fast, _, _, _ = generate_script.load_model(str(tmp_path / "a"), kernels=True)
    with torch.no_grad():
        fake, r, f = model(tokens()), ref(tokens()), fast(tokens())
    assert torch.equal(fake, r)
    err = (fake - f).pow(2).mean()
    assert 10 * torch.log10(fake.pow(2).mean() / err) > 40


def test_range_learning_resumes_a_plain_run_and_exports_its_learned_scales(qat_run, tmp_path, caplog):
    # A QAT run with learned scales continues the plain QAT run's step-2 checkpoint (which has no scales:
    # they start from the weights' ranges, with fresh optimizer state, in their own lr group).
    dump = tmp_path / "rl"
    shutil.copytree(qat_run.parent / "step-2", dump / "checkpoint" / "step-2")
    argv = ["--config", os.path.join(REPO, "configs", "debug.toml"), "--job.dump_folder", str(dump),
            "--model.n_layers", "2", "--training.seq_len", "64", "--training.local_batch_size", "4",
            "--training.steps", "4", "--lr_scheduler.warmup_steps", "2", "--metrics.no_enable_tensorboard",
            "--validation.no_enable", "--checkpoint.enable", "--checkpoint.interval", "2",
            "--qat.enable", "--qat.scheme", QAT_SCHEME, "--qat.start_step", "2", "--qat.range_learning",
            "--qat.scale_lr_ratio", "0.1"]
    with caplog.at_level(logging.INFO):
        trainer = Trainer(load_config(argv))
        trainer.train()
    assert "lacks 16 model keys that start fresh" in caplog.text
    assert "resuming at step 2" in caplog.text
    weights, scales = trainer.optimizer.param_groups
    assert len(scales["params"]) == 16 and scales["weight_decay"] == 0.0
    assert scales["lr"] == pytest.approx(0.1 * weights["lr"])
    ckpt = dump / "checkpoint" / "step-4"
    scheme = QuantScheme.from_name(QAT_SCHEME, 32)
    model, _ = export_script.load_checkpoint(str(ckpt), lambda m: prepare_qat_(m, scheme, range_learning=True))
    learned = model.layers["0"].attention.wq.weight_scale
    from_range = scheme.weight.choose_qparams(model.layers["0"].attention.wq.weight)[0].float()
    assert (learned != 0).all() and not torch.equal(learned, from_range)  # trained away from the range
    # Export uses the learned scales: its reference path is the learned-scale fake-quantised forward.
    export_script.export(str(ckpt), QAT_SCHEME, str(tmp_path / "a"), dtype="float32")
    ref, _, _, _ = generate_script.load_model(str(tmp_path / "a"), kernels=False)
    assert torch.equal(ref.layers["0"].attention.wq.weight.scale, scheme.weight.stored_scale(learned))
    with torch.no_grad():
        assert torch.equal(model(tokens()), ref(tokens()))
    # Another scheme has no learned scales: it quantises from the weights' ranges, as PTQ.
    _, report = export_script.export(str(ckpt), "int8_weight_only", str(tmp_path / "b"), dtype="float32")
    other, _, _, _ = generate_script.load_model(str(tmp_path / "b"), kernels=False)
    w = model.layers["0"].attention.wq.weight
    assert len(report.converted) == 16
    assert torch.equal(other.layers["0"].attention.wq.weight.scale,
                       QuantScheme.from_name("int8_weight_only").weight.choose_qparams(w)[0])


def test_export_from_model_only_save_and_errors(qat_run, tmp_path):
    model_only = qat_run.parent / "step-4-model"
    assert model_only.is_dir()
    config, report = export_script.export(str(model_only), "int4_weight_only", str(tmp_path / "m"))
    assert config["source"]["step"] == 4 and len(report.converted) == 16  # 14 Linears + output + embedding
    assert config["tokenizer"]["vocab_size"] == 4096
    rc = export_script.main(["--checkpoint", str(model_only), "--scheme", "int4_weight_only", "--output",
                             str(tmp_path / "m")])
    assert rc == 2  # exists, no --overwrite
    assert export_script.main(["--checkpoint", str(tmp_path), "--scheme", "bf16", "--output", str(tmp_path / "x")]) == 2
    assert export_script.main(["--checkpoint", str(qat_run), "--scheme", "int4_weight_only", "--group_size", "48",
                               "--output", str(tmp_path / "y")]) == 2


# --------------------------------------------------------------------------------------------------
# Hostile artifacts: each one line on stderr, exit code 2
# --------------------------------------------------------------------------------------------------


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _one_line_error(capsys, artifact, *extra, match):
    rc, out, err = run_generate(capsys, "--artifact", str(artifact), "--prompt", "x", "--max_new_tokens", "2", *extra)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err
    return lines[0]


def _edit_config(path, fn):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    fn(cfg)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_tampered_header(artifacts, tmp_path, capsys):
    art = _copy(artifacts[0] / "int4_weight_only", tmp_path / "a")
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    i = data.index(b'"shape":[') + len(b'"shape":[')  # same length: only the checksum can tell
    data[i] = ord("9") if data[i] != ord("9") else ord("8")
    weights.write_bytes(bytes(data))
    _one_line_error(capsys, art, match="sha256 mismatch")
    _one_line_error(capsys, art, "--no_verify", match="model.safetensors")  # the parser still refuses it


def test_truncated_file(artifacts, tmp_path, capsys):
    art = _copy(artifacts[0] / "int8_weight_only", tmp_path / "a")
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _one_line_error(capsys, art, match="truncated")


def test_wrong_version(artifacts, tmp_path, capsys):
    art = _copy(artifacts[0] / "bf16", tmp_path / "a")
    _edit_config(art, lambda c: c.update(format_version=2))
    _one_line_error(capsys, art, match="unsupported format_version 2")


def test_missing_tensor(qat_run, tmp_path, capsys):
    model, manifest = export_script.load_checkpoint(str(qat_run))
    state = dict(model.state_dict())
    del state["norm.weight"]  # a self-consistent artifact that lacks a parameter
    save_artifact(str(tmp_path / "a"), state, scheme="bf16", group_size=0, dtype=torch.float32,
                  model_args=manifest["model_args"], tokenizer_path=_tokenizer(qat_run), tokenizer_info={})
    _one_line_error(capsys, tmp_path / "a", match="missing tensor norm.weight")


def test_tensor_listed_but_absent_from_file(artifacts, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    art = _copy(artifacts[0] / "int8_dynamic_activation_int4_weight", tmp_path / "a")
    weights = str(art / "model.safetensors")
    with safe_open(weights, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "output.weight.scale"}
        meta = f.metadata()
    save_file(tensors, weights, metadata=meta)
    from titan_fp8.quant import sha256_file
    _edit_config(art, lambda c: c["files"]["model.safetensors"].update(size=os.path.getsize(weights),
                                                                      sha256=sha256_file(weights)))
    _one_line_error(capsys, art, match="missing tensor output.weight.scale")


def test_shape_mismatch(qat_run, tmp_path, capsys):
    model, manifest = export_script.load_checkpoint(str(qat_run))
    state = dict(model.state_dict())
    state["norm.weight"] = torch.ones(257)
    save_artifact(str(tmp_path / "a"), state, scheme="bf16", group_size=0, dtype=torch.float32,
                  model_args=manifest["model_args"], tokenizer_path=_tokenizer(qat_run), tokenizer_info={})
    _one_line_error(capsys, tmp_path / "a", match="shape mismatch for norm.weight")
    # a quantised tensor whose fields do not fit its scheme
    scheme = QuantScheme.from_name("int4_weight_only", 32)
    qt = QuantizedTensor.from_float(model.layers["0"].attention.wq.weight, scheme)
    bad = QuantizedTensor(qt.qdata, qt.scale[:, :-1].contiguous(), qt.zero_point, scheme=scheme, shape=qt.shape,
                          dtype=torch.float32)
    state = dict(model.state_dict(), **{"layers.0.attention.wq.weight": bad})
    save_artifact(str(tmp_path / "b"), state, scheme="int4_weight_only", group_size=32, dtype=torch.float32,
                  model_args=manifest["model_args"], tokenizer_path=_tokenizer(qat_run), tokenizer_info={})
    _one_line_error(capsys, tmp_path / "b", match="layers.0.attention.wq.weight: scale has shape")


def test_not_an_artifact_and_bad_json(tmp_path, capsys):
    _one_line_error(capsys, tmp_path, match="no config.json")
    (tmp_path / "config.json").write_text("{not json")
    _one_line_error(capsys, tmp_path, match="not valid JSON")


def test_loading_never_unpickles(artifacts, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickling during artifact load")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, tok, config, _ = generate_script.load_model(str(artifacts[0] / QAT_SCHEME))
    assert config["scheme"] == QAT_SCHEME and tok.vocab_size == 4096


def _tokenizer(_run):
    from titan_fp8.data import build_tokenizer

    return build_tokenizer(None, vocab_size=4096).model_path


# --------------------------------------------------------------------------------------------------
# The command line, end to end
# --------------------------------------------------------------------------------------------------


def test_cli_export_then_generate(qat_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "export.py"), "--checkpoint", str(qat_run),
                        "--scheme", QAT_SCHEME, "--output", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "16 modules quantised" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--artifact", str(out),
                        "--prompt", "def main(", "--max_new_tokens", "8"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def main(")
    assert "decode" in r.stdout and "tok/s" in r.stdout and "MiB" in r.stdout and "int4_tinygemm_cpu" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "generate.py"), "--artifact", str(tmp_path),
                        "--prompt", "x"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# scripts/qat_compare.py (torchao's arm is skipped here: torchao is not a test dependency)
# --------------------------------------------------------------------------------------------------


def test_qat_compare_arms(qat_run, tmp_path, capsys):
    qat_compare = _script("qat_compare")
    common = ["--checkpoint", str(qat_run), "--seq_len", "64", "--local_batch_size", "4", "--group_size", "32",
              "--warmup_batches", "1", "--no_torchao"]
    # No steps: the fp32 arm is the checkpoint and the QAT arm is exactly the PTQ model.
    assert qat_compare.main(common + ["--steps", "0", "--no_range_learning", "--json", str(tmp_path / "r0.json")]) == 0
    r0 = json.loads((tmp_path / "r0.json").read_text())
    arm0 = r0["arms"]["titan_fp8"]
    assert arm0["qat_loss"] == arm0["ptq_loss"] and arm0["recovery"] == 0.0
    assert r0["arms"]["torchao"] == {"skipped": "--no_torchao"}
    assert r0["arms"]["titan_fp8_range_learning"] == {"skipped": "--no_range_learning"}
    base, _ = export_script.load_checkpoint(str(qat_run))
    val = list(build_dataloader(dataset="stdlib", dataset_path=None, tokenizer=build_tokenizer(None, vocab_size=4096),
                                seq_len=256, local_batch_size=8, split="validation", infinite=False))
    # held out: the whole validation split in 8 x 256 batches (--eval_seq_len / --eval_batch_size defaults)
    assert r0["arms"]["fp32"]["loss"] == qat_compare.heldout_loss(base, val, torch.device("cpu"))
    assert arm0["ptq_loss"] > r0["arms"]["fp32"]["loss"]  # int4 costs something
    # Two steps: both arms train (their losses move) and the recovery is computed from them.
    assert qat_compare.main(common + ["--steps", "2", "--json", str(tmp_path / "r2.json")]) == 0
    r2 = json.loads((tmp_path / "r2.json").read_text())
    arm2 = r2["arms"]["titan_fp8"]
    assert r2["arms"]["fp32"]["loss"] != r0["arms"]["fp32"]["loss"] and arm2["qat_loss"] != arm0["qat_loss"]
    gap = arm2["ptq_loss"] - r2["arms"]["fp32"]["loss"]
    assert math.isclose(arm2["recovery"], (arm2["ptq_loss"] - arm2["qat_loss"]) / gap, rel_tol=1e-12)
    learned = r2["arms"]["titan_fp8_range_learning"]  # same PTQ reference, its own QAT result
    assert learned["ptq_loss"] == arm2["ptq_loss"] and learned["qat_loss"] not in (arm2["qat_loss"], arm0["qat_loss"])
    capsys.readouterr()
    assert qat_compare.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]

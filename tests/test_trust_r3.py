"""Trust, round three (issue 19): no prompt that runs code, pre-trained students that are what they claim, no
secret recorded, bounded inputs, one line for every bad value.

Each test reproduces one attack of the red-team report and asserts what replaces it. The run-folder, S3-lease and
cache-open points have their own files (train/test_run_folder_r3.py, cache/test_lease_r3.py,
cache/test_open_checks_r3.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kdcache
from kdcache.cache.reader import load_cache_tokenizer
from kdcache.errors import KDCacheError
from helpers import _one_error_line, run_cli

REPO = Path(__file__).resolve().parents[1]


# --- 1. no prompt, no code --------------------------------------------------------------------------------------

EVIL_CODE = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast


class EvilConfig(BertConfig):
    model_type = "evilbert"


class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig


class EvilTokenizer(BertTokenizerFast):
    pass
"""


def _hostile_hf_folder(folder: Path, tokenizer, marker: Path) -> Path:
    """A Hugging Face folder whose config.json and tokenizer_config.json name code of their own (auto_map), the
    way transformers' custom models do; the code writes `marker` when it is imported."""
    from teachers_for_tests import make_tiny_bert

    make_tiny_bert(folder, tokenizer)
    _plant_code(folder, marker)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilbert", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForSequenceClassification": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _plant_code(folder: Path, marker: Path) -> None:
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    tok_config = folder / "tokenizer_config.json"
    values = json.loads(tok_config.read_text()) if tok_config.is_file() else {}
    values.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    tok_config.write_text(json.dumps(values))


def _kdcache(args: list, stdin: str = "y\ny\ny\n", env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script in a child process whose stdin answers "y" to any prompt: a prompt would run the code."""
    return subprocess.run([sys.executable, "-m", "kdcache", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def _refused_without_running(proc: subprocess.CompletedProcess, marker: Path, *needles: str) -> None:
    assert not marker.exists(), f"the folder's code ran:\n{proc.stderr}"
    assert "[y/N]" not in proc.stdout + proc.stderr, "transformers prompted for custom code"
    _one_error_line(proc.returncode, proc.stderr, *needles)


def test_a_folder_naming_custom_code_is_refused_with_no_prompt_in_every_command(tmp_path, tiny_tokenizer,
                                                                                sst2_cache, sst2_copy):
    marker = tmp_path / "pwned"
    hostile = _hostile_hf_folder(tmp_path / "hostile", tiny_tokenizer, marker)
    tokenizer_only = tmp_path / "hostile-tokenizer"
    tiny_tokenizer.save_pretrained(str(tokenizer_only))
    _plant_code(tokenizer_only, marker)
    commands = {
        "distill --student": ["distill", "--cache", sst2_cache, "--student", hostile, "--out", tmp_path / "r1",
                              "--epochs", "1", "--device", "cpu", "--no-progress"],
        "cache-teacher --teacher": ["cache-teacher", "--teacher", hostile, "--task", "sst2", "--data", sst2_copy,
                                    "--out", tmp_path / "c.kdcache", "--no-progress"],
        "verify --teacher": ["verify", sst2_cache, "--teacher", hostile, "--device", "cpu"],
        "train --model": ["train", "--model", hostile, "--task", "sst2", "--data", sst2_copy, "--out", tmp_path / "r2",
                          "--epochs", "1", "--device", "cpu", "--no-progress"],
        "train --tokenizer": ["train", "--model", "mlp", "--task", "sst2", "--data", sst2_copy, "--tokenizer",
                              tokenizer_only, "--out", tmp_path / "r3", "--epochs", "1", "--device", "cpu",
                              "--no-progress"],
    }
    for name, args in commands.items():
        proc = _kdcache(args)
        _refused_without_running(proc, marker, "needs its own Python code", "--trust-model-code")
        folder = tokenizer_only if name == "train --tokenizer" else hostile
        assert str(folder) in proc.stderr, (name, proc.stderr)


def test_a_hostile_folder_runs_only_when_trusted(tmp_path, tiny_tokenizer):
    """--trust-model-code is the one way in: the same folder then loads (and its code runs, as asked)."""
    from kdcache.models.teachers import load_teacher

    marker = tmp_path / "ran"
    hostile = _hostile_hf_folder(tmp_path / "hostile", tiny_tokenizer, marker)
    with pytest.raises(KDCacheError, match="needs its own Python code"):
        load_teacher(str(hostile))
    assert not marker.exists()
    teacher = load_teacher(str(hostile), trust_model_code=True)
    assert marker.exists() and type(teacher.model).__name__ == "EvilModel"


def _swap_tokenizer_blob(cache: Path, files: dict[str, bytes], scratch: Path) -> None:
    """Replace a text cache's stored tokenizer by a zip of `files`, recorded with its own sha256 (as a hostile
    writer would record it)."""
    from kdcache.cache.writer import CacheWriter

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    CacheWriter(scratch, {}).add_blob("tokenizer", buffer.getvalue(), {})
    shutil.rmtree(cache / "tokenizer")
    shutil.copytree(scratch / "tokenizer", cache / "tokenizer")


def test_a_tokenizer_stored_in_a_cache_never_runs_its_code(tmp_path, tiny_tokenizer, sst2_cache, sst2_copy):
    marker = tmp_path / "pwned"
    folder = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(folder))
    _plant_code(folder, marker)
    hostile = tmp_path / "hostile.kdcache"
    shutil.copytree(sst2_cache, hostile)
    _swap_tokenizer_blob(hostile, {p.name: p.read_bytes() for p in folder.iterdir()}, tmp_path / "scratch.kdcache")

    with pytest.raises(KDCacheError, match=r"tokenizer: cannot load the stored tokenizer .*needs its own Python code"):
        load_cache_tokenizer(hostile)
    proc = _kdcache(["distill", "--cache", hostile, "--data", sst2_copy, "--student", "mlp", "--out", tmp_path / "run",
                     "--epochs", "1", "--device", "cpu", "--no-progress"])
    _refused_without_running(proc, marker, f"{hostile}", "stored tokenizer", "--trust-model-code")
    proc = _kdcache(["verify", hostile])
    assert not marker.exists() and "[y/N]" not in proc.stdout + proc.stderr
    assert proc.returncode == 1 and any(line.startswith("FAIL") and "needs its own Python code" in line
                                        for line in proc.stdout.splitlines()), proc.stdout + proc.stderr


# --- 7. --student-layers refuses weights it does not have -------------------------------------------------------

def test_student_layers_refuses_a_folder_whose_weights_lack_the_kept_layers(tmp_path, capsys, monkeypatch,
                                                                           tiny_tokenizer, sst2_cache):
    """config.json claims 6 layers, the weights hold 2: keeping 4 would train layers 2-3 from random values."""
    from teachers_for_tests import make_tiny_encoder

    folder = make_tiny_encoder(tmp_path / "enc", tiny_tokenizer, layers=2)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    args = ["distill", "--cache", sst2_cache, "--student", folder, "--epochs", "1", "--device", "cpu",
            "--no-progress"]
    code, _, err = run_cli([*args, "--student-layers", "4", "--out", tmp_path / "r4"], capsys, monkeypatch)
    _one_error_line(code, err, str(folder), "lack", "encoder.layer.2.", "random, not pre-trained")
    assert not (tmp_path / "r4" / "best").exists()
    # the two layers it does hold are a pre-trained student of depth 2
    code, _, err = run_cli([*args, "--student-layers", "2", "--out", tmp_path / "r2"], capsys, monkeypatch)
    assert code == 0, err


def test_a_teacher_whose_weights_lack_tensors_is_refused(tmp_path, tiny_tokenizer):
    from safetensors.torch import load_file, save_file

    from kdcache.models.teachers import load_teacher
    from teachers_for_tests import make_tiny_bert

    folder = make_tiny_bert(tmp_path / "t", tiny_tokenizer)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "classifier" not in k}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(KDCacheError, match=r"the teacher's weights lack 2 tensors \(classifier.bias"):
        load_teacher(str(folder))


# --- 9. no secret recorded -----------------------------------------------------------------------------------

def test_secrets_nested_in_a_storage_option_are_never_recorded(tmp_path, capsys, monkeypatch, s3_server, s3_bucket):
    """s3fs's documented way to pass keys, `client_kwargs={"aws_secret_access_key": ...}`, and a URL's user:password,
    are kept out of the cache's `command` attribute and the run's config.json; what is not secret stays readable."""
    import s3fs

    from kdcache.recipes.demo import train_digits_teacher
    from s3_server import KEY, SECRET

    teacher = tmp_path / "teacher"
    train_digits_teacher(teacher, epochs=1)
    url = f"s3://{s3_bucket}/nested.kdcache"
    nested = json.dumps({"aws_access_key_id": KEY, "aws_secret_access_key": SECRET, "region_name": "eu-kd-1"})
    options = ["--storage-option", f"endpoint_url={s3_server.url}", "--storage-option", f"client_kwargs={nested}"]
    code, _, err = run_cli(["cache-teacher", "--teacher", teacher, "--task", "digits", "--split", "train", "--split",
                            "validation", "--out", url, "--no-progress", *options], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["distill", "--cache", url, "--student", "mlp", "--epochs", "1", "--out", tmp_path / "run",
                            "--device", "cpu", "--no-progress", *options], capsys, monkeypatch)
    assert code == 0, err
    fs = s3fs.S3FileSystem(**s3_server.options, skip_instance_cache=True)
    stored = b"".join(fs.cat_file(k) for k in fs.find(f"{s3_bucket}/nested.kdcache") if k.endswith("zarr.json"))
    recorded = stored + b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("*.json"))
    assert SECRET.encode() not in recorded and KEY.encode() not in recorded
    assert b'aws_secret_access_key\\":\\"***\\"' in stored and b"eu-kd-1" in stored, stored[:2000]


def test_redaction_reaches_every_depth_and_urls():
    from kdcache.runtime import redact

    argv = ["--storage-option", 'client_kwargs={"config": {"auth_token": "T1"}, "region_name": "r"}',
            "--storage-option=a.b.session_token=T2", "--out", "s3://user:T3@bucket/c.kdcache", "--storage-option",
            "endpoint_url=http://u:T4@127.0.0.1:9000", "--storage-option", "anon=true"]
    text = " ".join(redact(argv))
    assert not any(f"T{i}" in text for i in range(1, 5)), text
    assert '"region_name":"r"' in text and "anon=true" in text and "127.0.0.1:9000" in text


# --- 10. bounded inputs ------------------------------------------------------------------------------------------

LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                   [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)] +
                   ["grid: {margin: *i}"])


@pytest.mark.parametrize("text, needles", [
    (LAUGHS, ("YAML aliases (*name) are not accepted",)),
    ("grid:\n" + "".join(f"  {flag}: [{', '.join(str(v) for v in range(1, 11))}]\n" for flag in
                         ("margin", "t-max", "lr", "anneal-epochs", "temperature", "epochs", "batch-size",
                          "weight-decay", "max-grad-norm", "student-layers")),
     ("describes 10,000,000,000 runs", "limit of 10,000")),
])
def test_a_sweep_file_that_expands_without_bound_is_one_short_line(tmp_path, capsys, monkeypatch, text, needles,
                                                                     digits_cache):
    """Aliases are refused before anything is built from them, and the runs are counted before any is expanded."""
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(text)
    assert len(text) < 700
    code, _, err = run_cli(["sweep", "--cache", digits_cache, "--student", "mlp", "--sweep-file",
                            sweep_file, "--out", tmp_path / "runs", "--device", "cpu", "--no-progress"],
                           capsys, monkeypatch)
    _one_error_line(code, err, *needles)
    assert len(err) < 400 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_sweep_file_that_is_a_fifo_or_dev_zero_is_refused(tmp_path, capsys, monkeypatch, kind, digits_cache):
    sweep_file = tmp_path / "grid.yaml"
    if kind == "fifo":
        os.mkfifo(sweep_file)
    else:
        sweep_file.symlink_to("/dev/zero")
    code, _, err = run_cli(["sweep", "--cache", digits_cache, "--student", "mlp", "--sweep-file",
                            sweep_file, "--out", tmp_path / "runs"], capsys, monkeypatch)
    _one_error_line(code, err, str(sweep_file), "not a regular file")


# --- 11. one line, never "internal error" --------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--seed", "-1"], "--seed must be 0 or more and at most 4,294,967,295, got -1"),
    (["--seed", str(10**20)], "--seed must be 0 or more and at most 4,294,967,295"),
    (["--warmup-ratio", "nan"], "--warmup-ratio must be 0 or more and less than 1, got nan"),
    (["--warmup-ratio", "7"], "--warmup-ratio must be 0 or more and less than 1, got 7.0"),
    (["--weight-decay", "nan"], "--weight-decay must be 0 or more, got nan"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be 0 or more, got nan"),
    (["--lr", "inf"], "--lr must be more than 0, got inf"),
    (["--momentum", "1.5"], "--momentum must be 0 or more and less than 1"),
])
@pytest.mark.parametrize("command", ["distill", "train", "sweep"])
def test_every_numeric_flag_is_finite_and_in_range_and_nothing_is_left_behind(tmp_path, capsys, monkeypatch,
                                                                              digits_cache, command, flags, needle):
    out = tmp_path / "run"
    args = {"distill": ["distill", "--cache", digits_cache, "--student", "mlp"],
            "train": ["train", "--model", "mlp", "--task", "digits"],
            "sweep": ["sweep", "--cache", digits_cache, "--student", "mlp", "--grid", "margin=0,1"]}[command]
    _one_error_line(*run_cli([*args, *flags, "--out", out, "--device", "cpu", "--no-progress"], capsys,
                             monkeypatch)[::2], needle)
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["distill", "--cache", "{cache}", "--student", "mlp", "--method", "vanilla", "--temperature", "0", "--out",
      "{tmp}/c.kdcache"], "--temperature must be more than 0"),
    (["sweep", "--cache", "{cache}", "--student", "mlp", "--grid", "alpha=0.5,1.5", "--out", "{tmp}/c.kdcache"],
     "--alpha must be 0 or more and at most 1, got 1.5"),
    (["sweep", "--cache", "{cache}", "--student", "mlp", "--seeds", "0,-2", "--out", "{tmp}/c.kdcache"],
     "--seed must be 0 or more"),
    (["verify", "{cache}", "--rtol", "nan"], "--rtol must be 0 or more, got nan"),
    (["verify", "{cache}", "--atol", "-1"], "--atol must be 0 or more"),
    (["cache-teacher", "--teacher", "mlp", "--task", "digits", "--out", "{tmp}/c.kdcache", "--proj-seed", "-3"],
     "--proj-seed must be 0 or more"),
    (["cache-teacher", "--teacher", "mlp", "--task", "digits", "--out", "{tmp}/c.kdcache", "--chunk-rows", "0"],
     "--chunk-rows must be at least 1"),
    (["demo", "--workdir", "{tmp}/demo", "--epochs", "1"], "--epochs must be at least 2"),
    (["demo", "--workdir", "{tmp}/demo", "--student-epochs", "1"], "--student-epochs must be at least 2"),
])
def test_numeric_flags_of_the_other_commands(tmp_path, capsys, monkeypatch, digits_cache, args, needle):
    args = [str(a).format(cache=digits_cache, tmp=tmp_path) for a in args]
    _one_error_line(*run_cli(args, capsys, monkeypatch)[::2], needle)
    assert not (tmp_path / "c.kdcache").exists()


def test_the_demo_runs_with_few_epochs(tmp_path):
    """The demo saves a Pro-KD checkpoint before the teacher's last epoch at any length (it needed 6 or more)."""
    from kdcache.recipes.demo import run_demo
    from rich.console import Console

    result = run_demo(tmp_path / "demo", epochs=3, student_epochs=2, console=Console(file=io.StringIO()))
    assert result["epochs"] == 2 and {r["method"] for r in result["runs"]} >= {"prokd", "curriculum", "annealing"}
    assert all(0 < r["best_accuracy"] <= 1 for r in result["runs"])


def test_nan_logits_in_a_cache_are_named_not_called_divergence(tmp_path, capsys, monkeypatch, digits_cache):
    import numpy as np
    import zarr

    from cache_edits import refresh_manifest

    copy = tmp_path / "nan.kdcache"
    shutil.copytree(digits_cache, copy)
    logits = zarr.open_group(str(copy), mode="r+")["train"]["logits"]
    logits[10, 2] = np.nan
    refresh_manifest(copy)  # a writer that also rewrote the manifest: only the values tell
    for stream in ("memory", "chunks"):
        code, _, err = run_cli(["distill", "--cache", copy, "--student", "mlp", "--epochs", "1", "--stream", stream,
                                "--out", tmp_path / f"run-{stream}", "--device", "cpu", "--no-progress"],
                               capsys, monkeypatch)
        _one_error_line(code, err, "split 'train', array 'logits', row 10", "NaN or infinite")
        assert "diverged" not in err
    with pytest.raises(KDCacheError, match="row 10: NaN or infinite"):
        kdcache.open_cache(copy).read("logits")


def test_a_model_too_large_for_the_machine_is_one_line_before_any_memory_is_taken(tmp_path, capsys, monkeypatch,
                                                                                 digits_cache):
    code, _, err = run_cli(["distill", "--cache", digits_cache, "--student", "mlp", "--student-kwargs",
                            json.dumps({"hidden": 10**8, "depth": 2}), "--out", tmp_path / "run", "--device", "cpu",
                            "--no-progress"], capsys, monkeypatch)
    _one_error_line(code, err, "model 'mlp'", "parameters need about", "GiB to train", "choose smaller sizes")
    config = tmp_path / "huge.json"
    config.write_text(json.dumps({"model_type": "bert", "hidden_size": 2**16, "num_hidden_layers": 48,
                                  "num_attention_heads": 64, "intermediate_size": 2**18}))
    from kdcache.models import build_student

    with pytest.raises(KDCacheError, match=f"student {config}: .* parameters need about"):
        build_student(str(config), 2)

"""The run folder (issue 19, trust round three): --overwrite deletes only a run, one process writes a run folder at a
time, and a torn metrics.jsonl line never ends a run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from helpers import _distill_args, _metrics, _one_error_line, run_cli, tabular_cache


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]


def _snapshot(folder):
    """Every file under a folder with its bytes (but a lock's holder): what must be left exactly as it was."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".lock"}


# --- 4. --overwrite deletes only a run ----------------------------------------------------------------------------

def _hugging_face_folder(folder):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                    "hidden_size": 32}))
    (folder / "model.safetensors").write_bytes(b"weights the user trained for a week")
    return "a Hugging Face model's"


def _project_folder(folder):
    (folder / "src").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": "my project", "debug": False}))
    (folder / "src" / "main.py").write_text("print('hello')\n")
    return "not a kdcache run's"


def _unreadable_config(folder):
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    (folder / "notes.md").write_text("notes\n")
    return "not a kdcache run's"


def _huge_config(folder):
    folder.mkdir()
    with open(folder / "config.json", "wb") as f:  # sparse: 17 MiB on paper, nothing on disk, never read
        f.truncate(17 * 1024**2)
    return "17,825,792 bytes"


@pytest.mark.parametrize("make", [_hugging_face_folder, _project_folder, _unreadable_config, _huge_config])
def test_overwrite_refuses_a_folder_that_is_not_a_run_and_deletes_nothing(tmp_path, capsys, monkeypatch,
                                                                          digits_cache, make):
    folder = tmp_path / "model"
    why = make(folder)
    before = _snapshot(folder)
    code, _, err = run_cli(_distill_args(digits_cache, folder, "--overwrite"), capsys, monkeypatch)
    _one_error_line(code, err, str(folder), "refusing to overwrite", "not a kdcache run folder", why)
    assert _snapshot(folder) == before


def test_overwrite_refuses_a_run_folder_holding_files_a_run_never_writes(tmp_path, capsys, monkeypatch,
                                                                         digits_cache):
    run = tmp_path / "run"
    assert run_cli(_distill_args(digits_cache, run, "--epochs", "1"), capsys, monkeypatch)[0] == 0
    (run / "analysis.ipynb").write_text("{}")  # the user's own work, kept beside the run
    before = _snapshot(run)
    code, _, err = run_cli(_distill_args(digits_cache, run, "--overwrite"), capsys, monkeypatch)
    _one_error_line(code, err, str(run), "refusing to overwrite", "analysis.ipynb")
    assert _snapshot(run) == before


@pytest.mark.parametrize("release", ["today", "0.1.0"])
def test_overwrite_replaces_a_run_of_this_and_earlier_releases(tmp_path, capsys, monkeypatch, digits_cache,
                                                               release):
    run = tmp_path / "run"
    assert run_cli(_distill_args(digits_cache, run, "--epochs", "1"), capsys, monkeypatch)[0] == 0
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "kdcache.run"
    if release == "0.1.0":  # written before the marker and the identity version: known by its keys alone
        del config["format"], config["identity_version"]
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    code, out, err = run_cli(_distill_args(digits_cache, run, "--overwrite"), capsys, monkeypatch)
    assert code == 0 and "2/2 epochs" in out, err
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


# --- 5. one run folder, one writer --------------------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys
    from kdcache.train.run_dir import run_folder_lock
    with run_folder_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes stdin (or kills this process)
""")


def _hold(folder):
    """Another process holding the run folder, as a run still training would: returns once it holds it."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_process_on_a_run_in_use_is_refused_and_changes_nothing(tmp_path, capsys, monkeypatch,
                                                                          digits_cache):
    run = tmp_path / "run"
    args = _distill_args(digits_cache, run, "--epochs", "3")
    assert run_cli([*args, "--stop-after-epoch", "1"], capsys, monkeypatch)[0] == 0
    before = _snapshot(run)
    holder = _hold(run)
    try:
        for extra in (["--resume"], ["--overwrite"]):  # a scheduler's retry, or a restart from scratch
            code, _, err = run_cli([*args, *extra], capsys, monkeypatch)
            _one_error_line(code, err, str(run), "run folder is in use by another process", f"pid {holder.pid}")
            assert _snapshot(run) == before
    finally:
        holder.kill()  # as a crash would end it: the lock goes with the process
        holder.wait()
    code, out, err = run_cli([*args, "--resume"], capsys, monkeypatch)
    assert code == 0 and "3/3 epochs" in out, err
    assert [r["epoch"] for r in _metrics(run)] == [1, 2, 3]


def test_a_run_in_use_is_refused_before_the_data_is_read(tmp_path, capsys, monkeypatch, digits_cache):
    """The refusal comes first: a fresh --out that another process has just claimed is refused in one line."""
    import kdcache.recipes.distill as recipe

    monkeypatch.setattr(recipe, "load_data", lambda *a, **k: pytest.fail("the data was read"))
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        code, _, err = run_cli(_distill_args(digits_cache, run), capsys, monkeypatch)
    finally:
        holder.stdin.close()
        holder.wait()
    _one_error_line(code, err, str(run), "in use by another process")
    assert not run.exists() or not any(run.iterdir())


@pytest.fixture(scope="module")
def table_cache(tmp_path_factory):
    return tabular_cache(tmp_path_factory.mktemp("table"), rows=(("train", 64), ("validation", 32)), features=8)[2]


def _sweep_args(cache, out, *extra):
    return ["sweep", "--cache", cache, "--student", "mlp", "--student-kwargs", '{"hidden": 8, "depth": 1}',
            "--epochs", "2", "--batch-size", "16", "--out", out, "--device", "cpu", "--no-progress",
            "--num-workers", "0", "--grid", "lr=0.01,0.03", *extra]


def test_a_sweep_is_refused_while_its_folder_or_one_of_its_runs_is_in_use(tmp_path, capsys, monkeypatch,
                                                                          table_cache):
    out = tmp_path / "sweep"
    assert run_cli(_sweep_args(table_cache, out, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    before = _snapshot(out)
    for held, what in ((out, "sweep folder"), (out / "lr-0.03_seed-0", "run folder")):  # another sweep, or a
        holder = _hold(held)                                                       # lone distill of one of its runs
        try:
            code, _, err = run_cli(_sweep_args(table_cache, out, "--resume"), capsys, monkeypatch)
        finally:
            holder.stdin.close()
            holder.wait()
        _one_error_line(code, err, f"{held}: {what} is in use by another process (pid {holder.pid})")
        assert _snapshot(out) == before
    assert run_cli(_sweep_args(table_cache, out, "--resume"), capsys, monkeypatch)[0] == 0
    assert [r["epoch"] for r in _metrics(out / "lr-0.03_seed-0")] == [1, 2]


def test_sweep_overwrite_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys, monkeypatch, table_cache):
    out = tmp_path / "sweep"
    assert run_cli(_sweep_args(table_cache, out, "--epochs", "1"), capsys, monkeypatch)[0] == 0
    (out / "paper.tex").write_text("\\section{Results}\n")
    before = _snapshot(out)
    code, _, err = run_cli(_sweep_args(table_cache, out, "--overwrite"), capsys, monkeypatch)
    _one_error_line(code, err, str(out), "refusing to overwrite", "paper.tex")
    assert _snapshot(out) == before
    (out / "paper.tex").unlink()
    assert run_cli(_sweep_args(table_cache, out, "--overwrite"), capsys, monkeypatch)[0] == 0


# --- 8. a torn metrics.jsonl line does not end a run --------------------------------------------------------------

def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys, monkeypatch, digits_cache):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli(_distill_args(digits_cache, full, "--epochs", "4"), capsys, monkeypatch)[0] == 0
    assert run_cli(_distill_args(digits_cache, cut, "--epochs", "4", "--stop-after-epoch", "2"), capsys,
                   monkeypatch)[0] == 0
    with open(cut / "metrics.jsonl", "a") as f:  # a full disk in the middle of epoch 3's line
        f.write('{"epoch": 3, "loss": 0.12')
    code, out, err = run_cli(_distill_args(digits_cache, cut, "--epochs", "4", "--resume"), capsys, monkeypatch)
    assert code == 0 and "4/4 epochs" in out, err
    assert f"{cut / 'metrics.jsonl'}: dropped its last line" in err
    assert [r["epoch"] for r in _metrics(cut)] == [1, 2, 3, 4]
    assert _strip(_metrics(cut)) == _strip(_metrics(full))


def test_a_torn_first_metrics_line_starts_the_run_again(tmp_path, capsys, monkeypatch, digits_cache):
    """Killed while writing epoch 1's line: no last.pt and no best/ yet, so the resume starts the run again."""
    run = tmp_path / "run"
    assert run_cli(_distill_args(digits_cache, run, "--stop-after-epoch", "1"), capsys, monkeypatch)[0] == 0
    for name in ("last.pt", "best", "summary.json"):
        path = run / name
        path.unlink() if path.is_file() else __import__("shutil").rmtree(path)
    (run / "metrics.jsonl").write_text('{"epoch": 1, "lo')
    code, out, err = run_cli(_distill_args(digits_cache, run, "--resume"), capsys, monkeypatch)
    assert code == 0 and "2/2 epochs" in out, err
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_a_damaged_line_before_the_last_is_one_line(tmp_path, capsys, monkeypatch, digits_cache):
    """Only a torn last line is what a crash leaves; a damaged earlier line is refused, naming it, not guessed at."""
    run = tmp_path / "run"
    assert run_cli(_distill_args(digits_cache, run, "--epochs", "3", "--stop-after-epoch", "2"), capsys,
                   monkeypatch)[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    code, _, err = run_cli(_distill_args(digits_cache, run, "--epochs", "3", "--resume"), capsys, monkeypatch)
    _one_error_line(code, err, str(run / "metrics.jsonl"), "line 1")


_SHORT_WRITE = textwrap.dedent("""
    import os, resource, signal, sys
    from pathlib import Path
    from kdcache.errors import KDCacheError
    from kdcache.train.run_dir import RunDir

    run = RunDir(Path(sys.argv[1]), {})
    size = (run.out / "metrics.jsonl").stat().st_size
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))  # room for 10 bytes only
    try:
        with run.writes():
            run.append_metrics({"epoch": 2, "loss": 0.5, "note": "x" * 200})
    except KDCacheError as exc:
        print(exc)
""")


def test_a_write_cut_short_leaves_no_half_line(tmp_path):
    """A metrics line the file system takes only part of (a full disk, a size limit) is taken back whole."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 0.9}) + "\n")
    before = (run / "metrics.jsonl").read_bytes()
    done = subprocess.run([sys.executable, "-c", _SHORT_WRITE, str(run)], capture_output=True, text=True, check=True)
    assert done.stdout.startswith(f"{run / 'metrics.jsonl'}: file too large while writing it"), done
    assert (run / "metrics.jsonl").read_bytes() == before

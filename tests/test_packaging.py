"""The distribution ships the CLI as kdcache.cli (never a generic top-level `cli`), wheel and editable alike."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def _run(args, cwd, env=None):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_has_only_kdcache_top_level_and_a_working_console_script(tmp_path):
    built = _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                  "-w", str(tmp_path / "dist")], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("kdcache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"kdcache", wheel.name.split("-py")[0] + ".dist-info"}
    assert "kdcache/cli/main.py" in names and not any(n.startswith("cli/") for n in names)

    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                     cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    env = {**os.environ, "PYTHONPATH": str(site)}
    version = _run([str(site / "bin" / "kdcache"), "--version"], cwd=tmp_path, env=env)
    assert version.returncode == 0 and version.stdout.strip() == "kdcache 0.1.0", version.stderr
    origin = _run([sys.executable, "-c", "import kdcache.cli.main as m; print(m.__file__)"], cwd=tmp_path, env=env)
    assert origin.stdout.strip() == str(site / "kdcache" / "cli" / "main.py")


def test_editable_install_maps_cli_folder_to_kdcache_cli(tmp_path):
    # The development environment is an editable install (README: pip install -e ".[dev]").
    origin = _run([sys.executable, "-c", "import kdcache.cli.main as m; print(m.__file__)"], cwd=tmp_path)
    assert origin.returncode == 0, origin.stderr
    assert Path(origin.stdout.strip()) == REPO / "cli" / "main.py"
    generic = _run([sys.executable, "-c", "import cli"], cwd=tmp_path)
    assert generic.returncode != 0 and "No module named 'cli'" in generic.stderr
    script = Path(sys.executable).parent / "kdcache"
    help_ = _run([str(script), "--help"], cwd=tmp_path)
    assert help_.returncode == 0 and "cache-teacher" in help_.stdout


def test_library_imports_without_the_cli(tmp_path):
    code = "import sys, kdcache, kdcache.recipes.cache_teacher; assert 'kdcache.cli' not in sys.modules; print('ok')"
    result = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.stdout.strip() == "ok", result.stderr

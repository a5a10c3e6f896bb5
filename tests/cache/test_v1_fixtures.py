"""Caches written by earlier kdcache code (tests/fixtures/v1, see its README) open, verify and train with this one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import kdcache
from kdcache.recipes.distill import DistillConfig, distill
from kdcache.recipes.verify import verify_cache

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "v1"
CACHES = ("digits-0.1.0", "digits-manifest", "sst2-0.1.0")


@pytest.fixture(params=CACHES)
def fixture_cache(request, tmp_path) -> tuple[str, Path]:
    copy = tmp_path / f"{request.param}.kdcache"
    shutil.copytree(FIXTURES / f"{request.param}.kdcache", copy)  # a copy: a reader must never write, but be sure
    return request.param, copy


def test_every_array_reads_back_as_its_writer_read_it(fixture_cache):
    name, path = fixture_cache
    expected = json.loads((FIXTURES / f"{name}.sha256.json").read_text())
    for split, arrays in expected.items():
        cache = kdcache.open_cache(path, split)
        assert set(cache.names) == set(arrays)
        for array, digest in arrays.items():
            values = np.ascontiguousarray(cache.read(array))
            assert hashlib.sha256(values.tobytes()).hexdigest() == digest, (split, array)


def test_verify_passes(fixture_cache):
    _, path = fixture_cache
    report = verify_cache(path)
    assert report.ok, report.lines()


def test_a_student_trains_on_it(fixture_cache, tmp_path, glue_dir, tiny_tokenizer):
    name, path = fixture_cache
    if name.startswith("digits"):
        cfg = DistillConfig(student="mlp", student_kwargs={"in_features": 64, "hidden": 8, "depth": 1}, cache=path,
                            method="prokd", out=tmp_path / "run", epochs=3, device="cpu", progress=False)
    else:
        student = tmp_path / "bert.json"
        student.write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 16,
                                       "num_attention_heads": 2, "intermediate_size": 32}))
        cfg = DistillConfig(student=str(student), cache=path, data=str(glue_dir / "SST-2"),
                            out=tmp_path / "run", epochs=1, batch_size=16, device="cpu", progress=False)
    summary = distill(cfg)
    assert summary["epochs_done"] == cfg.epochs and summary["best_metric"] is not None

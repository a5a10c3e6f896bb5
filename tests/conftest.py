"""Shared fixtures: the real data (committed slices; the full files where a test needs them), a tiny tokenizer
built from a vocabulary the test writes, caches several folders use, and a real S3 server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Hugging Face's own progress bars would land in the stderr that CLI tests read; users get ours only.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]

# the tiny tokenizer lives beside the tiny teachers, which import no pytest (benchmarks on a bare device use it)
from teachers_for_tests import make_tiny_tokenizer  # noqa: E402


#: Slices of the real data committed with the tests (tests/fixtures/data/README.md says how they were made): the
#: suite runs on these whether or not the full files are beside the checkout, so every run reads the same rows.
SLICES = REPO / "tests" / "fixtures" / "data"


def shared_data_dir() -> Path:
    """The full public data beside the checkout (../shared/data), or $KDCACHE_DATA: optional, for the few tests that
    need more rows than the committed slices hold."""
    return Path(os.environ.get("KDCACHE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The full data; the test skips, saying why, where it is absent (a fresh clone has no ../shared)."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"needs the full data at {path} (set KDCACHE_DATA or put ../shared beside the checkout); "
                    "the committed slices in tests/fixtures/data are too small for it")
    return path


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """GLUE SST-2, CoLA and MRPC: the first rows of each file, as GLUE ships them."""
    return SLICES / "glue"


@pytest.fixture(scope="session")
def cifar10_zip() -> Path:
    """CIFAR-10 JPEGs in the published zip's layout: the first 20 images of each class of each split."""
    return SLICES / "cifar10-jpg" / "cifar10-jpg-d7d0561-slice.zip"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture
def digits_weights(tmp_path):
    """A state dict for `teachers_for_tests:linear_digits`, the quickest architecture-name teacher."""
    import torch

    from teachers_for_tests import linear_digits

    torch.manual_seed(0)
    path = tmp_path / "linear.pt"
    torch.save(linear_digits().state_dict(), path)
    return path


# --- caches and configs of real data that tests in several folders use -------------------------------------

@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A linear teacher trained for a few steps on the bundled digits, cached for train and validation."""
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
    from kdcache.recipes.demo import train_digits_teacher

    root = tmp_path_factory.mktemp("digits")
    train_digits_teacher(root / "teacher", epochs=3)
    return cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher"), task="digits", out=root / "c.kdcache",
                                            splits=("train", "validation"), device="cpu", progress=False))


@pytest.fixture(scope="module")
def sst2_cache(tmp_path_factory, sst2_copy, tiny_tokenizer):
    """A tiny BERT teacher cached on the SST-2 slice; the teacher's folder is deleted afterwards (distill must never
    need the teacher)."""
    import shutil

    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
    from teachers_for_tests import make_tiny_bert

    root = tmp_path_factory.mktemp("sst2cache")
    teacher = make_tiny_bert(root / "teacher", tiny_tokenizer)
    cache = cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="sst2", data=str(sst2_copy),
                                             out=root / "c.kdcache", splits=("train", "validation"), batch_size=16,
                                             device="cpu", progress=False))
    shutil.rmtree(teacher)
    return cache


@pytest.fixture(scope="module")
def sst2_copy(tmp_path_factory, glue_dir):
    """The first 60 rows of real SST-2 train and dev, in a folder of our own (so tests can edit or delete it)."""
    folder = tmp_path_factory.mktemp("sst2") / "SST-2"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        lines = (glue_dir / "SST-2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (folder / name).write_text("".join(lines[:61]), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def bert_student_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("student") / "bert-1layer.json"
    path.write_text(json.dumps({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 256}))
    return path


# --- a real S3 server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server():
    """SeaweedFS on 127.0.0.1 with free ports, for the whole session (tests/s3_server.py)."""
    from s3_server import SeaweedServer

    server = SeaweedServer().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test, named after it."""
    import re

    import uuid

    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:48].strip("-") or "bucket"
    return s3_server.make_bucket(f"t-{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def projection_cache(tmp_path_factory):
    """Digits cached by a small MLP teacher with projections of its two hidden layers (curriculum's arrays)."""
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
    from kdcache.recipes.distill import distill
    from kdcache.train.config import DistillConfig

    root = tmp_path_factory.mktemp("proj")
    distill(DistillConfig(student="mlp", student_kwargs={"hidden": 16, "depth": 2}, task="digits", method="ce",
                          out=root / "teacher", epochs=1, device="cpu", progress=False))
    return cache_teacher(CacheTeacherConfig(teacher=str(root / "teacher" / "best"), task="digits", out=root / "c.kdcache",
                                            splits=("train", "validation"), device="cpu", progress=False,
                                            hidden_layers="1,2", proj_dim=4, chunk_rows=64))


@pytest.fixture(scope="session")
def resnet8_weights(tmp_path_factory):
    """A ResNet-8 state dict with non-trivial batch-norm statistics, so eval mode matters (image-teacher tests)."""
    import torch

    from kdcache.models.builders import resnet8

    torch.manual_seed(0)
    model = resnet8(10)
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    path = tmp_path_factory.mktemp("resnet") / "resnet8.pt"
    torch.save(model.state_dict(), path)
    return path


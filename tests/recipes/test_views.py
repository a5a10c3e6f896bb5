"""Views caches (issue 23): the teacher's target on V augmented views of every image, each view's explicit
parameters, and their exact replay for the student (a ResNet-8 teacher on 40 real CIFAR-10 JPEGs per split)."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import kdcache
from kdcache.data import DataOptions
from kdcache.errors import KDCacheError
from kdcache.models import resnet8
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from cache_edits import interrupt_as_an_earlier_release
from helpers import _distill_args, _one_error_line, run_cli

V = 3
CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
#: Root attributes that record when and by which command line a cache was written
WHEN = ("command", "created", "completed", "throughput", "resumed")


@pytest.fixture(scope="module")
def weights(resnet8_weights):
    return resnet8_weights


def _config(weights, data, out, augment="cifar", **kw):
    return CacheTeacherConfig(teacher="resnet8", weights=str(weights), task="imagefolder", data=str(data), out=out,
                              splits=("train", "test"), batch_size=16, device="cpu", progress=False, dtype="float32",
                              chunk_rows=16, data_options=DataOptions(limit=40, normalize="cifar10"), views=V,
                              augment=augment, **kw)


@pytest.fixture(scope="module", params=["cifar", "imagenet", "cifar+mixup", "imagenet+cutmix"])
def views_cache(request, tmp_path_factory, weights, cifar10_zip):
    out = tmp_path_factory.mktemp(f"views-{request.param}") / "c.kdcache"
    cache_teacher(_config(weights, cifar10_zip, out, request.param))
    return out


@pytest.fixture(scope="module")
def cifar_views(tmp_path_factory, weights, cifar10_zip):
    out = tmp_path_factory.mktemp("views") / "c.kdcache"
    cache_teacher(_config(weights, cifar10_zip, out))
    return out


def _teacher(weights):
    model = resnet8(10)
    model.load_state_dict(torch.load(weights))
    return model.eval()


def _jpegs(zip_path, split):
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if f"/{split}/" in f"/{n}" and n.endswith(".jpg"))[:40]
        return np.stack([np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")) for n in names])


def test_the_schema_names_the_augmentation_its_version_and_layout(views_cache):
    cache = kdcache.open_cache(views_cache, "train")
    augment = cache.header.views.augment
    assert cache.attrs["views"]["count"] == V and cache.attrs["views"]["version"] == 1
    base = ["dy", "dx", "flip"] if augment.startswith("cifar") else ["x0", "y0", "x1", "y1", "flip"]
    mix = {"": [], "mixup": ["partner", "lam"], "cutmix": ["partner", "lam", "by0", "bx0", "by1", "bx1"]}
    assert cache.attrs["views"]["params"] == base + mix[augment.partition("+")[2]]
    assert cache.attrs["target"]["views"] == V and cache.attrs["format_version"] == 2
    assert cache.arrays["view_logits"].shape == (40, V, 10) and cache.arrays["logits"].shape == (40, 10)
    params = cache.read("view_params")
    flip = params[..., cache.attrs["views"]["params"].index("flip")]
    assert params.shape == (40, V, len(cache.attrs["views"]["params"])) and set(np.unique(flip)) == {0, 1}
    assert len(np.unique(params.reshape(-1, params.shape[-1]), axis=0)) > 40  # views differ between rows and views
    if "+" in augment:  # a partner row among the split's, the row keeping at least half of the image
        layout = cache.attrs["views"]["params"]
        partner, lam = params[..., layout.index("partner")], params[..., layout.index("lam")]
        assert partner.min() >= 0 and partner.max() < 40 and len(np.unique(partner)) > 10
        assert (lam >= 0.5).all() and (lam <= 1).all()
    from kdcache.cache.info import describe_cache

    described = describe_cache(views_cache)
    assert described["views"]["augment"] == augment and all(s["bytes_per_view"] > 0 for s in described["splits"])


def test_a_replayed_view_is_what_the_teacher_saw_and_its_output_is_the_cached_target(views_cache, weights):
    """Done-when of issue 23: the teacher run on replayed views (the rows of one capture batch) gives the stored
    float32 target bit for bit, for every view; the plain image's target is kept as `logits`."""
    cache = kdcache.open_cache(views_cache, "train")
    teacher = _teacher(weights)
    rows = range(16, 32)  # the capture's second batch of 16
    stored = cache.read("view_logits")
    for view in range(V):
        replayed = torch.stack([kdcache.replay_view(views_cache, "train", r, view) for r in rows])
        with torch.inference_mode():
            out = teacher(replayed).numpy()
        np.testing.assert_array_equal(out, stored[16:32, view])
    assert not np.array_equal(stored[:, 0], cache.read("logits"))  # the views are not the plain image


def test_mixed_views_paste_or_blend_the_partners_crop(tmp_path, weights, cifar10_zip):
    """Independently of kdcache's augmentation code: CutMix pastes the partner's box of the same crop and flip over
    the row's view; mixup blends the two with weight lam; the student's replayed input is the same tensor."""
    from kdcache.train.inputs import InputOptions, load_run_data

    images = _jpegs(cifar10_zip, "train")

    def crop(image, dy, dx, flip):
        out = np.pad(image, ((4, 4), (4, 4), (0, 0)))[dy:dy + 32, dx:dx + 32]
        return out[:, ::-1] if flip else out

    def normalised(hwc):
        return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1).float().div_(255.0).sub_(
            CIFAR10_MEAN).div_(CIFAR10_STD)

    for mix in ("cutmix", "mixup"):
        out = tmp_path / f"{mix}.kdcache"
        cache_teacher(_config(weights, cifar10_zip, out, f"cifar+{mix}"))
        params = kdcache.open_cache(out, "train").read("view_params")
        for row, view in ((0, 0), (7, 2), (39, 1)):
            p = params[row, view]
            dy, dx, flip, partner = (int(x) for x in p[:4])
            mine, theirs = crop(images[row], dy, dx, flip), crop(images[partner], dy, dx, flip)
            got = kdcache.replay_view(out, "train", row, view)
            if mix == "cutmix":
                y0, x0, y1, x1 = (int(x) for x in p[5:9])
                want = mine.copy()
                want[y0:y1, x0:x1] = theirs[y0:y1, x0:x1]
                assert torch.equal(got, normalised(want))
                assert p[4] == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)
            else:
                lam = np.float32(p[4])
                blended = lam * mine.astype(np.float32) + (np.float32(1) - lam) * theirs.astype(np.float32)
                torch.testing.assert_close(got, normalised(blended), rtol=1e-6, atol=1e-6)
        data = load_run_data(out, storage_options={}, data=None, val_split=None, device=torch.device("cpu"),
                             options=InputOptions(workers=0, seed=1))
        rows = np.array([3, 39, 0, 12])
        (got_rows, model_input, _), = data.train.inputs.epoch([rows], epoch=2, train=True)
        assert np.array_equal(got_rows, rows) and model_input.shape[0] == 4
        want = torch.stack([kdcache.replay_view(out, "train", int(r), 2 % V) for r in rows])
        assert torch.equal(model_input, want)


def test_cifar_views_are_the_crops_and_flips_their_parameters_name(cifar_views, cifar10_zip):
    """Independently of kdcache's augmentation code: pad by 4, crop at (dy, dx), flip, then normalise."""
    cache = kdcache.open_cache(cifar_views, "train")
    images, params = _jpegs(cifar10_zip, "train"), cache.read("view_params")
    for row, view in ((0, 0), (5, 1), (39, 2)):
        dy, dx, flip = (int(p) for p in params[row, view])
        padded = np.pad(images[row], ((4, 4), (4, 4), (0, 0)))
        crop = padded[dy:dy + 32, dx:dx + 32]
        crop = crop[:, ::-1] if flip else crop
        want = (torch.from_numpy(crop.copy()).permute(2, 0, 1).float().div_(255.0).sub_(CIFAR10_MEAN)
                .div_(CIFAR10_STD))
        assert torch.equal(kdcache.replay_view(cifar_views, "train", row, view), want)


def _files(cache):
    found = {}
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        found[path.relative_to(cache).as_posix()] = path.read_bytes()
    attrs = json.loads(found.pop("zarr.json"))["attributes"]
    found["zarr.json"] = [(k, v) for k, v in attrs.items() if k not in WHEN]
    return found


def test_an_interrupted_views_capture_resumes_to_the_same_bytes(tmp_path, cifar_views, weights, cifar10_zip):
    """Killed after 16 of 40 train rows (the later chunks never written): the resume recomputes them, views and
    parameters included, to the bytes of the uninterrupted capture."""
    out = tmp_path / "c.kdcache"
    shutil.copytree(cifar_views, out)
    interrupt_as_an_earlier_release(out, "train", 16, drop_later_chunks=True)
    cache_teacher(_config(weights, cifar10_zip, out))
    got, want = _files(out), _files(cifar_views)
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []


def test_distill_trains_on_the_teachers_views_against_their_targets(cifar_views):
    """The student's training input in epoch e is view e mod V of each row, replayed (the very tensor
    replay_view returns), and the target served with it is that view's, whether the targets are held in memory or
    streamed by chunks; `random` draws a view per row and epoch."""
    from kdcache.train.batches import TeacherTargets
    from kdcache.train.inputs import InputOptions, load_run_data

    for order, mode in (("cycle", "memory"), ("random", "memory"), ("cycle", "chunks")):
        data = load_run_data(cifar_views, storage_options={}, data=None, val_split=None, device=torch.device("cpu"),
                             options=InputOptions(workers=0, seed=5, view_order=order))
        replay = data.train.inputs.replay
        targets = TeacherTargets(data.train.cache, ("logits",), views=replay.choice, mode=mode,
                                 window_chunks=1 if mode == "chunks" else None)
        assert targets.mode == mode
        stored = data.train.cache.read("view_logits")
        order_of = targets.order(8, seed=5)
        seen = set()
        for epoch in (1, 2):
            plan = order_of.plan(epoch)
            batches = plan.batches[:2]
            inputs = list(data.train.inputs.epoch(batches, epoch=epoch, train=True))
            for rows, (target, _) in zip(batches, targets.epoch(plan)):
                views = replay.choice.of(rows, epoch).numpy()
                if order == "cycle":
                    assert (views == epoch % V).all()
                seen.update(views.tolist())
                np.testing.assert_array_equal(target.numpy(), stored[rows, views])
                model_input = next(x for r, x, _ in inputs if np.array_equal(r, rows))
                want = torch.stack([kdcache.replay_view(cifar_views, "train", int(r), int(v))
                                    for r, v in zip(rows, views)])
                assert torch.equal(model_input, want)
        if order == "random":
            assert seen == set(range(V))


@pytest.mark.parametrize("method", ["continuation", "vanilla"])
def test_distill_on_a_views_cache_reports_epochs_per_view(tmp_path, capsys, monkeypatch, cifar_views, method):
    code, _, err = run_cli(_distill_args(cifar_views, tmp_path / "run", "--method", method, "--epochs", "4"), capsys,
                           monkeypatch)
    assert code == 0, err
    assert "epochs / V = 4 / 3 = 1.333 passes over each view (views repeat)" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["views"] == {"augment": "cifar", "views": 3, "order": "cycle", "epochs_per_view": 1.333}


def test_view_order_plain_trains_on_the_plain_images_as_without_views(tmp_path, capsys, monkeypatch, cifar_views):
    code, _, err = run_cli(_distill_args(cifar_views, tmp_path / "run", "--view-order", "plain", "--augment", "cifar"),
                           capsys, monkeypatch)
    assert code == 0, err
    assert "views" not in json.loads((tmp_path / "run" / "summary.json").read_text())


# --- bad input: one line, non-zero exit --------------------------------------------------------------------------

def test_replaying_over_other_images_is_refused(tmp_path, cifar_views, cifar10_zip):
    changed = tmp_path / "changed.zip"
    with zipfile.ZipFile(cifar10_zip) as src, zipfile.ZipFile(changed, "w") as dst:
        for info in src.infolist():
            payload = src.read(info)
            if "/train/" in f"/{info.filename}" and info.filename.endswith(".jpg"):
                pixels = 255 - np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"))
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
                payload = buffer.getvalue()
            dst.writestr(info, payload)
    with pytest.raises(KDCacheError, match="row 0 does not match the cache .*the data changed"):
        kdcache.replay_view(cifar_views, "train", 0, 1, data=changed)


def _rename_augmentation(cache, name):
    root = zarr.open_group(str(cache), mode="r+")
    views = dict(root.attrs["views"])
    root.attrs["views"] = {**views, "augment": name}


def test_an_augmentation_the_cache_names_but_kdcache_does_not_know_is_refused(tmp_path, capsys, monkeypatch,
                                                                             cifar_views):
    copy = tmp_path / "c.kdcache"
    shutil.copytree(cifar_views, copy)
    _rename_augmentation(copy, "autoaugment")
    with pytest.raises(KDCacheError, match="augmentation 'autoaugment' version 1 .* which this kdcache does not"):
        kdcache.replay_view(copy, "train", 0, 0)
    code, _, err = run_cli(_distill_args(copy, tmp_path / "run"), capsys, monkeypatch)
    _one_error_line(code, err, "autoaugment", "does not replay")


def test_cache_teacher_refuses_an_unknown_augmentation_and_views_of_text(tmp_path, capsys, monkeypatch, weights,
                                                                         cifar10_zip):
    base = ["cache-teacher", "--teacher", "resnet8", "--weights", weights, "--data", cifar10_zip, "--device", "cpu",
            "--out", tmp_path / "c.kdcache", "--no-progress", "--views", "2"]
    code, _, err = run_cli([*base, "--task", "imagefolder", "--augment", "autoaugment"], capsys, monkeypatch)
    _one_error_line(code, err, "autoaugment")
    code, _, err = run_cli([*base, "--task", "sst2", "--augment", "cifar"], capsys, monkeypatch)
    _one_error_line(code, err, "--augment cifar applies to images", "text")
    code, _, err = run_cli([*base, "--task", "imagefolder"], capsys, monkeypatch)
    _one_error_line(code, err, "--views V and --augment")
    assert not (tmp_path / "c.kdcache").exists()


def test_view_order_without_views_and_fresh_augment_over_views_are_refused(tmp_path, capsys, monkeypatch,
                                                                          digits_cache, cifar_views):
    code, _, err = run_cli(_distill_args(digits_cache, tmp_path / "a", "--view-order", "cycle"), capsys, monkeypatch)
    _one_error_line(code, err, "--view-order cycle", "stores no augmented views")
    code, _, err = run_cli(_distill_args(cifar_views, tmp_path / "b", "--augment", "cifar"), capsys, monkeypatch)
    _one_error_line(code, err, "--augment cifar", "--view-order plain")


@pytest.mark.slow
def test_two_processes_write_the_views_cache_one_process_writes(tmp_path, weights, cifar10_zip):
    """torchrun: each rank draws its rows' views from (seed, row), so the bytes are one process's."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    outs = {}
    for nproc in (1, 2):
        outs[nproc] = tmp_path / f"{nproc}.kdcache"
        args = ["-m", "kdcache", "cache-teacher", "--teacher", "resnet8", "--weights", str(weights), "--task",
                "imagefolder", "--data", str(cifar10_zip), "--split", "train", "--split", "test", "--limit", "40",
                "--normalize", "cifar10", "--batch-size", "16", "--chunk-rows", "16", "--dtype", "float32",
                "--views", "3", "--augment", "cifar", "--view-seed", "7", "--device", "cpu", "--no-progress",
                "--out", str(outs[nproc])]
        if nproc > 1:
            args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", *args[1:]]
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _files(outs[2]), _files(outs[1])
    assert sorted(got) == sorted(want) and [k for k in want if got[k] != want[k]] == []
    assert kdcache.open_cache(outs[2]).attrs["views"]["seed"] == 7


def test_a_resumed_views_run_ends_where_an_uninterrupted_one_does(tmp_path, capsys, monkeypatch, cifar_views):
    """The view of each row and epoch depends on (order, seed, epoch) alone: a run stopped after epoch 1 and resumed
    trains epochs 2-3 on the views an uninterrupted run trains them on."""
    from helpers import _metrics

    flags = ("--epochs", "3", "--view-order", "random", "--seed", "3")
    assert run_cli(_distill_args(cifar_views, tmp_path / "full", *flags), capsys, monkeypatch)[0] == 0
    assert run_cli(_distill_args(cifar_views, tmp_path / "cut", *flags, "--stop-after-epoch", "1"), capsys,
                   monkeypatch)[0] == 0
    assert run_cli(_distill_args(cifar_views, tmp_path / "cut", *flags, "--resume"), capsys, monkeypatch)[0] == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_second")} for r in rows]
    assert strip(_metrics(tmp_path / "cut")) == strip(_metrics(tmp_path / "full"))
    code, _, err = run_cli(_distill_args(cifar_views, tmp_path / "full", "--epochs", "3", "--view-order", "cycle",
                                         "--seed", "3", "--resume"), capsys, monkeypatch)
    assert code == 1 and "view_order" in err  # another view order is another run


@pytest.mark.slow
def test_two_processes_distil_on_the_views_one_process_distils_on(tmp_path, cifar_views):
    """torchrun: each rank replays its share of each batch; rank and view choice meet on the row, so two processes
    compute what one computes (random order: views differ per row)."""
    import os
    import subprocess
    import sys

    from helpers import REPO, STUDENT_KW, _metrics

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    runs = {}
    for nproc in (1, 2):
        runs[nproc] = tmp_path / f"run{nproc}"
        args = ["-m", "kdcache", "distill", "--cache", str(cifar_views), "--student", "mlp", "--student-kwargs",
                json.dumps(STUDENT_KW), "--epochs", "3", "--batch-size", "16", "--view-order", "random",
                "--device", "cpu", "--no-progress", "--num-workers", "0", "--out", str(runs[nproc])]
        if nproc > 1:
            args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", *args[1:]]
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _metrics(runs[1]), _metrics(runs[2])
    assert [r["epoch"] for r in one] == [r["epoch"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("augment", ["cifar", "imagenet+cutmix"])
def test_verify_with_the_teacher_recomputes_views_and_catches_a_rewritten_view_target(tmp_path, weights, cifar10_zip,
                                                                                     augment):
    """`verify --teacher` replays one view of each sampled row from its stored parameters and runs the teacher on it:
    a clean cache passes that check; a view target rewritten with its manifest refreshed (so that only the values
    tell) fails it, naming the views, while the plain targets still pass."""
    from cache_edits import refresh_manifest
    from kdcache.recipes.verify import verify_cache

    out = tmp_path / "c.kdcache"
    cache_teacher(_config(weights, cifar10_zip, out, augment))
    teacher = dict(teacher="resnet8", weights=str(weights), sample=40, device="cpu", batch_size=16)
    report = verify_cache(out, **teacher)
    views = [c for c in report.checks if "/views" in c.name]
    assert report.ok and views, report.lines()
    group = zarr.open_group(str(out), mode="r+")["train"]
    group["view_logits"][:] = group["view_logits"][:] + np.where(np.arange(V) == 1, 0.5, 0.0)[None, :, None]
    refresh_manifest(out)
    report = verify_cache(out, **teacher)
    failed = [c.name for c in report.checks if not c.ok]
    assert failed and all(name.startswith("train/views") for name in failed), report.lines()
    assert any(c.ok and c.name.startswith("train/teacher") for c in report.checks), report.lines()


@pytest.mark.parametrize("field, value, needle", [("views", 5000, "--views must be"), ("views", 0, "--views must be"),
                                                  ("view_seed", 2**32, "--view-seed must be")])
def test_the_python_api_checks_views_and_their_seed_against_the_clis_ranges(tmp_path, weights, cifar10_zip, field,
                                                                              value, needle):
    """`cache_teacher(CacheTeacherConfig(views=5000))` is refused as `--views 5000` is, in one line, before
    anything is written (the ranges of kdcache.names, not a copy of them)."""
    import dataclasses

    out = tmp_path / "c.kdcache"
    with pytest.raises(KDCacheError, match=needle) as caught:
        cache_teacher(dataclasses.replace(_config(weights, cifar10_zip, out), **{field: value}))
    assert "\n" not in str(caught.value)
    if field == "views":  # the range is named, as the CLI names it
        assert "at most 4096" in str(caught.value)
    assert not out.exists()

"""`with_targets` and `KDTrainer` on a views cache (issues 23 and 25): each item of epoch e carries the view distill
trains on in epoch e + 1, replayed bit for bit as `kdcache.replay_view` makes it, with that view's cached targets;
`set_epoch` moves the view, also in DataLoader workers (a ResNet-8 teacher on 40 CIFAR-10 JPEGs)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import kdcache
from kdcache.data import DataOptions
from kdcache.errors import KDCacheError
from kdcache.models import resnet8
from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher
from kdcache.torch import with_targets

V = 3


@pytest.fixture(scope="module")
def weights(resnet8_weights):
    return resnet8_weights


def _views_cache(root, weights, data, augment):
    out = root / f"{augment}.kdcache"
    cache_teacher(CacheTeacherConfig(teacher="resnet8", weights=str(weights), task="imagefolder", data=str(data),
                                     out=out, splits=("train", "test"), batch_size=16, device="cpu", progress=False,
                                     dtype="float32", chunk_rows=16, views=V, augment=augment,
                                     data_options=DataOptions(limit=40, normalize="cifar10")))
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, weights, cifar10_zip):
    root = tmp_path_factory.mktemp("views")
    return {augment: _views_cache(root, weights, cifar10_zip, augment) for augment in ("cifar", "cifar+mixup")}


def user_rows(zip_path, split, key="image"):
    """What a user holds: the split's JPEGs decoded in order (PIL, no kdcache loader), uint8 HWC, and the label of
    each one's class folder."""
    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(n for n in archive.namelist() if f"/{split}/" in f"/{n}" and n.endswith(".jpg"))[:40]
        classes = sorted({n.split("/")[-2] for n in names})
        return [{key: np.asarray(Image.open(io.BytesIO(archive.read(n))).convert("RGB")),
                 "label": classes.index(n.split("/")[-2])} for n in names]


@pytest.mark.parametrize("augment", ["cifar", "cifar+mixup"])
def test_an_item_is_its_epochs_replayed_view_and_that_views_targets(caches, cifar10_zip, augment):
    cache = caches[augment]
    data = with_targets(user_rows(cifar10_zip, "train"), cache)
    stored = kdcache.open_cache(cache, "train").read("view_logits")
    assert data.epoch == 0
    for epoch in range(V + 1):
        data.set_epoch(epoch)
        for row in (0, 7, 39):
            item = data[row]
            view = (epoch + 1) % V  # distill's epoch epoch + 1, cycle order
            assert item["teacher_view"] == view and item["teacher_row"] == row
            assert torch.equal(item["image"], kdcache.replay_view(cache, "train", row, view))
            np.testing.assert_array_equal(item["teacher_logits"].numpy(), stored[row, view])
    if augment == "cifar":  # joined by the sample index, in another order: the view is the cache row's
        index = kdcache.open_cache(cache, "train").read("index")
        shuffled = [dict(r, sample=int(index[i])) for i, r in enumerate(user_rows(cifar10_zip, "train"))][::-1]
        joined = with_targets(shuffled, cache, index="sample", view_order="random", seed=1)
        joined.set_epoch(2)
        item = joined[0]  # the split's row 39
        view = item["teacher_view"]
        assert item["teacher_row"] == 39 and torch.equal(item["image"], kdcache.replay_view(cache, "train", 39, view))
        np.testing.assert_array_equal(item["teacher_logits"].numpy(), stored[39, view])


def test_random_and_plain_orders_are_distills(caches, cifar10_zip, weights):
    """random: the view distill --view-order random --seed 3 trains each row on; plain: the plain image as the
    teacher saw it (normalised) and its plain target, bit for bit what the teacher computes on the capture batch."""
    from kdcache.train.views import view_replay

    cache, rows = caches["cifar"], user_rows(cifar10_zip, "train")
    split = kdcache.open_cache(cache, "train")
    data = with_targets(rows, cache, view_order="random", seed=3)
    choice = view_replay(split, "random", None, 3).choice  # what distill builds
    seen = set()
    for epoch in range(4):
        data.set_epoch(epoch)
        views = [data[r]["teacher_view"] for r in range(40)]
        assert views == choice.of(np.arange(40), epoch + 1).tolist()
        seen.update(views)
    assert seen == set(range(V))
    plain = with_targets(rows, cache, view_order="plain")
    items = [plain[r] for r in range(16, 32)]  # the capture's second batch of 16
    assert all("teacher_view" not in item for item in items)
    teacher = resnet8(10)
    teacher.load_state_dict(torch.load(weights))
    with torch.inference_mode():
        out = teacher.eval()(torch.stack([item["image"] for item in items])).numpy()
    np.testing.assert_array_equal(out, split.read("logits")[16:32])
    np.testing.assert_array_equal(torch.stack([item["teacher_logits"] for item in items]).numpy(), out)


def test_set_epoch_reaches_dataloader_workers(caches, cifar10_zip):
    cache = caches["cifar+mixup"]
    data = with_targets(user_rows(cifar10_zip, "train"), cache, view_key="pixel_values")
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, num_workers=2, persistent_workers=True,
                                         collate_fn=data.collate)
    stored = kdcache.open_cache(cache, "train").read("view_logits")
    for epoch in range(2):
        data.set_epoch(epoch)
        seen = []
        for batch in loader:
            rows = batch["teacher_row"].tolist()
            assert (batch["teacher_view"] == (epoch + 1) % V).all()
            assert batch["image"].dtype == torch.uint8  # view_key: the user's image is kept beside the view
            want = torch.stack([kdcache.replay_view(cache, "train", r, (epoch + 1) % V) for r in rows])
            assert torch.equal(batch["pixel_values"], want)
            np.testing.assert_array_equal(batch["teacher_logits"].numpy(), stored[rows, (epoch + 1) % V])
            seen += rows
        assert sorted(seen) == list(range(40))


def test_what_cannot_replay_is_one_line(caches, cifar10_zip, digits_cache):
    rows = user_rows(cifar10_zip, "train")
    cache = caches["cifar+mixup"]
    digits = [{"image": np.zeros((8, 8), np.uint8), "label": 0}] * len(kdcache.open_cache(digits_cache, "train"))
    cases = [
        (lambda: with_targets(rows, cache, view_order="shuffled"), "view_order 'shuffled' is not one of"),
        (lambda: with_targets(digits, digits_cache, view_order="cycle"), "stores no augmented views"),
        (lambda: with_targets(rows, cache, index="id"), "mix each row with a partner row"),
        (lambda: with_targets([{"label": r["label"]} for r in rows], cache)[0], "none of the model-input keys"),
        (lambda: with_targets([dict(r, image=r["image"].astype(np.float32)) for r in rows], cache)[0],
         "'image' is float32"),
    ]
    for make, said in cases:
        with pytest.raises(KDCacheError, match=said) as caught:
            make()
        assert "\n" not in str(caught.value)
    changed = [dict(r) for r in rows]
    changed[5] = dict(changed[5], image=changed[5]["image"].copy())
    changed[5]["image"][0, 0, 0] ^= 1
    data = with_targets(changed, cache)
    with pytest.raises(KDCacheError, match="row 5 .*does not match"):
        data[5]
    params = kdcache.open_cache(cache, "train").read("view_params")
    row, view = next((r, v) for r, v in np.argwhere(params[:, :, 3] == 5) if r != 5)  # a view mixing in row 5
    data.set_epoch((view - 1) % V)
    with pytest.raises(KDCacheError, match="row 5 .*does not match"):  # the partner row is checked too
        data[int(row)]


class _Pixels(torch.nn.Module):
    """A ResNet-8 whose forward names its input as Hugging Face image models do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = resnet8(10)

    def forward(self, pixel_values):
        return self.net(pixel_values)


def test_kdtrainer_trains_each_epoch_on_its_views(tmp_path, caches, cifar10_zip):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    from transformers import TrainingArguments

    from kdcache.hf import KDTrainer

    cache = caches["cifar"]
    seen = []

    class Recording(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                seen.append((self.kd_epoch, inputs["teacher_view"].clone(), inputs["teacher_row"].clone(),
                             inputs["pixel_values"].clone(), inputs["teacher_logits"].clone()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = TrainingArguments(str(tmp_path / "out"), num_train_epochs=V, per_device_train_batch_size=16,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             eval_strategy="epoch", logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
                             dataloader_num_workers=1)
    trainer = Recording(model=_Pixels(), args=args, train_dataset=user_rows(cifar10_zip, "train", "pixel_values"),
                        eval_dataset=user_rows(cifar10_zip, "test", "pixel_values"), cache=cache,
                        eval_split="test", method="vanilla", preset="cifar")
    trainer.train()
    stored = kdcache.open_cache(cache, "train").read("view_logits")
    assert sorted({epoch for epoch, *_ in seen}) == list(range(1, V + 1))
    for epoch, views, rows, pixels, logits in seen:
        assert (views == epoch % V).all()  # distill's view of epoch e: e mod V
        want = torch.stack([kdcache.replay_view(cache, "train", int(r), epoch % V) for r in rows])
        assert torch.equal(pixels, want)
        np.testing.assert_array_equal(logits.numpy(), stored[rows.numpy(), epoch % V])
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == V and all(np.isfinite(h["eval_loss"]) for h in evals)  # the plain test images, normalised


def test_the_views_own_loop_example_runs(tmp_path, caches):
    import os
    import re
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "views_own_loop.py"), str(caches["cifar"]),
                           "--epochs", "4", "--batch-size", "16"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.findall(r"^epoch (\d) view \[(\d)\] ", done.stdout, re.M) == [("1", "1"), ("2", "2"), ("3", "0"),
                                                                            ("4", "1")]  # view e mod V, as distill
    found = re.search(r"^validation accuracy ([0-9.]+)$", done.stdout, re.M)
    assert found and 0.0 <= float(found.group(1)) <= 1.0, done.stdout

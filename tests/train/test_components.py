"""`kdcache.train` and the presets: the pieces of the student loop, each tested alone on small real data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import kdcache
from kdcache.cache import codecs, schema as fmt
from kdcache.methods import METHODS, schedules
from kdcache.methods.annealing import ANNEAL_FRACTION, anneal_epochs
from kdcache.train import config
from kdcache.data import DataOptions, load_split
from kdcache.errors import KDCacheError
from kdcache.train.metrics import compute_metrics
from kdcache.runtime import save_torch as save_atomic
from kdcache.train.batches import LabelBatches
from kdcache.train.evaluation import evaluate
from kdcache.train.inputs import RowCheck, StudentInputs, check_alignment
from kdcache.train.optim import build_lr_schedule, build_optimizer
from kdcache.train.run_dir import rng_state, set_rng_state
from kdcache.cache.writer import CacheWriter

CPU = torch.device("cpu")
ROWS = 150  # digits rows used by most tests: a multiple of neither the batch sizes nor the chunk size


@pytest.fixture(scope="module", autouse=True)
def _import_torch_optim():
    """torch's first optimiser costs about a second of lazy imports; pay it once, outside any single test."""
    torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)


@pytest.fixture(scope="module")
def digits():
    return load_split("digits", None, "train", options=DataOptions(limit=ROWS))


@pytest.fixture(scope="module")
def digits_inputs(digits):
    return StudentInputs(digits, CPU)


def _fingerprints(split) -> np.ndarray:
    return np.array([split.dataset[i]["fingerprint"] for i in range(len(split))], dtype=np.uint64)


def _write_cache(path, fingerprints: np.ndarray, index: np.ndarray, labels: np.ndarray, *, chunk_rows: int = 64):
    n, c = len(fingerprints), 10
    writer = CacheWriter(path, {"teacher": {"num_outputs": c}, "task": {"kind": "classification"}})
    split = writer.add_split("train", rows=n, num_outputs=c, kind="classification", dtype="float16",
                             codec=codecs.DEFAULT_CODEC, chunk_rows=chunk_rows)
    logits = np.random.default_rng(0).normal(size=(n, c)).astype(np.float32)
    split.write({"logits": logits, "labels": labels, "index": index, "fingerprint": fingerprints.astype(np.uint64)})
    split.close({"n": n})
    writer.finalize()
    return kdcache.open_cache(path)


def _batches(n: int, size: int, *, shuffled: bool = False) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(n) if shuffled else np.arange(n)
    return [order[a:a + size] for a in range(0, n, size)]


# --- StudentInputs -------------------------------------------------------------------------------------------


def test_student_inputs_know_every_label_without_decoding(digits, digits_inputs):
    assert len(digits_inputs) == len(digits) == ROWS
    assert digits_inputs.labels.tolist() == [digits.dataset[i]["label"] for i in range(ROWS)]
    assert not digits_inputs.complete  # nothing decoded yet


def test_an_epoch_yields_the_prepared_rows_in_the_order_given_and_keeps_them(digits):
    inputs = StudentInputs(digits, CPU)
    batches = _batches(ROWS, 32, shuffled=True)
    for e in (1, 2):  # the first epoch decodes (and keeps), the second gathers what was kept
        for rows, got, labels in inputs.epoch(batches, epoch=e, train=True):
            expected = digits.prepare(digits.collate([digits.dataset[int(r)] for r in rows]), CPU)
            assert torch.equal(got, expected) and labels.tolist() == [digits.dataset[int(r)]["label"] for r in rows]
        assert inputs.complete
    assert torch.equal(inputs.batch(np.array([149, 0, 3])), digits.prepare(
        digits.collate([digits.dataset[r] for r in (149, 0, 3)]), CPU))


def test_inputs_larger_than_the_keep_budget_are_decoded_every_epoch(digits, monkeypatch):
    inputs = StudentInputs(digits, CPU, keep_bytes=100)  # 150 rows of 64 bytes do not fit
    decoded = []
    original = type(digits.dataset).__getitem__
    monkeypatch.setattr(type(digits.dataset), "__getitem__", lambda self, i: decoded.append(i) or original(self, i))
    for e in (1, 2):
        list(inputs.epoch(_batches(ROWS, 50), epoch=e))
    assert len(decoded) == 2 * ROWS and not inputs.complete


def test_workers_decode_the_same_rows(digits):
    plain = list(StudentInputs(digits, CPU).epoch(_batches(ROWS, 40, shuffled=True)))
    workers = list(StudentInputs(digits, CPU, workers=2).epoch(_batches(ROWS, 40, shuffled=True)))
    assert len(plain) == len(workers)
    for (r1, x1, y1), (r2, x2, y2) in zip(plain, workers):
        assert np.array_equal(r1, r2) and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_rows_are_checked_against_the_cache_as_they_are_first_decoded(tmp_path, digits):
    fingerprints = _fingerprints(digits)
    index = np.array([digits.dataset[i]["index"] for i in range(ROWS)])
    stored = fingerprints.copy()
    stored[97] ^= np.uint64(1)
    cache = _write_cache(tmp_path / "c.kdcache", stored, index, np.asarray(digits_labels := [
        digits.dataset[i]["label"] for i in range(ROWS)]))
    inputs = StudentInputs(digits, CPU, check=RowCheck.of_cache(cache, "digits"))
    seen = []
    with pytest.raises(KDCacheError, match=rf"digits: row 97 \(source index {index[97]}\) does not match the cache"):
        for rows, _, _ in inputs.epoch(_batches(ROWS, 32)):
            seen.append(rows)
    assert len(seen) == 3  # rows 0-95 came through; the batch holding row 97 was refused before it was yielded
    good = _write_cache(tmp_path / "good.kdcache", fingerprints, index, np.asarray(digits_labels))
    checked = StudentInputs(digits, CPU, check=RowCheck.of_cache(good, "digits"))
    list(checked.epoch(_batches(ROWS, 32, shuffled=True)))
    assert checked.check.done


def test_student_inputs_for_text_pads_each_batch_to_its_longest_row(tmp_path, tiny_tokenizer):
    sentences = ["good", "a very very good film", "bad movie", "the worst film of all", "i love it"]
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(sentences)))
    split = load_split("text", data, "train", tokenizer=tiny_tokenizer,
                       options=DataOptions(text_column="sentence", label_column="label"))
    inputs = StudentInputs(split, CPU, workers=1)  # text is collated in the worker
    assert len(inputs) == 5 and inputs.labels.tolist() == [0, 1, 0, 1, 0]
    (rows, batch, labels), = list(inputs.epoch([np.array([0, 2])]))
    ids = [tiny_tokenizer(s)["input_ids"] for s in ("good", "bad movie")]  # 3 and 4 tokens with [CLS]/[SEP]
    width = max(map(len, ids))
    assert batch["input_ids"].shape == (2, width) and labels.tolist() == [0, 0]
    assert batch["input_ids"][0, : len(ids[0])].tolist() == ids[0]
    assert batch["attention_mask"].sum(1).tolist() == [len(ids[0]), len(ids[1])]


def test_kept_token_ids_give_the_collates_own_batches(tmp_path, tiny_tokenizer):
    """After epoch 1 a text split is gathered from kept token ids, never tokenised again: the same tensors."""
    rng = np.random.default_rng(0)
    words = ["good", "bad", "film", "very", "movie", "the", "of", "all", "love", "i", "it", "worst"]
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{' '.join(rng.choice(words, rng.integers(1, 12)))}\t{i % 2}\n"
                                                   for i in range(50)))
    split = load_split("text", data, "train", tokenizer=tiny_tokenizer,
                       options=DataOptions(text_column="sentence", label_column="label", max_length=16))
    kept, fresh = StudentInputs(split, CPU), StudentInputs(split, CPU, keep_bytes=0)
    batches = _batches(50, 8, shuffled=True)
    list(kept.epoch(batches))
    assert kept.complete and not fresh.complete
    for (r1, a, l1), (r2, b, l2) in zip(kept.epoch(batches[::-1]), fresh.epoch(batches[::-1])):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert torch.equal(l1, l2) and (r1 == r2).all()


# --- check_alignment (--check-first) -------------------------------------------------------------------------


def test_check_alignment_accepts_the_data_the_teacher_saw(tmp_path, digits, digits_inputs):
    index = np.array([digits.dataset[i]["index"] for i in range(ROWS)])
    cache = _write_cache(tmp_path / "c.kdcache", _fingerprints(digits), index, digits_inputs.labels)
    check_alignment(digits_inputs, cache, "digits")  # no error


@pytest.mark.parametrize("rows", [[97], [70, 130], [0, 5, 149]])
def test_check_alignment_names_the_first_mismatching_row(tmp_path, digits, digits_inputs, rows):
    index = np.array([digits.dataset[i]["index"] for i in range(ROWS)])
    fresh = _fingerprints(digits)
    stored = fresh.copy()
    stored[rows] ^= np.uint64(1)
    cache = _write_cache(tmp_path / "c.kdcache", stored, index, digits_inputs.labels)
    with pytest.raises(KDCacheError) as excinfo:
        check_alignment(digits_inputs, cache, "digits")
    message = str(excinfo.value)
    assert "\n" not in message
    first = rows[0]
    assert f"row {first} " in message
    assert f"(source index {index[first]})" in message
    assert f"{len(rows)} of {ROWS} rows differ" in message
    assert f"{int(fresh[first]):016x}" in message and f"{int(stored[first]):016x}" in message


# --- augmentation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar", "imagenet"])
def test_augmented_views_depend_on_the_generator_alone_and_keep_the_shape(name):
    from kdcache.data.augment import augment

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = augment(images, name, torch.Generator().manual_seed(3))
    b = augment(images, name, torch.Generator().manual_seed(3))
    c = augment(images, name, torch.Generator().manual_seed(4))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a.float(), images.float())  # a view, not the image
    assert 0 <= float(a.min()) and float(a.max()) <= 255


def test_a_cifar_view_is_a_shifted_crop_or_its_mirror():
    from kdcache.data.augment import augment

    image = torch.arange(32 * 32, dtype=torch.int64).reshape(1, 1, 32, 32).repeat(1, 3, 1, 1)
    view = augment(image, "cifar", torch.Generator().manual_seed(0))[0, 0]
    padded = torch.nn.functional.pad(image[0, 0], (4, 4, 4, 4))
    crops = [padded[y:y + 32, x:x + 32] for y in range(9) for x in range(9)]
    assert any(torch.equal(view, c) or torch.equal(view, c.flip(-1)) for c in crops)


# --- LabelBatches --------------------------------------------------------------------------------------------


def _epoch(batches: LabelBatches, e: int):
    return [(rows.clone(), extra, labels.clone()) for rows, extra, labels in batches.epoch(e)]


@pytest.mark.parametrize("batch_size", [1, 16, 64, 150, 1000])
def test_label_batches_cover_every_row_once_per_epoch(batch_size):
    labels = torch.arange(ROWS) * 10
    batches = LabelBatches(labels, batch_size, seed=3, device=CPU)
    assert len(batches) == math.ceil(ROWS / batch_size)
    for e in (1, 2):
        epoch = _epoch(batches, e)
        assert len(epoch) == len(batches)
        sizes = [len(rows) for rows, _, _ in epoch]
        assert all(s == batch_size for s in sizes[:-1]) and 1 <= sizes[-1] <= batch_size
        rows = torch.cat([r for r, _, _ in epoch])
        assert sorted(rows.tolist()) == list(range(ROWS))
        for r, extra, lab in epoch:
            assert extra is None
            assert torch.equal(lab, labels[r])  # each batch's labels are its rows' labels


def test_label_batches_are_reproducible_per_seed_and_epoch():
    labels = torch.randint(0, 10, (ROWS,))
    a = LabelBatches(labels, 32, seed=5, device=CPU)
    b = LabelBatches(labels, 32, seed=5, device=CPU)
    order = lambda batches, e: torch.cat([r for r, _, _ in batches.epoch(e)]).tolist()  # noqa: E731
    torch.manual_seed(0)
    first = order(a, 2)
    torch.manual_seed(999)  # the global RNG must not matter (a resumed run replays the same order)
    assert order(b, 2) == first
    assert order(a, 2) == first  # replaying an epoch on the same object
    assert order(a, 3) != first  # epochs differ
    assert order(LabelBatches(labels, 32, seed=6, device=CPU), 2) != first  # seeds differ
    assert first != list(range(ROWS))  # shuffled at all


# --- evaluate ------------------------------------------------------------------------------------------------


class _Net(nn.Module):
    """A linear classifier with dropout: outputs differ between train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.drop = nn.Dropout(0.5)
        self.linear = nn.Linear(64, 10)
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return self.linear(self.drop(x))


@pytest.mark.parametrize("start_training", [True, False])
def test_evaluate_scores_in_eval_mode_and_restores_the_mode(digits_inputs, start_training):
    net = _Net()
    net.train(start_training)
    labels = digits_inputs.labels
    result = evaluate(net, digits_inputs, labels, task="digits", kind="classification", device=CPU, batch_size=64)
    assert net.training is start_training
    assert net.drop.training is start_training  # submodules too
    assert net.modes == [False, False, False]  # ceil(150 / 64) batches, all in eval mode
    with torch.no_grad():
        net.eval()
        logits = net.linear(digits_inputs.batch(np.arange(ROWS))).numpy()
    expected = compute_metrics(logits, labels, task="digits")
    assert result["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert result["metric"] == result["accuracy"] and result["rows"] == ROWS
    assert all(p.grad is None for p in net.parameters())


def test_evaluate_accepts_a_student_wrapper_and_restores_its_mode(digits_inputs):
    from kdcache.models.students import build_student

    student = build_student("mlp", 10, kwargs={"hidden": 8}, seed=0)
    student.model.train()
    labels = digits_inputs.labels.copy()
    labels[:50] = -1
    result = evaluate(student, digits_inputs, labels, task="cola", kind="classification", device=CPU)
    assert student.model.training
    assert result["rows"] == ROWS - 50
    student.model.eval()
    with torch.no_grad():
        logits = student(digits_inputs.batch(np.arange(ROWS))).numpy()
    assert result["mcc"] == pytest.approx(compute_metrics(logits, labels, task="cola")["mcc"], abs=1e-12)


# --- build_optimizer -----------------------------------------------------------------------------------------


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.LayerNorm(4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
def test_build_optimizer_puts_no_weight_decay_on_one_dimensional_parameters(name):
    model = _Mixed()
    optimizer = build_optimizer(name, model, lr=0.1, weight_decay=0.5)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(decay["params"]) == {id(model.embed.weight), id(model.conv.weight), id(model.head.weight)}
    assert ids(no_decay["params"]) == {id(model.conv.bias), id(model.norm.weight), id(model.norm.bias),
                                       id(model.bn.weight), id(model.bn.bias), id(model.head.bias)}
    assert not ids(model.frozen.parameters()) & ids(decay["params"] + no_decay["params"])
    assert all(g["lr"] == 0.1 for g in optimizer.param_groups)

    # behaviour: with zero gradients, only weight decay moves a parameter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        assert moved == (p.requires_grad and p.ndim > 1), n


def test_build_optimizer_types_and_momentum():
    model = nn.Linear(3, 2)
    sgd = build_optimizer("sgd", model, lr=0.2, weight_decay=5e-4, momentum=0.9)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    plain = build_optimizer("sgd", model, lr=0.2, weight_decay=0.0, momentum=0.0)
    assert plain.defaults["momentum"] == 0.0 and plain.defaults["nesterov"] is False
    assert type(build_optimizer("adamw", model, lr=1e-3, weight_decay=0.01)) is torch.optim.AdamW
    assert type(build_optimizer("adam", model, lr=1e-3, weight_decay=0.01)) is torch.optim.Adam


@pytest.mark.parametrize("name,lr,match", [
    ("lion", 0.1, "--optimizer 'lion'"), ("sgd", 0.0, "--lr"), ("adamw", -1e-3, "--lr"),
    ("adamw", float("nan"), "--lr"), ("adamw", float("inf"), "--lr"),
])
def test_build_optimizer_refuses_bad_arguments(name, lr, match):
    with pytest.raises(KDCacheError, match=match):
        build_optimizer(name, nn.Linear(2, 2), lr=lr, weight_decay=0.0)


# --- build_lr_schedule ---------------------------------------------------------------------------------------


def _factors(name: str, total: int, warmup: int, steps: int) -> list[float]:
    """The learning-rate factor in force at optimiser steps 0..steps-1 (base lr 1)."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = build_lr_schedule(name, optimizer, total_steps=total, warmup_steps=warmup)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return out


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_warmup_is_linear_up_to_the_base_rate(name):
    f = _factors(name, total=20, warmup=4, steps=5)
    assert f == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_lr_constant_after_warmup():
    f = _factors("constant", total=20, warmup=4, steps=30)
    assert f[3:] == pytest.approx([1.0] * 27)


def test_lr_linear_decays_to_zero():
    f = _factors("linear", total=20, warmup=4, steps=25)
    # after warm-up: 1 - (step - 4) / 16
    assert f[4] == pytest.approx(1.0)
    assert f[8] == pytest.approx(0.75)
    assert f[12] == pytest.approx(0.5)
    assert f[19] == pytest.approx(1 / 16)
    assert f[20:] == pytest.approx([0.0] * 5)  # clamped, never negative


def test_lr_cosine_decays_to_zero():
    f = _factors("cosine", total=20, warmup=4, steps=25)
    assert f[4] == pytest.approx(1.0)
    assert f[8] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert f[12] == pytest.approx(0.5)
    assert f[16] == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    assert f[20:] == pytest.approx([0.0] * 5, abs=1e-12)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_lr_without_warmup_starts_at_the_base_rate():
    assert _factors("linear", total=10, warmup=0, steps=11) == pytest.approx([1 - s / 10 for s in range(11)])
    assert _factors("cosine", total=10, warmup=0, steps=1) == pytest.approx([1.0])


def test_lr_schedule_scales_each_group_and_refuses_unknown_names():
    model = _Mixed()
    optimizer = build_optimizer("adamw", model, lr=0.01, weight_decay=0.1)
    schedule = build_lr_schedule("linear", optimizer, total_steps=10, warmup_steps=2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.005])
    optimizer.step()
    schedule.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.01, 0.01])
    with pytest.raises(KDCacheError, match="--lr-schedule 'step'"):
        build_lr_schedule("step", optimizer, total_steps=10)


# --- save_atomic and RNG state -------------------------------------------------------------------------------


def test_save_atomic_writes_then_replaces(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.arange(4)}, path)
    save_atomic({"epoch": 2, "w": torch.arange(5)}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["w"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_save_atomic_keeps_the_old_checkpoint_when_saving_fails(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, path)
    with pytest.raises(Exception):
        save_atomic({"epoch": 2, "bad": lambda: None}, path)  # lambdas do not pickle
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_rng_state_round_trip():
    state = rng_state()
    first = torch.rand(5)
    torch.rand(100)
    set_rng_state(state)
    assert torch.equal(torch.rand(5), first)


# --- presets -------------------------------------------------------------------------------------------------


def _preset(name: str, method: str = "continuation") -> dict:
    return {**config.TRAINING_PRESETS[name], **METHODS[method].preset_defaults(name)}


def test_presets_hold_the_papers_values():
    cifar, glue = _preset("cifar"), _preset("glue")
    assert (cifar["epochs"], cifar["t_max"], cifar["lr"], cifar["batch_size"], cifar["psi"]) == (200, 20, 0.2, 32, "cifar")
    assert (glue["epochs"], glue["t_max"], glue["lr"], glue["batch_size"], glue["psi"]) == (30, 10, 2e-5, 64, "glue")
    keys = set(config.TRAINING_PRESETS["cifar"])
    assert all(set(values) == keys for values in config.TRAINING_PRESETS.values())  # every preset sets every default
    for method in METHODS.values():  # and every method its own, under every preset
        assert len({frozenset(method.preset_defaults(p)) for p in config.TRAINING_PRESETS}) == 1, method.name
    for values in config.TRAINING_PRESETS.values():
        assert values["optimizer"] in ("sgd", "adamw", "adam")
        assert values["lr_schedule"] in ("constant", "linear", "cosine")


@pytest.mark.parametrize("modality,expected", [("text", "glue"), ("image", "cifar"), ("features", "small"),
                                               ("something-else", "small")])
def test_auto_preset_picks_by_modality(modality, expected):
    name, values = config.resolve("auto", modality, METHODS["continuation"], config.DistillConfig("mlp", "out"))
    assert name == expected and values == {**_preset(expected), "anneal_epochs": None}


def test_resolve_applies_given_flags_only_and_copies():
    cfg = config.DistillConfig("mlp", "out", lr=0.05, epochs=None, margin=0.0)
    name, values = config.resolve("cifar", "text", METHODS["continuation"], cfg)
    assert name == "cifar"
    assert values["lr"] == 0.05 and values["margin"] == 0.0  # 0 is a value, not "not given"
    assert values["epochs"] == 200  # None means the flag was not given
    values["t_max"] = 1
    assert METHODS["continuation"].preset_defaults("cifar")["t_max"] == 20  # the tables are never modified
    _, vanilla = config.resolve("cifar", "text", METHODS["vanilla"], config.DistillConfig("mlp", "out"))
    assert (vanilla["temperature"], vanilla["alpha"]) == (4.0, 0.5) and "t_max" not in vanilla  # its own only


def test_resolve_refuses_unknown_presets():
    with pytest.raises(KDCacheError, match="--preset 'imagenet'"):
        config.resolve("imagenet", "image", METHODS["ce"], config.DistillConfig("mlp", "out"))


@pytest.mark.parametrize("preset,epochs,expected", [("cifar", 200, 133), ("cifar", 300, 200), ("glue", 30, 23),
                                                    ("glue", 13, 10), ("small", 3, 2),
                                                    ("glue", 2, 1)])
def test_anneal_epochs_default_fraction(preset, epochs, expected):
    assert anneal_epochs(ANNEAL_FRACTION[preset], epochs, None) == expected


def test_anneal_epochs_given_and_bounds():
    fraction = ANNEAL_FRACTION["glue"]
    assert anneal_epochs(fraction, 10, 4) == 4
    for bad in (0, 10, 11):
        with pytest.raises(KDCacheError, match="--anneal-epochs"):
            anneal_epochs(fraction, 10, bad)
    # a one-epoch run has no room for two stages: said as such, not as an --anneal-epochs nobody passed
    with pytest.raises(KDCacheError, match=r"needs at least 2 epochs \(one per stage\), got --epochs 1"):
        anneal_epochs(fraction, 1, None)


# --- schedules fitted to the run (issue 21) ------------------------------------------------------------------------

def _reproduce_scales() -> dict[str, set[int]]:
    """Every run length benchmarks/reproduce.py trains students for, by the preset its experiment uses."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import reproduce

    return {"cifar": {s["epochs"] for s in reproduce.VISION_SCALES.values()},
            "glue": {s["epochs"] for s in reproduce.GLUE_SCALES.values()}}


def _annealing_phi_at_end_of_stage_1(values: dict, unit: str = "epoch", steps: int = 7) -> tuple[int, float]:
    from kdcache.methods import Run, make_method

    method = make_method("annealing")
    n = int(values["epochs"])
    method.setup(Run(dict(values), n, steps, unit, "classification", None, None, None, "test"))
    k = method.k
    last_step = k * steps - 1
    return k, method.values(k, last_step, n)["phi"]


def test_annealing_reaches_phi_1_at_the_end_of_stage_1_for_every_preset_at_every_scale():
    """The authors' script asserts stage 1 is at least T_max epochs long, so phi reaches 1 before stage 2; the
    presets cap T_max at K: every preset, at its own length, at each length reproduce.py runs (its flags too),
    and at the short runs a user starts with."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import reproduce

    lengths = set().union(*_reproduce_scales().values(), {2, 3, 4, 5, 8, 12, 13, 30, 200})
    for preset in config.TRAINING_PRESETS:
        for n in sorted(lengths | {config.TRAINING_PRESETS[preset]["epochs"]}):
            for absolute in (None, True):
                cfg = config.DistillConfig("mlp", "out", epochs=n, absolute_schedules=absolute)
                values = config.settings(preset, "image", METHODS["annealing"], cfg).values
                for unit in ("epoch", "step"):
                    k, phi = _annealing_phi_at_end_of_stage_1(values, unit)
                    assert phi == 1.0 and values["t_max"] <= k, (preset, n, unit, values["t_max"], k)
    for preset, lengths in _reproduce_scales().items():  # the flags reproduce.py writes into its commands
        for n in lengths:
            t_max = int(reproduce._scaled_preset(n, preset)["annealing"][1])
            cfg = config.DistillConfig("mlp", "out", epochs=n, t_max=t_max)
            assert _annealing_phi_at_end_of_stage_1(config.settings(preset, "image", METHODS["annealing"], cfg).values)[1] == 1.0


def test_annealing_refuses_a_t_max_longer_than_stage_1_as_the_authors_script_does():
    cfg = config.DistillConfig("mlp", "out", epochs=12, t_max=12)  # K = 8 of 12
    with pytest.raises(KDCacheError, match=r"--t-max 12 is more than stage 1's 8 epochs .*authors' script asserts"):
        config.settings("cifar", "image", METHODS["annealing"], cfg)
    values = config.settings("cifar", "image", METHODS["annealing"], config.DistillConfig("mlp", "out", epochs=12,
                                                                                          t_max=8)).values
    assert values["t_max"] == 8  # at K exactly: allowed, phi reaches 1 (above)
    from kdcache.methods import Run, make_method

    with pytest.raises(KDCacheError, match="--t-max 9 is more than stage 1's 8 epochs"):  # the API path, too
        make_method("annealing").setup(Run({**values, "t_max": 9}, 12, 5, "epoch", "classification", None, None,
                                           None, "test"))


@pytest.mark.parametrize("preset,n", [("cifar", 12), ("cifar", 5), ("glue", 8), ("glue", 3), ("small", 5),
                                      ("text-scratch", 4)])
def test_continuation_presets_fit_a_shorter_run_in_the_papers_shape(preset, n):
    """--epochs other than the preset's: psi is the preset's equation over n epochs, T_max at most n so T reaches 1
    within the run; said in the settings line and the summary record; --absolute-schedules keeps the preset's."""
    paper = METHODS["continuation"].preset_defaults(preset)
    chosen = config.settings(preset, "image", METHODS["continuation"], config.DistillConfig("mlp", "out", epochs=n))
    v = chosen.values
    assert v["psi"] == f"{paper['psi']}:{n}" and v["t_max"] == min(paper["t_max"], n)
    assert schedules.temperature(n, n, v["t_max"]) == 1 and schedules.psi(v["psi"], n, n) == 1.0
    line = chosen.line("continuation")
    assert "\n" not in line and f"psi {paper['psi']} -> {paper['psi']}:{n}" in line and "--absolute-schedules" in line
    assert chosen.record()["schedules_scaled"] == {"preset_epochs": config.TRAINING_PRESETS[preset]["epochs"],
                                                   "epochs": n, "changes": chosen.scaled}
    kept = config.settings(preset, "image", METHODS["continuation"],
                           config.DistillConfig("mlp", "out", epochs=n, absolute_schedules=True))
    assert (kept.values["psi"], kept.values["t_max"], kept.scaled) == (paper["psi"], paper["t_max"], [])
    given = config.settings(preset, "image", METHODS["continuation"],
                            config.DistillConfig("mlp", "out", epochs=n, psi="linear:3", t_max=7))
    assert (given.values["psi"], given.values["t_max"], given.scaled) == ("linear:3", 7, [])  # flags always win
    own = config.settings(preset, "image", METHODS["continuation"], config.DistillConfig("mlp", "out"))
    assert own.scaled == [] and own.values["psi"] == paper["psi"] and own.record()["schedules_scaled"] is None


def test_the_preset_example_of_issue_21_no_longer_ends_on_a_third_of_the_teacher():
    """`--preset cifar --epochs 5` kept the paper's absolute epochs: T 19 -> 15, phi 0.1 -> 0.3, psi at most 0.033.
    Fitted, the run ends on the teacher itself (phi 1) and on the labels (psi 1)."""
    from kdcache.methods import Run, make_method

    for absolute, end in ((None, (1.0, 1.0)), (True, (pytest.approx(0.3), pytest.approx(5 / 150)))):
        values = config.resolve("cifar", "image", METHODS["continuation"],
                                config.DistillConfig("resnet8", "out", epochs=5, absolute_schedules=absolute))[1]
        method = make_method("continuation")
        method.setup(Run(values, 5, 3, "epoch", "classification", None, None, None, "test"))
        last = method.values(5, 14, 5)
        assert (last["phi"], last["psi"]) == end


@pytest.mark.parametrize("modality,family,expected", [
    ("image", "mlp", "small"), ("image", "cnn", "cifar"), ("image", None, "cifar"),
    ("text", "pretrained", "glue"), ("text", "transformer", "text-scratch"), ("text", None, "glue"),
    ("features", "mlp", "small"), ("features", "cnn", "small")])
def test_auto_preset_picks_by_the_task_and_the_model(modality, family, expected):
    """Issue 26: an MLP on Fashion-MNIST is not a CIFAR ResNet (it diverged at SGD 0.2); a Transformer from its
    config is not a pre-trained encoder (2e-5 left it at chance). The reason is part of the settings line."""
    chosen = config.settings("auto", modality, METHODS["ce"], config.DistillConfig("mlp", "out"), family)
    assert chosen.preset == expected and chosen.reason.startswith("auto: ")
    assert f"settings: preset {expected} (auto: " in chosen.line("ce")
    assert config.settings("cifar", modality, METHODS["ce"], config.DistillConfig("mlp", "out"), family).preset == "cifar"


def test_student_family_reads_the_spec(tmp_path):
    from kdcache.models import student_family

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "kdcache-model.json").write_text('{"architecture": "mlp", "num_classes": 10}')
    (tmp_path / "bert.json").write_text("{}")
    assert [student_family(s) for s in ("mlp", "resnet8", "resnet18", str(tmp_path / "hf"), str(tmp_path / "bert.json"),
                                        str(tmp_path / "saved"), "pkg.mod:factory")] == \
        ["mlp", "cnn", "cnn", "pretrained", "transformer", "mlp", None]


def test_a_one_epoch_run_keeps_the_presets_schedules():
    """One epoch has no shape to keep (psi over one epoch would be all CE): the preset's values stay, unscaled."""
    chosen = config.settings("glue", "text", METHODS["continuation"], config.DistillConfig("mlp", "out", epochs=1))
    assert (chosen.values["psi"], chosen.values["t_max"], chosen.scaled) == ("glue", 10, [])


@pytest.mark.parametrize("epochs, steps_per_epoch, said", [(5, 23, True), (17, 23, True), (18, 23, False),
                                                          (200, 94, False)])
def test_continuation_kd_advises_more_steps_only_for_a_run_shorter_than_its_rule_of_thumb(epochs, steps_per_epoch,
                                                                                           said):
    """Issue 21, point 6: Continuation-KD came last in every measured run of under 400 steps; such a run is told so
    at its start (a note, the run goes on), and a longer one is not."""
    from kdcache.methods.base import Run
    from kdcache.methods.continuation import FEW_STEPS

    method = METHODS["continuation"]()
    method.setup(Run({"psi": "glue", "t_max": 10, "margin": 1.0}, epochs, steps_per_epoch, "epoch", "classification"))
    advice = method.advice()
    assert (advice is not None) == said == (epochs * steps_per_epoch < FEW_STEPS)
    if said:
        assert f"{epochs * steps_per_epoch} optimiser steps" in advice
    assert all(METHODS[name]().advice() is None for name in METHODS if name != "continuation")



@pytest.mark.parametrize("epochs", [1, 40])
def test_continuation_kd_on_tokens_points_to_vanilla_kd_however_long_the_run(epochs):
    """Issue 22's Tiny Shakespeare table put Continuation-KD 44% behind the tokens alone at 400 steps: a run on a
    language-model cache says so at its start, long or short; the same run on rows says nothing once it is long."""
    from kdcache.methods.base import Run

    hp = {"psi": "glue", "t_max": 10, "margin": 1.0}
    for kind, expected in (("lm", True), ("classification", epochs * 100 < 400)):
        method = METHODS["continuation"]()
        method.setup(Run(hp, epochs, 100, "epoch", kind))
        advice = method.advice()
        assert (advice is not None) == expected
        if kind == "lm":
            assert "--method vanilla" in advice and "Token-level targets" in advice

"""Issue 2, "What to build" 3 end to end through the CLI: the other GLUE formats on files written here in their
published layouts, images from an extracted folder tree, torchvision and factory teachers, autocast, devices,
unlabeled and integer-labelled text, the progress bar, and a writer that never holds the teacher back."""

from __future__ import annotations

import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import kdcache
from kdcache.fingerprint import dataset_digest, fingerprint_pixels, fingerprint_tokens
from kdcache.models import build_model, resnet8
from kdcache.runtime import resolve_device
from kdcache.cache.writer import BackgroundWriter
from teachers_for_tests import make_tiny_bert
from helpers import run_cli, write_tsv

CIFAR10_MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
CIFAR10_STD = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
Q = '"the film was good, he said'  # GLUE's quoting: a bare quote is text, never the start of a quoted field


@pytest.fixture(scope="module")
def berts(tmp_path_factory, tiny_tokenizer):
    """Tiny BERT teachers by output width: 1 (regression), 2 and 3."""
    root = tmp_path_factory.mktemp("berts")
    return {n: make_tiny_bert(root / f"bert{n}", tiny_tokenizer, num_labels=n, seed=n) for n in (1, 2, 3)}


def _direct(bert_dir, texts, pairs):
    """An independent forward pass, one row at a time without padding; also the rows' fingerprints."""
    model = AutoModelForSequenceClassification.from_pretrained(str(bert_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(bert_dir))
    logits, fps = [], []
    for text, pair in zip(texts, pairs):
        enc = tok(text, pair, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**enc).logits[0].numpy())
        fps.append(fingerprint_tokens(enc["input_ids"][0].tolist()))
    return np.stack(logits), np.array(fps, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------- GLUE layouts

_MNLI = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
         "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
_STSB = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]


def _mnli(i, a, b, labels):
    return [str(i), str(100 + i), f"{100 + i}n", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", a, b, *labels]


def _stsb(i, a, b, score):
    return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, score]


# task -> (GLUE folder, width, {file: rows}, text column, pair column, {split: expected labels})
GLUE_LAYOUTS = {
    "rte": ("RTE", 2, {
        "train.tsv": [["index", "sentence1", "sentence2", "label"], ["0", Q, "it was good", "entailment"],
                      ["1", "a bad movie", "a great movie", "not_entailment"], ["2", "the story", "a story",
                                                                                  "entailment"]],
        "dev.tsv": [["index", "sentence1", "sentence2", "label"], ["0", "the film", "a film", "not_entailment"]],
    }, "sentence1", "sentence2", {"train": [0, 1, 0], "validation": [1]}),
    "qnli": ("QNLI", 2, {
        "train.tsv": [["index", "question", "sentence", "label"], ["0", "who was it ?", Q, "not_entailment"],
                      ["1", "what is it ?", "it is a film", "entailment"]],
        "dev.tsv": [["index", "question", "sentence", "label"], ["0", "why ?", "so", "entailment"]],
    }, "question", "sentence", {"train": [1, 0], "validation": [0]}),
    "qqp": ("QQP", 2, {
        "train.tsv": [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                      ["0", "1", "2", "how good is it ?", Q, "1"], ["1", "3", "4", "why ?", "when ?", "0"]],
        "dev.tsv": [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                    ["7", "9", "10", "is it good ?", "is it bad ?", "0"]],
    }, "question1", "question2", {"train": [1, 0], "validation": [0]}),
    "mnli": ("MNLI", 3, {
        "train.tsv": [[*_MNLI, "label1", "gold_label"], _mnli(0, Q, "it was", ["neutral", "neutral"]),
                      _mnli(1, "a film", "no film", ["contradiction", "contradiction"]),
                      _mnli(2, "a film", "one film", ["entailment", "entailment"])],
        "dev_matched.tsv": [[*_MNLI, "label1", "label2", "label3", "label4", "label5", "gold_label"],
                            _mnli(0, "a film", Q, ["neutral", "entailment", "neutral", "neutral", "contradiction",
                                                   "neutral"])],
    }, "sentence1", "sentence2", {"train": [1, 2, 0], "validation": [1]}),
    "stsb": ("STS-B", 1, {
        "train.tsv": [_STSB, _stsb(0, Q, "a film", "5.000"), _stsb(1, "the story", "no story", "0.750")],
        "dev.tsv": [_STSB, _stsb(0, "a man is here", "a man is there", "3.200")],
    }, "sentence1", "sentence2", {"train": [5.0, 0.75], "validation": [3.2]}),
}


@pytest.mark.parametrize("task", list(GLUE_LAYOUTS))
def test_other_glue_formats_cache_the_teachers_own_logits(tmp_path, capsys, monkeypatch, berts, task):
    folder_name, width, files, text_col, pair_col, expected = GLUE_LAYOUTS[task]
    folder = tmp_path / "glue" / folder_name
    for name, rows in files.items():
        write_tsv(folder / name, rows)
    out = tmp_path / f"{task}.kdcache"
    code, stdout, err = run_cli(["cache-teacher", "--teacher", berts[width], "--task", task, "--data", folder,
                                 "--split", "train", "--split", "validation", "--out", out, "--batch-size", "2",
                                 "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    assert f"cached train: {len(expected['train'])} rows x {width} outputs" in stdout
    for split, file in (("train", "train.tsv"), ("validation", "dev_matched.tsv" if task == "mnli" else "dev.tsv")):
        cache = kdcache.open_cache(out, split=split)
        header, *rows = files[file]
        texts = [r[header.index(text_col)] for r in rows]
        pairs = [r[header.index(pair_col)] for r in rows]
        direct, fps = _direct(berts[width], texts, pairs)
        np.testing.assert_allclose(cache.logits[:].astype(np.float32), direct, rtol=2**-10, atol=1e-4)
        np.testing.assert_array_equal(cache.fingerprint[:], fps)
        np.testing.assert_array_equal(cache.index[:], np.arange(len(rows)))
        assert cache.split_attrs["dataset"]["digest"] == dataset_digest(fps)
        assert cache.split_attrs["dataset"]["source"].endswith(f"{folder_name}/{file}")
        if task == "stsb":
            assert cache.labels.dtype == np.float32 and cache.task_kind == "regression"
            np.testing.assert_allclose(cache.labels[:], expected[split])
        else:
            assert cache.labels.dtype == np.int64 and cache.labels[:].tolist() == expected[split]
    assert cache.attrs["task"]["kind"] == ("regression" if task == "stsb" else "classification")
    assert cache.attrs["teacher"]["num_outputs"] == width


# ---------------------------------------------------------------------------------------------- images

@pytest.fixture(scope="module")
def resnet8_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = resnet8(10)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a teacher left in train mode would differ
        model.train()(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    path = tmp_path_factory.mktemp("r8") / "resnet8.pt"
    torch.save(model.state_dict(), path)
    return path


def _extract_tree(cifar10_zip, root, per_class=2):
    """Real CIFAR-10 JPEGs extracted into <split>/<class>/<file>: the published tree, as a plain folder."""
    picked = {}
    with zipfile.ZipFile(cifar10_zip) as zf:
        names = zf.namelist()
        for split in ("train", "test"):
            chosen = []
            for cls in ("airplane", "cat", "truck"):
                chosen += sorted(n for n in names if n.startswith(f"{split}/{cls}/") and n.endswith(".jpg"))[:per_class]
            for name in chosen:
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(zf.read(name))
            picked[split] = sorted(chosen)
    return picked


def _pixels(files):
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _run_image_model(model, hwc):
    x = torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model.eval()((x - CIFAR10_MEAN) / CIFAR10_STD).numpy()


def test_resnet_on_an_extracted_cifar10_folder_tree(tmp_path, capsys, monkeypatch, cifar10_zip, resnet8_weights):
    root = tmp_path / "cifar10-jpg"
    picked = _extract_tree(cifar10_zip, root)
    out = tmp_path / "c.kdcache"
    args = ["cache-teacher", "--teacher", "resnet8", "--task", "imagefolder", "--normalize", "cifar10", "--data", root,
            "--split", "train", "--split", "test", "--out", out, "--no-progress"]
    # the head is sized to the three class folders present, so 10-way weights do not fit
    code, _, err = run_cli([*args, "--weights", resnet8_weights], capsys, monkeypatch)
    assert code == 1 and "shape mismatch" in err and not out.exists()
    model = resnet8(3)
    state = torch.load(resnet8_weights)
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:3], state["fc.bias"][:3]
    weights3 = tmp_path / "resnet8-3.pt"
    torch.save(state, weights3)
    model.load_state_dict(state)
    code, _, err = run_cli([*args, "--weights", weights3], capsys, monkeypatch)
    assert code == 0, err
    for split in ("train", "test"):
        cache = kdcache.open_cache(out, split)
        hwc = _pixels([root / n for n in picked[split]])
        np.testing.assert_allclose(cache.logits[:].astype(np.float32), _run_image_model(model, hwc),
                                   rtol=2**-10, atol=1e-3)
        np.testing.assert_array_equal(cache.fingerprint[:], [fingerprint_pixels(im) for im in hwc])
        assert cache.labels[:].tolist() == [0, 0, 1, 1, 2, 2]
    assert cache.attrs["task"]["label_names"] == ["airplane", "cat", "truck"]


def test_torchvision_teacher_with_a_state_dict(tmp_path, capsys, monkeypatch, cifar10_zip):
    root = tmp_path / "tree"
    picked = _extract_tree(cifar10_zip, root, per_class=1)
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    assert type(model).__module__.startswith("torchvision")
    weights = tmp_path / "resnet18.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)  # DDP-style
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", "resnet18", "--weights", weights, "--task", "imagefolder",
                            "--normalize", "cifar10", "--data", root, "--split", "test", "--out", out,
                            "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    cache = kdcache.open_cache(out, "test")
    hwc = _pixels([root / n for n in picked["test"]])
    np.testing.assert_allclose(cache.logits[:].astype(np.float32), _run_image_model(model, hwc), rtol=2**-10, atol=1e-3)
    assert cache.attrs["teacher"]["spec"] == "resnet18" and cache.attrs["teacher"]["source"] == "architecture"
    assert cache.attrs["teacher"]["weights_file"] == str(weights)


# ---------------------------------------------------------------------------------------------- inference options

def test_bf16_autocast_and_auto_device(tmp_path, capsys, monkeypatch, berts, glue_dir):
    common = ["cache-teacher", "--teacher", berts[2], "--task", "sst2", "--data", glue_dir / "SST-2", "--limit", "24",
              "--no-progress", "--dtype", "float32"]
    assert run_cli([*common, "--out", tmp_path / "fp32"], capsys, monkeypatch)[0] == 0
    code, _, err = run_cli([*common, "--precision", "bf16", "--out", tmp_path / "bf16"], capsys, monkeypatch)
    assert code == 0, err
    fp32, bf16 = kdcache.open_cache(tmp_path / "fp32"), kdcache.open_cache(tmp_path / "bf16")
    assert bf16.attrs["inference"]["precision"] == "bf16" and fp32.attrs["inference"]["precision"] == "fp32"
    assert bf16.attrs["inference"]["device"] == str(resolve_device("auto"))  # --device defaults to auto
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    a, b = fp32.logits[:], bf16.logits[:]
    assert not np.array_equal(a, b)  # autocast really ran in bfloat16 ...
    np.testing.assert_allclose(b, a, atol=0.05)  # ... to within its 8-bit mantissa
    np.testing.assert_array_equal(fp32.fingerprint[:], bf16.fingerprint[:])


def test_unlabeled_text_and_integer_labels_short_of_the_teachers_width(tmp_path, capsys, monkeypatch, berts):
    unlabeled = write_tsv(tmp_path / "unlabeled.tsv", [["review"], ["good film"], [Q], ["bad film"]])
    out = tmp_path / "u.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", berts[2], "--task", "text", "--data", unlabeled,
                            "--text-column", "review", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err
    cache = kdcache.open_cache(out)
    assert cache.labels[:].tolist() == [-1, -1, -1] and cache.logits.shape == (3, 2)

    ids = write_tsv(tmp_path / "ids.tsv", [["review", "y"], ["good film", "1"], ["bad film", "0"]])
    out = tmp_path / "i.kdcache"
    code, _, err = run_cli(["cache-teacher", "--teacher", berts[3], "--task", "text", "--data", ids, "--text-column",
                            "review", "--label-column", "y", "--out", out, "--no-progress"], capsys, monkeypatch)
    assert code == 0, err  # class 2 simply does not occur in this file
    cache = kdcache.open_cache(out)
    assert cache.labels[:].tolist() == [1, 0] and cache.attrs["task"]["label_names"] == ["0", "1", "2"]
    # explicit label names are a label set: two names for a 3-output teacher is a mismatch
    code, _, err = run_cli(["cache-teacher", "--teacher", berts[3], "--task", "text", "--data", ids, "--text-column",
                            "review", "--label-column", "y", "--label-names", "neg,pos", "--out", tmp_path / "n",
                            "--no-progress"], capsys, monkeypatch)
    assert code == 1 and "has 3 outputs" in err and "has 2 labels (neg, pos)" in err


def test_progress_bar_goes_to_stderr_and_stdout_stays_clean(tmp_path, capsys, monkeypatch, berts, glue_dir):
    out = tmp_path / "c.kdcache"
    code, stdout, err = run_cli(["cache-teacher", "--teacher", berts[2], "--task", "sst2", "--data", glue_dir / "SST-2",
                                 "--limit", "40", "--batch-size", "8", "--out", out], capsys, monkeypatch)
    assert code == 0, err
    assert "train" in err and "40/40" in err and "rows/s" in err
    assert stdout.splitlines() == [stdout.splitlines()[0], f"wrote {out}"]
    assert stdout.startswith("cached train: 40 rows x 2 outputs") and "40/40" not in stdout


# ---------------------------------------------------------------------------------------------- background writer

def test_background_writer_lets_compute_run_ahead_of_the_disk():
    """While the sink is stuck on a slow write, the producer keeps handing over batches without waiting."""
    release, written = threading.Event(), []

    def stuck_sink(arrays):
        release.wait()  # stuck until the producer has handed over every batch: a put that waited would never return
        written.append(int(arrays["x"][0]))

    writer = BackgroundWriter(stuck_sink, max_pending=4)
    producer = threading.Thread(target=lambda: [writer.put({"x": torch.tensor([i])}) for i in range(4)])
    producer.start()
    producer.join(timeout=120)
    stuck, early = producer.is_alive(), list(written)
    release.set()  # let a stuck producer finish either way
    producer.join()
    assert not stuck and early == []  # the four puts returned while the first write was still stuck
    writer.close()
    assert written == [0, 1, 2, 3]  # in order, all of them, once close returns


def test_background_writer_converts_on_its_own_thread():
    threads = []

    def sink(arrays):
        assert isinstance(arrays["x"], np.ndarray)  # tensors (on a GPU: with their device copy) are converted here
        threads.append(threading.current_thread().name)

    with BackgroundWriter(sink) as writer:
        writer.put({"x": torch.zeros(2)})
    assert threads == ["kdcache-writer"]

"""Issue 22, points 2 and 3: `kdcache distill` trains causal-LM students on a token-level cache.

The student reads the cache's own `input_ids`; a student of another vocabulary or tokenizer is one line; padding is
masked; the per-token loss is computed a chunk of positions at a time and equals the unchunked loss (values and
gradients); every per-token method runs from the CLI on dense, top-k and sampled caches and records validation
perplexity, agreement with the teacher and tokens/s, the best epoch being the lowest perplexity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import kdcache
from helpers import LM_CORPUS, _metrics, _one_error_line, run_cli, write_lm_corpus
from teachers_for_tests import make_tiny_gpt2

CORPUS = LM_CORPUS
SEQ = 16
STUDENT = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 16, "n_positions": 32}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), CORPUS, vocab_size=300, positions=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_lm_corpus(tmp_path_factory.mktemp("corpus"))


def _cache(root, teacher, corpus, name, **target):
    from kdcache.data import DataOptions
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    out = root / f"{name}.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="lm", data=str(corpus),
                                     splits=("train", "validation"), out=out, device="cpu", progress=False,
                                     dtype="float32", batch_size=8, data_options=DataOptions(seq_len=SEQ), **target))
    return out


@pytest.fixture(scope="module")
def caches(tmp_path_factory, teacher, corpus):
    root = tmp_path_factory.mktemp("caches")
    return {"dense": _cache(root, teacher, corpus, "dense"),
            "topk": _cache(root, teacher, corpus, "topk", topk=8),
            "sampled": _cache(root, teacher, corpus, "sampled", sample_tokens=12)}


@pytest.fixture(scope="module")
def student_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("student") / "gpt2-1layer.json"
    path.write_text(json.dumps(STUDENT), encoding="utf-8")
    return path


def _distill(cache, student, out, *extra):
    return ["distill", "--cache", cache, "--student", student, "--out", out, "--epochs", "2", "--batch-size", "8",
            "--device", "cpu", "--no-progress", "--num-workers", "0", *extra]


@pytest.mark.parametrize("kind, method, extra", [
    ("topk", "ce", ()),
    ("dense", "vanilla", ()),
    ("topk", "vanilla", ()),
    ("topk", "vanilla", ("--topk-tail", "renormalised")),
    ("sampled", "vanilla", ()),
    ("topk", "continuation", ()),
    ("dense", "continuation", ()),
    ("topk", "annealing", ("--epochs", "3")),
])
def test_each_per_token_method_distils_a_causal_lm_student_from_the_cli(tmp_path, caches, student_config, capsys,
                                                                        monkeypatch, kind, method, extra):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_distill(caches[kind], student_config, out, "--method", method, *extra), capsys,
                                monkeypatch)
    assert code == 0, err
    rows = _metrics(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_name"] == "perplexity" and summary["task"] == "lm" and summary["complete"]
    for row in rows:
        assert row["metric_name"] == "perplexity" and math.isfinite(row["loss"])
        assert row["metric"] == row["perplexity"] == pytest.approx(math.exp(row["loss"]))
        assert 0 <= row["agreement"] <= 1 and row["tokens_per_second"] > 0 and row["tokens"] > 0
    # the best epoch is the lowest validation perplexity
    assert summary["best_metric"] == min(r["metric"] for r in rows)
    assert summary["best_epoch"] == min(rows, key=lambda r: r["metric"])["epoch"]
    assert summary["tokens_per_second"] > 0 and summary["best_agreement"] is not None
    # a dense cache holds every next token's probability: the teacher's own perplexity is beside the student's
    assert (summary["teacher_metric"] is not None) == (kind == "dense")
    if kind == "dense":
        val = kdcache.open_cache(caches["dense"], "validation")
        ids, lengths, labels = (torch.from_numpy(val.read(n).astype(np.int64)) for n in ("input_ids", "lengths",
                                                                                         "labels"))
        from kdcache.data.lm import next_token_targets

        y = next_token_targets(ids, lengths, labels, ignore=-1)
        log_p = torch.log_softmax(torch.from_numpy(val.read("logits")).double(), -1)
        ce = -log_p.gather(-1, y.clamp(min=0)[..., None])[..., 0][y >= 0].mean()
        assert summary["teacher_metric"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
        assert "teacher " in stdout
    assert "best perplexity" in stdout and "tokens/s" in stdout and "teacher agreement" in stdout
    # best/ is a causal LM folder with the cache's tokenizer: a teacher for the next cache
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(out / "best"))
    assert model.config.vocab_size == 300 and model.config.n_layer == 1
    tokenizer = AutoTokenizer.from_pretrained(str(out / "best"))
    assert len(tokenizer) == 300 and model.config.eos_token_id == tokenizer.eos_token_id < 300


def test_perplexity_is_the_exponent_of_the_mean_next_token_cross_entropy_over_real_tokens(tmp_path, caches,
                                                                                        student_config, capsys,
                                                                                        monkeypatch):
    """Recomputed here from best/ and the cache's validation windows, with the alignment rule written out."""
    out = tmp_path / "run"
    code, _, err = run_cli(_distill(caches["topk"], student_config, out, "--method", "ce", "--epochs", "1"), capsys,
                           monkeypatch)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "best")).eval()
    val = kdcache.open_cache(caches["topk"], "validation")
    ids, lengths, labels = (val.read(n).astype(np.int64) for n in ("input_ids", "lengths", "labels"))
    top = val.read("topk_indices")[..., 0].astype(np.int64)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.double()
    total, count, agree = 0.0, 0, 0
    for r in range(len(ids)):
        for j in range(lengths[r]):
            following = ids[r, j + 1] if j + 1 < lengths[r] else labels[r]
            if following < 0:
                continue
            total -= float(torch.log_softmax(logits[r, j], -1)[following])
            count += 1
            agree += int(int(logits[r, j].argmax()) == top[r, j])
    row = _metrics(out)[0]
    assert row["tokens"] == count == int(lengths.sum()) - 1  # every real token but the stream's last
    assert row["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert row["agreement"] == pytest.approx(agree / count)


# --- the chunked loss ---------------------------------------------------------------------------------------------

def _tiny_student(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2)).eval()


def _batch(seed=1, rows=3, vocab=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, SEQ), generator=g)
    lengths = torch.tensor([SEQ, SEQ - 5, 4])[:rows]
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.tensor([7, -1, 3])[:rows]
    return {"input_ids": ids, "attention_mask": mask}, labels, g


def _targets(g, rows=3, vocab=40, k=6):
    from kdcache.methods.targets import SampledTarget, TopKTarget

    z = torch.randn(rows, SEQ, vocab, generator=g) * 3
    values, ids = torch.topk(z, k, dim=-1)
    lse = torch.stack([torch.logsumexp(z, -1), torch.logsumexp(z / 2, -1)], dim=-1)
    draws = torch.multinomial(torch.softmax(z, -1).reshape(-1, vocab), 5, replacement=True, generator=g)
    counts = torch.zeros(rows * SEQ, vocab, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    sampled = torch.sort(counts, dim=-1, descending=True)[1][:, :5]  # the drawn ids first, then unused slots
    used = counts.gather(1, sampled)
    logprobs = torch.log_softmax(z, -1).reshape(-1, vocab).gather(1, sampled)
    return {"dense": z,
            "topk": TopKTarget(values, ids, lse, (1.0, 2.0)),
            "sampled": SampledTarget(sampled.reshape(rows, SEQ, 5), used.reshape(rows, SEQ, 5),
                                     logprobs.reshape(rows, SEQ, 5), 1.0)}


def _row_losses():
    """A row loss per method and target kind, as the methods compute them (kdcache.methods.*.loss)."""
    from kdcache.methods import losses, sparse_losses

    def topk(tail):
        return lambda z, t, y, m: sparse_losses.topk_kd_loss(z, t.values, t.indices, t.logsumexp, y, temperature=2.0,
                                                             temperatures=t.temperatures, alpha=0.3, tail=tail, mask=m)
    return {
        "ce": ("dense", lambda z, t, y, m: losses.ce(z, y)),
        "vanilla-dense": ("dense", lambda z, t, y, m: losses.vanilla_kd_loss(z, t, y, temperature=2.0, alpha=0.3,
                                                                            mask=m)),
        "vanilla-topk-bucket": ("topk", topk("bucket")),
        "vanilla-topk-renormalised": ("topk", topk("renormalised")),
        "rs-kd": ("sampled", lambda z, t, y, m: sparse_losses.sampled_kd_loss(z, t.ids, t.counts, t.logprobs, y,
                                                                              alpha=0.3, mask=m)),
        "continuation-dense": ("dense", lambda z, t, y, m: losses.continuation_kd_loss(
            z, t, y, phi=0.7, psi=0.4, margin=1.0, mask=m)),
        "continuation-topk": ("topk", lambda z, t, y, m: sparse_losses.topk_continuation_kd_loss(
            z, t.values, t.indices, y, phi=0.7, psi=0.4, margin=1.0, mask=m)),
        "annealing-dense": ("dense", lambda z, t, y, m: losses.annealing_kd_loss(z, t, phi=0.5, mask=m)),
        "annealing-topk": ("topk", lambda z, t, y, m: sparse_losses.topk_annealing_kd_loss(
            z, t.values, t.indices, phi=0.5, mask=m)),
    }


def _loss_and_grads(row_loss, target, chunk, checkpointed=True):
    from kdcache.methods.tokens import chunked_loss, token_output

    model = _tiny_student()
    inputs, labels, _ = _batch()
    loss = chunked_loss(token_output(model, inputs), target, labels, row_loss, chunk=chunk, checkpointed=checkpointed)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(_row_losses()))
def test_the_chunked_token_loss_equals_the_unchunked_one_in_value_and_gradient(name):
    kind, row_loss = _row_losses()[name]
    target = _targets(_batch()[2])[kind]
    whole, whole_grads = _loss_and_grads(row_loss, target, chunk=3 * SEQ)  # one chunk: the plain computation
    assert whole.item() != 0.0
    for chunk in (5, 16, 17):  # chunks that cut windows, align with them, and straddle them
        loss, grads = _loss_and_grads(row_loss, target, chunk=chunk)
        assert torch.allclose(loss, whole, rtol=1e-5, atol=1e-6), (chunk, loss, whole)
        assert grads.keys() == whole_grads.keys()
        for n in grads:
            assert torch.allclose(grads[n], whole_grads[n], rtol=1e-4, atol=1e-6), (chunk, n)


def test_the_unchunked_reference_is_the_mean_over_real_tokens_of_the_full_logits():
    """chunk = everything, checked against a direct computation from the model's own logits: the mean next-token
    cross-entropy over the real positions (padding and the stream's end left out)."""
    from kdcache.methods import losses

    model = _tiny_student()
    inputs, labels, _ = _batch()
    loss, _ = _loss_and_grads(lambda z, t, y, m: losses.ce(z, y), None, chunk=7)
    logits = model(**inputs).logits
    terms = []
    lengths = inputs["attention_mask"].sum(1)
    for r in range(3):
        for j in range(int(lengths[r])):
            y = int(inputs["input_ids"][r, j + 1]) if j + 1 < lengths[r] else int(labels[r])
            if y >= 0:
                terms.append(-torch.log_softmax(logits[r, j], -1)[y])
    assert torch.allclose(loss, torch.stack(terms).mean(), rtol=1e-5)


@pytest.mark.parametrize("name", ["vanilla-dense", "vanilla-topk-bucket", "rs-kd", "continuation-topk",
                                  "annealing-dense"])
def test_a_padded_positions_targets_do_not_change_the_loss(name):
    kind, row_loss = _row_losses()[name]
    g = _batch()[2]
    target = _targets(g)[kind]
    loss, _ = _loss_and_grads(row_loss, target, chunk=7)
    padded = ~(torch.arange(SEQ)[None, :] < torch.tensor([SEQ, SEQ - 5, 4])[:, None])  # [3, S]
    changed = _targets(torch.Generator().manual_seed(99))[kind]  # other (finite) targets everywhere ...
    if kind == "dense":
        mixed = torch.where(padded[..., None], changed, target)
    else:
        from dataclasses import fields, replace

        mixed = replace(target, **{f.name: torch.where(padded[..., None] if getattr(target, f.name).dim() == 3 else
                                                       padded, getattr(changed, f.name), getattr(target, f.name))
                                   for f in fields(target) if isinstance(getattr(target, f.name), torch.Tensor)})
    again, _ = _loss_and_grads(row_loss, mixed, chunk=7)  # ... but only the padded positions take them
    assert torch.equal(again, loss)
    other, _ = _loss_and_grads(row_loss, changed, chunk=7)
    assert not torch.equal(other, loss)  # (the targets do matter where a token is real)


# --- refusals -----------------------------------------------------------------------------------------------------

def test_a_student_of_another_vocabulary_or_tokenizer_is_refused_in_one_line(tmp_path, caches, teacher, capsys,
                                                                            monkeypatch):
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps({**STUDENT, "vocab_size": 320}), encoding="utf-8")
    code, _, err = run_cli(_distill(caches["topk"], wide, tmp_path / "a"), capsys, monkeypatch)
    _one_error_line(code, err, "vocab_size 320 differs", "model width is 300")
    # a pre-trained folder with another tokenizer (trained on other text, same size): its ids mean other tokens
    other = make_tiny_gpt2(tmp_path / "other", [d.upper() for d in CORPUS], vocab_size=300, positions=32)
    code, _, err = run_cli(_distill(caches["topk"], other, tmp_path / "b", "--student-layers", "1"), capsys,
                           monkeypatch)
    _one_error_line(code, err, "its tokenizer", "is not the cache's")
    # another width of head, in a folder without a tokenizer
    narrow = make_tiny_gpt2(tmp_path / "narrow", CORPUS, vocab_size=300, positions=32, outputs=280)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (narrow / name).unlink(missing_ok=True)
    code, _, err = run_cli(_distill(caches["topk"], narrow, tmp_path / "c"), capsys, monkeypatch)
    _one_error_line(code, err, "vocabulary of 280 tokens differs", "model width is 300")
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_a_pretrained_causal_lm_folder_trains_as_its_first_layers(tmp_path, caches, teacher, capsys, monkeypatch):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_distill(caches["topk"], teacher, out, "--student-layers", "1", "--method", "vanilla",
                                         "--epochs", "1"), capsys, monkeypatch)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "best")).config.n_layer == 1
    assert "(first 1 layers)" in stdout


def test_methods_and_flags_without_a_per_token_meaning_are_one_line(tmp_path, caches, student_config, corpus, capsys,
                                                                    monkeypatch):
    cases = [
        (("--method", "continuation", "--reduction", "batch"), ("--reduction batch", "sample or element")),
        (("--data", str(corpus)), ("holds its own token ids",)),
        (("--loss-chunk", "0"), ("--loss-chunk",)),
    ]
    for extra, needles in cases:
        code, _, err = run_cli(_distill(caches["topk"], student_config, tmp_path / "x", *extra), capsys, monkeypatch)
        _one_error_line(code, err, *needles)
    code, _, err = run_cli(_distill(caches["topk"], "mlp", tmp_path / "y"), capsys, monkeypatch)
    _one_error_line(code, err, "needs a causal-LM student")


def test_a_resumed_lm_run_ends_where_an_uninterrupted_one_does(tmp_path, caches, student_config, capsys, monkeypatch):
    """Annealing-KD across its stage boundary: the student, the optimiser, the dropout stream and the best stage-1
    student (chosen on the lowest perplexity) all travel in last.pt."""
    args = ("--method", "annealing", "--epochs", "4", "--anneal-epochs", "2", "--t-max", "2")
    assert run_cli(_distill(caches["topk"], student_config, tmp_path / "full", *args), capsys, monkeypatch)[0] == 0
    cut = tmp_path / "cut"
    assert run_cli(_distill(caches["topk"], student_config, cut, *args, "--stop-after-epoch", "2"), capsys,
                   monkeypatch)[0] == 0
    code, _, err = run_cli(_distill(caches["topk"], student_config, cut, *args, "--resume"), capsys, monkeypatch)
    assert code == 0, err
    timing = ("seconds", "samples_per_second", "tokens_per_second", "eval_tokens_per_second")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(_metrics(cut)) == strip(_metrics(tmp_path / "full"))
    from safetensors.torch import load_file

    full, resumed = load_file(tmp_path / "full" / "best" / "model.safetensors"), load_file(
        cut / "best" / "model.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


# --- the Python API -----------------------------------------------------------------------------------------------

def _windows(cache):
    ids, lengths = cache.read("input_ids"), cache.read("lengths")
    return [{"input_ids": ids[r, :lengths[r]].astype(np.int64), "labels": ids[r, :lengths[r]].astype(np.int64)}
            for r in range(len(ids))]


def test_with_targets_serves_a_language_model_cache_per_position(caches):
    from kdcache.torch import RowMismatch, with_targets

    cache = kdcache.open_cache(caches["topk"], "train")
    rows = _windows(cache)
    data = with_targets(rows, caches["topk"])  # the items' own `labels` (their ids, HF's convention) are not compared
    last = len(rows) - 1
    batch = data.collate([data[0], data[last]])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (2, SEQ)  # to S
    assert (batch["labels"][1][~batch["attention_mask"][1].bool()] == -100).all()
    assert batch["teacher_topk_values"].shape == (2, SEQ, 8) and batch["teacher_logsumexp"].shape == (2, SEQ)
    labels = cache.read("labels")
    assert batch["teacher_next_token"].tolist() == [labels[0], -1]
    assert batch["attention_mask"][1].sum() == cache.read("lengths")[last]
    np.testing.assert_array_equal(batch["teacher_topk_indices"][0].numpy(), cache.read("topk_indices")[0])
    changed = [dict(r) for r in rows]
    changed[3]["input_ids"] = changed[3]["input_ids"].copy()
    changed[3]["input_ids"][2] += 1
    with pytest.raises(RowMismatch, match="row 3 .* does not match"):
        with_targets(changed, caches["topk"])[3]


def test_the_method_object_gives_distills_chunked_token_loss(caches):
    """kdcache.methods.get(...).loss on a TokenOutput is the loss distill computes, at any chunk."""
    from kdcache.methods import get
    from kdcache.methods.tokens import chunked_loss, token_output
    from kdcache.torch import with_targets
    from kdcache.errors import KDCacheError
    from transformers import GPT2Config, GPT2LMHeadModel

    data = with_targets(_windows(kdcache.open_cache(caches["topk"], "train")), caches["topk"])
    batch = data.collate([data[i] for i in range(6)])
    method = get("vanilla", preset="lm", epochs=2, cache=data.cache)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    loss = method.loss(token_output(model, inputs), batch, batch["teacher_next_token"], epoch=1)
    from kdcache.methods import sparse_losses
    from kdcache.methods.targets import TopKTarget

    target = TopKTarget(batch["teacher_topk_values"].float(), batch["teacher_topk_indices"].long(),
                        batch["teacher_logsumexp"].float(), (1.0,))
    direct = chunked_loss(token_output(model, inputs), target, batch["teacher_next_token"],
                          lambda z, t, y, m: sparse_losses.topk_kd_loss(z, t.values, t.indices, t.logsumexp, y,
                                                                        temperature=1.0, temperatures=(1.0,),
                                                                        alpha=0.5, mask=m), chunk=10)
    assert torch.allclose(loss, direct, rtol=1e-5)
    with pytest.raises(KDCacheError, match="give the loss kdcache.methods.tokens.token_output"):
        method.loss(model(**inputs).logits, batch, batch["teacher_next_token"], epoch=1)


def test_the_lm_own_loop_example_runs(tmp_path, caches):
    import os
    import re
    import subprocess
    import sys

    from helpers import REPO

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(REPO / "examples" / "lm_own_loop.py"), str(caches["topk"]),
                           "--epochs", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [int(e) for e in re.findall(r"^epoch (\d+) ", done.stdout, re.M)] == [1, 2]
    found = re.search(r"^validation perplexity ([0-9.]+)$", done.stdout, re.M)
    assert found and 1.0 < float(found.group(1)) < 1e4, done.stdout


def test_kdtrainer_distils_a_causal_lm_with_distills_token_loss(tmp_path, caches):
    """KDTrainer on a language-model cache: the user's windows (in the split's order) are checked against the cache,
    its loss on a batch is the method object's (distill's chunked per-token loss), and training lowers the
    validation loss; a tampered window is one line."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from kdcache.errors import KDCacheError
    from kdcache.hf import KDTrainer
    from kdcache.methods import get
    from kdcache.methods.tokens import token_output

    rows = _windows(kdcache.open_cache(caches["topk"], "train"))
    val = _windows(kdcache.open_cache(caches["topk"], "validation"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    args = TrainingArguments(str(tmp_path / "t"), num_train_epochs=3, per_device_train_batch_size=8,
                             learning_rate=3e-3, use_cpu=True, report_to=[], save_strategy="no",
                             eval_strategy="epoch", logging_strategy="epoch", disable_tqdm=True, seed=0, data_seed=0)
    trainer = KDTrainer(model=model, args=args, train_dataset=rows, eval_dataset=val, cache=caches["topk"],
                        method="vanilla", loss_chunk=5)
    assert trainer.kd_method.hyperparameters == get("vanilla", preset="lm", epochs=3).hyperparameters
    assert trainer.kd_method.run.loss_chunk == 5  # as --loss-chunk 5 (the loss below equals the default-chunk one)
    with pytest.raises(KDCacheError, match="loss_chunk must be at least 1"):
        get("vanilla", preset="lm", epochs=3, loss_chunk=0)
    data = trainer.train_dataset
    batch = data.collate([data[i] for i in range(6)])
    method = get("vanilla", preset="lm", epochs=3, cache=data.cache)
    want = method.loss(token_output(model, batch), batch, batch["teacher_next_token"], epoch=1, step=0)
    torch.testing.assert_close(trainer.compute_loss(model, batch), want, rtol=1e-5, atol=1e-6)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(evals) == len(losses) == 3 and evals[-1] < first and losses[-1] < losses[0]
    from kdcache.methods.tokens import perplexity_sums

    unchecked = trainer.evaluate(eval_dataset=val)["eval_loss"]  # rows without cached targets: next-token CE
    batch = data.collate([dict(v, teacher_next_token=-1) for v in val])
    with torch.no_grad():
        ce, count, _ = perplexity_sums(token_output(model, batch), torch.full((len(val),), -1), None)
    assert unchecked == pytest.approx(ce / count, rel=0.05)  # a mean of per-batch means
    changed = [dict(r) for r in rows]
    changed[3]["input_ids"] = changed[3]["input_ids"].copy()
    changed[3]["input_ids"][2] += 1
    tampered = KDTrainer(model=model, args=args, train_dataset=changed, eval_dataset=val, cache=caches["topk"],
                         method="vanilla")
    with pytest.raises(KDCacheError, match="row 3 .* does not match") as caught:
        tampered.train()
    assert "\n" not in str(caught.value)


KDTRAINER_TORCHRUN = """
import json, os, sys
from pathlib import Path
import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
import kdcache
from kdcache.hf import KDTrainer

cache, out = sys.argv[1:]
split = kdcache.open_cache(cache, "train")
ids, lengths = split.read("input_ids"), split.read("lengths")
rows = [{"input_ids": ids[r, :lengths[r]].astype(np.int64)} for r in range(len(ids))]
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
before = float(torch.cat([p.detach().flatten() for p in model.parameters()]).abs().sum())
args = TrainingArguments(out, num_train_epochs=2, per_device_train_batch_size=4, learning_rate=3e-3, use_cpu=True,
                         report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no",
                         disable_tqdm=True, seed=0)
trainer = KDTrainer(model=model, args=args, train_dataset=rows, cache=cache, method="vanilla", loss_chunk=7)
trainer.train()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
Path(out, f"rank{os.environ['RANK']}.json").write_text(json.dumps({
    "world": trainer.args.world_size, "sum": float(flat.abs().sum()), "before": before,
    "steps": trainer.state.global_step}))
"""


def test_kdtrainer_on_a_language_model_cache_under_torchrun_trains_one_student(tmp_path, caches):
    """Two processes: the token loss reads the hidden states through DistributedDataParallel's forward, so the
    gradients are synced and both processes end with the same student (unsynced, their shards would part them)."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    import os
    import subprocess
    import sys

    from helpers import REPO

    script = tmp_path / "train.py"
    script.write_text(KDTRAINER_TORCHRUN)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(caches["topk"]), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-6)
    assert ranks[0]["sum"] != pytest.approx(ranks[0]["before"], rel=1e-6)  # and it moved


@pytest.mark.parametrize("name", ["vanilla-topk-bucket", "continuation-topk", "ce"])
def test_the_chunked_loss_keeps_nothing_of_batch_by_vocabulary_for_the_backward_pass(name):
    """What the backward pass holds is counted (torch's saved-tensor hooks): chunked, no saved tensor is as large as
    one chunk's logits, whatever S; the plain computation keeps the whole batch's [B x S, V] log-softmax."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcache.methods.tokens import chunked_loss, token_output

    kind, row_loss = _row_losses()[name]
    vocab, rows, chunk = 512, 3 * SEQ, 8
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    inputs, labels, g = _batch(vocab=vocab)
    target = _targets(g, vocab=vocab)[kind]
    output = token_output(model, inputs)  # the model's own activations are not the loss's

    def largest_saved(**kw):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = chunked_loss(output, target, labels, row_loss, **kw)
        loss.backward(retain_graph=True)
        return max(sizes)

    assert largest_saved(chunk=rows, checkpointed=False) >= rows * vocab  # the whole batch's logits, kept
    assert largest_saved(chunk=chunk) < chunk * vocab  # a chunk's hidden states (its logits are recomputed)


@pytest.mark.parametrize("vocab", [64, 512])
def test_the_default_chunk_holds_the_same_number_of_logits_whatever_the_vocabulary(vocab, monkeypatch):
    """Without --loss-chunk a chunk is CHUNK_ELEMENTS // V positions: every logits tensor the head makes, forward
    and recomputed in the backward pass, holds at most CHUNK_ELEMENTS numbers at V = 64 and at V = 512 (more
    chunks for the larger vocabulary, not larger ones), and the loss equals the one-chunk computation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kdcache.methods import tokens

    monkeypatch.setattr(tokens, "CHUNK_ELEMENTS", 1024)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    inputs, labels, g = _batch(vocab=vocab)
    target = _targets(g, vocab=vocab)["topk"]
    _, row_loss = _row_losses()["vanilla-topk-bucket"]
    made = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: made.append(out.numel()))
    loss = tokens.chunked_loss(tokens.token_output(model, inputs), target, labels, row_loss)
    loss.backward()
    hook.remove()
    positions = 1024 // vocab
    assert tokens.chunk_positions(vocab) == positions and tokens.chunk_positions(vocab, 5) == 5
    assert max(made) == positions * vocab <= 1024
    assert len(made) == 2 * -(-3 * SEQ // positions)  # every chunk's logits made, and made again backward
    whole = tokens.chunked_loss(tokens.token_output(model, inputs), target, labels, row_loss, chunk=3 * SEQ)
    assert torch.allclose(loss, whole, rtol=1e-5, atol=1e-6)


def test_a_sweep_of_lm_students_equals_lone_distills(tmp_path, caches, student_config, capsys, monkeypatch):
    out = tmp_path / "sweep"
    common = ["--cache", caches["topk"], "--student", student_config, "--epochs", "2", "--batch-size", "8",
              "--device", "cpu", "--no-progress", "--num-workers", "0"]
    code, _, err = run_cli(["sweep", *common, "--out", out, "--grid", "method=ce,vanilla"], capsys, monkeypatch)
    assert code == 0, err
    timing = ("seconds", "samples_per_second", "tokens_per_second", "eval_tokens_per_second")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    for method in ("ce", "vanilla"):
        lone = tmp_path / f"lone-{method}"
        assert run_cli(["distill", *common, "--out", lone, "--method", method], capsys, monkeypatch)[0] == 0
        assert strip(_metrics(out / f"method-{method}_seed-0")) == strip(_metrics(lone))
        assert json.loads((out / f"method-{method}_seed-0" / "summary.json").read_text())["metric_name"] == "perplexity"


def test_runs_lists_lm_runs_best_first_by_the_lowest_perplexity(tmp_path, caches, student_config, capsys,
                                                                monkeypatch):
    from kdcache.recipes.compare import list_runs

    for name, lr in (("a", "1e-5"), ("b", "3e-3")):
        code, _, err = run_cli(_distill(caches["topk"], student_config, tmp_path / "runs" / name, "--method", "ce",
                                        "--lr", lr), capsys, monkeypatch)
        assert code == 0, err
    rows = list_runs([tmp_path / "runs"], sort="best")
    assert [r["metric"] for r in rows] == ["perplexity", "perplexity"]
    assert rows[0]["best"] < rows[1]["best"]


def test_lm_targets_stream_by_chunk_windows_when_they_exceed_the_budget(tmp_path, teacher, corpus, student_config,
                                                                       capsys, monkeypatch):
    """Dense [N, S, C] targets streamed by windows of chunks (a budget holding two chunks): the run reads every
    window's rows with their positions axis, as memory mode does."""
    out = tmp_path / "run"
    dense = _cache(tmp_path, teacher, corpus, "dense", chunk_rows=8)
    cache = kdcache.open_cache(dense, "train")
    assert cache.chunk_rows == 8 and len(cache) > 4 * 8
    chunk = 8 * SEQ * 300 * 4  # float32 logits of one chunk
    code, _, err = run_cli(_distill(dense, student_config, out, "--method", "vanilla", "--stream", "chunks",
                                    "--memory-budget", f"{5 * chunk // 1024}KiB"), capsys, monkeypatch)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_targets"] == {"mode": "chunks", "window_chunks": 2} and summary["complete"]
    assert all(math.isfinite(r["loss"]) for r in _metrics(out))


def test_a_llama_style_student_from_its_config(tmp_path, caches, capsys, monkeypatch):
    config = tmp_path / "llama-1layer.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                  "max_position_embeddings": 32}), encoding="utf-8")
    out = tmp_path / "run"
    code, _, err = run_cli(_distill(caches["topk"], config, out, "--method", "continuation"), capsys, monkeypatch)
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "best"))
    assert model.config.model_type == "llama" and model.config.vocab_size == 300
    assert all(math.isfinite(r["perplexity"]) for r in _metrics(out))


def test_kdtrainer_on_a_language_model_accumulates_gradients_as_one_whole_batch(tmp_path, caches):
    """Batches of 4 accumulated twice take the steps batches of 8 take. Under SGD, where a loss scaled twice or
    not at all would show (Adam's steps hardly see a scale): the Trainer leaves the scaling to a model that takes
    `num_items_in_batch`, as GPT-2 does, and KDTrainer's loss is already a mean over the batch's tokens."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from kdcache.hf import KDTrainer

    rows = [dict(r, sample=i) for i, r in enumerate(_windows(kdcache.open_cache(caches["topk"], "train")))][:16]
    assert len({len(r["input_ids"]) for r in rows}) == 1  # full-length windows: every micro-batch as many tokens
    weights = []
    for batch, accumulate in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        args = TrainingArguments(str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulate, max_steps=2, learning_rate=0.5, optim="sgd",
                                 lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
                                 disable_tqdm=True, seed=0, data_seed=0, max_grad_norm=0.0)
        trainer = KDTrainer(model=model, args=args, train_dataset=rows, cache=caches["topk"], method="vanilla",
                            index="sample")
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.manual_seed(0)
    fresh = torch.cat([p.detach().flatten() for p in GPT2LMHeadModel(GPT2Config(
        vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2)).parameters()])
    assert not torch.allclose(weights[0], fresh, atol=1e-4)  # it trained
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-4, atol=1e-5)


def test_kdtrainer_on_a_language_model_trains_under_bf16_autocast(tmp_path, caches):
    """`bf16=True` (the Trainer's autocast, here on the CPU): the chunked token loss runs on bf16 hidden states
    against the float32 head, its value within bf16's precision of the float32 loss on the same batch, and two
    steps train to a finite, lower loss."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from kdcache.hf import KDTrainer

    rows = _windows(kdcache.open_cache(caches["topk"], "train"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    args = TrainingArguments(str(tmp_path / "t"), per_device_train_batch_size=8, max_steps=6, learning_rate=3e-3,
                             bf16=True, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                             disable_tqdm=True, seed=0, data_seed=0)
    trainer = KDTrainer(model=model, args=args, train_dataset=rows, cache=caches["topk"], method="vanilla")
    data = trainer.train_dataset
    batch = data.collate([data[i] for i in range(8)])
    full = trainer.compute_loss(model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = trainer.compute_loss(model, batch)
    assert torch.isfinite(half) and half.item() == pytest.approx(full.item(), rel=2e-2)
    assert half.item() != full.item()  # the autocast reached the model: its states were bf16
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_a_config_json_larger_than_any_real_one_is_refused_before_it_is_read(tmp_path, caches, monkeypatch, capsys):
    """A student config of 17 MiB (a real one is a few KB) is one line naming the file and its size, not a read
    of whatever it holds."""
    from kdcache.models import hf

    big = tmp_path / "big.json"
    big.write_text('{"model_type": "gpt2", "pad": "' + "x" * (17 * 1024**2) + '"}')
    assert big.stat().st_size > hf.CONFIG_LIMIT
    code, _, err = run_cli(_distill(caches["topk"], big, tmp_path / "run"), capsys, monkeypatch)
    _one_error_line(code, err, str(big), "more than a config's 16,777,216")
    assert not (tmp_path / "run").exists()

"""Issue 22, point 1: `cache-teacher --task lm` caches a causal language model's targets at every position of
fixed windows of one token stream per split.

A cached LM's top-k values, ids and log-sum-exps equal the teacher's own outputs on the stored windows, and the
windows concatenated give back the corpus's token stream; dense and sampled targets take the same token axis; an
interrupted capture resumes to the same bytes; `info` names the task, the tokenizer and the target kind; every bad
input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import kdcache
from kdcache.cache import schema
from kdcache.fingerprint import fingerprint_tokens
from helpers import LM_CORPUS, _one_error_line, interrupt_autocast_at, kdcache_processes, run_cli
from teachers_for_tests import make_tiny_bert, make_tiny_gpt2

CORPUS = LM_CORPUS
SEQ = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), CORPUS, vocab_size=300, positions=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "train.txt").write_text("\n".join(CORPUS[:30]) + "\n\n", encoding="utf-8")  # an empty line is no document
    (folder / "validation.jsonl").write_text("".join(json.dumps({"id": k, "text": d}) + "\n"
                                                     for k, d in enumerate(CORPUS[30:])), encoding="utf-8")
    return folder


def _args(teacher, data, out, *extra):
    return ["cache-teacher", "--task", "lm", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", str(SEQ),
            "--device", "cpu", "--no-progress", "--batch-size", "5", *extra]


def _stream(teacher, docs) -> np.ndarray:
    """The corpus's token stream, tokenised here: each document's ids, then the EOS id."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    return np.concatenate([[*tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id] for d in docs])


def _teacher_logits(teacher, ids: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """The teacher's own logits [N, S, C] on the stored windows, in one padded, masked batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    mask = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(lengths.astype(np.int64))[:, None]
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=mask.long()).logits.float()


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory, teacher, corpus):
    from kdcache.data import DataOptions
    from kdcache.recipes.cache_teacher import CacheTeacherConfig, cache_teacher

    out = tmp_path_factory.mktemp("lm") / "c.kdcache"
    cache_teacher(CacheTeacherConfig(teacher=str(teacher), task="lm", data=str(corpus), splits=("train", "validation"),
                                     out=out, device="cpu", progress=False, dtype="float32", topk=4, batch_size=5,
                                     lse_temperatures=(1.0, 2.0), data_options=DataOptions(seq_len=SEQ)))
    return out


@pytest.mark.parametrize("split, docs", [("train", CORPUS[:30]), ("validation", CORPUS[30:])])
def test_a_cached_lm_holds_the_teachers_own_outputs_on_windows_that_give_back_the_stream(topk_cache, teacher, split,
                                                                                         docs):
    cache = kdcache.open_cache(topk_cache, split)
    ids, lengths, labels = cache.read("input_ids"), cache.read("lengths"), cache.read("labels")
    stream = _stream(teacher, docs)
    n = -(-len(stream) // SEQ)
    assert ids.shape == (n, SEQ) and len(cache) == n and cache.target.positions == SEQ
    # the windows, concatenated, are the stream; each row's label is the token after it (-1 after the last)
    assert np.array_equal(np.concatenate([ids[r, :lengths[r]] for r in range(n)]), stream)
    assert (lengths[:-1] == SEQ).all() and lengths[-1] == len(stream) - (n - 1) * SEQ
    assert np.array_equal(labels[:-1], stream[SEQ::SEQ]) and labels[-1] == -1
    assert all(cache.read("fingerprint")[r] == fingerprint_tokens(stream[r * SEQ:(r + 1) * SEQ]) for r in range(n))
    # position j of every row is the teacher's distribution over the token after it, from the window alone
    z = _teacher_logits(teacher, ids, lengths)
    valid = np.arange(SEQ)[None, :] < lengths[:, None]
    values, top = torch.topk(z, 4, dim=-1)
    lse = torch.stack([torch.logsumexp(z / t, dim=-1) for t in (1.0, 2.0)], dim=-1)
    assert cache.read("topk_values").shape == (n, SEQ, 4) and cache.read("logsumexp").shape == (n, SEQ, 2)
    np.testing.assert_allclose(cache.read("topk_values")[valid], values.numpy()[valid], rtol=1e-5, atol=1e-5)
    assert np.array_equal(cache.read("topk_indices")[valid].astype(np.int64), top.numpy()[valid])
    np.testing.assert_allclose(cache.read("logsumexp")[valid], lse.numpy()[valid], rtol=1e-5, atol=1e-5)
    # past a row's length every array holds 0
    for name in ("input_ids", "topk_values", "topk_indices", "logsumexp"):
        assert (cache.read(name)[~valid] == 0).all(), name
    assert cache.target_quality["rows_measured"] == int(valid.sum())


def test_the_schema_records_the_alignment_rule_the_tokenizer_and_both_widths(topk_cache, teacher):
    from transformers import AutoTokenizer

    header = kdcache.open_cache(topk_cache, "train").header
    tok = AutoTokenizer.from_pretrained(str(teacher))
    assert header.task.kind == "lm" and header.format_version == 2
    tokens = header.tokens
    assert (tokens.seq_len, tokens.vocab_size, tokens.outputs, tokens.eos_id) == (SEQ, len(tok), 300,
                                                                                   tok.eos_token_id)
    assert tokens.alignment == schema.ALIGNMENT_RULE and "j + 1" in tokens.alignment
    cache = kdcache.Cache(topk_cache)
    stored = cache.tokenizer()  # the cache's own tokenizer, whose zip's sha256 the header records
    assert stored("my lord")["input_ids"] == tok("my lord")["input_ids"]
    import hashlib

    blob = bytes(np.asarray(cache.root[schema.TOKENIZER_ARRAY][:]))
    assert hashlib.sha256(blob).hexdigest() == tokens.tokenizer_sha256


def test_info_names_the_task_the_tokenizer_and_the_target_kind(topk_cache, teacher, capsys, monkeypatch):
    code, out, err = run_cli(["info", topk_cache], capsys, monkeypatch)
    assert code == 0, err
    assert "task     lm (lm)" in out and "top-4 of 300 per token (16 positions a row)" in out
    assert "tokens   tokenizer" in out and "vocabulary" in out and "position j predicts token j + 1" in out
    code, out, _ = run_cli(["info", topk_cache, "--json"], capsys, monkeypatch)
    summary = json.loads(out)
    assert summary["task"]["name"] == "lm" and summary["target"]["kind"] == "topk"
    assert summary["target"]["axes"] == ["rows", "positions"] and summary["tokens"]["seq_len"] == SEQ
    train = summary["splits"][0]
    assert train["tokens"] == len(_stream(teacher, CORPUS[:30]))
    assert train["bytes_per_token"] == round(train["logits_bytes_stored"] / train["tokens"], 2)


@pytest.mark.parametrize("kind", ["dense", "sampled"])
def test_dense_and_sampled_targets_take_the_token_axis(tmp_path, teacher, corpus, capsys, monkeypatch, kind):
    flags = ("--dtype", "float32") if kind == "dense" else ("--sample-tokens", "12", "--sample-seed", "3")
    out = tmp_path / "c.kdcache"
    code, _, err = run_cli(_args(teacher, corpus / "train.txt", out, *flags), capsys, monkeypatch)
    assert code == 0, err
    cache = kdcache.open_cache(out, "train")
    ids, lengths = cache.read("input_ids"), cache.read("lengths")
    valid = np.arange(SEQ)[None, :] < lengths[:, None]
    if kind == "dense":
        logits = cache.read("logits")
        assert logits.shape == (len(cache), SEQ, 300) and cache.header.format_version == 2
        np.testing.assert_allclose(logits[valid], _teacher_logits(teacher, ids, lengths).numpy()[valid], atol=1e-5)
    else:
        counts = cache.read("sampled_counts").astype(np.int64)
        assert counts.shape == (len(cache), SEQ, 12) and (counts.sum(-1)[valid] == 12).all()
        assert (counts[~valid] == 0).all() and "row = (the row's position in its split) * S + position" in \
            cache.target.seed_rule


def test_an_interrupted_lm_capture_resumes_to_the_same_bytes(tmp_path, teacher, corpus, capsys, monkeypatch):
    reference, out = tmp_path / "ref.kdcache", tmp_path / "c.kdcache"
    flags = ("--topk", "5", "--chunk-rows", "4")
    data = corpus / "train.txt"
    assert run_cli(_args(teacher, data, reference, *flags), capsys, monkeypatch)[0] == 0
    interrupt_autocast_at(monkeypatch, 6)  # batch 5 (rows 20-24), after chunks 0-4 (rows 0-19) were stored
    code, _, err = run_cli(_args(teacher, data, out, *flags), capsys, monkeypatch)
    assert code == 130 and "rows 0-19 are stored" in err, err
    monkeypatch.undo()
    code, _, err = run_cli(_args(teacher, data, out, *flags), capsys, monkeypatch)
    assert code == 0 and "resuming split 'train' at row 20" in err, err
    ref, got = kdcache.open_cache(reference, "train"), kdcache.open_cache(out, "train")
    assert got.names == ref.names and "input_ids" in got.names
    # without --lse-temperatures an LM cache records the log-sum-exp at T = 1 alone: [N, S]
    assert got.target.temperatures == [1.0] and got.read("logsumexp").shape == (len(got), SEQ)
    for name in got.names:
        assert np.array_equal(got.read(name), ref.read(name)), name
    assert got.chunk_digests == ref.chunk_digests


def test_bad_lm_input_is_one_line(tmp_path, teacher, corpus, tiny_tokenizer, capsys, monkeypatch):
    out = tmp_path / "c.kdcache"
    bert = make_tiny_bert(tmp_path / "bert", tiny_tokenizer)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"text": "my lord"}\n{"text": "to be\n', encoding="utf-8")
    (tmp_path / "other.jsonl").write_text('{"body": "my lord"}\n', encoding="utf-8")
    (tmp_path / "corpus.csv").write_text("text\nmy lord\n", encoding="utf-8")
    train = corpus / "train.txt"
    cases = [
        (_args(bert, train, out), ("not a causal language model", "BertForSequenceClassification")),
        (_args(teacher, train, out, "--seq-len", "33"), ("--seq-len 33 is beyond", "32 positions")),
        (_args(teacher, tmp_path / "empty.txt", out), ("empty.txt", "empty corpus")),
        (_args(teacher, tmp_path / "broken.jsonl", out), ("broken.jsonl: line 2: not valid JSON",)),
        (_args(teacher, tmp_path / "other.jsonl", out), ("other.jsonl: line 1: no text column 'text'", "body")),
        (_args(teacher, tmp_path / "other.jsonl", out, "--text-column", "title"), ("no text column 'title'",)),
        (_args(teacher, train, out, "--topk", "300"), ("--topk 300 is not below the teacher's 300 outputs",)),
        (_args(teacher, train, out, "--topk", "301"), ("--topk 301",)),
        ([a for a in _args(teacher, train, out) if a not in ("--seq-len", str(SEQ))], ("--task lm needs --seq-len",)),
        (_args(teacher, train, out, "--limit", "3"), ("--task lm does not take --limit",)),
        (_args(make_tiny_gpt2(tmp_path / "narrow", CORPUS, vocab_size=300, outputs=280), train, out),
         ("the tokenizer has 300 tokens but the model only 280",)),
        (_args(teacher, tmp_path / "corpus.csv", out), ("unsupported file type '.csv' for --task lm",)),
        (_args(teacher, train, out, "--tokenizer", tiny_tokenizer.name_or_path), ("the tokenizer has no EOS token",)),
    ]
    for args, needles in cases:
        code, _, err = run_cli(args, capsys, monkeypatch)
        _one_error_line(code, err, *needles)
        assert not out.exists(), args  # refused before anything was written


@pytest.mark.slow
def test_two_processes_store_the_lm_bytes_one_process_stores(tmp_path, teacher, corpus):
    def capture(nproc: int, out) -> None:
        kdcache_processes(nproc, _args(teacher, corpus, out, "--split", "train", "--split", "validation", "--topk", "3",
                                       "--chunk-rows", "4"))

    capture(1, tmp_path / "one.kdcache")
    capture(2, tmp_path / "two.kdcache")
    for split in ("train", "validation"):
        one, two = (kdcache.open_cache(tmp_path / name, split) for name in ("one.kdcache", "two.kdcache"))
        assert one.names == two.names and one.target.positions == SEQ
        for name in one.names:
            assert np.array_equal(one.read(name), two.read(name)), (split, name)
        assert one.chunk_digests == two.chunk_digests


def test_verify_recomputes_an_lm_cache_position_by_position(topk_cache, teacher, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(["verify", topk_cache, "--teacher", teacher, "--sample", "6", "--device", "cpu"], capsys,
                             monkeypatch)
    assert code == 0 and "train/teacher topk rows" in out and "verdict: ok" in out, out + err
    other = make_tiny_gpt2(tmp_path / "other", CORPUS, vocab_size=300, positions=32, seed=1)
    code, out, _ = run_cli(["verify", topk_cache, "--teacher", other, "--sample", "6", "--device", "cpu"], capsys,
                           monkeypatch)
    assert code != 0 and "differ in their kept logit" in out, out


def test_a_student_reads_the_cached_windows_not_the_corpus_tokenised_again(topk_cache, corpus):
    """The run's data is the cache's own input_ids (tests/recipes/test_lm_distill.py trains on it)."""
    from kdcache.train.inputs import load_run_data

    data = load_run_data(topk_cache, storage_options={}, data=None, val_split=None, device=torch.device("cpu"))
    cache = kdcache.open_cache(topk_cache, "train")
    assert data.kind == "lm" and data.val.name == "validation" and data.tokens.seq_len == SEQ
    batch = data.train.inputs.batch(np.arange(len(cache)))
    ids, lengths = cache.read("input_ids").astype(np.int64), cache.read("lengths")
    assert np.array_equal(batch["input_ids"].numpy(), ids)
    assert np.array_equal(batch["attention_mask"].numpy().sum(1), lengths)


def test_next_token_targets_follow_the_recorded_alignment_rule(topk_cache, teacher):
    from kdcache.data.lm import next_token_targets

    cache = kdcache.open_cache(topk_cache, "train")
    ids, lengths, labels = (torch.from_numpy(cache.read(a).astype(np.int64))
                            for a in ("input_ids", "lengths", "labels"))
    targets = next_token_targets(ids, lengths, labels)
    # every position's target, in stream order, is the stream shifted by one; nothing follows the last EOS
    assert np.array_equal(targets[targets != -100].numpy(), _stream(teacher, CORPUS[:30])[1:])
    assert targets[-1, int(lengths[-1]) - 1] == -100 and (targets[-1, int(lengths[-1]):] == -100).all()


def test_train_task_lm_makes_a_teacher_that_cache_teacher_loads(tmp_path, teacher, corpus, capsys, monkeypatch):
    config = tmp_path / "gpt.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_positions": 32, "n_embd": 32, "n_layer": 1, "n_head": 2}))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--task", "lm", "--model", config, "--tokenizer", teacher, "--data", corpus,
                              "--seq-len", SEQ, "--epochs", "3", "--lr", "3e-3", "--batch-size", "8", "--out", run,
                              "--device", "cpu", "--no-progress"], capsys, monkeypatch)
    assert code == 0 and "validation perplexity" in out, err
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["val_perplexity"] < 300  # below a uniform guess over the 300 outputs
    cache = tmp_path / "c.kdcache"
    assert run_cli(_args(run / "model", corpus / "train.txt", cache, "--topk", "4"), capsys, monkeypatch)[0] == 0
    assert kdcache.open_cache(cache, "train").header.tokens.vocab_size == 300
    # bad input: one line each, before any training
    code, _, err = run_cli(["train", "--task", "lm", "--model", config, "--tokenizer", teacher, "--data", corpus,
                            "--out", tmp_path / "r2", "--device", "cpu"], capsys, monkeypatch)
    _one_error_line(code, err, "train --task lm needs --seq-len")
    code, _, err = run_cli(["train", "--task", "lm", "--model", config, "--tokenizer", teacher, "--data", corpus,
                            "--seq-len", "64", "--out", tmp_path / "r2", "--device", "cpu"], capsys, monkeypatch)
    _one_error_line(code, err, "--seq-len 64 is beyond", "32 positions")
    code, _, err = run_cli(["train", "--task", "lm", "--model", config, "--tokenizer", teacher, "--data", corpus,
                            "--seq-len", SEQ, "--out", run, "--device", "cpu"], capsys, monkeypatch)
    _one_error_line(code, err, "already exists")


def test_a_parquet_corpus_reads_its_text_column_or_says_it_needs_pyarrow(tmp_path, teacher):
    from kdcache.data.lm import read_documents
    from kdcache.errors import KDCacheError

    path = tmp_path / "train.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the optional reader: without pyarrow a Parquet corpus is one line saying so
        path.write_bytes(b"PAR1")
        with pytest.raises(KDCacheError, match="reading Parquet needs pyarrow"):
            read_documents(path, None)
        return
    pq.write_table(pa.table({"body": CORPUS[:5], "n": list(range(5))}), path)
    assert read_documents(path, "body") == CORPUS[:5]
    with pytest.raises(KDCacheError, match="no text column 'text'"):
        read_documents(path, None)


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a.pop("tokens"), "the tokens attribute disagree"),
    (lambda a: a["task"].update(kind="classification"), "the tokens attribute disagree"),
    (lambda a: a["tokens"].update(seq_len=8), "attribute tokens (outputs 300, seq_len 8) disagrees with target"),
    (lambda a: a["target"].update(positions=8), "disagrees with target (outputs 300, positions 8)"),
    (lambda a: (a["target"].update(positions=8), a["tokens"].update(seq_len=8)), "differs from write_settings.target"),
    (lambda a: a["target"].update(axes=["rows"]), "attribute target.axes is ['rows'] with positions 16"),
])
def test_an_edited_token_axis_is_one_line(topk_cache, tmp_path, edit, needle):
    import shutil

    from kdcache.errors import KDCacheError

    copy = tmp_path / "c.kdcache"
    shutil.copytree(topk_cache, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    edit(meta["attributes"])
    (copy / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(KDCacheError) as caught:
        kdcache.open_cache(copy, "train")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_train_task_lm_trains_its_own_byte_level_bpe_when_given_a_vocabulary_size(tmp_path, corpus, capsys,
                                                                                  monkeypatch):
    from transformers import AutoTokenizer

    config = tmp_path / "gpt.json"
    config.write_text(json.dumps({"model_type": "gpt2", "n_positions": 32, "n_embd": 16, "n_layer": 1, "n_head": 1}))
    base = ["train", "--task", "lm", "--model", config, "--data", corpus / "train.txt", "--seq-len", SEQ,
            "--device", "cpu", "--no-progress"]
    code, _, err = run_cli([*base, "--out", tmp_path / "r0"], capsys, monkeypatch)
    _one_error_line(code, err, "needs --tokenizer DIR, or --vocab-size N")
    code, _, err = run_cli([*base, "--vocab-size", "100", "--out", tmp_path / "r0"], capsys, monkeypatch)
    _one_error_line(code, err, "--vocab-size must be at least 257")
    code, out, err = run_cli([*base, "--vocab-size", "280", "--max-steps", "2", "--out", tmp_path / "run"], capsys,
                             monkeypatch)
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "model"))
    assert 257 < len(tok) <= 280 and tok.decode(tok("my lord, to be!")["input_ids"]) == "my lord, to be!"
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["vocab_size"] == len(tok)
    # the special ids are the tokenizer's, not GPT-2's 50256 (outside this vocabulary: generate would never stop)
    assert saved["eos_token_id"] == saved["bos_token_id"] == tok.eos_token_id < len(tok)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2

"""`kdcache.torch.with_targets`: a user's own rows gain their cached teacher targets, joined by position or by the
cache's sample index, each row checked against the cache's fingerprint as `distill` checks it."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from kdcache import open_cache
from kdcache.errors import KDCacheError
from kdcache.torch import with_targets


def sst2_rows(folder, tokenizer, name="train.tsv", max_length=128):
    """What a user does: read the split's file in order and tokenise each sentence (no kdcache loader)."""
    with open(folder / name, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    encoded = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "label": int(r["label"])} for ids, r in zip(encoded["input_ids"], rows)]


def test_items_carry_the_cached_logits_of_their_row(sst2_cache, sst2_copy, tiny_tokenizer):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    data = with_targets(rows, sst2_cache)
    logits = open_cache(sst2_cache).read("logits").astype(np.float32)
    item = data[7]
    assert item["input_ids"] == rows[7]["input_ids"] and item["label"] == rows[7]["label"]
    assert item["teacher_row"] == 7
    np.testing.assert_array_equal(item["teacher_logits"].float().numpy(), logits[7])
    batch = data.collate([data[i] for i in (3, 4, 5)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"].sum(1).tolist() == [len(rows[i]["input_ids"]) for i in (3, 4, 5)]
    assert batch["labels"].tolist() == [rows[i]["label"] for i in (3, 4, 5)]
    np.testing.assert_array_equal(batch["teacher_logits"].float().numpy(), logits[3:6])


def test_a_dataloader_with_workers_serves_every_row_once(sst2_cache, sst2_copy, tiny_tokenizer):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    data = with_targets(rows, sst2_cache)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, collate_fn=data.collate, num_workers=2,
                                         generator=torch.Generator().manual_seed(0))
    logits = open_cache(sst2_cache).read("logits").astype(np.float32)
    seen = []
    for batch in loader:
        np.testing.assert_array_equal(batch["teacher_logits"].float().numpy(), logits[batch["teacher_row"].numpy()])
        seen += batch["teacher_row"].tolist()
    assert sorted(seen) == list(range(len(rows)))


def test_rows_in_another_order_join_by_the_sample_index(sst2_cache, sst2_copy, tiny_tokenizer):
    rows = [dict(r, line=i) for i, r in enumerate(sst2_rows(sst2_copy, tiny_tokenizer))]
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    data = with_targets(shuffled[:20], sst2_cache, index="line")
    logits = open_cache(sst2_cache).read("logits").astype(np.float32)
    for k in range(20):
        assert data[k]["teacher_row"] == shuffled[k]["line"]
        np.testing.assert_array_equal(data[k]["teacher_logits"].float().numpy(), logits[shuffled[k]["line"]])
    by_function = with_targets(shuffled, sst2_cache, index=lambda item, position: item["line"])
    assert by_function[5]["teacher_row"] == shuffled[5]["line"]


def test_a_tampered_row_is_refused_naming_it(sst2_cache, sst2_copy, tiny_tokenizer):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    rows[9] = dict(rows[9], input_ids=rows[9]["input_ids"][:-2] + rows[9]["input_ids"][-1:])  # one token dropped
    data = with_targets(rows, sst2_cache)
    data[8]  # the rows around it are fine
    with pytest.raises(KDCacheError) as caught:
        data[9]
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "row 9 (dataset item 9) does not match the cache" in message and "fingerprint" in message


def test_a_tampered_row_is_one_line_out_of_a_dataloader_worker(sst2_cache, sst2_copy, tiny_tokenizer):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    rows[30] = dict(rows[30], label=1 - rows[30]["label"])  # relabelled
    data = with_targets(rows, sst2_cache)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=data.collate, num_workers=1)
    with pytest.raises(KDCacheError) as caught:
        for _ in loader:
            pass
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert "row 30 (dataset item 30) has label" in message and "the labels changed" in message


def test_rows_of_another_max_length_or_shuffled_without_an_index_are_refused(sst2_cache, sst2_copy, tiny_tokenizer):
    shorter = sst2_rows(sst2_copy, tiny_tokenizer, max_length=6)
    first_cut = next(i for i, r in enumerate(sst2_rows(sst2_copy, tiny_tokenizer)) if len(r["input_ids"]) > 6)
    with pytest.raises(KDCacheError, match=f"row {first_cut} .*does not match the cache"):
        for i in range(len(shorter)):
            with_targets(shorter, sst2_cache)[i]
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    with pytest.raises(KDCacheError, match="row 0 .*does not match"):
        with_targets(rows[1:] + rows[:1], sst2_cache)[0]
    with pytest.raises(KDCacheError, match="has 59 rows but the cache .* has 60; join them by the cache's sample index"):
        with_targets(rows[1:], sst2_cache)


def test_a_missing_split_or_index_is_one_line(sst2_cache, sst2_copy, tiny_tokenizer):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    with pytest.raises(KDCacheError, match=r"no split 'test' in this cache \(splits: train, validation\)"):
        with_targets(rows, sst2_cache, split="test")
    with pytest.raises(KDCacheError, match="item 0 has sample index 999, which the cache .* does not hold"):
        with_targets([dict(rows[0], line=999)], sst2_cache, index="line")[0]
    with pytest.raises(KDCacheError, match="item 0 has no column 'line'"):
        with_targets(rows[:1], sst2_cache, index="line")[0]


def test_image_rows_are_fingerprinted_as_uint8_pixels(digits_cache):
    from kdcache.data import load_split

    split = load_split("digits", None, "train")
    rows = [{"image": split.dataset[i]["inputs"], "label": split.dataset[i]["label"]} for i in range(len(split))]
    data = with_targets(rows, digits_cache)
    assert data[0]["teacher_logits"].shape == (10,)
    floats = [dict(r, image=r["image"].astype(np.float32) / 16) for r in rows]
    with pytest.raises(KDCacheError, match="'image' is float32, but the cache fingerprints the uint8 pixels"):
        with_targets(floats, digits_cache)[0]
    changed = [dict(r) for r in rows]
    changed[4]["image"] = changed[4]["image"].copy()
    changed[4]["image"][0, 0] += 1
    with pytest.raises(KDCacheError, match="row 4 .*does not match"):
        with_targets(changed, digits_cache)[4]

"""`kdcache.hf.KDTrainer`: transformers.Trainer distilling from a cache, with the method's schedule on the Trainer's
epochs, rows checked, the method's state in the Trainer's checkpoints, and the Trainer's own gradient accumulation,
evaluation and resume still working."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[hf]'")

from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from kdcache.errors import KDCacheError  # noqa: E402
from kdcache.methods import schedules  # noqa: E402
from kdcache.hf import METHOD_STATE, KDTrainer  # noqa: E402
from kdcache.models import build_student  # noqa: E402

from test_with_targets import sst2_rows  # noqa: E402


@pytest.fixture(scope="module")
def student_config(tmp_path_factory):
    """A 1-layer BERT without dropout, so two runs over the same batches compute the same numbers."""
    path = tmp_path_factory.mktemp("hfstudent") / "bert.json"
    path.write_text(json.dumps({"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 256,
                                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    return path


def student(config, tokenizer, outputs=2):
    return build_student(str(config), outputs, tokenizer=tokenizer, seed=0).model


def arguments(out, **extra):
    values = dict(output_dir=str(out), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=1e-3,
                  use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no",
                  disable_tqdm=True, seed=0, data_seed=0)
    values.update(extra)
    return TrainingArguments(**values)


class EpochLog(TrainerCallback):
    """The method epoch and values the trainer used at each optimiser step."""

    def __init__(self, trainer_box):
        self.box, self.seen = trainer_box, []

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.box[0]
        self.seen.append((trainer.kd_epoch, trainer.kd_method.values(trainer.kd_epoch, state.global_step - 1)["T"]))


def test_the_schedule_follows_the_trainers_epochs_and_checkpoints_hold_the_method(
        tmp_path, sst2_cache, sst2_copy, tiny_tokenizer, student_config):
    rows, dev = sst2_rows(sst2_copy, tiny_tokenizer), sst2_rows(sst2_copy, tiny_tokenizer, "dev.tsv")
    box = []
    log = EpochLog(box)
    trainer = KDTrainer(model=student(student_config, tiny_tokenizer),
                        args=arguments(tmp_path / "out", num_train_epochs=3, save_strategy="epoch",
                                       eval_strategy="epoch"),
                        train_dataset=rows, eval_dataset=dev, callbacks=[log], cache=sst2_cache,
                        method="continuation", preset="glue", t_max=3)
    box.append(trainer)
    trainer.train()
    steps = -(-len(rows) // 8)  # 60 rows, batches of 8
    assert [e for e, _ in log.seen] == [1] * steps + [2] * steps + [3] * steps
    assert [schedules.temperature(e, 3, 3) for e in (1, 2, 3)] == [2, 1, 1]
    assert [T for _, T in log.seen] == [2] * steps + [1] * steps + [1] * steps  # T_max 3 over 3 epochs (Algorithm 1)
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and all(h["eval_loss"] > 0 for h in evals)
    saved = torch.load(tmp_path / "out" / f"checkpoint-{steps}" / METHOD_STATE, weights_only=True)
    assert saved["name"] == "continuation" and saved["epochs"] == 3 and saved["hyperparameters"]["t_max"] == 3


def test_gradient_accumulation_takes_the_same_steps_as_the_whole_batch(
        tmp_path, sst2_cache, sst2_copy, tiny_tokenizer, student_config):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    weights = []
    for batch, accumulate in ((8, 1), (4, 2)):
        trainer = KDTrainer(model=student(student_config, tiny_tokenizer),
                            args=arguments(tmp_path / f"b{batch}", per_device_train_batch_size=batch,
                                           gradient_accumulation_steps=accumulate, max_steps=3),
                            train_dataset=rows, cache=sst2_cache, method="vanilla")
        trainer.train()
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    fresh = torch.cat([p.detach().flatten() for p in student(student_config, tiny_tokenizer).parameters()])
    assert not torch.allclose(weights[0], fresh)  # it trained
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_resume_from_a_checkpoint_restores_the_method_and_ends_where_one_run_ends(
        tmp_path, sst2_cache, sst2_copy, tiny_tokenizer, student_config):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    steps = -(-len(rows) // 8)
    whole = KDTrainer(model=student(student_config, tiny_tokenizer), args=arguments(tmp_path / "whole"),
                      train_dataset=rows, cache=sst2_cache, method="continuation", t_max=2)
    whole.train()
    first = KDTrainer(model=student(student_config, tiny_tokenizer),
                      args=arguments(tmp_path / "cut", save_strategy="epoch"),
                      train_dataset=rows, cache=sst2_cache, method="continuation", t_max=2)
    first.train()
    resumed = KDTrainer(model=student(student_config, tiny_tokenizer),
                        args=arguments(tmp_path / "cut", save_strategy="epoch"),
                        train_dataset=rows, cache=sst2_cache, method="continuation", t_max=2)
    box = []
    log = EpochLog(box)
    resumed.add_callback(log)
    box.append(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{steps}"))
    assert [e for e, _ in log.seen] == [2] * steps  # only the second epoch ran, on the second epoch's schedule
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    (tmp_path / "cut" / f"checkpoint-{steps}" / METHOD_STATE).unlink()
    again = KDTrainer(model=student(student_config, tiny_tokenizer), args=arguments(tmp_path / "cut"),
                      train_dataset=rows, cache=sst2_cache, method="continuation", t_max=2)
    with pytest.raises(KDCacheError, match=f"{METHOD_STATE}: missing; this checkpoint was not written by KDTrainer"):
        again.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{steps}"))


def test_a_tampered_row_is_refused_through_the_trainer(tmp_path, sst2_cache, sst2_copy, tiny_tokenizer,
                                                       student_config):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    rows[17] = dict(rows[17], input_ids=rows[17]["input_ids"][:1] + [5] + rows[17]["input_ids"][1:])
    trainer = KDTrainer(model=student(student_config, tiny_tokenizer),
                        args=arguments(tmp_path / "out", dataloader_num_workers=1), train_dataset=rows,
                        cache=sst2_cache, method="continuation")
    with pytest.raises(KDCacheError) as caught:
        trainer.train()
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    assert "row 17 (dataset item 17) does not match the cache" in message


def test_bad_input_is_one_line(tmp_path, sst2_cache, sst2_copy, tiny_tokenizer, student_config):
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    model = student(student_config, tiny_tokenizer)
    make = dict(model=model, args=arguments(tmp_path / "out"), train_dataset=rows, cache=sst2_cache)
    with pytest.raises(KDCacheError, match="restarts the optimiser at epoch 2, which transformers.Trainer cannot"):
        KDTrainer(**make, method="annealing")
    KDTrainer(**make, method="annealing", anneal_continuous=True)  # one optimiser over both stages: accepted
    with pytest.raises(KDCacheError, match=r"no split 'test' in this cache"):
        KDTrainer(**dict(make, eval_dataset=rows), method="vanilla", eval_split="test")
    with pytest.raises(KDCacheError, match="has 59 rows but the cache .* has 60"):
        KDTrainer(**dict(make, train_dataset=rows[1:]), method="vanilla")
    wide = KDTrainer(**dict(make, model=student(student_config, tiny_tokenizer, outputs=3)), method="vanilla")
    with pytest.raises(KDCacheError, match="the student has 3 outputs but the cache .* has 2"):
        wide.train()


def test_bf16_autocast_trains_with_a_float32_loss(tmp_path, sst2_cache, sst2_copy, tiny_tokenizer, student_config):
    """bf16 on the CPU (the Trainer's autocast): the method's loss is computed in float32 and the student moves."""
    rows = sst2_rows(sst2_copy, tiny_tokenizer)
    seen = []

    class Spy(KDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append(loss.dtype)
            return loss

    model = student(student_config, tiny_tokenizer)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer = Spy(model=model, args=arguments(tmp_path / "out", bf16=True, max_steps=2), train_dataset=rows,
                  cache=sst2_cache, method="continuation")
    trainer.train()
    assert seen == [torch.float32, torch.float32]
    assert not torch.allclose(before, torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))


TORCHRUN_SCRIPT = """
import json, os, sys
import torch
from transformers import TrainingArguments
from kdcache.hf import KDTrainer
from kdcache.models.hf import load_tokenizer
from kdcache.models import build_student
from test_with_targets import sst2_rows
from pathlib import Path

cache, data, tokenizer_dir, config, out = sys.argv[1:]
tokenizer = load_tokenizer(tokenizer_dir)
model = build_student(config, 2, tokenizer=tokenizer, seed=0).model
args = TrainingArguments(out, num_train_epochs=2, per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True,
                         report_to=[], save_strategy="epoch", eval_strategy="no", logging_strategy="no",
                         disable_tqdm=True, seed=0)
trainer = KDTrainer(model=model, args=args, train_dataset=sst2_rows(Path(data), tokenizer), cache=cache,
                    method="continuation", t_max=2)
trainer.train()
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
rank = int(os.environ["RANK"])
Path(out, f"rank{rank}.json").write_text(json.dumps({"world": trainer.args.world_size, "sum": float(flat.sum()),
                                                     "steps": trainer.state.global_step}))
"""


def test_two_torchrun_processes_train_one_student(tmp_path, sst2_cache, sst2_copy, tiny_tokenizer, student_config):
    import os
    import subprocess
    import sys

    from helpers import REPO

    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    tiny_tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), str(REPO / "tests" / "api")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(sst2_cache), str(sst2_copy), str(tmp_path / "tokenizer"), str(student_config),
                           str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = -(-60 // 8)  # 60 rows, 4 per process, two processes: global batches of 8
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [2 * steps, 2 * steps]
    assert ranks[0]["sum"] == pytest.approx(ranks[1]["sum"], rel=1e-6)  # the same student in both processes
    state = torch.load(out / f"checkpoint-{2 * steps}" / METHOD_STATE, weights_only=True)
    assert state["epochs"] == 2 and state["name"] == "continuation"

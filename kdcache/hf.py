"""`KDTrainer`: Hugging Face's `transformers.Trainer`, distilling from a kdcache cache instead of computing a loss on
the labels.

    from transformers import TrainingArguments
    from kdcache.hf import KDTrainer
    trainer = KDTrainer(model=student, args=TrainingArguments("out", num_train_epochs=30),
                        train_dataset=rows, eval_dataset=dev_rows, cache="sst2.kdcache", method="continuation")
    trainer.train()

- The datasets are the user's own (a list of dicts of token ids in the split's order is enough): the trainer wraps
  them with `kdcache.torch.with_targets` (train: the cache's `train` split; eval: its `eval_split`, by default
  `validation` when the cache has one) and pads them itself. Every row is checked against the cache's fingerprint
  the first time it is read, as `distill` checks it.
- `compute_loss` is the method's loss (`kdcache.methods.get`: the very Method distill runs) against the cached
  targets, at the Trainer's epoch and optimiser step; a callback moves the method's epoch with the Trainer's, lets
  it see each evaluation (Annealing-KD keeps its best stage-1 student) and saves its state in every checkpoint
  folder (`kdcache_method.pt`), which `train(resume_from_checkpoint=...)` restores.
- The Trainer's own features keep working: gradient accumulation (the loss is a per-batch mean; the Trainer divides
  it by the accumulation steps), bf16 / fp16 (the loss is computed in float32), evaluation, checkpoints and resume,
  torchrun (each process wraps its datasets and checks the rows it reads).
- A language-model cache: the student is a causal LM, the datasets the user's windows (dicts with `input_ids`, in
  the split's order), each checked against the cache; `compute_loss` is `distill`'s chunked per-token loss
  (`kdcache.methods.tokens.token_output` and the method's loss on it; `loss_chunk=` as `--loss-chunk`, preset
  `lm` by default), and evaluation reports that loss (`eval_loss`). Under torchrun the hidden states come from the
  wrapped model's forward (`output_hidden_states`, one position's logits), so DistributedDataParallel syncs the
  gradients.
- A views cache: the training rows replay the view of the Trainer's epoch (`with_targets`'s `set_epoch`, which the
  Trainer and the callback call each epoch; `view_order=` cycle or random, drawn from `args.seed`), the
  evaluation rows are the plain images; both normalised as the teacher saw them.
- Refused in one line: a method the cache's kind of target cannot serve, a method that must restart the optimiser
  mid-run (Annealing-KD's stage 2 as its authors train it: pass anneal_continuous=True), a missing split, a student
  whose output width differs from the cache's teacher.

Needs `accelerate` (the Trainer's own requirement): `pip install "kdcache[hf]"`.
"""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import Any

import torch
import transformers

from kdcache.cache.reader import TeacherCache
from kdcache.errors import KDCacheError
from kdcache.methods.plain import TEACHER_PREFIX, KDMethod, get
from kdcache.methods.tokens import TokenOutput, check_head, perplexity_sums, token_output
from kdcache.torch import TEXT_KEYS, TargetDataset, open_split, with_targets

#: The file beside each Trainer checkpoint that holds the method's state.
METHOD_STATE = "kdcache_method.pt"
_TRAINER_PARAMS = frozenset(inspect.signature(transformers.Trainer.__init__).parameters) - {"self"}


class KDTrainer(transformers.Trainer):
    """A `transformers.Trainer` whose loss is a kdcache method against a teacher cache (see the module docstring).

    `cache`: a path, URL or TeacherCache of the cache; `method` and `preset` as for `kdcache distill` (preset:
    `lm` on a language-model cache, else `glue`); `index`, `inputs` and `view_order` as for `with_targets`; every
    other keyword that `Trainer` does not take is the method's (t_max, psi, margin, temperature, alpha, kd_loss,
    phi_on, loss_chunk, ...)."""

    def __init__(self, *args: Any, cache: Any, method: str = "continuation", preset: str | None = None,
                 index: Any = None, inputs: Any = None, eval_split: str | None = "validation",
                 view_order: str | None = None, storage_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _TRAINER_PARAMS}
        train_cache = open_split(cache, "train", storage_options)
        #: a language-model cache: the student is a causal LM and the loss distill's chunked per-token loss
        self.kd_tokens = bool(getattr(train_cache.target, "positions", None))
        preset = preset or ("lm" if self.kd_tokens else "glue")
        where = cache if not isinstance(cache, TeacherCache) else cache.path
        training = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if training is None:
            raise KDCacheError("KDTrainer needs args=TrainingArguments(...)")
        epochs = max(1, math.ceil(training.num_train_epochs))
        self.kd_method: KDMethod = get(method, preset=preset, epochs=epochs, cache=train_cache, **options)
        if self.kd_method.restart_epochs():
            raise KDCacheError(f"method {method!r} restarts the optimiser at epoch {self.kd_method.restart_epochs()[0]}, "
                               "which transformers.Trainer cannot; pass anneal_continuous=True (one optimiser and "
                               "schedule over both stages) or use kdcache distill")
        self.kd_options = {"method": method, "preset": preset, **options}
        self.kd_cache = train_cache
        self.kd_inputs = tuple(inputs) if inputs is not None else None
        pad_id = _pad_id(kwargs.get("processing_class"))
        for name, split in (("train_dataset", "train"), ("eval_dataset", eval_split)):
            dataset = kwargs.get(name)
            if dataset is None or isinstance(dataset, TargetDataset):
                continue
            if split is None or (name == "eval_dataset" and split not in _splits(where, storage_options)
                                 and eval_split == "validation"):
                continue  # no cached split to check the evaluation rows against: they are used as given
            # a views cache: the training rows replay the view of the Trainer's epoch, the evaluation rows are plain
            order = view_order if split == "train" else ("plain" if train_cache.header.views is not None else None)
            kwargs[name] = with_targets(dataset, train_cache if split == "train" else where, split, index=index,
                                        inputs=inputs, pad_id=pad_id, view_order=order, seed=training.seed,
                                        storage_options=storage_options)
        if isinstance(kwargs.get("train_dataset"), TargetDataset):
            kwargs.setdefault("data_collator", kwargs["train_dataset"].collate)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        super().__init__(*args, callbacks=[*callbacks, _MethodCallback(self)], **kwargs)
        self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation steps
        if not self.label_names:  # a model whose forward names no labels: evaluation still goes through compute_loss
            self.label_names = ["labels"]  # (the collate makes `labels` of `label`)
        self.kd_epoch = 1
        self._resume_dir: str | None = None
        self._head_checked = False

    # --- the loss ---------------------------------------------------------------------------------------------

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The method's loss against the batch's cached targets at the Trainer's epoch and optimiser step;
        evaluation rows without cached targets get the hard-label loss."""
        if self.kd_tokens:
            return self._token_loss(model, inputs, return_outputs)
        labels = inputs.get("labels", inputs.get("label"))
        outputs = model(**self._model_inputs(model, inputs))
        logits = (outputs.logits if hasattr(outputs, "logits") else outputs[0] if isinstance(outputs, tuple)
                  else outputs).float()
        if any(k.startswith(TEACHER_PREFIX) for k in inputs):
            epoch = min(max(self.kd_epoch, 1), self.kd_method.epochs)
            loss = self.kd_method.loss(logits, inputs, labels, epoch=epoch, step=int(self.state.global_step))
        else:
            loss = _hard_label_loss(logits, labels, self.kd_cache.task_kind)
        return (loss, outputs) if return_outputs else loss

    def _token_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool) -> Any:
        """A causal-LM student on a language-model cache: the method's loss at every real token, its logits made a
        chunk of positions at a time (`kdcache.methods.tokens`), as `distill` computes it; evaluation windows without
        cached targets get the mean next-token cross-entropy."""
        student = self.accelerator.unwrap_model(model)
        ids = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if not self._head_checked:  # the chunked loss must train the model that is saved: its logits are lm_head's
            self._check_student(model, student, ids)
        if model is student:
            output = token_output(student, ids)
        else:  # wrapped (DistributedDataParallel): its forward, which syncs the gradients, gives the hidden states
            hidden = model(**ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
            output = TokenOutput(hidden, student.get_output_embeddings(), ids["input_ids"],
                                 ids["attention_mask"].sum(dim=1))
        if TEACHER_PREFIX + "next_token" in inputs:
            epoch = min(max(self.kd_epoch, 1), self.kd_method.epochs)
            loss = self.kd_method.loss(output, inputs, inputs[TEACHER_PREFIX + "next_token"], epoch=epoch,
                                       step=int(self.state.global_step))
        else:
            unknown = torch.full((len(ids["input_ids"]),), -1, dtype=torch.int64, device=ids["input_ids"].device)
            ce, count, _ = perplexity_sums(output, unknown, None)
            loss = torch.tensor(ce / max(count, 1), device=ids["input_ids"].device)
        return (loss, output) if return_outputs else loss

    def _check_student(self, model: torch.nn.Module, student: torch.nn.Module, ids: dict[str, torch.Tensor]) -> None:
        """Once, on the first batch: the student's logits are its lm_head of its final hidden states (`check_head`),
        and, wrapped for torchrun, its forward's last hidden states are those final hidden states."""
        training = student.training
        student.eval()  # the same numbers twice: no dropout, no autocast
        try:
            with torch.autocast(ids["input_ids"].device.type, enabled=False):
                check_head(student, ids, "given to KDTrainer")
                if model is not student:
                    with torch.inference_mode():
                        last = student(**ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
                        final = token_output(student, ids).hidden
                    if last.shape != final.shape or not torch.allclose(last, final, rtol=1e-4, atol=1e-4):
                        raise KDCacheError(f"student given to KDTrainer ({type(student).__name__}): its last hidden "
                                           "states are not its final ones (after the last norm), which the chunked "
                                           "token loss reads under torchrun; train it with kdcache distill")
        finally:
            student.train(training)
        self._head_checked = True

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """On a language-model cache, evaluation reports the loss alone (`eval_loss`): the batch's logits
        [B, S, V] are what the chunked loss never makes."""
        if not self.kd_tokens:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _model_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """The keys the model takes: those named by `inputs=`, else those its forward names (never the labels or
        the teacher's targets, which are the loss's)."""
        if self.kd_inputs is not None:
            return {k: inputs[k] for k in self.kd_inputs if k in inputs}
        forward = inspect.signature(self.accelerator.unwrap_model(model).forward).parameters
        named = [k for k, p in forward.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if any(p.kind == p.VAR_KEYWORD for p in forward.values()) and not named:
            named = list(TEXT_KEYS)
        return {k: v for k, v in inputs.items()
                if k in named and k not in ("labels", "label") and not k.startswith(TEACHER_PREFIX)}

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        """The batches keep every key: the teacher's targets and the labels are the loss's, and `_model_inputs`
        picks what the model takes (the Trainer would drop the teacher_* keys, which its model's forward lacks)."""
        return data_collator

    # --- resume -----------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train, the method's state restored from the checkpoint resumed (if it saved one)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        self._resume_dir = str(resume_from_checkpoint) if resume_from_checkpoint else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _setup_method(self, epochs: int, steps_per_epoch: int) -> None:
        """The method for the run the Trainer actually makes (its epochs and optimiser steps per epoch), then its
        state from the checkpoint being resumed."""
        if (epochs, steps_per_epoch) != (self.kd_method.epochs, self.kd_method.steps_per_epoch):
            self.kd_method = _remake(self.kd_options, epochs, steps_per_epoch, self.kd_cache)
        if self._resume_dir is not None:
            path = Path(self._resume_dir) / METHOD_STATE
            if not path.is_file():
                raise KDCacheError(f"{path}: missing; this checkpoint was not written by KDTrainer (the method's "
                                   "state is needed to resume)")
            self.kd_method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


class _MethodCallback(transformers.TrainerCallback):
    """The method's epoch follows the Trainer's; it sees each evaluation and its state goes in each checkpoint."""

    def __init__(self, trainer: KDTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epochs = max(1, math.ceil(state.num_train_epochs))
        self.trainer._setup_method(epochs, max(1, math.ceil(state.max_steps / epochs)))

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.trainer.kd_epoch = min(math.floor((state.epoch or 0.0) + 1e-6) + 1, self.trainer.kd_method.epochs)
        self.trainer.kd_method.start_epoch(self.trainer.kd_epoch, self.trainer.accelerator.unwrap_model(model))
        if isinstance(self.trainer.train_dataset, TargetDataset):  # a views cache: this epoch's views (from 0)
            self.trainer.train_dataset.set_epoch(self.trainer.kd_epoch - 1)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: Any = None, **kwargs: Any) -> None:
        name = args.metric_for_best_model or "loss"
        value = (metrics or {}).get(name if name.startswith("eval_") else f"eval_{name}")
        if value is not None and model is not None:
            higher = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
            self.trainer.kd_method.end_epoch(self.trainer.kd_epoch, self.trainer.accelerator.unwrap_model(model),
                                             value if higher else -value)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                tmp = folder / f".{METHOD_STATE}.tmp"
                torch.save(self.trainer.kd_method.state_dict(), tmp)
                os.replace(tmp, folder / METHOD_STATE)


def _remake(options: dict[str, Any], epochs: int, steps_per_epoch: int, cache: TeacherCache) -> KDMethod:
    rest = {k: v for k, v in options.items() if k not in ("method", "preset")}
    return get(options["method"], preset=options["preset"], epochs=epochs, cache=cache,
               steps_per_epoch=steps_per_epoch, **rest)


def _hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    from kdcache.methods import losses

    return losses.ce(logits, labels, kind=kind)


def _splits(location: Any, storage_options: dict[str, Any] | None) -> list[str]:
    from kdcache.cache.reader import Cache

    return Cache(location, storage_options=storage_options).header.splits


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


__all__ = ["KDTrainer", "METHOD_STATE"]

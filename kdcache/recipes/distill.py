"""Recipe: train a student against a teacher cache (`kdcache distill`), or on labels alone (`kdcache train`).

    kdcache distill --cache sst2.kdcache --student bert-4layer.json --method continuation --epochs 30 --out runs/ckd
    kdcache distill --cache s3://bucket/c10.kdcache --student resnet8 --method prokd --out runs/prokd
    kdcache train --model resnet20 --task cifar10 --data cifar-10-batches-py --epochs 200 --out runs/teacher

Features, and the flags that control them:
- methods (`--method`, kdcache/methods/): continuation (default), vanilla, annealing, ce, prokd (the cached teacher
  checkpoints in training order), curriculum (cached hidden-state projections, then the logits); their
  hyper-parameters default to `--preset` (`cifar`, `glue`, `small`, or `auto` by modality) and each is a flag;
- the teacher is never loaded: its outputs stream from the cache (a folder or an fsspec URL; kdcache/train/
  batches.py), and the dataset named in the cache (or `--data`) is re-read, every row's fingerprint and label
  checked against it;
- schedules per epoch, or per step (`--schedule-unit step`) for runs of few epochs;
- evaluation every epoch with the task's metric, the best student kept in `best/` (a teacher folder), metrics.jsonl
  and summary.json; `--resume` continues from last.pt with the same batches and schedules as an uninterrupted run;
  `--precision bf16|fp16` autocast; `--device auto`;
- several processes (`torchrun --nproc-per-node N $(which kdcache) distill ...`): each takes its share of every
  batch, gradients summed over them, rank 0 writes the run folder (kdcache/train/dist.py).

The run's pieces, shared with `kdcache sweep`: kdcache/train/run.py (the data, the student's run, its folder,
its targets, its summary) and kdcache/train/fit.py (the epochs).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError
from kdcache.methods import losses
from kdcache.models import check_student_layers
from kdcache.runtime import resolve_device
from kdcache.train.config import DistillConfig
from kdcache.train.dist import close_world, init_world
from kdcache.train.fit import fit
from kdcache.train.run import attach_targets, close_run, load_data, method_for, open_run
from kdcache.train.run_dir import check_overwrite, never_trained, run_folder_lock


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary also written to RUN_DIR/summary.json (by rank 0 under torchrun)."""
    world, device_name = init_world(cfg.device)
    held = contextlib.ExitStack()  # the run folder, this process's alone until it ends
    try:
        device = resolve_device(device_name)
        method = method_for(cfg)
        hinge = cfg.method == "continuation" or cfg.kd_loss == "continuation"
        if world.distributed and cfg.reduction in losses.WHOLE_BATCH and hinge:
            raise world.fail(f"--reduction {cfg.reduction} is one hinge on the whole batch's mean distance, which a "
                             "process that sees a share of the batch cannot compute: use sample or element under "
                             "torchrun")
        world.agree(lambda: _claim(cfg, Path(cfg.out), held))
        world.agree(lambda: check_student_layers(cfg.student, cfg.student_layers, cfg.trust_model_code))  # before the data is read
        data = load_data(cfg, world, device)  # 1. the data
        run = open_run(cfg, data, world, device, method)  # 2-4. hyper-parameters, student, run folder
        attach_targets([run], data)
        fit([run], data, progress=cfg.progress, where=str(run.run_dir.last))  # 5. the loop
        return close_run(run, data)  # 6. the summary
    finally:
        held.close()
        close_world(world)


def _claim(cfg: DistillConfig, out: Path, held: contextlib.ExitStack) -> None:
    """The run folder locked for this process (rank 0 under torchrun) until `held` closes, then a taken --out that
    the flags neither resume nor may replace refused: both before the data is read."""
    held.enter_context(run_folder_lock(out))
    if cfg.resume or not (out.exists() and any(out.iterdir())) or never_trained(out):
        return  # (a run that stopped before finishing an epoch: the rerun replaces it)
    if not cfg.overwrite:
        raise KDCacheError(f"{out}: already holds a run; pass --resume to continue it or --overwrite to replace it")
    check_overwrite(out)


__all__ = ["DistillConfig", "distill"]

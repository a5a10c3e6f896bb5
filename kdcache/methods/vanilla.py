"""Vanilla KD (Hinton et al., 2015): the hard-label loss mixed with the KL divergence to the softened teacher."""

from __future__ import annotations

from typing import Any

import torch

from kdcache.methods import losses, sparse_losses
from kdcache.methods.base import Method, Run, StepPlan
from kdcache.errors import KDCacheError
from kdcache.methods.targets import KIND_WORDS, SampledTarget, TopKTarget


class VanillaKD(Method):
    name = "vanilla"
    # Hinton et al. leave T and alpha to the task; T = 4, alpha = 0.5 are the common choice (docs/methods.md)
    defaults = {preset: {"temperature": 4.0, "alpha": 0.5} for preset in ("cifar", "glue", "small", "text-scratch")}
    # a language model's KD is usually at T = 1, which every token-level top-k cache records (docs/methods.md)
    defaults["lm"] = {"temperature": 1.0, "alpha": 0.5}
    # top-k: the KL with the tail as one exact bucket; sampled: the RS-KD estimator, which is defined at T = 1
    target_kinds = ("dense", "topk", "sampled")
    accepts = ("checkpoint", "topk_tail")
    per_token = True

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.tail = self.options.topk_tail or "bucket"
        if self.options.topk_tail is not None and self.target_kind != "topk":
            raise KDCacheError(f"{run.where}: --topk-tail applies to a top-k cache (cache-teacher --topk K); this "
                               f"one stores {KIND_WORDS[self.target_kind]}")
        if self.target_kind == "topk" and self.tail == "bucket":  # a T the cache did not record: one line before
            sparse_losses.recorded_temperature(  # the run folder is made (the renormalised tail needs no lse)
                run.cache.target.temperatures or [1.0], float(run.hp["temperature"]))

    def values(self, epoch: int, step: int, n: int) -> dict[str, Any]:
        T = 1.0 if self.target_kind == "sampled" else float(self.run.hp["temperature"])
        return {"T": T, "alpha": float(self.run.hp["alpha"])}

    def loss(self, output: torch.Tensor, target: Any, labels: torch.Tensor, plan: StepPlan,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        v = plan.values
        if isinstance(target, TopKTarget):
            return sparse_losses.topk_kd_loss(output, target.values, target.indices, target.logsumexp, labels,
                                              temperature=v["T"], temperatures=target.temperatures, alpha=v["alpha"],
                                              tail=self.tail, mask=mask)
        if isinstance(target, SampledTarget):
            return sparse_losses.sampled_kd_loss(output, target.ids, target.counts, target.logprobs, labels,
                                                 alpha=v["alpha"], sample_temperature=target.sample_temperature,
                                                 mask=mask)
        return losses.vanilla_kd_loss(output, target, labels, temperature=v["T"], alpha=v["alpha"],
                                      kind=self.loss_kind, mask=mask)

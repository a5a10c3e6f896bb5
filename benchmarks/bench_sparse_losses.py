"""Step time of the sparse-target losses against their dense siblings: forward + backward of the loss alone.

    python benchmarks/bench_sparse_losses.py [--rows 256] [--outputs 1000] [--k 10,32,100] [--draws 50]
                                             [--threads 1] [--steps 50] [--repeats 7] [--device cpu]

The student's outputs are a leaf tensor (no model), so the table is the loss's own cost per step, the part of a
distill step that the target kind changes. Each row: ms per step, its ratio to dense Vanilla KD (T = 4,
alpha = 0.5) on the same rows and to its own dense sibling (Continuation-KD's for the top-k Continuation rows),
medians over `--repeats` rounds that take every case in turn for `--steps` steps. Sampled targets are N draws at
T_s = 1 stored at width N (unused slots at count 0), as capture stores them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kdcache.methods.losses import continuation_kd_loss, vanilla_kd_loss
from kdcache.methods.sparse_losses import sampled_kd_loss, topk_continuation_kd_loss, topk_kd_loss

TEMPERATURES = (1.0, 2.0, 4.0)


def sampled_target(teacher: torch.Tensor, draws: int, generator: torch.Generator):
    """Unique ids of `draws` draws from softmax(teacher), their counts and T = 1 log-probs, at width `draws`."""
    picks = torch.multinomial(torch.softmax(teacher, -1), draws, replacement=True, generator=generator)
    counts = torch.zeros_like(teacher, dtype=torch.long).scatter_add_(1, picks, torch.ones_like(picks))
    counts, ids = counts.topk(draws, dim=-1)
    log_p = torch.log_softmax(teacher, -1).gather(1, ids)
    return ids, counts, log_p


def steps_ms(loss_fn: Callable[[torch.Tensor], torch.Tensor], student: torch.Tensor, steps: int) -> float:
    """Mean ms for one forward + backward of `loss_fn` over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        student.grad = None
        loss_fn(student).backward()
    if student.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def measure(cases: list[Callable], siblings: list[int], student: torch.Tensor, steps: int,
            repeats: int) -> list[tuple[float, float, float]]:
    """(median ms, median ratio to cases[0], median ratio to its dense sibling) per case. Rounds take every case
    in turn and each ratio is taken within a round, so a load that changes over time (a shared machine) moves the
    baselines with the rest."""
    for fn in cases:
        steps_ms(fn, student, 5)  # warm-up
    rounds = [[steps_ms(fn, student, steps) for fn in cases] for _ in range(repeats)]
    return [(statistics.median(r[i] for r in rounds), statistics.median(r[i] / r[0] for r in rounds),
             statistics.median(r[i] / r[siblings[i]] for r in rounds)) for i in range(len(cases))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--outputs", type=int, default=1000)
    parser.add_argument("--k", default="10,32,100", help="comma-separated K of the top-k targets")
    parser.add_argument("--draws", type=int, default=50, help="N of the sampled target")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    rows, outputs = args.rows, args.outputs
    labels = torch.randint(0, outputs, (rows,), generator=generator)
    teacher = torch.randn(rows, outputs, generator=generator) * 2
    teacher[torch.arange(rows), labels] += 8.0  # a confident teacher: most mass on the label
    student = (torch.randn(rows, outputs, generator=generator) * 2).requires_grad_(True)
    lse = torch.stack([torch.logsumexp(teacher / t, -1) for t in TEMPERATURES], -1)
    ids, counts, log_p = sampled_target(teacher, args.draws, generator)
    teacher, labels, lse, ids, counts, log_p = (x.to(device) for x in (teacher, labels, lse, ids, counts, log_p))
    student = student.detach().to(device).requires_grad_(True)

    kd = dict(temperature=4.0, alpha=0.5)
    cnt = dict(phi=0.5, psi=0.3, margin=1.0)
    cases: list[tuple[str, str, Callable]] = [
        ("Vanilla KD", "dense", lambda s: vanilla_kd_loss(s, teacher, labels, **kd)),
    ]
    topk = {k: [x.to(device) for x in teacher.cpu().topk(k, dim=-1)] for k in map(int, args.k.split(","))}
    for k, (values, indices) in topk.items():
        cases.append(("Vanilla KD", f"top-{k}, tail bucket", lambda s, v=values, i=indices:
                      topk_kd_loss(s, v, i, lse, labels, temperatures=TEMPERATURES, **kd)))
    for k, (values, indices) in topk.items():
        cases.append(("Vanilla KD", f"top-{k}, renormalised", lambda s, v=values, i=indices:
                      topk_kd_loss(s, v, i, lse, labels, temperatures=TEMPERATURES, tail="renormalised", **kd)))
    cases.append(("RS-KD (T = 1)", f"sampled N = {args.draws}, T_s = 1", lambda s:
                  sampled_kd_loss(s, ids, counts, log_p, labels, alpha=0.5)))
    cases.append(("RS-KD (T = 1)", f"sampled N = {args.draws}, T_s = 2 weights", lambda s:
                  sampled_kd_loss(s, ids, counts, log_p, labels, alpha=0.5, sample_temperature=2.0)))
    cases.append(("Continuation-KD", "dense", lambda s: continuation_kd_loss(s, teacher, labels, **cnt)))
    for k, (values, indices) in topk.items():
        cases.append(("Continuation-KD", f"top-{k}", lambda s, v=values, i=indices:
                      topk_continuation_kd_loss(s, v, i, labels, **cnt)))

    # each case's dense sibling: the dense row of its family (RS-KD's: Vanilla KD)
    dense_of = {loss: i for i, (loss, target, _) in enumerate(cases) if target == "dense"}
    siblings = [dense_of.get(loss, 0) for loss, _, _ in cases]
    print(f"B = {rows}, C = {outputs}, float32, {args.device}, {args.threads} thread(s); "
          f"median of {args.repeats} rounds of {args.steps} steps per case")
    print("| loss | target | ms / step (fwd + bwd) | x dense Vanilla KD | x its dense sibling |")
    print("|---|---|---|---|---|")
    results = measure([fn for *_, fn in cases], siblings, student, args.steps, args.repeats)
    for (loss, target, _), (ms, ratio, sibling) in zip(cases, results):
        print(f"| {loss} | {target} | {ms:.2f} | {ratio:.2f} | {sibling:.2f} |")

if __name__ == "__main__":
    main()

"""Peak memory of the token-level loss at a 4k and a 64k vocabulary, top-32 targets (issue 22's goal: independent of
V at fixed K).

    python benchmarks/bench_lm_loss_memory.py [--vocab 4096,65536] [--batch 8] [--seq-len 512] [--hidden 256]

Each case runs in a fresh process: the student's final hidden states [B, S, H] (a leaf), an output projection
H -> V, top-32 targets with their log-sum-exp and the next-token ids are made first, with the gradients' buffers
already allocated, and nothing V-sized made on the way; then one forward and backward pass of Vanilla KD's top-k
loss (tail bucket, T = 1, alpha 0.5) through `kdcache.methods.tokens.chunked_loss`. The figure is the rise of the
process's peak resident memory (`ru_maxrss`) over that pass: what the loss itself needs beyond the model and the
batch. Chunkings: the default (2**24 logits a chunk, `chunk_positions`), a fixed 1,024 positions (the default
before this measurement) and no chunking (the whole batch's logits at once). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

CASES = {"default (2^24 / V positions)": None, "1,024 positions": 1024, "unchunked": 0}


def one(vocab: int, chunk: int | None, batch: int, seq_len: int, hidden: int, k: int = 32) -> dict:
    """The loss's peak memory rise in this process, in MiB, and the positions per chunk."""
    import torch

    from kdcache.methods import sparse_losses, tokens
    from kdcache.methods.targets import TopKTarget

    torch.manual_seed(0)
    rows = batch * seq_len
    head = torch.nn.Linear(hidden, vocab, bias=False)
    states = torch.randn(batch, seq_len, hidden, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, seq_len))
    values = torch.sort(torch.randn(batch, seq_len, k) * 3, dim=-1, descending=True)[0]
    target = TopKTarget(values, torch.randint(0, vocab, (batch, seq_len, k)), values[..., 0] + 2.0, (1.0,))
    output = tokens.TokenOutput(states, head, ids, torch.full((batch,), seq_len))
    labels = torch.full((batch,), -1)
    head.weight.grad, states.grad = torch.zeros_like(head.weight), torch.zeros_like(states)

    def row_loss(z, t, y, m):
        return sparse_losses.topk_kd_loss(z, t.values, t.indices, t.logsumexp, y, temperature=1.0,
                                          temperatures=t.temperatures, alpha=0.5, mask=m)

    positions = rows if chunk == 0 else tokens.chunk_positions(vocab, chunk)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens.chunked_loss(output, target, labels, row_loss, chunk=positions).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mib": (after - before) / 1024, "positions": positions, "chunks": -(-rows // positions),
            "weights_mib": 2 * vocab * hidden * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="4096,65536")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "vocab,chunk": run one case here, print JSON
    args = parser.parse_args()
    if args.one:
        vocab, chunk = args.one.split(",")
        print(json.dumps(one(int(vocab), None if chunk == "none" else int(chunk), args.batch, args.seq_len,
                             args.hidden)))
        return
    vocabs = [int(v) for v in args.vocab.split(",")]
    print(f"B = {args.batch}, S = {args.seq_len} ({args.batch * args.seq_len:,} positions), H = {args.hidden}, "
          "top-32 targets; the loss's peak memory rise (MiB), positions per chunk in brackets\n")
    print("| chunking | " + " | ".join(f"V = {v:,}" for v in vocabs) + " |")
    print("|---|" + "---|" * len(vocabs))
    for name, chunk in CASES.items():
        cells = []
        for vocab in vocabs:
            done = subprocess.run([sys.executable, __file__, "--one", f"{vocab},{'none' if chunk is None else chunk}",
                                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--hidden",
                                   str(args.hidden)], capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            cells.append(f"{r['mib']:,.0f} ({r['positions']:,} x {r['chunks']})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nNot counted: the output projection and its gradient, "
          + ", ".join(f"{2 * v * args.hidden * 4 / 2**20:,.0f} MiB at V = {v:,}" for v in vocabs)
          + " (the model's, allocated before the pass).")


if __name__ == "__main__":
    main()

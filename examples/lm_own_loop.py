"""A plain PyTorch loop distilling a causal-LM student from a language-model cache: `with_targets` and a method
object, the per-token loss computed a chunk of positions at a time, as `kdcache distill` computes it.

    kdcache cache-teacher --task lm --teacher runs/gpt/model --data shakespeare --split train --split validation \
        --seq-len 128 --topk 32 --out shakespeare.kdcache
    python examples/lm_own_loop.py shakespeare.kdcache --epochs 2

The windows are the user's own token ids (here read back from the cache: row r of a split is window r of its token
stream); `with_targets` checks each against the cached fingerprint and adds its teacher's targets per position.
"""
import argparse
import math

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kdcache
from kdcache.methods import get
from kdcache.methods.tokens import perplexity_sums, token_output
from kdcache.torch import with_targets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("cache")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--method", default="vanilla")
parser.add_argument("--batch-size", type=int, default=16)
args = parser.parse_args()
torch.manual_seed(0)
tokens = kdcache.Cache(args.cache).header.tokens  # S, the model width, the tokenizer's hash


def windows(split):
    """The split's windows as a user holds them: unpadded token ids, in the split's order."""
    cache = kdcache.open_cache(args.cache, split)
    ids, lengths = cache.read("input_ids"), cache.read("lengths")
    return [{"input_ids": ids[r, :lengths[r]].astype("int64")} for r in range(len(ids))]


def model_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


train = with_targets(windows("train"), args.cache, "train")  # each window checked against the cache
loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=train.collate)
method = get(args.method, preset="lm", epochs=args.epochs, cache=train.cache, steps_per_epoch=len(loader))
model = GPT2LMHeadModel(GPT2Config(vocab_size=tokens.outputs, n_positions=tokens.seq_len, n_embd=32, n_layer=1,
                                   n_head=2))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
step = 0
for epoch in range(1, args.epochs + 1):
    model.train()
    method.start_epoch(epoch, model)
    for batch in loader:
        output = token_output(model, model_inputs(batch))  # final hidden states and lm_head: logits per chunk
        loss = method.loss(output, batch, batch["teacher_next_token"], epoch=epoch, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    print(f"epoch {epoch} loss {loss.item():.4f} {method.values(epoch)}")
val = with_targets(windows("validation"), args.cache, "validation")
model.eval()
total, count = 0.0, 0
with torch.no_grad():
    for batch in torch.utils.data.DataLoader(val, batch_size=args.batch_size, collate_fn=val.collate):
        ce, n, _ = perplexity_sums(token_output(model, model_inputs(batch)), batch["teacher_next_token"], None)
        total, count = total + ce, count + n
print(f"validation perplexity {math.exp(total / max(count, 1)):.4f}")

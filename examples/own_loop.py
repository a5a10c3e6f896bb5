"""A plain PyTorch loop distilling from a kdcache cache: `with_targets` and a method object, no kdcache loop.

    kdcache cache-teacher --teacher TEACHER --task digits --splits train,validation --out digits.kdcache
    python examples/own_loop.py digits.kdcache --epochs 10

The digits are read as a user would (scikit-learn's bundled copy) and joined to the cache by its sample index.
"""
import argparse

import torch
from sklearn.datasets import load_digits

import kdcache
from kdcache.methods import get
from kdcache.torch import with_targets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("cache")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--method", default="continuation")
args = parser.parse_args()
torch.manual_seed(0)
digits = load_digits()


def rows(split):
    """The bundled digits a cache split holds, each with its sample index (the cache's `index` column)."""
    held = kdcache.open_cache(args.cache, split).read("index")
    return [{"image": digits.images[i].astype("uint8"), "label": int(digits.target[i]), "sample": int(i)} for i in held]


train = with_targets(rows("train"), args.cache, "train", index="sample")  # each row checked against the cache
loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, collate_fn=train.collate, num_workers=2)
method = get(args.method, preset="small", epochs=args.epochs, cache=train.cache, steps_per_epoch=len(loader))
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
step = 0
for epoch in range(1, args.epochs + 1):
    method.start_epoch(epoch, model)
    for batch in loader:
        loss = method.loss(model(batch["image"] / 16.0), batch, batch["labels"], epoch=epoch, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    print(f"epoch {epoch} loss {loss.item():.4f} {method.values(epoch)}")
val = with_targets(rows("validation"), args.cache, "validation", index="sample")
batch = val.collate([val[i] for i in range(len(val))])
with torch.no_grad():
    accuracy = (model(batch["image"] / 16.0).argmax(1) == batch["labels"]).float().mean().item()
print(f"validation accuracy {accuracy:.4f}")

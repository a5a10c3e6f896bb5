"""A plain PyTorch loop on a views cache: each epoch the student trains on the teacher's cached augmented views,
replayed exactly, against the teacher's targets on those very views (what `kdcache distill` does on such a cache).

    kdcache cache-teacher --teacher resnet56 --weights teacher.pt --task cifar10 --views 4 --augment cifar \
        --splits train,test --out cifar.kdcache
    python examples/views_own_loop.py cifar.kdcache --epochs 4

The images are the user's own uint8 images in the split's order (here read with kdcache's loader from the data the
cache recorded); `with_targets` checks each against the cache, replaces it with the view of the epoch set by
`set_epoch` (normalised as the teacher saw it) and adds that view's targets and `teacher_view`.
"""
import argparse

import torch

import kdcache
from kdcache.data import load_split, recorded_options
from kdcache.methods import get
from kdcache.models import resnet8
from kdcache.torch import with_targets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("cache")
parser.add_argument("--epochs", type=int, default=4)
parser.add_argument("--method", default="vanilla")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--eval-split", default="test")
args = parser.parse_args()
torch.manual_seed(0)
cache = kdcache.Cache(args.cache)


def rows(split):
    """The split's images as a user holds them: uint8, in the split's order, with their labels."""
    recorded = cache.split(split).split_attrs["dataset"]
    data = load_split(cache.header.task.name, recorded["source"], split,
                      options=recorded_options(recorded, cache.header.task.to_attrs()))
    return [{"image": data.dataset[i]["inputs"], "label": int(data.dataset[i]["label"])} for i in range(len(data))]


train = with_targets(rows("train"), args.cache, "train")  # view_order="cycle": view (epoch + 1) mod V
loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=train.collate,
                                     num_workers=2, persistent_workers=True)
method = get(args.method, preset="cifar", epochs=args.epochs, cache=train.cache, steps_per_epoch=len(loader))
model = resnet8(train.cache.num_outputs)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
step = 0
for epoch in range(1, args.epochs + 1):
    train.set_epoch(epoch - 1)  # counted from 0, as a DistributedSampler counts
    model.train()
    method.start_epoch(epoch, model)
    for batch in loader:
        loss = method.loss(model(batch["image"]), batch, batch["labels"], epoch=epoch, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    print(f"epoch {epoch} view {sorted(set(batch['teacher_view'].tolist()))} loss {loss.item():.4f}")
val = with_targets(rows(args.eval_split), args.cache, args.eval_split, view_order="plain")  # plain, normalised
batch = val.collate([val[i] for i in range(len(val))])
model.eval()
with torch.no_grad():
    accuracy = (model(batch["image"]).argmax(1) == batch["labels"]).float().mean().item()
print(f"validation accuracy {accuracy:.4f}")

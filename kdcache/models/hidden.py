"""Hidden representations of a model, pooled to one vector per sample, and the fixed random projections of them
that curriculum extraction trains students on (Gupta & Karmalkar; docs/methods.md).

Layers are named the same way for teachers (`cache-teacher --hidden-layers`) and students (`distill --method
curriculum`): a number counts the model's layers from 1 (shallow) to `count_layers(model)` (deep), a dotted
name picks any submodule (`model.get_submodule`). Numbered layers per family:

- Hugging Face encoders: layer l is `hidden_states[l]` of `output_hidden_states=True` (0 = the embeddings),
  pooled as its first token ([CLS] for BERT, <s> for RoBERTa);
- kdcache CIFAR ResNets: the residual blocks in order, pooled by global average pooling;
- kdcache MLPs (and any `nn.Sequential`): the outputs of its activation modules (ReLU, GELU, Tanh) in order.

Pooling of a submodule's output: [B, C, H, W] -> spatial mean, [B, L, H] -> first token, [B, H] as is.

A causal language model's layers are not pooled (`LayerTap(..., tokens=True)`): every position keeps its own
[B, S, H] state, projected per position to [B, S, D] with the same matrix rule (issue 22; docs/methods.md).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdcache.errors import KDCacheError

Layer = int | str
#: How a cache records, in words, the projection matrices and the pooling (its `hidden_projections` attribute).
MATRIX_RULE = ("float32 [width, dim] = standard_normal / sqrt(dim) from numpy default_rng(SeedSequence([seed, first 8 "
               "bytes of sha256(str(layer)) as a little-endian integer])): kdcache.models.hidden.projection_matrix")
POOLING_RULE = ("Hugging Face layer l: first token of hidden_states[l]; [B,C,H,W]: spatial mean; [B,L,H]: first token; "
                "[B,H]: as is (kdcache.models.hidden)")
#: The rule of a language-model cache's projections, in place of POOLING_RULE.
TOKEN_RULE = ("none: per token; Hugging Face layer l: hidden_states[l] at every position [B, S, H] (a named "
              "submodule: its [B, S, H] output), times the matrix, [B, S, D]; positions past a window's length hold 0 "
              "(kdcache.models.hidden)")
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU)


def parse_layers(spec: str | Sequence[Layer] | None) -> list[Layer]:
    """`2,4,6` or `layers.0,layers.2` (or a list) as layer keys: numbers as int, module names as str."""
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Layer] = []
    for item in items:
        text = str(item).strip()
        if not text:
            raise KDCacheError(f"--hidden-layers {spec!r}: empty layer name")
        key: Layer = int(text) if text.lstrip("-").isdigit() else text
        if isinstance(key, int) and key < 0:
            raise KDCacheError(f"--hidden-layers {spec!r}: layer numbers count from 0 (embeddings) or 1")
        if key in out:
            raise KDCacheError(f"--hidden-layers {spec!r}: layer {key} given twice")
        out.append(key)
    return out


def array_name(layer: Layer) -> str:
    """The cache array holding the projection of `layer` (per split)."""
    return f"hidden_{layer}"


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "num_hidden_layers")


def numbered_layers(model: nn.Module) -> list[nn.Module] | None:
    """The modules behind layer numbers 1..L of a non-Hugging-Face model, or None when it has no numbering."""
    from kdcache.models.builders import CifarResNet

    if isinstance(model, CifarResNet):
        return list(model.layers)
    if isinstance(model, nn.Sequential):
        return [m for m in model if isinstance(m, _ACTIVATIONS)]
    return None


def count_layers(model: nn.Module) -> int | None:
    """How many numbered layers `model` has (None: name its submodules instead)."""
    if _is_hf(model):
        return int(model.config.num_hidden_layers)
    layers = numbered_layers(model)
    return None if layers is None else len(layers)


def pool(output: Any, where: str = "layer") -> torch.Tensor:
    """One vector per sample from a layer's output (see the module docstring); `where` names it in errors."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, torch.Tensor):
        raise KDCacheError(f"{where}: output of type {type(output).__name__} cannot be pooled to one vector per sample")
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output[:, 0]
    if output.ndim == 2:
        return output
    return output.flatten(1)


def per_token(output: Any, where: str = "layer") -> torch.Tensor:
    """A layer's output at every position, [B, S, H], unpooled (a causal language model's layers)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if hasattr(output, "last_hidden_state"):
        output = output.last_hidden_state
    if not isinstance(output, torch.Tensor) or output.ndim != 3:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise KDCacheError(f"{where}: output {shape} is not [batch, positions, width], so it has no state per token")
    return output


class LayerTap:
    """Calls a model and returns its logits together with pooled outputs of chosen layers (gradients kept).

    Used at caching time on the teacher (under inference_mode) and at training time on the student. `tokens`: keep
    every position ([B, S, H], a causal language model's layers) instead of pooling. `head=False`: a Hugging Face
    model runs its body alone (`base_model`: no [B, S, V] logits a layer's fit does not use), and the first value
    returned is its last hidden state.
    """

    def __init__(self, model: nn.Module, layers: Sequence[Layer], *, what: str, tokens: bool = False,
                 head: bool = True) -> None:
        self.model, self.layers, self.what, self.tokens = model, list(layers), what, tokens
        self.hf = _is_hf(model)
        self._hooks, self._seen, self._hooked = [], {}, {}
        body = getattr(model, "base_model", None) if self.hf and not head else None
        self.runner = body if isinstance(body, nn.Module) else model
        count = count_layers(model)
        numbered = None if self.hf else numbered_layers(model)
        for key in self.layers:
            if isinstance(key, int):
                if count is None:
                    raise KDCacheError(f"{what} ({type(model).__name__}) has no numbered layers; name its submodules "
                                       "instead (e.g. --hidden-layers layer1,layer2)")
                low = 0 if self.hf else 1
                if not low <= key <= count:
                    raise KDCacheError(f"{what} has layers {low}..{count}; layer {key} does not exist")
                if self.hf:
                    continue
                module = numbered[key - 1]
            else:
                try:
                    module = model.get_submodule(key)
                except AttributeError:
                    raise KDCacheError(f"{what} ({type(model).__name__}) has no submodule {key!r}") from None
            self._hooked[key] = module
            self._hooks.append(module.register_forward_hook(self._keep(key)))

    def _keep(self, key: Layer):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._seen[key] = output
        return hook

    def __call__(self, inputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._seen = {}
        wants_states = self.hf and any(isinstance(k, int) for k in self.layers)
        if isinstance(inputs, dict):
            out = self.runner(**inputs, **({"output_hidden_states": True} if wants_states else {}))
        else:
            out = self.runner(inputs)
        logits = out.logits if hasattr(out, "logits") else out[0] if self.runner is not self.model else out
        pooled, reduce = [], per_token if self.tokens else pool
        for key in self.layers:
            where = f"{self.what}, layer {key}"
            if self.hf and isinstance(key, int):
                pooled.append(reduce(out.hidden_states[key], where))
            elif key not in self._seen:
                raise KDCacheError(f"{where}: the module did not run in the forward pass, so it has no output to use")
            else:
                pooled.append(reduce(self._seen[key], where))
        self._seen = {}
        return logits, pooled

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def layer_seed(seed: int, layer: Layer) -> np.random.SeedSequence:
    """The seed of one layer's projection: the user's seed and the layer's name, so a layer's matrix does not
    depend on which other layers were projected with it."""
    tag = int.from_bytes(hashlib.sha256(str(layer).encode()).digest()[:8], "little")
    return np.random.SeedSequence([int(seed), tag])


def projection_matrix(seed: int, layer: Layer, width: int, dim: int) -> np.ndarray:
    """The fixed [width, dim] Gaussian projection of `layer`: entries N(0, 1/dim), so norms are kept on average
    (Johnson-Lindenstrauss); regenerate it from the seed recorded in the cache."""
    rng = np.random.default_rng(layer_seed(seed, layer))
    return (rng.standard_normal((width, dim)) / np.sqrt(dim)).astype(np.float32)


__all__ = ["LayerTap", "TOKEN_RULE", "array_name", "count_layers", "layer_seed", "numbered_layers", "parse_layers",
           "per_token", "pool",
           "projection_matrix"]

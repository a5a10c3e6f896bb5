"""Loads a teacher from any of the forms users keep them in, and fingerprints its weights.

Accepted: a Hugging Face sequence-classification folder (config.json), a kdcache model folder
(kdcache-model.json, written by `kdcache train`/`distill` and the demo), or an architecture name
(kdcache CIFAR ResNet, torchvision model, `package.module:factory`) plus a state-dict file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.runtime import save_torch

MODEL_DIR_FILE = "kdcache-model.json"
#: Written beside a model by `train --save-every` and `distill` (best/): its epoch and validation metric.
CHECKPOINT_FILE = "kdcache-checkpoint.json"
HF_CONFIG_FILE = "config.json"


@dataclass
class Teacher:
    """A loaded teacher in eval mode, plus what the cache records about it."""

    model: nn.Module
    spec: str
    source: str  # huggingface | kdcache | architecture
    sha256: str
    num_outputs: int | None  # None until the first forward pass for bare architectures
    label_names: list[str] | None
    tokenizer: Any | None = None
    weights: str | None = None

    def __call__(self, inputs: Any) -> torch.Tensor:
        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        return out.logits if hasattr(out, "logits") else out

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "source": self.source,
            "weights_file": self.weights,
            "sha256": self.sha256,
            "num_outputs": self.num_outputs,
            "label_names": self.label_names,
            "class": type(self.model).__name__,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): the teacher's identity in a cache."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_dict_file(model: nn.Module, file: str | Path, *, what: str) -> None:
    """Load a state dict strictly, with a one-line account of any missing, unexpected or mis-shaped weights."""
    file = Path(file)
    if not file.is_file():
        raise KDCacheError(f"{file}: no such weights file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for unreadable files
        raise KDCacheError(f"{file}: not a readable PyTorch state dict ({type(exc).__name__})") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise KDCacheError(f"{file}: expected a state dict (a mapping of tensor names), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch (file vs model): {', '.join(mismatched[:3])}")
    if missing:
        problems.append(f"missing {len(missing)} key(s), e.g. {missing[0]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[0]}")
    if problems:
        raise KDCacheError(f"{file}: weights do not fit {what}: {'; '.join(problems)}")
    model.load_state_dict(state)


def save_model_dir(
    model: nn.Module, directory: str | Path, *, architecture: str, num_classes: int, label_names: list[str] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> Path:
    """Save a non-Hugging-Face model so that `load_teacher(directory)` rebuilds it without flags."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_torch(model.state_dict(), directory / "model.pt")
    meta = {
        "architecture": architecture,
        "num_classes": num_classes,
        "kwargs": kwargs or {},
        "label_names": label_names,
        "weights": "model.pt",
    }
    (directory / MODEL_DIR_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _build(architecture: str, num_classes: int, kwargs: dict[str, Any], trust_model_code: bool) -> nn.Module:
    from kdcache.models.builders import build_model

    return build_model(architecture, num_classes, trust_model_code=trust_model_code, **kwargs)


def check_model_dir_code(directory: Path, architecture: str, trust_model_code: bool) -> None:
    """A model folder may name only registered architectures unless its Python code is trusted explicitly: a
    folder is data, and data must never run code by being loaded."""
    from kdcache.models.builders import TRUST_HINT

    if ":" in str(architecture) and not trust_model_code:
        raise KDCacheError(f"{directory / MODEL_DIR_FILE}: architecture {architecture!r} is Python code "
                           f"(module:factory), not a registered architecture; {TRUST_HINT}")


def _load_hf(directory: Path, tokenizer: str | None, trust_model_code: bool = False,
             causal_lm: bool = False) -> Teacher:
    from kdcache.models.hf import load_causal_lm, load_classifier, load_tokenizer

    if causal_lm:
        model, missing = load_causal_lm(directory, trust_model_code=trust_model_code), []
    else:
        model, missing = load_classifier(directory, trust_model_code=trust_model_code,
                                         what="sequence-classification model")
    if missing:
        raise KDCacheError(f"{directory}: the teacher's weights lack {len(missing)} tensors ({', '.join(missing[:3])}"
                           f"{', ...' if len(missing) > 3 else ''}), which would be random; a teacher must be trained")
    tok_dir = Path(tokenizer) if tokenizer else directory
    tok = None
    if any((tok_dir / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json")):
        tok = load_tokenizer(tok_dir, trust_model_code=trust_model_code)
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)] if id2label else None
    if names and all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = None  # transformers' placeholder names carry no information
    if causal_lm:  # the width is the head's, measured by the first forward pass; there are no label names
        return Teacher(model, str(directory), "huggingface", weights_sha256(model), None, None, tok)
    return Teacher(model, str(directory), "huggingface", weights_sha256(model), int(model.config.num_labels), names, tok)


def read_model_dir(directory: Path, trust_model_code: bool) -> dict[str, Any]:
    """A kdcache model folder's description (architecture, num_classes, kwargs, weights, label_names), refused in
    one line when unreadable or when it names Python code that is not trusted."""
    try:
        meta = json.loads((directory / MODEL_DIR_FILE).read_text())
        meta["architecture"], meta["num_classes"] = str(meta["architecture"]), int(meta["num_classes"])
        meta["kwargs"] = meta.get("kwargs") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KDCacheError(f"{directory / MODEL_DIR_FILE}: unreadable model description ({exc})") from exc
    check_model_dir_code(directory, meta["architecture"], trust_model_code)
    return meta


def _load_model_dir(directory: Path, trust_model_code: bool) -> Teacher:
    meta = read_model_dir(directory, trust_model_code)
    architecture, num_classes = meta["architecture"], meta["num_classes"]
    model = _build(architecture, num_classes, meta["kwargs"], trust_model_code)
    load_state_dict_file(model, directory / meta.get("weights", "model.pt"), what=f"architecture {architecture}")
    return Teacher(model, str(directory), "kdcache", weights_sha256(model), num_classes, meta.get("label_names"))


def load_teacher(
    spec: str, *, weights: str | Path | None = None, num_outputs: int | None = None, tokenizer: str | None = None,
    trust_model_code: bool = False, causal_lm: bool = False,
) -> Teacher:
    """Resolve a teacher spec to a model in eval mode; `num_outputs` sizes the head of bare architectures.
    `trust_model_code` lets a `module:factory` architecture (named here or in a model folder) import and run.
    `causal_lm` (--task lm): the teacher must be a Hugging Face causal language model folder."""
    path = Path(spec)
    if causal_lm and not (path.is_dir() and (path / HF_CONFIG_FILE).is_file()):
        raise KDCacheError(f"{spec}: --task lm needs a Hugging Face causal language model folder (config.json, "
                           "weights, tokenizer) as --teacher")
    if path.is_dir():
        if (path / HF_CONFIG_FILE).is_file():
            teacher = _load_hf(path, tokenizer, trust_model_code, causal_lm)
        elif (path / MODEL_DIR_FILE).is_file():
            teacher = _load_model_dir(path, trust_model_code)
        else:
            raise KDCacheError(f"{path}: not a model folder (no {HF_CONFIG_FILE} or {MODEL_DIR_FILE})")
    elif path.exists():
        raise KDCacheError(f"{spec}: is a file; --teacher takes a model folder or an architecture name "
                           "(a state dict goes in --weights)")
    elif "/" in spec or spec.startswith("."):
        raise KDCacheError(f"{spec}: no such teacher folder")
    else:
        if weights is None:
            raise KDCacheError(f"teacher {spec!r} is an architecture name: pass --weights FILE with its trained state dict")
        model = _build(spec, num_outputs or 1, {}, trust_model_code)
        load_state_dict_file(model, weights, what=f"architecture {spec} with {num_outputs} outputs")
        teacher = Teacher(model, spec, "architecture", weights_sha256(model), None, None, weights=str(weights))
    if tokenizer and teacher.tokenizer is None:
        from kdcache.models.hf import load_tokenizer

        teacher.tokenizer = load_tokenizer(tokenizer, trust_model_code=trust_model_code)
    teacher.model.eval()
    return teacher


def probe_teacher(teacher: Teacher, tap: Any, inputs: Any, where: str, tokens: bool = False) -> tuple[int, list[int]]:
    """One forward pass on a couple of rows (`inputs`, already on the device and under the caller's autocast):
    proves the teacher runs on this data and measures its output width (and, through a LayerTap `tap`, the widths
    of the pooled hidden layers to project)."""
    try:
        with torch.inference_mode():
            logits, pooled = tap(inputs) if tap is not None else (teacher(inputs), [])
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - any model error on this input is a user-facing mismatch
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KDCacheError(f"teacher {teacher.spec} cannot run on {where}: {message}") from exc
    expected = 3 if tokens else 2
    if logits.ndim != expected:
        raise KDCacheError(f"teacher {teacher.spec} returned shape {tuple(logits.shape)}; expected "
                           f"{'[batch, positions, outputs]' if tokens else '[batch, outputs]'}")
    return int(logits.shape[-1]), [int(p.shape[-1]) for p in pooled]  # (a per-token state is [B, S, H])


def check_teacher_spec(spec: str, modality: str, tokenizer: str | None) -> None:
    """A teacher that is not a folder must be an architecture name; say so before the data is read."""
    if "/" in spec or spec.startswith(".") or Path(spec).exists():
        load_teacher(spec)  # raises the precise error: no such folder, or a file where a folder belongs
    if modality == "text" and tokenizer is None:
        raise KDCacheError(f"{spec}: no such teacher folder; a text task needs a Hugging Face model folder "
                           "(or an architecture name with --weights and --tokenizer DIR)")


def standalone_tokenizer(name: str | None, trust_model_code: bool = False) -> Any:
    """The `--tokenizer` folder of an architecture-name teacher (which has none of its own)."""
    if name is None:
        return None
    from kdcache.models.hf import load_tokenizer

    return load_tokenizer(name, trust_model_code=trust_model_code)

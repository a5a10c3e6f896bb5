"""Builds the student (or, for `kdcache train`, the model trained from scratch) and saves it where a teacher loads.

Accepted specs: a Hugging Face model folder (its classifier head kept when it already has the task's width,
a fresh head when the folder is a bare encoder such as all-MiniLM-L6-v2), a Hugging Face config file
(`*.json`, e.g. a 4-layer BERT, randomly initialised), a kdcache model folder (what `distill` and `train`
save), or an architecture name (`resnet8`, `mlp`, a torchvision name, `package.module:factory`). Saved
students are teacher folders, so teacher -> assistant -> student (TAKD) is two caches and two distills.

A Hugging Face folder may be truncated to its first N transformer layers (`--student-layers N`,
`truncate_layers`): the pre-trained, shallower students of DistilBERT / BERT-small style, initialised from a
deeper encoder's lower layers instead of at random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import KDCacheError
from kdcache.models.teachers import (HF_CONFIG_FILE, MODEL_DIR_FILE, load_state_dict_file, read_model_dir,
                                     save_model_dir)


@dataclass
class Student:
    """A trainable model plus what it takes to save it as a folder that `load_teacher` reads back."""

    model: nn.Module
    spec: str
    source: str  # huggingface | kdcache | architecture
    architecture: str | None = None  # for non-HF models: the build_model name
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __call__(self, inputs: Any) -> torch.Tensor:
        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        return out.logits if hasattr(out, "logits") else out

    @property
    def is_huggingface(self) -> bool:
        return self.source == "huggingface"

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def student_family(spec: str) -> str | None:
    """What kind of model a student spec names, for `--preset auto` (an MLP and a ResNet on the same images want
    different optimisers): pretrained (a Hugging Face folder), transformer (a Hugging Face config file: random
    weights), mlp, cnn (the other architecture names); None when it cannot tell (a `module:factory`)."""
    path = Path(spec)
    if path.is_dir() and (path / HF_CONFIG_FILE).is_file():
        return "pretrained"
    if path.suffix == ".json":
        return "transformer"
    if path.is_dir() and (path / MODEL_DIR_FILE).is_file():
        try:
            spec = str(json.loads((path / MODEL_DIR_FILE).read_text()).get("architecture", ""))
        except (OSError, ValueError, AttributeError):
            return None
    if ":" in spec or not spec:
        return None
    return "mlp" if spec.lower().startswith("mlp") else "cnn"


def build_student(spec: str, num_outputs: int, *, kwargs: dict[str, Any] | None = None, tokenizer: Any = None,
                  seed: int = 0, trust_model_code: bool = False, sample: Any = None,
                  layers: int | None = None, causal: bool = False) -> Student:
    """A freshly initialised (seeded) or loaded student with `num_outputs` outputs, or a one-line error saying why not;
    `trust_model_code` lets a `module:factory` architecture import and run (see kdcache.models.build_model).
    `sample` (one batch of model input) sizes an architecture to the data and refuses a text model on tensors.
    `layers` keeps only the first N transformer layers of a pre-trained Hugging Face folder (`truncate_layers`).
    `causal`: a causal language model of `num_outputs` tokens (a token-level cache's student, `causal_lm_student`)."""
    kwargs = dict(kwargs or {})
    check_student_layers(spec, layers, trust_model_code)
    torch.manual_seed(seed)
    if causal:
        return causal_lm_student(spec, num_outputs, seed=seed, layers=layers, trust_model_code=trust_model_code,
                                 tokenizer=tokenizer)
    path = Path(spec)
    if path.is_dir() and (path / HF_CONFIG_FILE).is_file():
        student = _hf_folder(path, num_outputs, layers, trust_model_code)
    elif path.is_file() and path.suffix == ".json":
        student = _hf_config_file(path, num_outputs, tokenizer)
    elif path.is_dir() and (path / MODEL_DIR_FILE).is_file():
        student = _kdcache_folder(path, num_outputs, trust_model_code)
    elif path.is_dir():
        raise KDCacheError(f"{path}: not a model folder (no {HF_CONFIG_FILE} or {MODEL_DIR_FILE})")
    elif "/" in spec or spec.startswith(".") or spec.endswith(".json"):
        raise KDCacheError(f"{spec}: no such student folder or config file")
    else:
        from kdcache.models.builders import build_model, data_kwargs

        kwargs = data_kwargs(spec, kwargs, sample)
        model = build_model(spec, num_outputs, trust_model_code=trust_model_code, **kwargs)
        student = Student(model, spec, "architecture", spec, kwargs)
    if student.is_huggingface and sample is not None and not isinstance(sample, dict):
        raise KDCacheError(f"student {spec} is a Hugging Face text model, but this task's rows are "
                           f"{'images' if sample.dim() == 4 else 'feature vectors'}; use an architecture name "
                           "(resnet8, mlp, a torchvision model) or a kdcache model folder")
    if tokenizer is not None and student.is_huggingface:
        vocab = getattr(student.model.config, "vocab_size", None)
        if vocab is not None and vocab < len(tokenizer):
            raise KDCacheError(f"student {spec}: vocabulary of {vocab} tokens is smaller than the cache's tokenizer "
                               f"({len(tokenizer)}); the student must read the teacher's token ids")
    return student


def causal_lm_student(spec: str, outputs: int, *, seed: int = 0, layers: int | None = None,
                      trust_model_code: bool = False, tokenizer: Any = None) -> Student:
    """A causal-LM student of a token-level cache: a Hugging Face config JSON (random, seeded weights; `vocab_size`
    defaults to the cache's output width) or a pre-trained causal-LM folder (`layers`: its first N layers). A
    student whose vocabulary differs from the teacher's output width is refused in one line: it would read the
    cache's token ids as other tokens. A config's special ids default to the cache's `tokenizer`'s."""
    from kdcache.models.hf import CONFIG_LIMIT, causal_lm_from_config, load_causal_lm, special_token_ids

    path = Path(spec)
    if path.is_dir() and (path / HF_CONFIG_FILE).is_file():
        model = load_causal_lm(path, trust_model_code=trust_model_code)
        if layers is not None:
            truncate_layers(model, layers, str(path))
    elif path.is_file() and path.suffix == ".json":
        try:
            given = (json.loads(path.read_text(encoding="utf-8")).get("vocab_size")
                     if path.stat().st_size <= CONFIG_LIMIT else None)
        except (OSError, ValueError, AttributeError):
            given = None  # causal_lm_from_config says what is wrong with the file
        if given is not None and given != outputs:
            raise KDCacheError(f"student {spec}: vocab_size {given} differs from the cache's teacher, whose model "
                               f"width is {outputs}; the student must read the teacher's token ids (leave vocab_size "
                               "out to take the cache's)")
        model = causal_lm_from_config(path, outputs, seed=seed,
                                      special=special_token_ids(tokenizer) if tokenizer is not None else None)
    else:
        raise KDCacheError(f"student {spec}: a language-model cache needs a causal-LM student: a Hugging Face config "
                           "JSON (gpt2, llama, ...) or a causal-LM model folder")
    head = model.get_output_embeddings()
    width = getattr(head, "out_features", None) or getattr(model.config, "vocab_size", None)
    if width != outputs:
        raise KDCacheError(f"student {spec}: vocabulary of {width} tokens differs from the cache's teacher, whose "
                           f"model width is {outputs}; the student must read the teacher's token ids")
    return Student(model, str(path), "huggingface")


def check_student_layers(spec: str, layers: int | None, trust_model_code: bool = False) -> None:
    """`--student-layers N` keeps layers of a pre-trained Hugging Face folder, so anything else, or an N outside
    1..its depth, is one line before any data is read (its config alone is read, not its weights)."""
    if layers is None:
        return
    if layers < 1:
        raise KDCacheError(f"--student-layers must be at least 1, got {layers}")
    path = Path(spec)
    if not (path.is_dir() and (path / HF_CONFIG_FILE).is_file()):
        if not path.exists() and ("/" in spec or spec.startswith(".") or spec.endswith(".json")):
            raise KDCacheError(f"{spec}: no such student folder or config file")
        raise KDCacheError(f"--student-layers keeps the first layers of a pre-trained Hugging Face model folder, but "
                           f"student {spec} is {_what_student(path)}, with no pre-trained layers to keep")
    from kdcache.models.hf import load_config

    config = load_config(path, trust_model_code=trust_model_code)
    depth = getattr(config, "num_hidden_layers", None)
    if isinstance(depth, int) and layers > depth:
        raise KDCacheError(f"--student-layers {layers}: student {spec} has {depth} transformer layers "
                           f"(keep 1 to {depth})")


def _what_student(path: Path) -> str:
    """What a student spec that is not a Hugging Face folder is, in words (for --student-layers' refusal)."""
    if path.is_file() and path.suffix == ".json":
        return "a config file (randomly initialised)"
    if path.is_dir() and (path / MODEL_DIR_FILE).is_file():
        return "a kdcache model folder"
    if path.is_dir():
        return f"a folder without a {HF_CONFIG_FILE}"
    if path.is_file():
        return "a file"
    return "an architecture name"


#: Where a Hugging Face encoder keeps its list of transformer layers, under `model.base_model`: BERT, RoBERTa,
#: ELECTRA, XLM-R and most encoders (encoder.layer); DistilBERT (transformer.layer); GPT-2 (h); Llama, Mistral,
#: Qwen and most decoders (layers).
LAYER_LISTS = ("encoder.layer", "transformer.layer", "h", "layers")


def transformer_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList] | None:
    """The module holding a Hugging Face model's transformer layers, the attribute's name and the list itself,
    found by the generic paths of LAYER_LISTS under `base_model`; None when the model keeps them elsewhere."""
    base = getattr(model, "base_model", model)
    for dotted in LAYER_LISTS:
        holder: Any = base
        *parents, name = dotted.split(".")
        for part in parents:
            holder = getattr(holder, part, None)
        stack = getattr(holder, name, None) if holder is not None else None
        if isinstance(stack, nn.ModuleList) and len(stack) > 0:
            return holder, name, stack
    return None


def truncate_layers(model: nn.Module, layers: int, where: str) -> nn.Module:
    """Keep the first `layers` transformer layers (the DistilBERT / BERT-small way of initialising a shallower
    student from pre-trained lower layers); the config says so too, so save_pretrained reloads this depth."""
    found = transformer_layers(model)
    if found is None:
        raise KDCacheError(f"--student-layers: student {where} ({type(model).__name__}) keeps no transformer layer "
                           f"list at base_model.{' or base_model.'.join(LAYER_LISTS)}")
    holder, name, stack = found
    if not 1 <= layers <= len(stack):
        raise KDCacheError(f"--student-layers {layers}: student {where} has {len(stack)} transformer layers "
                           f"(keep 1 to {len(stack)})")
    setattr(holder, name, nn.ModuleList(list(stack)[:layers]))
    config = model.config
    config.num_hidden_layers = layers
    for key in ("layer_types",):  # per-layer lists of newer configs must match the depth
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) > layers:
            setattr(config, key, value[:layers])
    return model


def _hf_folder(path: Path, num_outputs: int, layers: int | None = None, trust_model_code: bool = False) -> Student:
    from kdcache.models.hf import load_classifier, load_config, unexpected_missing

    config = load_config(path, trust_model_code=trust_model_code)
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if has_head and config.num_labels != num_outputs:
        raise KDCacheError(f"student {path} has {config.num_labels} outputs but the cache's teacher has {num_outputs}")
    model, missing = load_classifier(path, trust_model_code=trust_model_code, num_labels=num_outputs)
    lacking = unexpected_missing(missing, keep_layers=layers)
    if lacking:  # transformers would initialise them at random, and the student would not be the pre-trained one
        kept = f"the first {layers} layers of " if layers is not None else ""
        raise KDCacheError(f"student {path}: its weights lack {len(lacking)} tensors of {kept}the model its config.json "
                           f"describes ({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''}); "
                           "they would be random, not pre-trained")
    if layers is not None:
        truncate_layers(model, layers, str(path))
    return Student(model, str(path), "huggingface")


def _hf_config_file(path: Path, num_outputs: int, tokenizer: Any) -> Student:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        values = json.loads(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {type(values).__name__}")
        model_type = values.pop("model_type")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        raise KDCacheError(f"{path}: not a Hugging Face config (JSON with a model_type): {exc}") from exc
    values.pop("architectures", None)
    values["num_labels"] = num_outputs
    values.pop("id2label", None), values.pop("label2id", None)
    if tokenizer is not None and "vocab_size" not in values:
        values["vocab_size"] = len(tokenizer)
    from kdcache.models.builders import allocation_guard, check_model_size

    try:
        config = AutoConfig.for_model(model_type, **values)
    except Exception as exc:  # noqa: BLE001
        raise KDCacheError(f"{path}: cannot build a model from this config ({exc})".splitlines()[0]) from exc
    check_model_size(lambda: AutoModelForSequenceClassification.from_config(config), f"student {path}")
    try:
        with allocation_guard(f"student {path}"):
            model = AutoModelForSequenceClassification.from_config(config)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise KDCacheError(f"{path}: cannot build a model from this config ({exc})".splitlines()[0]) from exc
    return Student(model, str(path), "huggingface")


def _kdcache_folder(path: Path, num_outputs: int, trust_model_code: bool) -> Student:
    from kdcache.models.builders import build_model

    meta = read_model_dir(path, trust_model_code)
    architecture, width, kwargs = meta["architecture"], meta["num_classes"], meta["kwargs"]
    if width != num_outputs:
        raise KDCacheError(f"student {path} has {width} outputs but the cache's teacher has {num_outputs}")
    model = build_model(architecture, width, trust_model_code=trust_model_code, **kwargs)
    load_state_dict_file(model, path / meta.get("weights", "model.pt"), what=f"architecture {architecture}")
    return Student(model, str(path), "kdcache", architecture, kwargs)


def save_student(student: Student, directory: str | Path, *, num_outputs: int, label_names: list[str] | None,
                 tokenizer: Any = None) -> Path:
    """Save in the form `cache-teacher --teacher DIR` loads: HF `save_pretrained` (with the tokenizer) or a kdcache folder."""
    directory = Path(directory)
    if student.is_huggingface:
        if label_names:
            student.model.config.id2label = dict(enumerate(label_names))
            student.model.config.label2id = {name: i for i, name in enumerate(label_names)}
        student.model.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        return directory
    return save_model_dir(student.model, directory, architecture=student.architecture, num_classes=num_outputs,
                          label_names=label_names, kwargs=student.kwargs)

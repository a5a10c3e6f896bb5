"""Every Hugging Face load of kdcache (config, model, tokenizer) goes through here, so that no folder, and no
tokenizer stored inside a cache, can run its own Python code or make transformers ask on stdin whether to run it.

transformers asks "Do you wish to run the custom code? [y/N]" when `trust_remote_code` is left unset and a folder's
`config.json` or `tokenizer_config.json` names code (`auto_map`): one keystroke then imports the folder's files. Here
the flag is always passed, False unless the user said `--trust-model-code`, and a folder that names code is refused
in one line before transformers is even asked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError
from kdcache.names import RUN_FORMAT

#: The files in which a Hugging Face folder can name Python code of its own (`auto_map`, `tokenizer_class` of a
#: module); both are read by transformers when a config, a model or a tokenizer is loaded.
CODE_NAMING_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")

#: What a loaded model reports as newly initialised without being a fault: a classifier head of another width (or
#: none: a bare encoder gets a fresh, seeded one) and the pooler some encoders are saved without.
FRESH_PREFIXES = ("classifier.", "score.", "pre_classifier.", "qa_outputs.", "pooler.", "bert.pooler.",
                  "roberta.pooler.", "electra.pooler.")
#: The most bytes a model config JSON may hold before it is read (real ones are a few KB).
CONFIG_LIMIT = 16 * 1024**2


def check_not_a_run_folder(folder: str | Path) -> None:
    """A run folder has a config.json too, which transformers would misread: say what it is and where its model is."""
    folder = Path(folder)
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(values, dict) and values.get("format") == RUN_FORMAT:
        best = folder / "best"
        where = (f"its best model is {best}" if best.is_dir() else
                 "it holds no best/ model yet (no epoch finished)")
        raise KDCacheError(f"{folder}: is a kdcache run folder, not a model folder; {where}")


def check_no_custom_code(folder: str | Path, trust_model_code: bool) -> None:
    """Refuse, in one line, a folder whose metadata names Python code unless the user trusts it: loading a folder is
    reading data, and data must never run code by being read."""
    check_not_a_run_folder(folder)
    if trust_model_code:
        return
    from kdcache.models.builders import TRUST_HINT

    folder = Path(folder)
    for name in CODE_NAMING_FILES:
        path = folder / name
        try:
            if not path.is_file() or path.stat().st_size > CONFIG_LIMIT:
                continue
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # unreadable metadata is transformers' one-line error to give, with trust_remote_code=False
        if isinstance(values, dict) and values.get("auto_map"):
            raise KDCacheError(f"{path}: this model folder needs its own Python code (auto_map "
                               f"{_names(values['auto_map'])}); {TRUST_HINT}")


def _names(auto_map: Any) -> str:
    if isinstance(auto_map, dict):
        return ", ".join(f"{k} -> {v}" for k, v in list(auto_map.items())[:3])
    return repr(auto_map)[:120]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(folder: str | Path, *, trust_model_code: bool = False) -> Any:
    """A folder's `AutoConfig`, or one line naming its config.json."""
    from transformers import AutoConfig

    check_no_custom_code(folder, trust_model_code)
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_model_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types
        raise KDCacheError(f"{Path(folder) / 'config.json'}: unreadable Hugging Face config ({_first_line(exc)})") from exc


def load_classifier(folder: str | Path, *, trust_model_code: bool = False, what: str = "model",
                    **kwargs: Any) -> tuple[Any, list[str]]:
    """A folder's sequence classifier and the names of the weights it did not hold (initialised at random by
    transformers, whose own report of them is muted), so the caller can refuse a model that is not what it claims."""
    from transformers import AutoModelForSequenceClassification

    check_no_custom_code(folder, trust_model_code)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_model_code, output_loading_info=True,
            **kwargs)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError...
        raise KDCacheError(f"{folder}: cannot load a Hugging Face {what} ({_first_line(exc)})") from exc
    return model, sorted(str(k) for k in (info.get("missing_keys") or []))


def load_causal_lm(folder: str | Path, *, trust_model_code: bool = False) -> Any:
    """A folder's causal language model (`AutoModelForCausalLM`), refused in one line when the folder holds another
    kind of model: transformers would build a causal head for some encoders (BERT) and fill it at random."""
    from transformers import AutoModelForCausalLM

    check_no_custom_code(folder, trust_model_code)
    config = load_config(folder, trust_model_code=trust_model_code)
    architectures = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_model_code:
        raise KDCacheError(f"{folder}: not a causal language model ({architectures}: model type "
                           f"{config.model_type!r} has no AutoModelForCausalLM class)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=trust_model_code, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - missing or unreadable weights, an unknown model type
        raise KDCacheError(f"{folder}: cannot load a causal language model ({architectures}): "
                           f"{_first_line(exc)}") from exc
    missing = sorted(str(k) for k in (info.get("missing_keys") or []))
    if missing:
        raise KDCacheError(f"{folder}: not a causal language model ({architectures}): its weights lack "
                           f"{len(missing)} tensors of the language-model head ({', '.join(missing[:2])}"
                           f"{', ...' if len(missing) > 2 else ''}); --task lm needs an AutoModelForCausalLM folder")
    return model


def special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """The bos/eos/pad ids a config made here takes from its tokenizer when its JSON names none: a model type's own
    defaults (GPT-2's 50256) lie outside a small vocabulary, and `generate` would then never stop."""
    eos, bos = getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None)
    return {"bos_token_id": eos if bos is None else bos, "eos_token_id": eos,
            "pad_token_id": getattr(tokenizer, "pad_token_id", None)}


def causal_lm_from_config(path: str | Path, vocab_size: int, *, seed: int = 0,
                          special: dict[str, int | None] | None = None) -> Any:
    """A fresh causal language model from a Hugging Face config JSON (`model_type` and sizes; `vocab_size` defaults
    to the tokenizer's; the special token ids to `special`, `special_token_ids(tokenizer)`), with seeded weights:
    the project's own teacher, made offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        if path.stat().st_size > CONFIG_LIMIT:
            raise ValueError(f"{path.stat().st_size:,} bytes, more than a config's {CONFIG_LIMIT:,}")
        values = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError(f"expected a JSON object, got {type(values).__name__}")
        model_type = values.pop("model_type")
    except (OSError, ValueError, KeyError) as exc:
        raise KDCacheError(f"{path}: not a Hugging Face config (JSON with a model_type): {_first_line(exc)}") from exc
    if values.get("auto_map"):
        raise KDCacheError(f"{path}: the config names Python code of its own (auto_map); give a built-in model_type")
    values.pop("architectures", None)
    values.setdefault("vocab_size", vocab_size)
    for key, value in (special or {}).items():
        values.setdefault(key, value)
    if not isinstance(values["vocab_size"], int) or values["vocab_size"] < vocab_size:
        raise KDCacheError(f"{path}: vocab_size {values['vocab_size']!r} is below the tokenizer's {vocab_size} tokens")
    import torch

    from kdcache.models.builders import allocation_guard, check_model_size

    try:
        config = AutoConfig.for_model(model_type, **values)
        check_model_size(lambda: AutoModelForCausalLM.from_config(config), f"model {path}")
        torch.manual_seed(seed)
        with allocation_guard(f"model {path}"):
            return AutoModelForCausalLM.from_config(config)
    except KDCacheError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unknown model_type, or one without a causal-LM class
        raise KDCacheError(f"{path}: cannot build a causal language model from this config ({_first_line(exc)})") \
            from exc


def load_tokenizer(source: str | Path, *, trust_model_code: bool = False, what: str = "the tokenizer") -> Any:
    """A tokenizer from a folder, or one line naming the folder."""
    from transformers import AutoTokenizer

    check_no_custom_code(source, trust_model_code)
    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=True, trust_remote_code=trust_model_code)
    except Exception as exc:  # noqa: BLE001
        raise KDCacheError(f"{source}: cannot load {what} ({_first_line(exc)})") from exc


def unexpected_missing(missing: list[str], *, keep_layers: int | None = None) -> list[str]:
    """The missing weights that make a loaded model other than it claims: anything but a fresh head or pooler, and,
    when only the first `keep_layers` transformer layers are kept, nothing of the layers that are dropped."""
    import re

    found = []
    for key in missing:
        bare = key.split(".", 1)[1] if key.split(".", 1)[0] in ("bert", "roberta", "electra", "distilbert",
                                                                  "deberta", "albert", "model") else key
        if key.startswith(FRESH_PREFIXES) or bare.startswith(FRESH_PREFIXES):
            continue
        layer = re.search(r"\.layer\.(\d+)\.", f".{key}")
        if keep_layers is not None and layer is not None and int(layer.group(1)) >= keep_layers:
            continue
        found.append(key)
    return found

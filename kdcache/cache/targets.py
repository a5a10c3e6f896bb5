"""The stored teacher target as a typed value: which kind (dense, top-k, sampled), its arrays and how they are made.

A cache records one `TargetSpec` in its root attribute `target`; the reader serves it, the losses read the arrays
it names, and capture builds them with `topk_arrays` / `sampled_arrays` from a batch of full logits. A cache
without the attribute (format version 1) holds the dense target: `logits` [rows, C]. The specification in words
is docs/cache-format.md (version 2).

    dense    logits [rows, C]                                   cache dtype
    topk     topk_values [rows, K] (descending raw logits)      cache dtype
             topk_indices [rows, K]                             smallest unsigned int holding C - 1
             logsumexp [rows] (T = 1 only) or [rows, temps]     float32, over all C outputs of z / T, T = 1 first
    sampled  sampled_ids [rows, W]  (W = min(N, C); ids ascending, unused slots last: id 0, count 0, logprob 0)
             sampled_counts [rows, W] (sum N per row)           smallest unsigned int holding N
             sampled_logprobs [rows, W]                         float32 log-softmax at T = 1

A token-level (language-model) target has `positions` = S and every array gains that axis after the rows:
[rows, S, width] (`logsumexp` [rows, S] or [rows, S, temps]); each position is computed as a row of its own.
A views cache (`views` = V, images) stores the plain image's target as above and each array again on V augmented
views, `view_<array>` [rows, V, ...], beside the views' parameters `view_params` [rows, V, P]; view v of row n is
computed as row n * V + v.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcache.cache import schema
from kdcache.cache.schema import ArraySpec, _Header
from kdcache.errors import KDCacheError

if TYPE_CHECKING:  # capture alone needs torch: a reader of the format does not import it
    import torch

KINDS = ("dense", "topk", "sampled")
#: The axes of a per-row target; a token-level (language-model) target adds "positions" (before a temperature
#: axis): [rows, positions, width]. A views cache keeps the plain target's axes and stores each array again with a
#: view axis, `view_<array>` [rows, views, width] (`TargetSpec.views`).
ROW_AXES = ["rows"]
TOKEN_AXES = ["rows", "positions"]
#: The codecs of the arrays whose codec the format fixes (chosen by benchmarks/bench_target_codecs.py; the table is
#: in docs/cache-format.md). The values arrays (`logits`, `topk_values`) take the cache's --codec.
TARGET_CODECS = {"topk_indices": "zstd3", "logsumexp": "blosc-zstd3-shuffle", "sampled_ids": "blosc-zstd3-shuffle",
                 "sampled_counts": "zstd3", "sampled_logprobs": "blosc-zstd3-shuffle"}
#: Capture measures the kept mass and KL of a sparse target on the rows at positions 0..QUALITY_ROWS-1 of each split,
#: whichever process computes them (a resumed run that does not recompute them records none).
QUALITY_ROWS = 1024


def index_dtype(outputs: int) -> np.dtype:
    """The smallest unsigned integer type holding every id 0..outputs-1: ids are half or a quarter of a row."""
    for name in ("uint8", "uint16", "uint32"):
        if outputs - 1 <= np.iinfo(name).max:
            return np.dtype(name)
    return np.dtype("uint64")


def row_seed(seed: int, row: int) -> int:
    """The generator seed of one row's draws: a function of the capture's seed and the row's position in its split
    only, so a resumed or multi-process capture draws exactly what one uninterrupted process draws."""
    return int.from_bytes(hashlib.sha256(f"kdcache-sample:{seed}:{row}".encode()).digest()[:8], "little") >> 1


@dataclass
class TargetSpec(_Header):
    """What a cache stores as the teacher's target, recorded in the root attribute `target`."""

    kind: str
    outputs: int  # C, the teacher's outputs
    width: int  # the columns of the target's arrays: C (dense), K (topk), W (sampled)
    dtypes: dict[str, str]  # array -> stored dtype, in storage order
    axes: list[str] = field(default_factory=lambda: list(ROW_AXES))
    k: int | None = None
    draws: int | None = None  # N, draws with replacement per row
    temperatures: list[float] | None = None  # topk: the T of each logsumexp column, T = 1 first
    sample_temperature: float | None = None
    seed: int | None = None
    seed_rule: str | None = None
    codecs: dict[str, str] = field(default_factory=dict)  # arrays whose codec the format fixes
    positions: int | None = None  # S of a token-level target (axes TOKEN_AXES), None for a per-row one
    views: int | None = None  # V of a views cache: every array also stored per view, `view_<array>` [rows, V, ...]
    view_params: int | None = None  # P, the numbers describing one view (`view_params` [rows, V, P])
    extra: dict[str, Any] = field(default_factory=dict)

    def per_token(self, positions: int) -> "TargetSpec":
        """This target at each of `positions` positions of a row (a language model's window)."""
        self.axes, self.positions = list(TOKEN_AXES), int(positions)
        if self.kind == "sampled":
            self.seed_rule = (self.seed_rule or "").replace(
                "row = the row's position in its split", "row = (the row's position in its split) * S + position")
        return self

    def per_row(self) -> "TargetSpec":
        """The same target without its token axis: what one position of a token-level row holds."""
        return dataclasses.replace(self, positions=None, axes=list(ROW_AXES))

    def to_attrs(self) -> dict[str, Any]:
        out = super().to_attrs()
        if self.positions is None:
            out.pop("positions")  # a per-row target records what it did before the token axis existed
        if self.views is None:
            out.pop("views")  # likewise before the view axis
            out.pop("view_params")
        return out

    def with_views(self, views: int, params: int) -> "TargetSpec":
        """This target on the plain image, and again on each of `views` augmented views of it, each described by
        `params` numbers (a views cache)."""
        self.views, self.view_params = int(views), int(params)
        if self.kind == "sampled":
            self.seed_rule = (self.seed_rule or "") + ("; view arrays: row = (the row's position in its split) * V "
                                                       "+ view")
        return self

    @property
    def view_arrays(self) -> list[str]:
        """The arrays a views cache adds, in storage order: each target array per view, then the views' parameters."""
        if not self.views:
            return []
        return [schema.VIEW_PREFIX + name for name in self.dtypes] + [schema.VIEW_PARAMS]

    def view_specs(self, codec: str) -> dict[str, ArraySpec]:
        """The ArraySpecs of `view_arrays`: each target array's spec with the view axis, and the P parameters."""
        specs = {schema.VIEW_PREFIX + name: dataclasses.replace(spec, name=schema.VIEW_PREFIX + name, views=self.views)
                 for name, spec in self.array_specs(codec).items()}
        specs[schema.VIEW_PARAMS] = ArraySpec(schema.VIEW_PARAMS, np.dtype("float32"), int(self.view_params or 1),
                                              views=self.views)
        return specs

    # --- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def dense(cls, outputs: int, dtype: str) -> "TargetSpec":
        return cls("dense", int(outputs), int(outputs), {"logits": dtype})

    @classmethod
    def topk(cls, outputs: int, k: int, dtype: str, temperatures: list[float]) -> "TargetSpec":
        temps = [float(t) for t in temperatures]
        return cls("topk", int(outputs), int(k), {"topk_values": dtype, "topk_indices": str(index_dtype(outputs)),
                                                  "logsumexp": "float32"},
                   k=int(k), temperatures=temps, codecs={n: TARGET_CODECS[n] for n in ("topk_indices", "logsumexp")})

    @classmethod
    def sampled(cls, outputs: int, draws: int, sample_temperature: float, seed: int) -> "TargetSpec":
        counts = index_dtype(draws + 1)
        width = min(int(draws), int(outputs))  # no row holds more unique ids than draws, or than outputs
        return cls("sampled", int(outputs), width, {"sampled_ids": str(index_dtype(outputs)),
                                                         "sampled_counts": str(counts), "sampled_logprobs": "float32"},
                   draws=int(draws), sample_temperature=float(sample_temperature), seed=int(seed),
                   seed_rule="torch.Generator().manual_seed(kdcache.cache.targets.row_seed(seed, row)), row = the "
                             "row's position in its split; N uniforms in [0, 1) by torch.rand, inverted through the "
                             "float64 cumulative softmax(z / T)",
                   codecs={n: TARGET_CODECS[n] for n in ("sampled_ids", "sampled_counts", "sampled_logprobs")})

    # --- reading --------------------------------------------------------------------------------------------------

    @property
    def format_version(self) -> int:
        """Dense caches stay version 1 (every kdcache reads them); a sparse or token-level target needs version 2."""
        return 1 if self.kind == "dense" and not self.positions and not self.views else 2

    @property
    def arrays(self) -> list[str]:
        return list(self.dtypes)

    @property
    def sparse(self) -> bool:
        return self.kind != "dense"

    @property
    def row_bytes(self) -> int:
        """Raw bytes of one row of the target's arrays (before compression), which sizes the chunks."""
        return (self.positions or 1) * (1 + (self.views or 0)) * sum(
            np.dtype(d).itemsize * (len(self.temperatures or [1.0]) if n == "logsumexp" else self.width)
            for n, d in self.dtypes.items())

    def array_specs(self, codec: str) -> dict[str, ArraySpec]:
        """The target's arrays of a split, in storage order (`codec`: the cache's codec, for the values arrays)."""
        specs = {}
        for name, dtype in self.dtypes.items():
            dt = np.dtype(dtype)
            width: int | None = self.width
            if name == "logsumexp":
                width = None if len(self.temperatures or [1.0]) == 1 else len(self.temperatures or [])
            fill = schema.FLOAT_FILL if dt.kind == "f" and name != "sampled_logprobs" else 0
            specs[name] = ArraySpec(name, dt, width, fill, target=True, codec=self.codecs.get(name),
                                    positions=self.positions)
        return specs

    def check(self, where: str) -> None:
        """The description must be one this kdcache can read and agree with itself (an edited attribute is one line)."""
        def bad(problem: str) -> KDCacheError:
            gap = "" if problem.startswith(".") else " "
            return KDCacheError(f"{where}: attribute target{gap}{problem}; the attributes were edited")

        if self.kind not in KINDS:
            raise bad(f".kind is {self.kind!r}, not one of {', '.join(KINDS)}")
        if self.axes not in (ROW_AXES, TOKEN_AXES) or (self.axes == TOKEN_AXES) != (self.positions is not None):
            raise bad(f".axes is {self.axes!r} with positions {self.positions!r}; this kdcache reads {ROW_AXES}, or "
                      f"{TOKEN_AXES} with positions S")
        if self.positions is not None and (isinstance(self.positions, bool) or self.positions < 1):
            raise bad(f".positions is {self.positions!r}, not a positive integer")
        if self.views is not None and (isinstance(self.views, bool) or self.views < 1 or self.positions
                                       or not isinstance(self.view_params, int) or self.view_params < 1):
            raise bad(f".views is {self.views!r} with view_params {self.view_params!r}: positive integers, on a "
                      "per-row target")
        if self.outputs < 1 or self.width < 1:
            raise bad(f"has outputs {self.outputs} and width {self.width}; both must be positive")
        expected = {"dense": lambda: TargetSpec.dense(self.outputs, self.dtypes.get("logits", "")),
                    "topk": lambda: TargetSpec.topk(self.outputs, self.k or 0, self.dtypes.get("topk_values", ""),
                                                    self.temperatures or []),
                    "sampled": lambda: TargetSpec.sampled(self.outputs, self.draws or 0, self.sample_temperature or 1.0,
                                                          self.seed or 0)}[self.kind]()
        for key in ("width", "dtypes", "codecs"):
            if getattr(self, key) != getattr(expected, key):
                raise bad(f".{key} is {getattr(self, key)!r}, but a {self.kind} target of {self.outputs} outputs has "
                          f"{getattr(expected, key)!r}")
        values = self.dtypes.get("logits", self.dtypes.get("topk_values", "float32"))
        if values not in schema.LOGIT_DTYPES:
            raise bad(f"values dtype is {values!r}, not one of {', '.join(schema.LOGIT_DTYPES)}")
        if self.kind == "sampled" and self.views:
            expected.with_views(self.views, self.view_params)
        if self.kind == "sampled" and self.positions and expected.per_token(self.positions).seed_rule != self.seed_rule:
            raise bad(f".seed_rule is {self.seed_rule!r}, not the rule this kdcache draws by")
        if self.kind == "topk":
            temps = self.temperatures or []
            if not temps or temps[0] != 1.0 or len(set(temps)) != len(temps) or not all(t > 0 for t in temps):
                raise bad(f".temperatures is {temps!r}: distinct positive numbers, 1 first")
            if not 0 < self.width < self.outputs:
                raise bad(f".k is {self.k}, not between 1 and outputs - 1 ({self.outputs - 1})")
        if self.kind == "sampled" and (self.seed is None or not self.sample_temperature
                                       or self.sample_temperature <= 0):
            raise bad("of kind sampled needs a seed and a positive sample_temperature")

    @classmethod
    def from_attrs(cls, attrs: Any, where: str, *, file: str | None = None, prefix: str = "target.") -> "TargetSpec":
        spec = super().from_attrs(attrs, where, file=file, prefix=prefix)
        spec.check(file or where)
        return spec

    def describe(self) -> str:
        """The target in a few words, for `kdcache info` and log lines."""
        if self.kind == "topk":
            temps = [float(t) for t in self.temperatures or []]
            if len(temps) > 2 and temps == [float(t) for t in range(1, len(temps) + 1)]:
                temps_text = f"1..{len(temps)}"
            else:
                temps_text = ", ".join(f"{t:g}" for t in temps)
            return f"top-{self.k} of {self.outputs}{self._per()} (logsumexp at T = {temps_text})"
        if self.kind == "sampled":
            return (f"sampled, {self.draws} draws at T = {self.sample_temperature:g} of {self.outputs}{self._per()} "
                    f"(seed {self.seed})")
        return f"dense, {self.outputs} outputs{self._per()}"

    def _per(self) -> str:
        if self.views:
            return f" on the plain image and on {self.views} views a row"
        return f" per token ({self.positions} positions a row)" if self.positions else ""


# --- capture: the target's arrays from full logits ------------------------------------------------------------------

def topk_arrays(logits: "torch.Tensor", k: int, temperatures: list[float]) -> dict[str, "torch.Tensor"]:
    """The top-k arrays of a batch of full float32 logits [B, C]: the kept values are the teacher's raw logits and
    the log-sum-exp is over all C, so kept probabilities and tail mass are exact at every recorded T."""
    import torch

    values, ids = torch.topk(logits, k, dim=1, largest=True, sorted=True)
    lse = torch.stack([torch.logsumexp(logits / t, dim=1) for t in temperatures], dim=1)
    return {"topk_values": values, "topk_indices": ids, "logsumexp": lse[:, 0] if len(temperatures) == 1 else lse}


def sampled_arrays(logits: torch.Tensor, draws: int, temperature: float, seed: int,
                   first_row: int) -> dict[str, torch.Tensor]:
    """RS-KD targets of a batch of full float32 logits [B, C] whose first row is row `first_row` of its split: N
    draws with replacement from softmax(z / T), as unique ids (ascending), counts and log-probs at T = 1.

    Each row's uniforms come from its own generator (`row_seed`), on the CPU: the draw depends on the seed, the row's
    position and its logits only, never on batch boundaries or on how many processes capture."""
    import torch

    rows, outputs = logits.shape
    width = min(draws, outputs)
    uniforms = torch.empty(rows, draws, dtype=torch.float64)
    for r in range(rows):
        generator = torch.Generator().manual_seed(row_seed(seed, first_row + r))
        uniforms[r] = torch.rand(draws, generator=generator, dtype=torch.float64)
    cdf = torch.softmax(logits.double() / temperature, dim=1).cumsum(dim=1)
    u = uniforms.to(logits.device) * cdf[:, -1:]
    ids = torch.searchsorted(cdf, u, right=True).clamp_(max=outputs - 1)
    ids, _ = torch.sort(ids, dim=1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = first.long().cumsum(dim=1) - 1
    unique = torch.zeros(rows, width, dtype=ids.dtype, device=ids.device)
    unique.scatter_(1, slot, ids)
    counts = torch.zeros_like(unique).scatter_add_(1, slot, torch.ones_like(ids))
    used = counts > 0
    unique = torch.where(used, unique, torch.zeros_like(unique))
    logprobs = torch.log_softmax(logits, dim=1).gather(1, unique)
    logprobs = torch.where(used, logprobs, torch.zeros_like(logprobs))
    return {"sampled_ids": unique, "sampled_counts": counts, "sampled_logprobs": logprobs}


def target_arrays(spec: TargetSpec, logits: torch.Tensor, first_row: int) -> dict[str, torch.Tensor]:
    """The arrays of `spec`'s kind from a batch of full float32 logits whose first row is row `first_row`: [B, C], or
    [B, S, C] for a token-level target, whose positions are computed as rows first_row * S + position."""
    if spec.positions:
        rows, positions, outputs = logits.shape
        flat = target_arrays(spec.per_row(), logits.reshape(rows * positions, outputs), first_row * positions)
        return {k: v.reshape(rows, positions, *v.shape[1:]) for k, v in flat.items()}
    if spec.kind == "topk":
        return topk_arrays(logits, int(spec.k), list(spec.temperatures or [1.0]))
    if spec.kind == "sampled":
        return sampled_arrays(logits, int(spec.draws), float(spec.sample_temperature), int(spec.seed), first_row)
    return {"logits": logits}


@dataclass
class QualitySum:
    """Running sums of what a sparse target keeps, over the first `QUALITY_ROWS` rows of a split."""

    rows: int = 0
    kept_mass: float = 0.0
    kl: float = 0.0

    def add(self, spec: TargetSpec, logits: torch.Tensor, arrays: dict[str, torch.Tensor], first_row: int) -> None:
        """Measure the rows of a batch (its first row is row `first_row`) that lie among the split's first
        QUALITY_ROWS: kept mass at T = 1 and KL(full || the
        distribution the cache reconstructs). Top-k: the kept probabilities (from the values as stored) and the
        exact tail mass spread evenly over the C - K other ids. Sampled: the empirical distribution counts / N,
        which is zero outside the sample, so the KL is the reverse one, KL(empirical || full)."""
        import torch

        take = min(QUALITY_ROWS - first_row, len(logits))
        if take <= 0 or spec.kind == "dense":
            return
        arrays = {k: v[:take] for k, v in arrays.items()}
        z = logits[:take].double()
        log_p = torch.log_softmax(z, dim=1)
        if spec.kind == "topk":
            values = arrays["topk_values"].to(getattr(torch, spec.dtypes["topk_values"])).double()
            ids = arrays["topk_indices"].long()
            lse = arrays["logsumexp"].double()
            lse = lse[:, 0] if lse.ndim == 2 else lse
            log_q_kept = values - lse[:, None]
            kept = log_p.gather(1, ids).exp().sum(dim=1)
            tail_q = (1 - log_q_kept.exp().sum(dim=1)).clamp(min=1e-300)
            log_q = (tail_q / (spec.outputs - spec.width)).log()[:, None].expand_as(log_p).clone()
            log_q.scatter_(1, ids, log_q_kept)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        else:
            counts = arrays["sampled_counts"].double()
            ids = arrays["sampled_ids"].long()
            used = counts > 0
            kept = torch.where(used, log_p.gather(1, ids).exp(), torch.zeros_like(counts)).sum(dim=1)
            q = counts / float(spec.draws)
            terms = torch.where(used, q * (q.clamp(min=1e-300).log() - log_p.gather(1, ids)), torch.zeros_like(q))
            kl = terms.sum(dim=1)
        self.rows += take
        self.kept_mass += float(kept.sum())
        self.kl += float(kl.sum())

    def merge(self, other: "QualitySum") -> "QualitySum":
        return QualitySum(self.rows + other.rows, self.kept_mass + other.kept_mass, self.kl + other.kl)

    def record(self, spec: TargetSpec) -> dict[str, Any] | None:
        """The split attribute `target_quality`, or None for a dense target (nothing is lost)."""
        if spec.kind == "dense":
            return None
        if not self.rows:
            return {"rows_measured": 0, "kept_mass": None, "kl": None,
                    "note": "a resumed capture that did not recompute the split's first rows"}
        direction = "KL(full || top-k with the tail spread evenly)" if spec.kind == "topk" else \
            "KL(empirical counts / N || full)"
        return {"rows_measured": self.rows, "kept_mass": round(self.kept_mass / self.rows, 6),
                "kl": round(self.kl / self.rows, 6), "kl_definition": direction, "temperature": 1.0}


def default_temperatures(presets: dict[str, dict[str, dict[str, Any]]]) -> list[float]:
    """T = 1, every preset's fixed temperature, and 1..T_max of every preset with an annealed T (its schedule moves
    T down from T_max in integer steps), so every preset's schedule reads exact log-sum-exps: `presets` maps each
    method to its per-preset defaults (`Method.defaults`)."""
    temps = {1.0}
    for per_preset in presets.values():
        for values in per_preset.values():
            if values.get("temperature") is not None:
                temps.add(float(values["temperature"]))
            if values.get("t_max") is not None:
                temps.update(float(t) for t in range(1, int(values["t_max"]) + 1))
    return [1.0, *sorted(temps - {1.0})]


def parse_temperatures(text: str, flag: str = "--lse-temperatures") -> list[float]:
    """`1,2,4` as the temperatures to record, T = 1 first (added when absent), each once, in the order given."""
    temps: list[float] = [1.0]
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            raise KDCacheError(f"{flag} {text!r}: {part!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise KDCacheError(f"{flag} {text!r}: temperatures must be positive, got {part}")
        if value not in temps:
            temps.append(value)
    return temps


__all__ = ["TOKEN_AXES", "KINDS", "QUALITY_ROWS", "QualitySum", "TARGET_CODECS", "TargetSpec", "default_temperatures",
           "index_dtype", "parse_temperatures", "row_seed", "sampled_arrays", "target_arrays", "topk_arrays"]

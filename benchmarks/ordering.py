"""The "where the paper's ordering holds here" table of docs/benchmarks.md, built from the committed results CSVs.

    python benchmarks/ordering.py                              # prints the markdown table
    python benchmarks/ordering.py --write docs/benchmarks.md   # replaces it between the page's ordering markers

Each row is one experiment; each of its cells one pairwise claim of the paper ("A > B"), judged on the seeds both
methods ran, paired by seed (reproduce.paired): `holds (p<0.05)` when the mean difference is in the paper's
direction and a paired t-test gives p < 0.05; `same direction, not significant` when only the direction agrees;
`reversed` when the mean difference goes the other way (with `(p<0.05)` when that is significant), `no
difference` when it is exactly 0; `not testable`
where the runs cannot separate the methods (every student at the majority class) or a method was not run.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import Result, paired  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {"continuation": "CKD", "annealing": "Ann", "takd": "TAKD", "vanilla": "KD", "ce": "scratch"}


@dataclass
class Experiment:
    """One table of benchmarks.md: its folders (merged), what is scored, and the paper's claims on it."""

    name: str
    scale: str
    folders: list[str]
    claims: list[tuple[str, str]]  # (a, b): the paper says a is better than b
    key: str = "test"  # results.csv column: test (selected on validation, scored on test/dev), best, last
    lower_is_better: bool = False
    untestable: str | None = None  # why no claim can be judged here
    labels: dict[str, str] = field(default_factory=dict)


def load(folders: list[str]) -> list[Result]:
    """Every run of the folders' results.csv (a (method, seed) met twice kept once, the first)."""
    runs: dict[tuple[str, int], Result] = {}
    for folder in folders:
        for row in csv.DictReader(open(RESULTS / folder / "results.csv")):
            key = (row["method"], int(row["seed"]))
            runs.setdefault(key, Result(row["method"], int(row["seed"]), float(row["best"]), float(row["last"]),
                                        float(row["seconds"]), row["metric"],
                                        test=float(row["test"]) if row.get("test") else None))
    return list(runs.values())


def verdict(results: list[Result], a: str, b: str, key: str, lower_is_better: bool = False) -> tuple[str, dict]:
    """The claim "a is better than b" against the seed-paired differences of `key`: its mark and the numbers."""
    d = paired(results, a, b, key)
    if not d["pairs"]:
        return "not testable", d
    better = -d["mean"] if lower_is_better else d["mean"]
    significant = d["t_p"] is not None and d["t_p"] < 0.05
    if better > 0:
        return ("holds (p<0.05)" if significant else "same direction, not significant"), d
    if better < 0:
        return "reversed" + (" (p<0.05)" if significant else ""), d
    return "no difference", d


def seeds_of(results: list[Result], methods: set[str]) -> str:
    """Seeds per method, as a range when methods ran different numbers (round 3's headline pair has 10)."""
    counts = {len({r.seed for r in results if r.method == m}) for m in methods} - {0}
    return "-".join(str(n) for n in sorted(counts)[::max(1, len(counts) - 1)]) if counts else "0"


def table(experiments: list[Experiment]) -> str:
    """The markdown table: experiment, scale, seeds, then each claim with its mark, mean difference, p and wins."""
    lines = ["| experiment | scale | seeds | each claim of the paper: mark (mean difference A - B, paired t-test p, "
             "seeds for / against the claim) |",
             "|---|---|---|---|"]
    for e in experiments:
        results = load(e.folders)
        methods = {m for claim in e.claims for m in claim}
        cells = []
        for a, b in e.claims:
            label = f"{e.labels.get(a, NAMES.get(a, a))} > {e.labels.get(b, NAMES.get(b, b))}"
            if e.untestable:
                cells.append(f"{label}: `not testable`")
                continue
            mark, d = verdict(results, a, b, e.key, e.lower_is_better)
            if not d["pairs"]:
                cells.append(f"{label}: `not testable` (not run)")
                continue
            p = "-" if d["t_p"] is None else f"{d['t_p']:.3f}"
            for_, against = (d["losses"], d["wins"]) if e.lower_is_better else (d["wins"], d["losses"])
            cells.append(f"{label}: `{mark}` ({d['mean']:+.4f}, p {p}, {for_}/{against})")
        if e.untestable:
            cells = [f"all {len(e.claims)} claims: `not testable`"]
        why = f" ({e.untestable})" if e.untestable else ""
        lines.append(f"| {e.name}{why} | {e.scale} | {seeds_of(results, methods)} | {'; '.join(cells)} |")
    return "\n".join(lines) + "\n"


TABLE1 = [("continuation", "annealing"), ("continuation", "takd"), ("continuation", "vanilla"),
          ("continuation", "ce"), ("annealing", "takd"), ("annealing", "vanilla"), ("annealing", "ce"),
          ("takd", "vanilla"), ("takd", "ce"), ("vanilla", "ce")]
#: Table 3 (DistilRoBERTa): CKD > Ann > TAKD = KD > fine-tuning: the tie is not a claim.
TABLE3 = [c for c in TABLE1 if c != ("takd", "vanilla")]


def round3_folders() -> list[str]:
    """Round 3's CIFAR-10 runs (issue 21), one teacher: the teacher's own folder (ce and TAKD, with the teacher and
    the assistant) and the per-seed folders of the other methods, seeds 5-9 included."""
    own = ["vision-cpu-r3"] if (RESULTS / "vision-cpu-r3" / "results.csv").is_file() else []
    return own + sorted(p.parent.name for p in RESULTS.glob("vision-cpu-r3-seed*/results.csv"))


def experiments() -> list[Experiment]:
    """The experiments of docs/benchmarks.md whose CSVs are committed, newest protocol first."""
    round3 = round3_folders()
    found = [Experiment("CIFAR-10, ResNet-20 -> ResNet-8 (Table 1; test at the best held-out epoch)", "cpu, round 2",
                        ["vision-cpu-5seeds"], TABLE1)]
    if round3:  # round 3 (issue 21) replaces round 2's table: one process per seed and method, one teacher
        ran = {r.method for r in load(round3)}
        found[0] = (Experiment("CIFAR-10, ResNet-20 -> ResNet-8 (Table 1; test at the best held-out epoch)",
                                   "cpu, round 3", round3, [c for c in TABLE1 if set(c) <= ran]))
    sst2_r3 = (RESULTS / "glue-sst2-cpu-r3" / "results.csv").is_file()
    if sst2_r3:  # round 3: selected on held-out rows, dev reported
        found.insert(1, Experiment("SST-2, MiniLM-L6 -> its first 2 layers (Table 3; dev accuracy at the best epoch "
                                   "on 200 held-out training rows)", "cpu, round 3", ["glue-sst2-cpu-r3"], TABLE3))
    found += [
        Experiment("Table 7's ablation on CIFAR-10 (all three dynamic parts > each alone; test)", "cpu, round 2",
                   ["vision-cpu-ablations"],
                   [("continuation", "continuation-psi-only"), ("continuation", "continuation-phi-teacher-only"),
                    ("continuation", "continuation-phi-margin-only")],
                   labels={"continuation": "all three", "continuation-psi-only": "psi only",
                           "continuation-phi-teacher-only": "phi on teacher only",
                           "continuation-phi-margin-only": "phi on margin only"}),
        *([] if sst2_r3 else [Experiment(
            "SST-2, MiniLM-L6 -> its first 2 layers (Table 3; dev accuracy, best epoch, selected on dev)",
            "cpu, round 2", ["glue-sst2-cpu-5seeds", "glue-sst2-cpu-5seeds-b"], TABLE3, key="best")]),
        Experiment("MRPC, same students (Table 3; dev F1)", "cpu scale on one H200, round 2", ["glue-mrpc-h200"],
                   TABLE3, key="best", untestable="every student within 0.01 of the majority class's F1 0.812"),
        Experiment("CoLA, same students (Table 3; dev MCC)", "cpu scale on one H200, round 2", ["glue-cola-h200"],
                   TABLE3, key="best", untestable="every student at MCC 0, the majority class"),
        Experiment("Noise toy, the paper's sine noise (Fig. 2: CKD follows the clean signal better; last-epoch "
                   "RMSE)", "cpu", ["noise-cpu-5seeds"],
                   [("continuation m by validation [sine]", "vanilla [sine]"),
                    ("continuation m=0 [sine]", "vanilla [sine]"),
                    ("continuation m=s^2 (oracle) [sine]", "vanilla [sine]")], key="last", lower_is_better=True,
                   labels={"continuation m by validation [sine]": "CKD, m by validation",
                           "continuation m=0 [sine]": "CKD, m = 0",
                           "continuation m=s^2 (oracle) [sine]": "CKD, m = s^2 (oracle)", "vanilla [sine]": "KD"}),
    ]
    return found


def results_table(results: list[Result], pairs: list[tuple[str, str]], reported: str = "test") -> str:
    """Per method: seeds, validation (best epoch), test at the best validation epoch, last epoch (mean ± sd); then
    the given pairs seed by seed on test and on validation: one experiment's table of benchmarks.md."""
    import statistics

    def cell(xs: list[float]) -> str:
        return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}" if xs else "-"

    lines = [f"| method | seeds | validation (best epoch) | **{reported} at the best validation epoch** | last epoch "
             "(validation) |", "|---|---|---|---|---|"]
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        lines.append(f"| {method} | {len(mine)} | {cell([r.best for r in mine])} | "
                     f"{cell([r.test for r in mine if r.test is not None])} | {cell([r.last for r in mine])} |")
    lines += ["", f"| comparison | seeds | {reported}: mean difference, t-test p, wins/losses | validation: same |",
              "|---|---|---|---|"]
    for a, b in pairs:
        t, v = paired(results, a, b, "test"), paired(results, a, b, "best")
        if not t["pairs"]:
            continue
        fmt = lambda d: (f"{d['mean']:+.4f}, p {'-' if d['t_p'] is None else format(d['t_p'], '.3f')}, "
                         f"{d['wins']}/{d['losses']}")
        lines.append(f"| {a} - {b} | {t['pairs']} | {fmt(t)} | {fmt(v)} |")
    return "\n".join(lines) + "\n"


START, END = "<!-- ordering:start -->", "<!-- ordering:end -->"
ROUND3 = ("<!-- round3:start -->", "<!-- round3:end -->")
ROUND3_SST2 = ("<!-- round3-sst2:start -->", "<!-- round3-sst2:end -->")


def write(page: Path, text: str, markers: tuple[str, str] = (START, END)) -> None:
    """The table put between the page's markers (everything else of the page kept as it is)."""
    start, end = markers
    content = page.read_text()
    if content.count(start) != 1 or content.count(end) != 1:
        raise SystemExit(f"{page}: needs exactly one {start} and one {end}")
    head, rest = content.split(start)
    page.write_text(head + start + "\n" + text + end + rest.split(end, 1)[1])


def round3() -> str:
    """Round 3's CIFAR-10 table (issue 21): every vision-cpu-r3-seed* folder, merged."""
    folders = round3_folders()
    ran = {r.method for r in load(folders)}
    pairs = [c for c in TABLE1 if set(c) <= ran]
    return results_table(load(folders), pairs) if folders else "(no round-3 results yet)\n"


def round3_sst2() -> str:
    """Round 3's SST-2 table (issue 21): selected on held-out training rows, GLUE dev reported."""
    folder = "glue-sst2-cpu-r3"
    if not (RESULTS / folder / "results.csv").is_file():
        return "(no round-3 SST-2 results yet)\n"
    return results_table(load([folder]), TABLE3, reported="dev")


if __name__ == "__main__":
    text = table(experiments())
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write(Path(sys.argv[2]), text)
        if ROUND3[0] in Path(sys.argv[2]).read_text():
            write(Path(sys.argv[2]), round3(), ROUND3)
        if ROUND3_SST2[0] in Path(sys.argv[2]).read_text():
            write(Path(sys.argv[2]), round3_sst2(), ROUND3_SST2)
    else:
        print(text, end="")
        print()
        print(round3(), end="")

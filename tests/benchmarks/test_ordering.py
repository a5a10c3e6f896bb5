"""The first-screen table of docs/benchmarks.md: each claim marked from seed-paired results, and the page kept in
step with the committed CSVs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ordering  # noqa: E402
from reproduce import Result  # noqa: E402


def _results(a: list[float], b: list[float]) -> list[Result]:
    return [Result(m, seed, v, v, 1.0, "accuracy", test=v) for m, vs in (("a", a), ("b", b)) for seed, v in enumerate(vs)]


@pytest.mark.parametrize("a,b,lower,mark", [
    ([0.71, 0.72, 0.70, 0.74, 0.73], [0.70, 0.70, 0.69, 0.71, 0.72], False, "holds (p<0.05)"),
    ([0.71, 0.69, 0.72, 0.70, 0.73], [0.70, 0.70, 0.70, 0.70, 0.70], False, "same direction, not significant"),
    ([0.69, 0.71, 0.68, 0.70, 0.69], [0.70, 0.70, 0.70, 0.70, 0.70], False, "reversed"),
    ([0.60, 0.61, 0.62, 0.60, 0.61], [0.70, 0.70, 0.69, 0.71, 0.72], False, "reversed (p<0.05)"),
    ([0.60, 0.61, 0.62, 0.60, 0.61], [0.70, 0.70, 0.69, 0.71, 0.72], True, "holds (p<0.05)"),  # e.g. RMSE
])
def test_each_claim_is_marked_from_the_seed_paired_differences(a, b, lower, mark):
    assert ordering.verdict(_results(a, b), "a", "b", "test", lower)[0] == mark


def test_a_method_that_was_not_run_is_not_testable():
    assert ordering.verdict(_results([0.7, 0.7], []), "a", "b", "test")[0] == "not testable"


def test_the_page_holds_the_table_the_committed_csvs_give():
    """docs/benchmarks.md's first-screen table is what ordering.py builds now: regenerate it after every rerun."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text()
    between = page.split(ordering.START, 1)[1].split(ordering.END, 1)[0]
    assert between.strip() == ordering.table(ordering.experiments()).strip()
    assert page.index(ordering.START) < page.index("## ", page.index("## Where the paper's ordering holds") + 3)
    for (start, end), build in ((ordering.ROUND3, ordering.round3), (ordering.ROUND3_SST2, ordering.round3_sst2)):
        assert page.split(start, 1)[1].split(end, 1)[0].strip() == build().strip()  # round 3's tables too


def test_write_replaces_only_the_table(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(f"# t\n\nbefore\n{ordering.START}\nold\n{ordering.END}\nafter\n")
    ordering.write(page, "| new |\n")
    assert page.read_text() == f"# t\n\nbefore\n{ordering.START}\n| new |\n{ordering.END}\nafter\n"

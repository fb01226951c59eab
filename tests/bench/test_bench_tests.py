"""scripts/bench_tests.py: a revision checked out beside the repository, a tier run with its README's test command,
the counts and times read back into a table."""

import pytest

from ldm.bench.suite import markdown_rows, parse_summary, readme_test_command, TierRun
from tests.paths import REPO_ROOT
from tests.scripts import load_script


def test_pytest_summaries_are_read_with_and_without_decoration():
    assert parse_summary("..\n905 passed, 1 skipped, 83 deselected, 28 warnings in 145.11s (0:02:25)\n") == (
        {"passed": 905, "skipped": 1, "deselected": 83}, 145.11)
    assert parse_summary("==== 1 failed, 3 passed, 2 errors in 5.20s ====") == (
        {"failed": 1, "passed": 3, "error": 2}, 5.2)
    counts, seconds = parse_summary("collected nothing")
    assert counts == {} and seconds != seconds  # nan: no summary line


def test_the_command_is_the_readme_s_and_ratios_are_against_the_first_revision():
    command = readme_test_command(REPO_ROOT)
    assert command[0] == "pytest" and "-n" in command  # the suite runs in parallel as README says
    runs = [TierRun("a", "quick", "pytest", {"passed": 2}, 10.0, 12.0, 20.0, 0),
            TierRun("b", "quick", "pytest -n 2", {"passed": 2}, 5.0, 6.0, 15.0, 0)]
    last = markdown_rows(runs)[-1]
    assert last.startswith("| 1 | b | quick |") and last.endswith("| 0.50 | 0.50 | 0.75 |")


def test_with_rounds_each_ratio_is_within_its_round_and_the_median_is_given():
    runs = [TierRun("a", "quick", "pytest", {}, 10.0, 10.0, 10.0, 0, round=1),
            TierRun("b", "quick", "pytest", {}, 6.0, 6.0, 6.0, 0, round=1),
            TierRun("a", "quick", "pytest", {}, 20.0, 20.0, 20.0, 0, round=2),  # the machine slowed down
            TierRun("b", "quick", "pytest", {}, 10.0, 10.0, 10.0, 0, round=2),
            TierRun("a", "quick", "pytest", {}, 10.0, 10.0, 10.0, 0, round=3),
            TierRun("b", "quick", "pytest", {}, 4.0, 4.0, 4.0, 0, round=3)]
    lines = markdown_rows(runs)
    assert "| 2 | b | quick | `pytest` |" in lines[5] and lines[5].endswith("| 0.50 | 0.50 | 0.50 |")
    assert lines[-1] == "| b | quick | 0.60, 0.50, 0.40 | **0.50** |"


@pytest.mark.slow  # checks out HEAD and runs pytest on one file in a subprocess
def test_the_script_runs_a_revision_s_tier_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    code = load_script("bench_tests").main(["--revisions", "HEAD", "--tiers", "quick", "--tests",
                                            "tests/core/test_colour.py", "--pytest-args=-n 0", "--out", str(out)])
    assert code == 0
    table = (out / "tests.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1 | HEAD | quick |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[4]) > 0 and cells[5] == "0"  # passed, failed
    assert float(cells[7]) > 0 and float(cells[8]) > 0 and float(cells[9]) > 0  # pytest, wall and CPU seconds
    assert "passed" in (out / "quick-HEAD-1.log").read_text()

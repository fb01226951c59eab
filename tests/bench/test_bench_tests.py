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
    assert last.endswith("| 0.50 | 0.75 |")


@pytest.mark.slow  # checks out HEAD and runs pytest on one file in a subprocess
def test_the_script_runs_a_revision_s_tier_and_writes_the_table(tmp_path):
    out = tmp_path / "out"
    code = load_script("bench_tests").main(["--revisions", "HEAD", "--tiers", "quick", "--tests",
                                            "tests/core/test_colour.py", "--pytest-args=-n 0", "--out", str(out)])
    assert code == 0
    table = (out / "tests.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| HEAD | quick |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert int(cells[3]) > 0 and cells[4] == "0"  # passed, failed
    assert float(cells[6]) > 0 and float(cells[7]) > 0 and float(cells[8]) > 0  # pytest, wall and CPU seconds
    assert "passed" in (out / "quick-HEAD.log").read_text()

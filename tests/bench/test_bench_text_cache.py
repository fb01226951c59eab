"""The cached-text benchmark over a fine-tune's base (a toy SD file of the public layout): both sides train from the
base, the cached side builds no text encoder parameters, and the table names its command."""

import pytest

from scripts.bench_text_cache import main
from tests.sd_toy import write_sd_file

pytestmark = pytest.mark.slow  # two measuring subprocesses


def test_the_base_benchmark_measures_both_sides_from_the_base_file(tmp_path):
    ckpt, config = write_sd_file(tmp_path, seed=1)
    out = tmp_path / "out"
    main(["--base", str(ckpt), "--base-config", str(config), "--batch", "2", "--out", str(out)])
    lines = (out / "text_cache.md").read_text().splitlines()
    rows = {line.split("|")[1].strip(): line.split("|")[2:6]
            for line in lines if line.startswith(("| encoder", "| cached"))}
    assert rows.keys() == {"encoder in the loop", "cached embeddings"}
    for step, peak, after, params in rows.values():
        assert float(step) > 0 and float(peak) > 0 and float(after) > 0
    assert rows["cached embeddings"][3].strip() == "0" and rows["encoder in the loop"][3].strip() != "0"
    assert f"--base {ckpt}" in (out / "text_cache.md").read_text()


def test_a_base_file_needs_its_config(tmp_path):
    with pytest.raises(SystemExit):
        main(["--base", str(tmp_path / "x.safetensors"), "--out", str(tmp_path)])

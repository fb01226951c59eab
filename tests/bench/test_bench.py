"""scripts/bench.py end to end at toy size (--quick): a well-formed Markdown table and CSV, checked twins."""

import contextlib
import csv
import io

import pytest
import torch

from ldm.bench.mapping import (
    diffusers_unet_config,
    diffusers_vae_config,
    heads_per_level,
)
from ldm.bench.report import COLUMNS, Row, markdown_table
from tests.scripts import load_script

pytestmark = pytest.mark.slow  # subprocesses / compiles / end-to-end: `pytest -m "not slow"` skips them

MEASUREMENTS = {  # row name prefix → unit, for every row the script writes
    "U-Net train step (fwd+bwd+AdamW), ours vs diffusers": "steps/s",
    "U-Net step achieved FLOP/s (ours)": "GFLOP/s",
    "U-Net step achieved FLOP/s (diffusers)": "GFLOP/s",
    "U-Net train step peak memory beyond weights, grads, AdamW state, ours vs diffusers": "MiB",
    "U-Net train step peak memory beyond weights, grads, AdamW state, checkpointing vs none": "MiB",
    "U-Net train step, checkpointing vs none": "steps/s",
    "U-Net train step, channels-last vs contiguous": "steps/s",
    "U-Net train step, compiled vs eager (ours)": "steps/s",
    "AdamW update of the U-Net, fused vs default": "steps/s",
    "VAE encode": "images/s",
    "VAE decode": "images/s",
    "stage-2 train step, cached latents vs on-the-fly VAE encoding (f = 8)": "steps/s",
    "sampling DPM-Solver++(2M) 20 steps + CFG, ours vs diffusers": "images/s",
    "sampling DPM-Solver++(2M) 20 steps + CFG, ours compiled vs diffusers eager": "images/s",
    "sampling DPM-Solver++(2M) 20 steps + CFG, both compiled, ours vs diffusers": "images/s",
}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    """One --quick run of the whole benchmark (fp32 only, one thread: the test machine is shared), in this process:
    its main() is the command line's (the imports of a second process would cost more than the toy measurements)."""
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("bench")
    stdout, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(stdout):
            load_script("bench").main(["--quick", "--precision", "fp32", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, stdout.getvalue()


def test_csv_has_every_measurement_with_positive_values_and_consistent_ratios(bench_out):
    out, _ = bench_out
    with open(out / "bench.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == COLUMNS
    body = [dict(zip(COLUMNS, r)) for r in rows[1:]]
    assert all(len(r) == len(COLUMNS) for r in rows)
    for prefix, unit in MEASUREMENTS.items():
        matching = [r for r in body if r["measurement"].startswith(prefix)]
        assert matching, f"no row {prefix!r}"
        assert all(r["unit"] == unit and r["precision"] == "fp32" for r in matching)
    for r in body:
        ours, theirs, ratio = float(r["ours"]), float(r["theirs"]), float(r["ratio"])
        assert ours > 0 and theirs > 0, r
        assert ratio == pytest.approx(ours / theirs, rel=2e-3), r


def test_markdown_table_matches_the_csv_and_notes_report_the_checks(bench_out):
    out, stdout = bench_out
    text = (out / "bench.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and set(table[1]) <= set("|-")
    n_rows = len((out / "bench.csv").read_text().splitlines()) - 1
    assert len(table) == n_rows + 2
    assert all(line.count("|") == len(COLUMNS) + 1 for line in table)
    assert all(line.split("|")[4].strip().endswith("×") for line in table[2:])  # the ratio column
    assert "\n".join(table) in stdout  # the script prints the same table
    assert "parameters on both sides (checked equal)" in text
    assert "Compiled sampling: both U-Nets by ldm.nets.compile.compile_network(inference=True) (backend aot_eager" in text
    assert "compile=False (backend aot_eager)" in text  # --quick: no C++ kernels built for a smoke test
    assert "Goal ≥ 1.2× for U-Net train step" in text and "Goal ≥ 3.0× for stage-2" in text


def test_attention_rows_compare_bf16_attention_and_only_when_bf16_is_asked_for():
    from ldm.bench.attention import measure_attention
    from ldm.bench.sizes import QUICK
    from ldm.bench.steps import Options

    opts = Options(torch.device("cpu"), warmup=0, repeats=1)
    assert measure_attention(QUICK, opts, ["fp32"]) == []
    rows = measure_attention(QUICK, opts, ["fp32", "bf16"])
    assert len(rows) == 4 and all(r.precision == "bf16" and r.unit == "calls/s" for r in rows)
    assert all(r.ours > 0 and r.theirs > 0 for r in rows)
    assert any("shapes-text self" in r.measurement for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--only", "unet,speed"], "--only 'unet,speed': choose from unet"),
    (["--precision", "fp16"], "--precision 'fp16': choose from fp32, bf16"),
    (["--repeats", "0"], "--repeats must be ≥ 1"),
])
def test_bad_choices_are_one_line_errors(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        load_script("bench").main([*argv, "--out", str(tmp_path)])


def test_unet_mapping_follows_openaimodel_head_rules_and_rejects_what_diffusers_lacks():
    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 2],
                  attention_resolutions=[2], channel_mult=[1, 2, 2], num_head_channels=16,
                  use_spatial_transformer=True, context_dim=16)
    config = diffusers_unet_config(params)
    assert config["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert config["attention_head_dim"] == heads_per_level(params) == [2, 4, 4]
    assert config["layers_per_block"] == [1, 2] and config["block_out_channels"] == [32, 64, 64]
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        diffusers_unet_config({**params, "use_scale_shift_norm": True})
    vae = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[16], dropout=0.0)
    with pytest.raises(ValueError, match="attn_resolutions"):
        diffusers_vae_config(vae, 4)
    assert diffusers_vae_config({**vae, "attn_resolutions": []}, 4)["block_out_channels"] == [32, 64]


def test_diffusers_twin_of_a_unet_with_a_plain_level_matches_ours():
    pytest.importorskip("diffusers")
    from ldm.bench.steps import fill_zero_init
    from ldm.bench.twins import diffusers_unet_like
    from ldm.nets.unet.model import UNetModel

    params = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
                  attention_resolutions=[2], channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
                  context_dim=16, legacy=False)
    torch.manual_seed(0)
    ours = fill_zero_init(UNetModel(**params)).eval()
    theirs = diffusers_unet_like(ours, params).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    t = torch.tensor([3.0, 800.0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample,
                                   atol=1e-5, rtol=1e-5)


def test_ratio_is_ours_over_theirs():
    rows = [Row("a", 3.0, 2.0, "steps/s", "fp32"), Row("b", 1.0, 0.0, "MiB", "bf16")]
    assert rows[0].ratio == 1.5
    table = markdown_table(rows)
    assert "| a | 3 | 2 | 1.50× | steps/s | fp32 |" in table and "nan×" in table


# scripts/bench_lora.py's table (trainable counts, AdamW state, SD 1.5 counts): tests/bench/tables.py, checked on the
# one run of README's command (tests/test_readme.py::test_readme_benchmark_runs).

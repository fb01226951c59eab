"""scripts/evaluate.py's sampling measures (adherence, classes, fid, edges, all) end to end on toy runs written from
in-memory components (tests/components.py; untrained: the measures run, their values are not judged).

The reader itself (≥ 99 % on real images, near 0 on shuffled prompts) is tested in test_shapes_reader.py.
"""

import csv
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from ldm.data.shapes import COLORS, SHAPES, ShapesDataset
from ldm.eval.edges_eval import takes_control
from ldm.eval.heldout import balanced_classes, held_out
from ldm.eval.report import append_csv, markdown_table
from ldm.eval.sampled import parse_samplers
from ldm.eval.shapes_reader import adherence
from tests.scripts import load_script

# Quick classifiers are kept between test sessions (seconds to train, but seconds add up on 2 cores).
CLASSIFIER_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "ldm-test-cache" / "classifier"
ADHERENCE_COLUMNS = ["command", "run", "sampler", "steps", "nfe", "scale", "n", "adherence_pct", "shape_pct",
                     "color_pct", "background_pct", "images_per_s"]


evaluate = load_script("evaluate")


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _table(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[1].startswith("|---")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert len({len(row) for row in cells}) == 1  # every line has the header's columns
    return [cells[0]] + cells[2:]


def test_held_out_set_is_balanced_fixed_and_real():
    labels = balanced_classes(168)
    assert sorted(labels) == list(range(168))  # every class once before any repeats
    held = held_out(48, size=32)
    assert Counter(f["shape"] for f in held.factors) == {s: 16 for s in SHAPES}
    assert Counter(f["color"] for f in held.factors) == {c: 6 for c in COLORS}
    assert Counter(f["background"] for f in held.factors) == {c: 6 for c in COLORS}
    assert held.indices == held_out(48).indices and held.captions == held_out(48, size=16).captions
    labels = [ShapesDataset(size=32, length=10**6, split="val").spec(i).label for i in range(max(held.indices) + 1)]
    assert held.indices == [labels.index(label) for label in balanced_classes(48)]  # the first val item of each class
    assert all(f["shape"] in c and f"{f['color']} {f['shape']}" in c for f, c in zip(held.factors, held.captions))
    assert adherence(held.images, held.factors)["all"] >= 0.99  # renders match the factors they claim


def test_sampler_lists_and_errors():
    assert parse_samplers("ddim:50, dpmpp_2m:20,") == [("ddim", 50), ("dpmpp_2m", 20)]
    for bad in ("ddim", "ddim:0", "nope:5", ""):
        with pytest.raises(ValueError):
            parse_samplers(bad)


def test_adherence_end_to_end(toy_ldm_run, tmp_path, capsys):
    out = tmp_path / "eval"
    rows = evaluate.main(["adherence", "--run", str(toy_ldm_run), "--n", "4", "--samplers", "ddim:2,dpmpp_2m:3,ddpm:4",
                          "--scale", "3", "--out", str(out), "--grid", str(tmp_path / "grid.png")])
    printed = capsys.readouterr().out
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("ddim", 2, 2), ("dpmpp_2m", 3, 3), ("ddpm", 4, 4), ("dpmpp_2m", 20, 20)]  # NFE counted, CFG batched
    for row in rows[:3]:
        assert row["n"] == 4 and all(0 <= row[k] <= 100 for k in ADHERENCE_COLUMNS[7:11]) and row["images_per_s"] > 0
        assert row["adherence_pct"] <= min(row["shape_pct"], row["color_pct"], row["background_pct"])
    assert rows[3]["adherence_pct"] == "—" and rows[3]["n"] == "8 (speed)" and rows[3]["images_per_s"] > 0
    table = _table((out / "eval.md").read_text())
    assert table[0] == ADHERENCE_COLUMNS and len(table) == 5 and (out / "eval.md").read_text() in printed
    with open(out / "eval.csv") as f:
        assert [r["sampler"] for r in csv.DictReader(f)] == ["ddim", "dpmpp_2m", "ddpm", "dpmpp_2m"]
    assert Image.open(tmp_path / "grid.png").size[0] > 4 * 16  # four 16-px samples side by side


def test_classes_and_fid_end_to_end(toy_class_run, toy_ldm_run, tmp_path, capsys):
    common = ["--n", "6", "--sampler", "ddim:2", "--quick", "--classifier-cache", str(CLASSIFIER_CACHE)]
    row = evaluate.main(["classes", "--run", str(toy_class_run), *common, "--out", str(tmp_path)])
    assert row["nfe"] == 2 and row["n"] == 6 and 0 <= row["class_accuracy_pct"] <= 100
    assert 0 <= row["reader_adherence_pct"] <= 100 and 0 <= row["fid"] < float("inf")
    assert _table(capsys.readouterr().out)[0][-3:] == ["class_accuracy_pct", "reader_adherence_pct", "fid"]
    row = evaluate.main(["fid", "--run", str(toy_ldm_run), *common, "--csv", str(tmp_path / "fid.csv")])
    assert row["n"] == 6 and 0 <= row["fid_real_vs_real"] < row["fid"] < float("inf")  # an untrained model is far off
    with open(tmp_path / "fid.csv") as f:
        assert [r["command"] for r in csv.DictReader(f)] == ["fid"]


def test_wrong_runs_and_arguments_are_one_line_errors(toy_vae_run, toy_ldm_run, tmp_path, capsys):
    assert "run not found" in _error(capsys, ["adherence", "--run", str(tmp_path / "missing")])
    assert "is not a stage-2" in _error(capsys, ["fid", "--run", str(toy_vae_run)])
    assert "text-conditional run" in _error(capsys, ["classes", "--run", str(toy_ldm_run), "--n", "2"])
    assert "unknown sampler 'dpm'" in _error(capsys, ["adherence", "--run", str(toy_ldm_run), "--samplers", "dpm:5"])
    assert "--n must be a positive" in _error(capsys, ["adherence", "--run", str(toy_ldm_run), "--n", "0"])
    assert "--n must be at least 2" in _error(capsys, ["fid", "--run", str(toy_ldm_run), "--n", "1"])
    assert "name at least one run" in _error(capsys, ["all", "--out", str(tmp_path)])
    assert "is not a VAE run" in _error(capsys, ["all", "--vae", str(toy_ldm_run), "--out", str(tmp_path)])
    message = "has no ControlNet" if takes_control() else "cannot take control images"
    assert message in _error(capsys, ["edges", "--run", str(toy_ldm_run), "--n", "2"])


@pytest.mark.skipif(not takes_control(), reason="ldm.inference.pipeline has no control= argument yet (ControlNet sampling "
                                                 "is being added); `evaluate.py edges` is written against it")
def test_edges_end_to_end(toy_controlnet_run, tmp_path, capsys):
    row = evaluate.main(["edges", "--run", str(toy_controlnet_run), "--n", "4", "--sampler", "ddim:2", "--out", str(tmp_path),
                         "--grid", str(tmp_path / "edges.png")])
    assert row["nfe"] == 2 and row["n"] == 4 and 0 <= row["edge_f1"] <= 1 and 0 <= row["edge_recall"] <= 1
    assert _table((tmp_path / "eval.md").read_text())[0][-4:] == ["edge_precision", "edge_recall", "edge_f1",
                                                                  "reader_adherence_pct"]
    assert Image.open(tmp_path / "edges.png").size[1] > 2 * 16  # hints above outputs


def test_all_gathers_one_table(toy_vae_run, toy_ldm_run, toy_class_run, tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["all", "--vae", str(toy_vae_run), "--ldm", str(toy_ldm_run), "--class-run", str(toy_class_run),
            "--n", "4", "--samplers", "ddim:2", "--sampler", "ddim:3", "--quick", "--classifier-cache", str(CLASSIFIER_CACHE), "--grids",
            "--out", str(out)]
    stale = {"time": "2000-01-01 00:00:00", "section": "vae", "run": "old", "setting": "old", "measure": "PSNR (dB)",
             "value": 0.0}
    append_csv(out / "eval.csv", stale)  # what an earlier `all` left: rewritten, not appended to
    (out / "eval.md").write_text(markdown_table([stale]) + "\n")
    rows = evaluate.main(argv)
    capsys.readouterr()
    assert {r["section"] for r in rows} == {"vae", "adherence", "fid", "classes"}
    measures = {(r["section"], r["measure"]) for r in rows}
    assert {("vae", "PSNR (dB)"), ("adherence", "adherence %"), ("classes", "class accuracy %"),
            ("fid", "feature FID")} <= measures
    assert {r["setting"].split(",")[0] for r in rows if r["section"] in ("fid", "classes")} == {"ddim 3 steps"}
    table = _table((out / "eval.md").read_text())
    assert table[0] == ["section", "run", "setting", "measure", "value"] and len(table) == len(rows) + 1
    with open(out / "eval.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) and "old" not in {r["run"] for r in written}
    assert {p.name for p in out.glob("*.png")} == {"vae.png", "adherence.png", "fid.png", "classes.png"}

"""scripts/make_edges.py, scripts/plot_metrics.py and scripts/evaluate.py, end to end on tiny inputs."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ldm.data.edges import canny
from ldm.data.shapes import ShapesDataset
from tests.forked import fork_script
from tests.procs import finish
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]


make_edges = load_script("make_edges")
plot_metrics = load_script("plot_metrics")
evaluate = load_script("evaluate")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------------------ make_edges

@pytest.fixture
def image_folder(tmp_path):
    data = tmp_path / "data"
    ds = ShapesDataset(size=32, length=4, split="val")
    (data / "a" / "b").mkdir(parents=True)
    ds.render(0).save(data / "top.png")
    ds.render(1).save(data / "a" / "one.jpg", quality=95)
    ds.render(2).save(data / "a" / "b" / "two.png")
    rgba = ds.render(3).convert("RGBA")
    rgba.save(data / "a" / "b" / "alpha.png")
    (data / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (data / "notes.txt").write_text("not an image")
    return data


def test_make_edges_mirrors_folders_skips_broken_and_resumes(image_folder, capsys):
    out = image_folder / "edges"  # inside the data folder: must not be scanned as input
    counts = make_edges.main(["--data", str(image_folder), "--out", str(out)])
    assert counts == {"written": 4, "existing": 0, "skipped": 1}
    err = capsys.readouterr().err
    assert "skipped 1 file(s): a/broken.png" in err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a/b/alpha.png", "a/b/two.png", "a/one.png", "top.png"]
    edges = np.asarray(Image.open(out / "a" / "b" / "two.png"))
    expected = canny(Image.open(image_folder / "a" / "b" / "two.png"))
    assert edges.dtype == np.uint8 and edges.ndim == 2 and set(np.unique(edges)) == {0, 255}
    assert np.array_equal(edges, expected)
    again = make_edges.main(["--data", str(image_folder), "--out", str(out)])
    assert again == {"written": 0, "existing": 4, "skipped": 1}  # resumed: nothing redone, edges/ not read
    redo = make_edges.main(["--data", str(image_folder), "--out", str(out), "--overwrite", "--size", "16"])
    assert redo["written"] == 4 and Image.open(out / "top.png").size == (16, 16)


def test_make_edges_refuses_escaping_outputs_and_bad_arguments(image_folder, tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "a")  # a link inside --out pointing outside it
    counts = make_edges.main(["--data", str(image_folder), "--out", str(out)])
    assert counts == {"written": 1, "existing": 0, "skipped": 4}  # only top.png: every a/... is refused
    assert not list(elsewhere.rglob("*"))
    assert "escapes the output folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        make_edges.main(["--data", str(image_folder), "--low", "200", "--high", "100"])
    assert e.value.code == 2 and "low <= high" in _error_line(capsys)
    with pytest.raises(SystemExit) as e:
        make_edges.main(["--data", str(tmp_path / "missing")])
    assert e.value.code == 2 and "not a folder" in _error_line(capsys)


# ---------------------------------------------------------------------------------------- plot_metrics

def _write_metrics(run: Path) -> Path:
    run.mkdir(parents=True)
    path = run / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/loss", "lr"])
        for step in range(40):
            writer.writerow([0, step, 1.0 / (step + 1) + 0.01 * (step % 3), "", 1e-4])
            if step % 10 == 9:
                writer.writerow([0, step, "", 0.5 / (step + 1), ""])
    return path


def test_plot_metrics_writes_one_panel_per_key(tmp_path, capsys):
    run = tmp_path / "run"
    _write_metrics(run)
    out = plot_metrics.main([str(run), "--smooth", "0.8"])
    assert out == run / "loss.png"
    two = Image.open(out)
    one = Image.open(plot_metrics.main([str(run / "metrics.csv"), "--keys", "lr", "--out", str(tmp_path / "lr.png")]))
    assert two.size[0] == one.size[0] and two.size[1] == 2 * one.size[1]  # train/loss and val/loss panels
    series = plot_metrics.read_metrics(run / "metrics.csv")
    assert len(series["val/loss"][0]) == 4 and series["val/loss"][0][0] == 9.0
    assert plot_metrics.smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        plot_metrics.main([str(run), "--keys", "train/los"])
    assert e.value.code == 2 and "available: train/loss" in _error_line(capsys)
    with pytest.raises(SystemExit):
        plot_metrics.main([str(tmp_path / "nowhere")])
    assert "no metrics.csv" in _error_line(capsys)


# -------------------------------------------------------------------------------------------- evaluate

def _fake_run(root: Path, model_target: str) -> Path:
    run = root / "not-a-vae"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"target": model_target, "params": {}}, "data": {"target": "ldm.data.module.DataModule"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_evaluate_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["vae", "--run", str(tmp_path / "missing")], "run not found"),
        (["vae", "--run", str(_fake_run(tmp_path, "ldm.nets.unet.model.UNetModel"))], "is not a VAE run"),
        (["vae", "--run", str(tmp_path / "missing"), "--n", "many"], "invalid int value"),
        (["nonsense"], "invalid choice"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code == 2
        assert message in _error_line(capsys)
    assert not (tmp_path / "not-a-vae" / "eval.csv").exists()


@pytest.fixture(scope="module")
def vae_run(toy_vae_run):
    """A stage-1 run on disk, written from the in-memory toy VAE (the measures run on any VAE; none is trained)."""
    return toy_vae_run


def test_evaluate_vae_end_to_end(vae_run, tmp_path, capsys):
    csv_path = tmp_path / "results" / "eval.csv"
    row = evaluate.main(["vae", "--run", str(vae_run.parent / "latest"), "--n", "6", "--csv", str(csv_path), "--grid"])
    out = capsys.readouterr().out
    assert "| command | run | data | n | psnr_db | ssim | lpips |" in out
    assert row["n"] == 6 and row["data"] == "data.val" and 0 < row["psnr_db"] < 60 and -1 <= row["ssim"] <= 1
    assert isinstance(row["lpips"], float) or row["lpips"] == "n/a (no VGG weights)"
    grid = Image.open(csv_path.parent / "vae-recon.png")
    assert grid.size[1] > 2 * 16  # inputs above reconstructions
    evaluate.main(["vae", "--run", str(vae_run), "--n", "100", "--csv", str(csv_path)])  # clipped to the 8 val images
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [r["n"] for r in rows] == ["6", "8"] and rows[0]["run"] == vae_run.name
    args = evaluate.build_parser().parse_args(["vae", "--run", str(vae_run.parent / "latest")])
    assert evaluate.default_csv(args) == vae_run / "eval.csv"  # default CSV: inside the run
    with pytest.raises(SystemExit) as e:
        evaluate.main(["vae", "--run", str(vae_run), "--n", "0"])
    assert e.value.code == 2 and "--n must be a positive" in _error_line(capsys)


@pytest.mark.slow
def test_evaluate_cli_exit_code_without_traceback(tmp_path):
    """The script's own exit (``python scripts/evaluate.py …`` as ``__main__``), in a child forked from here."""
    log, err = tmp_path / "evaluate.log", tmp_path / "evaluate.err"
    finish(fork_script(REPO / "scripts" / "evaluate.py", ["vae", "--run", str(tmp_path / "x")], log, err=err), log,
           code=2)
    stderr = err.read_text()
    assert stderr.strip().startswith("error: run not found") and "Traceback" not in stderr


def test_csv_rows_with_new_columns_keep_the_old_ones(tmp_path):
    from ldm.eval.report import append_csv, markdown_table

    path = tmp_path / "eval.csv"
    append_csv(path, {"command": "vae", "psnr_db": 20.123456})
    append_csv(path, {"command": "vae", "psnr_db": float("inf")})
    append_csv(path, {"command": "edges", "edge_f1": 0.5})  # new column: the file is rewritten with the union
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["psnr_db"] for r in rows] == ["20.1235", "inf", ""] and rows[2]["edge_f1"] == "0.5000"
    assert markdown_table([{"a": 1, "b": 0.5}]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5000 |"]


def test_evaluate_vae_offline_makes_no_network_attempt(vae_run, tmp_path, monkeypatch, capsys):
    """Without VGG16 weights on disk, LPIPS is reported n/a before anything reaches for the network."""
    import socket

    from ldm.eval import lpips as eval_lpips

    attempts = []

    def guard(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in an offline evaluation")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(eval_lpips, "_LPIPS", {})
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, guard)
    monkeypatch.setattr(socket, "getaddrinfo", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    row = evaluate.main(["vae", "--run", str(vae_run), "--n", "2", "--csv", str(tmp_path / "eval.csv")])
    out = capsys.readouterr().out
    assert row["lpips"] == "n/a (no VGG weights)"
    assert "note: LPIPS n/a: torchvision's VGG16 weights are not on this machine" in out
    assert attempts == []

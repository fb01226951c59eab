"""Shared test set-up: offline, toy sizes, runs written under a temporary folder."""

import gc
import os
import shutil
import tempfile

MEMORY_FS = "/dev/shm"  # Linux's memory filesystem: the tests' runs and files skip the disk (fsync, rename, unlink)
MEMORY_FS_MIN_FREE_GIB = 8  # the whole suite writes ~4 GB at most, each passing test's files removed after it


def temporary_files_in_memory() -> None:
    """Temporary files (pytest's tmp_path, the runs folders, the processes tests start) on the memory filesystem,
    unless TMPDIR is set or it is missing or short of room: the suite writes thousands of checkpoints, fsyncing each."""
    if "TMPDIR" in os.environ or not os.access(MEMORY_FS, os.W_OK):
        return
    if shutil.disk_usage(MEMORY_FS).free < MEMORY_FS_MIN_FREE_GIB * 2**30:
        return
    root = os.path.join(MEMORY_FS, f"ldm-tests-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.environ["TMPDIR"] = root  # inherited by pytest-xdist's workers and by subprocesses
    tempfile.tempdir = None  # tempfile reads TMPDIR again


temporary_files_in_memory()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["OMP_NUM_THREADS"] = "1"  # what stages and scripts called in-process take for --threads (ldm.core.threads)
# one runs folder per test process (pytest-xdist names its workers gw0, gw1, …)
os.environ.setdefault("LDM_RUNS_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                   "ldm-test-runs-" + os.environ.get("PYTEST_XDIST_WORKER", "main")))

import pytest

from tests.paths import REPO_ROOT, TINY  # noqa: F401  (TINY: imported by tests from here)

# torch, Lightning (the driver) and the toy components are imported inside the fixtures: under pytest-xdist the
# controlling process loads this file too but runs no test, and those imports cost it seconds of CPU for nothing.


WORKER_MEMORY_GIB = 3  # what one test process may reach (toy nets, diffusers twins, a 2-process DDP pair it starts)


def pytest_xdist_auto_num_workers(config) -> int:
    """`pytest -n auto`: one test process per core this process may use, no more than memory holds."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(len(os.sched_getaffinity(0)), int(memory_gib // WORKER_MEMORY_GIB)))


GC_THRESHOLDS = (50_000, 20, 100)  # young objects between collections, and the older generations' counts (default 700, 10, 10)


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collect with the garbage collector off, then freeze what collection imported: the libraries' ~600k objects
    (torch, Lightning, transformers, diffusers) are never traced again, and tests run with fewer, younger
    collections (measured: GC time 2.2 → 0.6 CPU-s on tests/inference/test_pipeline.py tests/diffusion tests/nets).
    The ~33k unreachable objects the imports left are frozen with the rest, not collected first (0.46 CPU-s a
    process, for a few MB)."""
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        gc.enable()


def pytest_collection_modifyitems(config, items) -> None:
    """In a pytest-xdist worker, the slow tests first (each group in its own order): the long ones start early, and
    the run ends on short tests that both workers share out, not on one worker alone with a long test."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(tryfirst=True)
def pytest_warning_recorded(warning_message, when, nodeid, location) -> None:
    """In a pytest-xdist worker, a warning of a library's own class (Lightning's PossibleUserWarning, …) goes to the
    controlling process as its nearest built-in class, the library's class named in the text: to rebuild it, that
    process would import the class's module (Lightning: torch, torchmetrics, … 4.5 CPU-s and 800 MB taken from the
    workers, measured with the quick tier)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    category = warning_message.category
    if category is not None and category.__module__ != "builtins":
        builtin = next(c for c in category.__mro__ if c.__module__ == "builtins")
        warning_message.message = f"{category.__module__}.{category.__qualname__}: {warning_message.message}"
        warning_message.category = builtin


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Toy nets run thousands of tiny ops: on 2 cores (often shared) torch's second thread only adds
    spin-waits at every op's barrier, so the suite runs on one; restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def cli_logging():
    """The ``ldm`` loggers set up as a command sets them up (their own handlers, not propagating) before the first
    test: caplog attaches to them in every test, not only in those after the first that ran a command in-process."""
    from ldm.core.logging import setup_cli_logging

    setup_cli_logging()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A session-wide folder for the runs and caches the end-to-end fixtures share."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def tiny_vae_run(workdir):
    """A stage-1 run of the tiny VAE config (6 steps), trained once per test session."""
    from ldm.training.driver import train

    return train("vae", str(TINY / "vae.yaml"), ["--cfg", str(TINY / "vae.yaml"), "--runs-dir", str(workdir / "runs")])


@pytest.fixture(scope="session")
def tiny_ldm_run(workdir, toy_vae_run):
    """A stage-2 text run of the tiny config on a cache of the toy VAE, trained once per test session."""
    from ldm.training.cache import ensure_cache
    from ldm.training.driver import train

    cfg = str(TINY / "ldm-text.yaml")
    overrides = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    return train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(workdir / "runs"), *overrides], before_build=ensure_cache)


@pytest.fixture(scope="session")
def tiny_flow_run(workdir, toy_vae_run):
    """A stage-2 rectified-flow run of the tiny config on the toy text cache, trained once per test session."""
    from ldm.training.driver import train

    cfg = str(TINY / "ldm-flow.yaml")
    overrides = [f"cache.vae={toy_vae_run}", f"cache.dir={workdir / 'cache' / 'toy-text'}"]
    return train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(workdir / "runs"), "--name", "flow", *overrides])


@pytest.fixture(scope="session")
def tiny_class_run(workdir, toy_vae_run):
    """A class-conditional stage-2 run (3 steps) on a cache of the toy VAE, trained once per test session: its latent
    scale is the one a cache of that VAE measures, as a classifier's trained on such a cache is."""
    from ldm.training.cache import ensure_cache
    from ldm.training.driver import train

    cfg = str(TINY / "ldm-class.yaml")
    return train("ldm", cfg, ["--cfg", cfg, "--runs-dir", str(workdir / "class-runs"), "trainer.max_steps=3",
                              "callbacks=[]", f"cache.vae={toy_vae_run}",
                              f"cache.dir={workdir / 'cache' / 'toy-class'}"], before_build=ensure_cache)


# Runs written from in-memory toy components (tests/components.py): the tiny configs' architectures with seeded
# random weights, config.yaml + checkpoints/last.ckpt as the driver leaves them, no training. For tests that need
# a run on disk but not a trained one (loaders, Pipeline.from_run, export, txt2img, evaluate, refusals).


@pytest.fixture(scope="session")
def toy_vae_run(workdir):
    """A stage-1 run of configs/tiny/vae.yaml holding tests.components.tiny_vae() (untrained)."""
    from tests.components import write_vae_run

    return write_vae_run(workdir / "toy-runs")


@pytest.fixture(scope="session")
def toy_ldm_run(workdir, toy_vae_run):
    """A stage-2 text run of configs/tiny/ldm-text.yaml on toy_vae_run holding tests.components.tiny_ldm("text")."""
    from tests.components import write_ldm_run

    return write_ldm_run(workdir / "toy-runs", toy_vae_run, "text", cache_dir=workdir / "cache" / "toy-text")


@pytest.fixture(scope="session")
def toy_class_run(workdir, toy_vae_run):
    """A stage-2 class run of configs/tiny/ldm-class.yaml on toy_vae_run (168 classes), untrained."""
    from tests.components import write_ldm_run

    return write_ldm_run(workdir / "toy-class-runs", toy_vae_run, "class", cache_dir=workdir / "cache" / "toy-class")


@pytest.fixture(scope="session")
def toy_flow_run(workdir, toy_vae_run):
    """A stage-2 rectified-flow run of configs/tiny/ldm-flow.yaml on toy_vae_run, untrained."""
    from tests.components import write_ldm_run

    return write_ldm_run(workdir / "toy-flow-runs", toy_vae_run, "flow", cache_dir=workdir / "cache" / "toy-text")


@pytest.fixture(scope="session")
def toy_controlnet_run(workdir, toy_ldm_run, toy_vae_run):
    """A ControlNet run of configs/tiny/controlnet.yaml on toy_ldm_run, its zero convolutions nonzero (as trained)."""
    from tests.components import write_control_run

    return write_control_run(workdir / "toy-runs", toy_ldm_run, toy_vae_run)

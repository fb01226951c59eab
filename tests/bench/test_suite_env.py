"""The suite benchmark's environment: compiled modules are written, and a tree is collected once before timing."""

from ldm.bench.suite import tree_env, warm


def test_the_environment_writes_compiled_modules_and_puts_the_tree_first(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    env = tree_env(tmp_path)
    assert "PYTHONDONTWRITEBYTECODE" not in env
    assert env["PYTHONPATH"] == str(tmp_path) and env["OMP_NUM_THREADS"] == "1"
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))  # the tree's own kernels, compiled cold


def test_warming_a_tree_caches_its_package_and_its_rewritten_tests(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")  # as on a machine that sets it: the bench writes anyway
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("VALUE = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_value.py").write_text("from pkg import VALUE\n\n\ndef test_value():\n    assert VALUE\n")
    warm(tmp_path)
    assert list((tmp_path / "pkg" / "__pycache__").glob("__init__.*.pyc"))
    assert list((tmp_path / "tests" / "__pycache__").glob("test_value.*pytest*.pyc"))  # pytest's rewritten module

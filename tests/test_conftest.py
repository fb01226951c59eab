"""The suite's own set-up (tests/conftest.py): temporary files on the memory filesystem, and workers' warnings sent
to pytest-xdist's controlling process as built-in classes."""

import os
import tempfile
import warnings

import pytest

from tests.conftest import MEMORY_FS, pytest_warning_recorded, temporary_files_in_memory


class LibraryWarning(UserWarning):
    """A warning class of some library's own (as Lightning's PossibleUserWarning)."""


def recorded(category: type[Warning]) -> warnings.WarningMessage:
    return warnings.WarningMessage(category("careful"), category, "lib.py", 3)


def test_a_worker_sends_a_library_s_warning_as_its_built_in_base_naming_the_class(monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw9")
    library, builtin = recorded(LibraryWarning), recorded(FutureWarning)
    pytest_warning_recorded(library, "runtest", "t.py::test", None)
    pytest_warning_recorded(builtin, "runtest", "t.py::test", None)
    assert library.category is UserWarning and library.message == "tests.test_conftest.LibraryWarning: careful"
    assert builtin.category is FutureWarning and isinstance(builtin.message, FutureWarning)  # left as it was


def test_outside_a_worker_warnings_are_left_as_they_are(monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    library = recorded(LibraryWarning)
    pytest_warning_recorded(library, "runtest", "t.py::test", None)
    assert library.category is LibraryWarning


@pytest.mark.skipif(not os.access(MEMORY_FS, os.W_OK), reason="no memory filesystem here")
def test_temporary_files_go_to_memory_unless_tmpdir_is_set(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # restored after
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    temporary_files_in_memory()
    assert os.environ["TMPDIR"] == str(tmp_path)  # the user's choice stands
    monkeypatch.delenv("TMPDIR")
    temporary_files_in_memory()
    assert os.environ["TMPDIR"].startswith(MEMORY_FS + os.sep) and tempfile.gettempdir() == os.environ["TMPDIR"]

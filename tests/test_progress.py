"""Progress bars: on for a person at a terminal, off in logs and pipes, forced by option or variable."""

from __future__ import annotations

import io
import json

import pytest

from monai_skipts.progress import PROGRESS_ENV, progress_bar, progress_enabled, write_run_status


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_enabled(None, _Terminal()) and not progress_enabled("auto", io.StringIO())
    assert progress_enabled("on", io.StringIO()) and not progress_enabled("off", _Terminal())
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not progress_enabled(None, _Terminal()) and progress_enabled("on", _Terminal())
    monkeypatch.setenv(PROGRESS_ENV, "1")
    assert progress_enabled("auto", io.StringIO())
    monkeypatch.setenv(PROGRESS_ENV, "sometimes")
    with pytest.raises(ValueError, match=PROGRESS_ENV):
        progress_enabled(None)


def test_bar_off_returns_the_iterable_and_prints_nothing(capsys):
    items = [1, 2, 3]
    assert progress_bar(items, enabled=False) is items
    assert list(progress_bar(items, desc="x", enabled=True)) == items
    assert "3/3" in capsys.readouterr().err


def test_run_status_refuses_an_unknown_state(tmp_path):
    assert json.loads(write_run_status(tmp_path, "running", n_inputs=2).read_text()) == {
        "status": "running",
        "n_inputs": 2,
    }
    with pytest.raises(ValueError, match="status must be one of"):
        write_run_status(tmp_path, "done")

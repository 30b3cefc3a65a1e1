"""Progress: a line per stage with rate and ETA when no terminal or notebook can show a bar."""

import lensattr.progress as progress
from lensattr.progress import Progress


def test_lines_with_rate_and_eta_off_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    with Progress(total=4, desc="caching", unit="ex") as p:  # stderr is captured: not a tty
        p.update(1)
        p.update(3)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("lensattr caching: 1/4 (25%), ") and "ex/s, ETA " in lines[0]
    assert lines[-1].startswith("lensattr caching: 4/4 (100%)") and lines[-1].endswith("done")


def test_silent_when_disabled(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    with Progress(total=2, desc="x", enabled=False) as p:
        p.update(2)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with Progress(total=2, desc="x") as p:
        p.update(2)
    assert capsys.readouterr().err == ""

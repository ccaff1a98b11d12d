"""Helpers for CLI tests: run ``main([...])`` and read its fixed-width, colourless output."""

from __future__ import annotations

import json

import pytest

from moa_fx.cli import main


@pytest.fixture(autouse=True)
def _plain(monkeypatch):
    monkeypatch.setenv("MOA_FX_PLAIN", "1")
    monkeypatch.delenv("MOA_FX_DEBUG", raising=False)


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit status, stdout, stderr)``."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def cli_json(cli):
    def run(*argv: str) -> tuple[int, dict]:
        code, out, err = cli(*argv)
        assert not err or "error" not in err, err
        return code, json.loads(out)

    return run

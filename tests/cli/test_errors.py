import pytest

from moa_fx.errors import SpecError


def test_moafx_error_is_one_line_and_exit_2(cli):
    code, out, err = cli("sites", "tiny-llama", "--spec", "sparse_mao")
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("error: spec 'sparse_mao' is neither a preset") and "'sparse_moa'" in lines[0]
    assert lines[1] == "(set MOA_FX_DEBUG=1 for the full traceback)"


def test_debug_reraises(cli, monkeypatch):
    monkeypatch.setenv("MOA_FX_DEBUG", "1")
    with pytest.raises(SpecError):
        cli("sites", "tiny-llama", "--spec", "sparse_mao")


def test_unknown_model_names_the_builtins(cli):
    code, _, err = cli("dump", "tiny-lama")
    assert code == 2 and "did you mean 'tiny-llama'" in err


def test_usage_error_is_argparse_exit_2(cli):
    code, _, err = cli("sites", "tiny-llama")
    assert code == 2 and "--spec" in err

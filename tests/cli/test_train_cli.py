import json

import pytest


def test_train_small_run_writes_everything(cli, tmp_path):
    out = tmp_path / "run"
    code, text, err = cli("train", "--out", str(out), "--model", "tiny-llama", "--steps", "6", "--batch-size", "8",
                          "--no-compile", "--eval-every", "3", "--save-every", "3", "--eval-examples", "16")
    assert code == 0, err
    assert "step 3: loss" in text and "eval loss" in text and "accuracy" in text
    assert "router statistics" in text and "model.layers.0" in text
    assert "done: 6 steps" in text
    assert (out / "adapter" / "adapter_config.json").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6


def test_stop_after_then_resume(cli, tmp_path):
    args = ("train", "--out", str(tmp_path), "--model", "tiny-llama", "--steps", "4", "--batch-size", "4",
            "--no-compile", "--eval-examples", "8", "--save-every", "2")
    code, text, _ = cli(*args, "--stop-after", "2")
    assert code == 0 and "continue with --resume" in text
    code, _, err = cli(*args)
    assert code == 2 and "pass --resume" in err
    code, text, _ = cli(*args, "--resume")
    assert code == 0 and "resuming at step 2" in text and "done: 4 steps" in text


def test_meta_config_cannot_train(cli, tmp_path):
    code, _, err = cli("train", "--out", str(tmp_path), "--model", "examples/configs/llama3-8b.json")
    assert code == 2 and "no weights" in err


@pytest.mark.slow
def test_compile_smoke(cli, tmp_path):
    code, text, err = cli("train", "--out", str(tmp_path), "--model", "tiny-llama", "--spec", "lora", "--steps", "2",
                          "--batch-size", "4", "--eval-examples", "4", "--compile")
    assert code == 0, err
    assert "done: 2 steps" in text

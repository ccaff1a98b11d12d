"""A run killed (SIGKILL) in the middle of writing a checkpoint leaves the previous one loadable."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The child trains; from its second checkpoint on, safetensors' writer writes half a file, signals
# the test through a marker file and then hangs, so the test can kill it mid-save.
CHILD = textwrap.dedent("""
    import os, pathlib, sys, time
    import safetensors.torch as st
    real = st.save_file
    calls = {"n": 0}
    def slow_save(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(tensors, path, metadata=metadata)
        real(tensors, path, metadata=metadata)
        data = pathlib.Path(path).read_bytes()
        pathlib.Path(path).write_bytes(data[: len(data) // 2])  # half-written, as a crash leaves it
        pathlib.Path(os.environ["MARKER"]).write_text("saving")
        time.sleep(600)
    st.save_file = slow_save
    from moa_fx.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    args = ["train", "--out", str(out), "--model", "tiny-llama", "--spec", "lora", "--steps", "6",
            "--save-every", "2", "--eval-every", "100", "--batch-size", "4", "--no-compile", "--threads", "1"]
    env = {**os.environ, "MARKER": str(marker), "MOA_FX_PLAIN": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"child ended before the second save: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("child never reached its second checkpoint save")
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2  # the first checkpoint, untouched by the killed save
    leftovers = [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed save should have left its temporary file behind"
    from moa_fx.cli import main

    assert main([*args, "--resume"]) == 0  # resumes from step 2 and finishes
    final = json.loads((ckpt / "trainer_state.json").read_text())
    assert final["step"] == 6
    assert not [p.name for p in ckpt.iterdir() if p.name.endswith(".tmp")]

"""The task survey (moa_fx/eval/survey.py, examples/survey_tasks.py) on the smoke setup: tiny random
LLaMA, CharTokenizer, synthetic task dicts (no assets, no network)."""

from __future__ import annotations

import json
import pathlib
import runpy
import sys

import pytest

from moa_fx.errors import InputError
from moa_fx.eval import evaluate as ev
from moa_fx.eval import survey

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_script(monkeypatch, *args: str) -> int:
    script = str(ROOT / "examples" / "survey_tasks.py")
    monkeypatch.setattr(sys, "argv", [script, "--quick", "--threads", "1", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    return exit_info.value.code


def test_task_data_drops_long_prompts_and_keeps_three_disjoint_splits():
    tokenizer = ev.CharTokenizer()
    examples = ev.task_loader("synthetic")("successor")
    cfg = survey.SurveyConfig(tasks=("successor",), max_examples=30, max_prompt_tokens=21, model="tiny",
                              data="synthetic")
    data = survey.task_data("successor", examples, tokenizer, cfg)
    # "\nQ: after N comes\nA:" is 20 characters + BOS; nothing is dropped at 21 tokens, everything at 20
    assert data.info["dropped_long_prompts"] == 0 and data.info["kind"] == "generation"
    assert len(data.test) == data.info["scored"] == 30 and data.info["chance"] == 0.0
    assert data.info["train"] + data.info["val"] + data.info["test"] == len(examples)
    ids = [{id(e) for e in part} for part in (data.train, data.val, data.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and data.val
    with pytest.raises(InputError, match="too few to split"):
        survey.task_data("successor", examples, tokenizer, survey.SurveyConfig(max_prompt_tokens=20))
    spec = survey.pilot_spec()
    (expert,) = spec.experts
    assert (expert.r, expert.alpha) == (8, 16) and expert.at == ev.budget_spec("lora").experts[0].at


def test_script_resumes_and_records_zero_shot_and_pilot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "survey.json"
    common = ("--max-examples", "8", "--steps", "2", "--batch-size", "4", "--out", str(out))
    assert _run_script(monkeypatch, "--tasks", "parity,successor", *common) == 0
    first = json.loads(out.read_text(encoding="utf-8"))
    assert list(first["tasks"]) == ["parity", "successor"]
    for entry in first["tasks"].values():
        assert 0.0 <= entry["zero_shot"]["accuracy"] <= 1.0 and "pilots" not in entry
    assert first["tasks"]["successor"]["data"]["kind"] == "generation"
    assert first["tasks"]["parity"]["zero_shot"]["first_choice_share"] is not None

    # the pilot of one task: its zero-shot is not measured again
    assert _run_script(monkeypatch, "--pilot", "--tasks", "successor", *common) == 0
    second = json.loads(out.read_text(encoding="utf-8"))
    assert second["tasks"]["successor"]["zero_shot"] == first["tasks"]["successor"]["zero_shot"]
    (recipe, result), = second["tasks"]["successor"]["pilots"].items()
    assert recipe == survey.SurveyConfig(steps=2, batch_size=4).recipe()
    assert len(result["losses"]) == 2 and result["trainable"] > 0 and 0.0 <= result["accuracy"] <= 1.0
    assert "_predictions" not in result
    table = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| successor | generation |" in table and "| successor | lora r8 a16" in table

    # everything asked for is there: nothing runs, the file is unchanged but for the time stamp
    capsys.readouterr()
    assert _run_script(monkeypatch, "--pilot", "--tasks", "successor", *common) == 0
    third = json.loads(out.read_text(encoding="utf-8"))
    assert {k: v for k, v in third.items() if k != "updated"} == {k: v for k, v in second.items() if k != "updated"}
    assert "loading the tiny model" not in capsys.readouterr().out

    # another protocol in the same file is refused
    with pytest.raises(InputError, match="another --out"):
        survey.run_survey(survey.SurveyConfig(tasks=("parity",), max_examples=9, model="tiny", data="synthetic"), out)


def test_a_failing_task_is_recorded_and_the_others_run(tmp_path):
    def loader(name):
        if name == "broken":
            raise InputError("no such task")
        return ev.task_loader("synthetic")(name)

    cfg = survey.SurveyConfig(tasks=("broken", "compare"), max_examples=8, model="tiny", data="synthetic",
                              threads=1)
    results = survey.run_survey(cfg, tmp_path / "s.json", loader=loader,
                                model_and_tokenizer=(ev.load_model("tiny")[0], ev.CharTokenizer()))
    assert results["tasks"]["broken"]["error"] == "InputError: no such task"
    assert results["tasks"]["compare"]["zero_shot"]["accuracy"] >= 0.0
    assert "| broken | — |" in survey.survey_table(results)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"protocol": {}}', "\udcff"])
def test_a_results_file_that_is_not_a_survey_is_refused_by_name(tmp_path, text):
    path = tmp_path / "survey.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(InputError, match="not a survey results file"):
        survey.load_results(path, survey.SurveyConfig())

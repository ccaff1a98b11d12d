"""The training loop: checkpoints, exact resume, leftovers from a killed save, no pickles; clipping and the
learning-rate schedule of the one loop (moa_fx.train.loop)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from moa_fx.cli.models import load_model
from moa_fx.errors import CheckpointError, SettingError
from moa_fx.train import CHECKPOINT_DIR, STATE_FILE, Schedule, TrainConfig, fit, lr_at, make_optimizer, train

SMALL = dict(model="tiny-llama", spec="sparse_moa", steps=8, batch_size=8, lr=1e-2, warmup=2, compile=False,
             eval_every=4, save_every=4, eval_examples=16, log_every=2)




def run(out: pathlib.Path, **kw):
    cfg = TrainConfig(out=str(out), **{**SMALL, **kw})
    return train(cfg, load_model(cfg.model)[0])


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out, run(out)
    finally:
        torch.set_num_threads(old)


def test_writes_adapter_and_checkpoint_without_pickles(full):
    out, result = full
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    state = json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())
    assert state["step"] == 8 and len(state["losses"]) == 8 and len(state["evals"]) == 2
    files = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())
    assert files == ["tensors-00000008.safetensors", STATE_FILE]
    from safetensors.torch import load_file

    tensors = load_file(str(out / CHECKPOINT_DIR / files[0]))
    assert "rng.torch" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)
    assert result.router_stats and "accuracy" in result.evals[-1]


def test_resume_reaches_the_same_loss_curve(full, tmp_path):
    _, uninterrupted = full
    first = run(tmp_path, stop_after=4)
    assert first.stopped_early and first.steps == 4
    assert not (tmp_path / "adapter").exists()
    resumed = run(tmp_path, resume=True)
    assert resumed.losses == uninterrupted.losses  # bit-for-bit on CPU
    assert resumed.evals == uninterrupted.evals


def test_leftover_temporaries_do_not_break_resume(full, tmp_path):
    _, uninterrupted = full
    run(tmp_path, stop_after=4)
    ckpt = tmp_path / CHECKPOINT_DIR
    # what a save killed halfway leaves: a half-written tensors temp file and a newer, orphaned tensors file
    (ckpt / ".tensors-00000006.safetensors.abc123.tmp").write_bytes(b"\x00" * 100)
    (ckpt / f".{STATE_FILE}.xyz.tmp").write_text("{")
    (ckpt / "tensors-00000006.safetensors").write_bytes(b"garbage")
    resumed = run(tmp_path, resume=True)
    assert resumed.losses == uninterrupted.losses
    assert not list(ckpt.glob(".*.tmp"))


def test_resume_refuses_a_different_run(tmp_path):
    run(tmp_path, stop_after=2, steps=4)
    with pytest.raises(CheckpointError, match="lr"):
        run(tmp_path, steps=4, resume=True, lr=5e-3)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        run(tmp_path, steps=4)


def test_loss_goes_down_on_the_digit_tasks(tmp_path):
    result = run(tmp_path, model="small-llama", steps=40, batch_size=16, eval_every=40, save_every=40,
                 lr=1e-2, warmup=5)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.1, (first, last)


def _toy_fit(max_grad_norm: float) -> list[float]:
    """Three steps of :func:`fit` on a linear model whose loss has large gradients; returns the gradient
    norm the optimizer saw at each step."""
    from types import SimpleNamespace

    from moa_fx.data import Batch

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 1)
    optimizer = make_optimizer(layer, lr=1e-3)
    norms: list[float] = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: norms.append(float(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in layer.parameters()])))))
    ids = torch.ones(2, 4, dtype=torch.long)

    def forward(input_ids, attention_mask, labels):
        return SimpleNamespace(loss=100.0 * layer(input_ids.float()).pow(2).mean())

    fit(forward, optimizer, Schedule(steps=3, lr=1e-3, warmup=0, max_grad_norm=max_grad_norm),
        lambda step: Batch(ids, torch.ones_like(ids), ids))
    return norms


def test_fit_clips_the_gradient_norm():
    assert all(n > 1.0 for n in _toy_fit(0.0))  # without clipping the gradients are large
    assert all(n == pytest.approx(1.0, rel=1e-4) for n in _toy_fit(1.0))


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    s = Schedule(steps=10, lr=1.0, warmup=2)
    assert [lr_at(s, k) for k in (1, 2)] == [0.5, 1.0]
    assert lr_at(s, 10) == pytest.approx(0.1) and lr_at(s, 2) > lr_at(s, 6) > lr_at(s, 10)


def test_max_grad_norm_must_not_be_negative(tmp_path):
    with pytest.raises(SettingError, match="--max-grad-norm = -1.0 must be >= 0"):
        TrainConfig(out=str(tmp_path), max_grad_norm=-1.0)


def test_score_sees_the_base_model_before_and_the_trained_model_after(tmp_path):
    """The caller's held-out score (the CLI's task accuracy) joins the evaluations of step 0, computed on the
    untouched base model, and of the last step, on the MoAModel; the evaluations between hold the loss only."""
    from moa_fx import MoAModel

    seen = []

    def score(model):
        seen.append(model)
        return {"score": float(len(seen))}

    base = load_model("tiny-llama")[0]
    cfg = TrainConfig(out=str(tmp_path), **{**SMALL, "steps": 4, "eval_every": 2, "save_every": 4})
    result = train(cfg, base, score=score)
    assert len(seen) == 2 and seen[0] is base and isinstance(seen[1], MoAModel)
    assert [e["step"] for e in result.evals] == [0, 2, 4]
    assert result.evals[0]["score"] == 1.0 and "score" not in result.evals[1] and result.evals[2]["score"] == 2.0


def _answer_batch(vocab: int = 128, seed: int = 0):
    """Two rows of different lengths, labels only on each row's last 3 real tokens (the answer)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 9:], labels[1, 6:9] = ids[0, 9:], ids[1, 6:9]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("preset", ["lora", "sparse_moa", "mole_topk", "adamole"])
def test_answer_only_loss_is_the_models_own_loss_and_gradient(preset):
    """The head applied at the labelled positions only gives the model's loss (with the routers' balance
    loss in training) and the same gradients; dropout draws the same masks from the same seed."""
    from moa_fx import transform
    from moa_fx.spec import presets
    from moa_fx.train import AnswerOnlyLoss
    from tests.tiny import tiny_model

    moa = transform(tiny_model("llama"), presets.get(preset))
    moa.train()
    with torch.no_grad():  # B = 0 at init would hide the adapters from the check
        for _, p in moa.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    batch = _answer_batch()
    grads = []
    for forward in (moa, AnswerOnlyLoss(moa)):
        torch.manual_seed(5)
        loss = forward(**batch).loss
        loss.backward()
        grads.append((loss.detach(), [None if p.grad is None else p.grad.clone()
                                      for _, p in moa.named_parameters() if p.requires_grad]))
        moa.zero_grad(set_to_none=True)
    (l0, g0), (l1, g1) = grads
    if preset in ("mole_topk", "adamole"):
        assert moa.aux_loss is not None and moa.spec.router.aux_loss_coef > 0  # the balance term is in both
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert sum(float(g.abs().sum()) for g in g0 if g is not None) > 0
    for a, b in zip(g1, g0):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_answer_only_loss_refuses_what_it_would_get_wrong():
    from moa_fx import transform
    from moa_fx.errors import InputError
    from moa_fx.spec import LoraExpert, Spec, presets
    from moa_fx.train import AnswerOnlyLoss
    from tests.tiny import tiny_model

    with pytest.raises(InputError, match="LM head 'lm_head' carries an adapter"):
        AnswerOnlyLoss(transform(tiny_model("llama"), Spec(experts=[LoraExpert(at=("lm_head",), r=2)])))
    moa = transform(tiny_model("llama"), presets.get("lora"))
    moa.config.final_logit_softcapping = 30.0
    with pytest.raises(InputError, match="final_logit_softcapping, which changes the logits after the LM head"):
        AnswerOnlyLoss(moa)
    with pytest.raises(InputError, match="needs a transformed causal LM.*not Linear"):
        AnswerOnlyLoss(torch.nn.Linear(2, 2))

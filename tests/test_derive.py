"""Graphs derived from the state: train/eval (the base model's dropout), moves between dtypes and
devices, the meta device, activation checkpointing, and what a failed derivation leaves behind."""

from __future__ import annotations

import copy

import pytest
import torch

from moa_fx import transform
from moa_fx.errors import InputError, MoaFxError
from tiny import randomize_adapters, slow_except, tiny_model, tokens

# bf16 keeps 8 mantissa bits: a whole tiny forward in bf16 lands within a few percent of fp32
BF16_TOL = dict(rtol=0.0, atol=0.08)


def _dropout_gpt2():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1,
                     embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_train_mode_applies_the_base_models_dropout_like_the_eager_model():
    base = _dropout_gpt2().train()
    ref = copy.deepcopy(base).train()
    moa = transform(base, "lora")  # B = 0: the adapted model computes the base model's function
    ids = tokens(2, 9)
    moa.train()
    a, b = moa(input_ids=ids).logits, moa(input_ids=ids).logits
    assert not torch.equal(a, b), "train-mode forwards must differ (dropout 0.1)"
    # the same dropout ops in the same order as the eager model: one seed, the same masks
    torch.manual_seed(7)
    mine = moa(input_ids=ids).logits
    torch.manual_seed(7)
    theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    moa.eval()
    ref.eval()
    c, d = moa(input_ids=ids).logits, moa(input_ids=ids).logits
    assert torch.equal(c, d)
    torch.testing.assert_close(c, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    hows = {key: how for key, how, _ in moa.derivations}
    assert hows["forward/eval"].startswith("rewrite") and hows["forward/train"] == "capture"


def test_a_model_without_dropout_has_one_graph_for_train_and_eval():
    moa = transform(tiny_model("llama"), "sparse_moa")
    moa.train()
    g_train = moa.graph_module
    moa.eval()
    assert moa.graph_module is g_train
    captures = [key for key, _, _ in moa.derivations if not key.endswith(("/causal", "/regions"))]
    assert len(captures) == 1  # + its causal and regions rewrites


def test_adamole_expert_dropout_keeps_its_own_semantics():
    moa = transform(tiny_model("llama", init=0.2), "adamole")
    randomize_adapters(moa, seed=1)
    ids = tokens(2, 8)
    moa.train()
    assert not torch.equal(moa(input_ids=ids).logits, moa(input_ids=ids).logits)
    moa.eval()
    assert torch.equal(moa(input_ids=ids).logits, moa(input_ids=ids).logits)


@pytest.mark.parametrize("preset", slow_except(["lora", "sparse_moa", "soft_moa"], ["sparse_moa"]))
def test_dtype_moves_follow_the_base_model_cast_the_same_way(preset):
    base = tiny_model("llama", init=0.2)
    ref = copy.deepcopy(base)
    moa = transform(base, preset).eval()  # at init every preset computes the base model's function
    ids = tokens(2, 8)
    moa.to(torch.bfloat16)
    assert moa.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in moa.adapters.parameters())
    got = moa(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    ref.to(torch.bfloat16)
    torch.testing.assert_close(got.float(), ref(input_ids=ids).logits.float(), **BF16_TOL)
    moa.float()  # back to fp32: the weights keep their bf16 rounding, as the base model's do
    ref.float()
    assert moa(input_ids=ids).logits.dtype == torch.float32
    torch.testing.assert_close(moa(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    moa.half()
    ref.half()
    got = moa(input_ids=ids).logits
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref(input_ids=ids).logits.float(), rtol=0.0, atol=0.02)
    assert {key.split("/")[0] for key, how, _ in moa.derivations if how == "capture"} == {"forward"}


def test_randomised_adapters_survive_a_round_trip_through_bf16():
    moa = transform(tiny_model("llama", init=0.2), "soft_moa").eval()
    randomize_adapters(moa, seed=3)
    ids = tokens(2, 8)
    fp32 = moa(input_ids=ids).logits
    bf16 = moa.to(torch.bfloat16)(input_ids=ids).logits.float()
    err = float((bf16 - fp32).abs().max())
    effect = float((fp32 - moa.model.float()(input_ids=ids).logits).abs().max())
    # bf16's error is a few percent of the logits' scale and far below what the adapters change
    assert err < 0.05 * float(fp32.abs().max()) and err < 0.2 * effect, (err, effect)


def test_meta_device_transform_then_materialised():
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config

    real = tiny_model("llama", init=0.2)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    moa = transform(skeleton, "sparse_moa")
    assert moa.device.type == "meta"
    moa.to_empty(device="cpu")
    moa.model.load_state_dict(real.state_dict())
    for name, buf in real.named_buffers():  # non-persistent buffers (RoPE's inv_freq) are not in a state dict
        moa.model.get_buffer(name).copy_(buf)
    want = transform(real, "sparse_moa").eval()
    randomize_adapters(want, seed=4)
    moa.moa.load_state_dict(want.moa.state_dict())
    ids = tokens(2, 8)
    torch.testing.assert_close(moa.eval()(input_ids=ids).logits, want(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_transformed_model_moved_to_cuda_equals_one_transformed_there():
    base = tiny_model("llama", init=0.2)
    moa = transform(copy.deepcopy(base), "sparse_moa").eval()
    randomize_adapters(moa, seed=5)
    there = transform(copy.deepcopy(base).cuda(), "sparse_moa").eval()
    there.moa.load_state_dict(moa.moa.state_dict())
    moa.cuda()
    ids = tokens(2, 8).cuda()
    torch.testing.assert_close(moa(input_ids=ids).logits, there(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    out = moa.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.device.type == "cuda"


def test_a_failed_move_leaves_the_model_where_it_was(monkeypatch):
    import moa_fx.runtime as runtime

    moa = transform(tiny_model("llama"), "lora").eval()
    ids = tokens(2, 6)
    before = moa(input_ids=ids).logits

    def refuse(*a, **k):
        raise MoaFxError("capture refused (test)")

    monkeypatch.setattr(runtime, "derive_by_capture", refuse)
    with pytest.raises(MoaFxError, match="capture refused"):
        moa.to(torch.bfloat16)
    assert moa.dtype == torch.float32
    torch.testing.assert_close(moa(input_ids=ids).logits, before)


def test_a_dtype_without_kernels_is_refused_and_the_model_stays():
    moa = transform(tiny_model("llama"), "lora").eval()
    ids = tokens(2, 6)
    before = moa(input_ids=ids).logits
    with pytest.raises(InputError, match="not torch.float8_e4m3fn"):
        moa.to(torch.float8_e4m3fn)
    assert moa.dtype == torch.float32 and all(p.dtype == torch.float32 for p in moa.parameters())
    torch.testing.assert_close(moa(input_ids=ids).logits, before)


@pytest.mark.parametrize("preset", ["lora", "sparse_moa", "adamole"])
def test_checkpointing_gives_the_same_gradients(preset):
    moa = transform(tiny_model("llama", init=0.2), preset)
    randomize_adapters(moa, seed=6)
    moa.train()
    moa.model.eval()  # no dropout anywhere but AdaMoLE's experts, whose masks checkpointing must replay
    ids = tokens(2, 10)

    def grads():
        torch.manual_seed(11)
        moa.zero_grad()
        loss = moa(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in moa.named_parameters() if p.grad is not None}

    loss0, g0 = grads()
    moa.gradient_checkpointing_enable()
    moa.model.train()  # checkpointing applies in train mode, as in transformers
    assert moa.is_gradient_checkpointing
    assert any("checkpoint" in n.name for n in moa.graph_module.graph.nodes)
    moa.model.eval()
    assert not any("checkpoint" in n.name for n in moa.graph_module.graph.nodes)
    moa.model.train()
    loss1, g1 = grads()
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-6, msg=name)
    moa.gradient_checkpointing_disable()
    assert not any("checkpoint" in n.name for n in moa.graph_module.graph.nodes)


def test_checkpointing_lowers_peak_activation_memory():
    """Saved-for-backward bytes, counted by a saved-tensors hook: checkpointing keeps only each
    block's inputs (the base model's own ratio is measured in benchmarks/bench_derive.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2)).train()
    moa = transform(base, "lora")
    ids = tokens(2, 64)

    def saved_bytes():
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            moa(input_ids=ids, labels=ids).loss.backward()
        return total

    plain = saved_bytes()
    moa.gradient_checkpointing_enable()
    ckpt = saved_bytes()
    assert ckpt < 0.6 * plain, (ckpt, plain)


def test_checkpointing_options():
    moa = transform(tiny_model("llama"), "lora")
    with pytest.raises(InputError, match="use_reentrant"):
        moa.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(InputError, match="not checkpoint options"):
        moa.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"reentrant": False})
    moa.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert moa.is_gradient_checkpointing


def test_trainer_with_gradient_checkpointing_trains(tmp_path):
    from transformers import Trainer, TrainingArguments

    moa = transform(tiny_model("llama", init=0.2), "sparse_moa")
    before = {k: v.clone() for k, v in moa.adapter_state_dict().items()}
    ids = tokens(8, 12)
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_checkpointing=True, report_to=[], use_cpu=True, save_strategy="no",
                             learning_rate=1e-2)
    Trainer(model=moa, args=args, train_dataset=data).train()
    assert moa.is_gradient_checkpointing
    assert any("checkpoint" in key for key, _, _ in moa.derivations)
    after = moa.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_cached_graph_compiles_without_recompiling_across_decode_steps():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    moa = transform(tiny_model("llama", init=0.2), "sparse_moa").eval()
    randomize_adapters(moa, seed=7)
    gm = moa.derived("cached").gm
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
    from transformers import DynamicCache

    ids = tokens(2, 9, seed=2)
    cache = DynamicCache()
    with torch.no_grad():
        moa(input_ids=ids[:, :4], cache=cache, use_cache=True)
        for t in range(4, 9):
            keys = [layer.keys for layer in cache.layers]
            values = [layer.values for layer in cache.layers]
            mask = torch.ones(2, t + 1, dtype=torch.long)
            pos = torch.full((2, 1), t)
            got = compiled(ids[:, t:t + 1], mask, pos, *keys, *values)
            want = moa(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            torch.testing.assert_close(got[0], want.logits, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])

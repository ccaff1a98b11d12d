"""MoAModel: trainable set, training, save/load, compile, errors."""

from __future__ import annotations

import json

import pytest
import torch

from moa_fx import transform
from moa_fx.errors import AdapterLoadError, InputError, MoaFxError, SiteMatchError
from moa_fx.spec import LoraExpert, RouterSpec, Spec, ThresholdSpec
from tiny import randomize_adapters, tiny_model, tokens


def test_only_adapters_are_trainable(llama):
    moa = transform(llama, "adamole")
    names = [n for n, p in moa.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("moa.") for n in names)
    assert "moa.model.layers.0.self_attn.q_proj.lora.3.lora_A" in names
    assert "moa.model.layers.1.self_attn.o_proj.threshold.proj.bias" in names
    trainable, total = moa.trainable_parameter_count()
    # AdaMoLE per projection = E·r(d_in + d_out) + E·d_in + (d_in + 1) (METHODS.md); q,k,v,o of 2 layers
    per = lambda d_in, d_out: 8 * 4 * (d_in + d_out) + 8 * d_in + d_in + 1
    assert trainable == 2 * (per(64, 64) + per(64, 32) + per(64, 32) + per(64, 64))
    assert total == trainable + sum(p.numel() for p in llama.parameters())


def test_training_lowers_loss_and_keeps_base_weights_bitwise():
    llama = tiny_model("llama", init=0.2)
    base = {k: v.clone() for k, v in llama.state_dict().items()}
    moa = transform(llama, "adamole")
    before = {k: v.clone() for k, v in moa.adapter_state_dict().items()}
    params = [p for p in moa.parameters() if p.requires_grad]
    # lr 3e-3 with clipping: at lr 1e-2 AdaMoLE's loss spikes late in some seeds, fused or not
    opt = torch.optim.AdamW(params, lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    moa.train()
    for step in range(200):
        # a learnable synthetic task: each sequence counts up by one (mod 8) from a random start
        start = torch.randint(0, 8, (8, 1), generator=g)
        ids = (start + torch.arange(12)) % 8
        out = moa(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    for k, v in llama.state_dict().items():
        assert torch.equal(v, base[k]), f"base weight {k} changed"
    after = moa.adapter_state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert any("lora_B" in k for k in changed) and any("router" in k for k in changed)


def test_aux_loss_is_added_in_training_only(llama):
    moa = transform(llama, "adamole")
    randomize_adapters(moa)
    ids = tokens()
    moa.train()
    torch.manual_seed(0)
    out_train = moa(input_ids=ids, labels=ids)
    assert out_train.aux_loss is not None and out_train.aux_loss.requires_grad
    moa.eval()
    out_eval = moa(input_ids=ids, labels=ids)
    plain = torch.nn.functional.cross_entropy(out_eval.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out_eval.loss, plain)
    # in train mode, dropout makes logits differ; the aux term is coef·aux on top of the LM loss
    lm_train = torch.nn.functional.cross_entropy(out_train.logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out_train.loss, lm_train + 1e-3 * out_train.aux_loss)


def test_router_stats_shape(llama):
    moa = transform(llama, "sparse_moa")
    randomize_adapters(moa)
    moa(input_ids=tokens())
    stats = moa.router_stats()
    assert list(stats) == ["model.layers.0", "model.layers.1"]
    s = stats["model.layers.0"]
    assert s["experts"] == ["self_attn.q_proj:lora", "self_attn.k_proj:lora", "self_attn.v_proj:lora",
                            "self_attn.o_proj:lora", "mlp.down_proj:lora", "mlp:pa"]
    assert len(s["activation_rate"]) == 6 and 0 <= s["mean_active"] <= 6
    assert 0 < s["threshold_mean"] <= 0.5 and s["layer"] == 0


def test_save_load_roundtrip_and_mismatches(tmp_path, llama):
    moa = transform(llama, "adamole")
    randomize_adapters(moa)
    moa.eval()
    ids = tokens()
    want = moa(input_ids=ids).logits
    moa.save_adapters(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = transform(llama, "adamole")
    fresh.load_adapters(tmp_path / "a")
    fresh.eval()
    torch.testing.assert_close(fresh(input_ids=ids).logits, want, rtol=0, atol=0)
    from moa_fx import MoAModel

    again = MoAModel.from_adapters(llama, tmp_path / "a")
    again.eval()
    torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=0, atol=0)
    with pytest.raises(AdapterLoadError, match="saved for another spec"):
        transform(llama, "mole_topk").load_adapters(tmp_path / "a")
    other = tiny_model("qwen3")
    with pytest.raises(AdapterLoadError, match="saved for LlamaForCausalLM, not Qwen3ForCausalLM"):
        transform(other, "adamole").load_adapters(tmp_path / "a")
    data = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one byte inside a tensor's data: the file still parses
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(AdapterLoadError, match="does not match the checksum"):
        fresh.load_adapters(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="damaged"):
        fresh.load_adapters(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MOA_FX" and cfg["moa_fx"]["spec"]["name"] == "adamole"


def test_wider_model_refuses_adapters(tmp_path):
    small = tiny_model("llama")
    moa = transform(small, "lora")
    moa.save_adapters(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterLoadError, match="has shape .* but this model expects"):
        transform(wide, "lora").load_adapters(tmp_path)


def test_site_errors_list_near_matches(llama):
    with pytest.raises(SiteMatchError) as err:
        transform(llama, {"expert": [{"kind": "lora", "at": ["*.qproj"]}]})
    assert "did you mean '*.q_proj'" in str(err.value)
    # equal precedence on one site is a conflict
    spec = {"expert": [{"kind": "lora", "at": ["*.q_proj"], "name": "a"},
                       {"kind": "lora", "at": ["*.self_attn.q_proj"], "name": "b"}]}
    with pytest.raises(SiteMatchError, match="both claim model.layers.0.self_attn.q_proj with equal precedence"):
        transform(llama, spec)
    with pytest.raises(SiteMatchError, match="has no a scaled_dot_product_attention|matched no module"):
        transform(llama, {"expert": [{"kind": "prompt", "at": ["*.nothing_here"]}]})
    with pytest.raises(SiteMatchError, match="matched no module"):
        transform(llama, {"expert": [{"kind": "parallel_adapter", "around": ["*.ffn"]}]})


def test_precedence_example_from_the_docstring(llama):
    # moa_fx.sites: an exact path beats a glob
    spec = {"expert": [{"kind": "lora", "at": ["*.q_proj"], "r": 8, "name": "all"},
                       {"kind": "lora", "at": ["model.layers.0.self_attn.q_proj"], "r": 16, "name": "first"}]}
    moa = transform(llama, spec)
    by_site = {s.site: s.rule for s in moa.slots}
    assert by_site == {"model.layers.0.self_attn.q_proj": "first", "model.layers.1.self_attn.q_proj": "all"}


def test_layer_selection(llama):
    moa = transform(llama, Spec(experts=(LoraExpert(at=("@q", "@v")),), layers=(1,)))
    assert {s.site for s in moa.slots} == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}


def test_bad_inputs(llama):
    moa = transform(llama, "lora")
    with pytest.raises(InputError, match="integer tensor"):
        moa(input_ids=torch.randn(2, 8))
    with pytest.raises(InputError, match="vocabulary has 128"):
        moa(input_ids=torch.full((2, 8), 500))
    with pytest.raises(InputError, match="attention_mask has shape"):
        moa(input_ids=tokens(), attention_mask=torch.ones(2, 3))
    with pytest.raises(InputError, match="unsupported input"):
        moa(input_ids=tokens(), token_type_ids=tokens())
    with pytest.raises(MoaFxError, match="cannot be merged"):  # plain LoRA merges (test_hf_surface); routed does not
        transform(llama, "sparse_moa").merge_adapters()


@pytest.mark.slow
@pytest.mark.parametrize("preset,lower", [(None, "off"), (None, "grouped"), ("sparse_moa", "auto")])
def test_compile_fullgraph_matches_eager_without_recompiling(preset, lower):
    import torch._dynamo

    torch._dynamo.reset()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    spec = preset or Spec(experts=(LoraExpert(at=("@q", "@v"), r=4, count=4),),
                          router=RouterSpec(scope="site", select="threshold", threshold=ThresholdSpec(learned=True),
                                            aux_loss_coef=1e-2))
    moa = transform(model, spec, lower=lower)
    randomize_adapters(moa, std=0.5)
    compiled = torch.compile(moa, fullgraph=True, dynamic=True)
    counters = torch._dynamo.utils.counters
    counters.clear()
    for seed in range(3):  # different tokens, so a different number of experts fires each time
        ids = tokens(2, 9, seed=seed)
        eager = moa(input_ids=ids, labels=ids)
        params = [p for p in moa.parameters() if p.requires_grad]
        eager_grads = torch.autograd.grad(eager.loss, params, allow_unused=True, materialize_grads=True)
        fast = compiled(input_ids=ids, labels=ids)
        fast_grads = torch.autograd.grad(fast.loss, params, allow_unused=True, materialize_grads=True)
        torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.loss, eager.loss, rtol=1e-4, atol=1e-5)
        for a, b in zip(fast_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plain_lora_saves_in_peft_layout_and_peft_loads_it(tmp_path, family):
    peft = pytest.importorskip("peft")
    import copy

    base = tiny_model(family)
    moa = transform(base, "lora")
    randomize_adapters(moa, std=0.1)
    moa.eval()
    ids = tokens()
    want = moa(input_ids=ids).logits
    moa.save_adapters(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    again = transform(base, "lora")
    again.load_adapters(tmp_path)
    torch.testing.assert_close(again.eval()(input_ids=ids).logits, want, rtol=0, atol=0)


def test_an_edited_peft_field_is_refused(tmp_path, llama):
    """PEFT reads lora_alpha from adapter_config.json, moa-fx the spec inside: one directory must not
    load as two models."""
    import json

    moa = transform(llama, "lora")
    moa.save_adapters(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 32
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="lora_alpha = 32 but its moa-fx spec gives 8"):
        moa.load_adapters(tmp_path)


def test_saved_files_get_the_umask_mode(tmp_path, llama):
    import os
    import stat

    moa = transform(llama, "lora")
    old = os.umask(0o022)
    try:
        moa.save_adapters(tmp_path)
    finally:
        os.umask(old)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_transforming_a_transformed_model_is_refused(llama):
    moa = transform(llama, "lora")
    with pytest.raises(MoaFxError, match="already transformed"):
        transform(moa, "lora", example_inputs=(tokens(),))


def test_router_order_is_saved_and_checked(tmp_path, llama):
    """Router rows follow the experts' order; adapters saved under another order (format 1 put gate's
    experts before up's) must not load with their rows swapped."""
    import json

    spec = Spec(experts=(LoraExpert(at=("@gate", "@up"), r=4),),
                router=RouterSpec(scope="@blocks", gate="softmax", select="dense"))
    moa = transform(llama, spec)
    moa.save_adapters(tmp_path)
    moa.load_adapters(tmp_path)  # the same order: loads
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    saved = cfg["moa_fx"]["routers"]["model.layers.0"]
    assert saved.index("mlp.up_proj:lora") < saved.index("mlp.gate_proj:lora")
    cfg["moa_fx"]["routers"]["model.layers.0"] = list(reversed(saved))
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="router rows would be read in another order"):
        moa.load_adapters(tmp_path)
    del cfg["moa_fx"]["routers"]
    cfg["moa_fx"]["format"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="older moa-fx whose routers ordered gate's experts before up's"):
        moa.load_adapters(tmp_path)

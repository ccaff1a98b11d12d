"""The transformers / PEFT surface of a transformed model: what a PEFT user's script calls."""

from __future__ import annotations

import copy

import pytest
import torch

from moa_fx import LoraExpert, MoAModel, RouterSpec, Spec, transform
from moa_fx.errors import AdapterLoadError, InputError, MoaFxError
from tiny import randomize_adapters, tiny_model, tokens

peft = pytest.importorskip("peft")

QKVOD = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def _copy_into_peft(moa, peft_model) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in moa.adapters.named_parameters():
            site, _, leaf = name.rpartition(".lora.0.")
            params[f"base_model.model.{site}.{leaf}.default.weight"].copy_(p)


def _pair(family="llama", seed=0):
    base = tiny_model(family, init=0.2)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.0, target_modules=QKVOD if family != "gpt2" else ["c_attn", "c_proj"]))
    moa = transform(base, "lora")
    randomize_adapters(moa, seed=seed, std=0.1)
    _copy_into_peft(moa, peft_model)
    return moa, peft_model


def test_attributes_have_their_transformers_and_peft_meaning():
    base = tiny_model("llama")
    moa = transform(base, "sparse_moa")
    assert moa.device == torch.device("cpu") and moa.dtype == torch.float32
    assert moa.loss_type == base.loss_type == "ForCausalLM"
    assert moa.config is base.config and moa.generation_config is base.generation_config
    assert moa.get_input_embeddings() is base.get_input_embeddings()
    assert moa.get_output_embeddings() is base.get_output_embeddings()
    assert moa.get_base_model() is base and moa.base_model.model is base
    assert moa.can_generate()
    trainable, total = moa.trainable_parameter_count()
    assert moa.num_parameters(only_trainable=True) == trainable and moa.num_parameters() == total
    assert moa.num_parameters(exclude_embeddings=True) < total
    assert moa.peft_config["default"].peft_type == "MOA_FX" and moa.peft_config["default"].task_type == "CAUSAL_LM"
    assert moa.active_adapters == ["default"]
    assert moa.prepare_inputs_for_generation(tokens())["input_ids"].shape == tokens().shape
    moa.enable_input_require_grads()  # accepted: non-reentrant checkpointing needs no input grads
    moa.tie_weights()
    assert isinstance(moa.name_or_path, str)


def test_disable_adapter_runs_the_base_model():
    base = tiny_model("llama", init=0.2)
    ref = copy.deepcopy(base)
    moa = transform(base, "soft_moa").eval()
    randomize_adapters(moa, seed=1)
    ids = tokens(2, 8)
    adapted = moa(input_ids=ids).logits
    with moa.disable_adapter():
        assert moa.active_adapters == []
        plain = moa(input_ids=ids).logits
        gen = moa.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(plain, ref(input_ids=ids).logits)
    assert torch.equal(gen, ref.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0))
    assert float((adapted - plain).abs().max()) > 1e-2
    torch.testing.assert_close(moa(input_ids=ids).logits, adapted)


def _trainer_losses(model, tmp_path, rows):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                             data_seed=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_loss_equals_peft(tmp_path):
    """Rows of different lengths (labels -100 past each row's end): the Trainer's num_items_in_batch
    must count the shifted labels for both, or the losses differ by the first token of every row."""
    moa, peft_model = _pair(seed=2)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        ids = torch.randint(0, 128, (12,), generator=g)
        length = 4 + i % 8
        labels = ids.clone()
        labels[length:] = -100
        mask = torch.ones(12, dtype=torch.long)
        mask[length:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    mine = _trainer_losses(moa, tmp_path / "moa", rows)
    theirs = _trainer_losses(peft_model, tmp_path / "peft", rows)
    assert len(mine) == len(theirs) == 4
    for a, b in zip(mine, theirs):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (mine, theirs)


def test_save_pretrained_and_from_pretrained(tmp_path):
    base = tiny_model("llama", init=0.2)
    moa = transform(base, "sparse_moa").eval()
    randomize_adapters(moa, seed=3)
    ids = tokens(2, 7)
    want = moa(input_ids=ids).logits
    moa.save_pretrained(tmp_path / "a")
    again = MoAModel.from_pretrained(base, tmp_path / "a").eval()
    torch.testing.assert_close(again(input_ids=ids).logits, want)
    # one call: the directory names its base (a local directory: nothing is downloaded)
    base.save_pretrained(tmp_path / "base")
    moa.model.config._name_or_path = str(tmp_path / "base")
    moa.save_pretrained(tmp_path / "b")
    alone = MoAModel.from_pretrained(tmp_path / "b").eval()
    torch.testing.assert_close(alone(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="safetensors only"):
        moa.save_pretrained(tmp_path / "c", safe_serialization=False)


def test_trainer_checkpoints_reload(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_model("llama", init=0.2)
    moa = transform(base, "mole_topk")
    ids = tokens(8, 10)
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    Trainer(model=moa, args=args, train_dataset=rows).train()
    ckpt = tmp_path / "checkpoint-2"
    with pytest.raises(AdapterLoadError, match="give the spec it was trained with"):
        MoAModel.from_pretrained(base, ckpt)
    again = MoAModel.from_pretrained(base, ckpt, spec="mole_topk").eval()
    moa.eval()
    torch.testing.assert_close(again(input_ids=ids).logits, moa(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_peft_lora_directory_imports(tmp_path, family):
    base = tiny_model(family, init=0.2)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}[family]
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=targets, rank_pattern={targets[-1]: 2}, lora_dropout=0.0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(tmp_path)
    moa = MoAModel.from_pretrained(base, tmp_path).eval()
    ids = tokens(2, 7)
    torch.testing.assert_close(moa(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)
    assert {rule.r for rule in moa.spec.experts} == {4, 2}


def test_a_peft_lora_seeds_a_mixtures_experts(tmp_path):
    base = tiny_model("llama", init=0.2)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=8, target_modules=QKVOD))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path)
    moa = transform(base, "mole_topk")
    seeded = moa.seed_from_peft(tmp_path)
    assert seeded and all(n == 8 for n in seeded.values())
    b = dict(peft_model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    for i in range(8):
        assert torch.equal(moa.adapters.get_submodule(f"model.layers.0.self_attn.q_proj.lora.{i}").lora_B, b)
    with pytest.raises(AdapterLoadError, match="is a PEFT LoRA and this model is a mixture"):
        moa.load_adapters(tmp_path)


def test_a_non_lora_peft_directory_says_what_imports(tmp_path):
    base = tiny_model("llama")
    ia3 = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                  feedforward_modules=["down_proj"]))
    ia3.save_pretrained(tmp_path)
    with pytest.raises(AdapterLoadError, match="holds a PEFT IA3 adapter; moa-fx imports these PEFT methods: LORA"):
        MoAModel.from_pretrained(base, tmp_path)


def test_from_pretrained_onto_another_base_names_the_tensor(tmp_path):
    moa = transform(tiny_model("llama"), "lora")
    moa.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM, LlamaConfig

    wider = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         num_key_value_heads=2))
    with pytest.raises(AdapterLoadError, match=r"adapter tensor 'model\.layers\.0\..*' has shape"):
        MoAModel.from_pretrained(wider, tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_and_unload_plain_lora(family):
    moa, _ = _pair(family, seed=5)
    moa.eval()
    ids = tokens(2, 8)
    want = moa(input_ids=ids).logits
    merged = moa.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(MoaFxError, match="merged into the base model"):
        moa(input_ids=ids)


def test_merge_and_unload_fixed_weight_mixture():
    spec = Spec(experts=(LoraExpert(at=("@q", "@v"), r=(4, 8), alpha=16),), router=RouterSpec(scope="none"))
    moa = transform(tiny_model("llama", init=0.2), spec).eval()
    randomize_adapters(moa, seed=6, std=0.1)
    ids = tokens(2, 8)
    want = moa(input_ids=ids).logits
    torch.testing.assert_close(moa.merge_and_unload()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,fragment", [("sparse_moa", "routed mixture"), ("parallel_adapter", "no weight")])
def test_merge_refuses_what_cannot_merge(preset, fragment):
    moa = transform(tiny_model("llama"), preset)
    with pytest.raises(MoaFxError, match=fragment):
        moa.merge_and_unload()


def test_inputs_embeds_and_hidden_states_of_the_adapted_model():
    base = tiny_model("llama", init=0.2)
    ref = copy.deepcopy(base)
    moa = transform(base, "sparse_moa").eval()
    ids = tokens(2, 8)
    # at init (B = 0) the adapted model is the base model: hidden states equal the base's, one per layer + 1
    mine = moa(input_ids=ids, output_hidden_states=True).hidden_states
    theirs = ref(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(mine) == len(theirs) == base.config.num_hidden_layers + 1
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)
    randomize_adapters(moa, seed=7)
    out = moa(input_ids=ids, output_hidden_states=True)
    embeds = moa.get_input_embeddings()(ids)
    via_embeds = moa(inputs_embeds=embeds, labels=ids)
    torch.testing.assert_close(via_embeds.logits, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_embeds.loss, moa(input_ids=ids, labels=ids).loss)
    # the last hidden state is the adapted model's: the LM head of it gives the logits
    last = out.hidden_states[-1]
    torch.testing.assert_close(moa.get_output_embeddings()(last), out.logits, rtol=1e-5, atol=1e-5)
    assert float((last - theirs[-1]).abs().max()) > 1e-3
    assert moa(input_ids=ids, return_dict=False)[0].shape == out.logits.shape
    with pytest.raises(InputError, match="not both"):
        moa(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(InputError, match="without a KV cache only"):
        moa(inputs_embeds=embeds, use_cache=True)
    with pytest.raises(InputError, match=r"shape \(batch, sequence, 64\)"):
        moa(inputs_embeds=embeds[..., :10])


def test_position_ids_as_the_base_model_takes_them():
    """Left padding, and packed rows (positions restarting, no mask): the same as the base model, whose
    rule is that rows are packed (a block-diagonal mask) only without a mask and without a cache."""
    base = tiny_model("llama", init=0.2)
    ref = copy.deepcopy(base)
    moa = transform(base, "lora").eval()  # B = 0: equal to the base model
    ids = tokens(2, 10)
    packed = torch.cat([torch.arange(4), torch.arange(6)]).expand(2, 10)
    apart = torch.cat([ref(input_ids=ids[:, :4]).logits, ref(input_ids=ids[:, 4:]).logits], dim=1)
    for use_cache in (False, True, None):  # None: config.use_cache (True), so transformers makes a cache
        want = ref(input_ids=ids, position_ids=packed, use_cache=use_cache).logits
        got = moa(input_ids=ids, position_ids=packed, use_cache=use_cache).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(got, apart, atol=1e-5) == (use_cache is False), use_cache
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(moa(input_ids=ids, attention_mask=mask, position_ids=pos).logits,
                               ref(input_ids=ids, attention_mask=mask, position_ids=pos).logits, rtol=1e-5, atol=1e-5)


def test_resize_token_embeddings_derives_the_graphs_again():
    base = tiny_model("llama", init=0.2)
    moa = transform(base, "lora").eval()
    randomize_adapters(moa, seed=8)
    ids = tokens(2, 6)
    before = moa(input_ids=ids).logits
    moa.resize_token_embeddings(140)
    assert moa.config.vocab_size == 140
    after = moa(input_ids=torch.cat([ids, torch.full((2, 1), 139)], dim=1)).logits
    assert after.shape[-1] == 140
    torch.testing.assert_close(after[:, :6, :128], before, rtol=1e-5, atol=1e-5)
    out = moa.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)


def test_untrusted_peft_config_regexes_are_refused_before_re(tmp_path):
    """A PEFT config is data from a directory: its target_modules regex and rank_pattern keys pass the
    spec's pattern check (no backtracking constructs) before anything matches them."""
    import json
    import time

    base = tiny_model("llama")
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for field, value in (("target_modules", "(.*)*x"), ("rank_pattern", {"(a+)+$": 2})):
        bad = dict(cfg, **{field: value})
        cfg_path.write_text(json.dumps(bad))
        start = time.perf_counter()
        with pytest.raises(AdapterLoadError, match=f"PEFT config's {field}"):
            MoAModel.from_pretrained(base, tmp_path)
        assert time.perf_counter() - start < 5

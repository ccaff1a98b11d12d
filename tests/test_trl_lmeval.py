"""TRL's SFTTrainer and lm-eval-harness's HFLM over a transformed model, both used unchanged, as a PEFT
user would (issue 16, item 5).

- SFTTrainer (TRL 1.x always trains through its fused LM head: ``add_fused_lm_head`` patches the model's
  forward, which then calls ``model.base_model(...)`` for the adapted last hidden state and
  ``model.get_output_embeddings().weight`` for the head) trains the adapters and leaves the base alone;
  for ``lora`` its logged losses, entropy and token accuracy equal a PEFT LoRA's on the same data and the
  same initial adapter weights, step by step, with and without padding-free batches and gradient
  checkpointing.
- HFLM (``pretrained=<model>``) reads ``.device``, ``.config``, calls ``.eval()``, ``.tie_weights()``,
  ``model(input_ids).logits`` for loglikelihood and ``model.generate(input_ids=..., attention_mask=...,
  max_length=..., stopping_criteria=..., pad_token_id=..., use_cache=True, do_sample=False)`` for
  generate_until. With B = 0 both answer exactly what the base model answers; with trained adapters,
  loglikelihood is the adapted model's.

Tiny models from transformers configs, a 128-word WordLevel tokenizer built here: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("lm_eval")
pytest.importorskip("peft")
pytest.importorskip("datasets")

from moa_fx import transform  # noqa: E402
from tiny import randomize_adapters, tiny_model  # noqa: E402

SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>")
PAD, EOS = 0, 1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # no hub calls, no telemetry thread (TRL's trainer sends none when CI is set)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("CI", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def tokenizer():
    """Whitespace-split words ``t4`` … ``t127`` plus four special tokens: 128 ids, the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), 128)})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  unk_token="<unk>", model_max_length=256)
    assert len(tok) == 128 and tok.pad_token_id == PAD and tok.eos_token_id == EOS
    return tok


def text_dataset(n: int = 12, seed: int = 3):
    """Rows of 5 to 13 words (varied lengths, so batches are padded and per-row token counts differ)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = 5 + (i * 3) % 9
        ids = torch.randint(len(SPECIAL), 128, (length,), generator=g).tolist()
        rows.append(" ".join(f"t{j}" for j in ids))
    return Dataset.from_dict({"text": rows})


def base(seed: int = 0):
    return tiny_model("llama", seed=seed, init=0.2)


def moa_model(spec: str):
    torch.manual_seed(0)
    return transform(base(), spec)


def peft_twin(moa):
    """PEFT's LoRA on an identical base, its A and B copied from moa's ``lora`` adapters."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base(), LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                   task_type="CAUSAL_LM"))
    theirs = dict(peft_model.named_parameters())
    ours = moa.adapter_state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in ours.items():
            site, _, part = name.rpartition(".lora.0.")
            target = theirs[f"base_model.model.{site}.{part}.default.weight"]
            assert target.shape == tensor.shape, name
            target.copy_(tensor)
            copied += 1
    assert copied == sum(1 for k in theirs if ".lora_" in k) == 20
    return peft_model


def sft_config(out, **overrides):
    from trl import SFTConfig

    kw = dict(output_dir=str(out), max_steps=5, per_device_train_batch_size=3, learning_rate=1e-2,
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no",
              report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0, dataloader_num_workers=0,
              disable_tqdm=True, max_length=64, gradient_checkpointing=False)
    if any(f.name == "train_sampling_strategy" for f in dataclasses.fields(SFTConfig)):
        kw["train_sampling_strategy"] = "sequential"  # both runs see the rows in the same order
    kw.update(overrides)
    return SFTConfig(**kw)


def sft(model, out, **overrides):
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=sft_config(out, **overrides), train_dataset=text_dataset(),
                      processing_class=tokenizer())


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


# --------------------------------------------------------------------------------------------------
# TRL SFTTrainer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batches", ["padded", pytest.param("padding_free", marks=pytest.mark.slow),
                                     pytest.param("checkpointing", marks=pytest.mark.slow)])
def test_sft_lora_loss_equals_peft(tmp_path, batches):
    """Same data, same initial weights, same order: moa-fx's lora and PEFT's LoRA log the same loss,
    entropy and token accuracy at every step (TRL's fused LM head computes all three from the hidden
    states, so they are the adapted model's only if ``base_model`` runs the adapters)."""
    overrides = {"padded": {}, "padding_free": {"padding_free": True, "max_length": None},
                 "checkpointing": {"gradient_checkpointing": True}}[batches]
    moa = moa_model("lora")
    peft_model = peft_twin(moa)

    base_before = snapshot(moa.model)
    adapters_before = snapshot(moa.adapters)
    ours = sft(moa, tmp_path / "moa", **overrides)
    ours.train()
    theirs = sft(peft_model, tmp_path / "peft", **overrides)
    theirs.train()

    want, got = logged(theirs, "loss"), logged(ours, "loss")
    assert len(want) == 5 and all(math.isfinite(x) for x in want), want
    assert want[-1] < want[0], want  # step 5 sees step 1's rows again (12 rows, 3 a step, in order)
    assert got == pytest.approx(want, abs=1e-4), (got, want)
    for key in ("entropy", "mean_token_accuracy"):
        assert logged(ours, key) == pytest.approx(logged(theirs, key), abs=1e-4), key
    assert logged(ours, "num_tokens") == logged(theirs, "num_tokens")

    assert changed(adapters_before, snapshot(moa.adapters)) == set(adapters_before)  # every A and B trained
    assert not changed(base_before, snapshot(moa.model))  # the base did not move
    # and the trained adapters are PEFT's, tensor for tensor
    theirs_params = dict(peft_model.named_parameters())
    for name, tensor in moa.adapter_state_dict().items():
        site, _, part = name.rpartition(".lora.0.")
        torch.testing.assert_close(tensor, theirs_params[f"base_model.model.{site}.{part}.default.weight"].detach(),
                                   rtol=1e-3, atol=1e-4, msg=name)


def own_loop(moa, batches, lr: float, max_grad_norm: float = 1.0) -> list[float]:
    """The model's own training loop (its forward's loss), with the Trainer's optimizer settings:
    AdamW (β 0.9/0.999, ε 1e-8, no weight decay), constant lr, gradients clipped to norm 1."""
    params = [p for p in moa.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    moa.train()
    losses = []
    for batch in batches:
        loss = moa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_sft_sparse_moa_trains_like_its_own_loop(tmp_path):
    """sparse_moa under SFTTrainer (fused LM head) trains exactly as the model's own forward and loss do
    in a plain loop on the same batches: the same loss at every step, the same tensors move (every
    adapter tensor that gets a gradient), to the same values; the base stays."""
    moa = moa_model("sparse_moa")
    twin = moa_model("sparse_moa")
    for k, v in moa.adapter_state_dict().items():
        assert torch.equal(v, twin.adapter_state_dict()[k]), k
    base_before = snapshot(moa.model)
    adapters_before = snapshot(moa.adapters)

    trainer = sft(moa, tmp_path)
    rows = trainer.train_dataset
    order = [list(range(i, i + 3)) for i in (0, 3, 6, 9, 0)]  # sequential sampler, 5 steps of 3 rows
    batches = [trainer.data_collator([rows[i] for i in idx]) for idx in order]
    want = own_loop(twin, batches, lr=1e-2)

    trainer.train()
    got = logged(trainer, "loss")
    assert len(got) == 5 and all(math.isfinite(x) for x in got), got
    assert got == pytest.approx(want, abs=1e-4), (got, want)
    assert got[-1] < got[0], got  # step 5 sees step 1's rows again

    moved = changed(adapters_before, snapshot(moa.adapters))
    moved_own = changed(adapters_before, snapshot(twin.adapters))
    assert moved == moved_own, sorted(moved ^ moved_own)
    assert any("lora_B" in k for k in moved) and any("router" in k for k in moved), sorted(moved)
    for k in moved:
        torch.testing.assert_close(moa.adapter_state_dict()[k], twin.adapter_state_dict()[k], rtol=1e-3, atol=1e-4,
                                   msg=k)
    assert not changed(base_before, snapshot(moa.model))


# --------------------------------------------------------------------------------------------------
# lm-eval-harness HFLM
# --------------------------------------------------------------------------------------------------

LL_REQUESTS = [("t5 t9 t12", " t7 t8"), ("t20 t21", " t22"), ("t40 t41 t42 t43 t44 t45", " t46 t47 t48"),
               ("t5 t9 t12", " t30")]
GEN_REQUESTS = [("t5 t9 t12 t14", {"until": ["t3"], "max_gen_toks": 6, "do_sample": False}),
                ("t20 t21", {"until": ["t3"], "max_gen_toks": 6, "do_sample": False}),
                ("t40 t41 t42", {"until": ["t3"], "max_gen_toks": 6, "do_sample": False})]


def hflm(model, batch_size: int = 2):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer(), backend="causal", batch_size=batch_size)


def instances(kind: str, requests):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(requests)]


def by_hand(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's own forward, one request at a time."""
    ctx = tok(context).input_ids
    cont = tok(context + continuation).input_ids[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(ctx) - 1:-1]
    return float(torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(cont)[:, None]).sum())


def test_hflm_loglikelihood_equals_base_with_b_zero():
    want = hflm(base()).loglikelihood(instances("loglikelihood", LL_REQUESTS))
    moa = moa_model("lora")  # B = 0: the transform's init
    got = hflm(moa).loglikelihood(instances("loglikelihood", LL_REQUESTS))
    assert len(got) == len(want) == len(LL_REQUESTS)
    for (lg, greedy_g), (lw, greedy_w) in zip(got, want):
        assert lg == pytest.approx(lw, abs=1e-5)
        assert greedy_g == greedy_w


@pytest.mark.parametrize("spec", ["lora", "sparse_moa"])
def test_hflm_loglikelihood_is_the_adapted_models(spec):
    moa = moa_model(spec)
    randomize_adapters(moa, seed=1, std=0.2)
    moa.eval()
    tok = tokenizer()
    got = hflm(moa).loglikelihood(instances("loglikelihood", LL_REQUESTS))
    plain = hflm(base()).loglikelihood(instances("loglikelihood", LL_REQUESTS))
    for (ctx, cont), (lg, _), (lp, _) in zip(LL_REQUESTS, got, plain):
        assert lg == pytest.approx(by_hand(moa, tok, ctx, cont), abs=1e-4)
        assert abs(lg - lp) > 1e-3  # the adapters are in the answer


def test_hflm_generate_until_equals_base_with_b_zero():
    want = hflm(base()).generate_until(instances("generate_until", GEN_REQUESTS))
    moa = moa_model("lora")
    got = hflm(moa).generate_until(instances("generate_until", GEN_REQUESTS))
    assert len(got) == len(GEN_REQUESTS) and all(isinstance(s, str) for s in got)
    assert got == want
    assert any(s.strip() for s in got)  # something was generated
    for s in got:
        assert "t3" not in s.split() and len(s.split()) <= 6


def test_hflm_generate_until_sparse_moa_runs():
    moa = moa_model("sparse_moa")
    randomize_adapters(moa, seed=2, std=0.2)
    out = hflm(moa, batch_size=3).generate_until(instances("generate_until", GEN_REQUESTS))
    assert len(out) == len(GEN_REQUESTS) and all(isinstance(s, str) for s in out)
    for s in out:
        assert len(s.split()) <= 6

"""SmolLM2-135M + ``sparse_moa``: train with TRL's SFTTrainer, then score with lm-eval-harness — both
used exactly as with a PEFT model, offline from the asset cache (ASSETS.md).

    python examples/sft_then_lm_eval.py                  # sports_understanding, 60 steps, ~5 min on 2 CPU cores
    python examples/sft_then_lm_eval.py --task navigate --steps 100 --out runs/sft

1. Fine-tune: a BIG-bench multiple-choice task as prompt/completion pairs (loss on the answer
   only), ``SFTTrainer(model=moa_model, ...)``; 2. evaluate: lm-eval's ``HFLM(pretrained=moa_model)``
   ``loglikelihood`` of every choice of held-out questions (accuracy), before and after training,
   and ``generate_until`` for a few prompts; 3. save with ``save_pretrained`` and reload.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sports_understanding")
    parser.add_argument("--preset", default="sparse_moa")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--test", type=int, default=100, help="held-out questions scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/sft_then_lm_eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from moa_fx import MoAModel, transform
    from moa_fx.eval.assets import smollm2_path
    from moa_fx.eval.tasks import load_task, split

    out = pathlib.Path(args.out)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path)
    train_ex, test_ex = split(load_task(args.task), seed=0, min_test=args.test)
    test_ex = test_ex[:args.test]

    start = time.perf_counter()
    model = transform(base, args.preset)
    t_transform = time.perf_counter() - start
    model.print_trainable_parameters()

    def accuracy(lm) -> float:
        reqs = [Instance(request_type="loglikelihood", doc={}, arguments=(ex.prompt, choice), idx=i)
                for ex in test_ex for i, choice in enumerate(ex.choices)]
        scores = [ll for ll, _ in lm.loglikelihood(reqs)]
        right, k = 0, 0
        for ex in test_ex:
            mine = scores[k:k + len(ex.choices)]
            k += len(ex.choices)
            right += int(max(range(len(mine)), key=mine.__getitem__) == ex.answer)
        return right / len(test_ex)

    model.eval()
    before = accuracy(HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=args.batch))

    rows = Dataset.from_list([{"prompt": ex.prompt, "completion": ex.choices[ex.answer]} for ex in train_ex])
    config = SFTConfig(output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
                       logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                       gradient_checkpointing=False, max_length=96, seed=0, max_grad_norm=1.0)
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=config, train_dataset=rows, processing_class=tok)
    trainer.train()
    t_train = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=args.batch)
    after = accuracy(lm)
    gen = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                      arguments=(ex.prompt, {"until": ["\n"], "max_gen_toks": 8}))
                             for ex in test_ex[:4]])
    stats = model.router_stats()
    active = sum(s["mean_active"] for s in stats.values()) / max(len(stats), 1) if stats else None

    model.save_pretrained(out / "adapter")
    start = time.perf_counter()
    again = MoAModel.from_pretrained(base, out / "adapter").eval()
    t_reload = time.perf_counter() - start
    ids = tok(test_ex[0].prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        same = float((again(input_ids=ids).logits - model(input_ids=ids).logits).abs().max())

    report = {"task": args.task, "preset": args.preset, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "train_examples": len(train_ex), "test_examples": len(test_ex),
              "accuracy_before": before, "accuracy_after": after, "train_loss_first_last": [losses[0], losses[-1]],
              "mean_active_experts_per_router": active, "generated": [g.strip() for g in gen],
              "answers": [ex.choices[ex.answer] for ex in test_ex[:4]],
              "seconds": {"transform": t_transform, "train": t_train, "reload": t_reload},
              "reload_max_logit_difference": same, "derivations": model.derivations}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "derivations"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

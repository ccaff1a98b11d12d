"""The evaluation protocol on synthetic tasks, a character tokenizer and a tiny random LLaMA."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moa_fx.errors import AssetError, InputError
from moa_fx.eval.tasks import (
    GenerationExample,
    TaskExample,
    accuracy,
    chance,
    drop_long_prompts,
    encode_for_training,
    examples_from_task_dict,
    generate_answers,
    is_correct,
    mixture,
    predict,
    score_choices,
    split,
    train_val_test,
    winowhy_group,
)


@pytest.fixture(scope="module")
def tokenizer():
    """One token per character, so expected ids can be written by hand."""
    specials = ["<pad>", "<unk>", "<bos>"]
    chars = sorted(set(string.printable))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # Default init is close to uniform; sharpen it so choices get clearly different scores.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8.0 if parameter.dim() > 1 else 1.0)
    return model


def _synthetic_task(n: int) -> dict:
    return {
        "examples": [
            {"input": f"item {i} is", "target_scores": {c: int(i % 3 == k) for k, c in enumerate(("red", "green", "blue"))}}
            for i in range(n)
        ]
    }


# --------------------------------------------------------------------------
# Prompt building


def test_prompt_uses_bigbench_defaults_and_moves_the_trailing_space():
    task = {"examples": [{"input": "Is fire hot?", "target_scores": {"yes": 1, "no": 0}}]}
    (example,) = examples_from_task_dict(task, name="toy")
    assert example.prompt == "\nQ: Is fire hot?\n  choice: yes\n  choice: no\nA:"
    assert example.choices == [" yes", " no"]
    assert example.answer == 0
    assert example.task == "toy"


def test_prompt_honours_task_fields():
    task = {
        "task_prefix": "Answer briefly.",
        "example_input_prefix": "\nInput: ",
        "example_output_prefix": "\nOutput:\n",
        "choice_prefix": " | ",
        "append_choices_to_input": False,
        "examples": [{"input": "2+2", "target_scores": {"3": 0, "4": 1, "5": 0.5}}],
    }
    (example,) = examples_from_task_dict(task)
    assert example.prompt == "Answer briefly.\nInput: 2+2\nOutput:\n"
    assert example.choices == ["3", "4", "5"]  # no trailing space to move
    assert example.answer == 1


def test_appended_choices_use_choice_prefix():
    task = {"choice_prefix": " | ", "examples": [{"input": "x", "target_scores": {"a": 0, "b": 1}}]}
    (example,) = examples_from_task_dict(task)
    assert example.prompt == "\nQ: x | a | b\nA:"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"input": "x", "target_scores": {"a": 1, "b": 1}}, "share the top score"),
        ({"input": "x"}, "'target_scores' .* or a 'target'"),
        ({"input": "x", "target_scores": {"a": 1}}, "at least two choices"),
        ({"input": "x", "target": []}, "non-empty list"),
        ({"input": "x", "target": ["a", " "]}, "non-blank"),
        ({"input": "x", "target": 3}, "must be a non-blank string"),
    ],
)
def test_unsupported_examples_are_rejected(raw, message):
    with pytest.raises(AssetError, match=message):
        examples_from_task_dict({"examples": [raw]}, name="toy")


def test_free_text_targets_make_generation_examples():
    task = {
        "task_prefix": "Plural.",
        "examples": [
            {"input": "cat", "target": "cats"},
            {"input": "ox", "target": ["oxen", "oxes"]},
            # target_scores wins where both are given: the example stays multiple choice
            {"input": "dog", "target": "dogs", "target_scores": {"dogs": 1, "doges": 0}},
        ],
    }
    gen, alias, choice = examples_from_task_dict(task, name="plural")
    assert gen == GenerationExample(prompt="Plural.\nQ: cat\nA:", targets=(" cats",), task="plural")
    assert alias.targets == (" oxen", " oxes") and alias.answer_text == " oxen\n"
    assert isinstance(choice, TaskExample) and choice.answer_text == " dogs"
    # no trailing space in the prompt: the targets are kept as written
    (bare,) = examples_from_task_dict({"example_output_prefix": "=", "examples": [{"input": "1+1", "target": "2"}]})
    assert bare.prompt == "\nQ: 1+1=" and bare.targets == ("2",)


# --------------------------------------------------------------------------
# Training tensors


def test_generation_examples_train_on_the_first_target_and_its_end(tokenizer):
    # the answer's line break is trained too, so a fine-tuned model stops where the scorer stops reading
    example = GenerationExample(prompt="Q: ox?\nA:", targets=(" oxen", " oxes"))
    batch = encode_for_training(tokenizer, [example], max_len=64)
    prompt_ids = tokenizer(example.prompt)["input_ids"]
    assert tokenizer.decode(batch["input_ids"][0]) == "Q: ox?\nA: oxen\n"  # prompt + " " + target + end
    assert (batch["labels"][0][: len(prompt_ids)] == -100).all()
    assert tokenizer.decode(batch["labels"][0][len(prompt_ids):]) == " oxen\n"


def test_labels_mask_prompt_and_padding(tokenizer):
    examples = [
        TaskExample(prompt="Q: sky?\nA:", choices=[" blue", " red"], answer=0),
        TaskExample(prompt="Q: grass colour?\nA:", choices=[" green", " no"], answer=1),
    ]
    batch = encode_for_training(tokenizer, examples, max_len=64)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, example in enumerate(examples):
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        answer_ids = tokenizer(example.choices[example.answer], add_special_tokens=False)["input_ids"]
        n_prompt, n_real = len(prompt_ids), len(prompt_ids) + len(answer_ids)
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert ids[:n_real].tolist() == prompt_ids + answer_ids
        assert (labels[:n_prompt] == -100).all()
        assert labels[n_prompt:n_real].tolist() == answer_ids
        assert (labels[n_real:] == -100).all()
        assert (ids[n_real:] == tokenizer.pad_token_id).all()  # right padding
        assert mask.tolist() == [1] * n_real + [0] * (len(mask) - n_real)
    # The space sits on the answer side: the first answer token is " ".
    assert tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100]) == " blue"


def test_long_prompts_lose_tokens_from_the_left(tokenizer):
    example = TaskExample(prompt="x" * 50 + "END", choices=[" yes", " no"], answer=0)
    batch = encode_for_training(tokenizer, [example], max_len=10)
    assert batch["input_ids"].shape == (1, 10)
    assert tokenizer.decode(batch["input_ids"][0]) == "xxxEND yes"
    with pytest.raises(InputError, match="raise max_len"):
        encode_for_training(tokenizer, [example], max_len=4)


# --------------------------------------------------------------------------
# Splits


def test_split_is_seeded_disjoint_and_complete():
    examples = examples_from_task_dict(_synthetic_task(50))
    train, test = split(examples, seed=3, test_fraction=0.2, min_test=5)
    assert len(test) == 10 and len(train) == 40
    assert sorted(e.prompt for e in train + test) == sorted(e.prompt for e in examples)
    assert split(examples, seed=3, test_fraction=0.2, min_test=5) == (train, test)
    assert split(examples, seed=4, test_fraction=0.2, min_test=5)[1] != test
    assert len(split(examples, seed=3, min_test=30)[1]) == 30


def test_train_val_test_keeps_validation_apart_and_the_test_split_of_split():
    examples = examples_from_task_dict(_synthetic_task(100))
    train, val, test = train_val_test(examples, seed=3, min_test=20, val_fraction=0.1)
    assert test == split(examples, seed=3, min_test=20)[1]
    assert (len(train), len(val), len(test)) == (72, 8, 20)
    prompts = [{e.prompt for e in part} for part in (train, val, test)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert train_val_test(examples, seed=3, min_test=20) == (train, val, test)


def test_drop_long_prompts_counts_with_special_tokens(tokenizer):
    examples = [TaskExample("x" * n, [" a", " b"], 0) for n in (3, 4, 5)]
    # the char tokenizer adds no BOS, so a prompt of n characters is n tokens
    kept, dropped = drop_long_prompts(tokenizer, examples, max_tokens=4)
    assert kept == examples[:2] and dropped == 1


def test_split_refuses_to_leave_no_training_data():
    examples = examples_from_task_dict(_synthetic_task(20))
    with pytest.raises(InputError, match="lower min_test"):
        split(examples, seed=0)  # default min_test=150


def test_grouped_split_leaks_no_group():
    # Groups of 1 to 4 explanations per sentence, as in winowhy (up to 19 there).
    examples = [
        TaskExample(
            prompt=f"Intro.\n\nSentence {s} about it. The 'it' refers to thing {k}.\nThe above reasoning is",
            choices=[" correct", " incorrect"],
            answer=k % 2,
        )
        for s in range(12)
        for k in range(1 + s % 4)
    ]
    assert len({winowhy_group(e) for e in examples}) == 12
    train, test = split(examples, seed=1, test_fraction=0.25, min_test=1, group_key=winowhy_group)
    assert not {winowhy_group(e) for e in train} & {winowhy_group(e) for e in test}
    assert len(train) + len(test) == len(examples)
    assert len(test) >= round(0.25 * len(examples))


def test_winowhy_group_is_the_text_before_the_explanation():
    example = TaskExample("P\n\nThe cat sat. The 'it' refers to the cat.\nX", [" a", " b"], answer=0)
    assert winowhy_group(example) == "P\n\nThe cat sat."


def test_mixture_tags_and_balances_tasks():
    def loader(name):
        return examples_from_task_dict(_synthetic_task(200), name="")  # untagged on purpose

    mixed = mixture(["a", "b"], per_task=8, seed=0, loader=loader)
    assert len(mixed) == 16
    assert sum(e.task == "a" for e in mixed) == sum(e.task == "b" for e in mixed) == 8


def test_mixture_excludes_held_out_examples():
    def loader(name):
        return examples_from_task_dict(_synthetic_task(400), name=name)

    mixed = mixture(["a"], per_task=250, seed=5, loader=loader)
    _, test = split(loader("a"), seed=0)
    assert not {e.prompt for e in mixed} & {e.prompt for e in test}
    assert mixture(["a"], per_task=250, seed=5, loader=loader) == mixed
    with pytest.raises(InputError, match="per_task"):
        mixture(["a"], per_task=251, seed=5, loader=loader)


# --------------------------------------------------------------------------
# Scoring


def _direct_scores(model, tokenizer, example):
    """Summed log-likelihood of each choice, one unpadded sequence at a time."""
    scores = []
    for choice in example.choices:
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + choice_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        # Token j of the choice sits at position len(prompt) + j and is predicted one position earlier.
        scores.append(sum(log_probs[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(choice_ids)))
    return scores


def test_score_choices_matches_a_direct_computation(tokenizer, tiny_llama):
    examples = [
        # Equal-length choices: a random model favours short choices under summed scores.
        TaskExample(f"Q{i}: pick one{'!' * (i % 5)}\nA:", [" red", " tan", " sky", " ash"], answer=i % 4)
        for i in range(12)
    ]
    expected = []
    for example in examples:
        scores = _direct_scores(tiny_llama, tokenizer, example)
        ranked = sorted(scores, reverse=True)
        assert ranked[0] - ranked[1] > 1e-3, "pick examples without near-ties"
        expected.append(scores.index(ranked[0]))
    assert len(set(expected)) > 1, "a random model should not prefer one choice everywhere"
    # Batch sizes 1 (no padding) and 5 (mixed lengths, right padding) must agree.
    assert score_choices(tiny_llama, tokenizer, examples, batch_size=1) == expected
    assert score_choices(tiny_llama, tokenizer, examples, batch_size=5) == expected


def test_score_choices_accepts_any_callable_and_restores_train_mode(tokenizer, tiny_llama):
    favourite = tokenizer.convert_tokens_to_ids("z")

    class Output:
        def __init__(self, logits):
            self.logits = logits

    def prefers_z(input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(tokenizer))
        logits[..., favourite] = 5.0
        return Output(logits)

    examples = [TaskExample(prompt="Q:", choices=[" a", " z", " b"], answer=1)]
    assert score_choices(prefers_z, tokenizer, examples, batch_size=2) == [1]

    tiny_llama.train()
    score_choices(tiny_llama, tokenizer, examples, batch_size=2)
    assert tiny_llama.training
    tiny_llama.eval()


def test_accuracy():
    examples = [TaskExample("p", [" a", " b"], answer) for answer in (0, 1, 1, 0)]
    assert accuracy([0, 1, 0, 0], examples) == 0.75
    with pytest.raises(InputError, match="one prediction per example"):
        accuracy([0], examples)


def test_exact_match_compares_stripped_text_with_every_target():
    example = GenerationExample("p", (" 12", " twelve "))
    assert is_correct("12", example) and is_correct(" twelve\t", example)
    assert not is_correct("12.", example) and not is_correct("1", example) and not is_correct(0, example)
    assert accuracy(["12", "13"], [example, example]) == 0.5
    assert chance([example, TaskExample("p", [" a", " b", " c", " d"], 0)]) == pytest.approx(0.125)


class _ScriptedGenerator:
    """A stand-in for a causal LM: ``generate`` appends a scripted text per prompt (keyed by the
    prompt's last character) and records its arguments, honouring the stopping criteria."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, **kwargs):
        self.calls.append(dict(input_ids=input_ids, attention_mask=attention_mask,
                               max_new_tokens=max_new_tokens, **kwargs))
        rows = [row.tolist() for row in input_ids]
        finished = [False] * len(rows)
        for step in range(max_new_tokens):
            for r, row in enumerate(rows):
                reply = self.tokenizer(self.replies[self.tokenizer.decode(row[input_ids.shape[1] - 1])],
                                       add_special_tokens=False)["input_ids"]
                row.append(self.tokenizer.pad_token_id if finished[r] or step >= len(reply) else reply[step])
            stop = stopping_criteria[0](torch.tensor(rows), None)
            finished = [f or bool(s) for f, s in zip(finished, stop)]
        return torch.tensor(rows)


def test_generate_answers_rule_first_line_stripped_and_budget(tokenizer):
    examples = [
        GenerationExample("Q: x?\nA:", (" 12", " twelve")),  # longest target: 7 characters = 7 tokens
        GenerationExample("Q: yy?\nA;", (" 3",)),
        GenerationExample("Q: zzz?\nA,", (" 4",)),
    ]
    model = _ScriptedGenerator(tokenizer, {":": " twelve\nQ: next", ";": " 3 and more", ",": "\n4"})
    answers = generate_answers(model, tokenizer, examples, batch_size=8)
    # the first line of the new text, stripped: the third reply's first line is empty
    assert answers == ["twelve", "3 and mo", ""]
    assert [is_correct(a, e) for a, e in zip(answers, examples)] == [True, False, False]
    (call,) = model.calls
    assert call["max_new_tokens"] == 7 + 2 and call["do_sample"] is False and call["num_beams"] == 1
    # left padding: every prompt ends at the last column, its mask covers it exactly
    lengths = [len(tokenizer(e.prompt)["input_ids"]) for e in examples]
    assert call["attention_mask"].sum(1).tolist() == sorted(lengths)
    assert (call["attention_mask"][:, -1] == 1).all() and call["input_ids"].shape[0] == 3
    with pytest.raises(InputError, match="raise max_len"):
        generate_answers(model, tokenizer, examples, max_len=9)


def test_generate_answers_agree_across_batch_sizes(tokenizer, tiny_llama):
    examples = [GenerationExample(f"Q{i}: say{'!' * (i % 4)}\nA:", (" abc",)) for i in range(9)]
    one = generate_answers(tiny_llama, tokenizer, examples, batch_size=1)
    assert generate_answers(tiny_llama, tokenizer, examples, batch_size=4) == one  # left padding is masked
    assert len(set(one)) > 1 and all("\n" not in a for a in one)


def test_predict_scores_each_kind_its_own_way(tokenizer, tiny_llama):
    mixed = [
        TaskExample("Q0: pick\nA:", [" red", " tan"], 0),
        GenerationExample("Q1: say\nA:", (" abc",)),
        TaskExample("Q2: pick!\nA:", [" red", " tan"], 1),
    ]
    predictions = predict(tiny_llama, tokenizer, mixed, batch_size=4)
    assert predictions[0::2] == score_choices(tiny_llama, tokenizer, mixed[0::2])
    assert predictions[1:2] == generate_answers(tiny_llama, tokenizer, mixed[1:2])

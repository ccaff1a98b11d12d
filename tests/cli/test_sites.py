import pytest

import moa_fx
from moa_fx.cli.models import load_model


@pytest.mark.parametrize("model,spec", [("tiny-llama", "sparse_moa"), ("tiny-gpt2", "adamole"),
                                        ("tiny-qwen3", "hydralora"), ("tiny-phi3", "soft_moa")])
def test_counts_match_the_transform(cli_json, model, spec):
    code, report = cli_json("sites", model, "--spec", spec, "--json")
    assert code == 0 and report["ok"]
    trainable, _ = moa_fx.transform(load_model(model)[0], spec).trainable_parameter_count()
    assert report["trainable"] == trainable
    assert report["base"] == sum(p.numel() for p in load_model(model)[0].parameters())


def test_text_report(cli):
    code, out, _ = cli("sites", "tiny-llama", "--spec", "sparse_moa")
    assert code == 0
    assert "model.layers.{0..1}.self_attn.q_proj ×2" in out
    assert "routers: 2 × swiglu (@blocks), 6 experts each" in out
    assert "adds 21,166 trainable parameters" in out and "% trainable" in out


def test_unmatched_rule_exits_2_with_nearest_paths(cli, tmp_path):
    spec = tmp_path / "typo.toml"
    spec.write_text('[[expert]]\nkind = "lora"\nat = ["*.qproj"]\nname = "typo"\n'
                    '[[expert]]\nkind = "lora"\nat = ["*.v_proj"]\nname = "good"\n')
    code, out, _ = cli("sites", "tiny-llama", "--spec", str(spec))
    assert code == 2
    assert "unmatched typo" in out and "'*.q_proj'" in out
    assert "model.layers.{0..1}.self_attn.v_proj ×2" in out  # the good rule still shows its matches


def test_optional_unmatched_rule_is_reported_but_ok(cli_json, tmp_path):
    spec = tmp_path / "opt.json"
    spec.write_text('{"expert": [{"kind": "lora", "at": ["*.q_proj"]}, '
                    '{"kind": "lora", "at": ["*.nothing"], "optional": true, "name": "maybe"}]}')
    code, report = cli_json("sites", "tiny-llama", "--spec", str(spec), "--json")
    assert code == 0
    maybe = next(r for r in report["rules"] if r["name"] == "maybe")
    assert maybe["status"] == "unmatched (optional)" and "matched no linear projection" in maybe["message"]


@pytest.mark.parametrize("family,spec,note", [
    ("olmo2", "sparse_moa", "note: router: the block has no normalisation module on its input; the router reads the "
                            "raw block input (router.input = 'raw') — model.layers.{0..1} ×2"),
    ("bloom", "parallel_adapter", "note: expert 'pa': the module takes 2 tensors; reading the one that feeds its first "
                                  "projection (dense_h_to_4h) — transformer.h.{0..1}.mlp ×2"),
])
def test_sites_says_which_input_it_chose(cli, cli_json, tmp_path, family, spec, note):
    import transformers as tf

    cfg = {"olmo2": lambda: tf.Olmo2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2),
           "bloom": lambda: tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)}[family]()
    cfg.to_json_file(str(tmp_path / "config.json"))
    code, out, _ = cli("sites", str(tmp_path / "config.json"), "--spec", spec)
    assert code == 0, out
    assert note in " ".join(out.split())
    code, report = cli_json("sites", str(tmp_path / "config.json"), "--spec", spec, "--json")
    assert code == 0 and report["notes"] and report["notes"][0]["paths"]

"""A catalogue of bad inputs: each must raise its moa-fx error class with a message that names the problem.

Sections: spec files and values → site patterns → model inputs → adapter files (damaged, foreign,
pickles) → training checkpoints, the ``moa-fx train`` command line, the output directory's lock and
the batches a data object hands the training loop. Each case asserts the error
class and a fragment of the message; the CLI cases assert a one-line error and exit status 2.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import time

import pytest
import torch

from moa_fx import capture, transform
from moa_fx.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from moa_fx.cli import main
from moa_fx.errors import AdapterLoadError, InputError, MoaFxError, SiteMatchError, SpecError
from moa_fx.runtime import MoAModel
from moa_fx.sites import find_sites
from moa_fx.spec import load_spec
from moa_fx.cli.models import load_model
from moa_fx.data import Batch, JsonlData, check_batch
from moa_fx.train import CHECKPOINT_DIR, LOCK_FILE, STATE_FILE, Callbacks, TrainConfig, train
from tiny import TinyMLP, randomize_adapters, tiny_model, tokens


@pytest.fixture(autouse=True)
def _plain_errors(monkeypatch):
    monkeypatch.delenv("MOA_FX_DEBUG", raising=False)
    monkeypatch.setenv("MOA_FX_PLAIN", "1")


# --------------------------------------------------------------------------------------------------
# spec files and values
# --------------------------------------------------------------------------------------------------

LORA = '[[expert]]\nkind = "lora"\nat = ["*.q_proj"]\n'

SPEC_FILES = [
    # (file name, contents, message fragment)
    ("bad.toml", '[[expert]\nkind = "lora"', "is not valid TOML"),
    ("bad.json", '{"expert": [{"kind": "lora",}]}', "is not valid JSON"),
    ("latin1.toml", b"name = '\xe9'\n" + LORA.encode(), "is not valid TOML"),
    ("spec.yaml", "expert: []", "must end in .toml or .json"),
    ("list.json", "[1, 2]", "a spec must be a table/object, got list"),
    ("empty.toml", "", "spec.experts is empty"),
    ("peft.toml", LORA + "rank = 8\n", "unknown field 'rank' (did you mean 'r'?)"),
    ("typo.toml", LORA + "dropuot = 0.1\n", "unknown field 'dropuot' (did you mean 'dropout'?)"),
    ("top.toml", "lr = 0.1\n" + LORA, "spec: unknown field 'lr'"),
    ("router.toml", LORA + '[router]\nscope = "site"\ngating = "softmax"\n', "router: unknown field 'gating'"),
    ("kind.toml", '[[expert]]\nkind = "ia3"\n', "experts[0].kind = 'ia3' is not valid; choose one of 'lora'"),
    ("rtype.toml", LORA + 'r = "8"\n', "r = '8' has type str; expected int"),
    ("rbool.toml", LORA + "r = true\n", "r = True has type bool"),
    ("attype.toml", '[[expert]]\nkind = "lora"\nat = 5\n', "at = 5 has type int"),
    ("r0.toml", LORA + "r = 0\n", "expert.lora.r = 0 is not valid; it must be a positive integer"),
    ("rneg.json", json.dumps({"expert": [{"kind": "lora", "at": "*.q_proj", "r": [4, -8]}]}),
     "expert.lora.r = -8 is not valid"),
    ("count.toml", LORA + "count = 0\n", "expert.lora.count = 0 is not valid"),
    ("dropout.toml", LORA + "dropout = 1.5\n", "expert.lora.dropout = 1.5 is not valid; it must be in [0, 1)"),
    ("tau.toml", LORA + '[router]\nscope = "site"\nselect = "threshold"\n[router.threshold]\nvalue = 1.5\n',
     "router.threshold.value = 1.5 is not valid; it must be in [0, 1]"),
    ("taumax.toml", LORA + '[router]\nscope = "site"\nselect = "threshold"\n[router.threshold]\nmax = 0.0\n',
     "router.threshold.max = 0.0 is not valid; it must be in (0, 1]"),
    ("topk.toml", LORA + 'count = 2\n[router]\nscope = "site"\nselect = "topk"\ntop_k = 3\n',
     "router.top_k = 3 is not valid; expert 'lora' has only 2 experts per site"),
    ("gate.toml", LORA + '[router]\nscope = "site"\ngate = "softplus"\n',
     "router.gate = 'softplus' is not valid; choose one of 'softmax', 'sigmoid'"),
    ("noroute.toml", LORA + '[router]\nselect = "threshold"\n', "without a router (scope = 'none') only 'dense'"),
    ("dup.toml", LORA + LORA, "expert names must be unique; ['lora']"),
    ("layers.toml", "layers = {from = 3, to = 1}\n" + LORA, "0 <= from <= to"),
    ("share.toml", LORA + "r = [4, 8]\nshare_a = true\n", "a shared A needs every expert to have the same rank"),
    ("pasite.toml", '[[expert]]\nkind = "parallel_adapter"\n[router]\nscope = "site"\n',
     "per-site routers gate LoRA experts only"),
    ("alpha.json", '{"expert": [{"kind": "lora", "at": "*.q_proj", "alpha": NaN}]}',
     "expert.lora.alpha = nan is not valid"),
    # a string where a list of patterns belongs: it used to be split into one pattern per character
    ("exclude.toml", LORA + 'exclude = "model.layers.0.self_attn.q_proj"\n',
     "expert.lora.exclude = 'model.layers.0.self_attn.q_proj' is not valid; give a list of patterns, not a string "
     "(write exclude = ['model.layers.0.self_attn.q_proj'])"),
    ("exclude_pa.toml", '[[expert]]\nkind = "parallel_adapter"\nexclude = "model.layers.0.mlp"\n',
     "expert.parallel_adapter.exclude = 'model.layers.0.mlp' is not valid; give a list of patterns, not a string"),
    ("exclude_prompt.toml", '[[expert]]\nkind = "prompt"\nexclude = "model.layers.0.self_attn"\n',
     "expert.prompt.exclude = 'model.layers.0.self_attn' is not valid; give a list of patterns"),
    ("exclude_int.toml", LORA + "exclude = [1]\n", "expert.lora.exclude = 1 is not valid; each pattern must be a "
                                                     "non-empty string"),
    ("at_empty.toml", '[[expert]]\nkind = "lora"\nat = [""]\n', "expert.lora.at = '' is not valid; each pattern must"),
    # numbers that are well typed but meaningless
    ("alpha_inf.toml", LORA + "alpha = inf\n", "expert.lora.alpha = inf is not valid; it must be a finite number > 0"),
    ("alpha_ninf.json", '{"expert": [{"kind": "lora", "at": "*.q_proj", "alpha": -Infinity}]}',
     "expert.lora.alpha = -inf is not valid; it must be a finite number > 0"),
    ("alpha0.toml", LORA + "alpha = 0\n", "expert.lora.alpha = 0 is not valid; it must be a finite number > 0"),
    ("alpha_neg.toml", LORA + "alpha = -8.0\n", "expert.lora.alpha = -8.0 is not valid"),
    ("dropout_nan.toml", LORA + "dropout = nan\n", "expert.lora.dropout = nan is not valid; it must be in [0, 1)"),
    ("dropout1.toml", LORA + "dropout = 1.0\n", "expert.lora.dropout = 1.0 is not valid; it must be in [0, 1)"),
    ("dropout_neg.toml", LORA + "dropout = -0.1\n", "expert.lora.dropout = -0.1 is not valid"),
    ("r_list_empty.toml", LORA + "r = []\n", "expert.lora.r = () is not valid; give a positive rank"),
    ("bottleneck0.toml", '[[expert]]\nkind = "parallel_adapter"\nbottleneck = 0\n',
     "expert.parallel_adapter.bottleneck = 0 is not valid; it must be a positive integer"),
    ("bottleneck_neg.toml", '[[expert]]\nkind = "parallel_adapter"\nbottleneck = -16\n',
     "expert.parallel_adapter.bottleneck = -16 is not valid"),
    ("gain_inf.toml", '[[expert]]\nkind = "parallel_adapter"\ninit_gain = inf\n',
     "expert.parallel_adapter.init_gain = inf is not valid; it must be a finite number > 0"),
    ("gain0.toml", '[[expert]]\nkind = "parallel_adapter"\ninit_gain = 0.0\n',
     "expert.parallel_adapter.init_gain = 0.0 is not valid"),
    ("length0.toml", '[[expert]]\nkind = "prompt"\nlength = 0\n', "expert.prompt.length = 0 is not valid"),
    ("taumax_nan.toml", LORA + '[router]\nscope = "site"\nselect = "threshold"\n[router.threshold]\nmax = nan\n',
     "router.threshold.max = nan is not valid; it must be in (0, 1]"),
    ("taumax_big.toml", LORA + '[router]\nscope = "site"\nselect = "threshold"\n[router.threshold]\nmax = 1.5\n',
     "router.threshold.max = 1.5 is not valid; it must be in (0, 1]"),
    ("tau_inf.toml", LORA + '[router]\nscope = "site"\nselect = "threshold"\n[router.threshold]\nvalue = inf\n',
     "router.threshold.value = inf is not valid; it must be in [0, 1]"),
    ("aux_inf.toml", LORA + '[router]\nscope = "site"\naux_loss_coef = inf\n',
     "router.aux_loss_coef = inf is not valid; it must be a finite number >= 0"),
    ("aux_neg.toml", LORA + '[router]\nscope = "site"\naux_loss_coef = -0.01\n',
     "router.aux_loss_coef = -0.01 is not valid; it must be a finite number >= 0"),
    ("topk0.toml", LORA + 'count = 2\n[router]\nscope = "site"\nselect = "topk"\ntop_k = 0\n',
     "router.top_k = 0 is not valid; it must be a positive integer"),
    ("hidden0.toml", LORA + '[router]\nscope = "@blocks"\nform = "swiglu"\nhidden_multiplier = 0\n',
     "router.hidden_multiplier = 0 is not valid"),
    # regular expressions that would make Python's backtracking `re` run for hours
    ("re_nested.toml", '[[expert]]\nkind = "lora"\nat = ["re:(.*)*x"]\n',
     "expert.lora.at = 're:(.*)*x' is not valid; this regular expression has a nested quantifier"),
    ("re_plus.toml", '[[expert]]\nkind = "lora"\nat = ["re:(a+)+b"]\n', "has a nested quantifier"),
    ("re_branch.toml", '[[expert]]\nkind = "lora"\nat = ["re:(a|ab)*c"]\n', "repeats an alternation"),
    ("re_backref.toml", '[[expert]]\nkind = "lora"\nat = ["re:(q)_\\\\1"]\n', "uses a back-reference"),
    ("re_many.toml", '[[expert]]\nkind = "lora"\nat = ["re:.*.*.*.*x"]\n', "has 4 quantifiers; at most 3"),
    ("re_syntax.toml", '[[expert]]\nkind = "lora"\nat = ["re:model\\\\.(q"]\n', "does not compile (missing )"),
    ("re_exclude.toml", LORA + 'exclude = ["re:(x+x+)+y"]\n', "expert.lora.exclude = 're:(x+x+)+y' is not valid"),
    ("re_scope.toml", LORA + '[router]\nscope = "re:(model\\\\.layers\\\\.\\\\d+)*"\n',
     "router.scope = 're:(model\\\\.layers\\\\.\\\\d+)*' is not valid; this regular expression has a nested"),
    ("re_long.toml", '[[expert]]\nkind = "lora"\nat = ["' + "a" * 300 + '"]\n',
     "a pattern may have at most 200 characters (this one has 300)"),
    # names become module-path components
    ("name_dot.toml", LORA + 'name = "lora.q"\n', "expert.lora.name = 'lora.q' is not valid; an expert name must be "
                                                  "an identifier"),
    ("name_empty.toml", LORA + 'name = ""\n', "expert.lora.name = '' is not valid"),
    ("name_attr.toml", LORA + 'name = "weight"\n',
     "expert.lora.name = 'weight' is not valid; it collides with an attribute of torch modules"),
    ("name_method.toml", '[[expert]]\nkind = "parallel_adapter"\nname = "forward"\n', "collides with an attribute"),
    ("optional.json", '{"expert": [{"kind": "lora", "at": "*.q_proj", "optional": "yes"}]}',
     "optional = 'yes' has type str; expected bool"),
]


@pytest.mark.parametrize("name,text,fragment", SPEC_FILES, ids=[c[0] for c in SPEC_FILES])
def test_bad_spec_file(tmp_path, name, text, fragment):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert fragment in str(info.value)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(SpecError, match=r"'sparse_mao' is neither a preset nor an existing file; did you mean "
                                        r"'sparse_moa'"):
        load_spec("sparse_mao")


# --------------------------------------------------------------------------------------------------
# site patterns
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_gm():
    torch.set_num_threads(1)
    return capture(tiny_model("llama")).gm


def lora_at(*patterns, **kw):
    return {"expert": [{"kind": "lora", "at": list(patterns), **kw}]}


SITE_CASES = [
    (lora_at("*.qproj"), "matched no linear projection; did you mean '*.q_proj'"),
    (lora_at("*.c_attn"), "pattern ['*.c_attn'] matched no linear projection"),  # GPT-2 names on LLaMA
    (lora_at("@qq"), "unknown role '@qq'; roles: @q, @k"),
    (lora_at("*.q_proj", layers=[7]), "matched only modules that its layers/exclude settings"),
    ({"expert": [{"kind": "lora", "at": ["*.q_proj"], "name": "a"},
                 {"kind": "lora", "at": ["*.self_attn.q_proj"], "name": "b"}]},
     "experts 'a' ('*.q_proj') and 'b' ('*.self_attn.q_proj') both claim model.layers.0.self_attn.q_proj with "
     "equal precedence"),
    ({"expert": [{"kind": "parallel_adapter", "around": ["*.mlpp"]}]}, "pattern ['*.mlpp'] matched no module; "
                                                                      "did you mean '*.mlp'?"),
    ({"expert": [{"kind": "parallel_adapter", "around": ["*.self_attn.q_proj"]}], "router": {"scope": "model.layerz.*"}},
     "router.scope 'model.layerz.*' matches no block around model.layers.0.self_attn.q_proj"),
    ({"expert": [{"kind": "prompt", "at": ["*.mlp"]}]},
     "module 'model.layers.0.mlp' matched '*.mlp' but cannot take a prompt expert: no attention op"),
]


@pytest.mark.parametrize("spec,fragment", SITE_CASES, ids=[f"site{i}" for i in range(len(SITE_CASES))])
def test_bad_pattern(llama_gm, spec, fragment):
    with pytest.raises(SiteMatchError) as info:
        find_sites(llama_gm, load_spec(spec))
    assert fragment in str(info.value)


def test_block_top_k_beyond_the_experts_of_a_block(llama_gm):
    spec = {"expert": [{"kind": "lora", "at": ["@q"]}], "router": {"scope": "@blocks", "select": "topk", "top_k": 3}}
    with pytest.raises(SpecError, match=r"router.top_k = 3 is not valid for this model; block 'model.layers.0' holds "
                                        r"only 1 experts, so top_k must be <= 1"):
        find_sites(llama_gm, load_spec(spec))


def test_gpt2_spec_on_llama_end_to_end():
    with pytest.raises(SiteMatchError, match=r"\['\*\.c_attn', '\*\.mlp\.c_proj'\] matched no linear projection"):
        transform(tiny_model("llama"), lora_at("*.c_attn", "*.mlp.c_proj"))


# --------------------------------------------------------------------------------------------------
# model inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moa():
    torch.set_num_threads(1)
    # a routed spec: saved in moa-fx's own layout (plain LoRA is saved in PEFT's)
    model = transform(tiny_model("llama"), "moe_lora_soft")
    randomize_adapters(model)
    return model.eval()


IDS = tokens(2, 6)
INPUT_CASES = [
    (dict(input_ids=IDS.float()), "input_ids must be an integer tensor of shape (batch, sequence); got dtype "
                                  "torch.float32"),
    (dict(input_ids=IDS[0]), "got dtype torch.int64 and shape (6,)"),
    (dict(input_ids=IDS[:, :0]), "input_ids hold no tokens"),
    (dict(input_ids=IDS, attention_mask=torch.ones(2, 5, dtype=torch.long)),
     "attention_mask has shape (2, 5) but input_ids have (2, 6)"),
    (dict(input_ids=IDS, labels=IDS[:, :4]), "labels have shape (2, 4) but input_ids have (2, 6)"),
    (dict(input_ids=IDS + 128), "but the vocabulary has 128 entries"),
    (dict(input_ids=IDS - 200), "input_ids hold ids in [-1"),
    (dict(input_ids=IDS, token_type_ids=IDS), "unsupported input(s) ['token_type_ids']"),
    (dict(input_ids=IDS, past_key_values=object()), "a object was given as the cache; a transformed model uses "
     "transformers' DynamicCache"),
    (dict(input_ids=IDS, output_attentions=True), "output_attentions=True is not supported"),
    (dict(), "input_ids is required"),
]


@pytest.mark.parametrize("kwargs,fragment", INPUT_CASES, ids=[f"input{i}" for i in range(len(INPUT_CASES))])
def test_bad_lm_input(moa, kwargs, fragment):
    with pytest.raises(InputError) as info:
        moa(**kwargs)
    assert fragment in str(info.value)


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    return transform(TinyMLP().eval(), lora_at("up", "down", r=2), example_inputs=(torch.randn(3, 5, 8),))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_to_plain_module(plain, bad):
    x = torch.randn(3, 5, 8)
    x[1, 2, 3] = bad
    with pytest.raises(InputError, match="input 'x' contains NaN or inf"):
        plain(x)


def test_plain_module_input_count(plain):
    with pytest.raises(InputError, match=r"expected 1 inputs \['x'\], got 2"):
        plain(torch.randn(3, 5, 8), torch.randn(3, 5, 8))
    with pytest.raises(InputError, match=r"unexpected input\(s\) \['y'\]"):
        plain(torch.randn(3, 5, 8), y=torch.randn(3, 5, 8))


# The graph was captured for float32 inputs of shape (batch, seq, 8); other dtypes or feature sizes reach
# aten.linear and fail there with "mat1 and mat2 ..." (a raw RuntimeError), or silently run on another rank.
PLAIN_SHAPE_CASES = [
    (torch.ones(3, 5, 8, dtype=torch.long), "dtype torch.int64"),
    (torch.randn(3, 5, 8, dtype=torch.float64), "dtype torch.float64"),
    (torch.randn(3, 5, 7), "shape (3, 5, 7)"),
    (torch.randn(5, 8), "shape (5, 8)"),
]


@pytest.mark.parametrize("x,fragment", PLAIN_SHAPE_CASES, ids=["long", "float64", "features", "rank"])
def test_plain_module_wrong_dtype_or_shape(plain, x, fragment):
    with pytest.raises(InputError) as info:
        plain(x)
    assert fragment in str(info.value) and "captured" in str(info.value)


# --------------------------------------------------------------------------------------------------
# adapter files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(moa, tmp_path):
    return moa.save_adapters(tmp_path / "adapter")


def rewrite_config(directory: pathlib.Path, change) -> None:
    cfg = json.loads((directory / ADAPTER_CONFIG).read_text())
    change(cfg)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg))


def test_truncated_adapter_file(moa, saved):
    w = saved / ADAPTER_WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(AdapterLoadError, match="is not a readable safetensors file .* truncated or damaged"):
        moa.load_adapters(saved)


@pytest.mark.parametrize("where", [0, 3, 9, 20], ids=["length0", "length3", "json9", "json20"])
def test_flipped_header_bytes(moa, saved, where):
    w = saved / ADAPTER_WEIGHTS
    data = bytearray(w.read_bytes())
    data[where] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(AdapterLoadError, match="is not a readable safetensors file"):
        moa.load_adapters(saved)


def test_nan_tensor_in_adapter_file(moa, saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / ADAPTER_WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(saved / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterLoadError, match=re.escape(f"adapter tensor '{name}' holds NaN or inf")):
        moa.load_adapters(saved)


def test_wrong_shape_in_adapter_file(moa, saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(saved / ADAPTER_WEIGHTS))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(saved / ADAPTER_WEIGHTS))
    with pytest.raises(AdapterLoadError, match=re.escape(f"adapter tensor '{name}' has shape (3, 3) but this model "
                                                         "expects")):
        moa.load_adapters(saved)


def test_adapter_for_another_spec(moa, saved):
    rewrite_config(saved, lambda cfg: cfg["moa_fx"]["spec"]["experts"][0].update(r=16))
    with pytest.raises(AdapterLoadError, match=re.escape("saved for another spec (spec.experts[0].r: saved 16, this "
                                                         "model 8)")):
        moa.load_adapters(saved)


@pytest.mark.parametrize("field,value", [("at", ["re:(.*)*x"]), ("exclude", ["re:(a+)+b"]), ("exclude", "x")])
def test_untrusted_adapter_config_is_refused_before_any_pattern_runs(moa, saved, field, value):
    """A backtracking regex in a directory's config used to hang from_adapters before the checksum was checked."""
    rewrite_config(saved, lambda cfg: cfg["moa_fx"]["spec"]["experts"][0].update({field: value}))
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match=f"expert.lora.{field} = .* is not valid"):
        MoAModel.from_adapters(tiny_model("llama"), saved)
    with pytest.raises(AdapterLoadError, match="holds an invalid spec: expert.lora"):
        moa.load_adapters(saved)
    assert time.perf_counter() - t0 < 5.0


def test_adapter_for_another_base_model(moa, saved):
    rewrite_config(saved, lambda cfg: cfg["moa_fx"].update(base_model_class="Qwen2ForCausalLM"))
    with pytest.raises(AdapterLoadError, match="saved for Qwen2ForCausalLM, not LlamaForCausalLM"):
        moa.load_adapters(saved)


def test_damaged_or_missing_adapter_config(moa, saved):
    (saved / ADAPTER_CONFIG).write_text('{"peft_type": "MOA_FX", ')
    with pytest.raises(AdapterLoadError, match="is not valid JSON .* the file is damaged"):
        moa.load_adapters(saved)
    (saved / ADAPTER_CONFIG).write_text('{"peft_type": "MOA_FX"}')
    with pytest.raises(AdapterLoadError, match="is not a moa-fx adapter config"):
        moa.load_adapters(saved)
    (saved / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterLoadError, match="adapter_config.json' is missing"):
        moa.load_adapters(saved)
    with pytest.raises(AdapterLoadError, match="adapter_config.json' is missing"):
        MoAModel.from_adapters(tiny_model("llama"), saved)


class _Payload:
    """Unpickling this creates the marker file: proof that a loader ran the pickle."""

    def __init__(self, marker: pathlib.Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["pickle", "torch.save"])
def test_pickle_named_safetensors_is_refused_and_never_runs(moa, saved, tmp_path, container):
    marker = tmp_path / "pwned"
    payload = {"lora_A": _Payload(marker)}
    w = saved / ADAPTER_WEIGHTS
    if container == "pickle":
        w.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, w)
    before = {k: v.clone() for k, v in moa.adapter_state_dict().items()}
    with pytest.raises(AdapterLoadError, match="is not a readable safetensors file .* never loads pickles"):
        moa.load_adapters(saved)
    assert not marker.exists(), "the pickle's payload ran"
    assert all(torch.equal(v, before[k]) for k, v in moa.adapter_state_dict().items())
    # the payload is live: a pickle loader does run it
    if container == "pickle":
        pickle.loads(w.read_bytes())
        assert marker.exists()


def test_save_adapters_to_a_path_under_a_file(moa, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MoaFxError, match="cannot create adapter directory .* choose a writable path"):
        moa.save_adapters(blocker / "adapter")


# --------------------------------------------------------------------------------------------------
# training checkpoints and the CLI
# --------------------------------------------------------------------------------------------------

TRAIN = ["--model", "tiny-llama", "--spec", "lora", "--steps", "6", "--batch-size", "4", "--save-every", "2",
         "--eval-every", "100", "--eval-examples", "8", "--no-compile", "--threads", "1"]


def cli_error(capsys, *argv: str) -> str:
    """Run ``moa-fx`` expecting a one-line error and exit status 2; return the line."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run stopped after step 4 of 6 (its checkpoint at step 4), as if killed."""
    out = tmp_path_factory.mktemp("killed")
    torch.set_num_threads(1)
    assert main(["train", "--out", str(out), *TRAIN, "--stop-after", "4"]) == 0
    assert json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())["step"] == 4
    return out


@pytest.fixture
def run_copy(killed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    return out


def tensors_file(out: pathlib.Path) -> pathlib.Path:
    return out / CHECKPOINT_DIR / json.loads((out / CHECKPOINT_DIR / STATE_FILE).read_text())["tensors"]


def test_resume_a_truncated_checkpoint(capsys, run_copy):
    t = tensors_file(run_copy)
    t.write_bytes(t.read_bytes()[:100])
    line = cli_error(capsys, "train", "--out", str(run_copy), *TRAIN, "--resume")
    assert "tensors-00000004.safetensors' is missing or damaged" in line and "cannot be resumed" in line


def test_resume_a_checkpoint_with_flipped_header(capsys, run_copy):
    t = tensors_file(run_copy)
    data = bytearray(t.read_bytes())
    data[12] ^= 0xFF
    t.write_bytes(bytes(data))
    assert "is missing or damaged" in cli_error(capsys, "train", "--out", str(run_copy), *TRAIN, "--resume")


def test_resume_a_checkpoint_whose_tensors_are_gone(capsys, run_copy):
    tensors_file(run_copy).unlink()
    assert "is missing or damaged" in cli_error(capsys, "train", "--out", str(run_copy), *TRAIN, "--resume")


def test_resume_a_damaged_trainer_state(capsys, run_copy):
    state = run_copy / CHECKPOINT_DIR / STATE_FILE
    state.write_text(state.read_text()[:50])
    line = cli_error(capsys, "train", "--out", str(run_copy), *TRAIN, "--resume")
    assert "trainer_state.json' is damaged" in line and "delete the checkpoint directory" in line


def test_resume_beyond_the_run(capsys, run_copy):
    args = [a if a != "6" else "3" for a in TRAIN]  # --steps 3, but the checkpoint is at step 4
    line = cli_error(capsys, "train", "--out", str(run_copy), *args, "--resume")
    assert "the checkpoint is at step 4, not before --steps 3; raise --steps" in line


def test_resume_with_other_settings(capsys, run_copy):
    line = cli_error(capsys, "train", "--out", str(run_copy), *TRAIN, "--resume", "--lr", "0.5")
    assert "--resume: the checkpoint was made with lr = 0.01, this run has 0.5" in line


def test_resume_without_a_checkpoint(capsys, tmp_path):
    line = cli_error(capsys, "train", "--out", str(tmp_path), *TRAIN, "--resume")
    assert "no checkpoint in" in line and "run without --resume" in line


def test_new_run_over_an_old_checkpoint(capsys, run_copy):
    assert "already holds a checkpoint; pass --resume" in cli_error(capsys, "train", "--out", str(run_copy), *TRAIN)


BAD_TRAIN_ARGS = [
    (("--steps", "0"), "--steps = 0 must be >= 1"),
    (("--steps", "-5"), "--steps = -5 must be >= 1"),
    (("--lr", "-1"), "--lr = -1.0 must be > 0"),
    (("--lr", "0"), "--lr = 0.0 must be > 0"),
    (("--lr", "inf"), "--lr = inf must be a finite number"),
    (("--lr", "nan"), "--lr = nan must be a finite number"),
    (("--batch-size", "0"), "--batch-size = 0 must be >= 1"),
    (("--eval-every", "0"), "--eval-every = 0 must be >= 1"),
    (("--save-every", "-1"), "--save-every = -1 must be >= 1"),
    (("--eval-examples", "0"), "--eval-examples = 0 must be >= 1"),
    (("--stop-after", "0"), "--stop-after = 0 must be >= 1"),
    (("--seed", "-1"), "--seed = -1 must be >= 0"),
    (("--threads", "0"), "--threads = 0 must be >= 1"),
    (("--spec", "nope"), "is neither a preset"),
]


@pytest.mark.parametrize("args,fragment", BAD_TRAIN_ARGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGS])
def test_bad_train_arguments(capsys, tmp_path, args, fragment):
    assert fragment in cli_error(capsys, "train", "--out", str(tmp_path), *TRAIN, *args)
    assert not (tmp_path / LOCK_FILE).exists()


def test_second_run_on_one_out_fails_while_the_first_runs(capsys, tmp_path):
    """The first run starts the second from inside its loop: the second must stop, the first finish."""
    second: list[str] = []

    def start_another(info):
        second.append(cli_error(capsys, "train", "--out", str(tmp_path), *TRAIN))

    cfg = TrainConfig(out=str(tmp_path), model="tiny-llama", spec="lora", steps=2, batch_size=2, eval_every=100,
                      save_every=100, eval_examples=2, compile=False)
    result = train(cfg, load_model("tiny-llama")[0], callbacks=Callbacks(on_start=start_another))
    assert result.steps == 2 and (tmp_path / "adapter").is_dir()
    assert f"'{tmp_path}' is in use by another moa-fx train run (pid {os.getpid()}" in second[0]
    assert "choose another --out" in second[0]
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_a_killed_run_does_not_block_the_next(capsys, tmp_path):
    """The lock is an flock: held while a run lives (another process is refused), released by the kernel
    when the run is killed, so the next run (or its --resume) proceeds without cleaning up."""
    import signal
    import subprocess
    import sys

    from moa_fx.train import run_lock

    code = ("import pathlib, sys, time; from moa_fx.train import run_lock\n"
            "with run_lock(pathlib.Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        line = cli_error(capsys, "train", "--out", str(tmp_path), *TRAIN)
        assert f"is in use by another moa-fx train run (pid {child.pid}" in line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the killed run could not clean up ...
    with run_lock(tmp_path):  # ... and its lock is free all the same
        pass
    assert not (tmp_path / LOCK_FILE).exists()


def test_failed_run_releases_its_lock(capsys, tmp_path):
    assert "no checkpoint in" in cli_error(capsys, "train", "--out", str(tmp_path), *TRAIN, "--resume")
    assert not (tmp_path / LOCK_FILE).exists()


# batches as a data object hands them to the loop: (change to a good batch, message fragment)
def _batch(**change):
    ids = torch.randint(4, 100, (2, 6))
    good = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    return Batch(**{**good, **change})


BAD_BATCHES = [
    (_batch(labels=torch.full((2, 6), 128)), "batch labels hold 128; labels must be token ids in [0, 128) or -100"),
    (_batch(labels=torch.full((2, 6), -5)), "batch labels hold -5"),
    (_batch(labels=torch.full((2, 6), -100)), "every label of the batch is -100: nothing to learn from"),
    (_batch(input_ids=torch.full((2, 6), 300)), "input_ids hold ids in [300, 300] but the model's vocabulary has 128"),
    (_batch(input_ids=torch.full((2, 6), -1)), "input_ids hold ids in [-1, -1]"),
    (_batch(input_ids=torch.ones(2, 6)), "batch input_ids must be an integer tensor of shape (batch, sequence); got "
                                         "dtype torch.float32"),
    (_batch(attention_mask=torch.ones(2, 5, dtype=torch.long)), "batch attention_mask has shape (2, 5) but input_ids "
                                                                "have (2, 6)"),
    (_batch(attention_mask=torch.full((2, 6), 2)), "attention_mask must hold only 0 (padding) and 1"),
    (_batch(labels=torch.ones(2, 6, 1, dtype=torch.long)), "batch labels must be an integer tensor"),
    (_batch(input_ids=torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1, dtype=torch.long),
            labels=torch.ones(2, 1, dtype=torch.long)), "sequences of 1 token(s); a language-model step needs at least 2"),
    (_batch(input_ids=torch.ones(2, 300, dtype=torch.long), attention_mask=torch.ones(2, 300, dtype=torch.long),
            labels=torch.ones(2, 300, dtype=torch.long)), "sequences of 300 tokens but the model has 256 positions"),
    ({"input_ids": torch.ones(2, 6)}, "the data gave a dict, not a moa_fx.data.Batch"),
]


@pytest.mark.parametrize("batch,fragment", BAD_BATCHES, ids=[f"batch{i}" for i in range(len(BAD_BATCHES))])
def test_bad_batch_from_the_data(batch, fragment):
    with pytest.raises(InputError) as info:
        check_batch(batch, vocab_size=128, max_positions=256)
    assert fragment in str(info.value)


def test_bad_batch_stops_the_loop_before_the_model(tmp_path):
    class ShortBatches:
        """A user's data object whose batches are smaller than asked for."""

        def describe(self):
            return "short batches"

        def batch(self, batch_size, gen):
            return _batch()

        def eval_batches(self, batch_size):
            return [_batch()]

    cfg = TrainConfig(out=str(tmp_path), model="tiny-llama", spec="lora", steps=2, batch_size=4, compile=False)
    with pytest.raises(InputError, match="the data gave a batch of 2 sequences; --batch-size asks for 4"):
        train(cfg, tiny_model("llama"), ShortBatches())
    assert not (tmp_path / LOCK_FILE).exists()


def test_jsonl_max_length_is_checked(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    with pytest.raises(InputError, match="JsonlData max_length = 1 must be an integer >= 2"):
        JsonlData(tmp_path / "d.jsonl", tokenizer=None, max_length=1)


def test_output_directory_under_a_regular_file(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    line = cli_error(capsys, "train", "--out", str(blocker), *TRAIN)
    assert f"cannot create output directory '{blocker}'" in line


def test_read_only_output_directory(capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod does not stop root from writing (the regular-file case covers this)")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        line = cli_error(capsys, "train", "--out", str(out), *TRAIN)
    finally:
        out.chmod(0o700)
    assert "cannot create output directory" in line


def test_inputs_longer_than_learned_positions_are_refused():
    """GPT-2's learned position table has n_positions rows: longer inputs would reach torch's index error."""
    from moa_fx import transform
    from tiny import tiny_model

    moa = transform(tiny_model("gpt2"), "lora")
    with pytest.raises(InputError, match="257 positions but GPT2LMHeadModel has learned position embeddings for 256"):
        moa(input_ids=torch.zeros(1, 257, dtype=torch.long))
    llama = transform(tiny_model("llama"), "lora")  # rotary positions: longer than the config's maximum works
    assert llama(input_ids=torch.zeros(1, 300, dtype=torch.long)).logits.shape[1] == 300

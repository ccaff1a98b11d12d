"""Decoder blocks as compile regions: one shared submodule per block structure, the same ops eagerly,
one compiled region for the repeated blocks under torch.compile."""

from __future__ import annotations

import pytest
import torch

from moa_fx import transform
from tiny import randomize_adapters, slow_except, tiny_model, tokens

PRESETS = ["lora", "adamole", "sparse_moa", "soft_moa", "hydralora", "mole_topk"]


def _block_modules(gm) -> list[str]:
    return [name for name, _ in gm.named_children() if name.startswith("moa_fx_block_")]


@pytest.mark.parametrize("preset", slow_except(PRESETS, ["adamole", "soft_moa"]))
def test_blocks_share_one_submodule_and_compute_the_same(preset):
    """Every preset's four blocks become one submodule (thresholds and prompt experts are inputs, a
    site's dropout seed is computed outside), and forward and gradients equal the flat graph's bit for bit."""
    base = tiny_model("llama", init="unit", num_hidden_layers=4)
    flat = transform(base, preset, compile_regions=False)
    moa = transform(base, preset)
    randomize_adapters(flat, std=0.5)
    moa.load_state_dict(flat.state_dict(), strict=False)
    moa.eval()
    flat.eval()
    assert _block_modules(moa.derived(regions=True).gm) == ["moa_fx_block_0"]
    assert not _block_modules(flat.derived(regions=True).gm)  # compile_regions=False: the flat graph
    ids = tokens(2, 12, seed=3)
    outs = []
    for m in (moa, flat):
        out = m(input_ids=ids, labels=ids)
        params = [p for p in m.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out.loss, params, allow_unused=True, materialize_grads=True)
        outs.append((out.logits, out.loss, grads))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(outs[0][2], outs[1][2]):
        assert torch.equal(a, b)


def test_a_model_with_one_block_keeps_its_flat_graph():
    moa = transform(tiny_model("llama", num_hidden_layers=1), "sparse_moa")
    assert moa.derived(regions=True) is moa.derived()
    assert not any("regions" in key for key, _, _ in moa.derivations)


@pytest.mark.parametrize("case", slow_except(["adamole", "parallel_adapter", "prompt_tuning", "lora.unfused"],
                                             ["parallel_adapter"]))
def test_the_first_blocks_input_is_anchored_to_a_trainable_tensor(case):
    """The first block's hidden input goes through ``_attach_grad`` with the block's parameters and
    modules as anchors, and one of them holds a trainable tensor, also where every trainable parameter
    sits in a module the block calls (parallel adapters, prompts, unfused LoRA): so under compile all
    blocks can share one region. With the adapters frozen there is none, and the input stays as it is."""
    import torch.fx as fx

    from moa_fx.derive import _attach_grad, _trainable_anchor

    preset, _, unfused = case.partition(".")
    options = {"lower": "off", "fuse": False} if unfused else {}
    moa = transform(tiny_model("llama", num_hidden_layers=3), preset, **options)
    gm = moa.derived(regions=True).gm
    (node,) = [n for n in gm.graph.nodes if n.target is _attach_grad]
    anchors = tuple(fx.Interpreter(gm).fetch_attr(a.target) for a in node.args[1:])
    found = _trainable_anchor(anchors)
    assert found is not None and found.requires_grad
    assert any(found is p for p in moa.parameters())
    for p in moa.parameters():
        p.requires_grad_(False)
    assert _trainable_anchor(anchors) is None


@pytest.mark.parametrize("preset", slow_except(["adamole", "sparse_moa", "parallel_adapter"], ["adamole"]))
def test_compiled_blocks_trace_one_region_for_the_repeated_blocks(preset):
    """torch.compile (fullgraph) calls all four blocks through one traced region (the first block's
    input, the frozen embedding's output, is given grad under compile so that it matches the others);
    the compiled model matches eager in eval, and trains in train mode (AdaMoLE's expert dropout
    included) with the same gradients as eager."""
    import torch._dynamo
    from torch._dynamo.backends.common import AotAutograd
    from torch._dynamo.backends.debugging import boxed_nop

    torch._dynamo.reset()
    moa = transform(tiny_model("llama", init="unit", num_hidden_layers=4), preset)
    randomize_adapters(moa, std=0.5)
    graphs = []

    class Recording(AotAutograd):  # aot_eager that keeps Dynamo's graphs (an AOTAutograd backend: regions)
        def __call__(self, gm, example_inputs, **kwargs):
            graphs.append(gm)
            return super().__call__(gm, example_inputs, **kwargs)

    recording = Recording(fw_compiler=boxed_nop, bw_compiler=boxed_nop, keep_inference_input_mutations=True)
    compiled = torch.compile(moa, backend=recording, fullgraph=True, dynamic=False)
    ids = tokens(2, 12, seed=1)
    moa.eval()
    torch.testing.assert_close(compiled(input_ids=ids, labels=ids).loss, moa(input_ids=ids, labels=ids).loss,
                               rtol=1e-5, atol=1e-6)
    calls = [n.args[0].target for g in graphs for n in g.graph.nodes if "invoke_subgraph" in str(n.target)]
    assert len(calls) == 4 and len(set(calls)) == 1, calls  # every block: one region
    params = [p for p in moa.parameters() if p.requires_grad]
    eager = torch.autograd.grad(moa(input_ids=ids, labels=ids).loss, params, allow_unused=True)
    got = torch.autograd.grad(compiled(input_ids=ids, labels=ids).loss, params, allow_unused=True)
    assert [g is None for g in got] == [g is None for g in eager]  # the same parameters get gradients
    for a, b in zip(got, eager):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    moa.train()
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    reached = [p.grad is not None for p in params]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    moa.zero_grad(set_to_none=True)
    moa(input_ids=ids, labels=ids).loss.backward()
    assert reached == [p.grad is not None for p in params]  # the same parameters as eager get gradients


def _compiled_step_schema_derivations(monkeypatch, memo: bool):
    """Train-mode AdaMoLE, four blocks in one region, compiled through AOTAutograd (eager kernels): how
    many times torch derived a region's graph for its schema, and the gradients."""
    import torch._dynamo
    import torch._higher_order_ops.utils as hop_utils
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._higher_order_ops.invoke_subgraph import invoke_subgraph

    from moa_fx import region_schema

    derivations = []
    materialize = hop_utils.materialize_as_graph
    monkeypatch.setattr(hop_utils, "materialize_as_graph", lambda *a, **k: derivations.append(1) or materialize(*a, **k))
    if not memo:
        monkeypatch.setattr(region_schema, "install", lambda: False)
        if "gen_schema" in vars(invoke_subgraph):
            monkeypatch.delattr(invoke_subgraph, "gen_schema")
    torch._dynamo.reset()
    moa = transform(tiny_model("llama", init="unit", num_hidden_layers=4), "adamole")
    randomize_adapters(moa, std=0.5)
    moa.train()
    compiled = torch.compile(moa, backend=aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop),
                             fullgraph=True, dynamic=False)
    ids = tokens(2, 12, seed=1)
    params = [p for p in moa.parameters() if p.requires_grad]
    torch.manual_seed(0)
    grads = torch.autograd.grad(compiled(input_ids=ids, labels=ids).loss, params, allow_unused=True)
    return len(derivations), grads


def test_region_schemas_are_derived_once_not_at_every_block(monkeypatch):
    """torch derives a region's schema (a re-trace of its whole body) at every region call of a
    training compile, to refuse input mutation; moa_fx.region_schema memoizes it per graph and input
    metadata, so four blocks cost as many derivations as one. The compiled gradients are the same."""
    with monkeypatch.context() as plain:
        unmemoized, plain_grads = _compiled_step_schema_derivations(plain, memo=False)
    memoized, grads = _compiled_step_schema_derivations(monkeypatch, memo=True)
    # torch 2.13: 10 (4 calls x 2 AOTAutograd passes, + 2 for functionalization) against 3
    assert memoized <= unmemoized - 6, (memoized, unmemoized)
    for a, b in zip(grads, plain_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_region_schema_memo_keys_on_graph_and_concrete_metadata():
    """The memo answers what torch answered for the same region graph and operand metadata, computes
    again for other metadata (shape, dtype, requires_grad, an int's value) or another graph, and does
    not memoize symbolic sizes."""
    import torch.fx as fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moa_fx.region_schema import memoized

    calls = []
    memo = memoized(lambda gm, ident, *ops: calls.append((gm, ident, ops)) or len(calls))
    gm = fx.symbolic_trace(torch.nn.Linear(3, 3))
    other = fx.symbolic_trace(torch.nn.Linear(3, 3))
    x = torch.randn(2, 3)
    assert memo(gm, "r", x, 1) == memo(gm, "r", torch.randn(2, 3), 1) == 1
    assert memo(gm, "r", x.double(), 1) == 2
    assert memo(gm, "r", torch.randn(4, 3), 1) == 3
    assert memo(gm, "r", x.requires_grad_(), 1) == 4
    assert memo(gm, "r", x, 2) == 5
    assert memo(other, "r", x, 2) == 6
    assert memo(gm, "s", x, 2) == 7
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        sym = mode.from_tensor(torch.randn(5, 3), symbolic_context=None)
    dynamic = mode.shape_env.create_unbacked_symint()
    assert memo(gm, "r", sym, dynamic) == 8 and memo(gm, "r", sym, dynamic) == 9  # a symbol: computed each time
    assert len(calls) == 9
    # the region's graph edited in place (a node's target changed), or replaced by another graph object
    # of the same nodes: computed again, never the old answer
    node = next(n for n in gm.graph.nodes if n.op == "call_function" or n.op == "call_module")
    assert memo(gm, "r", x, 2) == 5  # as before the edit
    node.target = "weight" if node.op == "call_module" else torch.ops.aten.mul.Tensor
    assert memo(gm, "r", x, 2) == 10
    copy = fx.Graph()
    copy.graph_copy(gm.graph, {})
    gm.graph = copy
    assert memo(gm, "r", x, 2) == 11 and len(calls) == 11


@pytest.mark.parametrize("backend, dynamic", [("eager", False), ("aot_eager", True)])
def test_compiles_that_cannot_call_regions_inline_the_blocks_and_train(backend, dynamic):
    """Where a region call would fail, the blocks are inlined and the compiled model trains: a backend
    without AOTAutograd (torch cannot run a region's backward there: "fake_mode should be enabled for
    HOPs"), and ``dynamic=True`` (the dropout rate becomes a float symbol, which a region refuses).
    HydraLoRA in train mode: dropout modules inside the blocks, and three blocks sharing one region."""
    import torch._dynamo

    torch._dynamo.reset()
    moa = transform(tiny_model("llama", num_hidden_layers=3), "hydralora")
    randomize_adapters(moa, std=0.1)
    moa.train()
    compiled = torch.compile(moa, backend=backend, fullgraph=True, dynamic=dynamic)
    params = [p for p in moa.parameters() if p.requires_grad]
    for seed, (batch, seq) in enumerate([(2, 7), (3, 5)]):
        ids = tokens(batch, seq, seed=seed)
        loss = compiled(input_ids=ids, labels=ids).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        assert torch.isfinite(loss) and any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("preset", slow_except(PRESETS, ["hydralora", "sparse_moa"]))
def test_compiled_graphs_hold_no_tensor_constants(preset):
    """Forward and backward graphs of a compiled training step hold no lifted tensor constants (a
    ``torch.tensor(list)`` or list index traced into the graph: the fused op's column tables, a site's
    router columns). Inductor passes such a constant wrongly into a compile region's backward, so
    ``torch.compile(model)`` training failed with "non-tensor input" for HydraLoRA and Sparse MoA."""
    import torch._dynamo
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    constants = []

    def keep(gm, example_inputs):
        constants.extend(n.target for n in gm.graph.nodes if n.op == "get_attr" and "_tensor_constant" in n.target)
        return make_boxed_func(gm.forward)

    moa = transform(tiny_model("llama"), preset, compile_regions=False)
    moa.train()
    compiled = torch.compile(moa, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    ids = tokens(2, 7, seed=0)
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert not constants, constants


@pytest.mark.slow
def test_trainer_with_torch_compile_trains_through_the_compile_regions(tmp_path):
    """The Hugging Face Trainer with ``torch_compile=True`` (Inductor): three HydraLoRA blocks share
    one compile region, and training runs (it failed in the region's backward before)."""
    from test_ecosystem import trainer

    import torch._dynamo

    torch._dynamo.reset()
    moa = transform(tiny_model("llama", init=0.2, num_hidden_layers=3), "hydralora")
    before = {k: v.clone() for k, v in moa.adapter_state_dict().items()}
    result = trainer(moa, tmp_path, torch_compile=True, max_steps=3, save_steps=100).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(v, before[k]) for k, v in moa.adapter_state_dict().items())

import time



def test_tree_collapses_repeated_blocks(cli):
    code, out, _ = cli("dump", "tiny-llama")
    assert code == 0
    assert "LlamaForCausalLM" in out
    assert "{0..1} ×2" in out
    assert "q_proj  1 ops  (linear 1)" in out
    assert "\x1b[" not in out  # no colour codes
    assert max(len(line) for line in out.splitlines()) <= 120


def test_table_after_spec_filters_and_provenance(cli):
    code, out, _ = cli("dump", "tiny-llama", "--spec", "sparse_moa", "--lower", "off", "--no-fuse", "--view", "table",
                       "--module", "model.layers.0.self_attn.q_proj")
    assert code == 0
    assert "insert_experts" in out and "insert_routers" in out
    assert "model.layers.1" not in out
    code, out, _ = cli("dump", "tiny-gpt2", "--view", "table", "--op", "addmm")
    assert code == 0 and out.strip().endswith("8 nodes")


def test_json_ids_are_stable_and_inputs_by_id(cli_json):
    _, a = cli_json("dump", "tiny-llama", "--spec", "adamole", "--view", "json")
    _, b = cli_json("dump", "tiny-llama", "--spec", "adamole", "--view", "json")
    assert [n["id"] for n in a["nodes"]] == [n["id"] for n in b["nodes"]]
    ids = {n["id"] for n in a["nodes"]}
    assert "model.layers.0.self_attn.q_proj::aten.linear#0" in ids
    assert all(i in ids for n in a["nodes"] for i in n["inputs"])
    made = [n for n in a["nodes"] if n["provenance"]]
    assert made and all({"pass", "site"} <= set(n["provenance"][0]) for n in made)
    # AdaMoLE's experts (with their input dropout) are lowered to moa_fx::dropout_lora, and its routers,
    # thresholds and experts at q, k, v read one input: fuse_shared_input gives them one GEMM
    assert {n["provenance"][0]["pass"] for n in made} == {"insert_routers", "lower_sparse_dispatch", "fuse_shared_input"}


def test_after_pass_stops_the_pipeline(cli_json):
    _, data = cli_json("dump", "tiny-llama", "--spec", "adamole", "--after", "insert_experts", "--view", "json")
    passes = {n["provenance"][0]["pass"] for n in data["nodes"] if n["provenance"]}
    assert passes == {"insert_experts"}
    assert data["after"] == "insert_experts"


def test_code_and_dot_views(cli, tmp_path):
    code, out, _ = cli("dump", "tiny-llama", "--view", "code")
    assert code == 0 and "def forward(self, input_ids, attention_mask)" in out
    code, out, _ = cli("dump", "tiny-llama", "--spec", "lora", "--view", "dot", "--module", "model.layers.0.*")
    assert code == 0 and out.startswith("digraph moa_fx {") and "palegreen" in out and "->" in out


def test_svg_without_graphviz_is_a_clear_error(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    code, _, err = cli("dump", "tiny-llama", "--view", "dot", "--output", str(tmp_path / "g.svg"))
    assert code == 2
    assert err.startswith("error: cannot write") and "Graphviz" in err


def test_llama3_8b_config_on_meta_is_fast(cli):
    # the budget (15 s on a 2-core machine), in this process's CPU time: wall time also
    # counts whatever else shares the machine
    t = time.process_time()
    code, out, _ = cli("dump", "examples/configs/llama3-8b.json")
    took = time.process_time() - t
    assert code == 0
    assert "8,030.3M parameters, meta device" in out
    assert "{0..31} ×32" in out
    assert took < 15, f"dump of the 8B config took {took:.1f}s"

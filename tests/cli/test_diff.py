import json


def test_spec_diff_groups_by_pass_and_site(cli):
    code, out, _ = cli("diff", "tiny-llama", "--spec", "sparse_moa", "--lower", "off", "--no-fuse")
    assert code == 0
    assert "+ insert_experts  12 nodes at 12 sites" in out  # 10 LoRA sites and 2 parallel adapters
    assert "+ model.layers.{0..1}.mlp ×2: 1 nodes (pa)" in out
    assert "summary: +36" in out


def test_lowered_diff_shows_the_fused_ops(cli):
    code, out, _ = cli("diff", "tiny-llama", "--spec", "sparse_moa")
    assert code == 0
    # the per-expert LoRA nodes were replaced by the fused op: the parallel adapters remain
    assert "+ insert_experts  2 nodes at 2 sites" in out
    assert "+ lower_sparse_dispatch" in out and "lowered_lora_site" in out


def test_fused_diff_shows_one_gemm_per_shared_input(cli):
    code, out, _ = cli("diff", "tiny-llama", "--spec", "sparse_moa")
    assert code == 0
    assert "+ fuse_shared_input" in out and "shared_input_projection" in out and "expand_lora_site" in out


def test_exit_code_and_json(cli, cli_json, tmp_path):
    code, diff = cli_json("diff", "tiny-llama", "--spec", "lora", "--json", "--exit-code")
    assert code == 1 and not diff["equal"]
    assert diff["summary"]["added"] == len(diff["added"]) > 0
    assert all(n["provenance"] for n in diff["added"])
    rewired = [c for c in diff["changed"] if "inputs" in c["fields"]]
    assert rewired  # users of each projection now read the combine


def test_two_dumps(cli, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("dump", "tiny-llama", "--spec", "lora", "--lower", "off", "--no-fuse", "--view", "json",
               "-o", str(a))[0] == 0
    assert cli("dump", "tiny-llama", "--spec", "lora", "--lower", "off", "--no-fuse", "--view", "json",
               "-o", str(b))[0] == 0
    code, out, _ = cli("diff", str(a), str(b), "--exit-code")
    assert code == 0 and "graphs are equal" in out
    data = json.loads(b.read_text())
    data["nodes"] = [n for n in data["nodes"] if "lora" not in n["op"] or "layers.1." not in n["op"]]
    b.write_text(json.dumps(data))
    code, out, _ = cli("diff", str(a), str(b), "--exit-code")
    assert code == 1 and "removed 5 nodes" in out


def test_two_specs(cli_json):
    code, diff = cli_json("diff", "tiny-llama", "--spec", "lora", "--spec", "lora", "--json", "--exit-code")
    assert code == 0 and diff["equal"]
    code, diff = cli_json("diff", "tiny-llama", "--spec", "lora", "--spec", "adamole", "--json")
    assert code == 0 and diff["summary"]["removed"] > 0  # lora's down_proj experts are not in adamole

"""load_format="tp_loader" in vLLM at TP 2: the same greedy tokens and logprobs as vLLM's own loader, each rank
reading about 1/TP of the sharded bytes. Every engine runs in a process of its own (tests/vllm_plugin/engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from checkpoints import ARCHITECTURES, COMMON, write_checkpoint  # noqa: E402

ENGINE = Path(__file__).with_name("engine.py")
TP = 2
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


_RUNS: dict[tuple[str, str], dict] = {}


def engine_once(model: Path, load_format: str, out_dir: Path) -> dict:
    """:func:`run_engine`, once per model and format in this module (several tests compare with one run)."""
    key = (str(model), load_format)
    if key not in _RUNS:
        _RUNS[key] = run_engine(model, load_format, out_dir)
    return _RUNS[key]


def run_engine(model: Path, load_format: str, out_dir: Path, *, reload: tuple[Path, ...] = (), name: str = "") -> dict:
    """One engine process: its JSON (runs of tokens and logprobs, or an error) and, for tp_loader, its report."""
    tag = name or f"{model.name}-{load_format}"
    out, log, report = out_dir / f"{tag}.json", out_dir / f"{tag}.log", out_dir / f"{tag}-report.json"
    command = [sys.executable, str(ENGINE), str(model), str(out), "--load-format", load_format, "--tp", str(TP)]
    if load_format == "tp_loader":
        command += ["--report", str(report)]
    if reload:
        command += ["--reload", *map(str, reload)]
    with open(log, "w") as f:
        subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=600, check=False)
    result = json.loads(out.read_text()) if out.exists() else {"error": "no output"}
    result["log"] = log.read_text()
    if report.exists():
        result["report"] = json.loads(report.read_text())
    return result


def assert_same_generation(actual: list[dict], expected: list[dict]) -> None:
    assert [r["tokens"] for r in actual] == [r["tokens"] for r in expected]
    for got, want in zip(actual, expected):
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"])) <= LOGPROB_TOLERANCE


def kv_duplicated_bytes(config: dict) -> int:
    """Bytes of k/v rows that more than one rank reads: with fewer KV heads than ranks, ranks share a head."""
    kv_heads = config["num_key_value_heads"]
    if kv_heads >= TP:
        return 0
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_layer = 2 * head_dim * (config["hidden_size"] + (1 if config.get("model_type") == "qwen2" else 0)) * 4
    return config["num_hidden_layers"] * per_layer * (TP - kv_heads)


def assert_reads_own_slices(report: dict, config: dict) -> None:
    """Each rank reads every replicated tensor and about 1/TP of the sharded ones; together exactly the sharded
    bytes once, plus the KV heads ranks share."""
    assert report["world_size"] == TP
    ranks = report["ranks"]
    assert all(r["bytes_replicated"] == report["replicated_bytes"] for r in ranks)
    assert all(r["bytes_read"] == r["bytes_sharded"] + r["bytes_replicated"] for r in ranks)
    assert sum(r["bytes_sharded"] for r in ranks) == report["sharded_bytes"] + kv_duplicated_bytes(config)
    assert all(r["bytes_sharded"] <= 0.55 * report["sharded_bytes"] for r in ranks)
    assert report["sharded_bytes"] > 10 * report["replicated_bytes"]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_tp_loader_generates_what_vllm_auto_generates(arch: str, root: Path) -> None:
    model = write_checkpoint(arch, root)
    assert len(list(model.glob("*.safetensors"))) > 1
    config = json.loads((model / "config.json").read_text())
    auto = engine_once(model, "auto", root)
    ours = engine_once(model, "tp_loader", root)
    assert "error" not in auto, auto["log"][-3000:]
    assert "error" not in ours, ours["log"][-3000:]
    assert_same_generation(ours["runs"][0], auto["runs"][0])
    assert_reads_own_slices(ours["report"], config)
    assert "tp_loader: loaded" in ours["log"]


def worker_errors(log: str) -> dict[str, str]:
    """Each worker's last tp_loader error line, by worker (``Worker_TP0`` ...)."""
    found = {}
    for line in log.splitlines():
        if "tp_loader.errors." in line and "Worker_TP" in line:
            worker = line[line.index("Worker_TP") :].split()[0]
            found[worker] = line[line.index("tp_loader.errors.") :]
    return found


def test_the_comparison_can_fail(root: Path) -> None:
    """vLLM's "dummy" weights generate other tokens: the equality above is not vacuous."""
    model = write_checkpoint("llama", root)
    dummy = run_engine(model, "dummy", root)
    auto = engine_once(model, "auto", root)
    assert "error" not in dummy, dummy["log"][-3000:]
    assert [r["tokens"] for r in dummy["runs"][0]] != [r["tokens"] for r in auto["runs"][0]]


def test_reload_weights_in_place_equals_a_fresh_load(root: Path) -> None:
    """llm.collective_rpc("reload_weights", kwargs={"weights_path": ...}) goes through the same loader: after a
    reload from another checkpoint the engine generates what a fresh load of it does, and back again."""
    first, second = write_checkpoint("llama", root), write_checkpoint("llama", root, seed=1)
    ours = run_engine(first, "tp_loader", root, reload=(second, first), name="reload")
    assert "error" not in ours, ours["log"][-3000:]
    fresh_first, fresh_second = engine_once(first, "auto", root), engine_once(second, "auto", root)
    assert_same_generation(ours["runs"][0], fresh_first["runs"][0])
    assert_same_generation(ours["runs"][1], fresh_second["runs"][0])
    assert ours["runs"][2] == ours["runs"][0]
    assert ours["log"].count("tp_loader: reloaded") == 2
    report = ours["report"]  # the last reload's
    assert report["reload"] is True and report["model"] == str(first)
    assert report["extra"] == {
        "restored_layers": 8,
        "processed_layers": 10,
    }  # 2 layers x 4 linears emptied; + embedding, LM head
    assert_reads_own_slices(report, json.loads((first / "config.json").read_text()))


def test_an_architecture_without_a_mapping_is_refused_on_every_rank(root: Path) -> None:
    import transformers

    config = transformers.Phi3Config(**{**COMMON, "vocab_size": 1000, "num_key_value_heads": 2, "pad_token_id": 0})
    model = root / "phi3"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model)
    result = run_engine(model, "tp_loader", root)
    assert "error" in result
    errors = worker_errors(result["log"])
    assert set(errors) == {"Worker_TP0", "Worker_TP1"}
    assert len(set(errors.values())) == 1
    message = errors["Worker_TP0"]
    assert message.startswith("tp_loader.errors.PlanError: vLLM model class Phi3ForCausalLM has no tp_loader mapping")
    assert "load_format='auto'" in message


def edit_checkpoint(model: Path, key: str, tensor: torch.Tensor | None, *, beside: str) -> None:
    """Sets ``key`` to ``tensor`` (None: removes it) in the file that holds ``beside``, index included."""
    from safetensors.torch import load_file, save_file

    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = index["weight_map"][beside]
    tensors = load_file(model / name)
    if tensor is None:
        del tensors[key], index["weight_map"][key]
    else:
        tensors[key], index["weight_map"][key] = tensor, name
    save_file(tensors, model / name, metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


KEY = "model.layers.1.mlp.down_proj.weight"
BROKEN = {
    "missing": (KEY, None, f"StrictLoadError: 1 vLLM parameters get no checkpoint tensor: {KEY} [rank=0"),
    "unexpected": (
        "model.layers.1.mlp.extra_proj.weight",
        torch.ones(4, 4),
        "StrictLoadError: 1 checkpoint keys map to no parameter of the vLLM model: model.layers.1.mlp.extra_proj.weight"
        " [",
    ),
    "shape": (
        KEY,
        torch.ones(128, 95),
        "ShardingError: checkpoint tensor is [128, 95], but vLLM's parameter model.layers.1.mlp.down_proj.weight needs",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_checkpoint_that_does_not_fit_the_model_is_one_error_on_every_rank(case: str, root: Path) -> None:
    """A parameter nothing fills, a key that fills nothing, a shape that does not fit: the same error on both
    ranks, naming key and parameter, and no fallback to vLLM's loader."""
    model = write_checkpoint("llama", root, seed=2)
    model = model.rename(model.with_name(f"llama-{case}"))
    key, tensor, expected = BROKEN[case]
    edit_checkpoint(model, key, tensor, beside=KEY)
    result = run_engine(model, "tp_loader", root)
    assert "error" in result and "runs" not in result
    errors = worker_errors(result["log"])
    assert set(errors) == {"Worker_TP0", "Worker_TP1"} and len(set(errors.values())) == 1
    assert errors["Worker_TP0"].startswith(f"tp_loader.errors.{expected}"), errors["Worker_TP0"]


EMPTY_DIGEST = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_expert_parallel_experts_hold_what_vllm_auto_loads_on_each_rank(root: Path) -> None:
    """Qwen3-MoE at TP 2 with enable_expert_parallel: each rank's local experts (w13 and w2 of its half of the
    experts, whole) are bitwise those vLLM's own loader gives it. vLLM 0.32's CPU build crashes in the first forward
    under expert parallelism (a worker dies with SIGSEGV, load_format='auto' too), so the weights are compared, by
    digests taken in each worker after loading (linear weights packed into CPU kernels hash as empty in both)."""
    model = write_checkpoint("qwen3_moe", root, seed=3)
    runs = {}
    for load_format in ("auto", "tp_loader", "dummy"):
        out, log = root / f"ep-{load_format}.json", root / f"ep-{load_format}.log"
        command = [sys.executable, str(ENGINE), str(model), str(out), "--load-format", load_format, "--ep", "--digests"]
        with open(log, "w") as f:
            subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=600, check=False)
        assert out.exists(), log.read_text()[-3000:]
        runs[load_format] = json.loads(out.read_text())["digests"]
    auto, ours, dummy = runs["auto"], runs["tp_loader"], runs["dummy"]
    assert ours == auto
    experts = [name for name in auto[0] if ".experts." in name]
    assert len(experts) == 4  # w13 and w2 of two layers
    for name in experts:
        assert auto[0][name] != auto[1][name]  # each rank holds other experts
        assert EMPTY_DIGEST not in (auto[0][name], auto[1][name])
        assert dummy[0][name] != auto[0][name] and dummy[1][name] != auto[1][name]

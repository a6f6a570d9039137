"""load_format="tp_loader" in vLLM at TP 2: the same greedy tokens and logprobs as vLLM's own loader, each rank
reading about 1/TP of the sharded bytes. Every engine runs in a process of its own (tests/vllm_plugin/engine.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from checkpoints import ARCHITECTURES, write_checkpoint  # noqa: E402

ENGINE = Path(__file__).with_name("engine.py")
TP = 2
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm")


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
    auto = run_engine(model, "auto", root)
    ours = run_engine(model, "tp_loader", root)
    assert "error" not in auto, auto["log"][-3000:]
    assert "error" not in ours, ours["log"][-3000:]
    assert_same_generation(ours["runs"][0], auto["runs"][0])
    assert_reads_own_slices(ours["report"], config)
    assert "tp_loader: loaded" in ours["log"]

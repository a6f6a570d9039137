"""Configs that would make planning build huge strings or name billions of keys are refused at once,
with a short message, on every rank; planning and reporting stay near-linear in the number of keys."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest
import torch

import tp_loader
from tp_loader.demo import write_checkpoint
from tp_loader.testing import run_ranks, same_error

MIXTRAL = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 8,
    "intermediate_size": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 10,
    "num_local_experts": 2,
    "num_experts_per_tok": 2,
}


def _load_and_measure(rank: int, world_size: int, root: Path) -> None:
    start = time.monotonic()
    try:
        tp_loader.load(root)
    finally:  # an AssertionError here replaces the load's error, and the test sees it
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        assert time.monotonic() - start < 10, "refused within seconds"
        assert peak_mib < 1024, f"peak RSS {peak_mib} MiB"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"num_hidden_layers": 100_000, "num_local_experts": 100_000},
            "config gives 100000 layers (num_hidden_layers) and 100000 experts (num_local_experts): plan 'mixtral' "
            "would name 30001100006 keys, more than 10004 for a checkpoint of 1 tensors",
        ),
        (
            {"head_dim": "x", "num_attention_heads": 10**9},
            "config values head_dim='x', num_attention_heads=1000000000 give no valid shape of "
            "model.layers.{layer}.self_attn.q_proj.weight (num_attention_heads * head_dim: arithmetic needs whole "
            "numbers, got 'x')",
        ),
        (
            {"head_dim": "y" * 10_000},
            "config values head_dim='yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy… "
            "(10002 characters)",
        ),
    ],
    ids=["layers-times-experts", "string-times-heads", "long-string-value"],
)
def test_config_bombs_are_refused_fast_with_a_short_message_on_every_rank(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    root = write_checkpoint(tmp_path, {**MIXTRAL, **overrides}, {"model.embed_tokens.weight": torch.zeros(10, 8)})
    start = time.monotonic()
    error = same_error(run_ranks(2, _load_and_measure, root, timeout=60))
    assert time.monotonic() - start < 20
    assert error.type == "CheckpointError"
    assert error.message.startswith(message)
    assert len(error.message) < 2048
    assert error.wire["file"] == str(root / "config.json")


def test_planning_and_reporting_100k_keys_takes_seconds(tmp_path: Path) -> None:
    """Unexpected keys, the warning and the table over 10^5 tensors: near-linear work, not quadratic."""
    from safetensors.torch import save_file

    tensors = {f"model.extra.{i}": torch.zeros(0) for i in range(100_000)}
    tensors["model.embed_tokens.weight"] = torch.zeros(10, 8)
    tmp_path.joinpath("config.json").write_text(
        '{"model_type": "llama", "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 0, '
        '"num_attention_heads": 2, "vocab_size": 10}'
    )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    start = time.monotonic()
    summary = tp_loader.plan_load(tmp_path, world_size=2)
    table = summary.format_table(full=True)
    planned = time.monotonic() - start
    assert len(summary.unexpected_keys) == 100_000
    assert table.count("(no plan rule)") == 100_000
    assert planned < 20, f"{planned:.1f} s"

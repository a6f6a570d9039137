from __future__ import annotations

import json
import logging
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tp_loader.demo import llama_tensors, write_checkpoint  # noqa: E402

# Ranks are forked from this process (tp_loader.testing): it must never start OpenMP's thread pool,
# or a forked rank can deadlock on a lock one of those threads held (seen as an order-dependent hang).
torch.set_num_threads(1)

BASE_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 48,
    "intermediate_size": 100,
    "num_hidden_layers": 2,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "vocab_size": 101,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def llama_config(**overrides: object) -> dict:
    """The small test model's config with ``overrides``."""
    return {**BASE_CONFIG, **overrides}


@pytest.fixture
def make_checkpoint(tmp_path: Path):
    """Writes a Llama-family checkpoint; returns its directory."""
    counter = iter(range(1000))

    def make(
        config: dict | None = None,
        *,
        num_shards: int = 1,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        extra: dict | None = None,
    ) -> Path:
        config = config or llama_config()
        tensors = llama_tensors(config, seed=seed, dtype=dtype)
        tensors.update(extra or {})
        return write_checkpoint(tmp_path / f"ckpt{next(counter)}", config, tensors, num_shards=num_shards)

    return make


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TP_LOADER_PROGRESS", "0")
    logging.getLogger("tp_loader").setLevel(logging.INFO)


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """Applies ``edit`` to a safetensors file's JSON header in place, keeping the header's length."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "test edit must not grow the header"
    path.write_bytes(raw[:8] + text.ljust(length) + raw[8 + length :])


def proc_status_bytes(field: str) -> int:
    """A figure of this process's ``/proc/self/status`` given in kB (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field + ":"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples", type=int, default=25, help="examples per fuzz test (raise it for a long run, e.g. 2000)"
    )


#: A small transformers Llama config (GQA: 8 query and 2 KV heads) for tests that build transformers models.
TRANSFORMERS_LLAMA = {
    "hidden_size": 64,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vocab_size": 96,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}

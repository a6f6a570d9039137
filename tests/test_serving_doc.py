"""docs/serving.md's example, run as the doc tells a reader to: its python block, verbatim, as a script
under torchrun on two gloo ranks. The example asserts itself that the tensor-parallel forward equals the
unsharded one, so a wrong style mapping fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import llama_config

from tp_loader.demo import llama_tensors, write_checkpoint

pytest.importorskip("transformers", reason="the serving example builds transformers' LlamaForCausalLM")

DOC = Path(__file__).parents[1] / "docs" / "serving.md"


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_serving_doc_has_exactly_one_python_block_the_runnable_example() -> None:
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 1
    assert "tp_loader.load(path, mesh=mesh" in blocks[0]


@pytest.mark.parametrize(
    ("config", "num_shards"),
    [
        pytest.param(llama_config(), 2, id="gqa-12q-4kv-two-files"),
        pytest.param(llama_config(num_key_value_heads=1, tie_word_embeddings=True), 1, id="1kv-replicated-tied"),
    ],
)
def test_serving_example_matches_the_unsharded_forward_on_two_ranks(
    tmp_path: Path, config: dict, num_shards: int
) -> None:
    (block,) = python_blocks(DOC.read_text())
    script = tmp_path / "serve_llama.py"
    script.write_text(block)
    root = write_checkpoint(tmp_path / "ckpt", config, llama_tensors(config), num_shards=num_shards)
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU like the rest of the suite, whatever the machine
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TP_LOADER_DEMO_DIR": str(tmp_path / "demo"),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(script), str(root)], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert "tensor-parallel forward over 2 ranks matches the unsharded one" in done.stdout

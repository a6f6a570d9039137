"""docs/serving.md's examples, run as the doc tells a reader to: each python block, verbatim, as a script
under torchrun on two gloo ranks. Each example asserts its own result (the tensor-parallel forward equals the
unsharded one, the plain tensors equal load()'s shards, a reload keeps every data_ptr and a checkpoint of
other shapes is refused), so a wrong style mapping or a stale example fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import llama_config

from tp_loader.demo import llama_tensors, write_checkpoint

pytest.importorskip("transformers", reason="two of the serving examples build transformers' models")

DOC = Path(__file__).parents[1] / "docs" / "serving.md"

GQA = llama_config()  # 12 q heads, 4 kv heads: 6 and 2 per rank
ONE_KV_TIED = llama_config(num_key_value_heads=1, tie_word_embeddings=True)  # the kv head on both ranks

#: Each block's docstring, the checkpoints it is run with (config, seed, number of files) and what rank 0
#: prints when its assertions hold.
EXAMPLES = {
    "serve_module.py": (
        '"""A tensor-parallel model of your own, built on meta: tp_loader.parallelize, then tp_loader.load_into."""',
        [(GQA, 0, 2)],
        "tensor-parallel forward over 2 ranks matches the unsharded one",
    ),
    "serve_tensors.py": (
        '"""A server with its own parallel layers: tp_loader reads each rank\'s slices into plain tensors it '
        'allocated."""',
        [(ONE_KV_TIED, 0, 1)],
        "20 tensors read into this server's own tensors on 2 ranks",
    ),
    "serve_transformers.py": (
        '"""A transformers model built on meta, made tensor-parallel by tp_loader.parallelize and filled by '
        'load_into."""',
        [(ONE_KV_TIED, 0, 2)],
        "tensor-parallel forward over 2 ranks matches from_pretrained",
    ),
    "reload.py": (
        '"""Reload in place: new weights of the same architecture into the loaded model\'s own storage."""',
        [(GQA, 0, 2), (GQA, 1, 1), (llama_config(intermediate_size=80), 2, 1)],
        "reloaded in place on 2 ranks",
    ),
}


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_serving_doc_python_blocks_are_the_four_runnable_examples_in_order() -> None:
    blocks = python_blocks(DOC.read_text())
    assert [block.splitlines()[0] for block in blocks] == [docstring for docstring, _, _ in EXAMPLES.values()]
    text = " ".join(DOC.read_text().split())
    for name in EXAMPLES:
        assert f"Save it as `{name}`" in text


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_serving_example_runs_verbatim_on_two_ranks(tmp_path: Path, name: str) -> None:
    docstring, checkpoints, success = EXAMPLES[name]
    (block,) = [block for block in python_blocks(DOC.read_text()) if block.startswith(docstring)]
    script = tmp_path / name
    script.write_text(block)
    roots = [
        write_checkpoint(tmp_path / f"ckpt{i}", config, llama_tensors(config, seed=seed), num_shards=num_shards)
        for i, (config, seed, num_shards) in enumerate(checkpoints)
    ]
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU like the rest of the suite, whatever the machine
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TP_LOADER_DEMO_DIR": str(tmp_path / "demo"),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, str(script), *map(str, roots)], capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-6000:]
    assert success in done.stdout

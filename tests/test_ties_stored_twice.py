"""A tie the config asks for (``tie_word_embeddings``) but the checkpoint stores as two tensors that differ is not
applied, as transformers 5 does not apply it: each key keeps its own values (before, the target's were dropped
for the source's: a wrong LM head without an error). Stored twice with equal values, the tie holds: one tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TRANSFORMERS_LLAMA
from torch.distributed.device_mesh import init_device_mesh

import tp_loader
from tp_loader.testing import run_ranks, values

transformers = pytest.importorskip("transformers", reason="the reference is transformers' own loading")
accelerate = pytest.importorskip("accelerate", reason="init_empty_weights builds the model without memory")

PROMPT = torch.tensor([[5, 17, 33, 2, 71, 9]])


@pytest.fixture(scope="module")
def head_stored_apart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama saved with a head of its own, whose config.json then says tie_word_embeddings (a hand-edited or
    mis-converted config, as Mistral-Small-3 configs in transformers 5 write it)."""
    root = tmp_path_factory.mktemp("ties") / "llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TRANSFORMERS_LLAMA, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(root)
    data = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**data, "tie_word_embeddings": True}))
    return root


def _loaded(rank: int, world_size: int, root: Path) -> tuple:
    result = tp_loader.load(root)
    sd = result.state_dict
    head, embed = sd["lm_head.weight"], sd["model.embed_tokens.weight"]
    return head is embed, head.to_local().numpy().copy(), embed.to_local().numpy().copy(), result.report.ties


def test_a_tie_stored_as_two_different_tensors_keeps_each_keys_own_values(head_stored_apart: Path) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(head_stored_apart).eval()
    assert reference.lm_head.weight is not reference.model.embed_tokens.weight  # transformers unties it
    for rank, (same, head, embed, ties) in enumerate(values(run_ranks(2, _loaded, head_stored_apart))):
        assert not same
        assert torch.equal(torch.from_numpy(head), reference.lm_head.weight.detach().chunk(2)[rank])
        assert torch.equal(torch.from_numpy(embed), reference.model.embed_tokens.weight.detach().chunk(2)[rank])
        assert [(t.stored, t.identical) for t in ties] == [("both", False)]


def _tp_logits(rank: int, world_size: int, root: Path) -> tuple:
    config = transformers.AutoConfig.from_pretrained(root)
    with accelerate.init_empty_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.tie_weights()  # as the config says: one Parameter under both names
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tp_loader.parallelize(model, mesh=init_device_mesh("cpu", (world_size,)))
    tp_loader.load_into(model, root)
    with torch.no_grad():
        logits = model(PROMPT).logits.numpy()  # by value: a tensor would cross the pipe as a handle
    return logits, model.lm_head.weight is model.model.embed_tokens.weight


def test_load_into_a_model_that_ties_them_unties_them_as_transformers_does(head_stored_apart: Path) -> None:
    reference = transformers.AutoModelForCausalLM.from_pretrained(head_stored_apart).eval()
    with torch.no_grad():
        want = reference(PROMPT).logits
    for logits, tied in values(run_ranks(2, _tp_logits, head_stored_apart)):
        assert not tied
        torch.testing.assert_close(torch.from_numpy(logits), want, rtol=0, atol=1e-5)


def test_a_tie_stored_twice_with_equal_values_is_one_tensor(head_stored_apart: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    root = tmp_path / "equal"
    root.mkdir()
    (root / "config.json").write_text((head_stored_apart / "config.json").read_text())
    tensors = load_file(head_stored_apart / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, root / "model.safetensors")
    for same, head, embed, ties in values(run_ranks(2, _loaded, root)):
        assert same and (head == embed).all()
        assert [(t.stored, t.identical) for t in ties] == [("both", True)]

"""Keys no model runs are not read: DeepSeek-V3's multi-token-prediction layer (layers at index >= num_hidden_layers)
and the buffers transformers ignores on load (rotary ``inv_freq``, GPT-2's causal masks) come out of the plan as
skipped: never read (the reads are counted), never placed, listed in the report with their count and bytes.
``keep=`` loads them, placed by the plan's rules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import llama_config
from models import deepseek_tensors, quantize_checkpoint
from test_deepseek import BLOCK, FP8_CONFIG

import tp_loader
from tp_loader.demo import llama_tensors, write_checkpoint
from tp_loader.index import index_checkpoint
from tp_loader.resolve import find_weights
from tp_loader.testing import run_ranks, values

sys.path.insert(0, str(Path(__file__).parents[1]))  # benchmarks/, for the full-size fixtures

from benchmarks import fullsize  # noqa: E402

MTP_CONFIG = {**FP8_CONFIG, "num_nextn_predict_layers": 1}
MTP_REASON = "multi-token-prediction layers (index >= num_hidden_layers): no decoder runs them"


def _mtp_tensors() -> dict[str, torch.Tensor]:
    """A DeepSeek-V3 checkpoint as its repository lays it out: the decoder layers, then the MTP layer (a whole MoE
    layer at index num_hidden_layers) with its own embed_tokens, enorm, hnorm, eh_proj and shared_head."""
    layers = MTP_CONFIG["num_hidden_layers"]
    tensors = deepseek_tensors({**MTP_CONFIG, "num_hidden_layers": layers + 1})
    hidden, vocab = MTP_CONFIG["hidden_size"], MTP_CONFIG["vocab_size"]
    p = f"model.layers.{layers}."
    generator = torch.Generator().manual_seed(7)
    tensors.update(
        {
            p + "embed_tokens.weight": torch.randn(vocab, hidden, generator=generator),
            p + "enorm.weight": torch.randn(hidden, generator=generator),
            p + "hnorm.weight": torch.randn(hidden, generator=generator),
            p + "eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=generator),
            p + "shared_head.norm.weight": torch.randn(hidden, generator=generator),
            p + "shared_head.head.weight": torch.randn(vocab, hidden, generator=generator),
        }
    )
    return quantize_checkpoint(tensors, BLOCK)


@pytest.fixture
def mtp_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """The checkpoint with its MTP layer, and the same without it."""
    tensors = _mtp_tensors()
    mtp = f"model.layers.{MTP_CONFIG['num_hidden_layers']}."
    with_mtp = write_checkpoint(tmp_path / "with_mtp", MTP_CONFIG, tensors, num_shards=2)
    decoder = {k: v for k, v in tensors.items() if not k.startswith(mtp)}
    without = write_checkpoint(tmp_path / "without_mtp", MTP_CONFIG, decoder, num_shards=2)
    return with_mtp, without


def _counted_load(rank: int, world_size: int, root: Path) -> tuple[list[tuple[str, int, int]], dict, tuple]:
    """Loads with every byte read through os.preadv, recording (file, offset, length) of each read."""
    reads: list[tuple[str, int, int]] = []
    real = os.preadv

    def counting(fd: int, buffers, offset: int, *args) -> int:
        got = real(fd, buffers, offset, *args)
        reads.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, got))
        return got

    os.preadv = counting
    try:
        result = tp_loader.load(root, zero_copy=False)
    finally:
        os.preadv = real
    report = result.report
    return reads, {r.rank: r.bytes_read for r in report.ranks}, (report.skipped, report.unexpected_keys)


def test_the_mtp_layer_is_skipped_never_read_and_reported_with_its_count_and_bytes(mtp_checkpoints) -> None:
    with_mtp, without = mtp_checkpoints
    env = {"TP_LOADER_READER": "pread"}
    loaded = values(run_ranks(2, _counted_load, with_mtp, env=env))
    decoder_only = values(run_ranks(2, _counted_load, without, env=env))
    stored = index_checkpoint(find_weights(with_mtp)).tensors
    mtp = {k: info for k, info in stored.items() if k.startswith("model.layers.2.")}
    # attention 12 (fp8 weights with their scales), 2 norms, router 2, experts 24, shared 6, MTP's own 7
    assert len(mtp) == 12 + 2 + 2 + 24 + 6 + 7
    for reads, _, (skipped, unexpected) in loaded:
        ((name, reason, keys, nbytes),) = [(s.name, s.reason, s.keys, s.nbytes) for s in skipped]
        assert (name, reason, unexpected) == ("mtp", MTP_REASON, ())
        assert sorted(keys) == sorted(mtp) and nbytes == sum(info.nbytes for info in mtp.values())
        for file, offset, length in reads:  # no read touches a byte of a skipped tensor
            hit = [k for k, i in mtp.items() if i.file == file and offset < i.end and i.begin < offset + length]
            assert not hit, (file, offset, length, hit[:3])
    # each rank reads exactly what it reads of the checkpoint that has no MTP layer
    assert [b for _, b, _ in loaded] == [b for _, b, _ in decoder_only]


def _kept(rank: int, world_size: int, root: Path) -> dict[str, tuple[str, bytes]]:
    result = tp_loader.load(root, keep=["mtp"])
    assert result.report.skipped == () and result.report.unexpected_keys == ()
    # plain values back to the parent (a tensor would cross the pipe as a handle to this rank's memory)
    return {
        k: (str(t.placements), t.to_local().contiguous().view(torch.uint8).numpy().tobytes())
        for k, t in result.state_dict.items()
    }


def test_keep_mtp_loads_the_mtp_layer_placed_by_the_plans_rules(mtp_checkpoints) -> None:
    with_mtp, _ = mtp_checkpoints
    stored = _mtp_tensors()
    for rank, shards in enumerate(values(run_ranks(2, _kept, with_mtp))):
        for key, dim in [
            ("model.layers.2.self_attn.q_b_proj.weight", 0),
            ("model.layers.2.self_attn.o_proj.weight", 1),
            ("model.layers.2.mlp.experts.3.down_proj.weight", 1),
            ("model.layers.2.embed_tokens.weight", 0),
            ("model.layers.2.shared_head.head.weight", 0),
            ("model.layers.2.eh_proj.weight", None),
            ("model.layers.2.enorm.weight", None),
        ]:
            placements, local = shards[key]
            want = stored[key] if dim is None else stored[key].chunk(2, dim=dim)[rank]
            assert placements == ("(Replicate(),)" if dim is None else f"(Shard(dim={dim}),)"), (key, placements)
            assert local == want.contiguous().view(torch.uint8).numpy().tobytes(), key


def test_keep_that_names_nothing_the_plan_skips_is_refused(mtp_checkpoints) -> None:
    with_mtp, _ = mtp_checkpoints
    with pytest.raises(tp_loader.ArgumentError) as caught:
        tp_loader.plan_load(with_mtp, world_size=2, keep=["mpt"])
    assert str(caught.value) == (
        "keep='mpt' names no [[skip]] entry of plan 'deepseek_v3' (inv_freq, mtp) and matches no key it skips "
        "[key=keep]. Pass the name of a skip entry (the report lists them under 'skipped') or a glob of skipped keys"
    )
    summary = tp_loader.plan_load(with_mtp, world_size=2, keep=["model.layers.2.mlp.experts.**"])
    ((skipped,),) = [summary.skipped]
    assert len(skipped.keys) == 53 - 24 and not any(".experts." in k for k in skipped.keys)


def test_rotary_frequencies_stored_by_old_checkpoints_are_skipped_not_unexpected(tmp_path: Path) -> None:
    config = llama_config()
    tensors = llama_tensors(config)
    freqs = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(2) for i in range(2)}
    root = write_checkpoint(tmp_path / "old", config, {**tensors, **freqs})
    result = tp_loader.load(root, strict=True)
    assert set(result.state_dict) == set(tensors)
    ((skipped,),) = [result.report.skipped]
    assert (skipped.name, sorted(skipped.keys), skipped.nbytes) == ("inv_freq", sorted(freqs), 16)
    assert "skipped keys (not read: no model runs them; keep= loads them) (1):" in result.report.format_table()


def test_full_size_deepseek_v3_at_tp8_skips_its_mtp_layer_and_each_rank_plans_the_decoders_share(tmp_path) -> None:
    """The real checkpoint's headers (91,991 tensors, 689 GB as holes): the MTP layer's 1,564 tensors are skipped
    and each rank plans 79.29 GiB, where it read and replicated 93.66 GiB before."""
    totals = fullsize.write(tmp_path / "ds3", "deepseek_v3")
    assert (totals["tensors"], totals["bytes"], totals["files"]) == (91991, 688_574_839_360, 163)
    summary = tp_loader.plan_load(tmp_path / "ds3", world_size=8)
    ((skipped,),) = [summary.skipped]
    assert (skipped.name, len(skipped.keys), skipped.nbytes) == ("mtp", 1564, 15_424_227_552)
    assert summary.unexpected_keys == () and summary.missing_keys == ()
    assert [r.bytes_read for r in summary.ranks] == [85_140_130_848] * 8
    assert [r.num_tensors for r in summary.ranks] == [90427] * 8

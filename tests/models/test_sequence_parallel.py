"""Ulysses sequence parallelism of the transformer on 2 CPU processes (gloo): the same output as
one process, in ISA and dense mode, on every rank; clear errors for layouts it cannot shard."""

import pytest
import torch

from liveditor.errors import LIVEditorError
from liveditor.pipelines.parallel import launch
from parallel_workers import enable_bad_ulysses, single_transformer_outputs, ulysses_transformer_outputs

# Latent (3, 8, 12) -> 72 tokens per segment = 9 ISA blocks of 8; (5, 8, 8) -> 80 tokens, 10 blocks.
CASES = [
    dict(preset=preset, mode=mode, model_seed=seed, input_seed=seed + 10, latent=latent)
    for preset, latent in (("liveditor-tiny", (3, 8, 12)), ("liveditor-small", (5, 8, 8)))
    for mode in ("isa", "dense")
    for seed in (0, 1)
]


def _case_id(case):
    return f"{case['preset']}-{case['mode']}-seed{case['model_seed']}"


@pytest.fixture(scope="module")
def outputs():
    """(one-process outputs, Ulysses-2 outputs) of every case; one launch of 2 processes for all."""
    return single_transformer_outputs(CASES), launch(ulysses_transformer_outputs, 2, (CASES,), backend="gloo")


@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_ulysses_2_equals_one_process(outputs, index):
    single, parallel = outputs
    out, rank_difference = parallel[index]
    case = CASES[index]
    assert rank_difference == 0.0, f"{_case_id(case)}: ranks disagree by {rank_difference}"
    assert out.shape == single[index].shape
    torch.testing.assert_close(out, single[index], rtol=1e-5, atol=1e-5, msg=lambda m: f"{_case_id(case)}: {m}")


def test_heads_not_divisible_by_the_degree_is_one_clear_error():
    # 3 heads cannot be split over 2 ranks.
    with pytest.raises(LIVEditorError) as info:
        launch(enable_bad_ulysses, 2, ("liveditor-tiny", 3), backend="gloo")
    message = str(info.value)
    assert "Ulysses degree 2 must divide the 3 attention heads" in message and "\n" not in message


def test_tokens_not_divisible_by_the_degree_is_a_clear_error():
    from liveditor.models.sequence_parallel import SequenceShard

    shard = SequenceShard(group=None, rank=0, degree=4)
    with pytest.raises(ValueError, match=r"Ulysses degree 4 must divide the 90 tokens"):
        shard.check(num_heads=8, num_tokens=90)
    shard.check(num_heads=8, num_tokens=96)


def test_ulysses_4_with_shards_inside_the_segments_equals_one_process():
    """With 4 ranks the shards split the source and the context in halves: each must get the RoPE
    of its own positions (2 ranks always split exactly at the source/context boundary)."""
    cases = [dict(preset="liveditor-small", mode=mode, model_seed=3, input_seed=13, latent=(5, 8, 8))
             for mode in ("isa", "dense")]
    single = single_transformer_outputs(cases)
    for case, ref, (out, rank_difference) in zip(cases, single, launch(ulysses_transformer_outputs, 4, (cases,),
                                                                        backend="gloo")):
        assert rank_difference == 0.0, f"{_case_id(case)}: ranks disagree by {rank_difference}"
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"{_case_id(case)}: {m}")

"""Bad arguments to the ISA API raise ValueError naming the problem."""

import pytest
import torch

from liveditor.isa import ISAConfig, isa_attention


@pytest.fixture(params=[0], ids=lambda seed: f"seed{seed}")
def qkv(request):
    g = torch.Generator().manual_seed(request.param)
    return [torch.randn(2, 2, 100, 32, generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 16.0}, "block_size"),
        ({"select_ratio": 0.0}, "select_ratio"),
        ({"full_ratio": 1.5}, "full_ratio"),
        ({"exact_ratio": -0.1}, "exact_ratio"),
        ({"sharpness": "variance!"}, "sharpness"),
        ({"token_order": "zigzag"}, "token_order"),
        ({"tile": (4, 4)}, "tile"),
        ({"count_rounding": "round"}, "count_rounding"),
        ({"count_rounding": None}, "count_rounding"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        ISAConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_shape_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="same shape"):
        isa_attention(q, k[:, :, :90], v, 50)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        isa_attention(q[0], k[0], v[0], 50)


@pytest.mark.parametrize("num_source", [0, 101, -1, 50.0, True])
def test_num_source_out_of_range(qkv, num_source):
    with pytest.raises(ValueError, match="num_source"):
        isa_attention(*qkv, num_source)


def test_non_floating_dtype():
    q = torch.randint(0, 5, (1, 1, 10, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="floating"):
        isa_attention(q, q, q, 5)


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="dtype"):
        isa_attention(q, k.double(), v, 50)


def test_gate_shape_is_not_broadcast(qkv):
    with pytest.raises(ValueError, match="gate"):
        isa_attention(*qkv, 50, gate=torch.ones(1, 100))
    with pytest.raises(ValueError, match="gate"):
        isa_attention(*qkv, 50, gate=torch.ones(2, 2, 100))


def test_bad_scale_backend_and_grid(qkv):
    with pytest.raises(ValueError, match="scale"):
        isa_attention(*qkv, 50, scale=-1.0)
    with pytest.raises(ValueError, match="backend"):
        isa_attention(*qkv, 50, backend="cuda-magic")
    with pytest.raises(ValueError, match="grid"):
        isa_attention(*qkv, 50, ISAConfig(token_order="tile"))
    with pytest.raises(ValueError, match="grid"):
        isa_attention(*qkv, 50, ISAConfig(token_order="tile"), grid=(2, 5, 6))


def test_head_dim_limit():
    q = torch.ones(1, 1, 10, 300)
    with pytest.raises(ValueError, match="head dim"):
        isa_attention(q, q, q, 5)

"""The space-to-depth codec: lossless, AutoencoderKLWan-shaped, saves and loads."""

import numpy as np
import pytest
import torch

from liveditor.models.tiny_codec import SpaceToDepthVideoCodec, channel_statistics


def random_video(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).float() / 127.5 - 1.0


@pytest.mark.parametrize("spatial,temporal", [(4, 1), (2, 2), (8, 1)])
def test_round_trip_is_exact(spatial, temporal):
    codec = SpaceToDepthVideoCodec(scale_factor_spatial=spatial, scale_factor_temporal=temporal)
    video = random_video(2, 3, 4, 16, 24, seed=spatial)
    posterior = codec.encode(video).latent_dist
    z = posterior.mode()
    assert z.shape == (2, 3 * temporal * spatial**2, 4 // temporal, 16 // spatial, 24 // spatial)
    assert codec.config.z_dim == z.shape[1]
    assert torch.equal(posterior.sample(), z)  # a point mass: sampling adds nothing
    assert torch.equal(codec.decode(z).sample, video)


def test_channel_layout_moves_each_pixel_to_its_documented_channel():
    codec = SpaceToDepthVideoCodec(scale_factor_spatial=4, scale_factor_temporal=2)
    video = random_video(1, 3, 4, 8, 8, seed=3)
    z = codec.space_to_depth(video)
    rng = np.random.default_rng(0)
    for _ in range(20):
        c, f, y, x = (int(rng.integers(n)) for n in (3, 4, 8, 8))
        channel = ((c * 2 + f % 2) * 4 + y % 4) * 4 + x % 4
        assert z[0, channel, f // 2, y // 4, x // 4] == video[0, c, f, y, x]


def test_scale_factors_as_wan_pipelines_read_them():
    codec = SpaceToDepthVideoCodec(scale_factor_spatial=4, scale_factor_temporal=2)
    flags = codec.temperal_downsample
    assert 2 ** sum(flags) == 2 and 2 ** len(flags) == 4
    assert codec.config.scale_factor_spatial == 4 and codec.config.scale_factor_temporal == 2


def test_decode_clamps_like_a_vae():
    codec = SpaceToDepthVideoCodec()
    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(1)) * 3
    out = codec.decode(z).sample
    assert out.min() >= -1 and out.max() <= 1
    assert (out.abs() == 1).any()


def test_normalize_uses_config_statistics_and_inverts():
    mean = torch.linspace(-0.3, 0.3, 48).tolist()
    std = torch.linspace(0.4, 0.9, 48).tolist()
    codec = SpaceToDepthVideoCodec(latents_mean=mean, latents_std=std)
    z = torch.randn(2, 48, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    normalized = codec.normalize(z)
    expected = (z - torch.tensor(mean).view(1, 48, 1, 1, 1)) / torch.tensor(std).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(normalized, expected)
    torch.testing.assert_close(codec.denormalize(normalized), z)


def test_save_and_load_keep_statistics(tmp_path):
    codec = SpaceToDepthVideoCodec(latents_mean=[0.1] * 48, latents_std=[0.7] * 48)
    codec.save_pretrained(tmp_path)
    loaded = SpaceToDepthVideoCodec.from_pretrained(tmp_path)
    assert loaded.config.latents_std == [0.7] * 48
    video = random_video(1, 3, 2, 8, 8, seed=5)
    torch.testing.assert_close(loaded.normalize(loaded.encode(video).latent_dist.mode()),
                               codec.normalize(codec.encode(video).latent_dist.mode()))


def test_channel_statistics_pool_each_colour():
    codec = SpaceToDepthVideoCodec()
    g = torch.Generator().manual_seed(4)
    video = torch.stack([torch.rand(4, 4, 8, 8, generator=g) * 0.2 - 0.5,
                         torch.rand(4, 4, 8, 8, generator=g) * 0.2,
                         torch.rand(4, 4, 8, 8, generator=g) * 0.2 + 0.5], dim=1)
    mean, std = channel_statistics(video, codec)
    assert len(mean) == len(std) == 48
    assert mean[0] == pytest.approx(video[:, 0].mean().item(), abs=1e-6)
    assert mean[47] == pytest.approx(video[:, 2].mean().item(), abs=1e-6)
    assert mean[:16] == [mean[0]] * 16 and all(s > 0 for s in std)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale_factor_spatial=3), "power of two"),
        (dict(scale_factor_temporal=0), "power of two"),
        (dict(scale_factor_spatial=2, scale_factor_temporal=4), "must not exceed"),
        (dict(latents_mean=[0.0] * 5), "48 values"),
        (dict(latents_std=[0.0] * 48), "positive"),
        (dict(z_dim=16), "z_dim"),
    ],
)
def test_bad_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpaceToDepthVideoCodec(**kwargs)


def test_bad_videos_are_rejected():
    codec = SpaceToDepthVideoCodec()
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(random_video(1, 3, 2, 10, 8))
    with pytest.raises(ValueError, match="channels"):
        codec.encode(random_video(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        codec.encode(random_video(3, 2, 8, 8))
    with pytest.raises(ValueError, match="latent must be"):
        codec.decode(torch.randn(1, 12, 2, 2, 2))

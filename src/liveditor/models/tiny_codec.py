"""A lossless space-to-depth video codec with the AutoencoderKLWan interface.

The tiny LIVEditor works on pixels: a `[B, 3, F, H, W]` video in [-1, 1] becomes a latent
`[B, 3*st*s*s, F/st, H/s, W/s]` by moving every `st x s x s` cube of pixels into channels, and
back. Nothing is learned and nothing is lost, so decode(encode(x)) == x exactly.

It answers the calls a Wan pipeline makes on its VAE: `encode(x).latent_dist.mode()/.sample()`,
`decode(z).sample`, and the config fields `z_dim`, `latents_mean`, `latents_std`,
`scale_factor_temporal`, `scale_factor_spatial` (plus `temperal_downsample`, from which some
diffusers Wan pipelines derive the scale factors). As with the Wan VAE, the pipeline normalises
latents as `(z - latents_mean) / latents_std`; `normalize`/`denormalize` do exactly that.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class SpaceToDepthVideoCodec(ModelMixin, ConfigMixin):
    r"""Lossless pixel <-> latent codec (space-to-depth), a drop-in for `AutoencoderKLWan`.

    Args:
        in_channels: colour channels of the video (3).
        scale_factor_spatial: pixels per latent cell along height and width (a power of two).
        scale_factor_temporal: frames per latent frame (a power of two; 1 keeps every frame).
        latents_mean, latents_std: per-latent-channel statistics used to normalise latents for
            the diffusion model (length `z_dim`); default 0 and 1.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        scale_factor_spatial: int = 4,
        scale_factor_temporal: int = 1,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        z_dim: int | None = None,
    ):
        super().__init__()
        for name, value in (("scale_factor_spatial", scale_factor_spatial), ("scale_factor_temporal", scale_factor_temporal)):
            if isinstance(value, bool) or not isinstance(value, int) or not _is_power_of_two(value):
                raise ValueError(f"{name} must be a power of two >= 1, got {value!r}")
        if scale_factor_temporal > scale_factor_spatial:
            raise ValueError("scale_factor_temporal must not exceed scale_factor_spatial (Wan's stage layout)")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        derived_z_dim = in_channels * scale_factor_temporal * scale_factor_spatial**2
        if z_dim is not None and z_dim != derived_z_dim:
            raise ValueError(f"z_dim={z_dim} does not match in_channels * st * s * s = {derived_z_dim}")
        z_dim = derived_z_dim
        latents_mean = [0.0] * z_dim if latents_mean is None else [float(v) for v in latents_mean]
        latents_std = [1.0] * z_dim if latents_std is None else [float(v) for v in latents_std]
        if len(latents_mean) != z_dim or len(latents_std) != z_dim:
            raise ValueError(f"latents_mean and latents_std need {z_dim} values (z_dim), got {len(latents_mean)} and {len(latents_std)}")
        if not all(v > 0 for v in latents_std):
            raise ValueError("latents_std values must be positive")
        self.register_to_config(z_dim=z_dim, latents_mean=latents_mean, latents_std=latents_std)
        # Also buffers, so .device/.dtype/.to() work as on a VAE and save_pretrained writes a weights
        # file that from_pretrained expects (the values mirror the config).
        self.register_buffer("latents_mean_tensor", torch.tensor(latents_mean).view(1, z_dim, 1, 1, 1))
        self.register_buffer("latents_std_tensor", torch.tensor(latents_std).view(1, z_dim, 1, 1, 1))

    @property
    def temperal_downsample(self) -> list[bool]:
        """Wan VAE's per-stage temporal flags (spelled as in diffusers): 2**sum = temporal factor,
        2**len = spatial factor."""
        spatial_stages = self.config.scale_factor_spatial.bit_length() - 1
        temporal_stages = self.config.scale_factor_temporal.bit_length() - 1
        return [stage < temporal_stages for stage in range(spatial_stages)]

    def _check_video(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError(f"video must be a [B, C, F, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        c, f, h, w = x.shape[1:]
        s, st = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        if c != self.config.in_channels:
            raise ValueError(f"video has {c} channels, the codec expects {self.config.in_channels}")
        if f % st or h % s or w % s:
            raise ValueError(
                f"video (frames, height, width) = {(f, h, w)} must be divisible by ({st}, {s}, {s})"
            )

    def space_to_depth(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, F, H, W] -> [B, C*st*s*s, F/st, H/s, W/s]; channel = ((c*st + dt)*s + dy)*s + dx."""
        self._check_video(x)
        s, st = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        b, c, f, h, w = x.shape
        x = x.reshape(b, c, f // st, st, h // s, s, w // s, s)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * st * s * s, f // st, h // s, w // s)

    def depth_to_space(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `space_to_depth`."""
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(
                f"latent must be [B, {self.config.z_dim}, F, H, W], got {getattr(z, 'shape', type(z).__name__)}"
            )
        s, st = self.config.scale_factor_spatial, self.config.scale_factor_temporal
        b, _, f, h, w = z.shape
        c = self.config.in_channels
        z = z.reshape(b, c, st, s, s, f, h, w)
        return z.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c, f * st, h * s, w * s)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Video in [-1, 1] -> `AutoencoderKLOutput` whose `latent_dist` is a point mass (mode == sample)."""
        z = self.space_to_depth(x)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """Latent -> video, clamped to [-1, 1] like the Wan VAE's output."""
        video = self.depth_to_space(z).clamp(-1.0, 1.0)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    def forward(self, sample: torch.Tensor, return_dict: bool = True):
        """Encode then decode (identity on valid videos in [-1, 1])."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent -> the diffusion model's latent space, `(z - latents_mean) / latents_std`."""
        return (z - self.latents_mean_tensor.to(z)) / self.latents_std_tensor.to(z)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        return z * self.latents_std_tensor.to(z) + self.latents_mean_tensor.to(z)


def channel_statistics(videos: torch.Tensor, codec: SpaceToDepthVideoCodec) -> tuple[list[float], list[float]]:
    """Per-latent-channel mean and std of `videos` ([B, C, F, H, W] in [-1, 1]) under `codec`,
    for its `latents_mean`/`latents_std`. Channels of one colour share statistics (space-to-depth
    only moves pixels), so they are pooled per colour for a steadier estimate."""
    x = videos.double()
    c = codec.config.in_channels
    per_color = codec.config.z_dim // c
    mean = x.transpose(0, 1).reshape(c, -1).mean(1)
    std = x.transpose(0, 1).reshape(c, -1).std(1).clamp_min(1e-3)
    return (
        [float(m) for m in mean.repeat_interleave(per_color)],
        [float(s) for s in std.repeat_interleave(per_color)],
    )

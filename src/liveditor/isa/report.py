"""ISA-vs-dense fidelity: error of ISA against full attention for several configs.

`fidelity_table` works on any q/k/v (synthetic or recorded from a model);
`synthetic_icl_qkv` makes inputs that look like video in-context attention: attention decays with
spatio-temporal distance, each context token sits at the same grid position as a source token
(decoupled RoPE) and receives less mass, and a few heads are sharply peaked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

import torch

from ..atomic import write_json
from .api import dense_attention, isa_attention
from .config import ISAConfig


def report_configs(base: ISAConfig | None = None) -> dict[str, ISAConfig]:
    """The configs the report compares: both sharpness statistics x both token orders, then
    one-knob variations of the default."""
    base = ISAConfig() if base is None else base
    return {
        "energy / raster (default)": replace(base, sharpness="energy", token_order="raster"),
        "topk / raster": replace(base, sharpness="topk", token_order="raster"),
        "energy / tile": replace(base, sharpness="energy", token_order="tile"),
        "topk / tile": replace(base, sharpness="topk", token_order="tile"),
        "full_ratio 0.25": replace(base, full_ratio=0.25),
        "full_ratio 0.75": replace(base, full_ratio=0.75),
        "select_ratio 0.25": replace(base, select_ratio=0.25),
        "exact_ratio 0.125": replace(base, exact_ratio=0.125),
        # Error split: pruning alone (every query exact), Taylor alone (no context pruned).
        "pruning only (full 1.0)": replace(base, full_ratio=1.0),
        "Taylor only (select 1.0)": replace(base, select_ratio=1.0),
    }


def _fourier_features(coords: torch.Tensor, n_features: int, lengthscale: torch.Tensor, generator) -> torch.Tensor:
    """Random Fourier features whose dot products approximate a Gaussian kernel of the coordinates."""
    freqs = torch.randn(coords.shape[-1], n_features, generator=generator) / lengthscale[:, None]
    phase = torch.rand(n_features, generator=generator) * 2 * math.pi
    return math.sqrt(2.0 / n_features) * torch.cos(coords @ freqs + phase)


def synthetic_icl_qkv(
    grid: tuple[int, int, int],
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    peaked_heads: int = 1,
    context_strength: float = 0.8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """q, k, v `[1, heads, 2*f*h*w, head_dim]` for a `[source | context]` sequence on `grid`.

    Per head, logits between tokens at grid positions p, p' are about
    `beta * kernel(p - p')` (times `context_strength` for context keys) plus content noise;
    `beta` is larger for the peaked heads. Values are smooth fields over the grid; the context's
    values are the source's with one region edited.
    """
    f, h, w = grid
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack(
        torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1
    ).reshape(-1, 3).float()
    L = coords.shape[0]
    D = head_dim
    qs, ks, vs = [], [], []
    for head in range(heads):
        beta = 24.0 if head < peaked_heads else 4.0 + 4.0 * torch.rand(1, generator=g).item()
        lengthscale = torch.tensor([1.0, 2.0, 2.0]) * (1.0 + torch.rand(3, generator=g))
        phi = _fourier_features(coords, D, lengthscale, g)  # [L, D], phi.phi' ~ kernel
        amplitude = math.sqrt(beta * math.sqrt(D))
        noise = 0.2 * math.sqrt(math.sqrt(D))
        q_src = amplitude * phi + noise * torch.randn(L, D, generator=g)
        q_ctx = amplitude * phi + noise * torch.randn(L, D, generator=g)
        k_src = amplitude * phi + noise * torch.randn(L, D, generator=g)
        k_ctx = context_strength * amplitude * phi + noise * torch.randn(L, D, generator=g)
        field = _fourier_features(coords, D, torch.tensor([3.0, 4.0, 4.0]), g) * math.sqrt(D)
        v_ctx = field + 0.1 * torch.randn(L, D, generator=g)
        edited = (coords[:, 1] < h / 2) & (coords[:, 2] < w / 2)
        v_src = v_ctx.clone()
        v_src[edited] += torch.randn(D, generator=g)
        qs.append(torch.cat([q_src, q_ctx]))
        ks.append(torch.cat([k_src, k_ctx]))
        vs.append(torch.cat([v_src, v_ctx]))
    return tuple(torch.stack(x)[None].to(device=device, dtype=dtype) for x in (qs, ks, vs))


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.double(), ref.double()
    diff = out - ref
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, -2), ref.flatten(0, -2), dim=-1)
    return {
        "rel_l1": (diff.abs().sum() / ref.abs().sum()).item(),
        "rel_l2": (diff.norm() / ref.norm()).item(),
        "cosine": cos.mean().item(),
    }


@torch.no_grad()
def fidelity_table(q, k, v, num_source: int, grid=None, configs: dict[str, ISAConfig] | None = None, backend="auto"):
    """Rows of {config, rel_l1, rel_l2, cosine, flop_fraction} for ISA against dense attention.

    Configs with tile order are skipped (with a note in the row) when no grid is given.
    """
    configs = report_configs() if configs is None else configs
    reference = dense_attention(q, k, v).float()
    rows = []
    for name, config in configs.items():
        row = {"config": name, **{key: val for key, val in asdict(config).items()}}
        if config.token_order == "tile" and grid is None:
            row["skipped"] = "tile order needs the grid"
            rows.append(row)
            continue
        out, info = isa_attention(q, k, v, num_source, config, grid=grid, backend=backend, return_info=True)
        row.update(error_metrics(out.float(), reference))
        row["flop_fraction"] = info.flop_fraction
        rows.append(row)
    return rows


def format_table(rows) -> str:
    header = f"{'config':28s} {'rel L1':>8s} {'rel L2':>8s} {'cosine':>8s} {'FLOPs':>7s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['config']:28s} ({r['skipped']})")
            continue
        lines.append(
            f"{r['config']:28s} {r['rel_l1']:8.4f} {r['rel_l2']:8.4f} {r['cosine']:8.5f} {r['flop_fraction']:7.1%}"
        )
    return "\n".join(lines)


def run_fidelity_report(
    grid=(8, 16, 24), heads=4, head_dim=64, seed=0, device="cpu", json_path=None, print_fn=print
):
    """Print (and optionally save) the fidelity table on synthetic video ICL inputs."""
    if any(int(x) < 1 for x in grid) or heads < 1 or not 1 <= head_dim <= 256:
        raise ValueError(f"grid, heads and head dim must be positive (head dim <= 256), got {grid}, {heads}, {head_dim}")
    q, k, v = synthetic_icl_qkv(tuple(grid), heads, head_dim, seed, device=device)
    num_source = q.shape[2] // 2
    rows = fidelity_table(q, k, v, num_source, grid=tuple(grid))
    print_fn(
        f"ISA vs dense attention: synthetic video ICL inputs, grid {tuple(grid)} per segment, "
        f"N={q.shape[2]}, H={heads}, D={head_dim}, seed {seed}"
    )
    print_fn(format_table(rows))
    best = min((r for r in rows if "skipped" not in r and r["select_ratio"] == 0.125
                and r["full_ratio"] == 0.5 and r["exact_ratio"] == 0.0625), key=lambda r: r["rel_l2"])
    print_fn(f"lowest error at default ratios: {best['config']}")
    if json_path:
        write_json(json_path, {"grid": list(grid), "heads": heads, "head_dim": head_dim, "seed": seed, "rows": rows})
    return rows

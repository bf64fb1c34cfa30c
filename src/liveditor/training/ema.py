"""Exponential moving average of model weights (what the bundled model ships)."""

from __future__ import annotations

import torch


class EMA:
    """fp32 shadow copies of the trainable parameters of several modules.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates, so early
    weights (random init) are forgotten quickly.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {
            f"{name}.{pname}": p.detach().float().clone()
            for name, module in modules.items()
            for pname, p in module.named_parameters()
            if p.requires_grad
        }

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module]) -> None:
        decay = self.current_decay()
        shadows, params = [], []
        for name, module in modules.items():
            for pname, p in module.named_parameters():
                key = f"{name}.{pname}"
                if key in self.shadow:
                    shadows.append(self.shadow[key])
                    params.append(p.detach().float())
        torch._foreach_lerp_(shadows, params, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, modules: dict[str, torch.nn.Module]) -> None:
        """Load the averaged weights into `modules` (same structure as at construction)."""
        for name, module in modules.items():
            for pname, p in module.named_parameters():
                key = f"{name}.{pname}"
                if key in self.shadow:
                    p.copy_(self.shadow[key].to(p.dtype))

    def to(self, device) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        device = next(iter(self.shadow.values())).device
        self.shadow = {k: state["shadow"][k].float().to(device) for k in self.shadow}
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])

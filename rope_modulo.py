"""Modulo RoPE: rotary embedding with positions taken modulo a period.

From ttt-lm-pytorch (Sun et al. 2024, "Learning to (Learn at Test Time)", `ttt.py`): inside its
TTT layer the inner-loop queries and keys are rotated with `position_ids % mini_batch_size`, so
the positions they see never leave the range seen in training, however long the sequence; the
relative order inside one period is kept.

Here it is offered for the In-Place TTT fast-weight path (`apply_rope_modulo`, `train.py
--ttt-rope-modulo`), where
Z plays both roles: it writes the fast weight (key) and reads it (query). That combination is
this project's extension, not part of the In-Place TTT paper, which uses no positions there.

Usage:
    import torch, rope_modulo
    Z = torch.randn(2, 4096, 512)                        # [B, T, h]
    Zr = rope_modulo.rotate_modulo(Z, torch.arange(4096), period=1024)
    rope_modulo.apply_rope_modulo(model, period=1024)    # on the Z of a model's TTT layers (ttt.py)

Only torch is used: copy this file alone.
"""
import functools

import torch
from torch import nn


def modulo_positions(positions: torch.Tensor, period: int) -> torch.Tensor:
    """positions % period: every position is folded into 0 .. period - 1."""
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    return positions % period


def rotate(x: torch.Tensor, positions: torch.Tensor, max_period: float = 10_000.0,
           interleave: bool = True) -> torch.Tensor:
    """Plain RoPE on the last dim of x: [..., T, D], positions: [T] or broadcastable to [..., T].

    Pair i of position p is rotated by p * max_period^(-2i/D), in float32; pairs are
    (x[2i], x[2i+1]) when interleaved (Moshi's layout), else (x[i], x[i + D/2]).
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"last dim must be even for RoPE, got {D}")
    inv_freq = 1.0 / (max_period ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    angles = positions.to(device=x.device, dtype=torch.float32)[..., None] * inv_freq  # [..., T, D/2]
    cos, sin = angles.cos(), angles.sin()
    if interleave:
        pairs = x.float().unflatten(-1, (D // 2, 2))
        xr, xi = pairs[..., 0], pairs[..., 1]
    else:
        xr, xi = x.float()[..., : D // 2], x.float()[..., D // 2:]
    out_r, out_i = xr * cos - xi * sin, xr * sin + xi * cos
    if interleave:
        return torch.stack([out_r, out_i], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([out_r, out_i], dim=-1).to(x.dtype)


def rotate_modulo(x: torch.Tensor, positions: torch.Tensor, period: int,
                  max_period: float = 10_000.0, interleave: bool = True) -> torch.Tensor:
    """RoPE at positions % period. x: [..., T, D]; positions: [T] (absolute, e.g. with an offset)."""
    return rotate(x, modulo_positions(positions, period), max_period, interleave)


def apply_rope_modulo(model: nn.Module, period: int) -> nn.Module:
    """Rotates Z at positions % period in the fast-weight path of every TTT layer of `model` (the
    modules with a `z_transform` attribute, ttt.TTTGating); returns the model. ValueError if it has
    none: there would be nothing to rotate."""
    if period <= 0:
        raise ValueError(f"period must be > 0, got {period}")
    layers = [m for m in model.modules() if hasattr(m, "z_transform")]
    if not layers:
        raise ValueError("apply_rope_modulo found no TTT layer (a module with `z_transform`): apply TTT first")
    for m in layers:
        m.z_transform = functools.partial(rotate_modulo, period=period)
    return model


class ModuloRotaryEmbedding(nn.Module):
    """A drop-in for moshi.modules.rope.RotaryEmbedding whose positions wrap every `period`. Set it
    on every attention (`layer.self_attn.rope`), as yarn.apply_yarn does: moshi's layers keep their
    own reference, so assigning `transformer.rope` alone would change nothing."""

    def __init__(self, period: int, max_period: float = 10_000.0, interleave: bool = True):
        super().__init__()
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self.period, self.max_period, self.interleave = period, max_period, interleave

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor,
                time_before_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, H, T, D] (or [B, T, H, D] with `time_before_heads`); offset: [B] long."""
        T = q.shape[1] if time_before_heads else q.shape[2]
        positions = offset.view(-1, 1) + torch.arange(T, device=q.device)  # [B, T]
        positions = positions[:, :, None] if time_before_heads else positions[:, None, :]
        if time_before_heads:  # rotate() wants time next to the last dim
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            positions = positions.transpose(1, 2)
        q = rotate_modulo(q, positions, self.period, self.max_period, self.interleave)
        k = rotate_modulo(k, positions, self.period, self.max_period, self.interleave)
        if time_before_heads:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return q, k

"""The depformer's per-step products as plain matrix products, for training Moshi.

Moshi's depformer (the small transformer over one frame's codebooks) trains on B x T sequences of
K steps (K = dep_q, Moshi 7B: 8) with one set of weights per step (`depformer_weights_per_step`):
moshi's `apply_weights_per_step` gives step k's Linear the slice x[:, k:k+1] of x [B T, K, D].
That slice is strided (rows K D apart), and torch runs a product on it as a batched product of
B T one-row matrices instead of one [B T, D] x [D, D'] product: at Moshi 7B on one H200 that was 69 %
of a training step's GPU time (issue #24's profile). Here every Linear of the depformer, and every
feed-forward gating (whose products call F.linear on the weights, not the Linear modules), copies
its input to contiguous memory first: the same product on the same numbers, one matrix product.
Weights, parameters and checkpoint keys stay the same objects (the Linear's class changes, not
its state); streaming (one contiguous step at a time) is unchanged.

Usage:
    import depformer_steps
    depformer_steps.apply_contiguous_steps(model)   # a moshi LMModel; no-op without a depformer
    loss = ...                                      # train as before

Call it after wrapping layers in LoRA (moshi's LoRALinear holds Linears, which it then reaches);
calling it again is a no-op. Only torch and moshi's models are used: copy this file alone.
"""
import torch
from moshi.modules.gating import ActivationGating
from torch import nn
from torch.nn import functional as F


class ContiguousLinear(nn.Linear):
    """nn.Linear that makes its input contiguous before the product (a no-op when it already is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.contiguous(), self.weight, self.bias)


class ContiguousGating(ActivationGating):
    """moshi's ActivationGating that makes its input contiguous before its first product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous())


def apply_contiguous_steps(model: nn.Module) -> nn.Module:
    """Every nn.Linear under `model.depformer` (and under a LoRA there) becomes a ContiguousLinear,
    every ActivationGating a ContiguousGating, in place; returns the model."""
    depformer = getattr(model, "depformer", None)
    for module in depformer.modules() if depformer is not None else []:
        if type(module) is nn.Linear:
            module.__class__ = ContiguousLinear
        elif type(module) is ActivationGating:
            module.__class__ = ContiguousGating
    return model

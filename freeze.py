"""Freeze policies for extending a pretrained Moshi model with In-Place TTT.

Which parameters train is decided by module identity (the TTTGating type, the transformer layer
that holds one), never by substrings of parameter names: a name filter once left the fast-weight
base frozen by accident and dropped half the TTT state from saved adapters.

- `ttt_only`:   only what TTT added trains (each TTTGating's conv and W_target); every base
                weight, the fast-weight initial value `linear_out` included, stays bit-identical.
- `ttt_layers`: whole transformer layers that contain TTT train (attention, norms, MLP, TTT).
- `full`:       everything trains.

Usage:
    import ttt, freeze
    ttt.apply_ttt(model, layers=[0, 2], chunk_size=256, eta=0.3)
    summary = freeze.apply_freeze(model, "ttt_only")
    print(freeze.format_summary(summary))
"""
import torch
from torch import nn

from ttt import TTTGating

MODES = ("ttt_only", "ttt_layers", "full")


def ttt_modules(model: nn.Module) -> list[TTTGating]:
    return [m for m in model.modules() if isinstance(m, TTTGating)]


def ttt_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers (modules with a `gating` child) whose MLP is a TTTGating."""
    return [m for m in model.modules() if isinstance(getattr(m, "gating", None), TTTGating)]


def trainable_parameters(model: nn.Module, mode: str) -> set[int]:
    """ids of the parameters that train under `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown freeze mode {mode!r}, expected one of {MODES}")
    if mode == "full":
        return {id(p) for p in model.parameters()}
    if mode == "ttt_layers":
        return {id(p) for layer in ttt_layers(model) for p in layer.parameters()}
    return {id(p) for m in ttt_modules(model) for p in m.ttt_parameters()}


def apply_freeze(model: nn.Module, mode: str) -> dict:
    """Sets requires_grad for `mode` and returns a summary: trainable / total counts, overall and
    per group (`ttt`: conv + W_target, `ttt_layers`: the rest of the layers holding TTT,
    `other`: everything else)."""
    if not ttt_modules(model):
        raise ValueError("apply_freeze found no TTT module: call ttt.apply_ttt first")
    trainable = trainable_parameters(model, mode)
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    ttt_ids = {id(p) for m in ttt_modules(model) for p in m.ttt_parameters()}
    layer_ids = {id(p) for layer in ttt_layers(model) for p in layer.parameters()} - ttt_ids
    groups = {"ttt": [0, 0], "ttt_layers": [0, 0], "other": [0, 0]}
    for p in model.parameters():
        group = "ttt" if id(p) in ttt_ids else "ttt_layers" if id(p) in layer_ids else "other"
        groups[group][1] += p.numel()
        if p.requires_grad:
            groups[group][0] += p.numel()
    total = sum(t for _, t in groups.values())
    n_trainable = sum(n for n, _ in groups.values())
    return dict(mode=mode, trainable=n_trainable, total=total,
                groups={k: dict(trainable=n, total=t) for k, (n, t) in groups.items()})


def format_summary(summary: dict) -> str:
    """Trainable / total counts and share, per group, one line each."""
    lines = [f"freeze mode {summary['mode']}: {summary['trainable']:,} / {summary['total']:,} "
             f"parameters train ({100 * summary['trainable'] / summary['total']:.2f}%)"]
    for name, g in summary["groups"].items():
        share = 100 * g["trainable"] / g["total"] if g["total"] else 0.0
        lines.append(f"  {name:<11} {g['trainable']:>12,} / {g['total']:>12,} ({share:.2f}%)")
    return "\n".join(lines)

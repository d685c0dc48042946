"""Freeze policies for extending a pretrained Moshi model with In-Place TTT.

Which parameters train is decided by the modules (a TTT module, known by its `ttt_parameters()`;
the transformer layer that holds one; moshi's LoRALinear), never by substrings of parameter names:
a name filter once left the fast-weight base frozen by accident and dropped half the TTT state
from saved adapters. Only torch and moshi are imported: copy this file alone.

- `ttt_only`:   only what TTT added trains (each TTTGating's conv and W_target); every base
                weight, the fast-weight initial value `linear_out` included, stays bit-identical.
- `ttt_mlp_in`: what `ttt_only` trains plus each TTT module's MLP input projection `linear_in`,
                which makes Z, the fast memory's keys and queries (in `ttt_only` only the values
                V learn); attention, norms, `linear_out` and the embeddings stay frozen.
- `ttt_lora_in`: what `ttt_only` trains plus moshi's LoRA of rank r on each TTT module's
                `linear_in` (`apply_lora(model, r, s, scope="ttt_mlp_in")` first): Z learns, as in
                `ttt_mlp_in`, through r (d + 2h) parameters per TTT layer instead of 2 d h.
- `ttt_layers`: whole transformer layers that contain TTT train (attention, norms, MLP, TTT).
- `full`:       everything trains.
- `lora_ttt`:   moshi's LoRA (`moshi.modules.lora`) on every linear layer of the frozen model,
                as moshi-finetune does (`apply_lora` first), its factors and what TTT added train.

Usage:
    import ttt, freeze
    ttt.apply_ttt(model, layers=[0, 2], chunk_size=256, eta=0.3)
    summary = freeze.apply_freeze(model, "ttt_only")
    print(freeze.format_summary(summary))
"""
import torch
from moshi.modules.lora import LoRALinear, replace_lora_with_linear
from torch import nn

MODES = ("ttt_only", "ttt_mlp_in", "ttt_lora_in", "ttt_layers", "full", "lora_ttt")
# The modes that train a LoRA, and where it goes (apply_lora's scope).
LORA_SCOPES = {"lora_ttt": "model", "ttt_lora_in": "ttt_mlp_in"}


def is_ttt(module: nn.Module) -> bool:
    """A TTT module (ttt.TTTGating) is known by what it offers, `ttt_parameters()`, so that this
    file imports nothing of the project's and copies alone."""
    return callable(getattr(module, "ttt_parameters", None))


def ttt_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if is_ttt(m)]


def ttt_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers (modules with a `gating` child) whose MLP is a TTT module."""
    return [m for m in model.modules() if is_ttt(getattr(m, "gating", None))]


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, rank: int, scaling: float, scope: str = "model") -> nn.Module:
    """Wraps every nn.Linear of the model in moshi's LoRALinear (W + scaling B A), as moshi's
    `get_lora_moshi` does for moshi-finetune: the transformer, `text_linear`, the audio heads and
    the depformer. TTT's W_target is a plain parameter and trains whole. B starts at zero: the
    model is unchanged at first. A TTT layer's linear_out keeps being the fast weight's start,
    LoRA-merged (TTTGating.down_weight). Checkpoint keys of the base weights load into it (moshi
    maps `weight` to `frozen_W.weight`). `scope="transformer"` wraps the transformer alone, as
    checkpoints written before the whole model was wrapped expect; `scope="ttt_mlp_in"` only the
    TTT modules' `linear_in` (freeze mode `ttt_lora_in`)."""
    if rank <= 0 or scaling <= 0:
        raise ValueError(f"LoRA needs rank > 0 and scaling > 0, got {rank}, {scaling}")
    if scope not in ("model", "transformer", "ttt_mlp_in"):
        raise ValueError(f"LoRA scope must be 'model', 'transformer' or 'ttt_mlp_in', got {scope!r}")

    def wrap_linear(module, name, child):
        lora = LoRALinear(child.in_features, child.out_features, rank, scaling,
                          device=child.weight.device, dtype=child.weight.dtype)
        lora.frozen_W = child
        nn.init.zeros_(lora.lora_B.weight)
        setattr(module, name, lora)

    def wrap(module):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                wrap_linear(module, name, child)
            elif not isinstance(child, LoRALinear):
                wrap(child)
    if scope == "ttt_mlp_in":
        if not ttt_modules(model):
            raise ValueError("LoRA scope 'ttt_mlp_in' found no TTT module: call ttt.apply_ttt first")
        for m in ttt_modules(model):
            wrap_linear(m, "linear_in", m.linear_in)
    else:
        wrap(model if scope == "model" else getattr(model, "transformer", model))
    model.lora_settings = dict(rank=int(rank), scaling=float(scaling), scope=scope)
    return model


def fuse_lora(model: nn.Module) -> nn.Module:
    """Folds every LoRA back into a plain weight W + scaling B A (moshi's own function), as
    moshi-finetune does for export; the TTT layers keep their fast-weight behaviour."""
    replace_lora_with_linear(model)
    return model


def trainable_parameters(model: nn.Module, mode: str) -> set[int]:
    """ids of the parameters that train under `mode`."""
    if mode not in MODES:
        raise ValueError(f"unknown freeze mode {mode!r}, expected one of {MODES}")
    if mode == "full":
        return {id(p) for p in model.parameters()}
    if mode == "ttt_layers":
        return {id(p) for layer in ttt_layers(model) for p in layer.parameters()}
    ttt_ids = {id(p) for m in ttt_modules(model) for p in m.ttt_parameters()}
    if mode in LORA_SCOPES:
        if not lora_modules(model):
            raise ValueError(f"freeze mode {mode} found no LoRA layer: call apply_lora first")
        scope = getattr(model, "lora_settings", {}).get("scope")
        if (scope == "ttt_mlp_in") != (mode == "ttt_lora_in"):
            raise ValueError(f"freeze mode {mode} trains a LoRA on {LORA_SCOPES[mode]}, the model's is on {scope}")
        return ttt_ids | {id(p) for m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)}
    if mode == "ttt_mlp_in":  # Z = act(gate) * up, with gate and up from linear_in
        return ttt_ids | {id(p) for m in ttt_modules(model) for p in m.linear_in.parameters()}
    return ttt_ids


def apply_freeze(model: nn.Module, mode: str) -> dict:
    """Sets requires_grad for `mode` and returns a summary: trainable / total counts, overall and
    per group (`ttt`: conv + W_target, `ttt_layers`: the rest of the layers holding TTT, where
    `ttt_mlp_in`'s linear_in counts, `other`: everything else)."""
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


def upcast_trainable(model: nn.Module) -> nn.Module:
    """Parameters that train become float32 master weights; frozen ones stay as loaded (bf16 for
    a Moshi checkpoint: 15 GB instead of 31 for Moshi 7B). Run under bf16 autocast, whose products
    read both; AdamW then updates float32 weights, as moshi-finetune's mixed precision does."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def format_summary(summary: dict) -> str:
    """Trainable / total counts and share, per group, one line each."""
    lines = [f"freeze mode {summary['mode']}: {summary['trainable']:,} / {summary['total']:,} "
             f"parameters train ({100 * summary['trainable'] / summary['total']:.2f}%)"]
    for name, g in summary["groups"].items():
        share = 100 * g["trainable"] / g["total"] if g["total"] else 0.0
        lines.append(f"  {name:<11} {g['trainable']:>12,} / {g['total']:>12,} ({share:.2f}%)")
    return "\n".join(lines)

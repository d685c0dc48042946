"""The small Moshi model these experiments train, and checkpoints that carry their settings.

The model is moshi's own `LMModel` in its text-only form (no audio codebooks, no depformer,
`forward_text`), over bytes (vocabulary 256), with Moshi 7B's choices: RMSNorm in float32,
interleaved RoPE with max_period 10000, SiLU gating with hidden_scale 4.125, causal attention
with a finite `context`. A checkpoint holds the weights and a `settings` dict (model shape,
YaRN, TTT, modulo RoPE, attention window, freeze mode); `install` re-applies YaRN and TTT from
it, so evaluation needs no flags repeated. Checkpoints are written atomically and read with
`torch.load(weights_only=True)` only.
"""
import os
import typing as tp

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi: compilation dominates small runs

import torch
from torch import nn
from moshi.models.lm import LMModel

import freeze
import rope_modulo
import ttt
import yarn

VOCAB = 256
PRESETS = {  # dim, heads, layers: "cpu" trains in minutes on 2 cores, "gpu" is ~25 M parameters
    "cpu": dict(dim=128, num_heads=4, num_layers=4),
    "gpu": dict(dim=512, num_heads=8, num_layers=8),
}


def build_model(model_settings: dict, device: tp.Union[str, torch.device] = "cpu") -> LMModel:
    """A text-only moshi LMModel over bytes. model_settings: dim, num_heads, num_layers, context."""
    s = model_settings
    lm = LMModel(delays=[0], n_q=0, dep_q=0, text_card=VOCAB, dim=s["dim"],
                 num_heads=s["num_heads"], num_layers=s["num_layers"],
                 hidden_scale=s.get("hidden_scale", 4.125), norm="rms_norm_f32",
                 positional_embedding="rope", max_period=s.get("max_period", 10_000.0),
                 gating="silu", context=s["context"], causal=True, device=device)
    lm.depformer_in = nn.ModuleList()  # built even without a depformer; unused weights stall DDP
    return lm


def set_context(model: LMModel, context: tp.Optional[int]) -> None:
    """Sets every attention's window (None: full attention)."""
    for layer in model.transformer.layers:
        layer.self_attn.context = context


def install(model: LMModel, settings: dict) -> LMModel:
    """Applies YaRN, TTT (with modulo RoPE) and the attention window that `settings` describe."""
    if settings.get("yarn"):
        y = dict(settings["yarn"])
        yarn.apply_yarn(model, y.pop("scale"), y.pop("original_len"), **y)
    if settings.get("window"):
        set_context(model, settings["window"])
    if settings.get("ttt"):
        t = dict(settings["ttt"])
        ttt.apply_ttt(model, t.pop("layers"), t.pop("chunk_size"), t.pop("eta"), **t)
        if settings.get("ttt_rope_modulo"):
            period = settings["ttt"]["chunk_size"]
            for m in model.modules():
                if isinstance(m, ttt.TTTGating):
                    m.z_transform = lambda Z, positions: rope_modulo.rotate_modulo(Z, positions, period)
    if settings.get("lora"):
        freeze.apply_lora(model, settings["lora"]["rank"], settings["lora"]["scaling"])
    return model


def logits(model: LMModel, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] long -> next-byte logits [B, T, 256] float32."""
    return model.forward_text(tokens[:, None])[1][:, 0].float()


def save_checkpoint(path: str, checkpoint: dict) -> None:
    """Writes atomically: a temporary file in the same folder, flushed, then renamed, so a kill
    at any moment leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp"
    for stale in os.listdir(folder):  # left by a process killed while writing
        if stale.startswith(prefix):
            os.remove(os.path.join(folder, stale))
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    """Reads a checkpoint with weights_only=True; ValueError (one line) if it is not one of ours."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or refusing to unpickle code
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "settings" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'model' and 'settings')")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, device="cpu", path: str = "checkpoint") -> LMModel:
    """Rebuilds the model a checkpoint describes (shape, YaRN, TTT, LoRA, window) and loads its
    weights. An adapter (`adapter_of` set: only the trained parameters) loads on top of the base
    checkpoint it names."""
    settings = checkpoint["settings"]
    adapter_of = checkpoint.get("adapter_of")
    try:
        if adapter_of:  # relative to the adapter's own folder
            adapter_of = os.path.join(os.path.dirname(os.path.abspath(path)), adapter_of)
            base = load_checkpoint(adapter_of)
            model = install(model_from_checkpoint(base, "cpu", adapter_of), settings)
            missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
            if unexpected:
                raise ValueError(f"adapter parameters not in the model: {unexpected[:3]}")
        else:
            model = install(build_model(settings["model"]), settings)
            model.load_state_dict(checkpoint["model"], strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} does not match the model it describes: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return model.to(device)


def save_adapter(path: str, model: LMModel, settings: dict, base_path: str) -> None:
    """Only the parameters that train (every one with requires_grad), the settings, and the path
    of the base checkpoint they go on top of."""
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    base = os.path.relpath(os.path.abspath(base_path), os.path.dirname(os.path.abspath(path)))
    save_checkpoint(path, dict(model=trained, settings=settings, adapter_of=base))

"""The small Moshi model these experiments train, and checkpoints that carry their settings.

The model is moshi's own `LMModel` in its text-only form (no audio codebooks, no depformer,
`forward_text`), over bytes (vocabulary 256), with Moshi 7B's choices: RMSNorm in float32,
interleaved RoPE with max_period 10000, SiLU gating with hidden_scale 4.125, causal attention
with a finite `context`. A checkpoint holds the weights and a `settings` dict (model shape,
YaRN, TTT, modulo RoPE, attention window, freeze mode); `install` re-applies YaRN and TTT from
it, so evaluation needs no flags repeated. Checkpoints are written atomically and read with
`torch.load(weights_only=True)` only.
"""
import abc
import contextlib
import copy
import json
import os
import typing as tp

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi: compilation dominates small runs

import torch
import torch.nn.functional as F
from torch import nn
from moshi.models.lm import LMModel

import freeze
import rope_modulo
import ttt
import yarn

VOCAB = 256
PRESETS = {  # dim, heads, layers: "cpu" trains in minutes on 2 cores, "gpu" is ~25 M parameters;
    # "head128" is "gpu" with Moshi 7B's head dim (128), so YaRN splits the RoPE pairs as for Moshi
    "cpu": dict(dim=128, num_heads=4, num_layers=4),
    "gpu": dict(dim=512, num_heads=8, num_layers=8),
    "head128": dict(dim=512, num_heads=4, num_layers=8),
}


def build_model(model_settings: dict, device: tp.Union[str, torch.device] = "cpu") -> LMModel:
    """A text-only moshi LMModel over bytes (model_settings: dim, num_heads, num_layers, context),
    or, when model_settings holds `lm_kwargs`, the Moshi-format model they describe."""
    s = model_settings
    if "lm_kwargs" in s:  # through moshi's loader, which renames and drops what older configs hold
        from moshi.models import loaders
        return loaders.get_moshi_lm(None, lm_kwargs=dict(s["lm_kwargs"]), device=device, dtype=torch.float32).train()
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
            rope_modulo.apply_rope_modulo(model, settings["ttt"]["chunk_size"])
    if settings.get("lora"):
        lora = settings["lora"]  # checkpoints from before the whole model was wrapped: the transformer
        freeze.apply_lora(model, lora["rank"], lora["scaling"], lora.get("scope", "transformer"))
    return model


def checkpoint_dtype(weights: str) -> torch.dtype:
    """The floating dtype a safetensors file stores (Moshi ships bf16), read from its header."""
    from safetensors import safe_open
    names = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(weights, "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()} & set(names)
    return names[sorted(dtypes)[0]] if len(dtypes) == 1 else torch.float32


def load_moshi(weights: str, config: str) -> tuple[LMModel, dict]:
    """A Moshi-format model (safetensors weights plus the json of its LMModel arguments, bare or
    under "lm_kwargs") through moshi's own loader, in the dtype it is stored in (bf16 for Moshi's
    checkpoints; float32 where the file mixes dtypes). Returns (model, model settings)."""
    from moshi.models import loaders  # here: only Moshi-format inits need it
    try:
        with open(config) as f:
            lm_kwargs = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the model config {config}: {e}") from None
    lm_kwargs = lm_kwargs.get("lm_kwargs", lm_kwargs) if isinstance(lm_kwargs, dict) else None
    if not isinstance(lm_kwargs, dict) or "dim" not in lm_kwargs:
        raise ValueError(f"{config} does not hold LMModel arguments (no 'dim')")
    for unsupported in ("conditioners", "fuser", "quantize", "lora"):
        if lm_kwargs.get(unsupported):
            raise ValueError(f"{config}: models with {unsupported!r} are not supported")
    if not os.path.isfile(weights):
        raise ValueError(f"model weights {weights} do not exist or are not a file")
    try:
        model = loaders.get_moshi_lm(weights, lm_kwargs=dict(lm_kwargs), device="cpu", dtype=checkpoint_dtype(weights))
    except Exception as e:  # moshi's loader raises what safetensors or load_state_dict raise
        raise ValueError(f"cannot load {weights} with {config}: {str(e).splitlines()[0][:200]}") from None
    return model.train(), dict(lm_kwargs=lm_kwargs, context=lm_kwargs.get("context"))


def multistream_loss(model: LMModel, codes: torch.Tensor, text_padding_weight: float = 0.5,
                     first_codebook_weight: float = 1.0) -> torch.Tensor:
    """moshi-finetune's loss (`finetune/loss.py`, `compute_loss_with_mask`, as its train.py calls
    it) over `LMModel.forward`, codes [B, K, T]: the text cross-entropy, where the padding and
    end-of-padding tokens weigh `text_padding_weight`, plus the audio cross-entropy, where the
    first codebook weighs `first_codebook_weight` (moshi-finetune: default 1, 100 in its 7B
    example); each a mean weighted by the valid positions."""
    with autocast_for(model):
        out = model(codes)
    text = codes[:, :model.audio_offset]  # [B, 1, T]
    weights = out.text_mask.float()
    padding = (text == model.text_padding_token_id) | (text == model.end_of_text_padding_id)
    loss = _weighted_cross_entropy(out.text_logits, text, torch.where(padding, weights * text_padding_weight, weights))
    if model.dep_q > 0:
        audio = codes[:, model.audio_offset:model.audio_offset + model.dep_q]  # [B, dep_q, T]
        weights = out.mask.float()
        weights[:, 0] *= first_codebook_weight
        loss = loss + _weighted_cross_entropy(out.logits, audio, weights)
    return loss


def _weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum(weights * CE) / sum(weights); logits [B, K, T, V], target and weights [B, K, T]. Masked
    positions (weight 0) may hold logits that are NaN and targets that are no token."""
    target = torch.where(weights > 0, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.flatten(0, 2).float(), target.flatten(), reduction="none")
    return torch.where(weights.flatten() > 0, ce * weights.flatten(), 0.0).sum() / weights.sum()


class Objective(nn.Module):
    """train.py's loss of a micro-batch, inside `forward` so that DDP sees it: next-byte cross-entropy
    with the passkey answer digits weighing `answer_weight`, or moshi-finetune's loss on token
    streams ([B, K, T] batches)."""

    def __init__(self, lm: LMModel, answer_weight: float, loss_weights: dict):
        super().__init__()
        self.lm, self.answer_weight, self.loss_weights = lm, answer_weight, loss_weights

    def forward(self, batch: torch.Tensor, is_answer: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        if batch.dim() == 3:
            return multistream_loss(self.lm, batch, **self.loss_weights)
        out = logits(self.lm, batch[:, :-1])
        losses = F.cross_entropy(out.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        # dividing by the token count (not the weights' sum) keeps the DDP mean equal to one process's
        weights = 1 + (self.answer_weight - 1) * is_answer.flatten().float()
        return (losses * weights).sum() / losses.numel()


def gpu_shortfall(model: nn.Module, device: torch.device, shards: int = 1) -> tp.Optional[str]:
    """Why the weights and optimizer state cannot fit this GPU, or None: float32 weights, gradients
    and AdamW's two moments (16 bytes) for each trained number, the stored dtype for the rest, split
    over `shards` processes by FSDP, but the whole model (trained weights in float32) before that."""
    if device.type != "cuda":
        return None
    whole = sum((4 if p.requires_grad else p.element_size()) * p.numel() for p in model.parameters())
    state = sum((16 if p.requires_grad else p.element_size()) * p.numel() for p in model.parameters()) / shards
    have = torch.cuda.get_device_properties(device).total_memory
    if max(whole, state) <= have:
        return None
    return (f"{max(whole, state) / 2 ** 30:.0f} GiB per GPU for weights and optimizer state alone, more than "
            f"this GPU's {have / 2 ** 30:.0f} GiB")


def low_precision(model: nn.Module) -> bool:
    """Whether some weights are stored in bf16 or float16 (a Moshi checkpoint's frozen ones)."""
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())


def autocast_for(model: nn.Module):
    """bf16 autocast where some weights are stored in bf16 (frozen ones, next to float32 trained
    ones: see freeze.upcast_trainable), so every product reads both; else nothing."""
    if low_precision(model):
        return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits(model: LMModel, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] long -> next-byte logits [B, T, 256] float32."""
    with autocast_for(model):
        return model.forward_text(tokens[:, None])[1][:, 0].float()


def shard(model: LMModel, bf16: bool, multistream: bool) -> LMModel:
    """FSDP2 (PyTorch's `fully_shard`): parameters, gradients and AdamW state split across the
    processes. Each transformer layer (the depformer's too) is one group, gathered just before it
    runs; the rest of the model is one more. `bf16`: gathered in bf16 (frozen bf16 weights next
    to float32 trained ones), gradients reduced in float32. A float32 model gathers in float32:
    bf16 gathers put its residual stream in bf16, 0.14 of the update away from one GPU after 10
    steps (results/fsdp_h100x2.log) against a run-to-run spread of 3e-4.
    `multistream`: the model is called through `forward` (moshi's loss on token streams), else
    through `forward_text`, which FSDP must then be told about. Not both: `forward` calls
    `forward_text`, and the root's hooks run nested inside themselves then; on CUDA the first
    backward of Moshi's 7B (and of a small model of its shape) failed with "setStorage: ... storage
    of size 0" on the depformer's output heads (results/fsdp_scale_small7b_h100x2.log)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    groups = list(model.transformer.layers) + (list(model.depformer.layers) if model.depformer else [])
    for module in groups + [model]:
        _fsdp_class_for(type(module))
        fully_shard(module, mp_policy=policy)
    if not multistream:
        register_fsdp_forward_method(model, "forward_text")  # the text path's entry point
    return model


def _fsdp_class_for(cls: type) -> None:
    """fully_shard swaps a module's class for one with bases (FSDPModule, cls). moshi's modules have
    abc.ABC first among their bases, and Python refuses that swap ("object layout differs"), so
    FSDP2 is handed the class with the bases the other way round, FSDP's own `_apply` (which keeps
    the sharded parameters when a module is moved or cast) put first by hand."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fully_shard
    cache = _fully_shard.get_cls_to_fsdp_cls()
    if cls not in cache and issubclass(cls, abc.ABC):
        cache[cls] = type(f"FSDP{cls.__name__}", (cls, FSDPModule),
                          {"_apply": FSDPModule._apply, "__deepcopy__": _fully_shard._unimplemented_deepcopy})


def full_state(model: nn.Module, optimizer=None, sharded: bool = False) -> tuple[dict, tp.Optional[dict]]:
    """The model's (and optimizer's) whole state for a checkpoint; gathered onto rank 0 from every
    process when the model is sharded (then every process must call it)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=options),
            get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None)


def load_optimizer_state(model: nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Loads what full_state saved (a sharded run's optimizer state is keyed by parameter name)."""
    if not sharded:
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_json(path: str, obj) -> None:
    """Writes `obj` as JSON atomically (a temporary file, then renamed): a kill leaves the old file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


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


def match_dtypes(model: nn.Module, state: dict) -> None:
    """Gives each parameter the dtype it has in `state` (bf16 frozen weights and float32 trained
    ones stay so through a save and a load; load_state_dict alone would cast to the model's)."""
    for name, p in model.named_parameters():
        value = state.get(name)
        if value is not None and value.is_floating_point() and value.dtype != p.dtype:
            p.data = p.data.to(value.dtype)


def model_from_checkpoint(checkpoint: dict, device="cpu", path: str = "checkpoint") -> LMModel:
    """Rebuilds the model a checkpoint describes (shape, YaRN, TTT, LoRA, window) and loads its
    weights. An adapter (`adapter_of` set: only the trained parameters) loads on top of the base
    checkpoint it names."""
    settings = checkpoint["settings"]
    adapter_of = checkpoint.get("adapter_of")
    try:
        if adapter_of:  # paths relative to the adapter's own folder
            here = os.path.dirname(os.path.abspath(path))
            adapter_of = os.path.join(here, adapter_of)
            if settings.get("base_config"):  # a Moshi-format base
                model = load_moshi(adapter_of, os.path.join(here, settings["base_config"]))[0]
            else:
                model = model_from_checkpoint(load_checkpoint(adapter_of), "cpu", adapter_of)
            model = install(model, settings)
            match_dtypes(model, checkpoint["model"])
            missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
            if unexpected:
                raise ValueError(f"adapter parameters not in the model: {unexpected[:3]}")
        else:
            model = install(build_model(settings["model"]), settings)
            match_dtypes(model, checkpoint["model"])
            model.load_state_dict(checkpoint["model"], strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} does not match the model it describes: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return model.to(device)


def new_settings(model_settings: dict, original_len: int, base_path: str, **extra) -> dict:
    """The settings of a model nothing has been applied to yet (trained at `original_len`)."""
    return dict(model=model_settings, original_len=original_len, trained_len=original_len, yarn=None,
                ttt=None, ttt_rope_modulo=False, window=None, mode="full", base_path=base_path, **extra)


def starting_point(init: tp.Optional[str], init_config: tp.Optional[str]):
    """What train.py extends: `init` (a checkpoint of ours, or a Moshi-format .safetensors with its
    json `init_config`). Returns (model, settings, None), or (None, None, None) without `init` (a new
    model is pretrained). Its L0 is the checkpoint's own, or for a Moshi model its `context` (train.py
    `settle` may replace that one with --original-len). ValueError, one line, on anything unreadable."""
    if init and init.endswith(".safetensors"):
        model, model_settings = load_moshi(init, init_config)
        return model, new_settings(model_settings, model_settings.get("context") or 0, init,
                                   base_config=init_config), None
    if init:
        checkpoint = load_checkpoint(init)
        return model_from_checkpoint(checkpoint, "cpu", init), dict(copy.deepcopy(checkpoint["settings"]),
                                                                    base_path=init), None
    return None, None, None


def check_writable(path: str, folder: bool) -> None:
    """That `path` (a folder, or a file's path) can be written, without creating anything: it is of
    its kind where it exists, and its nearest existing parent is a writable folder. ValueError, one
    line, naming the path."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            raise ValueError(f"{path} is not a folder: cannot write the run there")
        if not folder and os.path.isdir(path):
            raise ValueError(f"{path} is a folder: cannot write a file there")
        if not os.access(path if folder else os.path.dirname(path), os.W_OK):
            raise ValueError(f"{path} is not writable")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ValueError(f"cannot create {path}: {parent} is not a writable folder")


def check_resumable(checkpoint: dict, path: str) -> None:
    """The fields --resume reads, checked before any work: ValueError naming the first bad one."""
    stages = checkpoint.get("stages")
    if not (isinstance(stages, list) and stages and all(
            isinstance(s, dict) and s.get("kind") in ("pretrain", "extend") and isinstance(s.get("length"), int)
            and s["length"] > 0 and isinstance(s.get("scale"), float) and s["scale"] >= 1 for s in stages)):
        raise ValueError(f"{path} cannot be resumed: no valid 'stages' (is it a base or final checkpoint?)")
    stage, step = checkpoint.get("stage"), checkpoint.get("step")
    if not (isinstance(stage, int) and 0 <= stage <= len(stages)):
        raise ValueError(f"{path} cannot be resumed: 'stage' is {stage!r}, expected 0..{len(stages)}")
    if not (isinstance(step, int) and step >= 0 and isinstance(checkpoint.get("optimizer"), dict)):
        raise ValueError(f"{path} cannot be resumed: bad 'step' ({step!r}) or 'optimizer'")


def save_adapter(path: str, model: LMModel, settings: dict, base_path: str) -> None:
    """Only the parameters that train (every one with requires_grad), the settings, and the path
    of the base checkpoint they go on top of."""
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    relative = lambda p: os.path.relpath(os.path.abspath(p), os.path.dirname(os.path.abspath(path)))
    if settings.get("base_config"):
        settings = dict(settings, base_config=relative(settings["base_config"]))
    save_checkpoint(path, dict(model=trained, settings=settings, adapter_of=relative(base_path)))

"""Checkpoints of train.py: written atomically, read safely, rebuilt into the model they describe.

A checkpoint is a dict: `model` (the state dict), `settings` (what model.install re-applies: the
shape, YaRN, TTT, modulo RoPE, LoRA, the window), `config` (the run's configuration, config.Config,
whole) and, inside a run, `stages`, `stage`, `step` and `optimizer` for --resume. An adapter holds
only the trained parameters, the path of the base it goes on and a fingerprint of that base's
weights (a base of other weights at that path is refused). Files are written to a temporary
name and renamed, so a kill leaves the previous file; they are read with weights_only=True.

    checkpoint = checkpoints.load_checkpoint("out/ckpt.pt")
    model = checkpoints.model_from_checkpoint(checkpoint, "cuda", "out/ckpt.pt")
"""
import copy
import hashlib
import json
import os
import typing as tp

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi loads: compiling dominates small runs

import torch
from moshi.models.lm import LMModel
from torch import nn

import model as M


def save_json(path: str, obj) -> None:
    """Writes `obj` as JSON atomically (a temporary file, then renamed): a kill leaves the old file.
    Its folder is made if missing (check_writable allows a path below folders still to be made)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
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
    """Reads a checkpoint with weights_only=True; ValueError (one line) if it is not one of ours.
    Its tensors are mapped from the file, not read (mmap): what only needs the settings (train.py's
    refusal of a flag an --init contradicts) comes before a 7B checkpoint's 15 GB are read."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, or refusing to unpickle code
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "settings" not in checkpoint:
        raise ValueError(f"{path} is not a checkpoint of this project (no 'model' and 'settings')")
    return checkpoint


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
            if settings.get("base_config"):  # a Moshi-format base, then what the run installed on it
                model = M.install(M.load_moshi(adapter_of, os.path.join(here, settings["base_config"]))[0], settings)
            else:  # the run's model, with the weights of its base (which may hold TTT or LoRA already)
                base = load_checkpoint(adapter_of)  # its weights as stored; an adapter's rebuilt on its own base
                base = (model_from_checkpoint(base, "cpu", adapter_of).state_dict() if base.get("adapter_of")
                        else base["model"])
                model = M.install(M.build_model(settings["model"]), settings)
                match_dtypes(model, base)
                missing, unexpected = model.load_state_dict(base, strict=False)
                if unexpected or set(missing) - set(checkpoint["model"]):
                    raise ValueError(f"base and adapter do not make the model: {unexpected[:3]}, "
                                     f"{sorted(set(missing) - set(checkpoint['model']))[:3]}")
            match_dtypes(model, checkpoint["model"])
            missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
            if unexpected:
                raise ValueError(f"adapter parameters not in the model: {unexpected[:3]}")
            fingerprint = checkpoint.get("base_fingerprint")  # absent in adapters written before it
            if fingerprint and base_fingerprint(model, set(checkpoint["model"])) != fingerprint:
                raise ValueError(f"the base at {adapter_of} is not the one this adapter was trained on "
                                 f"(its weights differ; was another run written there?)")
        else:
            model = M.install(M.build_model(settings["model"]), settings)
            match_dtypes(model, checkpoint["model"])
            model.load_state_dict(checkpoint["model"], strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} does not match the model it describes: "
                         f"{str(e).splitlines()[0][:200]}") from None
    return model.to(device)


def match_dtypes(model: nn.Module, state: dict) -> None:
    """Gives each parameter the dtype it has in `state` (bf16 frozen weights and float32 trained
    ones stay so through a save and a load; load_state_dict alone would cast to the model's)."""
    for name, p in model.named_parameters():
        value = state.get(name)
        if value is not None and value.is_floating_point() and value.dtype != p.dtype:
            p.data = p.data.to(value.dtype)


def starting_settings(init: tp.Optional[str], init_config: tp.Optional[str]) -> tuple[tp.Optional[dict], tp.Optional[dict]]:
    """The settings of what train.py extends, read before any model is built: `init` (a checkpoint
    of ours, or a Moshi-format .safetensors with its json `init_config`, whose weights are not read
    here). Returns (settings, our checkpoint or None), or (None, None) without `init` (a new model is
    pretrained). Its L0 is the checkpoint's own, or for a Moshi model its `context` (train.py
    `settle` may replace that one with --original-len). ValueError, one line, on anything unreadable."""
    if init and init.endswith(".safetensors"):
        model_settings = M.moshi_settings(init_config)
        return M.new_settings(model_settings, model_settings["context"] or 0, init, base_config=init_config), None
    if init:  # this checkpoint is the new run's base: a Moshi-format base_config no longer describes it
        checkpoint = load_checkpoint(init)
        if checkpoint.get("step"):  # saved inside a stage (--save-every): its settings name a stage not done
            raise ValueError(f"{init} was saved inside stage {checkpoint.get('stage')} at step {checkpoint['step']}: "
                             f"--resume its run to finish that stage, or --init a checkpoint saved at a stage's end")
        settings = {k: v for k, v in copy.deepcopy(checkpoint["settings"]).items() if k != "base_config"}
        return dict(settings, base_path=init), checkpoint
    return None, None


def starting_model(init: str, init_config: tp.Optional[str], checkpoint: tp.Optional[dict]) -> LMModel:
    """The model starting_settings read the settings of, its weights loaded (on the CPU)."""
    if checkpoint is None:  # Moshi-format
        return M.load_moshi(init, init_config)[0]
    return model_from_checkpoint(checkpoint, "cpu", init)


def trained_len(settings: dict) -> int:
    """The longest length a checkpoint's weights have trained at (a base: its L0)."""
    return settings.get("trained_len") or settings["original_len"]


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
    """Only the parameters that train (every one with requires_grad), the settings, the path of the
    base checkpoint they go on top of, and the fingerprint of the rest (the base's weights)."""
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    relative = lambda p: os.path.relpath(os.path.abspath(p), os.path.dirname(os.path.abspath(path)))
    if settings.get("base_config"):
        settings = dict(settings, base_config=relative(settings["base_config"]))
    save_checkpoint(path, dict(model=trained, settings=settings, adapter_of=relative(base_path),
                               base_fingerprint=base_fingerprint(model, set(trained))))


def base_fingerprint(model: nn.Module, trained: set) -> str:
    """A hash of every parameter not in `trained`, by name, on at most 1024 values each, evenly spaced over it:
    the frozen weights an adapter goes on, which training leaves as the base had them. Cheap at 7B."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name not in trained:
            flat = p.detach().reshape(-1)
            h.update(name.encode() + flat[::-(-flat.numel() // 1024)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


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

"""The small Moshi model these experiments train: building it, installing YaRN and TTT, the loss.

The model is moshi's own `LMModel` in its text-only form (no audio codebooks, no depformer,
`forward_text`), over bytes (vocabulary 256), with Moshi 7B's choices: RMSNorm in float32,
interleaved RoPE with max_period 10000, SiLU gating with hidden_scale 4.125, causal attention
with a finite `context`; or a Moshi-format model through moshi's own loader. A model's `settings`
(shape, YaRN, TTT, modulo RoPE, LoRA, attention window, freeze mode) travel in its checkpoints
(checkpoints.py); `install` re-applies them, so evaluation needs no flags repeated.
"""
import abc
import contextlib
import functools
import json
import os
import re
import typing as tp

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi: compilation dominates small runs

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
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
    """Sets the window of every attention of the main transformer (None: full attention). Not moshi's
    `set_attention_context`, which sets every attention of the model, the depformer's own window
    (8 steps in Moshi 7B) included."""
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


def moshi_settings(config: str) -> dict:
    """A Moshi-format model's settings from its json of LMModel arguments (bare or under
    "lm_kwargs"), checked: read before any weight, so a run's flags can be checked against them."""
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
    return dict(lm_kwargs=lm_kwargs, context=lm_kwargs.get("context"))


def load_moshi(weights: str, config: str) -> tuple[LMModel, dict]:
    """A Moshi-format model (safetensors weights plus the json of its LMModel arguments, bare or
    under "lm_kwargs") through moshi's own loader, in the dtype it is stored in (bf16 for Moshi's
    checkpoints; float32 where the file mixes dtypes). Returns (model, model settings)."""
    from moshi.models import loaders  # here: only Moshi-format inits need it
    model_settings = moshi_settings(config)
    if not os.path.isfile(weights):
        raise ValueError(f"model weights {weights} do not exist or are not a file")
    try:
        model = loaders.get_moshi_lm(weights, lm_kwargs=dict(model_settings["lm_kwargs"]), device="cpu",
                                     dtype=checkpoint_dtype(weights))
    except Exception as e:  # moshi's loader raises what safetensors or load_state_dict raise
        raise ValueError(f"cannot load {weights} with {config}: {str(e).splitlines()[0][:200]}") from None
    return model.train(), model_settings


def num_layers(model_settings: dict) -> int:
    """The transformer's layers in the model `model_settings` describe (ours or Moshi-format)."""
    return (model_settings["lm_kwargs"] if "lm_kwargs" in model_settings else model_settings)["num_layers"]


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


def check_device(name: str) -> None:
    """That `name` is a device this project runs on (cpu, cuda, cuda:N with N a GPU here): ValueError,
    one line, otherwise."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} but CUDA is not available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1}")


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


# What gradient checkpointing recomputes in the backward: nothing, the depformer, both transformers,
# or (a number N, as a string) the depformer and the transformer's first N layers.
CHECKPOINTING = ("none", "depformer", "all")


def set_checkpointing(model: LMModel, what: str) -> None:
    """--grad-checkpointing: what recomputes its activations in the backward instead of keeping them.
    The depformer runs over B x T sequences of a few steps each: its activations are large for its
    arithmetic, so it is the first to recompute (results/training_7b). moshi's transformers have one
    switch for all their layers (`checkpointing`); the first N layers alone recompute as that switch
    recomputes each one, non-reentrant and without the RNG state: their `forward` is wrapped in
    PyTorch's checkpoint, so parameter names, checkpoints and FSDP2's hooks (which gather a layer's
    weights again before its backward, and so before the recomputation) are as they were. The first N
    count from layer 0: layers before the first one that trains keep nothing for the backward anyway."""
    check_checkpointing(model, what)
    layers, first = model.transformer.layers, recomputed_layers(what)
    model.transformer.checkpointing = what == "all"
    for i, layer in enumerate(layers):
        layer.__dict__.pop("forward", None)  # the class's forward again
        if i < first:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, type(layer).forward.__get__(layer),
                                              use_reentrant=False, determinism_check="none", preserve_rng_state=False)
    if model.depformer is not None:
        model.depformer.checkpointing = what != "none"


def compile_layers(model: LMModel, on: bool, **compile_options) -> None:
    """--compile-layers: torch.compile of every layer of the transformer and the depformer, each whole
    (`on`), or back to eager; the weights and modules stay the same objects, so checkpoints and the
    freeze are as they were. train.py compiles them for each stage's steps and returns them to
    eager for its evaluations; dynamo compiles again for what changed (a new stage's YaRN, TTT or
    length), within its recompile limit, raised here. Every layer traces as one graph, the
    fast-weight scans too (ttt._accumulate); a graph break inside moshi's layer (it runs under an
    ExitStack) would make dynamo compile the layer's parts instead (results/training_7b)."""
    if on:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for layer in [*model.transformer.layers, *(model.depformer.layers if model.depformer is not None else [])]:
        if on and layer._compiled_call_impl is None:
            layer.compile(**compile_options)
        elif not on:
            layer._compiled_call_impl = None


def check_checkpointing(model: LMModel, what: str) -> None:
    """Refuses a --grad-checkpointing this model cannot run, in one line that says what it can."""
    layers = len(model.transformer.layers)
    if what not in CHECKPOINTING and not 0 < recomputed_layers(what) < layers:
        numbers = f"a number of the transformer's layers from 1 to {layers - 1}" if layers > 1 else \
            "no number (the transformer has one layer)"
        raise ValueError(f"--grad-checkpointing {what!r}: one of {', '.join(CHECKPOINTING)}, or {numbers}")
    if what == "depformer" and model.depformer is None:
        raise ValueError("--grad-checkpointing 'depformer': this model has no depformer (none, all or a number of "
                         "layers)")


def recomputed_layers(what) -> int:
    """N of --grad-checkpointing N, written as a plain number from 1 (1, 16; not 016, +1, 1e3); else 0."""
    return int(what) if isinstance(what, str) and re.fullmatch(r"[1-9][0-9]*", what) else 0


def recomputes(model: LMModel, layer: nn.Module) -> bool:
    """Whether set_checkpointing has this transformer layer recompute its activations in the backward."""
    return model.transformer.checkpointing or "forward" in layer.__dict__


def shard(model: LMModel, bf16: bool, multistream: bool) -> LMModel:
    """FSDP2 (PyTorch's `fully_shard`): parameters, gradients and AdamW state split across the
    processes. Each transformer layer (the depformer's too) is one group, gathered just before it
    runs; the rest of the model is one more. `bf16`: gathered in bf16 (frozen bf16 weights next
    to float32 trained ones), gradients reduced in float32. A float32 model gathers in float32:
    bf16 gathers put its residual stream in bf16, 0.14 of the update away from one GPU after 10
    steps (results/multi_gpu/fsdp_h100x2.log) against a run-to-run spread of 3e-4.
    `multistream`: the model is called through `forward` (moshi's loss on token streams), else
    through `forward_text`, which FSDP must then be told about. Not both: `forward` calls
    `forward_text`, and the root's hooks run nested inside themselves then; on CUDA the first
    backward of Moshi's 7B (and of a small model of its shape) failed with "setStorage: ... storage
    of size 0" on the depformer's output heads (results/multi_gpu/fsdp_scale_small7b_h100x2.log)."""
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


def new_settings(model_settings: dict, original_len: int, base_path: str, **extra) -> dict:
    """The settings of a model nothing has been applied to yet (trained at `original_len`)."""
    return dict(model=model_settings, original_len=original_len, trained_len=original_len, yarn=None,
                ttt=None, ttt_rope_modulo=False, window=None, mode="full", base_path=base_path, **extra)

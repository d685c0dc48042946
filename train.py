"""Long-context extension of a Moshi transformer: YaRN + In-Place TTT, trained with a curriculum.

    python train.py --scale 4 --mode ttt_only                    # one process
    torchrun --nproc_per_node=2 train.py --scale 4 --mode ttt_only # DDP (gloo on CPU, nccl on CUDA)

Without --init, stage 0 pretrains a small base from scratch at L0 (out/base.pt). Then one stage
per doubling, 2 L0, 4 L0, ... with YaRN at scale 2, 4, ... up to --scale, TTT in the chosen
layers, the freeze --mode applied, attention kept to a window of --window steps (2 L0). The run
ends with a table of each effect against its control (eval_passkey.final_table).
"""
import argparse
import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
import typing as tp

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi loads: compiling dominates small runs

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import eval_passkey
import freeze
import model as M
import ttt
import window_attention
import yarn


# The official In-Place TTT configs (configs/pretrain/*_longct.yaml): eta 3, chunk 4096 (None:
# capped in `settle`), every 6th layer, every parameter at 5e-6, weight decay 0.1, 2 % warmup, cosine,
# one global clipping at 1.0. The project's defaults differ on purpose (README, "Defaults").
RECIPES = {"project": {},
           "official": dict(ttt_eta=3.0, ttt_chunk=None, ttt_layers="official", mode="full", lr=5e-6, lr_ttt=5e-6,
                            weight_decay=0.1, ttt_weight_decay=0.1, warmup=0.02, clip="global", grad_clip=1.0)}


def flag(default, help=None, **argparse_kwargs):
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclasses.dataclass
class Config:
    """One run, whole: the command line fills it, `settle` completes it from the starting point, and
    every checkpoint stores it, so that --resume continues exactly this run."""
    recipe: str = flag("project", "defaults: ours or the official ones (README)", choices=tuple(RECIPES))
    scale: float = flag(4.0, "final YaRN scale; stages double the length up to it")
    mode: str = flag("ttt_only", "what trains in the extension stages", choices=freeze.MODES)
    method: str = flag("yarn", "RoPE scaling in the extension stages", choices=yarn.METHODS[1:])
    init: tp.Optional[str] = flag(None, "a base to extend: out/base.pt, or a model.safetensors with --init-config")
    init_config: tp.Optional[str] = flag(None, "json of the LMModel arguments of a .safetensors --init")
    resume: bool = flag(False, "continue the run in --out (its ckpt.pt) exactly as it was configured")
    pretrain_only: bool = flag(False, "stop after pretraining the base (out/base.pt)")
    original_len: int = flag(128, "L0, the length the base was trained at (from the --init: its own, or a Moshi "
                             "model's context)")
    window: tp.Optional[int] = flag(None, "attention's sliding window W in every stage (default 2 L0, so needles "
                                    "farther back only TTT can carry; 0: none; from the --init where it has one)", type=int)
    preset: str = flag("cpu", "model size when pretraining", choices=sorted(M.PRESETS))
    data: tp.Optional[list] = flag(None, "UTF-8 text files (default: the Python stdlib source)", nargs="+")
    passkey_share: float = flag(0.5, "share of training sequences that are passkeys")
    answer_weight: float = flag(20.0, "loss weight of the passkey answer digits")
    passkey_max_depth: float = flag(1.0, "training needles at depths in [0, this]")
    ttt_layers: tp.Union[str, list] = flag("default", "comma list, 'default', 'official' (every 6th) or 'none'")
    ttt_chunk: tp.Optional[int] = flag(64, "TTT chunk size C (--recipe official: 4096, capped)", type=int)
    ttt_eta: float = flag(0.3, "TTT inner learning rate eta")
    ttt_target: str = flag("hidden", "targets from the MLP input or X0", choices=("hidden", "embeddings"))
    ttt_kernel: int = flag(5, "target conv kernel size (odd)")
    ttt_target_std: float = flag(0.02, "std of W_target's initial diagonal")
    ttt_no_target: bool = flag(False, "no W_target: V = Conv1D(X) (official ttt_proj: false)")
    ttt_rope_modulo: bool = flag(False, "modulo RoPE on Z in the fast-weight path (ours)")
    lora_rank: int = flag(8)
    lora_scaling: float = flag(2.0)
    text_padding_weight: float = flag(0.5, "token streams: text padding tokens' weight")
    first_codebook_weight: float = flag(1.0, "token streams: first audio codebook's weight")
    pretrain_steps: int = flag(600)
    steps: int = flag(40, "steps per extension stage")
    batch: int = flag(16, "global batch in sequences")
    grad_accum: int = flag(1, "micro-steps per step")
    lr: float = flag(2e-3, "peak learning rate of base weights")
    lr_ttt: float = flag(2e-3, "peak learning rate of the TTT conv and W_target")
    weight_decay: float = flag(0.1)
    ttt_weight_decay: float = flag(0.0)
    warmup: float = flag(0.1, "warmup, a fraction of each stage's steps")
    grad_clip: float = flag(1.0, "the gradient norm's bound (see --clip)")
    clip: str = flag("per-group", "TTT and base apart, or together", choices=("per-group", "global"))
    grad_checkpointing: bool = flag(False)
    fsdp: bool = flag(False, "FSDP2: shard the extended model across torchrun's processes")
    eval_trials: int = flag(10, "passkey documents per depth in evaluations")
    log_every: int = flag(25)
    save_every: int = flag(100, "steps between checkpoints inside a stage")
    out: str = flag("out")
    seed: int = flag(0)
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu")


# What a run may change when it resumes: where it is (--out, --device) and that it resumes.
RESUME_FREE = ("resume", "out", "device")
# What an --init checkpoint fixes, as (config field, key in its settings["ttt"] or None for the settings).
FIXED_BY_INIT = [("original_len", None), ("window", None), ("ttt_layers", "layers"), ("ttt_chunk", "chunk_size"),
                 ("ttt_eta", "eta"), ("ttt_kernel", "kernel_size"), ("ttt_target", "target_source"),
                 ("ttt_target_std", "target_init_std"), ("ttt_no_target", "target"), ("ttt_rope_modulo", None)]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_args(argv=None) -> tuple[Config, dict]:
    """The command line: the Config its flags and recipe give (every value checked before any work)
    and the flags given explicitly, by field name."""
    p = eval_passkey.OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kw = {k: v for k, v in f.metadata.items() if v is not None}
        if f.type is bool:
            kw["action"] = "store_true"
        elif "type" not in kw and "nargs" not in kw and f.type in (int, float, str):
            kw["type"] = f.type
        p.add_argument(option(f.name), default=argparse.SUPPRESS, **kw)
    given = vars(p.parse_args(argv))
    config = Config(**{**RECIPES[given.get("recipe", "project")], **given})
    fail = p.error  # one line on stderr, exit code 2, nothing written
    try:
        check(config)
    except ValueError as e:
        fail(str(e))
    if isinstance(given.get("ttt_layers"), str):
        given["ttt_layers"] = config.ttt_layers
    return config, given


def check(c: Config) -> None:
    """Each value in its range, and the flags that go together: ValueError, one line, naming it."""
    for name in ("original_len", "steps", "batch", "grad_accum", "ttt_chunk", "eval_trials", "log_every",
                 "save_every", "lora_rank", "pretrain_steps", "window"):
        least = 0 if name in ("pretrain_steps", "window") else 1
        if getattr(c, name) is not None and getattr(c, name) < least:
            raise ValueError(f"{option(name)} must be >= {least}, got {getattr(c, name)}")
    for name in ("lr", "lr_ttt", "ttt_eta", "ttt_target_std", "weight_decay", "ttt_weight_decay", "grad_clip",
                 "answer_weight", "lora_scaling", "text_padding_weight", "first_codebook_weight"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) >= 0):
            raise ValueError(f"{option(name)} must be a finite number >= 0, got {getattr(c, name)}")
        if name in ("lr", "lr_ttt") and getattr(c, name) > 1e37:  # AdamW's first step divides by 0.1
            raise ValueError(f"{option(name)} must be <= 1e37, got {getattr(c, name)}")
    if not 0 <= c.warmup < 1:
        raise ValueError(f"--warmup is a fraction of each stage's steps, in [0, 1), got {c.warmup}")
    for name in ("passkey_share", "passkey_max_depth"):
        if not 0 <= getattr(c, name) <= 1:
            raise ValueError(f"{option(name)} must be in [0, 1], got {getattr(c, name)}")
    if not (math.isfinite(c.scale) and c.scale >= 1):
        raise ValueError(f"--scale must be >= 1, got {c.scale}")
    if c.ttt_kernel < 1 or c.ttt_kernel % 2 == 0:
        raise ValueError(f"--ttt-kernel must be odd and >= 1, got {c.ttt_kernel}")
    if c.original_len < 128:
        raise ValueError(f"--original-len must be >= 128 (a passkey document needs 104 bytes), got {c.original_len}")
    if isinstance(c.ttt_layers, str) and c.ttt_layers not in ("default", "official", "none"):
        try:
            c.ttt_layers = [int(v) for v in c.ttt_layers.split(",")]
        except ValueError:
            raise ValueError(f"--ttt-layers must be 'default', 'official', 'none' or a comma list of integers, "
                             f"got {c.ttt_layers!r}") from None
    if c.ttt_layers in ("none", []) and c.mode != "full":
        raise ValueError("--ttt-layers none (no TTT) needs --mode full: the other modes train TTT parameters")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if c.batch % (world * c.grad_accum):
        raise ValueError(f"--batch {c.batch} must be divisible by processes x --grad-accum = {world * c.grad_accum}")
    if not 0 <= c.seed < 10 ** 6:
        raise ValueError(f"--seed must be in [0, 1000000), got {c.seed}")
    if bool(c.init and c.init.endswith(".safetensors")) != bool(c.init_config):
        raise ValueError("--init-config goes with a .safetensors --init, and only with one")
    if c.fsdp and ("RANK" not in os.environ or not (c.init or c.resume)):
        raise ValueError("--fsdp needs torchrun and --init (it shards the model being extended, not pretraining)")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {c.device} but CUDA is not available")


def resumed_config(given: dict) -> tuple[Config, dict]:
    """--resume: the stored run, whole, and its checkpoint. A flag given with it must say what the
    run already is (else ValueError naming the flag, the stored and the given value)."""
    out = given.get("out", "out")
    path = os.path.join(out, "ckpt.pt")
    checkpoint = M.load_checkpoint(path)
    M.check_resumable(checkpoint, path)
    if not isinstance(checkpoint.get("config"), dict):
        raise ValueError(f"{path} holds no run configuration (written before runs stored theirs): "
                         f"start the run again")
    stored = Config(**checkpoint["config"])
    for name, value in given.items():
        if name not in RESUME_FREE and value != getattr(stored, name):
            raise ValueError(f"{option(name)} {value!r} differs from the run being resumed ({path}: "
                             f"{getattr(stored, name)!r}); --resume continues the run as it was configured")
    if stored.fsdp and "RANK" not in os.environ:
        raise ValueError(f"{path} was saved with --fsdp: resume it the same way, under torchrun")
    return dataclasses.replace(stored, **{k: v for k, v in given.items() if k in RESUME_FREE}), checkpoint


def settle(c: Config, given: dict, settings: tp.Optional[dict], n_layers: int, multistream: bool) -> None:
    """Completes the config from the starting point, in place. An --init checkpoint fixes its L0, its
    window and its TTT; a Moshi-format one, L0 (its `context`) unless --original-len is given. A flag
    that contradicts what the checkpoint fixes is refused (ValueError naming both values)."""
    named = {"default": ttt.default_layers(n_layers), "official": list(range(0, n_layers, 6)), "none": []}
    if isinstance(c.ttt_layers, str):
        c.ttt_layers = named[c.ttt_layers]
    if isinstance(given.get("ttt_layers"), str):
        given["ttt_layers"] = named[given["ttt_layers"]]
    if c.init and c.init.endswith(".safetensors"):
        if "original_len" not in given:
            if not settings["model"].get("context"):
                raise ValueError("the Moshi model has no finite context: give its L0 with --original-len")
            c.original_len = settings["model"]["context"]
        settings["original_len"] = settings["trained_len"] = c.original_len
    elif c.init:
        fixed = dict(original_len=settings["original_len"])
        if settings.get("window"):
            fixed["window"] = settings["window"]
        if settings.get("ttt"):
            t = settings["ttt"]
            fixed.update({name: (not t[key]) if name == "ttt_no_target" else t[key]
                          for name, key in FIXED_BY_INIT if key is not None})
            fixed["ttt_rope_modulo"] = bool(settings.get("ttt_rope_modulo"))
        for name, value in fixed.items():
            if name in given and given[name] != value:
                raise ValueError(f"{option(name)} {given[name]!r} contradicts the --init checkpoint, whose "
                                 f"{name} is {value!r}; leave the flag out to keep it")
            setattr(c, name, value)
    if c.window is None:  # a small model sees 2 L0: YaRN matters beyond L0, and only TTT beyond 2 L0;
        c.window = 0 if multistream else 2 * c.original_len  # a Moshi model its context (YaRN widens it)
    if any(not 0 <= i < n_layers for i in c.ttt_layers):
        raise ValueError(f"--ttt-layers {c.ttt_layers} out of range: the model has layers 0..{n_layers - 1}")


def curriculum(scale: float, original_len: int, pretrain: bool) -> list[dict]:
    """Stage 0 pretrains at L0 (scale 1), then lengths double with the scale up to `scale`."""
    stages = [dict(kind="pretrain", length=original_len, scale=1.0)] if pretrain else []
    s = 1.0
    while True:
        s = min(2 * s, scale)
        stages.append(dict(kind="extend", length=math.ceil(s * original_len), scale=s))
        if s >= scale:
            return stages


def lr_at(step: int, steps: int, peak: float, warmup_fraction: float) -> float:
    """Linear warmup over a fraction of the stage's steps, so every stage reaches its peak, then
    cosine decay to a tenth of the peak."""
    warmup = math.ceil(warmup_fraction * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None):
    config, given = parse_args(argv)
    p = eval_passkey.OneLineParser(prog="train.py")
    fail = p.error  # one line on stderr, exit code 2, nothing written

    # --- the run's configuration, whole, and its starting point, all checked before any work
    try:
        M.check_writable(config.out, folder=True)
        if config.resume:
            config, resume = resumed_config(given)
            check(config)
            model = M.model_from_checkpoint(resume, "cpu", os.path.join(config.out, "ckpt.pt"))
            settings = copy.deepcopy(resume["settings"])
        else:
            model, settings, resume = M.starting_point(config.init, config.init_config)
        multistream = model is not None and "lm_kwargs" in settings["model"]
        if multistream and not config.data:
            raise ValueError("a Moshi-format model trains on --data token arrays (.npy, [K, T])")
        corpus = (data.load_token_arrays(config.data, model.num_codebooks) if multistream
                  else data.load_corpus(config.data))
        if not resume:
            n_layers = len(model.transformer.layers) if model is not None else M.PRESETS[config.preset]["num_layers"]
            settle(config, given, settings, n_layers, multistream)
    except ValueError as e:
        fail(str(e))
    if model is None:  # pretrain a new model from scratch
        settings = M.new_settings(dict(M.PRESETS[config.preset], context=config.original_len), config.original_len,
                                  os.path.join(config.out, "base.pt"))
        torch.manual_seed(config.seed)
        model = M.build_model(settings["model"])
    window = config.window or None
    ttt_layers = config.ttt_layers
    settings["loss"] = dict(text_padding_weight=config.text_padding_weight,
                            first_codebook_weight=config.first_codebook_weight)
    stages = resume["stages"] if resume else curriculum(config.scale, config.original_len, pretrain=not config.init)
    if config.pretrain_only and stages[0]["kind"] != "pretrain":
        fail("--pretrain-only needs a run that pretrains (no --init)")
    stages = stages[:1] if config.pretrain_only else stages
    if (longest := max(s["length"] for s in stages)) > (have := corpus.longest()):
        fail(f"stage length {longest} needs more {'token steps' if multistream else 'text'} than the corpus "
             f"has (the shorter of train and validation: {have})")
    shortest = min((s["length"] for s in stages if s["kind"] == "extend"), default=math.inf)
    if config.ttt_chunk is None:  # --recipe official: 4096 (for 64k-token sequences), capped
        config.ttt_chunk = min(4096, window or shortest, shortest // 2)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"TTT chunk {config.ttt_chunk}: the official 4096 capped by the attention window (a longer "
                  f"chunk leaves tokens no layer sees) and half the shortest sequence (the fast weight must update)")
    if window and ttt_layers and config.ttt_chunk > window:
        fail(f"--ttt-chunk {config.ttt_chunk} is longer than --window {window}: tokens more than "
             f"{window} steps into a chunk would be seen by neither attention nor the fast weight")
    if ttt_layers and config.ttt_chunk >= shortest:
        fail(f"--ttt-chunk {config.ttt_chunk} must be shorter than the sequences ({shortest}): "
             f"with one chunk the fast weights never update")
    stored = dataclasses.asdict(config)  # what every checkpoint of this run carries

    # --- distributed set-up: RANK in the environment means torchrun started us
    ddp = "RANK" in os.environ
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if config.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if config.device.startswith("cuda"):
            config.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(config.device)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    device = torch.device(config.device)
    ckpt_path = os.path.join(config.out, "ckpt.pt")

    # --- the model on its device
    model.to(device)
    if device.type == "cuda":  # the window's pairs only (flex_attention); equal to moshi's masked attention
        window_attention.apply_window_attention(model)
    for transformer in (model.transformer, model.depformer):  # the depformer runs over B x T sequences
        if transformer is not None:
            transformer.checkpointing = config.grad_checkpointing
    # bf16 autocast on a GPU and wherever weights are stored in bf16 (a Moshi checkpoint): frozen
    # weights stay bf16, trained ones are float32 (freeze.upcast_trainable)
    low_precision = M.low_precision(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" or low_precision
                else contextlib.nullcontext())
    log(f"corpus: {corpus.files} files, {len(corpus.train):,} train / {len(corpus.val):,} validation "
        f"{'token arrays' if multistream else 'bytes'}, sha256 {corpus.sha256[:16]}")
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters {settings['model']}; {world} "
        f"process(es) on {device}; stages " + ", ".join(f"{s['length']} (x{s['scale']:g})" for s in stages))
    if config.method == "yarn" and config.scale > 1 and shortest < math.inf:
        attention, base = model.transformer.layers[0].self_attn, model.transformer.rope.max_period
        head_dim = attention.embed_dim // attention.num_heads
        log(f"YaRN's RoPE pairs kept / blended / interpolated: {yarn.split_counts(head_dim, base, config.original_len)}"
            f" at head dim {head_dim}, L0 {config.original_len}; Moshi 7B's: {yarn.split_counts(128, 10_000.0, 3000)}")

    sharded, view = False, model
    for stage_index in range(resume["stage"] if resume else 0, len(stages)):
        stage = stages[stage_index]
        length, extending = stage["length"], stage["kind"] == "extend"
        # --- this stage's model: YaRN at its scale, the window, TTT, LoRA and the freeze mode
        if extending:
            yarn.apply_yarn(model, stage["scale"], config.original_len, method=config.method)
            settings["yarn"] = model.yarn_settings
        if window:  # Moshi's own setting: a sliding window, in pretraining too
            M.set_context(model, window)
        settings["window"] = window
        if not extending:
            model.requires_grad_(True)
        elif ttt_layers and not settings["ttt"]:
            torch.manual_seed(config.seed + 1)  # the same W_target init on every rank
            settings["ttt"] = dict(layers=ttt_layers, chunk_size=config.ttt_chunk, eta=config.ttt_eta,
                                   kernel_size=config.ttt_kernel, target_source=config.ttt_target,
                                   target_init_std=config.ttt_target_std, target=not config.ttt_no_target)
            settings["ttt_rope_modulo"] = config.ttt_rope_modulo
            M.install(model, dict(ttt=settings["ttt"], ttt_rope_modulo=config.ttt_rope_modulo)).to(device)
        if extending and config.mode == "lora_ttt" and not settings.get("lora"):
            freeze.apply_lora(model, config.lora_rank, config.lora_scaling)
            settings["lora"] = model.lora_settings
        if extending and settings["ttt"]:
            log(freeze.format_summary(freeze.apply_freeze(model, config.mode)))
        settings["mode"], settings["trained_len"] = config.mode if extending else settings["mode"], length
        freeze.upcast_trainable(model)
        if (shortfall := M.gpu_shortfall(model, device, world if config.fsdp else 1)) is not None:
            fail(f"--mode {config.mode} needs {shortfall}; train fewer parameters or shard them (--fsdp)")
        if config.fsdp and not sharded:  # after TTT, LoRA and the freeze mode: the model's shape is final
            M.shard(model, bf16=low_precision, multistream=multistream)  # float32 gathers as float32
            sharded = settings["fsdp"] = True

        # --- the optimizer: decay on matrices only; TTT's parameters have their own lr and decay
        ttt_ids = {id(p) for m in freeze.ttt_modules(model) for p in m.ttt_parameters()}
        ttt_params = [p for p in model.parameters() if p.requires_grad and id(p) in ttt_ids]
        base_params = [p for p in model.parameters() if p.requires_grad and id(p) not in ttt_ids]
        groups = [dict(params=[p for p in base_params if p.dim() >= 2], weight_decay=config.weight_decay, name="base"),
                  dict(params=[p for p in base_params if p.dim() < 2], weight_decay=0.0, name="base"),
                  dict(params=ttt_params, weight_decay=config.ttt_weight_decay, name="ttt")]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
        steps = config.steps if extending else config.pretrain_steps
        first_step = 0
        if resume and stage_index == resume["stage"] and resume["step"] > 0:
            try:
                M.load_optimizer_state(model, optimizer, resume["optimizer"], sharded)
            except (ValueError, KeyError, RuntimeError) as e:
                fail(f"{ckpt_path}: its optimizer state does not fit this run's parameters ({e})")
            first_step = resume["step"]
        net = M.Objective(model, config.answer_weight, settings["loss"])
        if ddp and not sharded:
            net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        clip_groups = [(name, params) for name, params in (
            (("ttt", ttt_params), ("base", base_params)) if config.clip == "per-group"
            else (("all", ttt_params + base_params),)) if params]
        log(f"stage {stage_index}: {stage['kind']} at length {length}, scale {stage['scale']:g}, "
            f"{steps} steps, batch {config.batch}")
        # --- the loop. The host does not wait for the GPU inside a step: the loss stays a tensor, and
        # the first step with a non-finite gradient norm is recorded on the device and read before
        # any log line or save, so no checkpoint is ever written from non-finite weights.
        micro = config.batch // world // config.grad_accum
        model.train()
        t0, tokens_done = time.time(), 0
        first_bad = torch.full((len(clip_groups),), -1, device=device)
        for step in range(first_step, steps):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, steps, config.lr_ttt if g["name"] == "ttt" else config.lr, config.warmup)
            # The global batch depends only on (seed, stage length and kind, step): the same sequences
            # whatever the number of processes, with or without --init, and after --resume.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + (2 * length + extending) * 100_003 + step)
            if multistream:
                batch = data.token_windows(corpus.train, length, config.batch, generator)
                answer = torch.zeros(config.batch, dtype=torch.bool)  # no passkey documents here
            else:
                batch, answer = data.training_batch(corpus.train, length, config.batch, config.passkey_share, generator,
                                                    config.passkey_max_depth)
            mine = slice(rank * micro * config.grad_accum, (rank + 1) * micro * config.grad_accum)
            batch, answer = batch[mine].to(device), answer[mine].to(device)
            loss_sum = torch.zeros((), device=device)
            for k in range(config.grad_accum):
                sync = k == config.grad_accum - 1  # all-reduce only on the last micro-step
                if sharded:
                    model.set_requires_gradient_sync(sync)
                with (net.no_sync() if ddp and not sharded and not sync else contextlib.nullcontext()), autocast:
                    loss = net(batch[k * micro:(k + 1) * micro], answer[k * micro:(k + 1) * micro]) / config.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            # Clipped per group by default, so TTT's small gradients are not scaled by the base's (the
            # log shows the TTT norm before any clipping). Gradients are all-reduced: every rank sees
            # the same norms and stops together.
            ttt_norm = (torch.nn.utils.get_total_norm([p.grad for p in ttt_params if p.grad is not None])
                        if ttt_params and config.clip == "global" else None)
            norms = {name: torch.nn.utils.clip_grad_norm_(params, config.grad_clip) for name, params in clip_groups}
            norms = {name: getattr(norm, "full_tensor", lambda: norm)() for name, norm in norms.items()}  # FSDP2
            ttt_norm = norms.get("ttt", getattr(ttt_norm, "full_tensor", lambda: ttt_norm)())
            finite = torch.stack([norm.isfinite() for norm in norms.values()])
            first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_done += config.batch * length
            last = step == steps - 1
            logging, saving = step % config.log_every == 0 or last, (step + 1) % config.save_every == 0 and not last
            bad = [(name, at) for name, at in zip(norms, first_bad.tolist()) if at >= 0] if logging or saving else []
            if bad:
                log(f"stopping: non-finite gradient in the {' and '.join(name for name, _ in bad)} parameters at "
                    f"stage {stage_index} step {min(at for _, at in bad) + 1}; try a smaller --lr / --lr-ttt or "
                    f"--ttt-eta. The last checkpoint ({ckpt_path}) is kept as it was.")
                sys.exit(1)
            if logging:
                if ddp:  # the global batch's loss, not rank 0's share
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                ttt_text = f" | ttt grad {ttt_norm.item():.3e}" if ttt_norm is not None else ""
                log(f"step {step + 1}/{steps} | stage {stage_index} | len {length} | loss {loss_sum.item():.4f} | "
                    f"{tokens_done / max(time.time() - t0, 1e-9):,.0f} tok/s{ttt_text}")
            if saving:
                state, optimizer_state = M.full_state(model, optimizer, sharded)
                if master:
                    M.save_checkpoint(ckpt_path, dict(model=state, settings=settings, config=stored, stages=stages, stage=stage_index,
                                                      step=step + 1, optimizer=optimizer_state))

        # --- stage end: validation, passkey, checkpoint (a sharded model is evaluated whole, on rank 0)
        del optimizer, net  # the next stage makes its own: room for a sharded model's whole copy
        state = M.full_state(model, sharded=sharded)[0]
        if master:
            checkpoint = dict(model=state, settings=settings, config=stored, stages=stages, stage=stage_index + 1, step=0,
                              optimizer={})
            view = M.model_from_checkpoint(checkpoint, device, ckpt_path) if sharded else model
            if sharded and settings["ttt"]:
                freeze.apply_freeze(view, config.mode)
            log(f"stage {stage_index} done: " + eval_passkey.stage_report(view, corpus, length, config.eval_trials,
                                                                         device, multistream, settings["loss"]))
            if not extending:
                M.save_checkpoint(settings["base_path"], dict(checkpoint, stage=0))
            M.save_checkpoint(ckpt_path, checkpoint)

    # --- the end: the trained parameters alone (to load on the base), then the final table
    if master and not config.pretrain_only:
        if settings.get("base_path") and os.path.isfile(settings["base_path"]):
            M.save_adapter(os.path.join(config.out, "adapter.pt"), view, settings, settings["base_path"])
        eval_passkey.final_report(view, settings, stages, corpus, device, multistream, config.eval_trials,
                                  config.method, config.scale, os.path.join(config.out, "results.json"), stored)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

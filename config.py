"""train.py's run configuration: one dataclass, filled by the command line, completed from the
starting point, stored whole in every checkpoint.

A setting comes from one place. `parse_args` gives the Config the flags and the --recipe say
(every value checked); `start` completes it from what the run starts from and refuses a flag that
contradicts it, before any work (an --init's flags are checked against its settings before its
weights are read: at 7B, loading them takes minutes):
- --resume continues the stored configuration exactly; a flag given with it must equal the stored
  value (only --out, --device and --resume itself may differ);
- --init from a checkpoint of ours keeps what the checkpoint fixes: its L0, its window (none
  included), its TTT, its YaRN's beta_fast, and once it trained past L0 its --method; its stages go on
  from the length it trained at (a --scale ending below it, or a checkpoint saved inside a stage, is
  refused); a --recipe is checked against them as its flags would be, and flags that would change
  nothing there (--pretrain-steps, another --preset) are refused;
- --init from a Moshi-format model takes L0 from the model's `context` unless --original-len says.

    c, given = config.parse_args(sys.argv[1:])
    run = config.start(c, given)         # the model, its settings, the corpus, the stages
"""
import argparse
import copy
import dataclasses
import math
import os
import typing as tp

import torch

import checkpoints
import data
import eval_passkey
import freeze
import model as M
import ttt
import yarn


# The official In-Place TTT configs (configs/pretrain/*_longct.yaml): eta 3, chunk 4096 (None:
# capped in `start`), every 6th layer, every parameter at 5e-6, weight decay 0.1, 2 % warmup, cosine,
# one global clipping at 1.0, the plain sum of updates. The project's defaults differ on purpose (README).
RECIPES = {"project": {},
           "official": dict(ttt_eta=3.0, ttt_chunk=None, ttt_layers="official", mode="full", lr=5e-6, lr_ttt=5e-6,
                            weight_decay=0.1, ttt_weight_decay=0.1, warmup=0.02, clip="global", grad_clip=1.0,
                            ttt_delta=0.0)}


def flag(default, help=None, **argparse_kwargs):
    return dataclasses.field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclasses.dataclass
class Config:
    """One run, whole: the command line fills it, `settle` completes it from the starting point, and
    every checkpoint stores it, so that --resume continues exactly this run."""
    recipe: str = flag("project", "defaults: ours or the official ones (README)", choices=tuple(RECIPES))
    scale: float = flag(4.0, "final YaRN scale; stages double the length up to it")
    mode: str = flag("ttt_only", "what trains in the extension stages", choices=freeze.MODES)
    method: str = flag("yarn", "RoPE scaling in the extension stages (none: the base's RoPE, longer documents "
                       "only; with a window, positions farther apart than it never meet)", choices=yarn.METHODS)
    yarn_beta_fast: tp.Optional[float] = flag(None, "YaRN's beta_fast: RoPE pairs turning more than this many times "
                                              "over L0 keep their frequency (default: the paper's 32 lowered until "
                                              "YaRN keeps Moshi 7B's share of pairs: 32 for Moshi, 2 for the CPU "
                                              "preset)", type=float)
    init: tp.Optional[str] = flag(None, "a base to extend: out/base.pt, or a model.safetensors with --init-config")
    init_config: tp.Optional[str] = flag(None, "json of the LMModel arguments of a .safetensors --init")
    resume: bool = flag(False, "continue the run in --out (its ckpt.pt) exactly as it was configured")
    pretrain_only: bool = flag(False, "stop after pretraining the base (out/base.pt)")
    original_len: int = flag(128, "L0, the length the base was trained at (from the --init: its own, or a Moshi "
                             "model's context)")
    window: tp.Optional[int] = flag(None, "attention's sliding window W in every stage (default 2 L0, so needles "
                                    "farther back only TTT can carry; 0: none; from the --init where it has one)",
                                    type=int)
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
    ttt_decay: float = flag(1.0, "forgetting per chunk gamma in (0, 1] of the sum of updates (ours; 1: the paper)")
    ttt_update_clip: float = flag(0.0, "largest Frobenius norm tau of a chunk's update eta V^T Z (the paper's "
                                  "Appendix D.2 clipping; 0: none)")
    ttt_average_after: int = flag(0, "past K chunks, read K times the mean of the updates instead of their sum "
                                  "(ours; 0: the sum, the paper)")
    ttt_delta: float = flag(1.0, "the delta rule's erase rho in [0, 1] along each chunk's keys before it writes "
                            "(ours; it keeps the memory past the trained length; 0: none, the paper's plain sum)")
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
    grad_checkpointing: str = flag("none", "what recomputes its activations in the backward: all (the flag alone: "
                                   "the transformer and the depformer), depformer (at Moshi 7B 0.8x the time of "
                                   "all, 45-53 GiB more at T 12000), a number N (the depformer and the "
                                   "transformer's first N layers), or none", nargs="?", const="all")
    moshi_compile: bool = flag(False, "moshi's own torch.compile of its norms and RoPE (its gating kernel only "
                               "outside training; 1.2x at Moshi 7B in bench.py --scale; compiling dominates "
                               "small runs); not where norms train")
    compile_layers: bool = flag(False, "torch.compile of every transformer and depformer layer, whole, for the "
                                "training steps (evaluations stay eager): at Moshi 7B in bench.py --scale 1.11-1.18x "
                                "faster than --moshi-compile, 56-59 %% MFU with --grad-checkpointing depformer; "
                                "the first step of each stage compiles (about a minute there); not with --fsdp")
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
                 ("ttt_target_std", "target_init_std"), ("ttt_no_target", "target"), ("ttt_decay", "decay"),
                 ("ttt_update_clip", "update_clip"), ("ttt_average_after", "average_after"), ("ttt_delta", "delta"),
                 ("ttt_rope_modulo", None)]
# Their values in checkpoints written before the setting existed.
TTT_SETTING_BEFORE = dict(decay=1.0, update_clip=0.0, average_after=0, delta=0.0)
# Values of Config fields in configurations stored before the field existed (--resume), where the
# field's default is not what those runs did: runs before --ttt-delta trained the plain sum, runs
# before --yarn-beta-fast the paper's 32.
CONFIG_BEFORE = dict(ttt_delta=0.0, yarn_beta_fast=32.0)
# --grad-checkpointing was on or off, for both transformers, before it could name the depformer alone.
CHECKPOINTING_BEFORE = {True: "all", False: "none"}


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
        config.ttt_layers = parsed_layers(config.ttt_layers)
        if not config.resume:  # a resumed run is checked on its stored configuration (start), not the defaults
            check(config)
    except ValueError as e:
        fail(str(e))
    if not config.resume:  # flags that would change nothing (--resume compares them with the stored run)
        if "yarn_beta_fast" in given and config.method != "yarn":
            fail(f"--yarn-beta-fast is YaRN's; --method {config.method} has no beta_fast")
        lora = [option(name) for name in ("lora_rank", "lora_scaling") if name in given]
        if lora and config.mode not in freeze.LORA_SCOPES:
            fail(f"{', '.join(lora)} with --mode {config.mode}, which trains no LoRA: "
                 f"give it with --mode {' or '.join(freeze.LORA_SCOPES)}")
        if "pretrain_steps" in given and config.init:
            fail("--pretrain-steps with --init: the model comes from the checkpoint, not pretrained here")
    if isinstance(given.get("ttt_layers"), str):
        given["ttt_layers"] = config.ttt_layers
    return config, given


def check(c: Config) -> None:
    """Each value in its range, and the flags that go together: ValueError, one line, naming it."""
    for name in ("original_len", "steps", "batch", "grad_accum", "ttt_chunk", "eval_trials", "log_every",
                 "save_every", "lora_rank", "pretrain_steps", "window", "ttt_average_after"):
        least = 0 if name in ("pretrain_steps", "window", "ttt_average_after") else 1
        if getattr(c, name) is not None and getattr(c, name) < least:
            raise ValueError(f"{option(name)} must be >= {least}, got {getattr(c, name)}")
    for name in ("lr", "lr_ttt", "ttt_eta", "ttt_target_std", "weight_decay", "ttt_weight_decay", "grad_clip",
                 "ttt_update_clip", "answer_weight", "lora_scaling", "text_padding_weight", "first_codebook_weight"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) >= 0):
            raise ValueError(f"{option(name)} must be a finite number >= 0, got {getattr(c, name)}")
        if name in ("lr", "lr_ttt") and getattr(c, name) > 1e37:  # AdamW's first step divides by 0.1
            raise ValueError(f"{option(name)} must be <= 1e37, got {getattr(c, name)}")
    if c.grad_clip == 0:
        raise ValueError("--grad-clip must be > 0, got 0: it bounds the gradient's norm, so 0 would zero every gradient")
    if not 0 <= c.warmup < 1:
        raise ValueError(f"--warmup is a fraction of each stage's steps, in [0, 1), got {c.warmup}")
    for name in ("passkey_share", "passkey_max_depth"):
        if not 0 <= getattr(c, name) <= 1:
            raise ValueError(f"{option(name)} must be in [0, 1], got {getattr(c, name)}")
    if c.grad_checkpointing not in M.CHECKPOINTING and not M.recomputed_layers(c.grad_checkpointing):
        raise ValueError(f"--grad-checkpointing must be one of {', '.join(M.CHECKPOINTING)} or a number of "
                         f"layers from 1, got {c.grad_checkpointing!r}")
    if not 0 < c.ttt_decay <= 1:
        raise ValueError(f"--ttt-decay must be in (0, 1], got {c.ttt_decay}")
    if not 0 <= c.ttt_delta <= 1:
        raise ValueError(f"--ttt-delta must be in [0, 1] (0: none), got {c.ttt_delta}")
    on_the_sum = [f"{option(name)} {getattr(c, name)}" for name, off in (("ttt_decay", 1), ("ttt_average_after", 0))
                  if getattr(c, name) != off]
    if c.ttt_delta and on_the_sum:
        raise ValueError(f"{' and '.join(on_the_sum)} {'act' if len(on_the_sum) > 1 else 'acts'} on the plain sum of "
                         f"updates, which the erase (--ttt-delta {c.ttt_delta}, default 1) bounds another way: "
                         f"give --ttt-delta 0 with {'them' if len(on_the_sum) > 1 else 'it'}")
    if not (math.isfinite(c.scale) and c.scale >= 1):
        raise ValueError(f"--scale must be >= 1, got {c.scale}")
    if c.yarn_beta_fast is not None and not (math.isfinite(c.yarn_beta_fast) and c.yarn_beta_fast > 1):
        raise ValueError(f"--yarn-beta-fast must be a number > 1 (beta_slow), got {c.yarn_beta_fast}")
    if c.ttt_kernel < 1 or c.ttt_kernel % 2 == 0:
        raise ValueError(f"--ttt-kernel must be odd and >= 1, got {c.ttt_kernel}")
    if c.original_len < 128:
        raise ValueError(f"--original-len must be >= 128 (a passkey document needs 104 bytes), got {c.original_len}")
    c.ttt_layers = parsed_layers(c.ttt_layers)
    if c.ttt_layers in ("none", []) and c.mode != "full":
        raise ValueError("--ttt-layers none (no TTT) needs --mode full: the other modes train TTT parameters")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if c.batch % (world * c.grad_accum):
        raise ValueError(f"--batch {c.batch} must be divisible by processes x --grad-accum = {world * c.grad_accum}")
    if not 0 <= c.seed < 10 ** 6:
        raise ValueError(f"--seed must be in [0, 1000000), got {c.seed}")
    if bool(c.init and c.init.endswith(".safetensors")) != bool(c.init_config):
        raise ValueError("--init-config goes with a .safetensors --init, and only with one")
    if c.compile_layers and c.fsdp:
        raise ValueError("--compile-layers with --fsdp: compiled layers under FSDP2's hooks were never run here; "
                         "use one of them")
    if c.recipe == "official" and not (c.init or c.resume):
        raise ValueError("--recipe official continues a trained model (every parameter at 5e-6): give --init; "
                         "pretraining at that rate here would leave the base near random")
    if c.fsdp and ("RANK" not in os.environ or not (c.init or c.resume)):
        raise ValueError("--fsdp needs torchrun and --init (it shards the model being extended, not pretraining)")
    if c.moshi_compile and os.environ.get("NO_TORCH_COMPILE"):
        raise ValueError(f"--moshi-compile needs moshi's torch.compile, which NO_TORCH_COMPILE="
                         f"{os.environ['NO_TORCH_COMPILE']} in the environment turns off")
    if c.moshi_compile and (c.mode in ("full", "ttt_layers") or not (c.init or c.resume)):
        raise ValueError(f"--moshi-compile with {'--mode ' + c.mode if c.init or c.resume else 'pretraining'}: "
                         f"moshi's norms train there, and a compiled norm's backward failed on a GPU "
                         f"(results/training_7b/gpu_preset_compile_failure_h100.log); use a mode that keeps them frozen")
    M.check_device(c.device)


def parsed_layers(layers: tp.Union[str, list]) -> tp.Union[str, list]:
    """--ttt-layers' comma list as integers in order (a set of layers: 2,0 is 0,2); a name ('default',
    'official', 'none') stays a name."""
    if not isinstance(layers, str) or layers in ("default", "official", "none"):
        return layers
    try:
        values = [int(v) for v in layers.split(",")]
    except ValueError:
        raise ValueError(f"--ttt-layers must be 'default', 'official', 'none' or a comma list of integers, "
                         f"got {layers!r}") from None
    if len(set(values)) < len(values):
        raise ValueError(f"--ttt-layers must name each layer once, got {layers!r}")
    return sorted(values)


def resolve_layers(layers: tp.Union[str, list], n_layers: int) -> list[int]:
    """--ttt-layers as layer indices: 'default', 'official' (every 6th) and 'none' by name."""
    if not isinstance(layers, str):
        return layers
    return {"default": ttt.default_layers(n_layers), "official": list(range(0, n_layers, 6)), "none": []}[layers]


def resumed_config(given: dict) -> tuple[Config, dict]:
    """--resume: the stored run, whole, and its checkpoint. A flag given with it must say what the
    run already is (else ValueError naming the flag, the stored and the given value)."""
    out = given.get("out", "out")
    path = os.path.join(out, "ckpt.pt")
    checkpoint = checkpoints.load_checkpoint(path)
    checkpoints.check_resumable(checkpoint, path)
    if not isinstance(checkpoint.get("config"), dict):
        raise ValueError(f"{path} holds no run configuration (written before runs stored theirs): "
                         f"start the run again")
    stored = {**CONFIG_BEFORE, **checkpoint["config"]}
    if isinstance(stored.get("grad_checkpointing"), bool):
        stored["grad_checkpointing"] = CHECKPOINTING_BEFORE[stored["grad_checkpointing"]]
    stored = Config(**stored)
    if isinstance(stored.ttt_layers, list):  # a set, as the flag is now read (an older run may have stored 2,0)
        stored.ttt_layers = sorted(stored.ttt_layers)
    model = checkpoint["settings"]["model"]
    layers = model.get("num_layers") or model.get("lm_kwargs", {}).get("num_layers", 0)
    given = dict(given, ttt_layers=resolve_layers(given["ttt_layers"], layers)) if "ttt_layers" in given else given
    for name, value in given.items():
        if name not in RESUME_FREE and value != getattr(stored, name):
            raise ValueError(f"{option(name)} {value!r} differs from the run being resumed ({path}: "
                             f"{getattr(stored, name)!r}); --resume continues the run as it was configured")
    if stored.fsdp and "RANK" not in os.environ:
        raise ValueError(f"{path} was saved with --fsdp: resume it the same way, under torchrun")
    return dataclasses.replace(stored, **{k: v for k, v in given.items() if k in RESUME_FREE}), checkpoint


def settle(c: Config, given: dict, settings: tp.Optional[dict], n_layers: int, multistream: bool) -> None:
    """Completes the config from the starting point, in place. An --init checkpoint fixes its L0, its
    window, its TTT, its YaRN's beta_fast and, once trained past L0, its --method; a Moshi-format
    one, L0 (its `context`) unless --original-len is given. A flag that contradicts what the
    checkpoint fixes is refused (ValueError naming both values)."""
    c.ttt_layers = resolve_layers(c.ttt_layers, n_layers)
    if "ttt_layers" in given:
        given["ttt_layers"] = resolve_layers(given["ttt_layers"], n_layers)
    if c.init and "preset" in given and any(settings["model"].get(k) != v for k, v in M.PRESETS[c.preset].items()):
        raise ValueError(f"--preset {c.preset} ({M.PRESETS[c.preset]}) is not the model of the --init "
                         f"{'Moshi-format model' if 'lm_kwargs' in settings['model'] else 'checkpoint'}, which the "
                         f"run takes from it: leave the flag out")
    if c.init and c.init.endswith(".safetensors"):
        if "original_len" not in given:
            if not settings["model"].get("context"):
                raise ValueError("the Moshi model has no finite context: give its L0 with --original-len")
            c.original_len = settings["model"]["context"]
        settings["original_len"] = settings["trained_len"] = c.original_len
    elif c.init:
        fixed = dict(original_len=settings["original_len"])
        if "window" in settings:  # None: trained without a window (--window 0), kept so
            fixed["window"] = settings["window"] or 0
        yarn_trained = settings.get("yarn") or {}
        if yarn_trained.get("method") == "yarn" and yarn_trained.get("scale", 1) > 1:  # the YaRN it trained with
            fixed["yarn_beta_fast"] = yarn_trained["beta_fast"]
        extended = checkpoints.trained_len(settings)
        if yarn_trained and extended > settings["original_len"]:  # extended past L0: further alike
            if given.get("method", yarn_trained["method"]) != yarn_trained["method"]:
                raise ValueError(f"--method {c.method} with an --init checkpoint extended to length {extended} with "
                                 f"--method {yarn_trained['method']}, the RoPE its weights trained with: leave "
                                 f"--method out to keep it, or --init its base")
            c.method = yarn_trained["method"]
            if "yarn_beta_fast" in given and c.method != "yarn":
                raise ValueError(f"--yarn-beta-fast is YaRN's; the --init checkpoint's --method {c.method} has none")
        if settings.get("ttt"):
            t = settings["ttt"]
            fixed.update({name: (not t[key]) if name == "ttt_no_target" else t.get(key, TTT_SETTING_BEFORE.get(key))
                          for name, key in FIXED_BY_INIT if key is not None})
            fixed["ttt_layers"] = sorted(fixed["ttt_layers"])  # a set (an older run may have stored 2,0)
            fixed["ttt_rope_modulo"] = bool(settings.get("ttt_rope_modulo"))
        if settings.get("lora"):  # its LoRA stays; a mode that trains a LoRA trains that one
            fixed.update(lora_rank=settings["lora"]["rank"], lora_scaling=settings["lora"]["scaling"])
            scope = settings["lora"].get("scope", "transformer")
            if c.mode in freeze.LORA_SCOPES and (scope == "ttt_mlp_in") != (c.mode == "ttt_lora_in"):
                raise ValueError(f"--mode {c.mode} trains a LoRA on {freeze.LORA_SCOPES[c.mode]}, and the --init "
                                 f"checkpoint already has one on {scope}; extend it with another --mode")
        recipe = RECIPES[c.recipe] if "recipe" in given else {}  # a recipe named is asked for as its flags are
        for name, value in fixed.items():
            asked, flag = (given[name], option(name)) if name in given else (recipe.get(name), "--recipe")
            if name == "ttt_layers" and name not in given and asked is not None:
                asked = resolve_layers(asked, n_layers)
            if asked is not None and asked != value:
                shown = ",".join(map(str, value)) if isinstance(value, list) else value  # as the flag is written
                via, keep = ((f" (--recipe {c.recipe})", f"give {option(name)} {shown} with --recipe {c.recipe}")
                             if flag == "--recipe" else ("", f"leave {flag} out"))
                raise ValueError(f"{option(name)} {asked!r}{via} contradicts the --init checkpoint, whose {name} is "
                                 f"{value!r}; {keep} to keep it")
            setattr(c, name, value)
    if c.window is None:  # a small model sees 2 L0: YaRN matters beyond L0, and only TTT beyond 2 L0;
        c.window = 0 if multistream else 2 * c.original_len  # a Moshi model its context (YaRN widens it)
    if any(not 0 <= i < n_layers for i in c.ttt_layers):
        raise ValueError(f"--ttt-layers {c.ttt_layers} out of range: the model has layers 0..{n_layers - 1}")


def continued(stages: list[dict], trained: int, trained_scale: float) -> list[dict]:
    """An --init's stages: the curriculum's past the length the checkpoint trained at, so an extended
    checkpoint goes on from there (a --scale that ends there trains that last stage again); ValueError
    for a --scale that ends below it, which would take back the extension its weights were trained for."""
    if later := [s for s in stages if s["length"] > trained]:
        return later
    if stages[-1]["length"] == trained:
        return stages[-1:]
    raise ValueError(f"--scale {stages[-1]['scale']:g} ends at length {stages[-1]['length']}, below the "
                     f"{trained} the --init checkpoint trained at (its scale {trained_scale:g}): give --scale "
                     f"{trained_scale:g} to train that stage again or a larger one to extend it, or --init its base")


def curriculum(scale: float, original_len: int, pretrain: bool) -> list[dict]:
    """Stage 0 pretrains at L0 (scale 1), then lengths double with the scale up to `scale`."""
    stages = [dict(kind="pretrain", length=original_len, scale=1.0)] if pretrain else []
    s = 1.0
    while True:
        s = min(2 * s, scale)
        stages.append(dict(kind="extend", length=math.ceil(s * original_len), scale=s))
        if s >= scale:
            return stages


@dataclasses.dataclass
class Start:
    """What a run starts from, checked: the model (None: pretrain a new one), its settings, the
    resumed checkpoint (or None), the corpus and the stages."""
    model: tp.Any
    settings: dict
    resume: tp.Optional[dict]
    corpus: tp.Any
    multistream: bool
    stages: list


def start(c: Config, given: dict) -> Start:
    """The starting point and the data for `c`, completing `c` in place (see the module docstring).
    Every output path is checked writable first. ValueError, one line, on anything wrong."""
    checkpoints.check_writable(c.out, folder=True)
    if c.resume:
        resumed, resume = resumed_config(given)
        for f in dataclasses.fields(Config):
            setattr(c, f.name, getattr(resumed, f.name))
        check(c)
        settings = copy.deepcopy(resume["settings"])
        if not c.init:  # the base it pretrains is its own: in --out, which may have moved since
            settings["base_path"] = os.path.join(c.out, "base.pt")
    else:
        resume = None
        settings, checkpoint = checkpoints.starting_settings(c.init, c.init_config)
    multistream = settings is not None and "lm_kwargs" in settings["model"]
    if multistream and not c.data:
        raise ValueError("a Moshi-format model trains on --data token arrays (.npy, [K, T])")
    if not resume:  # the flags against the starting point's settings, before its weights are read
        settle(c, given, settings, M.num_layers(settings["model"]) if settings else M.PRESETS[c.preset]["num_layers"],
               multistream)
    model = (checkpoints.model_from_checkpoint(resume, "cpu", os.path.join(c.out, "ckpt.pt")) if resume
             else checkpoints.starting_model(c.init, c.init_config, checkpoint) if c.init else None)
    corpus = data.load_token_arrays(c.data, model.num_codebooks) if multistream else data.load_corpus(c.data)
    if model is None:  # pretrain a new model from scratch
        settings = M.new_settings(dict(M.PRESETS[c.preset], context=c.original_len), c.original_len,
                                  os.path.join(c.out, "base.pt"))
        torch.manual_seed(c.seed)
        model = M.build_model(settings["model"])
    M.check_checkpointing(model, c.grad_checkpointing)  # before any work
    if c.compile_layers and not c.device.startswith("cuda") and M.low_precision(model):
        raise ValueError("--compile-layers on a CPU with bf16 weights: inductor's CPU code generation fails on "
                         "them (torch 2.13); compile on a GPU, or leave the flag out")
    if c.yarn_beta_fast is None:  # from the model's RoPE geometry, then stored with the run
        attention = model.transformer.layers[0].self_attn
        c.yarn_beta_fast = yarn.beta_fast_like_moshi(attention.embed_dim // attention.num_heads,
                                                     model.transformer.rope.max_period, c.original_len)
    stages = resume["stages"] if resume else curriculum(c.scale, c.original_len, pretrain=not c.init)
    if c.init and not resume:
        trained = checkpoints.trained_len(settings)
        stages = continued(stages, trained, (settings.get("yarn") or {}).get("scale") or trained / c.original_len)
    if c.pretrain_only and stages[0]["kind"] != "pretrain":
        raise ValueError("--pretrain-only needs a run that pretrains (no --init)")
    stages = stages[:1] if c.pretrain_only else stages
    if (longest := max(s["length"] for s in stages)) > (have := corpus.longest()):
        raise ValueError(f"stage length {longest} needs more {'token steps' if multistream else 'text'} than the "
                         f"corpus has (the shorter of train and validation: {have})")
    shortest = min((s["length"] for s in stages if s["kind"] == "extend"), default=math.inf)
    window = c.window or None
    if c.ttt_chunk is None:  # --recipe official: 4096 (for 64k-token sequences), capped
        c.ttt_chunk = min(4096, window or shortest, shortest // 2)
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"TTT chunk {c.ttt_chunk}: the official 4096 capped by the attention window (a longer "
                  f"chunk leaves tokens no layer sees) and half the shortest sequence (the fast weight must update)")
    if window and c.ttt_layers and c.ttt_chunk > window:
        raise ValueError(f"--ttt-chunk {c.ttt_chunk} is longer than --window {window}: tokens more than {window} "
                         f"steps into a chunk would be seen by neither attention nor the fast weight")
    if c.ttt_layers and c.ttt_chunk >= shortest:
        raise ValueError(f"--ttt-chunk {c.ttt_chunk} must be shorter than the sequences ({shortest}): "
                         f"with one chunk the fast weights never update")
    return Start(model, settings, resume, corpus, multistream, stages)

"""Long-context extension of a Moshi transformer: YaRN + In-Place TTT, trained with a curriculum.

    python train.py --scale 4 --mode ttt_only                    # one process
    torchrun --nproc_per_node=2 train.py --scale 4 --mode ttt_only # DDP (gloo on CPU, nccl on CUDA)

Without --init, stage 0 pretrains a small base from scratch at L0 (out/base.pt). Then one stage
per doubling, 2 L0, 4 L0, ... with YaRN at scale 2, 4, ... up to --scale, TTT in the chosen
layers, the freeze --mode applied, attention kept to a window of --window steps (2 L0). The run
ends with a table of each effect against its control (eval_passkey.final_table).
"""
import contextlib
import math
import os
import sys
import time

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
# capped in main), every 6th layer, every parameter at 5e-6, weight decay 0.1, 2 % warmup, cosine,
# one global clipping at 1.0. The project's defaults differ on purpose (README, "Defaults").
RECIPES = {"project": {},
           "official": dict(ttt_eta=3.0, ttt_chunk=None, ttt_layers="official", mode="full", lr=5e-6, lr_ttt=5e-6,
                            weight_decay=0.1, ttt_weight_decay=0.1, warmup=0.02, clip="global", grad_clip=1.0)}


def parse_args(argv=None):
    """The command line, every value checked before any work starts."""
    p = eval_passkey.OneLineParser(prog="train.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--recipe", default="project", choices=tuple(RECIPES), help="defaults: ours or the official ones (README)")
    a("--scale", type=float, default=4.0, help="final YaRN scale; stages double the length up to it")
    a("--mode", default="ttt_only", choices=freeze.MODES, help="what trains in the extension stages")
    a("--method", default="yarn", choices=yarn.METHODS[1:], help="RoPE scaling in the extension stages")
    a("--init", default=None, help="a base to extend: out/base.pt, or a model.safetensors with --init-config")
    a("--init-config", default=None, help="json of the LMModel arguments of a .safetensors --init")
    a("--resume", action="store_true", help="continue from out/ckpt.pt")
    a("--pretrain-only", action="store_true", help="stop after pretraining the base (out/base.pt)")
    a("--original-len", type=int, default=128, help="L0: the length the base model is (pre)trained at")
    a("--window", type=int, default=None, help="attention's sliding window W in every stage (default 2 L0, "
      "so needles farther back only TTT can carry; 0: none, attention sees the whole sequence)")
    a("--preset", default="cpu", choices=sorted(M.PRESETS), help="model size when pretraining")
    a("--data", nargs="+", default=None, help="UTF-8 text files (default: the Python stdlib source)")
    a("--passkey-share", type=float, default=0.5, help="share of training sequences that are passkeys")
    a("--answer-weight", type=float, default=20.0, help="loss weight of the passkey answer digits")
    a("--passkey-max-depth", type=float, default=1.0, help="training needles at depths in [0, this]")
    a("--ttt-layers", default="default", help="comma list, 'default', 'official' (every 6th) or 'none'")
    a("--ttt-chunk", type=int, default=64, help="TTT chunk size C (--recipe official: 4096, capped)")
    a("--ttt-eta", type=float, default=0.3, help="TTT inner learning rate eta")
    a("--ttt-target", default="hidden", choices=("hidden", "embeddings"), help="targets from the MLP input or X0")
    a("--ttt-kernel", type=int, default=5, help="target conv kernel size (odd)")
    a("--ttt-target-std", type=float, default=0.02, help="std of W_target's initial diagonal")
    a("--ttt-no-target", action="store_true", help="no W_target: V = Conv1D(X) (official ttt_proj: false)")
    a("--ttt-rope-modulo", action="store_true", help="modulo RoPE on Z in the fast-weight path (ours)")
    a("--lora-rank", type=int, default=8)
    a("--lora-scaling", type=float, default=2.0)
    a("--text-padding-weight", type=float, default=0.5, help="token streams: text padding tokens' weight")
    a("--first-codebook-weight", type=float, default=1.0, help="token streams: first audio codebook's weight")
    a("--pretrain-steps", type=int, default=600)
    a("--steps", type=int, default=40, help="steps per extension stage")
    a("--batch", type=int, default=16, help="global batch in sequences")
    a("--grad-accum", type=int, default=1, help="micro-steps per step")
    a("--lr", type=float, default=2e-3, help="peak learning rate of base weights")
    a("--lr-ttt", type=float, default=2e-3, help="peak learning rate of the TTT conv and W_target")
    a("--weight-decay", type=float, default=0.1)
    a("--ttt-weight-decay", type=float, default=0.0)
    a("--warmup", type=float, default=0.1, help="warmup, a fraction of each stage's steps")
    a("--grad-clip", type=float, default=1.0, help="the gradient norm's bound (see --clip)")
    a("--clip", default="per-group", choices=("per-group", "global"), help="TTT and base apart, or together")
    a("--grad-checkpointing", action="store_true")
    a("--fsdp", action="store_true", help="FSDP2: shard the extended model across torchrun's processes")
    a("--eval-trials", type=int, default=10, help="passkey documents per depth in evaluations")
    a("--log-every", type=int, default=25)
    a("--save-every", type=int, default=100, help="steps between checkpoints inside a stage")
    a("--out", default="out")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if RECIPES[args.recipe]:  # the recipe's values become the defaults, explicit flags still win
        p.set_defaults(**RECIPES[args.recipe])
        args = p.parse_args(argv)
    fail = p.error  # one line on stderr, exit code 2, nothing written
    flag = lambda name: "--" + name.replace("_", "-")
    for name in ("original_len", "steps", "batch", "grad_accum", "ttt_chunk", "eval_trials", "log_every",
                 "save_every", "lora_rank", "pretrain_steps", "window"):
        least = 0 if name in ("pretrain_steps", "window") else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            fail(f"{flag(name)} must be >= {least}, got {getattr(args, name)}")
    for name in ("lr", "lr_ttt", "ttt_eta", "ttt_target_std", "weight_decay", "ttt_weight_decay", "grad_clip",
                 "answer_weight", "lora_scaling", "text_padding_weight", "first_codebook_weight"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            fail(f"{flag(name)} must be a finite number >= 0, got {getattr(args, name)}")
        if name in ("lr", "lr_ttt") and getattr(args, name) > 1e37:  # AdamW's first step divides by 0.1
            fail(f"{flag(name)} must be <= 1e37, got {getattr(args, name)}")
    if not 0 <= args.warmup < 1:
        fail(f"--warmup is a fraction of each stage's steps, in [0, 1), got {args.warmup}")
    for name in ("passkey_share", "passkey_max_depth"):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"{flag(name)} must be in [0, 1], got {getattr(args, name)}")
    if not (math.isfinite(args.scale) and args.scale >= 1):
        fail(f"--scale must be >= 1, got {args.scale}")
    if args.ttt_kernel < 1 or args.ttt_kernel % 2 == 0:
        fail(f"--ttt-kernel must be odd and >= 1, got {args.ttt_kernel}")
    if args.original_len < 128:
        fail(f"--original-len must be >= 128 (a passkey document needs 104 bytes), got {args.original_len}")
    if args.ttt_layers not in ("default", "official", "none"):
        try:
            args.ttt_layers = [int(v) for v in args.ttt_layers.split(",")]
        except ValueError:
            fail(f"--ttt-layers must be 'default', 'official', 'none' or a comma list of integers, "
                 f"got {args.ttt_layers!r}")
    if args.ttt_layers == "none" and args.mode != "full":
        fail("--ttt-layers none (no TTT) needs --mode full: the other modes train TTT parameters")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.batch % (world * args.grad_accum):
        fail(f"--batch {args.batch} must be divisible by processes x --grad-accum = {world * args.grad_accum}")
    if not 0 <= args.seed < 10 ** 6:
        fail(f"--seed must be in [0, 1000000), got {args.seed}")
    if bool(args.init and args.init.endswith(".safetensors")) != bool(args.init_config):
        fail("--init-config goes with a .safetensors --init, and only with one")
    if args.fsdp and ("RANK" not in os.environ or not (args.init or args.resume)):
        fail("--fsdp needs torchrun and --init (it shards the model being extended, not pretraining)")
    if args.init and args.resume:
        fail("--init and --resume exclude each other (--resume reads out/ckpt.pt)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device} but CUDA is not available")
    return args, fail


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
    args, fail = parse_args(argv)

    # --- distributed set-up: RANK in the environment means torchrun started us
    ddp = "RANK" in os.environ
    rank, world = 0, 1
    if ddp:
        dist.init_process_group(backend="nccl" if args.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.device.startswith("cuda"):
            args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(args.device)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    device = torch.device(args.device)

    # --- the starting point and the data, all checked before any training
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    try:
        model, settings, resume = M.starting_point(args.init, args.init_config, ckpt_path if args.resume else None,
                                                   args.original_len)
        multistream = model is not None and "lm_kwargs" in settings["model"]
        if multistream and not args.data:
            fail("a Moshi-format model trains on --data token arrays (.npy, [K, T])")
        corpus = data.load_token_arrays(args.data, model.num_codebooks) if multistream else data.load_corpus(args.data)
    except ValueError as e:
        fail(str(e))
    if model is None:  # pretrain a new model from scratch
        settings = M.new_settings(dict(M.PRESETS[args.preset], context=args.original_len), args.original_len,
                                  os.path.join(args.out, "base.pt"))
        torch.manual_seed(args.seed)
        model = M.build_model(settings["model"])
    elif settings["original_len"] != args.original_len:
        log(f"using the checkpoint's original length {settings['original_len']}")
        args.original_len = settings["original_len"]
    if args.window is None:  # a resumed or windowed start keeps its window; a Moshi model its context
        # (YaRN widens it); a small model sees 2 L0: YaRN matters beyond L0, and only TTT beyond 2 L0
        args.window = (settings.get("window") if resume or settings.get("window") else None if multistream
                       else 2 * args.original_len)
    args.window = args.window or None
    if args.window and args.ttt_layers != "none" and args.ttt_chunk and args.ttt_chunk > args.window:
        fail(f"--ttt-chunk {args.ttt_chunk} is longer than --window {args.window}: tokens more than "
             f"{args.window} steps into a chunk would be seen by neither attention nor the fast weight")
    settings["loss"] = dict(text_padding_weight=args.text_padding_weight,
                            first_codebook_weight=args.first_codebook_weight)
    stages = resume["stages"] if resume else curriculum(args.scale, args.original_len, pretrain=not args.init)
    if args.pretrain_only and stages[0]["kind"] != "pretrain":
        fail("--pretrain-only needs a run that pretrains (no --init)")
    stages = stages[:1] if args.pretrain_only else stages
    if (longest := max(s["length"] for s in stages)) > (have := corpus.longest()):
        fail(f"stage length {longest} needs more {'token steps' if multistream else 'text'} than the corpus "
             f"has (the shorter of train and validation: {have})")
    n_layers = len(model.transformer.layers)
    named = {"default": ttt.default_layers(n_layers), "official": list(range(0, n_layers, 6)), "none": []}
    ttt_layers = named[args.ttt_layers] if isinstance(args.ttt_layers, str) else args.ttt_layers
    if any(not 0 <= i < n_layers for i in ttt_layers):
        fail(f"--ttt-layers {ttt_layers} out of range: the model has layers 0..{n_layers - 1}")
    shortest = min((s["length"] for s in stages if s["kind"] == "extend"), default=math.inf)
    if args.ttt_chunk is None:  # --recipe official: 4096 (for 64k-token sequences), capped
        args.ttt_chunk = min(4096, args.window or shortest, shortest // 2)
        log(f"TTT chunk {args.ttt_chunk}: the official 4096 capped by the attention window (a longer chunk "
            f"leaves tokens no layer sees) and half the shortest sequence (the fast weight must update)")
    if ttt_layers and args.ttt_chunk >= shortest:
        fail(f"--ttt-chunk {args.ttt_chunk} must be shorter than the sequences ({shortest}): "
             f"with one chunk the fast weights never update")
    if resume and resume["step"] > 0 and bool(resume["settings"].get("fsdp")) != args.fsdp:
        fail(f"{ckpt_path} was saved {'without' if args.fsdp else 'with'} --fsdp: resume it the same way")

    # --- the model on its device
    model.to(device)
    if device.type == "cuda":  # the window's pairs only (flex_attention); equal to moshi's masked attention
        window_attention.apply_window_attention(model)
    for transformer in (model.transformer, model.depformer):  # the depformer runs over B x T sequences
        if transformer is not None:
            transformer.checkpointing = args.grad_checkpointing
    # bf16 autocast on a GPU and wherever weights are stored in bf16 (a Moshi checkpoint): frozen
    # weights stay bf16, trained ones are float32 (freeze.upcast_trainable)
    low_precision = M.low_precision(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" or low_precision
                else contextlib.nullcontext())
    log(f"corpus: {corpus.files} files, {len(corpus.train):,} train / {len(corpus.val):,} validation "
        f"{'token arrays' if multistream else 'bytes'}, sha256 {corpus.sha256[:16]}")
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters {settings['model']}; {world} "
        f"process(es) on {device}; stages " + ", ".join(f"{s['length']} (x{s['scale']:g})" for s in stages))
    if args.method == "yarn" and args.scale > 1 and shortest < math.inf:
        attention, base = model.transformer.layers[0].self_attn, model.transformer.rope.max_period
        head_dim = attention.embed_dim // attention.num_heads
        log(f"YaRN's RoPE pairs kept / blended / interpolated: {yarn.split_counts(head_dim, base, args.original_len)}"
            f" at head dim {head_dim}, L0 {args.original_len}; Moshi 7B's: {yarn.split_counts(128, 10_000.0, 3000)}")

    sharded, view = False, model
    for stage_index in range(resume["stage"] if resume else 0, len(stages)):
        stage = stages[stage_index]
        length, extending = stage["length"], stage["kind"] == "extend"
        # --- this stage's model: YaRN at its scale, the window, TTT, LoRA and the freeze mode
        if extending:
            yarn.apply_yarn(model, stage["scale"], args.original_len, method=args.method)
            settings["yarn"] = model.yarn_settings
        if args.window:  # Moshi's own setting: a sliding window, in pretraining too
            M.set_context(model, args.window)
            settings["window"] = args.window
        if not extending:
            model.requires_grad_(True)
        elif ttt_layers and not settings["ttt"]:
            torch.manual_seed(args.seed + 1)  # the same W_target init on every rank
            settings["ttt"] = dict(layers=ttt_layers, chunk_size=args.ttt_chunk, eta=args.ttt_eta,
                                   kernel_size=args.ttt_kernel, target_source=args.ttt_target,
                                   target_init_std=args.ttt_target_std, target=not args.ttt_no_target)
            settings["ttt_rope_modulo"] = args.ttt_rope_modulo
            M.install(model, dict(ttt=settings["ttt"], ttt_rope_modulo=args.ttt_rope_modulo)).to(device)
        if extending and args.mode == "lora_ttt" and not settings.get("lora"):
            freeze.apply_lora(model, args.lora_rank, args.lora_scaling)
            settings["lora"] = model.lora_settings
        if extending and settings["ttt"]:
            log(freeze.format_summary(freeze.apply_freeze(model, args.mode)))
        settings["mode"], settings["trained_len"] = args.mode if extending else settings["mode"], length
        freeze.upcast_trainable(model)
        if (shortfall := M.gpu_shortfall(model, device, world if args.fsdp else 1)) is not None:
            fail(f"--mode {args.mode} needs {shortfall}; train fewer parameters or shard them (--fsdp)")
        if args.fsdp and not sharded:  # after TTT, LoRA and the freeze mode: the model's shape is final
            M.shard(model, bf16=low_precision, multistream=multistream)  # float32 gathers as float32
            sharded = settings["fsdp"] = True

        # --- the optimizer: decay on matrices only; TTT's parameters have their own lr and decay
        ttt_ids = {id(p) for m in freeze.ttt_modules(model) for p in m.ttt_parameters()}
        ttt_params = [p for p in model.parameters() if p.requires_grad and id(p) in ttt_ids]
        base_params = [p for p in model.parameters() if p.requires_grad and id(p) not in ttt_ids]
        groups = [dict(params=[p for p in base_params if p.dim() >= 2], weight_decay=args.weight_decay, name="base"),
                  dict(params=[p for p in base_params if p.dim() < 2], weight_decay=0.0, name="base"),
                  dict(params=ttt_params, weight_decay=args.ttt_weight_decay, name="ttt")]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
        steps = args.steps if extending else args.pretrain_steps
        first_step = 0
        if resume and stage_index == resume["stage"] and resume["step"] > 0:
            try:
                M.load_optimizer_state(model, optimizer, resume["optimizer"], sharded)
            except (ValueError, KeyError, RuntimeError) as e:
                fail(f"{ckpt_path}: its optimizer state does not fit this run's parameters ({e})")
            first_step = resume["step"]
        net = M.Objective(model, args.answer_weight, settings["loss"])
        if ddp and not sharded:
            net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        clip_groups = [(name, params) for name, params in (
            (("ttt", ttt_params), ("base", base_params)) if args.clip == "per-group"
            else (("all", ttt_params + base_params),)) if params]
        log(f"stage {stage_index}: {stage['kind']} at length {length}, scale {stage['scale']:g}, "
            f"{steps} steps, batch {args.batch}")
        # --- the loop. The host does not wait for the GPU inside a step: the loss stays a tensor, and
        # the first step with a non-finite gradient norm is recorded on the device and read before
        # any log line or save, so no checkpoint is ever written from non-finite weights.
        micro = args.batch // world // args.grad_accum
        model.train()
        t0, tokens_done = time.time(), 0
        first_bad = torch.full((len(clip_groups),), -1, device=device)
        for step in range(first_step, steps):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, steps, args.lr_ttt if g["name"] == "ttt" else args.lr, args.warmup)
            # The global batch depends only on (seed, stage length and kind, step): the same sequences
            # whatever the number of processes, with or without --init, and after --resume.
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + (2 * length + extending) * 100_003 + step)
            if multistream:
                batch = data.token_windows(corpus.train, length, args.batch, generator)
                answer = torch.zeros(args.batch, dtype=torch.bool)  # no passkey documents here
            else:
                batch, answer = data.training_batch(corpus.train, length, args.batch, args.passkey_share, generator,
                                                    args.passkey_max_depth)
            mine = slice(rank * micro * args.grad_accum, (rank + 1) * micro * args.grad_accum)
            batch, answer = batch[mine].to(device), answer[mine].to(device)
            loss_sum = torch.zeros((), device=device)
            for k in range(args.grad_accum):
                sync = k == args.grad_accum - 1  # all-reduce only on the last micro-step
                if sharded:
                    model.set_requires_gradient_sync(sync)
                with (net.no_sync() if ddp and not sharded and not sync else contextlib.nullcontext()), autocast:
                    loss = net(batch[k * micro:(k + 1) * micro], answer[k * micro:(k + 1) * micro]) / args.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            # Clipped per group by default, so TTT's small gradients are not scaled by the base's (the
            # log shows the TTT norm before any clipping). Gradients are all-reduced: every rank sees
            # the same norms and stops together.
            ttt_norm = (torch.nn.utils.get_total_norm([p.grad for p in ttt_params if p.grad is not None])
                        if ttt_params and args.clip == "global" else None)
            norms = {name: torch.nn.utils.clip_grad_norm_(params, args.grad_clip) for name, params in clip_groups}
            norms = {name: getattr(norm, "full_tensor", lambda: norm)() for name, norm in norms.items()}  # FSDP2
            ttt_norm = norms.get("ttt", getattr(ttt_norm, "full_tensor", lambda: ttt_norm)())
            finite = torch.stack([norm.isfinite() for norm in norms.values()])
            first_bad = torch.where(~finite & (first_bad < 0), step, first_bad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_done += args.batch * length
            last = step == steps - 1
            logging, saving = step % args.log_every == 0 or last, (step + 1) % args.save_every == 0 and not last
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
                    M.save_checkpoint(ckpt_path, dict(model=state, settings=settings, stages=stages, stage=stage_index,
                                                      step=step + 1, optimizer=optimizer_state))

        # --- stage end: validation, passkey, checkpoint (a sharded model is evaluated whole, on rank 0)
        del optimizer, net  # the next stage makes its own: room for a sharded model's whole copy
        state = M.full_state(model, sharded=sharded)[0]
        if master:
            checkpoint = dict(model=state, settings=settings, stages=stages, stage=stage_index + 1, step=0,
                              optimizer={})
            view = M.model_from_checkpoint(checkpoint, device, ckpt_path) if sharded else model
            if sharded and settings["ttt"]:
                freeze.apply_freeze(view, args.mode)
            log(f"stage {stage_index} done: " + eval_passkey.stage_report(view, corpus, length, args.eval_trials,
                                                                         device, multistream, settings["loss"]))
            if not extending:
                M.save_checkpoint(settings["base_path"], dict(checkpoint, stage=0))
            M.save_checkpoint(ckpt_path, checkpoint)

    # --- the end: the trained parameters alone (to load on the base), then the final table
    if master and not args.pretrain_only:
        if settings.get("base_path") and os.path.isfile(settings["base_path"]):
            M.save_adapter(os.path.join(args.out, "adapter.pt"), view, settings, settings["base_path"])
        eval_passkey.final_report(view, settings, stages, args, corpus, device, multistream)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Long-context extension of a Moshi transformer: YaRN + In-Place TTT, trained with a curriculum.

    python train.py --scale 4 --mode ttt_only                    # one process
    torchrun --nproc_per_node=2 train.py --scale 4 --mode ttt_only # DDP (gloo on CPU, nccl on CUDA)

Without --init, stage 0 pretrains a small base from scratch at L0 (out/base.pt). Then one stage
per doubling, 2 L0, 4 L0, ... with YaRN at scale 2, 4, ... up to --scale, TTT in the chosen
layers, the freeze --mode applied, attention kept to a window of --window steps (2 L0). The run
ends with a table of each effect against its control (eval_passkey.final_table). The run's
configuration is config.Config, stored whole in every checkpoint: --resume continues it exactly.
"""
import contextlib
import dataclasses
import math
import os
import sys
import time
import typing as tp

# moshi compiles its norms and RoPE (its gating kernel only outside training) only if NO_TORCH_COMPILE
# is empty when it loads: loaded so, and a run keeps them eager (compiling dominates small runs)
# unless --moshi-compile
os.environ.setdefault("NO_TORCH_COMPILE", "")

import torch
import torch.distributed as dist
from moshi.utils.compile import no_compile
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoints
import data
import depformer_steps
import eval_passkey
import freeze
import model as M
import window_attention
import yarn
from config import Config, parse_args, start


def lr_at(step: int, steps: int, peak: float, warmup_fraction: float) -> float:
    """Linear warmup over a fraction of the stage's steps, so every stage reaches its peak, then
    cosine decay to a tenth of the peak."""
    warmup = math.ceil(warmup_fraction * steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def prepare_stage(model, stage: dict, config: Config, settings: dict, device, world: int, sharded: bool,
                  bf16: bool) -> tuple[bool, str]:
    """This stage's model, in place: YaRN at the stage's scale, the window, TTT (once), LoRA (once),
    the freeze mode, then FSDP once the shape is final (`bf16`: gathered in bf16, for a model stored
    so). Records each in `settings`; returns whether the model is sharded, and what trains. ValueError
    if what trains cannot fit the GPU."""
    extending = stage["kind"] == "extend"
    if extending:
        yarn.apply_yarn(model, stage["scale"], config.original_len, method=config.method,
                        beta_fast=config.yarn_beta_fast)
        settings["yarn"] = model.yarn_settings
    settings["window"] = config.window or None
    if settings["window"]:  # Moshi's own setting: a sliding window, in pretraining too
        M.set_context(model, settings["window"])
    if not extending:
        model.requires_grad_(True)
    elif config.ttt_layers and not settings["ttt"]:
        torch.manual_seed(config.seed + 1)  # the same W_target init on every rank
        settings["ttt"] = dict(layers=config.ttt_layers, chunk_size=config.ttt_chunk, eta=config.ttt_eta,
                               kernel_size=config.ttt_kernel, target_source=config.ttt_target,
                               target_init_std=config.ttt_target_std, target=not config.ttt_no_target,
                               decay=config.ttt_decay, update_clip=config.ttt_update_clip,
                               average_after=config.ttt_average_after, delta=config.ttt_delta)
        settings["ttt_rope_modulo"] = config.ttt_rope_modulo
        M.install(model, dict(ttt=settings["ttt"], ttt_rope_modulo=config.ttt_rope_modulo)).to(device)
    if extending and config.mode in freeze.LORA_SCOPES and not settings.get("lora"):
        freeze.apply_lora(model, config.lora_rank, config.lora_scaling, freeze.LORA_SCOPES[config.mode])
        settings["lora"] = model.lora_settings
    depformer_steps.apply_contiguous_steps(model)  # after LoRA: its Linears too; once is enough, again is a no-op
    summary = freeze.format_summary(freeze.apply_freeze(model, config.mode)) if extending and settings["ttt"] else ""
    settings["mode"] = config.mode if extending else settings["mode"]
    settings["trained_len"] = stage["length"]
    freeze.upcast_trainable(model)
    if (shortfall := M.gpu_shortfall(model, device, world if config.fsdp else 1)) is not None:
        raise ValueError(f"--mode {config.mode} needs {shortfall}; train fewer parameters or shard them (--fsdp)")
    if config.fsdp and not sharded:  # FSDP2, after TTT, LoRA and the freeze mode: the model's shape is final
        M.shard(model, bf16=bf16, multistream="lm_kwargs" in settings["model"])
        sharded = settings["fsdp"] = True
    return sharded, summary


def configure_optimizer(model, config: Config):
    """AdamW over what trains: decay on matrices only; TTT's parameters (conv, W_target) have their
    own learning rate and decay. Returns it with the TTT and the base parameters."""
    ttt_ids = {id(p) for m in freeze.ttt_modules(model) for p in m.ttt_parameters()}
    ttt_params = [p for p in model.parameters() if p.requires_grad and id(p) in ttt_ids]
    base_params = [p for p in model.parameters() if p.requires_grad and id(p) not in ttt_ids]
    groups = [dict(params=[p for p in base_params if p.dim() >= 2], weight_decay=config.weight_decay, name="base"),
              dict(params=[p for p in base_params if p.dim() < 2], weight_decay=0.0, name="base"),
              dict(params=ttt_params, weight_decay=config.ttt_weight_decay, name="ttt")]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95)), ttt_params, base_params


def step_batch(config: Config, corpus, multistream: bool, length: int, extending: bool, step: int):
    """The global batch of one step (sequences, whether each is a passkey document). It depends only
    on (seed, stage length and kind, step): the same sequences whatever the number of processes,
    with or without --init, and after --resume."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + (2 * length + extending) * 100_003 + step)
    if multistream:  # no passkey documents in token streams
        return (data.token_windows(corpus.train, length, config.batch, generator),
                torch.zeros(config.batch, dtype=torch.bool))
    return data.training_batch(corpus.train, length, config.batch, config.passkey_share, generator,
                               config.passkey_max_depth)


@contextlib.contextmanager
def tf32_products():
    """Float32 matrix products in TF32 on a GPU while a step trains. Under bf16 autocast the only
    float32 ones are the erase's (ttt_delta_scan), from bf16 keys and rounded to bf16 after: TF32
    costs little next to bf16's own rounding, and the 7B step is 1.05x faster (results/training_7b).
    Evaluations keep float32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def backward(net, batch: torch.Tensor, answer: torch.Tensor, micro_steps: int, sharded_model, ddp: bool,
             autocast) -> torch.Tensor:
    """This process's share of the batch, forward and backward in `micro_steps` pieces; gradients are
    all-reduced (DDP, or FSDP2 on `sharded_model`) on the last piece only. Returns the loss, a tensor:
    the host does not wait for the GPU here."""
    micro, loss_sum = batch.shape[0] // micro_steps, torch.zeros((), device=batch.device)
    for k in range(micro_steps):
        sync = k == micro_steps - 1
        if sharded_model is not None:
            sharded_model.set_requires_gradient_sync(sync)
        with (net.no_sync() if ddp and not sync else contextlib.nullcontext()), tf32_products():
            with autocast:
                loss = net(batch[k * micro:(k + 1) * micro], answer[k * micro:(k + 1) * micro]) / micro_steps
            loss.backward()
        loss_sum += loss.detach()
    return loss_sum


def clip_gradients(clip_groups: list, ttt_params: list, config: Config) -> tuple[dict, tp.Optional[torch.Tensor]]:
    """Clipped per group by default, so TTT's small gradients are not scaled by the base's. Returns
    each group's norm before clipping and TTT's (None without TTT), as tensors; every rank sees the
    same norms (the gradients are all-reduced), so all stop together on a non-finite one."""
    ttt_norm = (torch.nn.utils.get_total_norm([p.grad for p in ttt_params if p.grad is not None])
                if ttt_params and config.clip == "global" else None)
    norms = {name: torch.nn.utils.clip_grad_norm_(params, config.grad_clip) for name, params in clip_groups}
    norms = {name: getattr(norm, "full_tensor", lambda: norm)() for name, norm in norms.items()}  # FSDP2
    return norms, norms.get("ttt", getattr(ttt_norm, "full_tensor", lambda: ttt_norm)())


def describe(model, corpus, settings: dict, config: Config, stages: list[dict], where: str,
             multistream: bool) -> str:
    """The run's opening lines: the corpus, the model and its stages, and how YaRN splits its RoPE
    pairs next to Moshi 7B's."""
    lines = [f"corpus: {corpus.files} files, {len(corpus.train):,} train / {len(corpus.val):,} validation "
             f"{'token arrays' if multistream else 'bytes'}, sha256 {corpus.sha256[:16]}",
             f"model: {sum(p.numel() for p in model.parameters()):,} parameters {settings['model']}; {where}; "
             f"stages " + ", ".join(f"{s['length']}" + ("" if config.method == "none" else f" (x{s['scale']:g})")
                                    for s in stages)]
    if config.method == "yarn" and config.scale > 1 and any(s["kind"] == "extend" for s in stages):
        attention, base = model.transformer.layers[0].self_attn, model.transformer.rope.max_period
        head_dim = attention.embed_dim // attention.num_heads
        lines.append(f"YaRN's RoPE pairs kept / blended / interpolated: "
                     f"{yarn.split_counts(head_dim, base, config.original_len, config.yarn_beta_fast)} at head dim "
                     f"{head_dim}, L0 {config.original_len}, beta_fast {config.yarn_beta_fast:g}; Moshi 7B's: "
                     f"{yarn.split_counts(128, 10_000.0, 3000)} (beta_fast 32)")
    return "\n".join(lines)


def main(argv=None):
    config, given = parse_args(argv)
    with contextlib.nullcontext() if config.moshi_compile else no_compile():
        train(config, given)


def train(config: Config, given: dict):
    """The run the configuration describes: its starting point, the stages, the final table."""
    fail = eval_passkey.OneLineParser(prog="train.py").error  # one line on stderr, exit 2, nothing written
    try:  # the configuration completed from the starting point, the data, the stages: all checked
        run = start(config, given)
    except ValueError as e:
        fail(str(e))
    model, settings, resume, corpus, multistream, stages = (run.model, run.settings, run.resume, run.corpus,
                                                            run.multistream, run.stages)
    settings["loss"] = dict(text_padding_weight=config.text_padding_weight,
                            first_codebook_weight=config.first_codebook_weight)
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
    M.set_checkpointing(model, config.grad_checkpointing)
    # bf16 autocast on a GPU and wherever weights are stored in bf16 (a Moshi checkpoint): frozen
    # weights stay bf16, trained ones are float32 (freeze.upcast_trainable)
    low_precision = M.low_precision(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" or low_precision
                else contextlib.nullcontext())
    log(describe(model, corpus, settings, config, stages, f"{world} process(es) on {device}", multistream))

    sharded, view = False, model
    for stage_index in range(resume["stage"] if resume else 0, len(stages)):
        stage = stages[stage_index]
        length, extending = stage["length"], stage["kind"] == "extend"
        try:
            sharded, summary = prepare_stage(model, stage, config, settings, device, world, sharded, low_precision)
        except ValueError as e:
            fail(str(e))
        if summary:
            log(summary)
        optimizer, ttt_params, base_params = configure_optimizer(model, config)
        steps = config.steps if extending else config.pretrain_steps
        first_step = 0
        if resume and stage_index == resume["stage"] and resume["step"] > 0:
            try:
                checkpoints.load_optimizer_state(model, optimizer, resume["optimizer"], sharded)
            except (ValueError, KeyError, RuntimeError) as e:
                fail(f"{ckpt_path}: its optimizer state does not fit this run's parameters ({e})")
            first_step = resume["step"]
        net = M.Objective(model, config.answer_weight, settings["loss"])
        if ddp and not sharded:
            net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
        clip_groups = [(name, params) for name, params in (
            (("ttt", ttt_params), ("base", base_params)) if config.clip == "per-group"
            else (("all", ttt_params + base_params),)) if params]
        rope = "the base's RoPE" if config.method == "none" else f"scale {stage['scale']:g}"
        log(f"stage {stage_index}: {stage['kind']} at length {length}, {rope}, {steps} steps, batch {config.batch}")
        # --- the loop. The host does not wait for the GPU inside a step: the loss stays a tensor, and
        # the first step with a non-finite gradient norm is recorded on the device and read before
        # any log line or save, so no checkpoint is ever written from non-finite weights.
        micro = config.batch // world // config.grad_accum
        if config.compile_layers:  # the window's masks first: the graphs read them
            window_attention.make_block_masks(model, length, device)
            M.compile_layers(model, True)
            log("every layer compiled (--compile-layers): this stage's first step compiles them")
        model.train()
        t0, tokens_done = time.time(), 0
        first_bad = torch.full((len(clip_groups),), -1, device=device)
        for step in range(first_step, steps):
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step, steps, config.lr_ttt if g["name"] == "ttt" else config.lr, config.warmup)
            batch, answer = step_batch(config, corpus, multistream, length, extending, step)
            mine = slice(rank * micro * config.grad_accum, (rank + 1) * micro * config.grad_accum)
            loss_sum = backward(net, batch[mine].to(device), answer[mine].to(device), config.grad_accum,
                                sharded_model=model if sharded else None, ddp=ddp and not sharded, autocast=autocast)
            norms, ttt_norm = clip_gradients(clip_groups, ttt_params, config)
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
                state, optimizer_state = checkpoints.full_state(model, optimizer, sharded)
                if master:
                    checkpoints.save_checkpoint(ckpt_path, dict(model=state, settings=settings, config=stored,
                                                                stages=stages, stage=stage_index, step=step + 1,
                                                                optimizer=optimizer_state))

        # --- stage end: validation, passkey, checkpoint (a sharded model is evaluated whole, on rank 0)
        del optimizer, net  # the next stage makes its own: room for a sharded model's whole copy
        M.compile_layers(model, False)  # evaluations run eager: their lengths and batches vary
        state = checkpoints.full_state(model, sharded=sharded)[0]
        if master:
            checkpoint = dict(model=state, settings=settings, config=stored, stages=stages, stage=stage_index + 1, step=0,
                              optimizer={})
            view = checkpoints.model_from_checkpoint(checkpoint, device, ckpt_path) if sharded else model
            if sharded and settings["ttt"]:
                freeze.apply_freeze(view, config.mode)
            log(f"stage {stage_index} done: " + eval_passkey.stage_report(view, corpus, length, config.eval_trials,
                                                                         device, multistream, settings["loss"]))
            if not extending:
                checkpoints.save_checkpoint(settings["base_path"], dict(checkpoint, stage=0))
            checkpoints.save_checkpoint(ckpt_path, checkpoint)

    # --- the end: the trained parameters alone (to load on the base), then the final table
    if master and not config.pretrain_only:
        if resume and resume["stage"] == len(stages) and settings["ttt"]:
            freeze.apply_freeze(view, config.mode)  # a finished run resumed: no stage here set what trains
        if settings.get("base_path") and os.path.isfile(settings["base_path"]):
            checkpoints.save_adapter(os.path.join(config.out, "adapter.pt"), view, settings, settings["base_path"])
        eval_passkey.final_report(view, settings, stages, corpus, device, multistream, config.eval_trials,
                                  config.method, config.scale, config.yarn_beta_fast,
                                  os.path.join(config.out, "results.json"), stored)
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

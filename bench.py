"""Speed and memory of the TTT layer and YaRN RoPE, as ratios measured in one run.

    python bench.py                 # CUDA if available (bf16), else a smaller CPU version (fp32)
    python bench.py --out bench.json --quick
    python bench.py --profile 32768      # where one TTT gating forward + backward spends its time
    python bench.py --realtime           # LMGen.step at moshi's 7B configuration, per 80 ms frame
    python bench.py --serving            # conversations per GPU at 7B: memory per stream, the largest batch
    python bench.py --scale              # one training step at moshi's 7B configuration, per mode: MFU
    NO_TORCH_COMPILE= python bench.py --scale   # the same with moshi's compiled norms, RoPE and gating
    python bench.py --profile-step       # where that step's GPU time goes, by part of the model
    python bench.py --encode 600         # encode_dataset.py's Mimi encoding of 10 min of stereo audio

Correctness on the GPU (the scan in bf16, streaming through CUDA graphs and LMGen, the window's
flex_attention) is checked by test_all.py's tests marked for CUDA, not here.

1. TTT gating forward + backward vs moshi's ActivationGating of the same size: time, peak memory.
2. The same for the official prefix-sum form (`ttt.ttt_prefix_sum`), for
   `ttt.ttt_scan` one chunk per step (group = chunk), and for the readable reference
   `ttt.ttt_chunked` (a Python loop that autograd unrolls).
3. YaRN RoPE vs moshi's apply_rope: forward + backward over q, k.
4. A full training step (forward, backward, AdamW) with and without TTT layers: tokens/s.

Timing: warm-up, then the median of several repetitions (CUDA events on a GPU). Peak memory is
what a forward + backward allocates beyond its inputs and parameters (CUDA only).
"""
import contextlib
import functools
import gc
import os
import platform
import statistics
import subprocess
import threading
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch
import torch.nn.functional as F
from moshi.modules.gating import ActivationGating
from moshi.modules.rope import apply_rope

import checkpoints
import eval_passkey
import freeze
import model as M
import ttt
import yarn


@contextlib.contextmanager
def fast_weight_path(fn):
    """Swaps the function TTTGating calls for its fast-weight product (bench only; the paper's rule,
    decay 1, which is all the other forms compute)."""
    saved = ttt.ttt_scan
    ttt.ttt_scan = lambda *args, decay=1.0, **kwargs: fn(*args, **kwargs)
    try:
        yield
    finally:
        ttt.ttt_scan = saved


def measure(fn, device, reps):
    """(median milliseconds, peak MiB allocated beyond what existed before) of fn()."""
    cuda = device.type == "cuda"
    for _ in range(2):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if cuda else float("nan")
    return statistics.median(times), peak


def bench_gating(d, h, B, T, chunks, dtype, device, reps):
    torch.manual_seed(0)
    plain = ActivationGating(d, 3 * h // 2, F.silu).to(device)  # hidden = 2/3 of dim_feedforward
    assert plain.linear_out.in_features == h
    x = torch.randn(B, T, d, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step(module):
        def run():
            with autocast:
                out = module(x)
            out.float().sum().backward()
            x.grad = None
            for p in module.parameters():
                p.grad = None
        return run

    t_plain, m_plain = measure(step(plain), device, reps)
    rows = []
    for C in chunks:
        g = ttt.TTTGating(d, h, F.silu, C, 0.3).to(device)
        g.load_state_dict(plain.state_dict(), strict=False)
        torch.nn.init.normal_(g.conv.weight, std=0.02)
        row = dict(d=d, h=h, B=B, T=T, chunk=C, plain_ms=t_plain, plain_mib=m_plain)
        paths = (("scan", ttt.ttt_scan), ("chunkwise", functools.partial(ttt.ttt_scan, group=C)),
                 ("prefix_sum", ttt.ttt_prefix_sum), ("loop", ttt.ttt_chunked))
        erase = ttt.TTTGating(d, h, F.silu, C, 0.3, delta=1.0).to(device)  # train.py's default: ttt_delta_scan
        erase.load_state_dict(g.state_dict())
        for name, fn in paths + (("erase", None),):
            if name == "loop" and T // C > 64:
                continue  # autograd unrolls one weight per chunk: too slow and large to be useful
            with fast_weight_path(fn) if fn else contextlib.nullcontext():
                try:
                    row[f"{name}_ms"], row[f"{name}_mib"] = measure(step(erase if name == "erase" else g), device, reps)
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = row[f"{name}_mib"] = float("inf")
                    torch.cuda.empty_cache()
        rows.append(row)
        print(f"  T {T:>6} C {C:>5}: plain {t_plain:8.2f} ms {m_plain:8.0f} MiB | " + " | ".join(
            f"{n} {row[n + '_ms'] / t_plain:5.2f}x time {row[n + '_mib'] / m_plain:5.2f}x mem"
            for n in ("scan", "chunkwise", "prefix_sum", "loop", "erase") if n + "_ms" in row), flush=True)
    return rows


def bench_rope(shape, dtype, device, reps):
    B, H, T, D = shape
    q = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    offset = torch.zeros(B, dtype=torch.long, device=device)
    rope = yarn.YarnRotaryEmbedding(scale=4.0, original_len=T // 4)

    def step(fn):
        def run():
            qo, ko = fn()
            (qo.float().sum() + ko.float().sum()).backward()
            q.grad = k.grad = None
        return run

    t_moshi, _ = measure(step(lambda: apply_rope(q, k, offset, 10_000, interleave=True)), device, reps)
    t_yarn, _ = measure(step(lambda: rope(q, k, offset)), device, reps)
    row = dict(shape=list(shape), moshi_ms=t_moshi, yarn_ms=t_yarn, ratio=t_yarn / t_moshi)
    print(f"  q, k {list(shape)}: moshi apply_rope {t_moshi:.2f} ms, YaRN {t_yarn:.2f} ms: {row['ratio']:.2f}x", flush=True)
    return row


def bench_train_step(preset, T, B, chunk, dtype, device, reps):
    rows = {}
    for name in ("plain", "ttt"):
        torch.manual_seed(0)
        lm = M.build_model(dict(M.PRESETS[preset], context=T)).to(device)
        yarn.apply_yarn(lm, 4.0, T // 4)
        if name == "ttt":  # every 4th layer, as the GPU preset's default
            layers = list(range(0, len(lm.transformer.layers), 4))
            ttt.apply_ttt(lm, layers, chunk, 0.3)
            lm.to(device)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)
        x = torch.randint(0, 256, (B, T + 1), device=device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

        def run():
            with autocast:
                out = M.logits(lm, x[:, :-1])
                loss = F.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        ms, _ = measure(run, device, reps)
        rows[name] = dict(ms=ms, tokens_per_s=B * T / ms * 1000)
    ratio = rows["ttt"]["tokens_per_s"] / rows["plain"]["tokens_per_s"]
    print(f"  {preset} preset, B {B} x T {T}: {rows['plain']['tokens_per_s']:,.0f} tok/s without TTT, "
          f"{rows['ttt']['tokens_per_s']:,.0f} with: {ratio:.2f}x", flush=True)
    return dict(preset=preset, T=T, B=B, chunk=chunk, **rows, ratio=ratio)


def profile_gating(d, h, T, chunk, dtype, device):
    """torch.profiler's table of one TTT gating forward + backward (after warm-up): kernel count,
    device time and the ops that take it."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    g = ttt.TTTGating(d, h, F.silu, chunk, 0.3).to(device)
    torch.nn.init.normal_(g.conv.weight, std=0.02)
    x = torch.randn(1, T, d, device=device, requires_grad=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def run():
        with autocast:
            out = g(x)
        out.float().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    events = prof.key_averages()
    where = f"TTT gating fwd+bwd, d {d}, h {h}, T {T}, chunk {chunk}, {dtype}"
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type.name == "CUDA"]  # the kernels, not the ops that launch them
        print(f"{where}: {sum(e.count for e in kernels)} kernels, "
              f"{sum(e.self_device_time_total for e in kernels) / 1000:.2f} ms of device time")
    else:
        print(f"{where}: {sum(e.self_cpu_time_total for e in events) / 1000:.2f} ms of host time")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=60))


# ---------------------------------------------------------------------------------------------
# Streaming the way Moshi is deployed: one step per 80 ms frame through LMGen, CUDA graphs on.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def reconfigure(lm, gatings: list, rope, original_len: int, context: int, yarn_scale=None, chunk=None,
                delta=0.0) -> None:
    """One set of 7B weights for every configuration of a benchmark: back to moshi's own MLPs
    (`gatings`), RoPE and window `context`, then YaRN at `yarn_scale` and TTT at chunk `chunk`
    (the default layers, eta 0.3, the erase `delta`, a non-zero conv: the real work, not zeros)
    where given."""
    from moshi.modules.streaming import StreamingModule
    layers = lm.transformer.layers
    for layer, gating in zip(layers, gatings):
        layer.gating, layer.self_attn.rope, layer.self_attn.context = gating, rope, context
    lm.transformer.rope = rope
    for m in lm.modules():  # moshi caches its streaming children
        if isinstance(m, StreamingModule):
            m._cached_children = None
    if yarn_scale:
        yarn.apply_yarn(lm, yarn_scale, original_len)
    if chunk:
        torch.manual_seed(1)
        ttt.apply_ttt(lm, ttt.default_layers(len(layers)), chunk, eta=0.3, delta=delta)
        with torch.no_grad():
            for g in lm.modules():
                if isinstance(g, ttt.TTTGating):
                    g.conv.weight.normal_(std=0.02)


def train_only(lm, trains: str) -> None:
    """What a --scale row trains, on a model `reconfigure` has just set up (every parameter frozen):
    with TTT installed, train.py's freeze mode `trains` (`ttt_lora_in`: the TTT layers' linear_in
    wrapped first in a LoRA of train.py's default rank 8, scaling 2; `lora_ttt`: every Linear in
    moshi-finetune's rank 128, scaling 2); without, moshi-finetune's LoRA factors alone (`lora`), one
    norm for the control (`control`: the backward still crosses every layer), or the whole layers that
    would hold TTT (`layers`). The trained parameters become float32 master weights."""
    import depformer_steps
    layers = lm.transformer.layers
    if trains in ("lora", "lora_ttt"):  # after TTT, as in train.py; the Linears stay wrapped (TTT
        freeze.apply_lora(lm, 128, 2.0)  # needs plain ones): these rows come last
        depformer_steps.apply_contiguous_steps(lm)
    elif trains == "ttt_lora_in":  # the TTT modules are new at every reconfigure: no wrap is left over
        freeze.apply_lora(lm, 8, 2.0, scope="ttt_mlp_in")
    if freeze.ttt_modules(lm):
        freeze.apply_freeze(lm, trains)
    elif trains == "lora":  # moshi-finetune: the LoRA factors alone
        for m in freeze.lora_modules(lm):
            m.lora_A.weight.requires_grad_(True)
            m.lora_B.weight.requires_grad_(True)
    elif trains == "control":  # a backward through every layer, as ttt_only's, nothing else
        layers[0].norm1.alpha.requires_grad_(True)
    elif trains == "layers":  # the layers TTT would convert, whole, without TTT
        for i in ttt.default_layers(len(layers)):
            layers[i].requires_grad_(True)
    else:
        raise ValueError(f"--scale row trains {trains!r} without TTT installed")
    freeze.upcast_trainable(lm)


def compile_state() -> tuple[int, dict]:
    """The graphs dynamo has made in this process and the seconds each compile phase has taken so far
    (torch._dynamo.utils.compile_times' records, summed over graphs; copied at once, as another
    thread may be compiling)."""
    from torch._dynamo.utils import compilation_time_metrics, counters
    return counters["stats"]["unique_graphs"], {k: sum(v) for k, v in list(compilation_time_metrics.items())}


def compile_summary(since: tuple[int, dict] = (0, {}), top: int = 4) -> str:
    """The graphs made and the `top` longest compile phases ended since `since` (a compile_state;
    phases nest, so they overlap)."""
    graphs, seconds = compile_state()
    spent = sorted(((t - since[1].get(k, 0.0), k) for k, t in seconds.items()), reverse=True)
    phases = ", ".join(f"{k} {t:.1f} s" for t, k in spent[:top] if t > 0)
    summary = f"{graphs - since[0]} graphs"
    if phases:
        summary += f"; {phases}"
    return summary


def compile_progress(every: float = 60.0):
    """Prints, every `every` seconds, what has been compiled since it started (compile_summary), until
    the function it returns is called, which stops it and returns the whole of it. Where a long
    first step of compiled layers is: a phase shows once it has ended."""
    stop, start, since = threading.Event(), time.perf_counter(), compile_state()

    def report():
        while not stop.wait(every):
            try:
                print(f"    compiling, {time.perf_counter() - start:.0f} s in: {compile_summary(since)}", flush=True)
            except Exception as e:  # a progress line must never end the bench
                print(f"    compiling, {time.perf_counter() - start:.0f} s in ({type(e).__name__}: {e})", flush=True)
    thread = threading.Thread(target=report, daemon=True)
    thread.start()

    def finish() -> str:
        stop.set()
        thread.join()
        return compile_summary(since, top=8)
    return finish


def attention_pairs(T: int, window) -> int:
    """Query-key pairs of a causal attention over T steps that sees the last `window` steps (moshi's
    `context`: keys t - window < s <= t; None: all): sum over t of min(t + 1, window)."""
    W = T if not window else min(window, T)
    return W * (W + 1) // 2 + (T - W) * W


def step_flops(lm, T: int) -> dict:
    """Model FLOPs of one training step of a moshi LMModel as configured (its windows, its TTT
    layers, what trains, its gradient checkpointing) on one sequence of T frames, 2 per multiply-add,
    products only (norms, softmax, RoPE, the loss and the optimizer are not counted):
    - forward: each nn.Linear 2 T in out (each Linear of a Moshi LMModel sees each frame once: the
      main transformer's, the text head's, every depformer step's own); attention 4 d P per layer,
      P = attention_pairs(T, its window) (the depformer: 4 D' T attention_pairs(dep_q, its context));
      each TTT layer's fast weight 4 T d h (the read Z S^T and the write V^T Z), the conv 2 T k d,
      the target V = conv(X) W_target 2 T d d, and with the erase 2 T C h (the C x C Gram matrix
      per chunk whose norm scales it; the erase itself reuses the read Z S^T and joins the write;
      the scans' work within a group of chunks on a GPU, a way of computing the same, is not counted);
    - backward: each product's input gradient where its input depends on a trained parameter (every
      main layer from the first that holds one outside TTT's conv and W_target, the TTT path of every
      TTT layer from the first trained one, the text head, the depformer), counted as its forward,
      and the same again for a weight that trains; TTT's fast-weight path twice its forward (a run
      that trains only the heads or the depformer gets no input gradients counted there);
    - recompute (gradient checkpointing, model.set_checkpointing): the forward of every layer that
      recomputes and runs backward, again; not part of the model FLOPs (MFU), listed apart.
    Exact for the products counted (test_all.py compares them with torch's FlopCounterMode), except
    that a layer whose first product's weight trains is counted with that product's input gradient."""
    def trains(module):
        return any(p.requires_grad for p in module.parameters())

    def linear_flops(module, trained_only=False):
        return sum(2 * T * m.in_features * m.out_features for m in module.modules()
                   if isinstance(m, torch.nn.Linear) and (m.weight.requires_grad or not trained_only))

    def ttt_path_params(layer):
        g = layer.gating
        return {id(p) for p in g.ttt_parameters()} if isinstance(g, ttt.TTTGating) else set()

    out = dict(linear_forward=0, linear_backward=0, attention_forward=0, attention_backward=0, ttt_forward=0,
               ttt_backward=0, recompute=0)
    layers, d = lm.transformer.layers, lm.dim
    outside_ttt = [any(p.requires_grad and id(p) not in ttt_path_params(layer) for p in layer.parameters())
                   for layer in layers]
    first_full = next((i for i, x in enumerate(outside_ttt) if x), len(layers))
    first_ttt = next((i for i, layer in enumerate(layers) if isinstance(layer.gating, ttt.TTTGating)
                      and trains(layer.gating)), len(layers))
    backward_from = min(first_full, first_ttt)  # the residual stream needs gradients from here on
    for i, layer in enumerate(layers):
        full = i >= first_full or i > first_ttt
        lin, att = linear_flops(layer), 4 * d * attention_pairs(T, layer.self_attn.context)
        out["linear_forward"] += lin
        out["attention_forward"] += att
        out["linear_backward"] += (lin if full else 0) + linear_flops(layer, trained_only=True)
        out["attention_backward"] += 2 * att if full else 0
        g = layer.gating
        if isinstance(g, ttt.TTTGating):
            h, C = g.linear_out.in_features, g.chunk_size
            fast = 4 * T * d * h + 2 * T * g.conv.kernel_size[0] * d + (2 * T * d * d if g.W_target is not None else 0)
            fast += 2 * T * C * h if g.delta else 0
            out["ttt_forward"] += fast
            out["ttt_backward"] += 2 * fast if i >= backward_from else 0
        if M.recomputes(lm, layer) and i >= backward_from:
            out["recompute"] += lin + att + (fast if isinstance(g, ttt.TTTGating) else 0)
    heads = [lm.text_linear, lm.depformer_in, lm.linears]
    out["linear_forward"] += sum(linear_flops(m) for m in heads)
    out["linear_backward"] += sum((linear_flops(m) if backward_from < len(layers) else 0)
                                  + linear_flops(m, trained_only=True) for m in heads)
    if lm.depformer is not None:
        D, steps = lm.depformer.layers[0].self_attn.embed_dim, lm.dep_q
        for layer in lm.depformer.layers:
            lin, att = linear_flops(layer), 4 * D * T * attention_pairs(steps, layer.self_attn.context)
            out["linear_forward"] += lin
            out["attention_forward"] += att
            out["linear_backward"] += linear_flops(layer, trained_only=True)
            if backward_from < len(layers):
                out["linear_backward"] += lin
                out["attention_backward"] += 2 * att
                out["recompute"] += (lin + att) if lm.depformer.checkpointing else 0
    forward = out["linear_forward"] + out["attention_forward"] + out["ttt_forward"]
    backward = out["linear_backward"] + out["attention_backward"] + out["ttt_backward"]
    return dict(out, forward=forward, backward=backward, model=forward + backward)


def matmul_rate(device, n=8192, reps=20) -> float:
    """The device's bf16 matrix-product rate, FLOP/s, measured: n x n by n x n, median of `reps`."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms, _ = measure(lambda: a @ b, device, reps)
    return 2 * n ** 3 / (ms / 1000)


@torch.no_grad()
def gating_step(device, d=4096, h=11264, chunks=(256, 1024), reps=200):
    """One streaming token through one MLP at Moshi 7B's size, bf16, captured in a CUDA graph and
    replayed: moshi's ActivationGating against TTTGating, device time per step (CUDA events)."""
    from moshi.modules.gating import ActivationGating
    x = torch.randn(1, 1, d, device=device, dtype=torch.bfloat16)

    def replay_ms(module):
        for _ in range(3):
            module(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)
        for _ in range(10):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    with torch.device(device):
        plain = ActivationGating(d, 3 * h // 2, F.silu).to(torch.bfloat16)
    rows = dict(plain_ms=replay_ms(plain))
    for C in chunks:
        with torch.device(device):
            g = ttt.TTTGating(d, h, F.silu, C, 0.3).to(torch.bfloat16)
        torch.nn.init.normal_(g.conv.weight, std=0.02)
        with g.streaming(1):
            rows[f"ttt_{C}_ms"] = replay_ms(g)
        print(f"  one MLP step (d {d}, h {h}, bf16, graphed): moshi gating {rows['plain_ms']:.3f} ms, TTT chunk {C} "
              f"{rows[f'ttt_{C}_ms']:.3f} ms (+{rows[f'ttt_{C}_ms'] - rows['plain_ms']:.3f})", flush=True)
    return rows


def timed_steps(gen, codes: torch.Tensor, n: int) -> list[float]:
    """Milliseconds of n `gen.step(codes)` (host clock around a step and a synchronisation) after
    three untimed ones: eager warm-up, CUDA graph capture, a first replay."""
    sync = torch.cuda.synchronize if codes.is_cuda else (lambda: None)
    times = []
    for i in range(n + 3):
        sync()
        start = time.perf_counter()
        gen.step(codes)
        sync()
        if i >= 3:
            times.append(1000 * (time.perf_counter() - start))
    return times


def p99(times: list[float]) -> float:
    """The 99th percentile of step times: the largest but the top 1 %."""
    times = sorted(times)
    return times[min(len(times) - 1, int(0.99 * len(times)))]


def realtime(device, steps, eager_steps=20, rounds=2):
    """LMGen.step of moshi's own 7B configuration (random weights, bf16, batch 1, CUDA graphs on, as
    deployed), one configuration after another on the same weights: per-step wall time (host
    clock around a step and a synchronisation) and peak memory. The frame budget is 80 ms."""
    from moshi.models import loaders
    from moshi.models.lm import LMGen, LMModel
    from moshi.utils.compile import no_cuda_graph
    torch.manual_seed(0)
    lm = LMModel(**loaders._lm_kwargs, device=device, dtype=torch.bfloat16).eval()
    layers, L0 = lm.transformer.layers, loaders._lm_kwargs["context"]
    gatings, rope = [layer.gating for layer in layers], lm.transformer.rope
    codes = torch.randint(0, lm.card, (1, lm.num_codebooks - lm.dep_q - 1, 1), device=device)

    def configure(context=L0, yarn_scale=None, chunk=None, delta=0.0):
        reconfigure(lm, gatings, rope, L0, context, yarn_scale, chunk, delta)

    def run(n, graphs):
        """Per-step milliseconds of n steps after the warm-up, and the peak GiB allocated."""
        gen = LMGen(lm)
        torch.cuda.reset_peak_memory_stats()
        with gen.streaming(1), (contextlib.nullcontext() if graphs else no_cuda_graph()):
            times = timed_steps(gen, codes, n)
            for g in lm.modules():  # the TTT state advanced at every step, replays included
                if isinstance(g, ttt.TTTGating):
                    assert int(g._streaming_state.offset[0]) == n + 3, "TTT state did not advance"
        return times, torch.cuda.max_memory_allocated() / 2 ** 30

    configs = [("base, window 3000", {}, None),
               ("TTT chunk 256, window 3000", dict(chunk=256), "base, window 3000"),
               ("TTT chunk 1024, window 3000", dict(chunk=1024), "base, window 3000"),
               ("TTT chunk 256, erase 1, window 3000", dict(chunk=256, delta=1.0), "TTT chunk 256, window 3000"),
               ("base, KV cache 12000 (no YaRN)", dict(context=4 * L0), "base, window 3000"),
               ("YaRN x4 (KV cache 12000)", dict(context=4 * L0, yarn_scale=4), "base, window 3000"),
               ("YaRN x4 + TTT chunk 256", dict(context=4 * L0, yarn_scale=4, chunk=256), "YaRN x4 (KV cache 12000)"),
               ("base, window 3000, no CUDA graph", {}, None),
               ("YaRN x4 + TTT 256, no CUDA graph", dict(context=4 * L0, yarn_scale=4, chunk=256), None)]
    rows = {}
    for round_ in range(rounds):  # configurations interleaved, so a drift of the card shows as spread
        for name, config, against in configs:
            configure(**config)
            graphs = "no CUDA graph" not in name
            times, peak = run(steps if graphs else eager_steps, graphs)
            row = rows.setdefault(name, dict(config, graphs=graphs, times=[], round_medians=[]))
            row["times"] += times
            row["round_medians"].append(statistics.median(times))
            row["peak_gib"] = peak
            gc.collect()
            torch.cuda.empty_cache()
    for name, config, against in configs:
        row, times = rows[name], sorted(rows[name].pop("times"))
        row.update(median_ms=statistics.median(times), p99_ms=p99(times),
                   max_ms=times[-1], steps=len(times))
        if against:
            row["ratio"] = row["median_ms"] / rows[against]["median_ms"]
        print(f"  {name:<34} median {row['median_ms']:6.2f} ms (rounds " + ", ".join(
              f"{m:.2f}" for m in row["round_medians"]) + f"), p99 {row['p99_ms']:6.2f}, max {row['max_ms']:6.2f}, "
              f"peak {row['peak_gib']:5.1f} GiB" + (f", {row['ratio']:.3f}x {against}" if against else ""), flush=True)
    return rows


def state_memory(*roots) -> dict:
    """Bytes of every streaming state under `roots` (inside their `streaming()`), by what holds it:
    the attention's KV caches, the TTT layers' states, the rest (LMGen's token cache, offsets)."""
    from moshi.modules.streaming import StreamingModule
    from moshi.modules.transformer import StreamingMultiheadAttention
    seen, out = set(), dict(kv_cache=0, ttt_state=0, other_state=0)

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "cache") and hasattr(value, "end_offset"):  # moshi's RingKVCache
            yield from (value.cache, value.end_offset)

    for module in {id(m): m for root in roots for m in root.modules()}.values():
        state = getattr(module, "_streaming_state", None) if isinstance(module, StreamingModule) else None
        if state is None:
            continue
        kind = ("ttt_state" if isinstance(module, ttt.TTTGating) else
                "kv_cache" if isinstance(module, StreamingMultiheadAttention) else "other_state")
        for value in vars(state).values():
            for t in tensors(value):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    out[kind] += t.numel() * t.element_size()
    return out


def serving(device, steps=60, lm_kwargs=None, chunks=(256, 1024), batches=(1, 8, 32), budget_ms=80.0) -> dict:
    """Conversations per GPU: LMGen.step of moshi's 7B configuration (random weights, bf16, CUDA graphs
    on), B streams at once, per configuration on one set of weights. Per stream: the KV cache, the
    TTT state, the rest of the streaming state (counted from the tensors each module allocates) and
    the memory one more stream costs (peak at the largest of `batches` against batch 1); the largest
    batch that fits on the device with p99 under the frame's `budget_ms` (predicted from that cost,
    then searched); median and p99 per step at `batches` and at the largest. TTT rows run the erase 1
    (train.py's default), so their state is compact by default; one row keeps the exact state."""
    from moshi.models import loaders
    from moshi.models.lm import LMGen, LMModel
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    kwargs = lm_kwargs or loaders._lm_kwargs
    lm = LMModel(**kwargs, device=device, dtype=torch.bfloat16).eval()
    layers, L0 = lm.transformer.layers, kwargs["context"]
    gatings, rope = [layer.gating for layer in layers], lm.transformer.rope
    short, long_ = chunks
    configs = [("base, window L0", {}, None),
               (f"TTT {short}, exact state", dict(chunk=short, delta=1.0), False),
               (f"TTT {short}", dict(chunk=short, delta=1.0), None),
               (f"TTT {long_}", dict(chunk=long_, delta=1.0), None),
               ("YaRN x4, KV cache 4 L0", dict(context=4 * L0, yarn_scale=4), None),
               (f"YaRN x4 + TTT {short}", dict(context=4 * L0, yarn_scale=4, chunk=short, delta=1.0), None)]

    def run(B):
        """Per-step ms of `steps` steps at batch B after warm-up and capture, the peak bytes and the
        streaming state's bytes by kind; None where B does not fit."""
        gen = LMGen(lm)
        codes = torch.randint(0, lm.card, (B, lm.num_codebooks - lm.dep_q - 1, 1), device=device)
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with gen.streaming(B):
                held = state_memory(gen, lm)
                times = timed_steps(gen, codes, steps)
            peak = torch.cuda.max_memory_allocated() if cuda else None
        except RuntimeError as e:  # torch.OutOfMemoryError, or a CUDA graph's capture that ran out
            if "out of memory" not in str(e):
                raise
            return None
        finally:  # a stream that ran out of memory while starting leaves its modules streaming
            gen._stop_streaming()
            lm._stop_streaming()
            del gen
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return dict(batch=B, median_ms=statistics.median(times), p99_ms=p99(times), peak_bytes=peak, **held)

    rows, GiB = {}, 2 ** 30
    for name, config, compact in configs:
        reconfigure(lm, gatings, rope, L0, **{"context": L0, **config})
        for g in lm.modules():
            if isinstance(g, ttt.TTTGating):
                g.compact_state = compact
        weights = sum(t.numel() * t.element_size() for t in lm.parameters())
        runs = {B: run(B) for B in batches}
        ran = [r for r in runs.values() if r]
        if not ran:
            raise RuntimeError(f"{name}: batch {batches[0]} does not fit on {device}")
        one, most = ran[0], ran[-1]
        row = dict(config, compact=compact, weights_gib=weights / GiB, runs=ran,
                   **{f"{k}_gib_per_stream": most[k] / most["batch"] / GiB for k in ("kv_cache", "ttt_state", "other_state")})
        if cuda and most["batch"] > one["batch"]:
            per_stream = (most["peak_bytes"] - one["peak_bytes"]) / (most["batch"] - one["batch"])
            free, _ = torch.cuda.mem_get_info()
            capacity = free + torch.cuda.memory_allocated()  # the weights stay allocated between runs
            fits = lambda r: r is not None and r["p99_ms"] < budget_ms
            lo = max((B for B, r in runs.items() if fits(r)), default=0)
            hi, B = None, 1 + int((capacity - one["peak_bytes"]) / per_stream)
            while B > lo and (hi is None or hi - lo > max(1, lo // 32)):  # within 3 % of the largest
                r = runs[B] = run(B)
                print(f"    {name}: batch {B} " + ("out of memory" if r is None else f"p99 {r['p99_ms']:.1f} ms"), flush=True)
                if fits(r):
                    lo, B = B, (B + hi) // 2 if hi else int(B * 1.1) + 1
                else:
                    hi, B = B, (lo + B) // 2
            row.update(per_stream_gib=per_stream / GiB, capacity_gib=capacity / GiB, largest_batch=lo,
                       smallest_failed=hi, runs=sorted((r for r in runs.values() if r), key=lambda r: r["batch"]))
        rows[name] = row
        at = ", ".join(f"B {r['batch']} {r['median_ms']:.1f}/{r['p99_ms']:.1f}" for r in row["runs"])
        print(f"  {name:<24} per stream: KV {row['kv_cache_gib_per_stream']:.3f} GiB, TTT "
              f"{row['ttt_state_gib_per_stream']:.3f}, other {row['other_state_gib_per_stream']:.4f}"
              + (f", one more stream {row['per_stream_gib']:.3f} GiB; largest batch {row['largest_batch']}"
                 if "largest_batch" in row else "") + f"; median/p99 ms: {at}", flush=True)
    base = rows[configs[0][0]]
    for name, row in rows.items():
        if base.get("largest_batch") and "largest_batch" in row:
            row["streams_vs_base"] = row["largest_batch"] / base["largest_batch"]
            print(f"  {name:<24} {row['largest_batch']:4d} streams ({row['streams_vs_base']:.2f}x the base's), "
                  f"{row['per_stream_gib']:.2f} GiB per stream", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Training at Moshi 7B's size: one step, frozen bf16 weights, the window computed pair by pair.
# ---------------------------------------------------------------------------------------------

def scale(device, steps=2, lm_kwargs=None, profile=False, rows_named=None):
    """One training step (forward, backward, AdamW) of moshi's own 7B configuration with random
    weights: frozen weights bf16, trained ones float32, bf16 autocast, batch 1, gradient
    checkpointing, moshi-finetune's loss (first codebook x100), float32 products in TF32 as train.py
    allows them (one row without); each mode against a control with
    nothing of TTT, measured in the same run. Seconds per step (median of `steps` after one
    warm-up step, whose time is kept: compiling happens there), peak GiB, frames per second, and
    model FLOPs (`step_flops`) per second as a share of the bf16 matrix-product rate measured in
    the same run (MFU). `profile`: only `ttt_only` with the window at T 4 L0, then one more step
    under `profile_step`. `rows_named`:
    only the rows whose name holds it, with the rows they are compared against. With moshi's
    torch.compile on (NO_TORCH_COMPILE empty), a row runs `ttt_only` with moshi's kernels eager, and
    compares that step's loss and gradients; so do the rows with every layer compiled whole, which
    run only when `rows_named` picks them ("layers compiled")."""
    import depformer_steps
    import window_attention
    from moshi.models import loaders
    from moshi.models.lm import LMModel
    from moshi.modules.transformer import StreamingMultiheadAttention
    from moshi.utils.compile import no_compile
    compiled = not os.environ.get("NO_TORCH_COMPILE")  # moshi's own switch, read when moshi loads
    print(f"  moshi's torch.compile of its norms, RoPE and gating: {'on' if compiled else 'off (NO_TORCH_COMPILE)'}",
          flush=True)
    torch.manual_seed(0)
    lm_kwargs = lm_kwargs or loaders._lm_kwargs
    lm = LMModel(**lm_kwargs, device=device, dtype=torch.bfloat16)
    depformer_steps.apply_contiguous_steps(lm)  # as train.py: its per-step products as matrix products
    layers, L0 = lm.transformer.layers, lm_kwargs["context"]
    gatings, rope = [layer.gating for layer in layers], lm.transformer.rope
    weights_gib = torch.cuda.memory_allocated() / 2 ** 30
    rate = matmul_rate(device)  # MFU's denominator, measured in this run
    print(f"  bf16 matrix products: {rate / 1e12:.0f} TFLOP/s measured (8192 x 8192 x 8192)", flush=True)

    def configure(context, trains, yarn_scale=None, chunk=None, flex=True, delta=0.0, batch=1, eager=False,
                  compiled_layers=False, tf32=True, checkpointing="all"):
        M.compile_layers(lm, compiled_layers)
        M.set_checkpointing(lm, checkpointing)  # train.py --grad-checkpointing
        torch.backends.cuda.matmul.allow_tf32 = tf32  # as train.py: the erase's float32 products in TF32
        for p in lm.parameters():  # back to the frozen bf16 model
            p.requires_grad_(False)
            p.data, p.grad = p.data.to(torch.bfloat16), None
        for layer in layers:
            layer.self_attn.__class__ = window_attention.WindowAttention if flex else StreamingMultiheadAttention
        reconfigure(lm, gatings, rope, L0, context, yarn_scale, chunk, delta)
        train_only(lm, trains)

    def batch(T, B):  # random codes, the text stream within the text vocabulary
        g = torch.Generator(device).manual_seed(0)
        codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), device=device, generator=g)
        codes[:, 0] = torch.randint(0, lm.text_card, (B, T), device=device, generator=g)
        return codes

    def compiled_against_eager(T, layers=False):
        """The loss and the trained gradients on one batch with moshi's compiled kernels (its norms,
        RoPE and gating; `layers`: every layer compiled whole) against the same step eager: the loss's
        difference, the gradients' largest relative difference (norm of the difference over norm, per
        parameter)."""
        params, codes, out = [p for p in lm.parameters() if p.requires_grad], batch(T, 1), []
        for compiled_now in (False, True):
            if layers:
                M.compile_layers(lm, compiled_now)
            with contextlib.nullcontext() if compiled_now or layers else no_compile():
                loss = M.multistream_loss(lm, codes, 0.5, 100.0)
                loss.backward()
            out.append((loss.item(), [p.grad.float().clone() for p in params]))
            lm.zero_grad(set_to_none=True)
        (eager_loss, eager_grads), (loss, grads) = out
        return dict(eager_loss=eager_loss, compiled_loss=loss, grad_rel_diff=max(
            ((g - e).norm() / e.norm().clamp(min=1e-30)).item() for g, e in zip(grads, eager_grads)))

    def step(T, B=1, eager=False, compiled_layers=False):
        params = [p for p in lm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        codes = batch(T, B)
        if compiled_layers:  # the window's mask made before compiling: the graphs read it
            window_attention.make_block_masks(lm, T, codes.device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times, finish = [], compile_progress() if compiled_layers else None
        try:
            for _ in range(steps + 1):
                start = time.perf_counter()
                with no_compile() if eager else contextlib.nullcontext():
                    M.multistream_loss(lm, codes, 0.5, 100.0).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                if finish is not None:
                    print(f"    compiled in the first step ({times[0]:.0f} s): {finish()}", flush=True)
                    finish = None
        finally:  # out of memory too: the progress stops
            if finish is not None:
                finish()
        flops, seconds = {k: B * v for k, v in step_flops(lm, T).items()}, statistics.median(times[1:])
        return dict(s_per_step=seconds, first_step_s=times[0], peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                    trainable=sum(p.numel() for p in params), model_tflop=flops["model"] / 1e12,
                    recompute_tflop=flops["recompute"] / 1e12, mfu=flops["model"] / seconds / rate,
                    frames_per_s=B * T / seconds, flops=flops)

    T1, T2 = 4 * L0, 8 * L0
    runs = scale_runs(L0, rows_named, compiled)
    if profile:
        runs = [r for r in runs if r[0] in (f"window {L0}, T {T1}: control", f"window {L0}, T {T1}: ttt_only")]
    rows = {}
    for name, T, config, against in runs:
        configure(**config)
        try:
            row = rows[name] = dict(step(T, config.get("batch", 1), config.get("eager", False),
                                         config.get("compiled_layers", False)), T=T, **config)
            if config.get("eager") and compiled:
                row["compiled_against_eager"] = compiled_against_eager(T)
            if config.get("compiled_layers") and T == T1:
                row["compiled_against_eager"] = compiled_against_eager(T, layers=True)
        except torch.OutOfMemoryError:
            rows[name] = dict(T=T, **config, error="out of memory")
            print(f"  {name:<50} out of memory", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        if against and "s_per_step" in rows.get(against, {}):
            row["time_ratio"] = row["s_per_step"] / rows[against]["s_per_step"]
        print(f"  {name:<50} {row['s_per_step']:6.2f} s/step, peak {row['peak_gib']:5.1f} GiB, "
              f"{row['trainable']:,} trained, {row['model_tflop']:.0f} TFLOP (+{row['recompute_tflop']:.0f} recomputed), "
              f"MFU {100 * row['mfu']:.1f} %, {row['frames_per_s']:.0f} frames/s, first step {row['first_step_s']:.1f} s"
              + (f", {row['time_ratio']:.3f}x {against}" if "time_ratio" in row else ""), flush=True)
        if "compiled_against_eager" in row:
            c = row["compiled_against_eager"]
            print(f"  {'':<50} compiled against eager, one batch: loss {c['compiled_loss']:.6f} against "
                  f"{c['eager_loss']:.6f}, gradients within {c['grad_rel_diff']:.2e} relative", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    if profile:
        codes = batch(T1, 1)
        optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-6)
        start = time.perf_counter()
        result = profile_step(lm, lambda: M.multistream_loss(lm, codes, 0.5, 100.0).backward(),
                              lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)), device)
        result["profiled_step_s"] = round(time.perf_counter() - start, 2)
        print(f"  one step of window {L0}, T {T1}: ttt_only under torch.profiler ({result['profiled_step_s']} s "
              f"with the profiler's overhead; {result['total_ms'] / 1e3:.2f} s of GPU time):")
        print_profile(result)
        return dict(weights_gib=weights_gib, matmul_tflops=rate / 1e12, rows=rows, profile=result)
    for name, T, config, against in runs:  # references measured after their row
        row = rows[name]
        if against and "time_ratio" not in row and "s_per_step" in row and "s_per_step" in rows.get(against, {}):
            row["time_ratio"] = row["s_per_step"] / rows[against]["s_per_step"]
            print(f"  {name}: {row['time_ratio']:.3f}x {against}", flush=True)
    for mode in ("control", "ttt_only"):
        a, b = rows.get(f"window {L0}, T {T1}: {mode}", {}), rows.get(f"window {L0}, T {T2}: {mode}", {})
        if "s_per_step" in a and "s_per_step" in b:
            print(f"  window {L0}, {mode}: T {T2} takes {b['s_per_step'] / a['s_per_step']:.2f}x T {T1}'s time", flush=True)
    return dict(weights_gib=weights_gib, matmul_tflops=rate / 1e12, rows=rows)


def scale_runs(L0: int, rows_named=None, compiled: bool = False) -> list[tuple]:
    """`scale`'s rows, in the order they run: (name, T, configure's settings, the row it is compared
    against or None), at T 4 L0 and 8 L0 (Moshi 7B: 12000 and 24000 steps, 16 and 32 minutes of
    audio). `rows_named`: the rows whose name holds it, with the rows they are compared against;
    the whole-layer compiled rows only so. The row with moshi's kernels eager only when `compiled`."""
    T1, T2 = 4 * L0, 8 * L0
    yarn4, window = dict(context=4 * L0, yarn_scale=4), dict(context=L0)
    runs = [(f"YaRN x4, T {T1}: control", T1, dict(yarn4, trains="control"), None),
            (f"YaRN x4, T {T1}: ttt_only", T1, dict(yarn4, trains="ttt_only", chunk=256), f"YaRN x4, T {T1}: control"),
            (f"YaRN x4, T {T1}: TTT layers, no TTT", T1, dict(yarn4, trains="layers"), None),
            (f"YaRN x4, T {T1}: ttt_layers", T1, dict(yarn4, trains="ttt_layers", chunk=256),
             f"YaRN x4, T {T1}: TTT layers, no TTT"),
            (f"window {L0}, T {T1}: control", T1, dict(window, trains="control"), None),
            (f"window {L0}, T {T1}: ttt_only", T1, dict(window, trains="ttt_only", chunk=256), f"window {L0}, T {T1}: control"),
            (f"window {L0}, T {T1}: ttt_only, moshi's kernels eager", T1,
             dict(window, trains="ttt_only", chunk=256, eager=True), f"window {L0}, T {T1}: ttt_only"),
            (f"window {L0}, T {T2}: control", T2, dict(window, trains="control"), None),
            (f"window {L0}, T {T2}: ttt_only", T2, dict(window, trains="ttt_only", chunk=256), f"window {L0}, T {T2}: control"),
            (f"window {L0}, T {T1}: ttt_only, erase 1", T1, dict(window, trains="ttt_only", chunk=256, delta=1.0),
             f"window {L0}, T {T1}: ttt_only"),  # train.py's default against the paper's sum
            (f"window {L0}, T {T2}: ttt_only, erase 1", T2, dict(window, trains="ttt_only", chunk=256, delta=1.0),
             f"window {L0}, T {T2}: ttt_only"),
            (f"window {L0}, T {T1}: ttt_only, erase 1, float32 products", T1,  # without train.py's TF32
             dict(window, trains="ttt_only", chunk=256, delta=1.0, tf32=False), f"window {L0}, T {T1}: ttt_only, erase 1"),
            # the transformer without gradient checkpointing, the depformer with it (train.py's
            # --grad-checkpointing depformer): the time its recomputation costs at T 4 L0, and the memory it saves
            (f"window {L0}, T {T1}: control, transformer not checkpointed", T1,
             dict(window, trains="control", checkpointing="depformer"), f"window {L0}, T {T1}: control"),
            (f"window {L0}, T {T1}: ttt_only, transformer not checkpointed", T1,
             dict(window, trains="ttt_only", chunk=256, checkpointing="depformer"), f"window {L0}, T {T1}: ttt_only"),
            (f"window {L0}, T {T1}: ttt_only, erase 1, transformer not checkpointed", T1,
             dict(window, trains="ttt_only", chunk=256, delta=1.0, checkpointing="depformer"),
             f"window {L0}, T {T1}: ttt_only, erase 1"),
            # --grad-checkpointing 16: the first 16 of Moshi 7B's 32 layers recompute, the rest keep theirs
            (f"window {L0}, T {T1}: ttt_only, erase 1, the last 16 layers not checkpointed", T1,
             dict(window, trains="ttt_only", chunk=256, delta=1.0, checkpointing="16"),
             f"window {L0}, T {T1}: ttt_only, erase 1"),
            # the smallest trainable set that learns far memory (results/horizon): a LoRA of rank 8 on the TTT
            # layers' linear_in, with the erase, against ttt_only with the erase
            (f"window {L0}, T {T1}: ttt_lora_in, erase 1", T1,
             dict(window, trains="ttt_lora_in", chunk=256, delta=1.0), f"window {L0}, T {T1}: ttt_only, erase 1"),
            (f"window {L0}, T {T2}: ttt_lora_in, erase 1", T2,
             dict(window, trains="ttt_lora_in", chunk=256, delta=1.0), f"window {L0}, T {T2}: ttt_only, erase 1"),
            (f"window {L0}, T {T1}: control, moshi's attention", T1, dict(window, trains="control", flex=False),
             f"window {L0}, T {T1}: control"),
            # moshi-finetune's 7B example (its README: about 12k tokens/s, 1,330 frames/s, on one H100); TTT
            # first: the LoRA control wraps the MLPs TTT converts
            ("moshi-finetune's example: lora_ttt, B 16 x T 1250", 1250,
             dict(window, trains="lora_ttt", chunk=256, batch=16), "moshi-finetune's example: LoRA 128"),
            ("moshi-finetune's example: lora_ttt, erase 1", 1250,
             dict(window, trains="lora_ttt", chunk=256, delta=1.0, batch=16),
             "moshi-finetune's example: lora_ttt, B 16 x T 1250"),
            ("moshi-finetune's example: LoRA 128", 1250, dict(window, trains="lora", batch=16), None)]
    # every layer compiled whole (torch.compile; norms, RoPE, casts and the gating fused), against the same
    # row with moshi's kernels alone; LoRA rows come last (their Linears stay wrapped), so these go before
    by_name = {r[0]: r for r in runs}
    runs[-3:-3] = [(f"{name}, layers compiled", by_name[name][1], dict(by_name[name][2], compiled_layers=True), name)
                   for name in (f"window {L0}, T {T1}: ttt_only", f"window {L0}, T {T1}: control",
                                f"window {L0}, T {T2}: ttt_only", f"window {L0}, T {T1}: ttt_only, erase 1",
                                *(f"window {L0}, T {T1}: {mode}, transformer not checkpointed"
                                  for mode in ("control", "ttt_only", "ttt_only, erase 1")))]
    runs = [r for r in runs if compiled or not r[2].get("eager")]
    wanted = {r[0] for r in runs if (rows_named is None and not r[2].get("compiled_layers"))  # asked by name only:
              or (rows_named is not None and rows_named in r[0])}  # their compiling at 7B was not seen to end
    while True:  # a row's reference runs with it, and that one's
        more = {r[3] for r in runs if r[0] in wanted and r[3]} - wanted
        if not more:
            break
        wanted |= more
    return [r for r in runs if r[0] in wanted]


STEP_PARTS = ("attention", "MLP and TTT", "norms", "depformer", "logits and loss", "other")


def step_parts(lm) -> dict:
    """The modules whose work `profile_step` names: each part of a Moshi LMModel's step (the
    members of a ModuleList, which is never called itself)."""
    layers, get = lm.transformer.layers, lambda name: getattr(lm, name, None)
    parts = {"attention": [layer.self_attn for layer in layers],
             "MLP and TTT": [layer.gating for layer in layers],
             "norms": [n for layer in layers for n in (layer.norm1, layer.norm2)] + [get("out_norm")],
             "depformer": [get(n) for n in ("depformer_in", "depformer_emb", "depformer_text_emb",
                                            "depformer_norms", "linears")]  # layer by layer: each is checkpointed
             + (list(lm.depformer.layers) if lm.depformer is not None else []),
             "logits and loss": [get("text_linear"), get("emb"), get("text_emb")]}
    flat = lambda ms: [c for m in ms if m is not None for c in (m if isinstance(m, torch.nn.ModuleList) else [m])]
    return {name: flat(modules) for name, modules in parts.items()}


def profile_step(lm, forward_backward, optimizer_step, device) -> dict:
    """torch.profiler over one training step, its device time split by part of the model
    (`step_parts`) and by phase: the forward, the backward, recomputation (a part's forward run
    again during the backward, gradient checkpointing) and the optimizer. A forward op is named
    by the part whose module ran it (a profiler range opened by forward hooks); a backward op by
    the forward op that made its autograd node (the same sequence number); whatever no part
    claims (the embeddings' gather, the loss's masks, copies) is "other". Milliseconds of device time
    (CPU time on a CPU) per part and phase, and the profile's total."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile
    handles, ranges = [], {}
    for name, modules in step_parts(lm).items():
        for m in modules:
            def enter(module, args, name=name):
                ranges.setdefault(id(module), []).append(record_function("part:" + name))
                ranges[id(module)][-1].__enter__()

            def leave(module, args, out):
                ranges[id(module)].pop().__exit__(None, None, None)
            # always_call: gradient checkpointing stops a recomputation midway by raising
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    try:
        with profile(activities=activities) as prof:
            with record_function("phase:forward and backward"):
                forward_backward()
            with record_function("phase:optimizer"):
                optimizer_step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    events = list(prof.events())
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)

    def ancestor(e, prefix):
        while e is not None and not e.name.startswith(prefix):
            e = e.cpu_parent
        return e

    def part_name(e):  # the part whose range holds e; the loss by its op (it is no module's)
        part = ancestor(e, "part:")
        return part.name[5:] if part else ("logits and loss" if ancestor(e, "aten::cross_entropy_loss") else None)
    backward_start = min((e.time_range.start for e in events if e.name.startswith("autograd::engine")),
                         default=float("inf"))
    part_of_seq = {}  # a forward op's sequence number -> its part
    for e in events:
        if e.sequence_nr >= 0 and e.time_range.start < backward_start:
            part_of_seq.setdefault(e.sequence_nr, part_name(e) or "other")
    table = {}
    for e in events:
        t = own(e) if e.device_type == DeviceType.CPU else 0  # a kernel's time is its launching op's
        if t <= 0 or e.name.startswith(("part:", "phase:")):
            continue
        part, node = part_name(e), ancestor(e, "autograd::engine::evaluate_function")
        if ancestor(e, "phase:optimizer"):
            key = ("optimizer", "optimizer")
        elif part is not None and node is None or ancestor(e, "part:"):  # a part's forward, or its recomputation
            key = (part, "recompute" if e.time_range.start >= backward_start else "forward")
        elif node is not None:
            key = (part_of_seq.get(node.sequence_nr, "other"), "backward")
        else:
            key = ("other", "backward" if e.time_range.start >= backward_start else "forward")
        table[key] = table.get(key, 0.0) + t / 1e3
    total = sum(table.values())
    rows = {}
    for part in STEP_PARTS + ("optimizer",):
        times = {phase: table.get((part, phase), 0.0) for phase in ("forward", "backward", "recompute", "optimizer")}
        row, part_total = {phase: round(t, 2) for phase, t in times.items()}, sum(times.values())
        row["total"] = round(part_total, 2)
        row["share"] = round(part_total / total, 4) if total else 0.0  # from the unrounded times
        rows[part] = row
    return dict(total_ms=round(total, 2), parts=rows,
                top_ops=[(k.key, round(own(k) / 1e3, 2)) for k in sorted(
                    [k for k in prof.key_averages() if not k.key.startswith(("part:", "phase:"))], key=own, reverse=True)[:15]])


def print_profile(result: dict) -> None:
    total = result["total_ms"]
    print(f"  {'part':<16} {'forward':>9} {'backward':>9} {'recompute':>10} {'optimizer':>10} {'total':>9} {'share':>7}  (ms)")
    for part, row in result["parts"].items():
        print(f"  {part:<16} {row['forward']:9.1f} {row['backward']:9.1f} {row['recompute']:10.1f} "
              f"{row['optimizer']:10.1f} {row['total']:9.1f} {100 * row['share']:6.1f} %")
    phases = {p: sum(r[p] for r in result["parts"].values()) for p in ("forward", "backward", "recompute", "optimizer")}
    print(f"  {'all':<16} " + " ".join(f"{phases[p]:9.1f}" if p in ("forward", "backward") else f"{phases[p]:10.1f}"
                                     for p in phases) + f" {total:9.1f}")
    print("  the ops that took the most time (self):")
    for name, ms in result["top_ops"]:
        print(f"    {ms:9.1f} ms {100 * ms / total:5.1f} %  {name[:90]}")


def state_bytes(d=4096, h=11264, chunk=256, dtype=torch.bfloat16, delta=0.0) -> dict:
    """Bytes of one stream's TTT state in one layer (moshi 7B's d and h by default), today's and the
    compact one, as `TTTGating._init_streaming_state` allocates it (on the meta device: no memory);
    `delta`: with the delta rule's erase (two numbers more: |Z^T Z|_F^2 of two chunks)."""
    out = {}
    for compact in (False, True):
        g = ttt.TTTGating(d, h, F.silu, chunk, 0.3, delta=delta).to(device="meta", dtype=dtype)
        g.compact_state = compact
        state = g._init_streaming_state(1)
        tensors = {id(t): t for t in vars(state).values() if isinstance(t, torch.Tensor)}  # S_read may be S
        out["compact" if compact else "exact"] = sum(t.numel() * t.element_size() for t in tensors.values())
    return out


@torch.no_grad()
def drift(steps: int, checkpoint: str, average_after: int, device) -> dict:
    """The compact state's drift on a stream of `steps` tokens, one per step, of validation text:
    the next-byte logits of a bf16 copy of the checkpoint streamed with today's state and with
    the compact one, against the float32 model streamed (float32 streaming is within 1e-4 of the
    parallel form, test_all): the largest difference per 1000 steps and how often the greedy byte
    differs. `average_after`: K for every TTT layer (a long stream's setting, results/horizon)."""
    import data
    base = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(checkpoint), device, checkpoint).eval()
    M.set_context(base, checkpoints.load_checkpoint(checkpoint)["settings"].get("window"))
    for g in freeze.ttt_modules(base):
        g.average_after = average_after
    models = {"float32": base.float(), "bf16": copy_to(base, torch.bfloat16, False),
              "bf16 compact": copy_to(base, torch.bfloat16, True)}
    text = torch.from_numpy(data.load_corpus(None).val[:steps].astype("int64")).to(device)[None]
    worst = {name: [] for name in models if name != "float32"}
    differ = {name: 0 for name in worst}
    start = time.time()
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(m.streaming(1))
        for t in range(steps):
            out = {name: M.logits(m, text[:, t:t + 1])[0, -1] for name, m in models.items()}
            for name in worst:
                if t % 1000 == 0:
                    worst[name].append(0.0)
                worst[name][-1] = max(worst[name][-1], (out[name] - out["float32"]).abs().max().item())
                differ[name] += int(out[name].argmax() != out["float32"].argmax())
            if (t + 1) % 5000 == 0:
                so_far = ", ".join(f"{name} {max(w):.3f}" for name, w in worst.items())
                print(f"  step {t + 1}: largest logit difference so far {so_far} ({time.time() - start:.0f} s)",
                      flush=True)
    return dict(checkpoint=checkpoint, steps=steps, average_after=average_after,
                largest_per_1000_steps=worst, greedy_differs=differ, state_bytes_7b=state_bytes(),
                state_bytes_7b_chunk1024=state_bytes(chunk=1024))


def copy_to(model, dtype, compact: bool):
    import copy
    m = copy.deepcopy(model).to(dtype)
    for g in freeze.ttt_modules(m):
        g.compact_state = compact
    return m


def revision_name() -> str:
    """$REVISION where set (a GPU machine's copy has a stale or no .git), else git's short hash, marked
    when the Python files differ from it."""
    revision = os.environ.get("REVISION")
    if not revision:
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=here).stdout.strip()
            changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "*.py"], cwd=here).returncode == 1
            revision += "+uncommitted changes" if revision and changed else ""
        except OSError:
            revision = ""
    return revision or "unknown"


def encode_speed(seconds: float, device) -> dict:
    """encode_dataset.encode_audio on `seconds` of stereo noise with Moshi's 8 codebooks per channel
    (Mimi with random weights does a trained Mimi's work): wall time after a 5 s warm-up."""
    import numpy as np
    from moshi.models import loaders
    import encode_dataset
    mimi = loaders.get_mimi(None, num_codebooks=8, device=device).eval()
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, (2, int(24000 * seconds))).astype(np.float32)
    encode_dataset.encode_audio(mimi, audio[:, :24000 * 5], device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    codes = encode_dataset.encode_audio(mimi, audio, device)
    sync()
    took = time.perf_counter() - start
    result = dict(audio_s=seconds, frames=codes.shape[-1], encode_s=round(took, 2), real_time=round(seconds / took, 1),
                  minutes_per_hour_of_audio=round(60 * took / seconds, 2))
    print(f"encode: {seconds:.0f} s of stereo audio in {took:.1f} s, {seconds / took:.1f}x real time, "
          f"{60 * took / seconds:.1f} min per hour of audio")
    return result


def main():
    p = eval_passkey.OneLineParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench.json")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--profile", type=int, default=None, metavar="T",
                   help="only profile one TTT gating forward + backward at length T (chunk 256)")
    p.add_argument("--realtime", action="store_true", help="only: LMGen.step of moshi's 7B configuration, "
                   "random weights, bf16, CUDA graphs, with and without YaRN and TTT (CUDA, ~40 GB)")
    p.add_argument("--serving", action="store_true", help="only: LMGen.step of moshi's 7B configuration with "
                   "many streams: memory per stream, the largest batch within the 80 ms frame (CUDA)")
    p.add_argument("--scale", action="store_true", help="only: one training step of moshi's 7B configuration, "
                   "random weights, per freeze mode and sequence length, against a control (CUDA, ~60 GB)")
    p.add_argument("--profile-step", action="store_true", help="only: where one --scale step of ttt_only "
                   "(window, T 4 L0) spends its GPU time, by part of the model and phase (CUDA)")
    p.add_argument("--rows", default=None, metavar="TEXT", help="--scale: only the rows whose name holds TEXT "
                   "(and those they are compared against)")
    p.add_argument("--steps", type=int, default=500, help="timed LMGen steps per configuration (--realtime)")
    p.add_argument("--drift", type=int, default=None, metavar="STEPS", help="only: the compact TTT state's drift "
                   "over a stream of STEPS tokens (45000: an hour of Moshi) of --checkpoint, against float32")
    p.add_argument("--checkpoint", default=None, help="--drift: a checkpoint of this project with TTT")
    p.add_argument("--average-after", type=int, default=0, help="--drift: K of every TTT layer (0: the sum)")
    p.add_argument("--encode", type=float, default=None, metavar="SECONDS", help="only: encode_dataset.py's Mimi "
                   "encoding of SECONDS of stereo audio (Moshi's 8 codebooks per channel)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if (args.realtime or args.serving or args.scale or args.profile_step) and not cuda:
        p.error("--realtime, --serving, --scale and --profile-step need a CUDA device (CUDA graphs, a 7B model)")
    if args.steps < 10:
        p.error(f"--steps must be >= 10, got {args.steps}")
    if args.encode is not None:
        if not args.encode >= 1:
            p.error(f"--encode must be >= 1 second, got {args.encode}")
        hardware = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
        print(f"encode on {hardware}, torch {torch.__version__}, revision {revision_name()}", flush=True)
        result = dict(hardware=hardware, torch=torch.__version__, revision=revision_name(),
                      encode=encode_speed(args.encode, device))
        checkpoints.save_json(args.out, result)
        print(f"wrote {args.out}")
        return
    if args.drift is not None:
        if args.drift < 1 or not args.checkpoint or args.average_after < 0:
            p.error("--drift needs STEPS >= 1, a --checkpoint and --average-after >= 0")
        try:
            checkpoints.check_writable(args.out, folder=False)
            checkpoints.load_checkpoint(args.checkpoint)
        except ValueError as e:
            p.error(str(e))
        print(f"drift on {device}, torch {torch.__version__}, revision {revision_name()}", flush=True)
        result = dict(torch=torch.__version__, revision=revision_name(),
                      drift=drift(args.drift, args.checkpoint, args.average_after, device))
        checkpoints.save_json(args.out, result)
        print(f"wrote {args.out}")
        return
    if args.realtime or args.serving or args.scale or args.profile_step:
        what = "realtime" if args.realtime else "serving" if args.serving else "scale"
        print(f"{what} on {torch.cuda.get_device_name(device)}, torch {torch.__version__}, revision {revision_name()}")
        if args.scale or args.profile_step:
            result = scale(device, profile=args.profile_step, rows_named=args.rows)
        elif args.serving:
            result = serving(device, steps=min(args.steps, 60))
        else:
            result = dict(mlp_step=gating_step(device), lmgen=realtime(device, args.steps))
        result = dict(hardware=torch.cuda.get_device_name(device), torch=torch.__version__,
                      revision=revision_name(), **{what: result})
        checkpoints.save_json(args.out, result)
        print(f"wrote {args.out}")
        return
    if args.profile is not None:
        if args.profile < 1:
            p.error(f"--profile must be a length >= 1, got {args.profile}")
        return profile_gating(1024 if cuda else 256, 2816 if cuda else 704, args.profile, 256,
                              torch.bfloat16 if cuda else torch.float32, device)
    if cuda:
        d, h, B, lengths, chunks, dtype, reps = 1024, 2816, 1, [4096, 16384, 32768], [256, 1024], torch.bfloat16, 10
        rope_shape, step_cfg = (4, 16, 8192, 64), ("gpu", 4096, 4, 256)
        hardware = torch.cuda.get_device_name(device)
    else:
        d, h, B, lengths, chunks, dtype, reps = 256, 704, 1, [1024, 4096], [128, 512], torch.float32, 3
        rope_shape, step_cfg = (1, 4, 2048, 64), ("cpu", 512, 2, 64)
        hardware = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if args.quick:
        lengths, reps = lengths[:1], 3
    revision = revision_name()
    print(f"bench on {hardware}, torch {torch.__version__}, {dtype}, revision {revision}")
    print(f"1-2. TTT gating fwd+bwd vs moshi ActivationGating (d {d}, h {h}), "
          f"scan (group {ttt.GPU_GROUP_TOKENS if cuda else 'chunk'}) / chunkwise scan / prefix-sum / loop:")
    gating = [r for T in lengths for r in bench_gating(d, h, B, T, chunks, dtype, device, reps)]
    print("3. RoPE fwd+bwd:")
    rope = bench_rope(rope_shape, dtype if cuda else torch.float32, device, reps)
    print("4. training step:")
    step = bench_train_step(*step_cfg, dtype, device, reps)
    result = dict(hardware=hardware, torch=torch.__version__, dtype=str(dtype), revision=revision,
                  gating=gating, rope=rope, train_step=step)
    checkpoints.save_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Speed and memory of the TTT layer and YaRN RoPE, as ratios measured in one run.

    python bench.py                 # CUDA if available (bf16), else a smaller CPU version (fp32)
    python bench.py --out bench.json --quick
    python bench.py --profile 32768      # where one TTT gating forward + backward spends its time

0. The fast path's error against a float64 reference on the same (e.g. bf16) inputs.
1. TTT gating forward + backward vs moshi's ActivationGating of the same size: time, peak memory.
2. The same for the paper's prefix-sum form (official In-Place TTT; kept here as the anchor), for
   `ttt.ttt_scan` one chunk per step (group = chunk), and for the readable reference
   `ttt.ttt_chunked` (a Python loop that autograd unrolls).
3. YaRN RoPE vs moshi's apply_rope: forward + backward over q, k.
4. A full training step (forward, backward, AdamW) with and without TTT layers: tokens/s.

Timing: warm-up, then the median of several repetitions (CUDA events on a GPU). Peak memory is
what a forward + backward allocates beyond its inputs and parameters (CUDA only).
"""
import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch
import torch.nn.functional as F
from moshi.modules.gating import ActivationGating
from moshi.modules.rope import apply_rope

import model as M
import ttt
import yarn


def prefix_sum_form(Z, V, W_down, eta, chunk_size):
    """The official parallel form: one d x h weight per chunk, from an exclusive cumsum."""
    B, T, h = Z.shape
    n = -(-T // chunk_size)
    pad = n * chunk_size - T
    Zc = F.pad(Z, (0, 0, 0, pad)).view(B, n, chunk_size, h)
    Vc = F.pad(V, (0, 0, 0, pad)).view(B, n, chunk_size, -1)
    dW = torch.einsum("bncd,bnch->bndh", Vc, Zc)
    W = W_down + eta * (torch.cumsum(dW, dim=1) - dW)  # [B, n, d, h]
    return torch.einsum("bnch,bndh->bncd", Zc, W).reshape(B, n * chunk_size, -1)[:, :T]


@contextlib.contextmanager
def fast_weight_path(fn):
    """Swaps the function TTTGating calls for its fast-weight product (bench only)."""
    saved = ttt.ttt_scan
    ttt.ttt_scan = fn
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
                 ("prefix_sum", prefix_sum_form), ("loop", ttt.ttt_chunked))
        for name, fn in paths:
            if name == "loop" and T // C > 64:
                continue  # autograd unrolls one weight per chunk: too slow and large to be useful
            with fast_weight_path(fn):
                try:
                    row[f"{name}_ms"], row[f"{name}_mib"] = measure(step(g), device, reps)
                except torch.OutOfMemoryError:
                    row[f"{name}_ms"] = row[f"{name}_mib"] = float("inf")
                    torch.cuda.empty_cache()
        rows.append(row)
        print(f"  T {T:>6} C {C:>5}: plain {t_plain:8.2f} ms {m_plain:8.0f} MiB | " + " | ".join(
            f"{n} {row[n + '_ms'] / t_plain:5.2f}x time {row[n + '_mib'] / m_plain:5.2f}x mem"
            for n in ("scan", "chunkwise", "prefix_sum", "loop") if n + "_ms" in row), flush=True)
    return rows


def check_scan(d, h, T, chunk, dtype, device):
    """Relative error of ttt_scan (the default group on this device) and its gradients against
    ttt_chunked in float64 on the same inputs: bf16 inputs should land between 1e-3 and 1e-2."""
    g = torch.Generator(device).manual_seed(0)
    Z = torch.randn(2, T, h, device=device, generator=g).to(dtype)
    V = (0.1 * torch.randn(2, T, d, device=device, generator=g)).to(dtype)
    W = (torch.randn(d, h, device=device, generator=g) / h ** 0.5).to(dtype)
    dO = torch.randn(2, T, d, device=device, generator=g)
    results = []
    for fn, cast in ((ttt.ttt_chunked, torch.float64), (ttt.ttt_scan, dtype)):
        xs = [x.to(cast).requires_grad_() for x in (Z, V, W)]
        out = fn(*xs, 0.01, chunk)
        out.backward(dO.to(out.dtype))
        results.append([out] + [x.grad for x in xs])
    errors = {name: ((got.double() - ref).norm() / ref.norm()).item()
              for name, ref, got in zip(("O", "dZ", "dV", "dW"), *results)}
    print(f"  T {T}, chunk {chunk}, {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
    return dict(T=T, chunk=chunk, **errors)


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench.json")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    p.add_argument("--profile", type=int, default=None, metavar="T",
                   help="only profile one TTT gating forward + backward at length T (chunk 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
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
    revision = os.environ.get("REVISION")  # names the revision where .git is absent or stale (a rented GPU)
    if not revision:
        try:
            revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                      cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            revision = ""
    revision = revision or "unknown"
    print(f"bench on {hardware}, torch {torch.__version__}, {dtype}, revision {revision}")
    print("0. ttt_scan vs ttt_chunked in float64, relative error of the output and gradients:")
    check = check_scan(d, h, lengths[0], chunks[0], dtype, device)
    print(f"1-2. TTT gating fwd+bwd vs moshi ActivationGating (d {d}, h {h}), "
          f"scan (group {ttt.GPU_GROUP_TOKENS if cuda else 'chunk'}) / chunkwise scan / prefix-sum / loop:")
    gating = [r for T in lengths for r in bench_gating(d, h, B, T, chunks, dtype, device, reps)]
    print("3. RoPE fwd+bwd:")
    rope = bench_rope(rope_shape, dtype if cuda else torch.float32, device, reps)
    print("4. training step:")
    step = bench_train_step(*step_cfg, dtype, device, reps)
    result = dict(hardware=hardware, torch=torch.__version__, dtype=str(dtype), revision=revision,
                  scan_error=check, gating=gating, rope=rope, train_step=step)
    with open(args.out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""How long torch.compile takes on a Moshi-shaped model with TTT, layer by layer compiled as
bench.py's "layers compiled" row does (WindowAttention, the depformer's contiguous steps, ttt_only,
every layer recomputed in the backward): the first step (the compile) and the second, dynamo's
compile phases, the graphs dynamo made and their node counts, and the graphs inductor lowered.
A diagnosis of the compile, not a speed measurement. Every 60 s (DUMP_EVERY) the Python stacks are
printed, so a run cut short shows where it was. Run from the repository root:

python results/training_7b/compile_probe.py --device cuda --T 12000 --window 3000 --chunk 256 \
    --layers 2 --dim 4096 --heads 32        # the 7B layer's shape, one TTT layer and one plain
    [--bf16] [--real-depformer] [--layers 8] # closer to bench.py's 7B row
OPAQUE_SCAN=1 ...                           # the TTT scan left out of the compiled graphs
"""
import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ind_"))  # fresh: no cache hits
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--T", type=int, default=256)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--backend", default="inductor")
p.add_argument("--chunk", type=int, default=16)
p.add_argument("--window", type=int, default=None, help="default T // 4")
p.add_argument("--group", type=int, default=None, help="scan tokens per group (GPU default 2048); None: CPU default, one chunk")
p.add_argument("--flex", action="store_true", help="on a CPU: the GPU path (block mask and compiled flex_attention)")
p.add_argument("--delta", type=float, default=0.0)
p.add_argument("--no-compile", action="store_true")
p.add_argument("--no-depformer-compile", action="store_true")
p.add_argument("--steps", type=int, default=2)
p.add_argument("--dim", type=int, default=32)
p.add_argument("--heads", type=int, default=2)
p.add_argument("--device", default="cpu")
p.add_argument("--bf16", action="store_true", help="frozen weights bf16, trained ones float32 under bf16 autocast "
               "(as bench.py --scale and train.py at 7B)")
p.add_argument("--real-depformer", action="store_true", help="the depformer of Moshi 7B's configuration "
               "(6 layers, dim 1024), not a small one")
args = p.parse_args()
window = args.window or args.T // 4

import depformer_steps  # noqa: E402
import freeze  # noqa: E402
import model as M  # noqa: E402
import ttt  # noqa: E402
import window_attention  # noqa: E402
from moshi.models import loaders  # noqa: E402

if args.group is not None:  # the GPU's grouping on the CPU
    _orig_group_tokens = ttt._group_tokens
    ttt._group_tokens = lambda Z, chunk_size, group: _orig_group_tokens(Z, chunk_size, group or args.group)
if os.environ.get("OPAQUE_SCAN"):  # the scan left out of the graph (a graph break around it), to size the rest
    ttt.ttt_scan = torch._dynamo.disable(ttt.ttt_scan)
if args.flex:  # the GPU path of window_attention on the CPU
    def _flex(q, k, v, context):
        return window_attention._compiled_flex_attention()(
            q, k, v, block_mask=window_attention.block_mask(q.shape[2], context, str(q.device)))
    window_attention.sliding_window_attention = _flex

# ---- node counting: wrap the backend ------------------------------------------------------------------
GRAPHS = []  # (kind, nodes)


def _count(kind, inner):
    def compiler(gm, example_inputs):
        nodes = sum(len(m.graph.nodes) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        GRAPHS.append((kind, nodes, len(gm.graph.nodes)))
        return inner(gm, example_inputs)
    return compiler


def make_backend(name):
    from torch._dynamo.backends.common import aot_autograd
    if name == "eager":
        return _count("dynamo", lambda gm, ex: gm.forward)
    if name == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        aot = aot_autograd(fw_compiler=_count("aot_fw", lambda gm, ex: make_boxed_func(gm.forward)),
                           bw_compiler=_count("aot_bw", lambda gm, ex: make_boxed_func(gm.forward)),
                           partition_fn=min_cut_rematerialization_partition)
        return _count("dynamo", aot)
    if name == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def inductor(gm, example_inputs):
            # count the AOT graphs through inductor's own hooks: post_grad passes see fw and bw graphs
            return compile_fx(gm, example_inputs)
        return _count("dynamo", inductor)
    raise ValueError(name)


if args.backend == "inductor":  # count the AOT fw/bw graphs that reach inductor's lowering
    import torch._inductor.config as icfg

    def _post_grad(graph):
        GRAPHS.append(("inductor_post_grad", len(graph.nodes),
                       sum(1 for n in graph.nodes if n.op == "call_function")))
    icfg.post_grad_custom_post_pass = _post_grad

# ---- the model, as test_all's compile test and bench.scale --------------------------------------------
torch.manual_seed(0)
kw = dict(loaders._lm_kwargs, dim=args.dim, text_card=48, card=16, num_heads=args.heads, num_layers=args.layers,
          context=window)
if not args.real_depformer:
    kw.update(depformer_dim=16, depformer_dim_feedforward=32, depformer_num_heads=2, depformer_num_layers=1)
lm = loaders.get_moshi_lm(None, lm_kwargs=kw, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                          device=args.device)
depformer_steps.apply_contiguous_steps(lm)
for layer in lm.transformer.layers:
    layer.self_attn.__class__ = window_attention.WindowAttention
ttt.apply_ttt(lm, ttt.default_layers(args.layers), args.chunk, eta=0.3, delta=args.delta)
with torch.no_grad():
    for g in lm.modules():
        if isinstance(g, ttt.TTTGating):
            g.conv.weight.normal_(std=0.02)
freeze.apply_freeze(lm, "ttt_only")
freeze.upcast_trainable(lm)  # float32 master weights for what trains (a no-op in float32)
M.set_checkpointing(lm, "all")
if not args.no_compile:
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    backend = make_backend(args.backend)
    layers = [*lm.transformer.layers] + ([] if args.no_depformer_compile else [*lm.depformer.layers])
    for layer in layers:
        layer.compile(backend=backend)

g = torch.Generator().manual_seed(0)
codes = torch.randint(0, lm.card, (1, lm.num_codebooks, args.T), generator=g)
codes[:, 0] = torch.randint(0, lm.text_card, (1, args.T), generator=g)
codes = codes.to(args.device)
params = [q for q in lm.parameters() if q.requires_grad]
print(f"T {args.T} layers {args.layers} ttt {ttt.default_layers(args.layers)} window {window} chunk {args.chunk} "
      f"group {args.group} flex {args.flex} delta {args.delta} backend {args.backend} "
      f"compile {not args.no_compile} bf16 {args.bf16} real depformer {args.real_depformer}", flush=True)
if args.device.startswith("cuda"):  # the mask made before compiling, as bench.scale does
    window_attention.block_mask(args.T, window, str(codes.device))
import faulthandler  # noqa: E402
faulthandler.dump_traceback_later(int(os.environ.get("DUMP_EVERY", "90")), repeat=True)
times = []
for step in range(args.steps):
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    loss = M.multistream_loss(lm, codes, 0.5, 100.0)
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    times.append((t1 - t0, t2 - t1))
    lm.zero_grad(set_to_none=True)
    print(f"step {step}: forward {t1 - t0:.2f} s, backward {t2 - t1:.2f} s, total {t2 - t0:.2f} s", flush=True)

from torch._dynamo.utils import compile_times, counters  # noqa: E402
ct = compile_times(repr="csv")
names, values = ct if isinstance(ct, tuple) else (None, None)
print("compile_times:")
print(compile_times(repr="str", aggregate=True))
print("counters stats:", dict(counters["stats"]))
print("graph_break:", sum(counters["graph_break"].values()), dict(counters["graph_break"]))
by = {}
for kind, n, f in GRAPHS:
    by.setdefault(kind, []).append(n)
for kind, ns in by.items():
    print(f"graphs {kind}: {len(ns)} graphs, nodes {ns}, total {sum(ns)}")
try:
    from torch._inductor import metrics as _m
    print("inductor generated_kernel_count", _m.generated_kernel_count)
except Exception:
    pass
print(f"RESULT T={args.T} layers={args.layers} backend={args.backend} group={args.group} flex={args.flex} "
      f"first={sum(times[0]):.2f} second={sum(times[-1]):.2f} "
      + " ".join(f"{k}={sum(v)}/{len(v)}" for k, v in by.items()), flush=True)

import os, time, torch, torch.nn.functional as F
os.environ.setdefault("NO_TORCH_COMPILE", "1")
import ttt
from torch.profiler import profile, ProfilerActivity
dev = torch.device("cuda")
d, h, C = 4096, 11264, 256
torch.manual_seed(0)
with torch.device(dev):
    g = ttt.TTTGating(d, h, F.silu, C, 0.3)
g = g.to(torch.bfloat16).eval()
torch.nn.init.normal_(g.conv.weight, std=0.02)
x = torch.randn(1, 1, d, device=dev, dtype=torch.bfloat16)
with torch.no_grad(), g.streaming(1):
    for _ in range(5):
        g(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = g(x)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(100):
        graph.replay()
    e.record(); torch.cuda.synchronize()
    print(f"TTT gating step, graphed: {s.elapsed_time(e) / 100:.3f} ms")
    from moshi.modules.gating import ActivationGating
    with torch.device(dev):
        plain = ActivationGating(d, 3 * h // 2, F.silu).to(torch.bfloat16)
    graph2 = torch.cuda.CUDAGraph()
    for _ in range(3): plain(x)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph2):
        out2 = plain(x)
    for _ in range(10): graph2.replay()
    s.record()
    for _ in range(100):
        graph2.replay()
    e.record(); torch.cuda.synchronize()
    print(f"plain gating step, graphed: {s.elapsed_time(e) / 100:.3f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            g(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90))

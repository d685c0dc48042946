import torch, ttt
from torch.profiler import profile, ProfilerActivity
T, h, d, chunk = 12000, 11264, 4096, 256
g = torch.Generator(device="cuda").manual_seed(0)
Z = (torch.randn(1, T, h, device="cuda", generator=g) / h ** 0.5).bfloat16().requires_grad_()
V = torch.randn(1, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
for name, scan in (("sum", lambda: ttt.ttt_scan(Z, V, None, 1e-2, chunk)),
                   ("erase", lambda: ttt.ttt_delta_scan(Z, V, 1e-2, chunk, 1.0))):
    def step():
        scan().float().square().mean().backward()
        Z.grad = V.grad = None
    step(); step(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"==== {name} (3 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))

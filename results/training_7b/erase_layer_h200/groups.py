import os, sys, time, json
import torch
import ttt

def timed(fn, reps=3):
    fn(); torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps, torch.cuda.max_memory_allocated() / 2**30

T, h, d, chunk = int(sys.argv[1]), 11264, 4096, int(sys.argv[2])
g = torch.Generator(device="cuda").manual_seed(0)
Z = (torch.randn(1, T, h, device="cuda", generator=g) / h ** 0.5).bfloat16().requires_grad_()
V = torch.randn(1, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
out = {}
print(f"T {T}, chunk {chunk}, h {h}, d {d}, one layer forward + backward, bf16", flush=True)
for name, scan in (("sum", lambda grp: ttt.ttt_scan(Z, V, None, 1e-2, chunk, group=grp)),
                   ("erase 1", lambda grp: ttt.ttt_delta_scan(Z, V, 1e-2, chunk, 1.0, group=grp))):
    for grp in (512, 1024, 2048, 4096, 8192):
        if grp % chunk:
            continue
        def step():
            P = scan(grp)
            P.float().square().mean().backward()
            Z.grad = V.grad = None
        s, mem = timed(step)
        out[f"{name}, group {grp}"] = dict(s=s, peak_gib=mem)
        print(f"  {name:8s} group {grp:5d}: {s * 1e3:7.1f} ms, peak {mem:5.1f} GiB", flush=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), f"groups_T{T}_c{chunk}.json"), "w"), indent=1)

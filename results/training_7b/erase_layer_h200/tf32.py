import time, torch, ttt
T, h, d, chunk = 12000, 11264, 4096, 256
g = torch.Generator(device="cuda").manual_seed(0)
Z = (torch.randn(1, T, h, device="cuda", generator=g) / h ** 0.5).bfloat16().requires_grad_()
V = torch.randn(1, T, d, device="cuda", generator=g).bfloat16().requires_grad_()
def step(Z, V, eta=1e-2):
    P = ttt.ttt_delta_scan(Z, V, eta, chunk, 1.0)
    P.float().square().mean().backward()
    return P
for tf32 in (False, True, False, True):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    step(Z, V); torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(3):
        step(Z, V)
    torch.cuda.synchronize()
    print(f"erase, tf32 {tf32}: {(time.perf_counter() - t) / 3 * 1e3:.1f} ms fwd+bwd", flush=True)
# precision against float64, T 4096, a strong eta so the erase matters
Ts = 4096
for eta in (1e-2, 1.0):
    Zs, Vs = Z[:, :Ts].detach().clone().requires_grad_(), V[:, :Ts].detach().clone().requires_grad_()
    Zd, Vd = Zs.detach().double().requires_grad_(), Vs.detach().double().requires_grad_()
    torch.backends.cuda.matmul.allow_tf32 = False
    Pd = ttt.ttt_delta_scan(Zd, Vd, eta, chunk, 1.0, group=2048); W = torch.randn_like(Pd)
    (Pd * W).sum().backward()
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        Zs.grad = Vs.grad = None
        P = ttt.ttt_delta_scan(Zs, Vs, eta, chunk, 1.0)
        (P.double() * W).sum().backward()
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
        print(f"eta {eta}, tf32 {tf32}: P {rel(P, Pd):.2e}, dZ {rel(Zs.grad, Zd.grad):.2e}, dV {rel(Vs.grad, Vd.grad):.2e}", flush=True)

"""Tests, by concept. Each property is checked against an independent reference (moshi's own code,
transformers' numbers kept in testdata/, a float64 formula, a naive loop), never against itself.

    python -m pytest -q test_all.py
"""
import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from moshi.modules.rope import apply_rope

import checkpoints
import config
import data
import eval_passkey
import freeze
import model as M
import rope_modulo
import sweep
import train
import ttt
import yarn

HERE = os.path.dirname(os.path.abspath(__file__))
FAST = settings(max_examples=25, deadline=None, derandomize=True)  # the same examples in every CI run
TINY = dict(dim=32, num_heads=2, num_layers=4, context=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return M.build_model(dict(TINY, **overrides)).eval()


def randomise_ttt(model, seed=0, eta=0.5):
    """Non-zero conv and eta, so the fast-weight path actually changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in freeze.ttt_modules(model):
        with torch.no_grad():
            m.conv.weight.copy_(torch.randn(m.conv.weight.shape, generator=g) * 0.3)
            m.W_target.copy_(torch.randn(m.W_target.shape, generator=g) * 0.3)
        m.eta = eta


# ============================================================================================
# YaRN
# ============================================================================================

def yarn_inv_freq_f64(dim, base, scale, L, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """The published formula, float64, written out independently."""
    def cdim(r):
        return dim * math.log(L / (2 * math.pi * r)) / (2 * math.log(base))
    low, high = cdim(beta_fast), cdim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        theta = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(theta * (1 - ramp) + theta / scale * ramp)
    return np.array(out)


def test_yarn_matches_transformers():
    reference = json.load(open(os.path.join(HERE, "testdata", "yarn_transformers.json")))
    assert len(reference["configs"]) >= 20
    for c in reference["configs"]:
        got = yarn.yarn_inv_freq(c["dim"], c["base"], c["scale"], c["original_len"],
                                 c["beta_fast"], c["beta_slow"], c["truncate"])
        assert got.dtype == torch.float32 and got.shape == (c["dim"] // 2,)
        np.testing.assert_allclose(got.numpy(), c["inv_freq"], rtol=2e-6, err_msg=str(c))
        factor = yarn.yarn_attention_factor(c["scale"], c["mscale"] or 0.0, c["mscale_all_dim"] or 0.0) \
            if c["mscale"] is not None else yarn.yarn_attention_factor(c["scale"])
        assert factor == pytest.approx(c["attention_factor"], rel=1e-12), c


def test_yarn_worked_check():
    # ANCHORS: D=128, b=1e4, L=4096 gives raw correction dims 20.94 and 45.03, so 20 and 46.
    assert yarn.correction_dim(32, 128, 1e4, 4096) == pytest.approx(20.94, abs=0.01)
    assert yarn.correction_dim(1, 128, 1e4, 4096) == pytest.approx(45.03, abs=0.01)
    assert yarn.correction_range(128, 1e4, 4096) == (20, 46)
    assert yarn.yarn_attention_factor(1.0) == 1.0
    assert yarn.yarn_attention_factor(0.5) == 1.0
    assert yarn.yarn_attention_factor(math.e ** 2) == pytest.approx(1.2)


@FAST
@given(dim=st.sampled_from([8, 16, 32, 64, 128]), base=st.sampled_from([1e4, 5e5]),
       scale=st.floats(1.0, 64.0), L=st.integers(64, 8192), truncate=st.booleans())
def test_yarn_against_float64_formula(dim, base, scale, L, truncate):
    got = yarn.yarn_inv_freq(dim, base, scale, L, truncate=truncate).double().numpy()
    ref = yarn_inv_freq_f64(dim, base, scale, L, truncate=truncate)
    np.testing.assert_allclose(got, ref, rtol=1e-5)  # float32 against float64: a few ulps
    # pairs below `low` unchanged, above `high` divided by the scale
    low, high = yarn.correction_range(dim, base, L, truncate=truncate)
    vanilla = base ** (-np.arange(0, dim, 2) / dim)
    for i in range(dim // 2):
        if i <= low:
            assert got[i] == pytest.approx(vanilla[i], rel=1e-5)
        if i >= high:
            assert got[i] == pytest.approx(vanilla[i] / scale, rel=1e-5)


@FAST
@given(dim=st.sampled_from([16, 32, 64, 128]), L=st.integers(64, 8192))
def test_yarn_split_counts_against_the_formula(dim, L):
    """Pairs whose frequency the float64 formula leaves as trained / divides by the scale / blends."""
    theta = np.array([1e4 ** (-2 * i / dim) for i in range(dim // 2)])
    ref = yarn_inv_freq_f64(dim, 1e4, 4.0, L)
    kept, interpolated = int(np.isclose(ref, theta, rtol=1e-12).sum()), int(np.isclose(ref, theta / 4, rtol=1e-12).sum())
    assert yarn.split_counts(dim, 1e4, L) == (kept, dim // 2 - kept - interpolated, interpolated)


@FAST
@given(dim=st.sampled_from([8, 32, 128]), scale=st.floats(1.0, 32.0))
def test_pi_and_ntk_formulas(dim, scale):
    i = np.arange(dim // 2)
    np.testing.assert_allclose(yarn.pi_inv_freq(dim, 1e4, scale).numpy(), 1e4 ** (-2 * i / dim) / scale, rtol=1e-5)
    ntk_base = 1e4 * scale ** (dim / (dim - 2))
    np.testing.assert_allclose(yarn.ntk_inv_freq(dim, 1e4, scale).numpy(), ntk_base ** (-2 * i / dim), rtol=1e-5)
    # NTK interpolates the lowest frequency by exactly the scale
    assert yarn.ntk_inv_freq(dim, 1e4, scale)[-1].item() == pytest.approx(1e4 ** (-(dim - 2) / dim) / scale, rel=1e-5)
    assert yarn.dynamic_scale(3 * 100, 100) == 3.0 and yarn.dynamic_scale(50, 100) == 1.0


@FAST
@given(B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 40), D=st.sampled_from([2, 8, 16]),
       offset=st.integers(0, 3000), interleave=st.booleans(), heads_first=st.booleans())
def test_yarn_scale_1_equals_moshi_apply_rope(B, H, T, D, offset, interleave, heads_first):
    shape = (B, T, H, D) if heads_first else (B, H, T, D)
    q, k = torch.randn(shape), torch.randn(shape)
    offsets = torch.full((B,), offset) + torch.arange(B)
    for method in yarn.METHODS:
        rope = yarn.YarnRotaryEmbedding(scale=1.0, original_len=64, method=method, interleave=interleave)
        got = rope(q, k, offsets, time_before_heads=heads_first)
        ref = apply_rope(q, k, offsets, 10_000, interleave=interleave, time_before_heads=heads_first)
        # moshi computes its angles in float32: at position p they are off by ~p * 6e-8 rad
        tol = 1e-5 + 2e-7 * (offset + T)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=tol, rtol=1e-5)


@FAST
@given(shift=st.integers(0, 5000), T=st.integers(2, 24), scale=st.sampled_from([1.0, 4.0, 16.0]),
       method=st.sampled_from(yarn.METHODS))
def test_rotated_dot_product_depends_only_on_distance(shift, T, scale, method):
    rope = yarn.YarnRotaryEmbedding(scale=scale, original_len=128, method=method)
    q, k = torch.randn(1, 2, T, 16).double(), torch.randn(1, 2, T, 16).double()
    a = rope(q, k, torch.tensor([0]))
    b = rope(q, k, torch.tensor([shift]))
    scores_a = a[0] @ a[1].transpose(-1, -2)
    scores_b = b[0] @ b[1].transpose(-1, -2)
    torch.testing.assert_close(scores_a, scores_b, atol=1e-3, rtol=1e-4)


@FAST
@given(T=st.integers(2, 64), cut=st.integers(1, 63), scale=st.sampled_from([2.0, 8.0]),
       dynamic=st.booleans())
def test_streaming_offset_equals_slicing(T, cut, scale, dynamic):
    cut = min(cut, T - 1)
    rope = yarn.YarnRotaryEmbedding(scale=scale, original_len=256, dynamic=dynamic)
    q, k = torch.randn(2, 3, T, 8), torch.randn(2, 3, T, 8)
    full_q, full_k = rope(q, k, torch.zeros(2, dtype=torch.long))
    tail_q, tail_k = rope(q[:, :, cut:], k[:, :, cut:], torch.full((2,), cut))
    torch.testing.assert_close(tail_q, full_q[:, :, cut:])
    torch.testing.assert_close(tail_k, full_k[:, :, cut:])


def test_yarn_temperature_on_both_q_and_k():
    """q.k grows by the square of the attention factor (the port scaled q only)."""
    scale = 16.0
    rope = yarn.YarnRotaryEmbedding(scale=scale, original_len=128)
    q, k = torch.randn(1, 1, 8, 32).double(), torch.randn(1, 1, 8, 32).double()
    rq, rk = rope(q, k, torch.tensor([0]))
    inv_freq = yarn.yarn_inv_freq(32, 1e4, scale, 128).double()
    angles = torch.arange(8).double()[:, None] * inv_freq
    plain = yarn.rotate(q, angles.cos(), angles.sin(), True), yarn.rotate(k, angles.cos(), angles.sin(), True)
    factor = 0.1 * math.log(scale) + 1
    torch.testing.assert_close(rq @ rk.transpose(-1, -2), factor ** 2 * (plain[0] @ plain[1].transpose(-1, -2)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("interleave", [True, False])
def test_yarn_rotation_backward_equals_autograd(interleave):
    """The rotation's hand-written backward (the opposite rotation) against autograd's."""
    rope = yarn.YarnRotaryEmbedding(scale=4.0, original_len=64, interleave=interleave)
    q, k = torch.randn(2, 3, 50, 16, requires_grad=True), torch.randn(2, 3, 50, 16, requires_grad=True)
    gq, gk = torch.randn(2, 3, 50, 16), torch.randn(2, 3, 50, 16)
    offsets = torch.tensor([0, 7])
    rq, rk = rope(q, k, offsets)
    ((rq * gq).sum() + (rk * gk).sum()).backward()
    q2, k2 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    cos, sin = rope.cos_sin(offsets[:, None] + torch.arange(50), 16, 4.0)
    r2q = yarn.rotate(q2, cos[:, None], sin[:, None], interleave)
    r2k = yarn.rotate(k2, cos[:, None], sin[:, None], interleave)
    ((r2q * gq).sum() + (r2k * gk).sum()).backward()
    torch.testing.assert_close(rq, r2q)
    torch.testing.assert_close(q.grad, q2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


def test_yarn_frequencies_stay_float32_under_bf16():
    """The port cast inv_freq to bf16 in training only: here bf16 inputs are rotated in float32."""
    rope = yarn.YarnRotaryEmbedding(scale=4.0, original_len=128)
    q = torch.randn(1, 2, 300, 64)
    got, _ = rope(q.bfloat16(), q.bfloat16(), torch.tensor([2000]))
    ref, _ = rope(q.bfloat16().float(), q.bfloat16().float(), torch.tensor([2000]))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.bfloat16().float(), atol=0, rtol=0)


def test_apply_yarn_scale_1_equals_moshi_model():
    base = tiny_model()
    x = torch.randint(0, 256, (2, 50))
    ref = M.logits(base, x)
    yarn.apply_yarn(base, 1.0, 64)
    torch.testing.assert_close(M.logits(base, x), ref, atol=1e-4, rtol=1e-4)


def test_apply_yarn_widens_context_and_records_settings():
    m = tiny_model(context=3000)
    yarn.apply_yarn(m, 4, 3000, beta_fast=16.0)
    for layer in m.transformer.layers:
        assert layer.self_attn.context == 12000
        assert layer.self_attn.rope is m.transformer.rope
    assert m.yarn_settings["scale"] == 4.0 and m.yarn_settings["original_len"] == 3000
    assert m.yarn_settings["beta_fast"] == 16.0
    m = tiny_model(context=100)
    yarn.apply_yarn(m, 2, 3000, widen_context=False)
    assert all(layer.self_attn.context == 100 for layer in m.transformer.layers)
    with pytest.raises(ValueError, match="scale"):
        yarn.yarn_inv_freq(64, 1e4, 0.5, 100)
    with pytest.raises(ValueError, match="method"):
        yarn.YarnRotaryEmbedding(method="linear")


# ============================================================================================
# TTT
# ============================================================================================

def ttt_naive_f64(Z, V, W, eta, C, decay=1.0, update_clip=0.0, average_after=0, delta=0.0):
    """Per position t: W_t = W + a_t * sum over earlier chunks j of decay^(chunk(t) - 1 - j) U_j, where
    U_j = eta * sum over positions s of chunk j of v_s z_s^T, scaled to Frobenius norm
    update_clip where it is larger (Appendix D.2), and a_t = K / max(chunk(t), K) with
    K = average_after (1 without). With delta rho (decay 1, no average): W_t = W + S_chunk(t),
    S_(j+1) = S_j (I - rho E_j / |E_j|_F) + U_j with E_j = sum over chunk j of z_s z_s^T."""
    Z, V, W = Z.double(), V.double(), W.double()
    B, T, _ = Z.shape
    O = torch.zeros(B, T, W.shape[0], dtype=torch.float64)
    for b in range(B):
        updates, energies = [], []
        for j in range(0, T, C):
            U = sum(eta * torch.outer(V[b, s], Z[b, s]) for s in range(j, min(j + C, T)))
            norm = math.sqrt(float((U * U).sum()))
            updates.append(U * update_clip / norm if update_clip > 0 and norm > update_clip else U)
            energies.append(sum(torch.outer(Z[b, s], Z[b, s]) for s in range(j, min(j + C, T))))
        sums = [torch.zeros_like(W)]  # with delta: S_j, the sum chunk j reads
        for U, E in zip(updates, energies):
            size = math.sqrt(float((E * E).sum()))
            erase = torch.eye(W.shape[1], dtype=torch.float64) - (delta / size * E if size > 0 else 0)
            sums.append(sums[-1] @ erase + U)
        for t in range(T):
            S = torch.zeros_like(W)
            for j in range(t // C):
                S += decay ** (t // C - 1 - j) * updates[j]
            a = average_after / max(t // C, average_after) if average_after else 1.0
            O[b, t] = (W + (sums[t // C] if delta else a * S)) @ Z[b, t]
    return O


DECAYS = st.one_of(st.just(1.0), st.floats(0.3, 1.0))  # the paper's rule, or this project's forgetting
CLIPS = st.one_of(st.just(0.0), st.floats(0.05, 5.0))  # none, or the paper's update clipping at tau
AVERAGES = st.integers(0, 4)  # the sum, or this project's K times the mean past K chunks
DELTAS = st.one_of(st.just(0.0), st.floats(0.05, 1.0))  # none, or this project's erase along the keys


def bounded_alone(decay, average, delta):
    """delta is not combined with decay or average (TTTGating refuses it): delta wins, the others off."""
    return (1.0, 0, delta) if delta else (decay, average, 0.0)


def assert_same_outputs_and_gradients(runs, inputs, dO):
    """Each function of `runs` on copies of `inputs`, backward from dO: outputs and the inputs'
    gradients (zero where none flows) equal the first function's within 1e-9, float64."""
    results = []
    for fn in runs:
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        out.backward(dO)
        results.append([out] + [torch.zeros_like(x) if x.grad is None else x.grad for x in xs])
    for got in results[1:]:
        for ref, value in zip(results[0], got):
            torch.testing.assert_close(value, ref, atol=1e-9, rtol=1e-9)


@FAST
@given(B=st.integers(1, 2), T=st.integers(1, 24), C=st.integers(1, 30), h=st.integers(1, 6),
       d=st.integers(1, 5), eta=st.floats(0.0, 2.0), decay=DECAYS, clip=CLIPS, average=AVERAGES, delta=DELTAS)
def test_ttt_chunked_equals_naive_loop(B, T, C, h, d, eta, decay, clip, average, delta):
    decay, average, delta = bounded_alone(decay, average, delta)
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + C)
    Z, V, W = torch.randn(B, T, h, generator=g), torch.randn(B, T, d, generator=g), torch.randn(d, h, generator=g)
    got = ttt.ttt_chunked(Z.double(), V.double(), W.double(), eta, C, decay, clip, average, delta)
    torch.testing.assert_close(got, ttt_naive_f64(Z, V, W, eta, C, decay, clip, average, delta))


@FAST
@given(B=st.integers(1, 2), T=st.integers(1, 40), C=st.integers(1, 12), h=st.integers(1, 8), d=st.integers(1, 6),
       eta=st.floats(0.01, 1.0), delta=st.floats(0.05, 1.0), clip=CLIPS, group=st.one_of(st.none(), st.integers(1, 60)))
def test_delta_scan_gives_the_reference_and_its_gradients(B, T, C, h, d, eta, delta, clip, group):
    """What TTTGating runs for the delta rule (ttt_delta_scan, plus the base product apart, the
    clipping as scaled targets) gives ttt_chunked's output and gradients, in float64, with any
    group of tokens per step (the dual form within a group)."""
    g = torch.Generator().manual_seed(T * 100 + C * 7 + d)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, h), (B, T, d), (d, h))]
    dO = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    scaled = lambda V, Z: V * ttt.clip_factors(Z, V, eta, C, clip) if clip else V
    runs = (lambda Z, V, W: ttt.ttt_chunked(Z, V, W, eta, C, update_clip=clip, delta=delta),
            lambda Z, V, W: Z @ W.T + ttt.ttt_delta_scan(Z, scaled(V, Z), eta, C, delta, group))
    assert_same_outputs_and_gradients(runs, inputs, dO)


@FAST
@given(T=st.integers(2, 12), C=st.integers(1, 8), h=st.integers(1, 64), d=st.integers(1, 6),
       delta=st.floats(0.05, 1.0), scales=st.lists(st.floats(-15, 3), min_size=12, max_size=12),
       shift=st.floats(-10, 10), seed=st.integers(0, 2 ** 16), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_delta_rules_erase_never_amplifies(T, C, h, d, delta, scales, shift, seed, dtype):
    """With targets in the first chunk only, every later chunk i reads Z_i S_i^T with |S_i| <= |S_1|
    (the erase's eigenvalues lie in [1 - rho, 1]): |P_i|_F <= |Z_i|_F |S_1|_F for any keys, however
    large, small (each chunk scaled by 10^-15 .. 10^3: in float32 |Z^T Z|_F^2 underflows there) or
    shifted (a shared direction, as text gives)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(1, T * C, h, generator=g, dtype=torch.float64) + shift
    for i in range(T):
        Z[:, i * C:(i + 1) * C] *= 10.0 ** scales[i]
    V = torch.zeros(1, T * C, d, dtype=torch.float64)
    V[:, :C] = torch.randn(1, C, d, generator=g, dtype=torch.float64)
    P = ttt.ttt_delta_scan(Z.to(dtype), V.to(dtype), 0.5, C, delta).double()
    S_1 = (0.5 * V[0, :C].T @ Z[0, :C]).norm()
    for i in range(1, T):
        assert P[0, i * C:(i + 1) * C].norm() <= Z[0, i * C:(i + 1) * C].norm() * S_1 * (1 + 1e-4), i


def test_a_chunk_of_zero_keys_erases_nothing_and_keeps_gradients_finite():
    """A TTT layer's input of zeros for a whole chunk (its keys Z = 0): the erase is skipped there,
    outputs equal the reference loop's, and every gradient is finite (a norm's square root at 0,
    or a division by a clamped norm, would give NaN)."""
    torch.manual_seed(0)
    g = ttt.TTTGating(5, 6, torch.nn.functional.silu, 4, 0.5, 3, delta=1.0).double()
    with torch.no_grad():
        g.conv.weight.normal_()
        g.W_target.normal_()
    x = torch.randn(2, 14, 5, dtype=torch.float64)
    x[:, 4:8] = 0
    g(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in g.parameters())
    Z = torch.randn(2, 14, 6, dtype=torch.float64)
    Z[:, 4:8] = 0
    V, W = torch.randn(2, 14, 5, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    Zs, Vs = Z.clone().requires_grad_(), V.clone().requires_grad_()
    out = Zs @ W.T + ttt.ttt_delta_scan(Zs, Vs, 0.5, 4, 1.0)
    torch.testing.assert_close(out, ttt_naive_f64(Z, V, W, 0.5, 4, delta=1.0))
    out.sum().backward()
    assert torch.isfinite(Zs.grad).all() and torch.isfinite(Vs.grad).all()


@FAST
@given(seed=st.integers(0, 2 ** 16), shift=st.floats(0, 3), groups=st.sampled_from([4, 16]))
def test_the_erases_groups_cost_no_precision_in_bf16(seed, shift, groups):
    """In bf16 (keys with a shared direction of weight `shift`, as text gives) the erase's scan in
    groups of several chunks is as close to float64 as chunk by chunk: its relative error at most
    1.25x (within a group the work is float32; only S's reads and the group's write are rounded)."""
    g = torch.Generator().manual_seed(seed)
    Z = (torch.randn(2, 256, 32, generator=g) + shift * torch.randn(32, generator=g)).bfloat16()
    V = torch.randn(2, 256, 16, generator=g).bfloat16()
    exact = ttt_naive_f64(Z.double(), V.double(), torch.zeros(16, 32, dtype=torch.float64), 0.3, 16, delta=1.0)
    error = lambda group: ((ttt.ttt_delta_scan(Z, V, 0.3, 16, 1.0, group).double() - exact).norm() / exact.norm())
    assert error(groups * 16) <= 1.25 * error(16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_erases_scan_under_bf16_autocast_keeps_its_float32_work(dtype):
    """Under bf16 autocast (as train.py runs), keys and targets of any dtype: the erase's scan runs
    (fp16 tensors meeting autocast's casts raised in torch.cat) and stays within its inputs'
    rounding of float64, its work within groups in float32, not autocast's bf16."""
    g = torch.Generator().manual_seed(0)
    Z, V = (torch.randn(2, 40, n, generator=g).to(dtype) for n in (6, 3))
    exact = ttt.ttt_delta_scan(Z.double(), V.double(), 0.3, 8, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ttt.ttt_delta_scan(Z, V, 0.3, 8, 1.0, 40).double()
    assert (got - exact).norm() <= {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[dtype] * exact.norm()


@FAST
@given(scale=st.floats(-90, 0), dtype=st.sampled_from([torch.float32, torch.float64]), group=st.sampled_from([4, 12]))
def test_nearly_vanishing_keys_keep_the_erases_gradients_finite(scale, dtype, group):
    """A chunk of keys scaled by 10^scale, from ordinary down to zero in float32 (|Z^T Z|_F^2 passes
    the smallest normal float, and the window above it where rsqrt's gradient overflowed): the
    erase's output and gradients are finite and equal ttt_chunked's in the same dtype."""
    g = torch.Generator().manual_seed(0)
    Z, V, W = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, 16, 6), (2, 16, 3), (3, 6)))
    Z[:, 4:8] *= 10.0 ** scale
    inputs = [t.to(dtype) for t in (Z, V, W)]
    runs = (lambda Z, V, W: ttt.ttt_chunked(Z, V, W, 0.5, 4, delta=1.0),
            lambda Z, V, W: Z @ W.T + ttt.ttt_delta_scan(Z, V, 0.5, 4, 1.0, group))
    results = []
    for fn in runs:
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs)
        out.square().sum().backward()
        results.append([out] + [x.grad for x in xs[:2]])
    for ref, got in zip(*results):
        assert torch.isfinite(got).all() and torch.isfinite(ref).all()
        torch.testing.assert_close(got, ref, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-5)


@FAST
@given(B=st.integers(1, 2), T=st.integers(1, 40), C=st.integers(1, 12), h=st.integers(1, 8), d=st.integers(1, 6),
       eta=st.floats(0.01, 1.0), group=st.integers(1, 40), decay=DECAYS, clip=st.floats(0.05, 5.0))
def test_clipped_updates_as_scaled_targets_give_the_reference_and_its_gradients(B, T, C, h, d, eta, group, decay,
                                                                                 clip):
    """What TTTGating runs for the paper's clipping (the scan on V scaled by clip_factors, the norm
    from Gram matrices) gives ttt_chunked's clipped output and gradients (each update clipped as a
    matrix there), in float64."""
    g = torch.Generator().manual_seed(T * 100 + C * 7 + d)
    inputs = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((B, T, h), (B, T, d), (d, h))]
    dO = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    scaled = lambda Z, V, W: ttt.ttt_scan(Z, V * ttt.clip_factors(Z, V, eta, C, clip), W, eta, C, group, decay)
    assert_same_outputs_and_gradients((lambda Z, V, W: ttt.ttt_chunked(Z, V, W, eta, C, decay, clip), scaled),
                                      inputs, dO)


def test_clip_factors_have_finite_gradients_where_nothing_is_clipped_or_the_update_is_zero():
    """V = 0 (TTTGating's conv starts at zero) and updates under tau: factor 1, gradient exactly 0;
    gradcheck where some chunks clip and others do not."""
    Z = torch.randn(2, 12, 5, dtype=torch.float64, requires_grad=True)
    V = torch.zeros(2, 12, 3, dtype=torch.float64, requires_grad=True)
    f = ttt.clip_factors(Z, V, 0.5, 4, 0.1)
    f.sum().backward()
    assert torch.equal(f, torch.ones_like(f)) and torch.equal(V.grad, torch.zeros_like(V))
    W = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)  # the reference loop too
    ttt.ttt_chunked(Z, V, W, 0.5, 4, update_clip=0.3).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (Z, V, W))
    V = torch.randn(2, 12, 3, dtype=torch.float64)
    V[:, 4:8] *= 1e-3  # the middle chunk stays under tau
    V.requires_grad_()
    assert (ttt.clip_factors(Z, V, 0.5, 4, 0.5) == 1).any() and (ttt.clip_factors(Z, V, 0.5, 4, 0.5) < 1).any()
    assert torch.autograd.gradcheck(lambda Z, V: ttt.clip_factors(Z, V, 0.5, 4, 0.5), [Z, V])


@FAST
@given(B=st.integers(1, 3), T=st.integers(1, 50), C=st.integers(1, 20), h=st.integers(1, 9),
       d=st.integers(1, 7), eta=st.floats(0.0, 1.0), group=st.integers(1, 60), decay=DECAYS)
def test_ttt_scan_equals_reference_with_gradients(B, T, C, h, d, eta, group, decay):
    """Any group size (one chunk: the plain scan; several: the within-group dual form; ragged
    last chunk and group), with or without decay, gives ttt_chunked's output and gradients."""
    g = torch.Generator().manual_seed(T * 100 + C)
    inputs = [torch.randn(B, T, h, generator=g), torch.randn(B, T, d, generator=g), torch.randn(d, h, generator=g)]
    dO = torch.randn(B, T, d, generator=g)
    results = []
    for fn in (functools.partial(ttt.ttt_chunked, decay=decay), functools.partial(ttt.ttt_scan, group=group, decay=decay)):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = fn(*xs, eta, C)
        out.backward(dO)
        results.append([out] + [torch.zeros_like(x) if x.grad is None else x.grad for x in xs])
    for ref, got in zip(*results):
        scale = ref.abs().max().item() + 1e-6
        torch.testing.assert_close(got / scale, ref / scale, atol=1e-5, rtol=0)


def test_ttt_scan_gradients_in_float64():
    inputs = [torch.randn(2, 13, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(2, 13, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 4, dtype=torch.float64, requires_grad=True)]
    for group in (4, 8, 12):  # the plain scan; groups of 2 and 3 chunks, the last one ragged
        for decay in (1.0, 0.6):
            assert torch.autograd.gradcheck(lambda Z, V, W: ttt.ttt_scan(Z, V, W, 0.7, 4, group, decay), inputs)
    Z, V = inputs[0].detach(), inputs[1].detach()
    fast_only = ttt.ttt_scan(Z, V, None, 0.7, 4, 8)
    torch.testing.assert_close(fast_only, ttt.ttt_chunked(Z, V, torch.zeros_like(inputs[2]), 0.7, 4))
    assert torch.autograd.gradcheck(lambda Z, V: ttt.ttt_scan(Z, V, None, 0.7, 4, 8), inputs[:2])


@FAST
@given(T=st.integers(2, 40), C=st.integers(1, 16))
def test_ttt_last_chunk_update_never_used(T, C):
    Z, V, W = torch.randn(2, T, 4), torch.randn(2, T, 3), torch.randn(3, 4)
    last = ((T - 1) // C) * C
    V2 = V.clone()
    V2[:, last:] = torch.randn_like(V2[:, last:]) * 100
    torch.testing.assert_close(ttt.ttt_chunked(Z, V, W, 0.7, C), ttt.ttt_chunked(Z, V2, W, 0.7, C))


@FAST
@given(T=st.integers(1, 30), C=st.integers(1, 12), k=st.sampled_from([1, 3, 5]))
def test_conv_stays_within_chunks(T, C, k):
    conv = torch.nn.Conv1d(3, 3, k, padding=k // 2, groups=3, bias=False)
    x = torch.randn(2, T, 3)
    got = ttt.conv_within_chunks(x, conv, C)
    ref = torch.zeros_like(x)
    w = conv.weight.detach()[:, 0]  # [3, k]
    for t in range(T):
        chunk_start = (t // C) * C
        chunk_end = min(chunk_start + C, T)
        for j in range(k):
            s = t + j - k // 2
            if chunk_start <= s < chunk_end:
                ref[:, t] += w[:, j] * x[:, s]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def official_mlp_forward(x, t, sd, eta, chunk):
    """The official In-Place TTT MLP forward (ByteDance-Seed/In-Place-TTT, hf_qwen3 `Qwen3MLP`),
    transcribed: pad to whole chunks, conv each chunk, one update per chunk from the targets
    `conv @ ttt_proj.weight` (einsum "b t c h, b t c d, d e -> b t e h"), the down projection
    followed by the updates of the chunks before, an inclusive cumsum, then read per chunk."""
    F_ = torch.nn.functional
    B, T, d = x.shape
    h = F_.silu(x @ sd["gate_proj.weight"].T) * (x @ sd["up_proj.weight"].T)
    n, pad = -(-T // chunk), -T % chunk
    tc = F_.pad(t, (0, 0, 0, pad)).view(B, n, chunk, d)
    hc = F_.pad(h, (0, 0, 0, pad)).view(B, n, chunk, -1)
    conv = F_.conv1d(tc.transpose(-1, -2).reshape(B * n, d, chunk), sd["ttt_conv.weight"], padding=2, groups=d)
    conv = conv.transpose(-1, -2).reshape(B, n, chunk, d)
    if "ttt_proj.weight" in sd:
        dW = torch.einsum("btch,btcd,de->bteh", hc[:, :-1], conv[:, :-1], sd["ttt_proj.weight"])
    else:
        dW = torch.einsum("btch,btcd->btdh", hc[:, :-1], conv[:, :-1])
    W = torch.cat([sd["down_proj.weight"].expand(B, 1, *sd["down_proj.weight"].shape), dW * eta], dim=1).cumsum(1)
    return torch.einsum("btdh,btch->btcd", W, hc).reshape(B, n * chunk, d)[:, :T]


@pytest.mark.parametrize("proj", [True, False])
def test_official_mlp_loads_and_matches_the_official_forward(proj):
    """An official-format state dict with a non-symmetric ttt_proj, loaded by load_official_mlp,
    gives the official forward, in float64, parallel and streaming."""
    torch.manual_seed(0)
    d, h, C, eta = 6, 10, 4, 0.7
    sd = {"gate_proj.weight": torch.randn(h, d), "up_proj.weight": torch.randn(h, d),
          "down_proj.weight": torch.randn(d, h), "ttt_conv.weight": torch.randn(d, 1, 5)}
    if proj:
        sd["ttt_proj.weight"] = torch.randn(d, d)
    sd = {k: v.double() for k, v in sd.items()}
    g = ttt.TTTGating(d, h, torch.nn.functional.silu, C, eta, target=proj).double()
    ttt.load_official_mlp(g, sd)
    x = torch.randn(2, 13, d, dtype=torch.float64)
    ref = official_mlp_forward(x, x, sd, eta, C)
    torch.testing.assert_close(g(x), ref, atol=1e-10, rtol=1e-10)
    with torch.no_grad(), g.streaming(2):
        torch.testing.assert_close(torch.cat([g(x[:, t:t + 1]) for t in range(13)], 1), ref, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="missing"):
        ttt.load_official_mlp(g, {k: v for k, v in sd.items() if k != "ttt_conv.weight"})


def test_earlier_checkpoints_target_is_refused():
    """Before W_target took the official orientation, `target` was an nn.Linear: such a state dict is
    refused in one line, not loaded."""
    g = ttt.TTTGating(6, 10, torch.nn.functional.silu, 4, 0.7)
    state = {k: v for k, v in g.state_dict().items() if k != "W_target"}
    state["target.weight"] = torch.randn(6, 6)
    with pytest.raises(ValueError, match="earlier version"):
        g.load_state_dict(state)


@FAST
@given(B=st.integers(1, 2), T=st.integers(1, 30), C=st.integers(1, 12), h=st.integers(1, 6), d=st.integers(1, 5),
       eta=st.floats(0.0, 2.0))
def test_official_prefix_sum_equals_the_chunk_loop(B, T, C, h, d, eta):
    """The official parallel form (a weight per chunk from an exclusive cumsum) is Eq. (1)'s loop."""
    g = torch.Generator().manual_seed(T * 31 + C)
    Z, V, W = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, h), (B, T, d), (d, h)))
    torch.testing.assert_close(ttt.ttt_prefix_sum(Z, V, W, eta, C), ttt_naive_f64(Z, V, W, eta, C))


def test_ttt_at_init_equals_base_model():
    base = tiny_model()
    x = torch.randint(0, 256, (2, 70))
    ref = M.logits(base, x)
    ttt.apply_ttt(base, [0, 2], chunk_size=16, eta=1.0)
    assert isinstance(base.transformer.layers[0].gating, ttt.TTTGating)
    torch.testing.assert_close(M.logits(base, x), ref, atol=1e-5, rtol=1e-5)
    # same checkpoint keys for the base weights
    keys = set(base.state_dict())
    assert "transformer.layers.0.gating.linear_out.weight" in keys
    assert "transformer.layers.0.gating.linear_in.weight" in keys


@pytest.mark.parametrize("target_source", ["hidden", "embeddings"])
def test_full_model_causality_with_ttt_and_yarn(target_source):
    m = tiny_model(context=256)
    yarn.apply_yarn(m, 4.0, 32)
    ttt.apply_ttt(m, [1, 3], chunk_size=8, eta=0.5, target_source=target_source)
    randomise_ttt(m)
    x = torch.randint(0, 256, (1, 48))
    ref = M.logits(m, x)
    for t in [0, 7, 8, 20, 46]:
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, 256, (1, 47 - t))
        out = M.logits(m, y)
        torch.testing.assert_close(out[:, :t + 1], ref[:, :t + 1], atol=1e-5, rtol=1e-5)
    # a copy of the model computes the same (the embeddings hook feeds the copy's own layers)
    with torch.no_grad():  # (deepcopy refuses tensors with a graph, as the kept embeddings would be)
        M.logits(m, x)
        m2, other = copy.deepcopy(m), torch.randint(0, 256, (1, 48))
        torch.testing.assert_close(M.logits(m2, other), M.logits(m, other), atol=0, rtol=0)
    # and the fast weights do act: changing an early chunk changes a later one
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 256
    assert (M.logits(m, y)[:, 30:] - ref[:, 30:]).abs().max() > 1e-4


@pytest.mark.parametrize("target_source,modulo,steps", [("hidden", False, [1]), ("embeddings", True, [3, 1, 7]),
                                                         ("hidden", True, [5, 11])])
def test_streaming_equals_parallel_with_yarn_and_ttt(target_source, modulo, steps):
    """Step-by-step streaming logits equal the parallel forward's, over several chunks, with
    positions past the original length (YaRN) and steps that straddle chunk boundaries."""
    m = tiny_model(context=64)
    yarn.apply_yarn(m, 4.0, 32)  # context widened to 128: the KV cache holds the whole sequence
    ttt.apply_ttt(m, [1, 3], chunk_size=8, eta=0.5, target_source=target_source)
    randomise_ttt(m)
    if modulo:
        for g in freeze.ttt_modules(m):
            g.z_transform = lambda Z, positions: rope_modulo.rotate_modulo(Z, positions, 8)
    x = torch.randint(0, 256, (2, 90))
    ref = M.logits(m, x)
    outs, t, i = [], 0, 0
    with torch.no_grad(), m.streaming(2):
        while t < x.shape[1]:
            n = steps[i % len(steps)]
            outs.append(M.logits(m, x[:, t:t + n]))
            t, i = t + n, i + 1
    torch.testing.assert_close(torch.cat(outs, dim=1), ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), m.streaming(2):  # the state starts fresh each time streaming starts
        torch.testing.assert_close(M.logits(m, x[:, :20]), ref[:, :20], atol=1e-4, rtol=1e-4)
        m.reset_streaming()
        torch.testing.assert_close(M.logits(m, x[:, :20]), ref[:, :20], atol=1e-4, rtol=1e-4)


def streaming_model(window=24, chunk=8, seed=0, kernel=5, delta=0.0):
    """YaRN x4 (fixed), a window shorter than the test sequences, TTT on two layers with
    embedding targets and modulo RoPE: everything a Moshi deployment streams."""
    m = tiny_model(seed, context=window)
    yarn.apply_yarn(m, 4.0, 16, widen_context=False)
    ttt.apply_ttt(m, [1, 3], chunk_size=chunk, eta=0.5, kernel_size=kernel, target_source="embeddings", delta=delta)
    randomise_ttt(m, seed)
    rope_modulo.apply_rope_modulo(m, chunk)
    return m


@FAST
@given(B=st.integers(1, 3), T=st.integers(20, 60), window=st.integers(8, 32), chunk=st.integers(1, 12),
       kernel=st.sampled_from([1, 3, 5, 7]), seed=st.integers(0, 2 ** 16))
def test_one_token_streaming_equals_parallel_with_a_window(B, T, window, chunk, kernel, seed):
    """moshi's LMGen path: one token per step, a window shorter than the sequence (the ring KV
    cache wraps), several chunk boundaries, batch > 1, against the parallel forward."""
    chunk = min(chunk, window)
    m = streaming_model(window, chunk, seed, kernel)
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))
    ref = M.logits(m, x)
    with torch.no_grad(), m.streaming(B):
        out = torch.cat([M.logits(m, x[:, t:t + 1]) for t in range(T)], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def random_gating_f64(seed, d, h, C, kernel, decay, clip, average, delta=0.0):
    """A float64 TTTGating (eta 0.7) with a random conv and W_target, so the fast weight moves."""
    torch.manual_seed(seed)
    g = ttt.TTTGating(d, h, torch.nn.functional.silu, C, 0.7, kernel, decay=decay, update_clip=clip,
                      average_after=average, delta=delta).double()
    with torch.no_grad():
        g.conv.weight.normal_()
        g.W_target.normal_()
    return g


@FAST
@given(B=st.integers(1, 3), T=st.integers(1, 40), C=st.integers(1, 9), d=st.integers(1, 12),
       h=st.integers(1, 12), kernel=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2 ** 16), decay=DECAYS,
       clip=CLIPS, average=AVERAGES, delta=DELTAS)
def test_ttt_streaming_step_equals_the_reference_in_float64(B, T, C, d, h, kernel, seed, decay, clip, average, delta):
    """One TTTGating, its parallel form and fed token by token, against ttt_chunked (the paper's
    loop) on the same Z and targets, float64: every slot, every fold slice (R = ceil(d / C) rows,
    C > d included), with or without decay, the update clipping, the average past K chunks, the
    delta rule's erase."""
    decay, average, delta = bounded_alone(decay, average, delta)
    g = random_gating_f64(seed, d, h, C, kernel, decay, clip, average, delta)
    x = torch.randn(B, T, d, dtype=torch.float64)
    gate, up = torch.nn.functional.linear(x, g.linear_in.weight).view(B, T, 2, h).unbind(2)
    Z = torch.nn.functional.silu(gate) * up
    V = ttt.conv_within_chunks(x, g.conv, C) @ g.W_target
    ref = ttt.ttt_chunked(Z, V, g.linear_out.weight, 0.7, C, decay, clip, average, delta)
    with torch.no_grad():
        torch.testing.assert_close(g(x), ref, atol=1e-10, rtol=1e-10)  # the parallel form
    with torch.no_grad(), g.streaming(B):
        out = torch.cat([g(x[:, t:t + 1]) for t in range(T)], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@FAST
@given(B=st.integers(1, 2), P=st.integers(2, 30), more=st.integers(0, 12), C=st.integers(1, 8), d=st.integers(1, 10),
       h=st.integers(1, 8), kernel=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2 ** 16), decay=DECAYS,
       clip=CLIPS, average=AVERAGES, delta=DELTAS)
def test_prefill_hands_over_the_state_of_one_token_per_step(B, P, more, C, d, h, kernel, seed, decay, clip, average,
                                                            delta):
    """A prompt of P tokens in one streaming call from a fresh state (streaming_prefill), then more
    tokens one per step, against every token one per step and against the parallel form, float64:
    the same outputs, and after the prompt the same state wherever a later step reads it."""
    decay, average, delta = bounded_alone(decay, average, delta)
    g = random_gating_f64(seed, d, h, C, kernel, decay, clip, average, delta)
    x = torch.randn(B, P + more, d, dtype=torch.float64)
    states = {}
    outs = {}
    for way in ("prefill", "steps"):
        with torch.no_grad(), g.streaming(B):
            first = g(x[:, :P]) if way == "prefill" else torch.cat([g(x[:, t:t + 1]) for t in range(P)], 1)
            st_ = g._streaming_state
            states[way] = {name: getattr(st_, name).clone() for name in ("offset", "Z_prev", "V_prev", "S", "S_read")}
            slot = P % C or C  # rows of the chunk being filled that later steps read
            half = kernel // 2
            states[way]["Z"] = st_.Z[:, :slot].clone()
            states[way]["source"] = st_.source.clone()  # the last 2 half + 1 inputs
            states[way]["V"] = st_.V[:, half:half + slot].clone()
            states[way]["square"] = st_.square.clone()  # with delta: |Z^T Z|_F^2 of the chunk so far
            states[way]["square_prev"] = st_.square_prev.clone()
            # after the prompt the stream is not fresh: a multi-token call goes token by token
            rest = [g(x[:, P:])] if way == "prefill" and more else [g(x[:, t:t + 1]) for t in range(P, P + more)]
            outs[way] = torch.cat([first] + rest, dim=1)
    with torch.no_grad():
        parallel = g(x)
    torch.testing.assert_close(outs["prefill"], parallel, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(outs["steps"], parallel, atol=1e-10, rtol=1e-10)
    for name in states["steps"]:
        torch.testing.assert_close(states["prefill"][name], states["steps"][name], atol=1e-10, rtol=1e-10, msg=name)


@pytest.mark.parametrize("seed,delta", [(0, 0.0), (1, 0.0), (0, 1.0), (1, 1.0)])
def test_compact_state_stays_within_bf16s_own_error(seed, delta):
    """compact_state keeps the sum of updates in bf16 (one copy, rounded at every fold). Over 20
    chunks of a bf16 TTTGating, its streamed outputs are no further from the float64 parallel form
    (the norm of the difference) than 1.25x the larger of the exact state's bf16 streaming and the bf16
    parallel form (at most 1.1x seen over 12 seeds; the largest single difference is a few bf16
    steps of the outputs, too coarse to compare); in float64 it changes nothing (the sum already
    has the model's dtype). With and without the erase; by default a stream is compact with the
    erase and exact without it."""
    torch.manual_seed(seed)
    d, h, C, T, B = 16, 24, 8, 160, 2
    g = ttt.TTTGating(d, h, torch.nn.functional.silu, C, 0.5, 3, delta=delta).double()
    with torch.no_grad():
        g.conv.weight.normal_(std=0.5)
        g.W_target.normal_(std=0.5)
    x = torch.randn(B, T, d, dtype=torch.float64)
    off = {}
    with torch.no_grad():
        reference = g(x)
        for name, dtype, compact in (("exact", torch.bfloat16, False), ("compact", torch.bfloat16, True),
                                     ("float64 compact", torch.float64, True), ("default", torch.bfloat16, None)):
            m = copy.deepcopy(g).to(dtype)
            m.compact_state = compact
            with m.streaming(B):
                out = torch.cat([m(x[:, t:t + 1].to(dtype)) for t in range(T)], 1).double()
            off[name] = ((out - reference).norm() / reference.norm()).item()
            compact = bool(delta) if compact is None else compact
            assert (m._init_streaming_state(1).S.dtype == dtype) == (compact or dtype == torch.float64)
        off["parallel"] = ((g.to(torch.bfloat16)(x.bfloat16()).double() - reference).norm() / reference.norm()).item()
    assert off["float64 compact"] < 1e-12
    assert off["compact"] <= 1.25 * max(off["exact"], off["parallel"]), off


def test_streaming_with_lora_equals_parallel():
    """moshi's LoRA on the fast weight's base (linear_out): streaming reads it through the module."""
    m = streaming_model(window=16, chunk=4)
    freeze.apply_lora(m, 4, 2.0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert any("linear_out.lora_B" in name for name, _ in m.named_parameters())
    x = torch.randint(0, 256, (2, 40))
    ref = M.logits(m, x)
    with torch.no_grad(), m.streaming(2):
        out = torch.cat([M.logits(m, x[:, t:t + 1]) for t in range(40)], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_streaming_honours_exec_mask_and_per_sequence_reset(delta):
    """moshi's exec_mask: a sequence whose mask is False is left as if the step never happened;
    reset_streaming(mask): only the masked sequences start again. With the paper's sum and with
    the erase (train.py's default)."""
    m = streaming_model(window=16, chunk=4, delta=delta)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 256, (2, 40), generator=g), torch.randint(0, 256, (1, 30), generator=g)
    ref_x, ref_y = M.logits(m, x), M.logits(m, y)
    paused = {3, 4, 9, 10, 11, 17}  # steps at which sequence 1 does not run (it gets noise)
    got0, got1, t1 = [], [], 0
    with torch.no_grad(), m.streaming(2):
        for t in range(40):
            run = t not in paused
            m.set_exec_mask(torch.tensor([True, run]))
            step = torch.stack([x[0, t], x[1, t1] if run else torch.randint(0, 256, (), generator=g)])
            out = M.logits(m, step[:, None])
            got0.append(out[0, 0])
            if run:
                got1.append(out[1, 0])
                t1 += 1
        m.set_exec_mask(torch.tensor([True, True]))
        m.reset_streaming(torch.tensor([False, True]))  # sequence 1 starts a new document
        for t in range(30):
            out = M.logits(m, torch.stack([x[0, 0], y[0, t]])[:, None])  # sequence 0 gets anything
            torch.testing.assert_close(out[1, 0], ref_y[0, t], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(got0), ref_x[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(got1), ref_x[1, :t1], atol=1e-4, rtol=1e-4)


class _DispatchTrace(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten call with its non-tensor arguments and its tensors' shapes and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        describe = lambda a: (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a
        self.calls.append((str(func), torch.utils._pytree.tree_map(describe, (args, kwargs or {}))))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_streaming_step_keeps_no_state_on_the_host(delta):
    """What a CUDA graph needs, checked on a CPU: after the first step (LMGen's warm-up), every
    step runs the same aten calls with the same arguments whatever its position (chunk
    boundaries and a wrapping KV cache included), never reads a device value on the host, and
    the TTT state changes only inside its tensors. A Python-side counter or a branch at a chunk
    boundary (what froze under CUDA graphs) fails this. With and without the delta rule's erase."""
    m = streaming_model(window=12, chunk=4)
    for g in freeze.ttt_modules(m):
        g.delta = delta
    x = torch.randint(0, 256, (2, 30))
    states = lambda: [g._streaming_state for g in freeze.ttt_modules(m)]
    with torch.no_grad(), m.streaming(2):
        M.logits(m, x[:, :1])
        host = [{k: v for k, v in vars(s).items() if not isinstance(v, torch.Tensor)} for s in states()]
        pointers = [{k: v.data_ptr() for k, v in vars(s).items() if isinstance(v, torch.Tensor)} for s in states()]
        traces = []
        for t in range(1, 30):
            step = x[:, None, t:t + 1].clone()
            with _DispatchTrace() as trace:
                m.forward_text(step)
            traces.append(trace.calls)
        assert [{k: v for k, v in vars(s).items() if not isinstance(v, torch.Tensor)} for s in states()] == host
        assert [{k: v.data_ptr() for k, v in vars(s).items() if isinstance(v, torch.Tensor)} for s in states()] == pointers
    assert not any("_local_scalar_dense" in name for name, _ in traces[0]), "a device value read on the host"
    for t, calls in enumerate(traces[1:], start=2):
        assert calls == traces[0], f"step {t} runs other calls than step 1"


def test_dynamic_yarn_refuses_to_stream():
    m = tiny_model(context=64)
    yarn.apply_yarn(m, 2.0, 32, dynamic=True)
    x = torch.randint(0, 256, (1, 40))
    M.logits(m, x)  # the parallel form is fine
    with torch.no_grad(), m.streaming(1), pytest.raises(RuntimeError, match="dynamic YaRN cannot stream"):
        M.logits(m, x[:, :1])
    yarn.apply_yarn(m, 2.0, 32)  # a fixed scale streams, and equals the parallel form
    ref = M.logits(m, x)
    with torch.no_grad(), m.streaming(1):
        out = torch.cat([M.logits(m, x[:, t:t + 1]) for t in range(40)], dim=1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_ttt_chunk_longer_than_the_window_is_refused():
    m = tiny_model(context=16)
    with pytest.raises(ValueError, match="longer than the attention window 16"):
        ttt.apply_ttt(m, [1], chunk_size=32, eta=0.5)
    ttt.apply_ttt(m, [1], chunk_size=16, eta=0.5)


def test_ttt_every_parameter_gets_gradient_by_second_step():
    """From the official init (zero conv, diagonal W_target): the port's all-zero init gave
    exactly zero gradient forever."""
    m = tiny_model()
    ttt.apply_ttt(m, [0, 2], chunk_size=8, eta=0.5)
    freeze.apply_freeze(m, "ttt_only")
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    nonzero = {n: False for n in params}
    x = torch.randint(0, 256, (2, 41))
    for _ in range(2):
        out = M.logits(m, x[:, :-1])
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()
        for n, p in params.items():
            nonzero[n] |= bool(p.grad is not None and p.grad.abs().max() > 0)
        opt.step()
        opt.zero_grad()
    assert all(nonzero.values()), nonzero


def test_ttt_z_transform_identity_equals_plain_path():
    m = tiny_model()
    ttt.apply_ttt(m, [0, 2], chunk_size=8, eta=0.5)
    randomise_ttt(m)
    x = torch.randint(0, 256, (2, 40))
    ref = M.logits(m, x)
    for g in freeze.ttt_modules(m):
        g.z_transform = lambda Z, positions: Z
    torch.testing.assert_close(M.logits(m, x), ref, atol=1e-5, rtol=1e-5)


def test_ttt_small_updates_survive_bf16():
    """Under bf16 the fast weight's updates, tiny next to Wd_0, must still act: ttt_scan keeps
    their sum apart from Wd_0 and accumulates it in float32 (cast to bf16 together with Wd_0,
    updates below 2^-8 of it would round away)."""
    Z, V = torch.randn(2, 512, 16), torch.randn(2, 512, 12)
    ref = ttt.ttt_chunked(Z.double(), V.double(), torch.zeros(12, 16, dtype=torch.float64), 1e-3, 8)
    for group in (8, 64):
        got = ttt.ttt_scan(Z.bfloat16(), V.bfloat16(), None, 1e-3, 8, group)
        assert got.dtype == torch.bfloat16
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2
    m = tiny_model()
    ttt.apply_ttt(m, [0], chunk_size=8, eta=0.5)
    randomise_ttt(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = M.logits(m, torch.randint(0, 256, (1, 40)))
    assert torch.isfinite(out).all()


def test_apply_ttt_rejects_bad_layers():
    m = tiny_model()
    for layers in ([4], [-1], []):
        with pytest.raises(ValueError, match="layers"):
            ttt.apply_ttt(m, layers, 8, 0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        ttt.apply_ttt(m, [0], 0, 0.1)
    assert ttt.default_layers(32) == [0, 6, 12, 18, 24, 30]
    assert ttt.default_layers(4) == [0, 2]


# ============================================================================================
# Modulo RoPE
# ============================================================================================

@FAST
@given(period=st.integers(1, 64), k=st.integers(0, 50), T=st.integers(1, 20), interleave=st.booleans())
def test_modulo_rope_invariant_to_period_shifts(period, k, T, interleave):
    x = torch.randn(2, T, 8)
    positions = torch.arange(T) + 3
    a = rope_modulo.rotate_modulo(x, positions, period, interleave=interleave)
    b = rope_modulo.rotate_modulo(x, positions + k * period, period, interleave=interleave)
    torch.testing.assert_close(a, b)


@FAST
@given(B=st.integers(1, 2), T=st.integers(1, 30), offset=st.integers(0, 30), interleave=st.booleans(),
       heads_first=st.booleans())
def test_modulo_rope_equals_moshi_rope_below_period(B, T, offset, interleave, heads_first):
    period = offset + T + 5  # every position stays below the period
    shape = (B, T, 2, 8) if heads_first else (B, 2, T, 8)
    q, k = torch.randn(shape), torch.randn(shape)
    offsets = torch.full((B,), offset)
    got = rope_modulo.ModuloRotaryEmbedding(period, interleave=interleave)(q, k, offsets, heads_first)
    ref = apply_rope(q, k, offsets, 10_000, interleave=interleave, time_before_heads=heads_first)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_modulo_rope_wraps():
    x = torch.randn(1, 10, 8)
    torch.testing.assert_close(rope_modulo.rotate_modulo(x, torch.arange(10), 4),
                               rope_modulo.rotate(x, torch.arange(10) % 4))
    with pytest.raises(ValueError, match="period"):
        rope_modulo.ModuloRotaryEmbedding(0)


# ============================================================================================
# Sliding-window attention
# ============================================================================================

@settings(max_examples=10, deadline=None, derandomize=True)
@given(T=st.integers(1, 80), context=st.integers(1, 40), B=st.integers(1, 2))
def test_window_attention_equals_moshis_masked_attention(T, context, B):
    """The window's pairs block by block (the CPU path of window_attention.py) against moshi's own
    attention (T x T mask), YaRN included: logits and every parameter's gradient within 1e-5
    (flex_attention, the GPU path, is checked on a GPU). Streaming falls back to moshi's path."""
    import window_attention
    m = tiny_model(context=context)
    yarn.apply_yarn(m, 2.0, 16, widen_context=False)
    x = torch.randint(0, 256, (B, T + 1))
    results = []
    for windowed in (False, True):
        if windowed:
            window_attention.apply_window_attention(m)
            assert isinstance(m.transformer.layers[0].self_attn, window_attention.WindowAttention)
        out = M.logits(m, x[:, :-1])
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()
        results.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    for got, ref in zip(results[1], results[0]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), m.streaming(B):
        torch.testing.assert_close(torch.cat([M.logits(m, x[:, t:t + 1]) for t in range(T)], 1), results[0][0],
                                   atol=1e-4, rtol=1e-4)


def test_window_block_mask_made_before_compiling_is_the_graphs_input_not_its_work():
    """window_attention.block_mask under torch.compile (fullgraph; flex_attention forward on a CPU):
    a mask made before compiling is read as the graph's input, so the graph holds exactly what the same
    attention with the mask passed in as an argument holds (the mask is not rebuilt on each call);
    made while compiling, the first graph builds it and the next call compiles once more to that
    graph; the outputs equal flex_attention's eager ones."""
    import window_attention
    from torch.nn.attention.flex_attention import flex_attention
    T, context = 256, 64
    q, k, v = (torch.randn(1, 2, T, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    graphs = []

    def count(gm, example_inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    def compiled(fn):
        torch._dynamo.reset()
        graphs.clear()
        f = torch.compile(fn, backend=count, fullgraph=True)
        return [f(q, k, v) for _ in range(3)], list(graphs)

    window_attention._BLOCK_MASKS.clear()
    mask = window_attention.block_mask(T, context, "cpu")
    want = flex_attention(q, k, v, block_mask=mask)
    reference, (passed_in,) = compiled(lambda q, k, v: flex_attention(q, k, v, block_mask=mask))
    read, (from_dict,) = compiled(lambda q, k, v: flex_attention(
        q, k, v, block_mask=window_attention.block_mask(T, context, "cpu")))
    assert from_dict == passed_in
    window_attention._BLOCK_MASKS.clear()
    built, (first, again) = compiled(lambda q, k, v: flex_attention(
        q, k, v, block_mask=window_attention.block_mask(T, context, "cpu")))
    assert first > again == passed_in  # built in the first graph, read in the second
    for out in reference + read + built:
        torch.testing.assert_close(out, want)
    torch._dynamo.reset()


# ============================================================================================
# Freeze
# ============================================================================================

def expected_trainable(names, mode, layers):
    in_ttt_layer = lambda n: any(n.startswith(f"transformer.layers.{i}.") for i in layers)
    ttt_names = {n for n in names if in_ttt_layer(n) and n.endswith(("gating.conv.weight", "gating.W_target"))}
    if mode == "full":
        return set(names)
    if mode == "ttt_layers":
        return {n for n in names if in_ttt_layer(n)}
    if mode == "lora_ttt":
        return ttt_names | {n for n in names if n.endswith(("lora_A.weight", "lora_B.weight"))}
    if mode == "ttt_mlp_in":
        return ttt_names | {n for n in names if in_ttt_layer(n) and n.endswith("gating.linear_in.weight")}
    if mode == "ttt_lora_in":
        return ttt_names | {n for n in names if in_ttt_layer(n)
                            and n.endswith(("gating.linear_in.lora_A.weight", "gating.linear_in.lora_B.weight"))}
    return ttt_names


@pytest.mark.parametrize("mode", freeze.MODES)
def test_freeze_exact_sets_and_frozen_weights_unchanged(mode):
    m = tiny_model()
    layers = [1, 3]
    ttt.apply_ttt(m, layers, chunk_size=8, eta=0.5)
    if mode in freeze.LORA_SCOPES:
        x = torch.randint(0, 256, (2, 40))
        before_lora = M.logits(m, x)
        freeze.apply_lora(m, rank=2, scaling=2.0, scope=freeze.LORA_SCOPES[mode])
        assert torch.equal(M.logits(m, x), before_lora)  # B starts at zero
        lora_names = [n for n, _ in m.named_parameters() if "lora_" in n]
        # lora_ttt: every linear of the model (attention in/out and gating in/out of 4 layers, text_linear);
        # ttt_lora_in: the TTT layers' linear_in
        assert len(lora_names) == (2 * (4 * 4 + 1) if mode == "lora_ttt" else 2 * len(layers))
        assert not any("target" in n for n in lora_names)
    summary = freeze.apply_freeze(m, mode)
    names = [n for n, _ in m.named_parameters()]
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(names, mode, layers)
    assert summary["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert summary["total"] == sum(p.numel() for p in m.parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    m.train()
    for _ in range(3):
        x = torch.randint(0, 256, (2, 33))
        out = M.logits(m, x[:, :-1])
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()
        for g in freeze.ttt_modules(m):  # TTT parameters receive gradients in every mode
            assert g.conv.weight.grad is not None and g.W_target.grad is not None
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n
    assert "freeze mode" in freeze.format_summary(summary)


def names_of_mode(names, mode, layers):
    """The parameters each mode trains, enumerated from the names alone (an independent reference)."""
    in_ttt_layer = lambda n: any(n.startswith(f"transformer.layers.{i}.") for i in layers)
    value = {n for n in names if in_ttt_layer(n) and n.endswith(("gating.conv.weight", "gating.W_target"))}
    if mode == "ttt_only":
        return value
    if mode == "ttt_mlp_in":
        return value | {n for n in names if in_ttt_layer(n) and n.endswith("gating.linear_in.weight")}
    if mode == "ttt_layers":
        return {n for n in names if in_ttt_layer(n)}
    raise AssertionError(mode)


@FAST
@given(layers=st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
       target=st.sampled_from(["hidden", "embeddings"]))
def test_ttt_mlp_in_trains_the_values_and_the_keys_only(layers, target):
    """ttt_mlp_in: conv, W_target and linear_in (Z) of the TTT layers, nothing else; between
    ttt_only and ttt_layers."""
    m = tiny_model()
    ttt.apply_ttt(m, sorted(layers), chunk_size=8, eta=0.5, target_source=target)
    names = [n for n, _ in m.named_parameters()]
    trained = {}
    for mode in ("ttt_only", "ttt_mlp_in", "ttt_layers"):
        summary = freeze.apply_freeze(m, mode)
        trained[mode] = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trained[mode] == names_of_mode(names, mode, layers), mode
        assert summary["trainable"] == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trained["ttt_only"] < trained["ttt_mlp_in"] < trained["ttt_layers"]
    # summary groups: linear_in counts with the rest of the TTT layers, the conv and W_target in "ttt"
    summary = freeze.apply_freeze(m, "ttt_mlp_in")
    linear_in = sum(g.linear_in.weight.numel() for g in freeze.ttt_modules(m))
    assert summary["groups"]["ttt_layers"]["trainable"] == linear_in
    assert summary["groups"]["other"]["trainable"] == 0


def test_ttt_mlp_in_updates_linear_in_and_leaves_the_rest_bit_identical():
    """After AdamW steps (weight decay on, as train.py): linear_in, conv and W_target moved;
    attention, norms, linear_out, embeddings and the non-TTT layers are unchanged. linear_in is
    no TTT parameter (ttt_parameters()), so train.py puts it in the base group, at --lr."""
    m = tiny_model()
    ttt.apply_ttt(m, [1, 3], chunk_size=8, eta=0.5)
    randomise_ttt(m)
    freeze.apply_freeze(m, "ttt_mlp_in")
    freeze.upcast_trainable(m)
    for g in freeze.ttt_modules(m):
        assert all(p is not g.linear_in.weight for p in g.ttt_parameters())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    m.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 256, (2, 33), generator=gen)
        out = M.logits(m, x[:, :-1])
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    for n, p in m.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n
        assert p.requires_grad == (n.endswith(("gating.linear_in.weight", "gating.conv.weight", "gating.W_target"))
                                   and n.startswith(("transformer.layers.1.", "transformer.layers.3."))), n


def test_a_lora_mode_refuses_the_other_modes_lora():
    """ttt_lora_in trains a LoRA on the TTT layers' linear_in and lora_ttt one on every linear: each
    refuses a model whose LoRA is the other's (it would train the wrong set)."""
    for mode, other in (("ttt_lora_in", "model"), ("lora_ttt", "ttt_mlp_in")):
        m = tiny_model()
        ttt.apply_ttt(m, [1, 3], chunk_size=8, eta=0.5)
        freeze.apply_lora(m, 2, 2.0, other)
        with pytest.raises(ValueError, match=mode):
            freeze.apply_freeze(m, mode)


def test_train_accepts_ttt_mlp_in():
    args, _ = config.parse_args(["--mode", "ttt_mlp_in"])
    assert args.mode == "ttt_mlp_in" and "ttt_mlp_in" in freeze.MODES


# ============================================================================================
# sweep.py, setting "study"
# ============================================================================================


@pytest.mark.parametrize("scope", ["model", "transformer"])
def test_lora_wraps_what_moshi_get_lora_moshi_wraps(tmp_path, scope):
    """moshi-finetune's LoRA (moshi's replace_all_linear_with_lora over the whole LMModel) on a
    multi-stream model with a depformer; scope 'transformer' is what earlier checkpoints hold."""
    from moshi.modules.lora import replace_all_linear_with_lora
    lm, _ = make_moshi_format_model(tmp_path)
    reference = copy.deepcopy(lm)
    replace_all_linear_with_lora(reference if scope == "model" else reference.transformer, 2, 2.0)
    ttt.apply_ttt(lm, [1], chunk_size=8, eta=0.5)
    freeze.apply_lora(lm, 2, 2.0, scope)
    wrapped = lambda m: {n for n, x in m.named_modules() if isinstance(x, freeze.LoRALinear)}
    assert wrapped(lm) == wrapped(reference)
    assert any(n.startswith("depformer") for n in wrapped(lm)) == (scope == "model")


@pytest.mark.parametrize("mode", ["ttt_only", "ttt_layers", "lora_ttt"])
def test_bf16_frozen_weights_train_as_the_float32_path(mode):
    """A model stored in bf16, as Moshi ships, trains with its frozen weights in bf16 and the
    trained ones in float32 (freeze.upcast_trainable) under bf16 autocast. Against the path train.py
    took before (float32 weights under bf16 autocast, from the same bf16-representable start):
    the same weights after 5 AdamW steps (identical for ttt_only and ttt_layers; LoRA's sum rounds
    in another order: within 10 % of the update). Against float32 without autocast: losses within
    1e-2 (bf16 products). The frozen weights stay bf16 and unchanged."""
    base = tiny_model()
    ttt.apply_ttt(base, [1, 3], chunk_size=8, eta=0.5)
    randomise_ttt(base)
    if mode == "lora_ttt":
        freeze.apply_lora(base, 2, 2.0)
    base = base.to(torch.bfloat16).float()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (4, 65), generator=g) for _ in range(5)]
    runs, losses = {}, {}
    for path in ("float32", "float32 autocast", "bf16 frozen"):
        m = copy.deepcopy(base).train()
        if path == "bf16 frozen":
            m.to(torch.bfloat16)
        freeze.apply_freeze(m, mode)
        freeze.upcast_trainable(m)
        assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        losses[path] = []
        for x in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=path != "float32"):
                out = M.logits(m, x[:, :-1])
                loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[path].append(loss.item())
        runs[path] = dict(m.named_parameters())
    start, new, old = dict(base.named_parameters()), runs["bf16 frozen"], runs["float32 autocast"]
    trained = [n for n in new if new[n].requires_grad]
    change = lambda run: torch.cat([(run[n].float() - start[n]).flatten() for n in trained])
    # LoRA: 6.6 % seen on one 2-core CPU, under 5 % on another: bf16 kernels round by the CPU's instructions
    assert (change(new) - change(old)).norm() <= (0.1 if mode == "lora_ttt" else 0.0) * change(old).norm()
    assert losses["bf16 frozen"] == pytest.approx(losses["float32"], abs=1e-2)
    for n, p in new.items():
        if not p.requires_grad:
            assert p.dtype == torch.bfloat16 and torch.equal(p.float(), start[n]), n


def test_lora_starts_as_the_base_and_fuses_exactly():
    m = tiny_model()
    ttt.apply_ttt(m, [1, 3], chunk_size=8, eta=0.5)
    randomise_ttt(m)
    x = torch.randint(0, 256, (2, 40))
    ref = M.logits(m, x)
    freeze.apply_lora(m, rank=2, scaling=2.0)
    torch.testing.assert_close(M.logits(m, x), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for lora in freeze.lora_modules(m):
            lora.lora_B.weight.normal_(std=0.05)
    trained = M.logits(m, x)
    assert (trained - ref).abs().max() > 1e-3
    freeze.fuse_lora(m)
    assert not freeze.lora_modules(m)
    torch.testing.assert_close(M.logits(m, x), trained, atol=1e-4, rtol=1e-4)


def test_freeze_needs_ttt_and_known_mode():
    m = tiny_model()
    with pytest.raises(ValueError, match="TTT"):
        freeze.apply_freeze(m, "ttt_only")
    ttt.apply_ttt(m, [0], 8, 0.1)
    with pytest.raises(ValueError, match="mode"):
        freeze.apply_freeze(m, "lora")


# ============================================================================================
# Data and evaluation
# ============================================================================================

@FAST
@given(length=st.integers(110, 2000), depth=st.floats(0, 1), key=st.integers(10000, 99999))
def test_passkey_document_shape(length, depth, key):
    filler = bytes(range(32, 127)) * 30
    doc, at, answer = data.passkey_document(length, depth, key, filler)
    assert len(doc) == length
    assert doc[answer:] == str(key).encode()
    assert doc[at:].startswith(data.needle(key))
    span = length - len(data.needle(key)) - len(data.question()) - 5
    assert abs(at - depth * span) <= 0.5
    assert doc.endswith(data.question() + str(key).encode())


def test_passkey_document_rejects_bad_input():
    with pytest.raises(ValueError, match="at least"):
        data.passkey_document(50, 0.5, 12345, b"x" * 100)
    with pytest.raises(ValueError, match="depth"):
        data.passkey_document(200, 1.5, 12345, b"x" * 200)
    with pytest.raises(ValueError, match="digits"):
        data.passkey_document(200, 0.5, 123, b"x" * 200)


@FAST
@given(length=st.integers(-5, 400), depth=st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))),
       key=st.integers(-10, 200_000), filler=st.binary(max_size=400))
def test_passkey_document_any_input(length, depth, key, filler):
    """Any lengths, depths, keys and filler bytes: a well-formed document or a clear ValueError."""
    try:
        doc, at, answer = data.passkey_document(length, depth, key, filler)
    except ValueError as e:
        assert any(w in str(e) for w in ("depth", "digits", "at least", "shorter")), e
        return
    assert len(doc) == length and doc[answer:] == str(key).encode()
    assert doc[at:].startswith(data.needle(key)) and doc[:at] == filler[:at]


@FAST
@given(length=st.integers(90, 500), count=st.integers(1, 6), share=st.floats(0, 1), seed=st.integers(0, 10**6),
       text=st.binary(min_size=1, max_size=50))
def test_training_batch_any_sizes(length, count, share, seed, text):
    corpus = np.frombuffer(text * (2000 // len(text) + 1), dtype=np.uint8)
    try:
        tokens, answer = data.training_batch(corpus, length, count, share, torch.Generator().manual_seed(seed))
    except ValueError as e:
        assert "at least" in str(e) and length + 1 < 110, e  # too short for a passkey document
        return
    assert tokens.shape == (count, length + 1) and answer.shape == (count, length)
    assert tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 256
    for row, mask in zip(tokens, answer):
        assert mask.sum() in (0, 5)
        if mask.any():  # a passkey document: the masked targets are its last 5 bytes, the key
            assert bytes(row[-5:].tolist()).isdigit() and mask[-5:].all()


@settings(max_examples=20, deadline=None, derandomize=True)
@given(contents=st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_corpus_from_any_bytes(tmp_path_factory, contents):
    folder = tmp_path_factory.mktemp("corpus")
    paths = []
    for i, content in enumerate(contents):
        (folder / f"f{i}.txt").write_bytes(content)
        paths.append(str(folder / f"f{i}.txt"))
    try:
        corpus = data.load_corpus(paths)
    except ValueError as e:
        assert any(w in str(e) for w in ("empty", "UTF-8", "too small")), e
        return
    assert corpus.files == len(contents) and len(corpus.train) >= 2 and len(corpus.val) >= 2


def test_corpus_split_and_user_files(tmp_path):
    corpus = data.load_corpus()
    assert corpus.files > 100 and len(corpus.val) > 10_000 and len(corpus.train) > 10 * len(corpus.val)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("hello world\n" * 100)
    b.write_bytes(b"\xff\xfe bad")
    one = data.load_corpus([str(a)])
    assert len(one.train) == 1140 and len(one.val) == 60
    with pytest.raises(ValueError, match="UTF-8"):
        data.load_corpus([str(a), str(b)])
    with pytest.raises(ValueError, match="cannot read"):
        data.load_corpus([str(tmp_path / "missing.txt")])


def test_training_batch_is_deterministic_and_mixed():
    corpus = data.load_corpus()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, mask_a = data.training_batch(corpus.train, 300, 8, 0.5, g1)
    b, mask_b = data.training_batch(corpus.train, 300, 8, 0.5, g2)
    assert a.shape == (8, 301) and torch.equal(a, b) and torch.equal(mask_a, mask_b)
    for row, mask in zip(a, mask_a):  # the mask marks exactly the answer digits' targets
        is_passkey = bytes(row.tolist()).count(b"The pass key is") == 2
        assert mask.sum() == (5 if is_passkey else 0)
        if is_passkey:
            assert bytes(row[1:][mask].tolist()) == bytes(row[-5:].tolist())
    all_passkey, mask = data.training_batch(corpus.train, 300, 4, 1.0, g1)
    assert all(bytes(r.tolist()).count(b"The pass key is") == 2 for r in all_passkey) and mask.sum() == 20


@FAST
@given(length=st.integers(110, 5000), depth=st.floats(0, 1))
def test_sweep_needle_distance_matches_the_document(length, depth):
    """The distance sweep.py's plots put a needle at, from (length, depth), is where passkey_document
    puts it, counted back from the answer."""
    _, at, answer = data.passkey_document(length, depth, 12345, b"x" * length)
    assert sweep.distance(length, depth) == answer - at


def test_sweep_wilson_interval():
    """Against the closed forms at the edges (0 or n successes: [0, z^2 / (n + z^2)] and its
    mirror) and the textbook 50 of 100: [0.404, 0.596]."""
    z2 = 1.96 ** 2
    assert sweep.wilson(0.0, 80) == pytest.approx((0.0, z2 / (80 + z2)))
    assert sweep.wilson(1.0, 80) == pytest.approx((80 / (80 + z2), 1.0))
    assert sweep.wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


@FAST
@given(length=st.integers(200, 5000), window=st.integers(16, 4000))
def test_far_depth_is_the_deepest_needle_beyond_the_window(length, window):
    """Against data.passkey_document's own needle position: at far_depth the whole needle ends at
    least `window` steps before the first answer digit (whose query reads farthest back); at the
    next multiple of 0.05 it does not (or far_depth is 1)."""
    def beyond(depth):
        filler = bytes(length)
        _, at, answer = data.passkey_document(length, depth, 12345, filler)
        return answer - (at + len(data.needle(12345))) >= window
    if not beyond(0.0):
        with pytest.raises(ValueError, match="window"):
            sweep.far_depth(length, window)
        return
    depth = sweep.far_depth(length, window)
    assert beyond(depth) and round(depth * 20) == depth * 20
    assert depth == 1.0 or not beyond(round(depth * 20 + 1) / 20)


def test_far_depth_keeps_the_whole_needle_beyond_setting_b_window():
    assert sweep.far_depth(1025, 256) == 0.75  # b_ttt_only_far's 0.8 leaves the needle's end inside


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_study_rows_are_valid_train_py_runs(device):
    """Every training row parses as a train.py run on the base, with the mode, seed and flag it
    names; the bounds, the hypothesis and the seed-1 repeats are there; base seeds differ."""
    c = sweep.PRESETS_STUDY[device]
    rows = {r.name: r for r in sweep.study_rows(c)}
    assert len(rows) == len(sweep.study_rows(c))
    expected = dict(control="full", ttt_only="ttt_only", ttt_only_eta3="ttt_only", ttt_only_emb="ttt_only",
                    ttt_only_far="ttt_only", ttt_only_all_layers="ttt_only", ttt_mlp_in="ttt_mlp_in",
                    ttt_layers="ttt_layers", control_seed1="full", ttt_only_seed1="ttt_only",
                    ttt_mlp_in_seed1="ttt_mlp_in")
    assert set(rows) == set(expected) | {"base"} and not rows["base"].train
    layers = M.PRESETS[c["preset"]]["num_layers"]
    for name, mode in expected.items():
        cmd = sweep.finetune_command(c, "base.pt", "out", rows[name].flags, 0, c["steps"])
        args, _ = config.parse_args(cmd[2:])
        assert args.mode == mode and args.scale == 1 and args.window == c["window"]
        assert args.seed == (1 if name.endswith("_seed1") else 0)
        assert (args.ttt_layers == "none") == name.startswith("control")
        assert args.ttt_eta == (3.0 if name == "ttt_only_eta3" else float(c["eta"]))
        assert (args.ttt_target == "embeddings") == (name == "ttt_only_emb")
        assert (args.ttt_layers == list(range(layers))) == (name == "ttt_only_all_layers")
        if name == "ttt_only_far":  # every training needle lies wholly beyond the window
            assert sweep.eval_passkey.is_far(c["L0"] + 1, args.passkey_max_depth, c["window"])
        else:
            assert args.passkey_max_depth == 1.0
    assert c["preset"] == ("head128" if device == "cuda" else "cpu")
    seeds = {config.parse_args(sweep.pretrain_command(c, s, "b")[2:])[0].seed for s in range(3)}
    assert seeds == {0, 1, 2}
    assert sweep.REPORT_SEED != sweep.eval_passkey.EVAL_SEED and sweep.REPORT_SEED >= 2 ** 40


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_horizon_rows_are_the_runs_they_name(device):
    """Every horizon row that trains parses as a train.py run with its mode, forgetting, mean past
    K chunks and delta rule; the inference-only rows evaluate another row's checkpoint with eval_passkey's flags
    (K = the trained length's chunks for the mean); every needle depth is far at every length."""
    c = sweep.PRESETS_HORIZON[device]
    rows = {r.name: r for r in sweep.horizon_rows(c)}
    for name, row in rows.items():
        if not row.train or row.same_training:
            continue
        args, _ = config.parse_args(sweep.finetune_command(c, "base.pt", "out", row.flags, 0, c["steps"],
                                                           row.longest)[2:])
        assert args.mode == ("full" if name.startswith(("control", "ttt_full")) else "ttt_mlp_in" if "mlp_in" in name else
                             "ttt_lora_in" if "lora_in" in name else "lora_ttt" if "lora_all" in name else "ttt_only")
        assert ("--lora-rank" in row.flags) == ("lora" in name)
        assert args.lora_rank == (int(name.split("rank")[1].split("_")[0]) if "rank" in name else 8)
        assert (args.ttt_layers == "none") == name.startswith("control")
        # longer documents: stages 2 L0 .. 4 L0 with the base's RoPE, tokens within 1 % of one stage at L0
        stages = config.curriculum(args.scale, c["L0"], pretrain=False)
        tokens = args.steps * args.batch * sum(s["length"] for s in stages)
        assert (args.method, args.scale) == (("none", 4) if "long4" in name else ("yarn", 1))
        assert abs(tokens / (c["steps"] * c["batch"] * c["L0"]) - 1) < 0.01
        tuned = f"_lr{0.1 * float(c['lr']):g}" if "_lr" in name else ""  # a TTT row at its own rate: the control at its own
        if name.startswith("ttt"):  # compared with the no-TTT row trained the same way, from the same start
            assert row.control == (f"control{tuned}_then_long4" if "then_long4" in name else "control_long4"
                                   if "long4" in name else f"control{tuned}")
            control = rows[row.control]
            assert control.longest == row.longest
            assert control.init_row == (rows[row.init_row].control if row.init_row else "")
        if row.init_row:  # starts from a row trained at L0 with the same flags
            assert rows[row.init_row].flags == row.flags and rows[row.init_row].longest == 1
        # a row at another learning rate (0.3 or 0.1 times the preset's): its name's, --lr-ttt too for a TTT
        # row, and otherwise the run of its twin at the preset's rate
        lr = float(name.split("_lr")[1].split("_")[0]) if "_lr" in name else float(c["lr"])
        assert args.lr == lr and args.lr_ttt == (lr if name.startswith("ttt") else float(c["lr"]))
        if "_lr" in name:
            assert min(abs(lr / float(c["lr"]) - f) for f in (0.3, 0.1)) < 1e-9
            twin = name.replace(f"_lr{name.split('_lr')[1].split('_')[0]}", "")
            assert dataclasses.replace(args, lr=float(c["lr"]), lr_ttt=float(c["lr"])) == config.parse_args(
                sweep.finetune_command(c, "base.pt", "out", rows[twin].flags, 0, c["steps"], rows[twin].longest)[2:])[0]
            assert row.init_row == (name.split("_then")[0] if "then" in name else "")
        assert args.ttt_decay == (float("0." + name.split("decay")[1]) if "decay" in name else 1.0)
        assert args.ttt_average_after == (int(name.split("average")[1]) if "average" in name else 0)
        assert args.ttt_update_clip == 0
        assert args.ttt_delta == (float(name.split("delta")[1].split("_")[0]) if "delta" in name else 0.0)
        assert (args.ttt_eta == 0) == ("eta0" in name) and sweep.writes_memory(row) == (name.startswith("ttt")
                                                                                       and "eta0" not in name)
        if name.startswith("ttt_full"):  # the control's run with memory: differs in the TTT layers alone
            control, _ = config.parse_args(sweep.finetune_command(c, "base.pt", "out", rows[row.control].flags, 0,
                                                                  c["steps"], row.longest)[2:])
            differ = {k for k in vars(args) if getattr(args, k) != getattr(control, k)}
            assert differ == {"ttt_layers", "ttt_delta"} and args.ttt_layers == "default"
    # the rows at other rates: the control at 0.3 and 0.1 times the preset's, the rank-4 LoRA on every linear at 0.3
    at = lambda f: f"{f * float(c['lr']):g}"
    assert {n for n in rows if "_lr" in n} == {f"{n}{then}" for then in ("", "_then_long4") for n in (
        f"control_lr{at(0.3)}", f"control_lr{at(0.1)}", f"ttt_lora_all_rank4_delta1_lr{at(0.3)}")}
    with pytest.raises(ValueError, match="power of 2"):  # stages double: 2 L0 + 3 L0 is no such curriculum
        sweep.long_budget(c, c["steps"], 3)
    inference = {n: r for n, r in rows.items() if r.same_training}
    assert all(r.same_training == "ttt_mlp_in" for r in inference.values())
    assert eval_passkey.parse_args(["x.pt"] + inference["ttt_mlp_in_eval_decay97"].eval_flags)[0].ttt_decay == 0.97
    K = c["L0"] // c["chunk"]
    average = inference[f"ttt_mlp_in_eval_average{K}"].eval_flags
    assert eval_passkey.parse_args(["x.pt"] + average)[0].ttt_average_after == K
    assert eval_passkey.parse_args(["x.pt"] + inference["ttt_mlp_in_eval_clip1"].eval_flags)[0].ttt_update_clip == 1
    assert eval_passkey.parse_args(["x.pt"] + inference["ttt_mlp_in_eval_delta1"].eval_flags)[0].ttt_delta == 1
    assert all(eval_passkey.is_far(L, d, c["window"]) for L in sweep.horizon_lengths(c) for d in c["horizon_depths"])


def test_horizon_jobs_are_checked_against_the_gpus_memory():
    """--jobs on a GPU: refused where the processes on one GPU, at the preset's 28 GiB each (27.3
    seen), exceed its memory (6 on one H200 of 139.8 GiB ran two evaluations out of memory), with the
    most that fit; the CPU preset has no such measure."""
    c = sweep.PRESETS_HORIZON["cuda"]
    assert sweep.jobs_fit(c, 4, 1, 139.8) is None and sweep.jobs_fit(c, 8, 2, 139.8) is None
    assert "at most 4 here" in sweep.jobs_fit(c, 6, 1, 139.8) and "at most 2 here" in sweep.jobs_fit(c, 3, 1, 79.2)
    assert "3 process(es) on a GPU" in sweep.jobs_fit(c, 5, 2, 79.2) and "holds none" in sweep.jobs_fit(c, 1, 1, 24.0)
    assert "GPU of 139.8 GiB" in sweep.jobs_fit(c, 5, 1, 139.8)  # 5 x 28 is 140: the size is not rounded up to it
    assert [sweep.jobs_that_fit(c, g, gib) for g, gib in ((1, 139.8), (1, 79.2), (2, 79.2), (1, 24.0))] == [4, 2, 4, 0]
    assert sweep.jobs_fit(sweep.PRESETS_HORIZON["cpu"], 64, 0, 0.0) is None


def sweep_refuses(monkeypatch, capsys, argv: list[str], says: str) -> None:
    """sweep.py run with `argv` in this process exits 2 with one line on stderr that contains `says`."""
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        sweep.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and says in err[0], (argv, err)


def test_sweep_pretrain_steps_and_a_work_folder_made_with_other_settings(tmp_path, monkeypatch, capsys):
    """--pretrain-steps N pretrains the bases for N steps (the work folder's settings.json and the
    pretraining's command say N), and a work folder keeps the settings its checkpoints were made with:
    a run of other settings in it (the pretraining's steps, the seed) is refused by name; so are N below
    1 and N with --tables, --probe or --paired (it would not be used); each in one line, exit 2,
    nothing started; the same settings take the folder again."""
    work, out = tmp_path / "w", str(tmp_path / "h")
    run = ["sweep.py", "--setting", "horizon", "--rows", "control", "--out", out, "--work", str(work),
           "--stop-after", "0"]

    refused = functools.partial(sweep_refuses, monkeypatch, capsys)

    for argv, says in ((run + ["--pretrain-steps", "0"], "--pretrain-steps must be >= 1, got 0"),
                       (["sweep.py", "--setting", "horizon", "--tables", "--out", out, "--pretrain-steps", "9"],
                        "--pretrain-steps would not be used"),
                       (["sweep.py", "--probe", "c.pt", "--probe-length", "128", "--out", out, "--pretrain-steps", "9"],
                        "--probe measures one checkpoint"),
                       (["sweep.py", "--paired", "a.json", "--out", out, "--pretrain-steps", "9"],
                        "--pretrain-steps would not be used")):
        refused(argv, says)
    assert not work.exists()
    monkeypatch.setattr(sys, "argv", run + ["--pretrain-steps", "7"])
    sweep.main()
    capsys.readouterr()
    held = json.loads((work / "settings.json").read_text())
    assert held["pretrain_steps"] == 7 and held["seed"] == 0 and held["preset"] == sweep.PRESETS_HORIZON["cpu"]["preset"]
    command = sweep.pretrain_command(dict(sweep.PRESETS_HORIZON["cpu"], pretrain_steps=held["pretrain_steps"]), 0, "f")
    assert command[command.index("--pretrain-steps") + 1] == "7"
    refused(run, f"--work {work} holds checkpoints made with pretrain_steps 7, this run's is "
                 f"{sweep.PRESETS_HORIZON['cpu']['pretrain_steps']}")
    refused(run + ["--pretrain-steps", "7", "--seed", "1"], "made with seed 0, this run's is 1")
    assert sorted(os.listdir(work)) == ["settings.json"]  # nothing started
    monkeypatch.setattr(sys, "argv", run + ["--pretrain-steps", "7"])
    sweep.main()  # the same settings: taken again
    assert json.loads((work / "settings.json").read_text()) == held


def test_sweep_data_reaches_every_command_and_the_work_folder_keeps_its_hash(tmp_path, monkeypatch, capsys):
    """sweep.py --data FILE: every pretraining, training, evaluation, probe and streaming command of the
    horizon's jobs and the study's reads FILE (its absolute path: the jobs run in the repository), and the
    work folder keeps the corpus's hash: the same folder run on the default corpus is refused by name, as
    are an unreadable file and --data with --tables (one line, exit 2, nothing started). A settings.json
    of an earlier revision (no hash: the default corpus) is taken by a run on the default corpus, and
    refused with --data. --probe's document comes from --data's text too."""
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    work, out = tmp_path / "w", str(tmp_path / "h")
    run = ["sweep.py", "--setting", "horizon", "--rows", "control", "--out", out, "--work", str(work),
           "--stop-after", "0"]

    refused = functools.partial(sweep_refuses, monkeypatch, capsys)

    refused(run + ["--data", str(tmp_path / "missing.txt")], "--data: cannot read data file")
    refused(["sweep.py", "--setting", "horizon", "--tables", "--out", out, "--data", str(text)], "--data would not be used")
    assert not work.exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", run + ["--data", "text.txt"])
    sweep.main()
    capsys.readouterr()
    assert json.loads((work / "settings.json").read_text())["corpus"] == data.load_corpus([str(text)]).sha256
    refused(run, f"--work {work} holds checkpoints made with corpus")
    # every command of every job reads the file, as `--data <absolute path>`
    c = dict(sweep.PRESETS_HORIZON["cpu"], data=[str(text)])
    rows = sweep.horizon_rows(c)
    names = [r.name for r in rows]
    jobs = sweep.horizon_jobs(c, rows, names, dict(rows={}, probe={}, streaming={}), str(tmp_path / "w2"), [0], 0)
    commands = [cmd for j in jobs for cmd in j["commands"]]
    commands += [sweep.eval_command(c, "c.pt", "o.json", 1, []), sweep.pretrain_command(c, 0, "f")]
    assert {os.path.basename(cmd[1]) for cmd in commands} == {"train.py", "eval_passkey.py", "sweep.py"}
    assert any("--probe" in cmd for cmd in commands) and any("--streaming" in cmd for cmd in commands)
    for cmd in commands:
        assert cmd.count("--data") == 1 and cmd[cmd.index("--data") + 1] == str(text), cmd
    assert all("--data" not in cmd for j in sweep.horizon_jobs(dict(c, data=None), rows, names, dict(
        rows={}, probe={}, streaming={}), str(tmp_path / "w2"), [0], 0) for cmd in j["commands"])
    # a settings.json of an earlier revision: the default corpus
    (work / "settings.json").write_text(json.dumps({k: v for k, v in json.loads(
        (work / "settings.json").read_text()).items() if k != "corpus"}))
    refused(run + ["--data", "text.txt"], "made with corpus 'the default corpus, unrecorded")
    monkeypatch.setattr(sys, "argv", run)
    sweep.main()
    # --probe reads the document from --data's text (one whose validation part holds the document)
    seen = []
    (tmp_path / "more.txt").write_text(text.read_text() * 20)
    monkeypatch.setattr(sweep, "probe", lambda *args: seen.append(args[-1].sha256))
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path: dict(settings=dict(ttt=dict(layers=[0]))))
    monkeypatch.setattr(sys, "argv", ["sweep.py", "--probe", "c.pt", "--probe-length", "128", "--out", out, "--data",
                                      "more.txt"])
    sweep.main()
    assert seen == [data.load_corpus([str(tmp_path / "more.txt")]).sha256]
    refused(["sweep.py", "--probe", "c.pt", "--probe-length", "128", "--out", out, "--data", "missing.txt"],
            "--data: cannot read data file")
    # the jobs run in the repository: a path given from elsewhere is made absolute
    given = argparse.Namespace(pretrain_steps=None, data=["text.txt"], tables=False)
    (path,) = sweep.run_preset(sweep.PRESETS_HORIZON, given, None)["data"]
    assert os.path.isabs(path) and os.path.samefile(path, text)


def test_the_stages_as_pretraining_steps_worked_by_hand():
    """The pretraining steps that hold a row's tokens at L0 then through 8 W and 16 W: on the GPU preset
    300 x 16 x 1024 at L0 and 200 x 4 x (2048 + 4096) in the stages, 9,830,400 bytes, 300 steps of
    32 x 1024; on the CPU preset 200 x 8 x 512 and 133 x 2 x (1024 + 2048), 1,636,352, 399.5 steps of
    8 x 512, rounded to 400."""
    assert sweep.stages_as_pretraining_steps(sweep.PRESETS_HORIZON["cuda"], 4) == 300
    assert sweep.stages_as_pretraining_steps(sweep.PRESETS_HORIZON["cpu"], 4) == 400
    assert sweep.stages_as_pretraining_steps(dict(sweep.PRESETS_HORIZON["cuda"], steps=600), 1) == 300


def test_horizon_on_a_smaller_gpu_runs_what_fits(tmp_path, monkeypatch, capsys):
    """Without --jobs, on a GPU that holds fewer than the preset's 4 processes (one of 80 GiB: 2),
    the horizon runs as many as fit and says so; an explicit --jobs that does not fit is refused,
    one line, exit 2 (CUDA's answers stood in for; --stop-after 0 starts no job)."""
    import types
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=80 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a GPU of 80 GiB")
    argv = ["sweep.py", "--setting", "horizon", "--rows", "control", "--out", str(tmp_path / "h"),
            "--work", str(tmp_path / "w"), "--stop-after", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    sweep.main()
    assert "horizon: 2 processes at once, not the preset's 4" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", argv + ["--jobs", "3"])
    with pytest.raises(SystemExit) as e:
        sweep.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--jobs 3" in err[0] and "at most 2 here" in err[0]
    assert not (tmp_path / "h.json").exists()


def test_horizon_jobs_wait_only_for_what_they_read(tmp_path):
    """The horizon's job graph: every job waits for a job listed before it (or for nothing), an
    evaluation for its own training, a row starting from or evaluating another's checkpoint for that
    training only (not its evaluation); trainings come before evaluations and the streaming checks
    last, the asked rows' before their references'; every command parses; a row already in the
    results is not run again on that base, and a base is pretrained only where a job runs on it; with
    --start-rows-untested the row a named row starts from is trained, not evaluated."""
    c = sweep.PRESETS_HORIZON["cpu"]
    rows = {r.name: r for r in sweep.horizon_rows(c)}
    # base1's control and base0's delta row evaluated, their checkpoints not here (a fresh machine)
    results = dict(rows={"base1": {"control": []}, "base0": {"ttt_mlp_in_delta1": []}}, probe={}, streaming={})
    jobs = sweep.horizon_jobs(c, list(rows.values()), list(rows), results, str(tmp_path), [0, 1], 0)
    names = [j["name"] for j in jobs]
    assert len(set(names)) == len(names) and "base1/control" not in names and "base0/control" in names
    assert {"base1/control/train", "base0/ttt_mlp_in_delta1/train"} <= set(names)  # read by the "then" rows
    assert "base0/ttt_mlp_in_delta1" not in names
    only = sweep.horizon_jobs(c, list(rows.values()), ["control"], results, str(tmp_path), [0, 1], 0)
    assert [j["name"] for j in only] == ["base0", "base0/control/train", "base0/control"]  # base1: nothing to run
    alone = sweep.horizon_jobs(c, list(rows.values()), ["control"], results, str(tmp_path), [2], 0)
    assert [j["name"] for j in alone] == ["base2", "base2/control/train", "base2/control"]  # --base 2: no other base
    assert config.parse_args(alone[0]["commands"][0][2:])[0].seed == 2  # pretrained from its own seed
    for i, job in enumerate(jobs):
        assert job["after"] is None or job["after"] in names[:i]
        *_, tail = job["name"].split("/")
        if "/" not in job["name"]:
            assert config.parse_args(job["commands"][0][2:])[0].pretrain_only
        elif tail == "train":
            args, _ = config.parse_args(job["commands"][0][2:])
            row = rows[job["name"].split("/")[1]]
            b = job["name"].split("/")[0]
            assert job["after"] == (f"{b}/{row.init_row}/train" if row.init_row else b)
            assert args.init.endswith(f"{row.init_row}/ckpt.pt" if row.init_row else "base.pt")
        elif tail in rows:  # an evaluation
            row, b = rows[tail], job["name"].split("/")[0]
            assert job["after"] == (f"{b}/{row.same_training or row.name}/train" if row.train else b)
            assert eval_passkey.parse_args(job["commands"][0][2:])[0].lengths == sweep.horizon_lengths(c)
    kinds = [0 if "/" not in n else 1 if n.endswith("/train") else 3 if n.endswith("/streaming") else 2 for n in names]
    assert kinds == sorted(kinds) and {"base0/ttt_mlp_in_delta1_then_long4/probe",
                                       "base0/ttt_mlp_in_delta1_then_long4/streaming"} <= set(names)
    no_memory = "base0/ttt_mlp_in_delta1_eta0_then_long4"  # evaluated; no fast weight to probe or stream
    assert no_memory in names and not {no_memory + "/probe", no_memory + "/streaming"} & set(names)
    asked = ["ttt_mlp_in_delta1_then_long4"]  # with its references, as horizon() adds them
    wanted = asked + ["ttt_mlp_in_delta1", "control_then_long4", "control"]
    assert sweep.horizon_wanted(list(rows.values()), asked) == asked + ["ttt_mlp_in_delta1", "control_then_long4"]
    untested = sweep.horizon_wanted(list(rows.values()), asked, start_rows_untested=True)
    assert untested == asked + ["control_then_long4"]  # the control's own start row is no TTT row's control
    lean = [j["name"] for j in sweep.horizon_jobs(c, list(rows.values()), untested, results, str(tmp_path), [2], 0, asked)]
    assert lean == ["base2", "base2/control/train", "base2/ttt_mlp_in_delta1/train",  # trained as sources only
                    "base2/control_then_long4/train", "base2/ttt_mlp_in_delta1_then_long4/train",
                    "base2/ttt_mlp_in_delta1_then_long4", "base2/control_then_long4"]  # the asked row's first
    cut = [j["name"] for j in sweep.horizon_jobs(c, list(rows.values()), wanted, results, str(tmp_path), [0, 1], 0, asked)
           if j["name"].split("/")[-1] in rows]  # the evaluations
    mine = [i for i, n in enumerate(cut) if n.endswith("/ttt_mlp_in_delta1_then_long4")]
    assert len(mine) == 2 and mine == list(range(2)) and len(cut) > 2


def test_horizon_eval_seed_reaches_every_evaluation_and_is_part_of_the_configuration(tmp_path):
    """--eval-seed S (horizon): every evaluation and streaming check draws its documents and
    validation windows with S (default eval_passkey's), it is stored in the JSON's configuration, so
    resuming a JSON of another seed is refused, and so are a seed below 2**40 (training's range) and
    one that draws some of the default draw's documents; each refusal one line, exit 2."""
    c = sweep.PRESETS_HORIZON["cpu"]
    rows = sweep.horizon_rows(c)
    results = dict(rows={}, probe={}, streaming={})
    other = eval_passkey.EVAL_SEED + 1
    for kw, seed in ((dict(), eval_passkey.EVAL_SEED), (dict(eval_seed=other), other)):
        jobs = sweep.horizon_jobs(c, rows, ["ttt_mlp_in_delta1"], results, str(tmp_path), [0], 0, **kw)
        commands = [cmd for j in jobs if "/" in j["name"] and not j["name"].endswith(("/train", "/probe"))
                    for cmd in j["commands"]]
        assert len(commands) == 3  # the evaluation, and the streaming check's two ways
        assert all(eval_passkey.parse_args(cmd[2:])[0].seed == seed for cmd in commands), kw
    stored = dict(config=dict(c, seed=0, eval_seed=eval_passkey.EVAL_SEED, lengths=sweep.horizon_lengths(c)),
                  rows={}, probe={}, streaming={})
    (tmp_path / "h.json").write_text(json.dumps(stored))
    for flags, says in ((["--eval-seed", "5"], "--eval-seed"), (["--eval-seed", str(other)], "holds a horizon with eval_seed"),
                        (["--eval-seed", str(eval_passkey.EVAL_SEED + 2000)], "draws some")):
        # --stop-after 0: were a refusal lost, no job would start (and the test fail on the exit code)
        r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--setting", "horizon", "--out",
                            str(tmp_path / "h"), "--work", str(tmp_path / "w"), "--stop-after", "0"] + flags,
                           capture_output=True, text=True, cwd=HERE, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (flags, r.stderr)
        assert not (tmp_path / "w" / "base0").exists()


@pytest.mark.parametrize("minutes", ["-1", "nan", "-inf"])
def test_sweep_stop_after_below_zero_or_not_a_number_is_refused(tmp_path, minutes):
    """--stop-after below 0, or nan (no time is past it: run_jobs would never stop), is refused in one
    line, exit 2, before any work."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--setting", "horizon", "--out",
                        str(tmp_path / "h"), "--work", str(tmp_path / "w"), f"--stop-after={minutes}"],
                       capture_output=True, text=True, cwd=HERE, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--stop-after" in lines[0] and minutes in lines[0], r.stderr
    assert not (tmp_path / "w" / "base0").exists() and not (tmp_path / "h.json").exists()


@pytest.mark.parametrize("flags, named", [
    (["--paired", ""], "--paired"), (["--measure-parallel", "0"], "--measure-parallel"), (["--seed", "-5"], "--seed"),
    (["--setting", "horizon", "--probe", "x.pt", "--probe-length", "64"], "--probe-length"),
    (["--setting", "horizon", "--probe", "", "--probe-length", "512"], "--probe"),
    (["--setting", "horizon", "--probe", "missing.pt", "--probe-length", "512"], "--probe")])
def test_sweep_empty_or_out_of_range_values_are_refused(tmp_path, flags, named):
    """An empty --paired or --probe is not "not given" (both once ran the whole study instead), and
    --measure-parallel, --seed and --probe-length out of range, or an unreadable --probe, are refused in
    one line naming the flag, exit 2, before any work."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--out", str(tmp_path / "h")] + flags
                       + ([] if "--probe" in flags or "--paired" in flags else ["--work", str(tmp_path / "w")]),
                       capture_output=True, text=True, cwd=HERE, timeout=60)  # a regression would run the study
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and named in lines[0], r.stderr
    assert not (tmp_path / "w").exists() and not os.listdir(tmp_path)


@pytest.mark.parametrize("flags", [["--setting", "horizon"], ["--setting", "study", "--rows", "control"]])
def test_sweep_start_rows_untested_needs_the_horizon_and_rows(tmp_path, flags):
    """--start-rows-untested names what --rows start from: without --rows, or in the study, it would
    change nothing, so it is refused in one line, exit 2, before any work."""
    r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--start-rows-untested", "--out",
                        str(tmp_path / "h"), "--work", str(tmp_path / "w")] + flags,
                       capture_output=True, text=True, cwd=HERE, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--start-rows-untested" in lines[0], r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "h.json").exists()


def test_an_option_given_twice_or_abbreviated_is_refused_in_one_line(capsys):
    """argparse keeps the last of an option given twice without a word (a script adding flags to its
    base command once ran with a window other than its own): every option of train.py given twice,
    as `--x v` then `--x=v`, is refused in one line naming it, exit 2; so are eval_passkey.py's,
    sweep.py's, and an option abbreviated (--mod for --mode)."""
    for f in dataclasses.fields(config.Config):
        flag = config.option(f.name)
        twice = [flag, flag] if f.type is bool else [flag, "1", f"{flag}=2"]
        with pytest.raises(SystemExit) as e:
            config.parse_args(["--steps", "3"] + twice)
        assert e.value.code == 2
        assert capsys.readouterr().err.splitlines() == [f"train.py: error: {flag} is given twice: give each option once"]
    for parse, argv, says in ((config.parse_args, ["--mod", "full"], "unrecognized arguments: --mod full"),
                              (eval_passkey.parse_args, ["c.pt", "--trials", "2", "--trials=3"], "--trials is given twice")):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        err = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and len(err) == 1 and says in err[0], err
    r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--rows", "control", "--rows=base"],
                       capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 2 and r.stderr.splitlines() == ["sweep.py: error: --rows is given twice: give each option once"]


def test_sweep_tables_refuses_flags_of_a_run_and_a_json_without_each_depth(tmp_path):
    """--tables rebuilds the tables from the JSON as it is: a flag that only a run reads is refused, not
    ignored; a row without an accuracy for each of the configuration's depths is refused by name;
    each in one line, exit 2, the tables not written."""
    c = dict(sweep.PRESETS_HORIZON["cpu"], lengths=[512], horizon_depths=[0.0, 0.5], hardware="CPU", torch="x", seed=0)
    row = dict(length=512, passkey=0.5, by_depth=[1.0], bpb=1.0)  # one depth of two
    (tmp_path / "h.json").write_text(json.dumps(dict(config=c, rows=dict(base0=dict(control=[row])),
                                                     streaming={}, probe={})))
    for flags, says in ((["--rows", "control"], "--rows"), (["--eval-seed", str(eval_passkey.EVAL_SEED)], "--eval-seed"),
                        ([], "base0 control at 512")):
        r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--setting", "horizon", "--tables",
                            "--out", str(tmp_path / "h")] + flags, capture_output=True, text=True, cwd=HERE,
                           timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (flags, r.stderr)
    assert not (tmp_path / "h.md").exists()


def test_study_eval_seed_below_training_seeds_or_the_dev_sets_is_refused(tmp_path):
    """--eval-seed (study: the report set's seed) below 2**40, where training's seeds lie, from 2**63,
    or drawing any of the dev set's documents (its seed, or one 1000 on: the next depth's), is refused
    in one line, exit 2, before any work."""
    for seed, says in ((5, "2**40"), (2 ** 63, "2**63"), (eval_passkey.EVAL_SEED, "draws some"),
                       (eval_passkey.EVAL_SEED + 1000, "draws some")):  # the dev set's documents, one depth on
        r = subprocess.run([sys.executable, os.path.join(HERE, "sweep.py"), "--setting", "study", "--out",
                            str(tmp_path / "s"), "--work", str(tmp_path / "w"), "--stop-after", "0",
                            "--eval-seed", str(seed)], capture_output=True, text=True, cwd=HERE, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (seed, r.stderr)
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "w" / "base0").exists()


def test_sweep_base_names_one_base_and_refuses_bases_beside_it(capsys):
    """--base S runs the base of seed S alone, --base 1,2 those two; with --bases, a negative or
    repeated seed, or --bases 0: one line, exit 2; without either, the three bases of seeds 0, 1, 2."""
    rows = sweep.horizon_rows(sweep.PRESETS_HORIZON["cpu"])
    p = eval_passkey.OneLineParser(prog="sweep.py")

    def pick(**flags):
        args = argparse.Namespace(**dict(dict(rows=None, bases=None, base=None, jobs=None), **flags))
        sweep.wanted_rows(rows, args, p)
        return sweep.base_seeds(args)

    for flags, seeds in ((dict(), [0, 1, 2]), (dict(bases=2), [0, 1]), (dict(base="2"), [2]), (dict(base="0"), [0]),
                         (dict(base="2,1"), [2, 1])):
        assert pick(**flags) == seeds, flags
    for kw in (dict(base="1", bases=3), dict(base="-1"), dict(base="1,1"), dict(base="1,"), dict(base="x"),
               dict(bases=0)):
        with pytest.raises(SystemExit) as e:
            pick(**kw)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and "--base" in lines[0], (kw, lines)


def synthetic_study(by_depth: dict) -> dict:
    """A study JSON as sweep.study writes it, with the given accuracies per (base, row, split, length)."""
    c = dict(sweep.PRESETS_STUDY["cuda"], seed=0, dev_seed=1, report_seed=2, depths=sweep.DEPTHS,
             hardware="test", torch="test")
    rows = {}
    for (base, name, split, length), acc in by_depth.items():
        record = rows.setdefault(base, {}).setdefault(name, dict(label=name, chosen_after_report=False, seconds=1.0,
                                                                  tokens=4915200, budget=4915200 / 58982400,
                                                                  trainable=10, parameters=100, dev=[], report=[]))
        record[split].append(dict(length=length, passkey=sum(acc) / len(acc), by_depth=acc, bpb=1.0))
    return dict(config=c, rows=rows)


@FAST
@given(st.lists(st.lists(st.integers(0, 20), min_size=5, max_size=5), min_size=3, max_size=3))
def test_study_summary_pools_documents_over_bases(correct):
    """Near / far counts pooled over bases, against the needle positions data.passkey_document
    gives (20 documents per depth), for base b's ttt_only row at length 1024 on the dev set."""
    c = sweep.PRESETS_STUDY["cuda"]
    by_depth = {}
    for b, k in enumerate(correct):
        for split in ("dev", "report"):
            for length in (1024, 2048):
                by_depth[(f"base{b}", "ttt_only", split, length)] = [x / c["trials"] for x in k]
    results = synthetic_study(by_depth)
    s = sweep.study_summary(results)["dev"]["ttt_only"]["1024"]
    needle = len(data.needle(12345))
    far = [answer - (at + needle) >= c["window"] for at, answer in
           (data.passkey_document(1024, d, 12345, bytes(1024))[1:] for d in sweep.DEPTHS)]
    assert far == [True, True, True, True, False]
    want_far = sum(k for ks in correct for k, f in zip(ks, far) if f)
    want_near = sum(k for ks in correct for k, f in zip(ks, far) if not f)
    assert s["far"] == [want_far, 3 * 4 * c["trials"]] and s["near"] == [want_near, 3 * c["trials"]]
    assert [s["by_base"][f"base{b}"]["far"][0] for b in range(3)] == [sum(k[:4]) for k in correct]


def test_study_tables_mark_rows_chosen_after_the_report(tmp_path, monkeypatch):
    """The markdown holds pooled and per-base tables for both sets, the pooled interval, the token
    share, and marks a row chosen after the report set was seen."""
    by_depth = {(f"base{b}", name, split, length): [1.0, 0.5, 0.0, 0.0, 1.0]
                for b in range(3) for name in ("ttt_only", "ttt_mlp_in") for split in ("dev", "report")
                for length in (1024, 2048)}
    results = synthetic_study(by_depth)
    results["summary"] = sweep.study_summary(results)
    rows = sweep.study_rows(results["config"])
    chosen = [sweep.dataclasses.replace(r, chosen_after_report=r.name == "ttt_mlp_in") for r in rows]
    monkeypatch.setattr(sweep, "study_rows", lambda c: chosen)
    monkeypatch.setattr(sweep, "_pyplot", lambda: None)
    sweep.tables_study(results, str(tmp_path / "study"))
    text = (tmp_path / "study.md").read_text()
    assert text.count("### Pooled over the bases") == 2 and text.count("### base") == 3
    low, high = sweep.wilson(0.375, 240)  # far at 1024: (20 + 10 + 0 + 0) / 80 per base
    assert f"38% ({100 * low:.0f}-{100 * high:.0f})" in text
    assert "4.92 M (8.3%)" in text
    mlp_in = next(r.label for r in chosen if r.name == "ttt_mlp_in")
    assert f"| {mlp_in} † |" in text and "† chosen after the report set's results were seen" in text


def test_run_jobs_order_logs_affinity_and_failure(tmp_path):
    """Jobs wait for the job they name, run pinned to their share of the cores with their output
    in their log; after a failure no job starts and the failed command comes back."""
    py = lambda code: [sys.executable, "-c", code]
    write = lambda path: py(f"import os; open({str(path)!r}, 'a').write(str(sorted(os.sched_getaffinity(0))))")
    order, log = [], lambda n: str(tmp_path / f"{n}.log")
    jobs = [dict(name="a", after=None, log=log("a"), commands=[py("import time; time.sleep(0.5); print('A')")]),
            dict(name="b", after="a", log=log("b"), commands=[write(tmp_path / "b.cpus"), py("print('B2')")]),
            dict(name="c", after=None, log=log("c"), commands=[py("print('C')")])]
    failed = sweep.run_jobs(jobs, 2, on_done=lambda job, seconds: order.append(job["name"]))
    assert not failed and order.index("a") < order.index("b") and set(order) == {"a", "b", "c"}
    assert open(log("a")).read().startswith("$ ") and "A" in open(log("a")).read()
    assert "B2" in open(log("b")).read()
    cores = sorted(os.sched_getaffinity(0))
    pinned = json.loads(open(tmp_path / "b.cpus").read())
    assert set(pinned) <= set(cores) and len(pinned) == max(1, len(cores) // 2)
    order.clear()
    jobs = [dict(name="x", after=None, log=log("x"), commands=[py("import sys; sys.exit(3)"), py("print('never')")]),
            dict(name="y", after="x", log=log("y"), commands=[py("print('Y')")])]
    failed = sweep.run_jobs(jobs, 1, on_done=lambda job, seconds: order.append(job["name"]))
    assert failed == [" ".join(jobs[0]["commands"][0])] and order == [] and not os.path.exists(log("y"))
    assert "never" not in open(log("x")).read()
    assert sweep.run_jobs(jobs[:1], 1, on_done=lambda job, seconds: order.append(job["name"]), stop_at=0) == []
    assert order == [] and "never" not in open(log("x")).read()  # past stop_at (--stop-after): nothing starts
    at = lambda minutes: sweep.stop_time(argparse.Namespace(stop_after=minutes), 100.0)
    assert (at(None), at(0), at(0.5)) == (math.inf, 100.0, 130.0)  # --stop-after 0: no job starts


@FAST
@given(length=st.integers(110, 3000), depth=st.floats(0, 1), window=st.integers(1, 3000))
def test_final_table_far_needles_lie_wholly_outside_the_window(length, depth, window):
    """train.py's final table calls a needle far when no byte of it is inside the attention window
    of any answer position: checked on the document itself, byte by byte, with moshi's window rule
    (a query at t sees keys at t - window + 1 .. t; the answer digits are predicted from the
    positions before each of them)."""
    doc, at, answer = data.passkey_document(length, depth, 12345, b"x" * length)
    needle_bytes = range(at, at + len(data.needle(12345)))
    queries = range(answer - 1, length - 1)
    visible = any(q - window < k <= q for q in queries for k in needle_bytes)
    assert eval_passkey.is_far(length, depth, window) == (not visible)
    assert not eval_passkey.is_far(length, depth, None)


@FAST
@given(n=st.integers(1, 400), data_=st.data())
def test_final_table_interval_matches_sweeps(n, data_):
    """The final table's Wilson interval (from counts) equals sweep.py's (from a proportion), and
    always holds the observed proportion."""
    k = data_.draw(st.integers(0, n))
    low, high = eval_passkey.wilson(k, n)
    assert (low, high) == pytest.approx(sweep.wilson(k / n, n), abs=1e-12)
    assert low - 1e-12 <= k / n <= high + 1e-12


@FAST
@given(dim=st.sampled_from([16, 32, 64, 128]), L=st.integers(128, 8192), base=st.sampled_from([1e3, 1e4, 1e5]))
def test_yarn_beta_fast_like_moshi_keeps_moshis_share(dim, L, base):
    """beta_fast_like_moshi: the largest of 32, 16, ..., 2 under which at least Moshi 7B's share of
    pairs (19 of 64 at the paper's 32) turns at least beta_fast times over L0, counted from the
    turn counts L0 theta_i / 2 pi directly; Moshi 7B itself keeps the paper's 32."""
    def kept(beta):
        return sum(L * base ** (-2 * i / dim) / (2 * math.pi) >= beta for i in range(dim // 2))
    share = 19 / 64
    beta = yarn.beta_fast_like_moshi(dim, base, L)
    larger = [b for b in (32.0, 16.0, 8.0, 4.0, 2.0) if b > beta]
    assert all(kept(b) < share * dim / 2 for b in larger)
    assert beta == 1.5 or kept(beta) >= share * dim / 2
    assert yarn.beta_fast_like_moshi(128, 1e4, 3000) == 32.0 and yarn.beta_fast_like_moshi(32, 1e4, 128) == 2.0


def test_final_table_control_is_the_model_without_its_fast_weights():
    """The TTT control row sets eta to 0 on a copy of the trained model. With ttt_only, that copy
    computes exactly the base model with the same RoPE: nothing else was trained."""
    torch.manual_seed(0)
    base = tiny_model()
    trained = M.install(copy.deepcopy(base), dict(ttt=dict(layers=[0, 1], chunk_size=16, eta=0.5)))
    for m in freeze.ttt_modules(trained):  # as if trained: targets that really update the fast weight
        with torch.no_grad():
            m.conv.weight.normal_(0, 0.5)
    tokens = torch.randint(0, 256, (2, 64))
    assert not torch.allclose(M.logits(trained, tokens), M.logits(base, tokens))
    for m in freeze.ttt_modules(trained):
        m.eta = 0.0
    torch.testing.assert_close(M.logits(trained, tokens), M.logits(base, tokens), atol=1e-5, rtol=1e-5)


@FAST
@given(max_depth=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_training_needles_stay_within_max_depth(max_depth, seed):
    """--passkey-max-depth: every training needle starts at most max_depth of the filler span in,
    i.e. at least (1 - max_depth) of the span before the question."""
    corpus = np.frombuffer(bytes(range(97, 123)) * 200, dtype=np.uint8)
    tokens, _ = data.training_batch(corpus, 400, 6, 1.0, torch.Generator().manual_seed(seed), max_depth)
    span = 401 - (len(data.needle(10000)) + len(data.question()) + data.KEY_DIGITS)
    for row in tokens:
        at = bytes(row.tolist()).index(data.needle(10000)[:15])
        assert at <= round(max_depth * span)


def test_draw_seeds_are_the_seeds_evaluate_draws_with(monkeypatch):
    """eval_passkey.draw_seeds lists exactly the generator seeds that evaluate seeds (recorded while it
    runs), so sweep's refusal of an --eval-seed whose documents overlap another's sees what runs."""
    seen = []

    class Recorded(torch.Generator):
        def manual_seed(self, seed):
            seen.append(seed)
            return super().manual_seed(seed)

    monkeypatch.setattr(torch, "Generator", Recorded)
    corpus = data.load_corpus()
    eval_passkey.evaluate(tiny_model(), corpus.val, [128, 256], [0.0, 0.5, 1.0], 1, 1, "cpu", seed=eval_passkey.EVAL_SEED)
    assert set(seen) == eval_passkey.draw_seeds(eval_passkey.EVAL_SEED, [128, 256], 3) and len(seen) == 8


def test_bits_per_byte_of_uniform_model_is_8():
    m = tiny_model()
    torch.nn.init.zeros_(m.text_linear.weight)  # constant logits: the uniform distribution
    corpus = data.load_corpus()
    assert eval_passkey.bits_per_window(m, corpus.val, 64, 4, 0, "cpu") == pytest.approx([8.0] * 4, abs=1e-5)


@settings(max_examples=8, deadline=None)
@given(windows=st.integers(1, 7), batch=st.integers(1, 4), seed=st.integers(0, 2 ** 31))
def test_bits_per_window_are_each_windows_own_loss(windows, batch, seed):
    """Each window's bits per byte, batched, equal the window scored alone by a float64 log-softmax
    (an independent loss), in the order drawn."""
    m = tiny_model()
    corpus = data.load_corpus()
    bits = eval_passkey.bits_per_window(m, corpus.val, 64, windows, seed, "cpu", batch=batch)
    tokens = data.random_windows(corpus.val, 65, windows, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for got, x in zip(bits, tokens, strict=True):
            logp = torch.log_softmax(M.logits(m.eval(), x[None, :-1])[0].double(), -1)
            want = -logp.gather(1, x[1:, None]).mean().item() / math.log(2)
            assert got == pytest.approx(want, rel=1e-5)


@settings(max_examples=20, deadline=None)
@given(few=st.integers(0, 16), more=st.integers(0, 112), seed=st.integers(0, 2 ** 62))
def test_a_larger_draw_of_windows_begins_with_the_smaller_one(few, more, seed):
    """Windows are drawn prefix-stable: an evaluation of many windows scores, first, the windows one of
    fewer drew with the same seed (what pairs a 128-window run with a sweep's 16)."""
    corpus = data.load_corpus()
    small = data.random_windows(corpus.val, 33, few, torch.Generator().manual_seed(seed))
    large = data.random_windows(corpus.val, 33, few + more, torch.Generator().manual_seed(seed))
    assert torch.equal(large[:few], small)


@pytest.mark.parametrize("window,piece", [(128, 50), (40, 256), (40, 7)])
def test_streaming_passkey_decoding_equals_parallel_greedy(window, piece):
    """With a window shorter than the document too (the ring KV cache wraps while the prompt is
    fed), streaming decoding equals greedy decoding on the parallel form with the same window."""
    m = tiny_model(context=64)
    yarn.apply_yarn(m, 2.0, 64, widen_context=False)
    M.set_context(m, window)
    ttt.apply_ttt(m, [1, 3], chunk_size=16, eta=0.5)
    randomise_ttt(m)
    with torch.no_grad():
        m.text_linear.weight[48:58] += 0.5
    corpus = data.load_corpus()
    tokens, _ = data.passkey_batch(corpus.val, 128, 3, torch.Generator().manual_seed(1))
    got = eval_passkey.streaming_greedy(m, tokens[:, :-5], 5, piece=piece)
    prompt = tokens[:, :-5]
    with torch.no_grad():
        for _ in range(5):
            prompt = torch.cat([prompt, M.logits(m, prompt)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, prompt[:, -5:])


def test_teacher_forced_passkey_equals_greedy_decoding():
    """The one-pass check must agree with decoding digit by digit (greedy), the protocol itself."""
    m = tiny_model()
    with torch.no_grad():  # bias the output towards digits so greedy decoding produces some
        m.text_linear.weight[48:58] += 0.5
    corpus = data.load_corpus()
    tokens, keys = data.passkey_batch(corpus.val, 128, 6, torch.Generator().manual_seed(0))
    one_pass = M.logits(m, tokens[:, :-1])[:, -5:].argmax(-1)
    for i in range(len(tokens)):
        prompt = tokens[i:i + 1, :-5]
        decoded = []
        for _ in range(5):
            nxt = M.logits(m, prompt)[:, -1].argmax(-1)
            decoded.append(int(nxt))
            prompt = torch.cat([prompt, nxt[:, None]], dim=1)
        exact = decoded == tokens[i, -5:].tolist()
        assert exact == bool((one_pass[i] == tokens[i, -5:]).all())
        assert decoded[0] == int(one_pass[i, 0])


# ============================================================================================
# Checkpoints, command lines and training
# ============================================================================================

def test_checkpoint_roundtrip_and_refusals(tmp_path):
    m = tiny_model()
    yarn.apply_yarn(m, 2.0, 32)
    ttt.apply_ttt(m, [1], chunk_size=8, eta=0.5)
    randomise_ttt(m)
    m.transformer.layers[1].gating.eta = 0.5
    settings = dict(model=TINY, original_len=32, yarn=m.yarn_settings,
                    ttt=dict(m.ttt_settings, eta=0.5), ttt_rope_modulo=False, window=None)
    path = str(tmp_path / "c.pt")
    checkpoints.save_checkpoint(path, dict(model=m.state_dict(), settings=settings))
    loaded = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path)).eval()
    x = torch.randint(0, 256, (2, 40))
    assert torch.equal(M.logits(loaded, x), M.logits(m, x))
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"model": Evil(), "settings": {}}))
    with pytest.raises(ValueError, match="cannot be read"):
        checkpoints.load_checkpoint(str(evil))
    truncated = tmp_path / "t.pt"
    truncated.write_bytes(open(path, "rb").read()[:100])
    with pytest.raises(ValueError, match="cannot be read"):
        checkpoints.load_checkpoint(str(truncated))
    with pytest.raises(ValueError, match="does not exist"):
        checkpoints.load_checkpoint(str(tmp_path))
    other = dict(settings, model=dict(TINY, dim=64, num_heads=2))
    checkpoints.save_checkpoint(str(tmp_path / "o.pt"), dict(model=m.state_dict(), settings=other))
    with pytest.raises(ValueError, match="does not match"):
        checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(tmp_path / "o.pt")))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_checkpoint_is_mapped_not_read_and_a_save_over_it_leaves_what_was_loaded(tmp_path):
    """load_checkpoint maps the file (its weights are read only when used, so a refusal that needs the
    settings alone comes first); saving a new checkpoint at the same path (save_checkpoint: a temporary
    file, then a rename, as --resume's stage ends do) leaves the loaded tensors as they were."""
    path = str(tmp_path / "ckpt.pt")
    weight = torch.randn(256, 256)
    checkpoints.save_checkpoint(path, dict(model=dict(w=weight.clone()), settings=dict(a=1)))
    loaded = checkpoints.load_checkpoint(path)
    assert os.path.realpath(path) in open("/proc/self/maps").read()
    checkpoints.save_checkpoint(path, dict(model=dict(w=torch.zeros(256, 256)), settings=dict(a=2)))
    assert torch.equal(loaded["model"]["w"], weight) and loaded["settings"] == dict(a=1)
    assert checkpoints.load_checkpoint(path)["settings"] == dict(a=2)


def test_official_recipe_sets_the_official_values_and_flags_override():
    args, _ = config.parse_args(["--recipe", "official", "--init", "x.pt"])
    assert (args.ttt_eta, args.ttt_chunk, args.ttt_layers, args.mode) == (3.0, None, "official", "full")
    assert (args.lr, args.lr_ttt, args.weight_decay, args.ttt_weight_decay) == (5e-6, 5e-6, 0.1, 0.1)
    assert (args.warmup, args.clip, args.grad_clip) == (0.02, "global", 1.0)
    args, _ = config.parse_args(["--recipe", "official", "--init", "x.pt", "--ttt-eta", "1", "--ttt-chunk", "64",
                                 "--mode", "ttt_only"])
    assert (args.ttt_eta, args.ttt_chunk, args.mode, args.lr) == (1.0, 64, "ttt_only", 5e-6)
    assert config.parse_args([])[0].ttt_eta == 0.3


@FAST
@given(values=st.lists(st.floats(0, 100), min_size=1, max_size=5))
def test_bootstrap_over_bases_spans_the_bases(values):
    """The mean over bases, inside an interval that lies within the bases' own range, and that is
    the whole range when both extremes can be drawn alone (3 bases: 1 in 27 draws each)."""
    mean, lo, hi = sweep.bootstrap_over_bases(values)
    assert mean == pytest.approx(sum(values) / len(values))
    assert min(values) - 1e-9 <= lo <= mean + 1e-9 and mean - 1e-9 <= hi <= max(values) + 1e-9
    if len(values) == 3:
        assert (lo, hi) == (pytest.approx(min(values)), pytest.approx(max(values)))


@FAST
@given(diffs=st.integers(1, 4).flatmap(lambda w: st.lists(st.lists(st.floats(-2, 2), min_size=w, max_size=w),
                                                          min_size=1, max_size=4)),
       seed=st.integers(0, 100))
def test_bootstrap_over_bases_and_windows(diffs, seed):
    """The two-way bootstrap: the plain mean, inside an interval within the values' range; each draw
    the mean over the drawn bases' drawn windows (a loop over 40 draws, the same index draws); and,
    where a base's windows agree, the bases' own bootstrap (the windows add nothing)."""
    flat = [v for row in diffs for v in row]
    mean, lo, hi = sweep.bootstrap_over_bases_and_windows(diffs, seed=seed)
    assert mean == pytest.approx(sum(flat) / len(flat))
    assert min(flat) - 1e-9 <= lo <= mean + 1e-9 and mean - 1e-9 <= hi <= max(flat) + 1e-9
    g = torch.Generator().manual_seed(seed)
    bases = torch.randint(len(diffs), (40, len(diffs)), generator=g).tolist()
    windows = torch.randint(len(diffs[0]), (40, len(diffs[0])), generator=g).tolist()
    loop = sorted(sum(diffs[b][w] for b in bs for w in ws) / (len(bs) * len(ws)) for bs, ws in zip(bases, windows))
    _, lo40, hi40 = sweep.bootstrap_over_bases_and_windows(diffs, draws=40, seed=seed)
    want = torch.tensor(loop, dtype=torch.float64)
    assert (lo40, hi40) == (pytest.approx(want.quantile(0.025).item()), pytest.approx(want.quantile(0.975).item()))
    per_base = [row[0] for row in diffs]
    flat_rows = [[v] * len(row) for v, row in zip(per_base, diffs)]
    assert sweep.bootstrap_over_bases_and_windows(flat_rows, seed=seed) == pytest.approx(
        sweep.bootstrap_over_bases(per_base, seed=seed))


def test_far_retrieval_by_distance_groups_each_needle_by_how_far_back_it_lies(tmp_path):
    """sweep.far_by_distance: a needle at depth p of L bytes lies (1 - p) L / W windows back; the
    needles of two lengths that lie equally far back share a line (worked by hand); and the horizon's
    markdown holds that table, a base's value "-" where the row did not run on it."""
    rows = [dict(length=1024, by_depth=[1.0, 0.5, 0.25]), dict(length=2048, by_depth=[0.75, 0.5, 0.0])]
    got = sweep.far_by_distance(rows, [0.0, 0.25, 0.5], 256)
    assert got == {2: {1024: 0.25}, 3: {1024: 0.5}, 4: {1024: 1.0, 2048: 0.0}, 6: {2048: 0.5}, 8: {2048: 0.75}}
    assert list(got) == sorted(got)
    # (1 - 0.1) 1024 / 256 and (1 - 0.55) 2048 / 256 are both 3.6 windows, though not in floating point
    got = sweep.far_by_distance([dict(length=1024, by_depth=[1.0]), dict(length=2048, by_depth=[0.0])], [0.1], 256)
    assert got == {3.6: {1024: 1.0}, 7.2: {2048: 0.0}}
    got = sweep.far_by_distance([dict(length=1024, by_depth=[1.0, 0.5]), dict(length=2048, by_depth=[0.5, 0.0])],
                                [0.1, 0.55], 256)
    assert got[3.6] == {1024: 1.0, 2048: 0.0}
    with pytest.raises(ValueError):  # a row with fewer depths than the configuration's
        sweep.far_by_distance([dict(length=1024, by_depth=[1.0])], [0.0, 0.5], 256)
    c = dict(sweep.PRESETS_HORIZON["cpu"], lengths=[1024, 2048], horizon_depths=[0.0, 0.25, 0.5], window=256,
             hardware="CPU", torch="x", seed=0)
    evaluated = [dict(r, passkey=sum(r["by_depth"]) / 3, bpb=1.0) for r in rows]
    results = dict(config=c, rows=dict(base0=dict(control=evaluated), base1=dict()), streaming={}, probe={})
    sweep.tables_horizon(results, str(tmp_path / "h"))
    md = open(tmp_path / "h.md").read()
    assert "| control | 4 W | 100% / - | 0% / - |" in md and "| control | 6 W |  | 50% / - |" in md


def test_horizon_tables_set_each_row_against_the_same_row_without_memory(tmp_path):
    """The horizon's markdown: a row with memory minus the same row without it (eta 0), per base and
    length, worked by hand; "-" on a base where either did not run."""
    c = dict(sweep.PRESETS_HORIZON["cpu"], lengths=[1024, 2048], horizon_depths=[0.0, 0.25, 0.5], window=256,
             hardware="CPU", torch="x", seed=0)
    run = lambda *bpb: [dict(length=L, by_depth=[0.0, 0.0, 0.0], passkey=0.0, bpb=v) for L, v in zip([1024, 2048], bpb)]
    memory, none = "ttt_mlp_in_delta1_then_long4", "ttt_mlp_in_delta1_eta0_then_long4"
    rows = dict(base0={memory: run(1.0, 1.25), none: run(1.5, 1.0)}, base1={memory: run(2.0, 2.0)})
    sweep.tables_horizon(dict(config=c, rows=rows, streaming={}, probe={}), str(tmp_path / "h"))
    md = open(tmp_path / "h.md").read()
    label = {r.name: r.label for r in sweep.horizon_rows(c)}[memory]
    assert "### With memory against the same row without it" in md
    assert f"| {label} | -0.500 / - | +0.250 / - |" in md


def test_horizon_tables_pair_each_row_with_its_control_on_the_same_windows(tmp_path):
    """Where every base kept each window's bits per byte, the markdown has the row minus its control
    pooled over bases and windows, its mean worked by hand; without them (older JSONs) it has none."""
    c = dict(sweep.PRESETS_HORIZON["cpu"], lengths=[1024], horizon_depths=[0.0, 0.25, 0.5], window=256,
             hardware="CPU", torch="x", seed=0)
    run = lambda *bits: [dict(length=1024, by_depth=[0.0] * 3, passkey=0.0, bpb=sum(bits) / 2, bpb_windows=list(bits))]
    row, ctl = "ttt_lora_all_rank4_delta1_then_long4", "control_then_long4"
    rows = dict(base0={row: run(1.0, 1.5), ctl: run(1.25, 1.0)}, base1={row: run(2.0, 2.0), ctl: run(1.5, 2.5)})
    sweep.tables_horizon(dict(config=c, rows=rows, streaming={}, probe={}), str(tmp_path / "h"))
    md = open(tmp_path / "h.md").read()
    label = {r.name: r.label for r in sweep.horizon_rows(c)}[row]
    assert "### Against the control on the same validation windows" in md
    assert f"| {label} | +0.062 [" in md  # (-0.25 + 0.5 + 0.5 - 0.5) / 4
    for runs in rows.values():
        for r in runs.values():
            del r[0]["bpb_windows"]
    sweep.tables_horizon(dict(config=c, rows=rows, streaming={}, probe={}), str(tmp_path / "h"))
    assert "same validation windows" not in open(tmp_path / "h.md").read()


def test_paired_eval_files_pool_a_row_against_its_control_over_bases_and_windows(tmp_path):
    """sweep.py --paired: eval_passkey.py JSONs, one per base, of a control then a TTT checkpoint on the
    same windows; per base (a bootstrap over its windows) and pooled (over bases and windows), the row
    minus the control per window, worked by hand with the intervals' extremes, which only the two
    windows of a base drawn alike reach; with --split, the first windows and the rest apart. Refused in
    one line, exit 2, nothing written: a file of another draw, one whose two checkpoints saw other
    windows, the control second, no per-window bits, a base twice, a flag it would not use, a split that
    leaves no window on one side, --split without --paired."""
    def eval_json(name, control_bits, row_bits, seed=7, row_seed=None, per_window=True):
        def run(ttt, bits, seed):
            row = dict(length=1024, passkey=float(ttt is not None), bpb=sum(bits) / len(bits), bpb_windows=list(bits))
            if not per_window:
                del row["bpb_windows"]
            return dict(checkpoint=f"{name}/{ttt is not None}.pt", settings=dict(window=256, ttt=ttt), seed=seed,
                        windows=len(bits), trials=1, depths=[0.5], corpus_sha256="ab" * 32, rows=[row])
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(dict(checkpoints=[run(None, control_bits, seed),
                                                     run({"eta": 1}, row_bits, row_seed or seed)])))
        return str(path)
    a, b = eval_json("base0", (1.25, 1.0), (1.0, 1.5)), eval_json("base1", (1.5, 2.5), (2.0, 2.0))
    out = str(tmp_path / "pair")
    subprocess.run([sys.executable, "sweep.py", "--paired", f"{a},{b}", "--out", out], cwd=HERE, check=True,
                   capture_output=True)
    md = open(out + ".md").read()
    # base 0's windows differ by -0.25 and +0.5: mean 0.125, a draw of either window twice the extremes
    assert "| base0: row minus control | +0.125 [-0.250, +0.500] |" in md
    assert "| base1: row minus control | +0.000 [-0.500, +0.500] |" in md  # +0.5 and -0.5
    # pooled (-0.25 + 0.5 + 0.5 - 0.5) / 4; the extremes: a base drawn twice, one of its windows twice (1 in 16)
    assert "| pooled over 2 bases: row minus control | +0.062 [-0.500, +0.500] |" in md
    assert "| base0: bits per byte, control / row | 1.1250 / 1.2500 |" in md
    assert "| base0: passkeys found, control / row | 0 / 1 of 1 |" in md
    assert "the first" not in md
    three = eval_json("three0", (1.0,) * 3, (1.25, 1.5, 1.5)), eval_json("three1", (1.0,) * 3, (0.75, 1.5, 1.5))
    subprocess.run([sys.executable, "sweep.py", "--paired", ",".join(three), "--split", "1", "--out", out],
                   cwd=HERE, check=True, capture_output=True)
    md = open(out + ".md").read()  # the first window: +0.25 and -0.25 on the two bases; the other two: +0.5
    assert "| pooled, the first 1 window: row minus control | +0.000 [-0.250, +0.250] |" in md
    assert "| pooled, the other 2 windows: row minus control | +0.500 [+0.500, +0.500] |" in md
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(dict(checkpoints=json.load(open(a))["checkpoints"][::-1])))
    refused = [f"{a},{eval_json('other', (1.0, 1.0), (1.0, 1.0), seed=8)}",
               eval_json("mixed", (1.0, 1.0), (1.0, 1.0), row_seed=8), str(swapped),
               eval_json("old", (1.0, 1.0), (1.0, 1.0), per_window=False), f"{a},{b},{a}"]
    for argv in [["--paired", files] for files in refused] + [["--paired", a, "--work", str(tmp_path)],
                                                              ["--paired", three[0], "--split", "3"],
                                                              ["--paired", a, "--split", "0"], ["--split", "1"]]:
        r = subprocess.run([sys.executable, "sweep.py", *argv, "--out", str(tmp_path / "no")],
                           cwd=HERE, capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--paired" in r.stderr, argv
        assert not os.path.exists(tmp_path / "no.md")


@pytest.mark.parametrize("argv", [
    ["--scale", "0.5"], ["--mode", "lora"], ["--ttt-chunk", "0"], ["--ttt-eta", "-1"],
    ["--original-len", "0"], ["--ttt-layers", "a,b"], ["--ttt-layers", "none"], ["--batch", "3", "--grad-accum", "2"],
    ["--method", "none", "--yarn-beta-fast", "4"], ["--method", "pi", "--yarn-beta-fast", "4"],
    ["--passkey-share", "2"], ["--window", "-1"], ["--ttt-kernel", "4"], ["--lr", "nan"], ["--scale", "inf"],
    ["--steps", "x"], ["--seed", "-1"], ["--frobnicate"],
    ["--passkey-max-depth", "1.5"], ["--ttt-target-std", "-0.1"], ["--lr-ttt", "1e38"],
    ["--warmup", "1"], ["--warmup", "50"], ["--fsdp", "--init", "a.pt"], ["--ttt-decay", "0"], ["--ttt-decay", "1.5"],
    ["--ttt-update-clip", "-1"], ["--ttt-update-clip", "nan"], ["--ttt-average-after", "-1"],
    ["--ttt-average-after", "1.5"], ["--ttt-delta", "-0.1"], ["--ttt-delta", "1.5"],
    ["--ttt-delta", "0.5", "--ttt-decay", "0.9"], ["--ttt-delta", "0.5", "--ttt-average-after", "4"],
    ["--ttt-decay", "0.9"], ["--ttt-average-after", "4"],  # with the default erase: --ttt-delta 0 is needed
    ["--grad-clip", "0"], ["--device", "bogus"], ["--device", "meta"], ["--recipe", "official"],
    ["--ttt-layers", "0,0"],
])
def test_train_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        config.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and len(err[0]) > 25, err


@pytest.mark.parametrize("argv", [["--depths", "0,2"], ["--trials", "0"], ["--lengths", "10"],
                                  ["--scale", "2"], ["--method", "rope"], ["--lengths", "a"],
                                  ["--method", "yarn", "--dynamic", "--streaming"], ["--ttt-decay", "0"],
                                  ["--ttt-update-clip", "-0.5"], ["--ttt-average-after", "-2"],
                                  ["--ttt-delta", "2"], ["--beta-fast", "4"], ["--method", "pi", "--beta-fast", "4"],
                                  ["--method", "yarn", "--beta-fast", "0.5"], ["--seed", "5"],
                                  ["--seed", str(2 ** 63)], ["--method", "yarn", "--scale", "inf"],
                                  ["--device", "bogus"], ["--device", "mps"], ["--method", "none", "--scale", "2"],
                                  ["--method", "none", "--dynamic"]])
def test_eval_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        eval_passkey.parse_args(["x.pt"] + argv)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_eval_default_outputs_differ_with_every_flag_that_changes_the_evaluation():
    """Two evaluations of one checkpoint that differ in the RoPE or TTT flags write two files (YaRN x2
    and x4 once wrote the same one)."""
    variants = [[], ["--method", "yarn"], ["--method", "yarn", "--scale", "2"], ["--method", "yarn", "--scale", "4"],
                ["--method", "yarn", "--dynamic"], ["--method", "yarn", "--scale", "2", "--streaming"],
                ["--method", "yarn", "--beta-fast", "4"], ["--method", "pi", "--scale", "2"], ["--ttt-decay", "0.9"],
                ["--ttt-update-clip", "1"], ["--ttt-average-after", "4"], ["--ttt-delta", "0"], ["--streaming"]]
    names = [eval_passkey.default_out("run/ckpt.pt", eval_passkey.parse_args(["run/ckpt.pt"] + v)[0]) for v in variants]
    assert len(set(names)) == len(names) and all(n.startswith("run/ckpt") for n in names), names


def test_ttt_layers_are_a_set_in_order():
    """--ttt-layers 2,0 is the run of 0,2 (stored so, so --init and --resume compare the same layers)."""
    assert config.parse_args(["--ttt-layers", "2,0"])[0].ttt_layers == [0, 2]
    assert config.parse_args(["--ttt-layers", "2,0"])[1]["ttt_layers"] == [0, 2]


def test_a_run_that_stored_its_layers_unsorted_takes_the_same_flag(tmp_path):
    """A run written before --ttt-layers was read as a set may store [1, 0]: --resume and --init with
    that flag (now read as [0, 1]) are the same run, not a contradiction."""
    out = tmp_path / "run"
    assert run_train(QUICK + ["--ttt-layers", "0,1", "--out", str(out)]).returncode == 0
    for name in ("ckpt.pt", "adapter.pt"):
        checkpoint = checkpoints.load_checkpoint(str(out / name))
        checkpoint["settings"]["ttt"]["layers"] = [1, 0]
        if "config" in checkpoint:
            checkpoint["config"]["ttt_layers"] = [1, 0]
        checkpoints.save_checkpoint(str(out / name), checkpoint)
    for argv in (["--resume", "--out", str(out)], ["--init", str(out / "ckpt.pt"), "--scale", "4", "--out",
                                                   str(tmp_path / "more")]):
        r = run_train(argv + ["--ttt-layers", "1,0"] + (["--steps", "1"] if "--init" in argv else []))
        assert r.returncode == 0, (argv, r.stderr[-300:])


def test_help_of_every_script_prints_and_exits_0():
    """--help formats every flag's help (a bare % in one once made train.py --help a traceback)."""
    for script in ("train.py", "eval_passkey.py", "sweep.py", "bench.py", "encode_dataset.py"):
        r = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True,
                           cwd=HERE, timeout=300)
        assert r.returncode == 0 and r.stdout.startswith("usage: ") and not r.stderr, (script, r.stderr[-300:])


@FAST
@given(steps=st.integers(1, 3000), fraction=st.floats(0, 0.99))
def test_every_stage_reaches_its_peak_then_decays(steps, fraction):
    """The learning rate of a stage of any length: linear warmup over ceil(fraction x steps)
    steps reaches the peak exactly, then never rises again, ending at or above a tenth of it."""
    lrs = [train.lr_at(s, steps, 1.0, fraction) for s in range(steps)]
    top = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1.0) and top == max(0, math.ceil(fraction * steps) - 1)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[top:], lrs[top + 1:]))
    assert min(lrs[top:]) >= 0.1 - 1e-12
    if steps - top > 2:
        assert lrs[-1] < 1.0


ALONE = {  # each concept file in a folder of its own, its usage as its docstring shows it
    "yarn.py": "yarn.apply_yarn(model, scale=4, original_len=3000)\n"
               "assert model.transformer.layers[0].self_attn.context == 12000",
    "ttt.py": "ttt.apply_ttt(model, layers=ttt.default_layers(len(model.transformer.layers)), chunk_size=1024, eta=0.3)\n"
              "assert torch.equal(model.forward_text(tokens)[1], before)",
    "rope_modulo.py": "Z = torch.randn(2, 4096, 64)\n"
                      "Zr = rope_modulo.rotate_modulo(Z, torch.arange(4096), period=1024)\n"
                      "assert torch.allclose(Zr[:, 1024:2048], rope_modulo.rotate_modulo(Z[:, 1024:2048], torch.arange(1024), 1024))\n"
                      "try:\n    rope_modulo.apply_rope_modulo(model, period=1024)\nexcept ValueError as e:\n"
                      "    assert 'no TTT layer' in str(e)  # nothing silently done on a model without TTT\n"
                      "else:\n    raise AssertionError",
    "freeze.py": "freeze.apply_lora(model, rank=2, scaling=2.0)\n"
                 "assert torch.equal(model.forward_text(tokens)[1], before) and freeze.lora_modules(model)",
    "window_attention.py": "window_attention.apply_window_attention(model)\n"
                           "with torch.no_grad():\n    assert torch.allclose(model.forward_text(tokens)[1], before, atol=1e-5)",
}


def test_scripts_keep_moshis_compile_off():
    """Each script but train.py (next test) turns moshi's torch.compile off (NO_TORCH_COMPILE, unless
    set) before moshi loads, whatever the order of its imports: compiling dominates small runs, and on
    torch 2.11 with CUDA the compiled RMSNorm's backward fails on the GPU preset
    (results/training_7b/gpu_preset_compile_failure_h100.log), which a new import of a moshi-importing
    file ahead of model.py once let through."""
    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    for script in ("eval_passkey", "sweep", "bench"):
        code = f"import {script}, moshi.modules.transformer as t; print(hasattr(t._rms_norm, '__wrapped__'))"
        r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and r.stdout.split() == ["False"], (script, r.stdout, r.stderr[-1000:])
    code = "import freeze, moshi.modules.transformer as t; print(hasattr(t._rms_norm, '__wrapped__'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.split() == ["True"], r.stderr[-1000:]  # the check sees moshi's compile when it is on


def test_moshi_compile_only_with_its_flag(tmp_path):
    """train.py loads moshi able to compile (NO_TORCH_COMPILE unset), and a run compiles nothing
    unless --moshi-compile: then moshi's kernels compile and the first step's loss is eager's (1e-5
    relative). Refused in one line, before any work: with NO_TORCH_COMPILE=1 in the environment,
    and where norms train (pretraining, --mode full, --mode ttt_layers)."""
    r = run_train(QUICK + ["--pretrain-only", "--out", str(tmp_path / "base")])
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "NO_TORCH_COMPILE"}
    base = ["--init", str(tmp_path / "base" / "base.pt"), "--steps", "1", "--eval-trials", "1", "--scale", "2",
            "--ttt-chunk", "32", "--batch", "4", "--log-every", "1"]
    code = ("import sys, train, moshi.modules.transformer as t\nfrom torch._dynamo.utils import counters\n"
            "train.main(sys.argv[1:])\nprint('wrapped', hasattr(t._rms_norm, '__wrapped__'), 'frames', "
            "sum(counters['frames'].values()))")
    losses = {}
    for flag in ([], ["--moshi-compile"]):
        r = subprocess.run([sys.executable, "-c", code] + base + flag + ["--out", str(tmp_path / f"run{len(flag)}")],
                           cwd=HERE, capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        words = r.stdout.split()
        assert words[-4:-2] == ["wrapped", "True"] and (int(words[-1]) > 0) == bool(flag), r.stdout[-500:]
        line = next(s for s in r.stdout.splitlines() if s.startswith("step 1/1 | stage 0"))
        losses[bool(flag)] = float(line.split("| loss ")[1].split()[0])
    assert abs(losses[True] - losses[False]) <= 1e-5 * abs(losses[False]), losses
    for extra, environment in (([], dict(os.environ, NO_TORCH_COMPILE="1")), (["--mode", "full"], env),
                               (["--mode", "ttt_layers"], env), (None, env)):
        args = QUICK + ["--moshi-compile", "--out", str(tmp_path / "bad")]
        args = args if extra is None else base + extra + ["--moshi-compile", "--out", str(tmp_path / "bad")]
        r = subprocess.run([sys.executable, os.path.join(HERE, "train.py")] + args, cwd=HERE, capture_output=True,
                           text=True, env=environment, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--moshi-compile" in lines[0], r.stderr[-1000:]
    assert not (tmp_path / "bad").exists()


def test_compile_layers_compiles_the_training_steps_alone(tmp_path):
    """train.py --compile-layers: each stage's training steps (two stages: dynamo compiles again for
    the second's YaRN and length) run through every layer compiled whole
    (model.compile_layers, here with AOT autograd's eager kernels, as inductor takes minutes on a
    CPU), the evaluations eager (the layers back to eager before each), and the steps' losses are
    eager's (1e-5 relative), with the first layer recomputed inside its compiled graph
    (--grad-checkpointing 1), and no warning of dynamo's about ttt's cached masks. Refused in one
    line, writing nothing, with --fsdp and on a CPU with bf16 weights (a Moshi-format model), where
    inductor's CPU code generation fails (torch 2.13)."""
    r = run_train(QUICK + ["--pretrain-only", "--out", str(tmp_path / "base")])
    assert r.returncode == 0, r.stderr
    base = ["--init", str(tmp_path / "base" / "base.pt"), "--steps", "1", "--eval-trials", "1", "--scale", "4",
            "--ttt-chunk", "32", "--batch", "4", "--log-every", "1", "--grad-checkpointing", "1"]
    code = ("import sys, train, model as M\nfrom torch._dynamo.utils import counters\n"
            "calls, compile_layers = [], M.compile_layers\n"
            "def recorded(model, on, **options):\n    calls.append(on)\n"
            "    compile_layers(model, on, **dict(options, backend='aot_eager') if on else options)\n"
            "M.compile_layers = recorded\ntrain.main(sys.argv[1:])\n"
            "print('calls', ','.join(map(str, calls)), 'frames', sum(counters['frames'].values()))")
    losses, runs = {}, {}
    for flag in ([], ["--compile-layers"]):  # both at once, a core each
        runs[bool(flag)] = subprocess.Popen(
            [sys.executable, "-c", code] + base + flag + ["--out", str(tmp_path / f"run{len(flag)}")], cwd=HERE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for flag, run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
        assert "lru_cache" not in stderr, stderr[-2000:]  # ttt's cached masks: made in the graph, no warning
        words = stdout.split()
        assert words[-3] == ("True,False,True,False" if flag else "False,False"), words[-4:]  # per stage
        assert (int(words[-1]) > 0) == flag, words[-4:]
        losses[flag] = [float(line.split("| loss ")[1].split()[0]) for line in stdout.splitlines()
                        if line.startswith("step ")]
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-5), losses
    make_moshi_format_model(tmp_path, dtype=torch.bfloat16, context=192)  # where inductor's CPU code fails
    moshi = ["--init", str(tmp_path / "model.safetensors"), "--init-config", str(tmp_path / "config.json"),
             "--data"] + [str(tmp_path / f"tokens{i}.npy") for i in range(3)] + [
             "--scale", "2", "--steps", "1", "--batch", "2", "--ttt-layers", "1", "--ttt-chunk", "32"]
    for bad in (base + ["--fsdp"], moshi):
        r = run_train(bad + ["--compile-layers", "--out", str(tmp_path / "bad")])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "--compile-layers" in lines[0], r.stderr[-1000:]
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", sorted(ALONE))
def test_concept_file_copies_alone(tmp_path, name):
    """Copied into an empty folder, with no other file of the project, a concept file imports
    (only the standard library, torch, numpy and moshi) and does what its usage says on a moshi model."""
    import shutil
    shutil.copy(os.path.join(HERE, name), tmp_path / name)
    module = name[:-3]
    code = (f"import os\nos.environ['NO_TORCH_COMPILE'] = '1'\nimport torch, {module}\n"
            "from moshi.models.lm import LMModel\ntorch.manual_seed(0)\n"
            "model = LMModel(delays=[0], n_q=0, dep_q=0, text_card=64, dim=32, num_heads=2, num_layers=2,\n"
            "                hidden_scale=4.125, norm='rms_norm_f32', positional_embedding='rope', gating='silu',\n"
            "                context=3000, causal=True).eval()\n"
            "tokens = torch.randint(0, 64, (1, 1, 40))\nbefore = model.forward_text(tokens)[1]\n"
            + ALONE[name] + "\nprint('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-1500:]


def run_train(args, nproc=1, env=None, timeout=600):
    """train.py with `args`; where they start with QUICK's pairs (or some of them), the options the
    rest names again replace QUICK's (train.py takes each option once), and with --init QUICK's
    pretraining steps are left out (train.py refuses them there: nothing is pretrained)."""
    n = 0
    while n < len(QUICK) and args[n:n + 2] == QUICK[n:n + 2]:
        n += 2
    rest = args[n:] + (["--pretrain-steps"] if "--init" in args else [])
    args = sweep.without(args[:n], rest) + args[n:]
    if nproc == 1:
        cmd = [sys.executable, os.path.join(HERE, "train.py")] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(HERE, "train.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)


QUICK = ["--original-len", "128", "--scale", "2", "--pretrain-steps", "6", "--steps", "4", "--batch", "4",
         "--eval-trials", "1", "--log-every", "1", "--ttt-chunk", "32", "--warmup", "0.3"]


def test_gradient_accumulation_is_one_step_on_the_whole_batch(tmp_path):
    """--grad-accum k: the k micro-steps' gradients add up to the whole batch's, so the first step's
    loss and TTT gradient norm (before clipping) are those of one pass over the batch."""
    r = run_train(QUICK + ["--pretrain-only", "--out", str(tmp_path / "base")])
    assert r.returncode == 0, r.stderr
    first = {}
    for k in (1, 4):
        r = run_train(QUICK + ["--init", str(tmp_path / "base" / "base.pt"), "--steps", "1", "--grad-accum", str(k),
                               "--out", str(tmp_path / f"k{k}")])
        assert r.returncode == 0, r.stderr
        line = next(s for s in r.stdout.splitlines() if s.startswith("step 1/1 | stage 0"))
        first[k] = float(line.split("| loss ")[1].split()[0]), float(line.split("ttt grad ")[1])
    assert abs(first[4][0] - first[1][0]) <= 1e-4 and first[4][1] == pytest.approx(first[1][1], rel=2e-3), first


def final_weights(out):
    return checkpoints.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"]


def test_train_bad_init_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.pt").write_bytes(b"")
    for init in [str(tmp_path), str(tmp_path / "missing.pt"), str(tmp_path / "empty.pt")]:
        r = run_train(QUICK + ["--init", init, "--out", str(out)])
        assert r.returncode == 2 and "checkpoint" in r.stderr.strip().splitlines()[-1], r.stderr
        assert "Traceback" not in r.stderr
    r = run_train(QUICK + ["--ttt-chunk", "256", "--out", str(out)])
    assert r.returncode == 2 and "--ttt-chunk" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_train_bad_data_and_checkpoints_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "short.txt").write_text("def f():\n    return 1\n" * 10)
    torch.save({"a": torch.zeros(2)}, str(tmp_path / "other.pt"))
    shapes = dict(model=dict(TINY, dim=64), original_len=128, yarn=None, ttt=None, window=None)
    torch.save({"model": tiny_model().state_dict(), "settings": shapes}, str(tmp_path / "shape.pt"))
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "cannot read"),
        (["--data", str(tmp_path / "empty.txt")], "empty"),
        (["--data", str(tmp_path / "latin1.txt")], "UTF-8"),
        (["--data", str(tmp_path / "short.txt")], "more text"),
        (["--init", str(tmp_path / "other.pt")], "not a checkpoint"),
        (["--init", str(tmp_path / "shape.pt")], "does not match"),
        (["--ttt-layers", "0,9"], "out of range"),
        (["--window", "32", "--ttt-chunk", "64"], "longer than --window"),
        (["--ttt-chunk", "300"], "longer than --window"),  # the default window, 2 L0 = 256
        (["--resume"], "does not exist"),
    ]
    resumable = tmp_path / "notresumable"
    resumable.mkdir()
    checkpoints.save_checkpoint(str(resumable / "ckpt.pt"), {"model": {}, "settings": shapes, "stage": 0})
    cases.append((["--resume", "--out", str(resumable)], "cannot be resumed"))
    for extra, message in cases:
        r = run_train(QUICK + extra + ([] if "--out" in extra else ["--out", str(out)]))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, r.stderr)
    assert not out.exists()


def test_train_lowers_loss_and_two_processes_equal_one(tmp_path, capsys):
    one = run_train(QUICK + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    losses = [float(l.split("loss ")[1].split()[0]) for l in one.stdout.splitlines() if l.startswith("step ")
              and "stage 0" in l]
    assert losses[-1] < losses[0] - 0.3
    assert "final table" in one.stdout and "ttt grad" in one.stdout
    assert "fast weights off, eta 0 (control)" in one.stdout  # ttt_only: nothing else trained
    two = run_train(QUICK + ["--out", str(tmp_path / "two")], nproc=2)
    assert two.returncode == 0, two.stderr
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # float32 sums in another order, amplified by Adam over 10 steps: ~2e-5 seen
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3, msg=k)
    logged = lambda r: [float(l.split("loss ")[1].split()[0]) for l in r.stdout.splitlines() if l.startswith("step ")]
    assert logged(one) == pytest.approx(logged(two), abs=2e-3)  # the global batch's loss is logged
    # the evaluation script reads the checkpoint as trained, and with another RoPE at inference
    for extra in ([], ["--method", "ntk", "--scale", "2"], ["--streaming"], ["--ttt-delta", "1", "--streaming"],
                  ["--method", "yarn", "--scale", "2", "--beta-fast", "4"]):
        out = str(tmp_path / f"eval{len(extra)}.json")
        eval_passkey.main([str(tmp_path / "one" / "ckpt.pt"), "--lengths", "128,256", "--trials", "2",
                           "--windows", "2", "--out", out] + extra)
        result = json.load(open(out))
        assert [r["length"] for r in result["rows"]] == [128, 256] and result["corpus_files"] > 100
        assert all(0 <= r["passkey"] <= 1 and r["bpb"] > 0 for r in result["rows"])
        assert (result["scale"], result["beta_fast"]) == {0: (None, None), 4: (2.0, None), 6: (2.0, 4.0)}.get(
            len(extra), (None, None))  # what was used, not what the flags left out
    with pytest.raises(SystemExit) as e:  # the delta rule with forgetting at inference: refused, nothing written
        eval_passkey.main([str(tmp_path / "one" / "ckpt.pt"), "--ttt-delta", "1", "--ttt-decay", "0.9", "--out",
                           str(tmp_path / "refused.json")])
    assert e.value.code == 2 and not (tmp_path / "refused.json").exists()
    # several checkpoints: one table on the same documents, each as it evaluates alone; a bad one refused first
    capsys.readouterr()
    both = [str(tmp_path / "one" / "base.pt"), str(tmp_path / "one" / "ckpt.pt")]
    eval_passkey.main(both + ["--lengths", "128,256", "--trials", "2", "--windows", "2",
                              "--out", str(tmp_path / "new" / "both.json")])  # its folder made, not an error after the work
    table = capsys.readouterr().out.split("far ones wholly beyond it:")[1]
    assert "base.pt: no TTT" in table and "ckpt.pt: ttt_only, eta 0.3, erase 1" in table
    eval_passkey.main(both[1:] * 2 + ["--lengths", "128", "--trials", "1", "--windows", "1", "--ttt-delta", "0",
                                      "--out", str(tmp_path / "both0.json")])  # the erase evaluated, not the stored one
    printed = capsys.readouterr().out
    assert "ckpt.pt, --ttt-delta 0 at inference" in printed
    assert "ckpt.pt: ttt_only, eta 0.3, erase 0 " in printed.split("far ones wholly beyond it:")[1]
    compared = json.load(open(tmp_path / "new" / "both.json"))["checkpoints"]
    assert [c["checkpoint"] for c in compared] == both and compared[1]["rows"] == json.load(open(tmp_path / "eval0.json"))["rows"]
    with pytest.raises(SystemExit) as e:
        eval_passkey.main(both + [str(tmp_path / "missing.pt"), "--lengths", "128", "--out", str(tmp_path / "no.json")])
    assert e.value.code == 2 and "passkey accuracy" not in capsys.readouterr().out
    # the adapter holds exactly the trained parameters and reproduces the trained model on the base
    adapter = checkpoints.load_checkpoint(str(tmp_path / "one" / "adapter.pt"))
    assert set(adapter["model"]) == {n for n in a if n.endswith(("gating.conv.weight", "gating.W_target"))}
    x = torch.randint(0, 256, (2, 100))
    full = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))).eval()
    on_base = checkpoints.model_from_checkpoint(adapter, path=str(tmp_path / "one" / "adapter.pt")).eval()
    assert torch.equal(M.logits(on_base, x), M.logits(full, x))
    for name in ("ckpt", "adapter"):  # --method yarn alone: x1, the run's beta_fast (an adapter stores no config)
        eval_passkey.main([str(tmp_path / "one" / f"{name}.pt"), "--lengths", "128", "--trials", "1", "--windows", "1",
                           "--method", "yarn", "--out", str(tmp_path / f"yarn_{name}.json")])
    used = [json.load(open(tmp_path / f"yarn_{name}.json")) for name in ("ckpt", "adapter")]
    assert [(u["scale"], u["beta_fast"]) for u in used] == [(1.0, a_run_beta_fast := used[0]["settings"]["yarn"]["beta_fast"])] * 2
    assert a_run_beta_fast != 32.0 and used[0]["rows"] == used[1]["rows"]
    # the base checkpoint is reusable with --init, skipping pretraining
    again = run_train(QUICK + ["--init", str(tmp_path / "one" / "base.pt"), "--out", str(tmp_path / "three")])
    assert again.returncode == 0, again.stderr
    assert "stage 0: extend" in again.stdout
    c = final_weights(tmp_path / "three")
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=0, rtol=0, msg=k)


def test_official_recipe_runs_with_its_chunk_capped(tmp_path):
    """The official recipe continues a trained model (--init; refused without, above)."""
    base = run_train(QUICK[:-4] + ["--pretrain-only", "--out", str(tmp_path / "b")])
    assert base.returncode == 0, base.stderr
    r = run_train(QUICK[:-4] + ["--recipe", "official", "--lr", "1e-3", "--ttt-no-target", "--init",
                                str(tmp_path / "b" / "base.pt"), "--out", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    assert "TTT chunk 128: the official 4096 capped" in r.stdout  # half the shortest sequence, 256
    assert "freeze mode full" in r.stdout and "ttt grad" in r.stdout
    checkpoint = checkpoints.load_checkpoint(str(tmp_path / "o" / "ckpt.pt"))
    settings = checkpoint["settings"]
    assert settings["ttt"]["layers"] == [0] and settings["ttt"]["chunk_size"] == 128 and settings["ttt"]["eta"] == 3.0
    assert settings["ttt"]["target"] is False and not any("W_target" in k for k in checkpoint["model"])
    checkpoints.model_from_checkpoint(checkpoint)  # rebuilds without W_target


def test_non_finite_training_stops_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "out"
    r = run_train(QUICK + ["--ttt-eta", "1e30", "--out", str(out)])
    assert r.returncode == 1 and "non-finite gradient in the ttt parameters" in r.stdout, r.stdout[-500:]
    kept = checkpoints.load_checkpoint(str(out / "ckpt.pt"))  # written at the end of stage 0
    assert kept["stage"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values())


def test_non_finite_step_between_log_lines_stops_before_the_save(tmp_path):
    # Step 1 is finite (and logged); its huge update makes step 2 non-finite. Step 2 is no log
    # step but a save step: the non-finite check, read late to spare a host sync per step, must
    # still come before that save.
    out = tmp_path / "out"
    r = run_train(QUICK + ["--lr-ttt", "1e36", "--log-every", "100", "--save-every", "2", "--out", str(out)])
    assert r.returncode == 1 and "non-finite gradient in the ttt parameters at stage 1 step 2" in r.stdout, \
        r.stdout[-500:]
    assert "step 1/4 | stage 1" in r.stdout
    kept = checkpoints.load_checkpoint(str(out / "ckpt.pt"))  # written at the end of stage 0, not at stage 1 step 2
    assert (kept["stage"], kept["step"]) == (1, 0) and all(torch.isfinite(v).all() for v in kept["model"].values())


@pytest.mark.parametrize("mode", ["lora_ttt", "ttt_lora_in"])
def test_lora_training_and_adapter(tmp_path, mode):
    """A LoRA mode trains, saves an adapter of the LoRA factors and TTT's parameters that rebuilds
    the model on its base, leaves the base weights untouched; an --init from it keeps its LoRA
    (another rank, or the other LoRA mode, is refused in one line). `ttt_lora_in` trains with the
    delta rule's erase, which the checkpoint and the adapter carry."""
    out = tmp_path / "lora"
    erase = ["--ttt-delta", "1" if mode == "ttt_lora_in" else "0"]
    r = run_train(QUICK + ["--mode", mode, "--lora-rank", "2", "--scale", "1", "--out", str(out)] + erase)
    assert r.returncode == 0, r.stderr
    assert "not a control" in r.stdout and "eta 0 (control)" not in r.stdout  # other weights trained with TTT
    trained = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(out / "ckpt.pt"))).eval()
    adapter = checkpoints.load_checkpoint(str(out / "adapter.pt"))
    assert set(adapter["model"]) == {n for n, _ in trained.named_parameters()
                                     if "lora_" in n or n.endswith(("gating.conv.weight", "gating.W_target"))}
    on_base = checkpoints.model_from_checkpoint(adapter, path=str(out / "adapter.pt")).eval()
    assert {g.delta for g in freeze.ttt_modules(trained) + freeze.ttt_modules(on_base)} == {float(erase[1])}
    x = torch.randint(0, 256, (2, 100))
    assert torch.equal(M.logits(on_base, x), M.logits(trained, x))
    base = checkpoints.load_checkpoint(str(out / "base.pt"))["model"]  # frozen_W is the base, untouched
    for n, p in trained.state_dict().items():
        if ".frozen_W." in n:
            assert torch.equal(p, base[n.replace(".frozen_W.", ".")]), n
    if mode == "ttt_lora_in":
        assert all(".gating.linear_in." in n for n in adapter["model"] if "lora_" in n)
    other = "ttt_lora_in" if mode == "lora_ttt" else "lora_ttt"
    for extra, says in ((["--mode", mode, "--lora-rank", "4"], "--init"), (["--mode", other], "--init"),
                        (["--lora-rank", "4"], "trains no LoRA")):  # the last: --mode ttt_only
        r = run_train(QUICK[:-4] + ["--init", str(out / "ckpt.pt"), "--out", str(tmp_path / "bad")] + extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and extra[-2] in lines[0] and says in lines[0], r.stderr
    assert not (tmp_path / "bad").exists()
    # an extension of this run, trained at L0 (longer documents, the base's RoPE, as the horizon rows'
    # stages): its adapter loads on this checkpoint, which holds TTT and LoRA already, and rebuilds
    # the extended model
    more = tmp_path / "more"
    r = run_train(QUICK[:-4] + ["--init", str(out / "ckpt.pt"), "--method", "none", "--mode", mode,
                                "--lora-rank", "2", "--out", str(more)] + erase)
    assert r.returncode == 0 and "the base's RoPE" in r.stdout, r.stderr
    extended = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(more / "ckpt.pt"))).eval()
    on_base = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(more / "adapter.pt")),
                                                path=str(more / "adapter.pt")).eval()
    assert torch.equal(M.logits(on_base, x), M.logits(extended, x))
    assert not torch.equal(M.logits(extended, x), M.logits(trained, x))  # it trained on


def make_moshi_format_model(folder, dtype=torch.float32, context=128):
    """A tiny multi-stream Moshi (text + 2 audio codebooks, a depformer) saved as Moshi ships
    models: safetensors weights (bf16 for Moshi's own) and the json of its LMModel arguments."""
    from safetensors.torch import save_file
    lm_kwargs = dict(dim=32, text_card=48, existing_text_padding_id=3, n_q=2, dep_q=2, card=16,
                     num_heads=2, num_layers=4, hidden_scale=4.125, causal=True, context=context,
                     max_period=10000, gating="silu", norm="rms_norm_f32", positional_embedding="rope",
                     depformer_dim=16, depformer_num_heads=2, depformer_num_layers=1,
                     depformer_dim_feedforward=32, depformer_multi_linear=True, depformer_pos_emb="none",
                     delays=[0, 0, 1])
    torch.manual_seed(0)
    from moshi.models.lm import LMModel
    lm = LMModel(**lm_kwargs).to(dtype)
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"lm_kwargs": lm_kwargs}))
    rng = np.random.default_rng(0)
    for i in range(3):  # text stream (padding 3 most of the time), then two audio codebooks
        text = np.where(rng.random(700) < 0.6, 3, rng.integers(0, 48, 700))
        audio = rng.integers(0, 16, (2, 700))
        np.save(folder / f"tokens{i}.npy", np.concatenate([text[None], audio]).astype(np.int32))
    return lm, lm_kwargs


@pytest.mark.parametrize("lora", [False, True])
def test_contiguous_depformer_steps_equal_moshis(lora):
    """depformer_steps on a multi-stream model with per-step depformer weights (as Moshi 7B):
    moshi's path feeds its per-step Linears strided slices, the installed one contiguous inputs;
    the loss and every gradient are moshi's (1e-6 relative), the state dict is the same tensors.
    With the depformer frozen (as in ttt_only) moshi's path runs batched products of one-row
    matrices (aten::bmm) and the installed one none."""
    import depformer_steps
    from moshi.models.lm import LMModel
    torch.manual_seed(0)
    lm = LMModel(dim=32, text_card=48, existing_text_padding_id=3, n_q=3, dep_q=3, card=16, num_heads=2,
                 num_layers=2, hidden_scale=4.125, causal=True, context=64, max_period=10000, gating="silu",
                 norm="rms_norm_f32", positional_embedding="rope", depformer_dim=16, depformer_num_heads=2,
                 depformer_num_layers=2, depformer_dim_feedforward=32, depformer_multi_linear=True,
                 depformer_pos_emb="none", depformer_weights_per_step=True, delays=[0, 0, 1, 1]).train()
    if lora:
        freeze.apply_lora(lm, 2, 2.0)
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    for name, p in lm.depformer.named_parameters():  # frozen, as in ttt_only: torch folds no product for them
        p.requires_grad_("lora" in name)
    fast = depformer_steps.apply_contiguous_steps(copy.deepcopy(lm))
    assert depformer_steps.apply_contiguous_steps(fast) is fast  # again: nothing left to change
    assert fast.state_dict().keys() == lm.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), lm.state_dict().values()))
    codes = torch.randint(0, 16, (2, 4, 24), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = torch.randint(0, 48, (2, 24), generator=torch.Generator().manual_seed(2))
    loss, batched = [], []  # moshi's depformer runs batched products of one-row matrices, the fast one none
    for m in (lm, fast):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.append(M.multistream_loss(m, codes, 0.5, 100.0))
            loss[-1].backward(retain_graph=True)
        batched.append(sum(e.name == "aten::bmm" for e in prof.events()))
        m.zero_grad()
    assert batched[0] > 0 and batched[1] == 0, batched
    assert {type(x) for x in fast.depformer.modules() if isinstance(x, torch.nn.Linear)} == {
        depformer_steps.ContiguousLinear}
    torch.testing.assert_close(loss[1], loss[0], rtol=1e-6, atol=0)
    for l in loss:
        l.backward()
    for (name, a), b in zip(lm.named_parameters(), fast.parameters()):
        if a.grad is not None:
            # a batched product sums in another order than one product: float32 rounding, scaled
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5 * a.grad.abs().max().item(), msg=name)


def finetune_loss_with_mask(logits, target, target_mask, mode, first_codebook_weight_multiplier=1.0,
                            text_padding_weight=1.0, text_padding_ids=()):
    """moshi-finetune's `compute_loss_with_mask` (finetune/loss.py), transcribed: weights are the
    mask, scaled for the first audio codebook or the text padding ids; the weighted sum of the
    per-position cross-entropy over the sum of the weights."""
    target = torch.where(target_mask, target, torch.zeros_like(target))
    weights = target_mask.float()
    if mode == "audio":
        weights[:, 0] *= first_codebook_weight_multiplier
    else:
        for i in text_padding_ids:
            weights[target == i] *= text_padding_weight
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                           reduction="none")
    w = weights.reshape(-1)
    return torch.where(w > 0, ce * w, torch.zeros_like(ce)).sum() / w.sum()


@pytest.mark.parametrize("padding_weight,first_weight", [(0.5, 1.0), (0.5, 100.0), (0.2, 3.0)])
def test_multistream_loss_is_moshi_finetunes(tmp_path, padding_weight, first_weight):
    lm, _ = make_moshi_format_model(tmp_path)
    codes = torch.from_numpy(np.load(tmp_path / "tokens0.npy")[:, :64].astype(np.int64))[None]
    codes[0, 0, 5:9] = lm.end_of_text_padding_id  # both padding ids occur
    assert (codes[:, 0] == lm.text_padding_token_id).any()
    out = lm(codes)
    ref = finetune_loss_with_mask(out.text_logits, codes[:, :lm.audio_offset], out.text_mask, "text",
                                  text_padding_weight=padding_weight,
                                  text_padding_ids={lm.text_padding_token_id, lm.end_of_text_padding_id})
    ref = ref + finetune_loss_with_mask(out.logits, codes[:, lm.audio_offset:lm.audio_offset + lm.dep_q],
                                        out.mask, "audio", first_codebook_weight_multiplier=first_weight)
    got = M.multistream_loss(lm, codes, padding_weight, first_weight)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moshi_format_model_loads_trains_and_adapts(tmp_path, dtype):
    """bf16, as Moshi ships: the frozen weights stay bf16 through training, checkpoints and
    adapters; what trains is float32."""
    lm, _ = make_moshi_format_model(tmp_path, dtype)
    loaded, settings = M.load_moshi(str(tmp_path / "model.safetensors"), str(tmp_path / "config.json"))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    codes = torch.from_numpy(np.load(tmp_path / "tokens0.npy")[:, :64].astype(np.int64))[None]
    lm.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes).logits.nan_to_num(), lm(codes).logits.nan_to_num())
    out = tmp_path / "out"
    args = ["--init", str(tmp_path / "model.safetensors"), "--init-config", str(tmp_path / "config.json"),
            "--data"] + [str(tmp_path / f"tokens{i}.npy") for i in range(3)] + [
            "--original-len", "128", "--scale", "4", "--steps", "3", "--batch", "2", "--ttt-layers", "1,3",
            "--ttt-chunk", "32", "--log-every", "1", "--out", str(out)]
    r = run_train(args)
    assert r.returncode == 0, r.stderr
    assert "stage 1: extend at length 512" in r.stdout and "final table (validation loss" in r.stdout
    losses = [float(l.split("loss ")[1].split()[0]) for l in r.stdout.splitlines() if l.startswith("step ")]
    assert all(math.isfinite(v) for v in losses) and len(losses) == 6
    checkpoint = checkpoints.load_checkpoint(str(out / "ckpt.pt"))
    for name, value in checkpoint["model"].items():
        if value.is_floating_point():
            assert value.dtype == (torch.float32 if name.endswith(("gating.conv.weight", "W_target")) else dtype), name
    trained = checkpoints.model_from_checkpoint(checkpoint).eval()
    on_base = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(out / "adapter.pt")), path=str(out / "adapter.pt")).eval()
    assert {n: p.dtype for n, p in trained.named_parameters()} == {n: p.dtype for n, p in on_base.named_parameters()}
    assert trained.transformer.layers[0].self_attn.context == 512  # widened by YaRN x4 of 128
    assert isinstance(trained.transformer.layers[1].gating, ttt.TTTGating)
    with torch.no_grad(), M.autocast_for(trained):  # bf16 weights next to float32 ones
        a, b = trained(codes), on_base(codes)
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert torch.equal(a.text_logits.nan_to_num(), b.text_logits.nan_to_num())
    bad = run_train(args[:4] + ["--out", str(tmp_path / "bad")])  # no token arrays
    assert bad.returncode == 2 and "--data" in bad.stderr
    wrong = run_train(args[:4] + ["--data", str(tmp_path / "config.json"), "--out", str(tmp_path / "bad")])
    assert wrong.returncode == 2 and "token array" in wrong.stderr


def test_fsdp_root_hooks_run_once_per_forward(tmp_path, monkeypatch):
    """model.shard on both entry points (one gloo process): the root's FSDP2 hooks run once per
    forward. moshi's multi-stream `forward` calls `forward_text`; wrapping both for FSDP nested the
    root's hooks, and on CUDA the first backward then found the depformer's gathered output heads
    freed (results/multi_gpu/fsdp_scale_small7b_h100x2.log). On CPU it trains anyway, hence the count."""
    import torch.distributed as dist
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    calls, pre_forward = [], FSDPState._pre_forward

    def counted(self, module, *args):
        calls.append(module)
        return pre_forward(self, module, *args)
    monkeypatch.setattr(FSDPState, "_pre_forward", counted)
    multi, _ = make_moshi_format_model(tmp_path)
    codes = torch.from_numpy(np.load(tmp_path / "tokens0.npy")[:, :64].astype(np.int64))[None]
    text = M.build_model(dict(M.PRESETS["cpu"], context=64))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for model, multistream, loss in ((multi, True, lambda m: M.multistream_loss(m, codes)),
                                         (text, False, lambda m: M.logits(m, codes[:, 0] % 256).sum())):
            M.shard(model, bf16=False, multistream=multistream)
            calls.clear()
            loss(model).backward()
            assert sum(m is model for m in calls) == 1, multistream
            assert all(p.grad is not None for p in model.parameters() if p.requires_grad), multistream
    finally:
        dist.destroy_process_group()


def test_fsdp_on_two_processes_equals_one_and_resumes(tmp_path):
    """FSDP2 (fully_shard) on 2 gloo processes against 1 process without it, `ttt_layers` from a
    base: the weights after the stage within 1e-4 of the update (float32 sums in another order;
    7e-6 seen), and a run killed after a sharded checkpoint resumes to the same weights. The sharded
    runs recompute their first two layers (--grad-checkpointing 2; the first trains): a layer's
    recomputation must find its weights gathered again."""
    base = run_train(QUICK + ["--pretrain-only", "--out", str(tmp_path / "base")])
    assert base.returncode == 0, base.stderr
    args = sweep.without(QUICK, ["--pretrain-steps"]) + ["--init", str(tmp_path / "base" / "base.pt"), "--mode",
                                                         "ttt_layers", "--save-every", "1"]
    one = run_train(args + ["--out", str(tmp_path / "one")])
    two = run_train(args + ["--fsdp", "--grad-checkpointing", "2", "--out", str(tmp_path / "two")], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    start, a, b = (checkpoints.load_checkpoint(str(tmp_path / p))["model"] for p in ("base/base.pt", "one/ckpt.pt", "two/ckpt.pt"))
    stored = checkpoints.load_checkpoint(str(tmp_path / "two/ckpt.pt"))
    assert a.keys() == b.keys() and stored["settings"]["fsdp"] and stored["config"]["grad_checkpointing"] == "2"
    change = torch.cat([(a[k] - start[k]).flatten() for k in start])
    assert torch.cat([(b[k] - a[k]).flatten() for k in start]).norm() < 1e-4 * change.norm()
    out, cmd = tmp_path / "killed", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     os.path.join(HERE, "train.py")] + args + ["--fsdp", "--grad-checkpointing", "2"]
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # until a checkpoint in the middle of the stage
        if (out / "ckpt.pt").exists() and checkpoints.load_checkpoint(str(out / "ckpt.pt")).get("step", 0) >= 2:
            break
        time.sleep(0.05)
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:  # torchrun's workers have sessions of their own
        try:
            if str(out).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    proc.wait()
    assert checkpoints.load_checkpoint(str(out / "ckpt.pt"))["step"] in (2, 3)
    again = sweep.without(QUICK, ["--pretrain-steps"]) + ["--mode", "ttt_layers", "--save-every", "1", "--resume",
                                                          "--out", str(out)]  # the run's flags, as it stored them
    plain = run_train(again)  # a sharded run's checkpoint resumes sharded only
    assert plain.returncode == 2 and "resume it the same way" in plain.stderr
    resumed = run_train(again + ["--fsdp"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    c = checkpoints.load_checkpoint(str(out / "ckpt.pt"))["model"]
    assert torch.cat([(c[k] - b[k]).flatten() for k in start]).norm() < 1e-4 * change.norm()


def test_an_adapter_loads_only_on_its_own_base(tmp_path):
    """adapter.pt names its base by path; other weights at that path (another run written to the same
    --out) are refused in one line, not silently used."""
    r = run_train(QUICK + ["--out", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr
    adapter_path, base_path = str(tmp_path / "run" / "adapter.pt"), str(tmp_path / "run" / "base.pt")
    adapter = checkpoints.load_checkpoint(adapter_path)
    checkpoints.model_from_checkpoint(adapter, path=adapter_path)  # on its own base
    base = checkpoints.load_checkpoint(base_path)
    name = next(n for n in base["model"] if n.endswith(".weight") and n not in adapter["model"])
    base["model"][name] = base["model"][name] + 1e-3
    checkpoints.save_checkpoint(base_path, base)
    with pytest.raises(ValueError, match="is not the one this adapter was trained on"):
        checkpoints.model_from_checkpoint(adapter, path=adapter_path)
    r = subprocess.run([sys.executable, os.path.join(HERE, "eval_passkey.py"), adapter_path, "--lengths", "128",
                        "--out", str(tmp_path / "e.json")], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "e.json").exists()


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL at random moments (several times over one run, checkpoint writes included), then
    --resume: the final weights equal an uninterrupted run's, bit for bit."""
    args = QUICK + ["--save-every", "1"]
    full = run_train(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    rng, kills = random.Random(0), 0
    for _ in range(3):
        resume = ["--resume"] if (out / "ckpt.pt").exists() else []
        started = time.time()
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")] + args + resume + ["--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # until a (new) checkpoint exists
            if (out / "ckpt.pt").exists() and os.path.getmtime(out / "ckpt.pt") > started:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
    assert kills >= 2
    resumed = run_train(args + ["--resume", "--out", str(out)])
    assert sorted(os.listdir(out)) == ["adapter.pt", "base.pt", "ckpt.pt", "results.json"]  # no stale temp file
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run resumed (as a run killed in its final table is) writes the same adapter: the trained
    # parameters alone, though no stage ran to set them
    adapter = lambda run: checkpoints.load_checkpoint(str(run / "adapter.pt"))["model"]
    trained = adapter(tmp_path / "full")
    finished = run_train(args + ["--resume", "--out", str(tmp_path / "full")])
    assert finished.returncode == 0, finished.stderr
    assert set(trained) == {n for n in a if n.endswith(("gating.conv.weight", "gating.W_target"))}
    for run in (out, tmp_path / "full"):
        assert set(adapter(run)) == set(trained), run
        checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(run / "adapter.pt")),
                                          path=str(run / "adapter.pt"))  # on its base


def test_bare_resume_continues_the_stored_run(tmp_path):
    """A `full` run killed after its pretraining stage, resumed with a bare --resume, trains `full`
    (not the command line's default mode) and ends with the uninterrupted run's weights, bit for
    bit; a flag given with --resume that differs from the stored run is refused in one line."""
    extra = ["--mode", "full", "--steps", "40", "--seed", "3", "--lr", "1e-3"]
    args = sweep.without(QUICK, extra) + extra
    full = run_train(args + ["--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py")] + args + ["--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # until the pretraining stage's checkpoint
        if (out / "ckpt.pt").exists():
            break
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert checkpoints.load_checkpoint(str(out / "ckpt.pt"))["stage"] == 1  # stopped inside the extension stage
    for flag, value in (("--mode", "ttt_only"), ("--lr", "2e-3"), ("--seed", "0"), ("--steps", "41")):
        r = run_train(["--resume", "--out", str(out), flag, value])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and flag in lines[0] and "resum" in lines[0], r.stderr
    same, _ = config.resumed_config(dict(resume=True, out=str(out), ttt_layers="default", mode="full", lr=1e-3))
    assert same.ttt_layers == ttt.default_layers(4) and same.mode == "full"  # named layers: the same run
    assert same.ttt_delta == 1.0  # the default now; a run stored before --ttt-delta existed trained the sum,
    assert same.yarn_beta_fast == 2.0  # the CPU preset's YaRN, stored; one before --yarn-beta-fast the paper's 32
    older = checkpoints.load_checkpoint(str(out / "ckpt.pt"))
    del older["config"]["ttt_delta"], older["config"]["yarn_beta_fast"]
    checkpoints.save_checkpoint(str(tmp_path / "older" / "ckpt.pt"), older)
    older = config.resumed_config(dict(resume=True, out=str(tmp_path / "older")))[0]
    assert (older.ttt_delta, older.yarn_beta_fast) == (0.0, 32.0)
    resumed = run_train(["--resume", "--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(tmp_path / "full"), final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = json.load(open(out / "results.json"))["config"]
    assert (recorded["mode"], recorded["lr"], recorded["seed"], recorded["steps"]) == ("full", 1e-3, 3, 40)


def test_init_keeps_what_the_checkpoint_fixes_and_refuses_contradictions(tmp_path):
    """From a checkpoint with a window and TTT, trained at 2 L0 with YaRN: its window, L0, TTT, YaRN's
    beta_fast and method are the run's (and recorded as such), and its stages go on from 2 L0;
    --window 0, a --ttt-* flag, --original-len, --yarn-beta-fast, --method, a --scale ending below 2 L0
    or a --recipe that contradicts them is refused in one line, before anything is written, as are flags that would
    change nothing (--preset of another model, --pretrain-steps, --lora-rank without a LoRA mode); from
    a checkpoint trained without a window, none is kept."""
    first = run_train(QUICK + ["--out", str(tmp_path / "first")])
    assert first.returncode == 0, first.stderr
    ckpt = str(tmp_path / "first" / "ckpt.pt")
    settings = checkpoints.load_checkpoint(ckpt)["settings"]
    assert settings["window"] == 256 and settings["ttt"]["chunk_size"] == 32
    bad = [["--window", "0"], ["--window", "128"], ["--ttt-layers", "none", "--mode", "full"], ["--ttt-layers", "1"],
           ["--ttt-chunk", "16"], ["--ttt-eta", "1"], ["--ttt-target", "embeddings"], ["--ttt-rope-modulo"],
           ["--ttt-no-target"], ["--ttt-decay", "0.9", "--ttt-delta", "0"], ["--ttt-update-clip", "2"],
           ["--ttt-average-after", "4", "--ttt-delta", "0"], ["--ttt-delta", "0"], ["--original-len", "160"],
           ["--method", "none"], ["--scale", "1"]]  # the last two would take back its YaRN x2
    r = run_train(QUICK[:-4] + ["--init", ckpt, "--scale", "1.5", "--out", str(tmp_path / "bad")])
    assert r.returncode == 2 and "give --scale 2 to train that stage again" in r.stderr, r.stderr
    inside = str(tmp_path / "inside.pt")  # as --save-every writes one inside a stage: its stage is not done
    checkpoints.save_checkpoint(inside, dict(checkpoints.load_checkpoint(ckpt), stage=1, step=2))
    r = run_train(QUICK[:-4] + ["--init", inside, "--out", str(tmp_path / "bad")])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--resume its run" in r.stderr, r.stderr
    for extra in bad:
        r = run_train(QUICK[:-4] + ["--init", ckpt, "--out", str(tmp_path / "bad")] + extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and extra[0] in lines[0] and "--init" in lines[0], (extra, r.stderr)
    assert not (tmp_path / "bad").exists()
    same = ["--ttt-chunk", "32", "--window", "256", "--ttt-layers", ",".join(map(str, settings["ttt"]["layers"]))]
    again = run_train(QUICK[:-4] + ["--init", ckpt, "--out", str(tmp_path / "again"), "--ttt-eta", "0.3"] + same)
    assert again.returncode == 0, again.stderr
    recorded = json.load(open(tmp_path / "again" / "results.json"))["config"]
    assert (recorded["window"], recorded["ttt_chunk"], recorded["ttt_layers"]) == (256, 32, settings["ttt"]["layers"])
    assert checkpoints.load_checkpoint(str(tmp_path / "again" / "ckpt.pt"))["settings"]["window"] == 256
    # trained at 2 L0 with YaRN: --scale 2 trains that stage again (above); --scale 4 goes on from it, with YaRN
    stages = lambda r: [line.split(":")[1].split(",")[0].strip() for line in r.stdout.splitlines()
                        if line.startswith("stage ") and " done" not in line]
    assert stages(again) == ["extend at length 256"], again.stdout
    on = run_train(QUICK[:-4] + ["--init", ckpt, "--scale", "4", "--steps", "1", "--out", str(tmp_path / "on")])
    assert on.returncode == 0 and stages(on) == ["extend at length 512"], on.stderr
    # its final table: at L0, the length the checkpoint trained at and the new stage's; the untrained
    # RoPE scalings, made for a base trained at L0, not compared on a start that trained past it
    final = json.load(open(tmp_path / "on" / "results.json"))["rows"]
    assert "not compared (the starting model was trained past L0)" in on.stdout and "vanilla RoPE (control)" not in final
    assert all([r["length"] for r in rows] == [128, 256, 512] for rows in final.values()), final.keys()
    assert checkpoints.load_checkpoint(str(tmp_path / "on" / "ckpt.pt"))["settings"]["yarn"]["method"] == "yarn"
    # flags that would change nothing here: the model comes from the checkpoint, ttt_only trains no LoRA;
    # the official recipe's TTT contradicts the checkpoint's as its flags would
    for extra, says in ((["--preset", "gpu"], "--preset"), (["--pretrain-steps", "9"], "--pretrain-steps"),
                        (["--lora-rank", "4"], "--lora-rank"), (["--recipe", "official"], "--recipe official")):
        r = run_train(QUICK[:-4] + ["--init", ckpt, "--out", str(tmp_path / "bad")] + extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and says in lines[0], (extra, r.stderr)
        assert "[" not in lines[0].partition("; give ")[2], lines[0]  # what to give, as a flag is written
    assert not (tmp_path / "bad").exists()
    stored_beta = checkpoints.load_checkpoint(ckpt)["settings"]["yarn"]["beta_fast"]
    r = run_train(QUICK[:-4] + ["--init", ckpt, "--yarn-beta-fast", str(stored_beta + 1), "--out", str(tmp_path / "bad")])
    assert r.returncode == 2 and "--yarn-beta-fast" in r.stderr and "--init" in r.stderr, r.stderr
    # a run trained without a window (--window 0) extends without one, and a window is refused
    none = run_train(QUICK + ["--window", "0", "--steps", "1", "--out", str(tmp_path / "none")])
    assert none.returncode == 0, none.stderr
    nowin = str(tmp_path / "none" / "ckpt.pt")
    assert checkpoints.load_checkpoint(nowin)["settings"]["window"] is None
    r = run_train(QUICK[:-4] + ["--init", nowin, "--window", "256", "--out", str(tmp_path / "bad")])
    assert r.returncode == 2 and "--window 256 contradicts the --init checkpoint" in r.stderr, r.stderr
    r = run_train(QUICK[:-4] + ["--init", nowin, "--steps", "1", "--out", str(tmp_path / "kept")])
    assert r.returncode == 0, r.stderr
    kept = json.load(open(tmp_path / "kept" / "results.json"))["config"]
    assert kept["window"] == 0 and kept["yarn_beta_fast"] == checkpoints.load_checkpoint(nowin)["settings"]["yarn"]["beta_fast"]


def test_init_keeps_beta_fast_only_from_a_yarn_it_trained_with():
    """--init keeps the checkpoint's YaRN beta_fast where its stages ran YaRN beyond L0; a checkpoint
    trained at scale 1, with another method or none leaves it to the run (None: from the model); one
    extended with the base's RoPE keeps that, and a --yarn-beta-fast is refused."""
    for stored, kept in ((dict(method="yarn", scale=2.0, beta_fast=4.0), 4.0), (dict(method="none", scale=2.0,
                        beta_fast=4.0), None), (dict(method="yarn", scale=1.0, beta_fast=4.0), None), (None, None)):
        c, given = config.parse_args(["--init", "x.pt"])
        settings = dict(original_len=128, window=256, ttt=None, yarn=stored, model=dict(M.PRESETS["cpu"]))
        config.settle(c, given, settings, 4, False)
        assert c.yarn_beta_fast == kept, stored
    # extended (trained past L0) with the base's RoPE: the run keeps --method none, where a beta_fast means nothing
    extended = dict(original_len=128, trained_len=256, window=256, ttt=None, model=dict(M.PRESETS["cpu"]),
                    yarn=dict(method="none", scale=2.0, beta_fast=4.0))
    c, given = config.parse_args(["--init", "x.pt"])
    config.settle(c, given, copy.deepcopy(extended), 4, False)
    assert c.method == "none"
    c, given = config.parse_args(["--init", "x.pt", "--yarn-beta-fast", "4"])
    with pytest.raises(ValueError, match="--yarn-beta-fast is YaRN's; the --init checkpoint's --method none"):
        config.settle(c, given, copy.deepcopy(extended), 4, False)


def test_resume_is_checked_on_the_stored_run_not_the_defaults(tmp_path, monkeypatch):
    """--resume takes the stored run whole: values the command line's defaults would fail with (the
    default batch of 16 over 3 processes; layers 'none' beside the default mode) are checked on the
    stored run (batch 6, --mode full), not refused because of the defaults; the stored run itself is
    checked (its batch over 4 processes: refused); moved to another --out, it keeps its base there."""
    out = tmp_path / "full"
    r = run_train(sweep.without(QUICK, ["--batch"]) + ["--batch", "6", "--mode", "full", "--ttt-layers", "none",
                                                       "--pretrain-steps", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("WORLD_SIZE", "3")
    for extra in ([], ["--ttt-layers", "none"]):
        c, given = config.parse_args(["--resume", "--out", str(out)] + extra)
        resumed, _ = config.resumed_config(given)
        assert (resumed.batch, resumed.mode, resumed.ttt_layers) == (6, "full", [])
        config.check(resumed)
    moved = tmp_path / "moved"  # a run moved to another folder resumes there: its base is the one beside it
    os.rename(out, moved)
    c, given = config.parse_args(["--resume", "--out", str(moved)])
    assert config.start(c, given).settings["base_path"] == os.path.join(str(moved), "base.pt")
    os.rename(moved, out)
    monkeypatch.setenv("WORLD_SIZE", "4")  # the stored batch of 6 does not split over 4: refused by start
    c, given = config.parse_args(["--resume", "--out", str(out)])
    with pytest.raises(ValueError, match="--batch 6 must be divisible"):
        config.start(c, given)


def test_moshi_init_takes_l0_from_the_models_context(tmp_path):
    """A Moshi-format --init without --original-len: L0 is the model's `context` (here 192), so
    YaRN's ramp and the stages are built from it; with --original-len, that value."""
    make_moshi_format_model(tmp_path, context=192)
    args = ["--init", str(tmp_path / "model.safetensors"), "--init-config", str(tmp_path / "config.json"), "--data"] + [
        str(tmp_path / f"tokens{i}.npy") for i in range(3)] + ["--scale", "2", "--steps", "1", "--batch", "2",
                                                              "--ttt-layers", "1", "--ttt-chunk", "32"]
    for extra, L0 in (([], 192), (["--original-len", "128"], 128)):
        out = tmp_path / f"out{L0}"
        r = run_train(args + extra + ["--out", str(out)])
        assert r.returncode == 0, r.stderr
        assert f"extend at length {2 * L0}" in r.stdout
        settings = checkpoints.load_checkpoint(str(out / "ckpt.pt"))["settings"]
        assert settings["original_len"] == L0 and settings["yarn"]["original_len"] == L0
    # the run extended again from its own checkpoint (its base now ckpt.pt, not the Moshi files): to
    # 4 L0, its final table against that checkpoint and its adapter rebuilding the model on it
    data = args[args.index("--data"):args.index("--scale")]
    r = run_train(["--init", str(tmp_path / "out128" / "ckpt.pt")] + data + ["--scale", "4", "--steps", "1", "--batch",
                                                                             "2", "--out", str(tmp_path / "on")])
    assert r.returncode == 0 and "extend at length 512" in r.stdout and "\nbase " in r.stdout, r.stderr[-2000:]
    on = tmp_path / "on"
    full = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(on / "ckpt.pt"))).state_dict()
    rebuilt = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(on / "adapter.pt")),
                                                path=str(on / "adapter.pt")).state_dict()
    assert full.keys() == rebuilt.keys() and all(torch.equal(full[k], rebuilt[k]) for k in full)


def test_init_refusals_come_before_the_weights_are_read(tmp_path, monkeypatch):
    """A flag that contradicts the --init, a Moshi-format model's or ours, is refused from its
    settings alone: no weight is read into a model first (at 7B, minutes of loading). Without the
    contradiction the same start loads the model."""
    make_moshi_format_model(tmp_path)
    ours = str(tmp_path / "ours.pt")
    checkpoints.save_checkpoint(ours, dict(model=tiny_model().state_dict(), settings=M.new_settings(
        TINY, 32, "base.pt")))
    moshi = ["--init", str(tmp_path / "model.safetensors"), "--init-config", str(tmp_path / "config.json"),
             "--data"] + [str(tmp_path / f"tokens{i}.npy") for i in range(3)]
    loads = []
    for name, module in (("load_moshi", M), ("model_from_checkpoint", checkpoints)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: loads.append(name) or real(*a, **k))
    for argv, says in ((moshi + ["--preset", "cpu"], "--preset cpu"),
                       (["--init", ours, "--window", "16"], "--window 16")):
        c, given = config.parse_args(argv + ["--out", str(tmp_path / "run"), "--steps", "1"])
        with pytest.raises(ValueError, match=says):
            config.start(c, given)
        assert loads == [], argv
    for argv, loader in ((moshi + ["--ttt-chunk", "16"], "load_moshi"),
                         (["--init", ours, "--ttt-chunk", "16"], "model_from_checkpoint")):
        c, given = config.parse_args(argv + ["--out", str(tmp_path / "run"), "--steps", "1", "--scale", "2"])
        assert config.start(c, given).model is not None and loads == [loader]
        loads.clear()


def moshi_7b_kwargs_small() -> dict:
    """moshi's own Moshi 7B configuration (loaders._lm_kwargs: every key it has, 8 audio codebooks per
    speaker, the depformer's options), with its sizes shrunk to run on a CPU in a test."""
    from moshi.models import loaders
    return dict(loaders._lm_kwargs, dim=32, text_card=48, card=16, num_heads=2, num_layers=2, context=64,
                depformer_dim=16, depformer_dim_feedforward=32, depformer_num_heads=2, depformer_num_layers=1)


@pytest.mark.parametrize("extra", [{}, {"depformer_causal": False}, {"demux_second_stream": False},
                                   {"depformer_causal": False, "demux_second_stream": False}, "moshi 7b"])
def test_moshi_checkpoints_rebuild_as_saved(tmp_path, extra):
    """Rebuilding is the inverse of saving, for every configuration moshi's loader accepts: moshi's
    own 7B keys, and keys it drops (depformer_causal) or renames (demux_second_stream). The rebuilt
    model has the same parameters and outputs as the one loaded."""
    lm, lm_kwargs = make_moshi_format_model(tmp_path)
    if extra == "moshi 7b":
        from moshi.models import loaders
        from safetensors.torch import save_file
        lm_kwargs, extra = moshi_7b_kwargs_small(), {}
        torch.manual_seed(0)
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs, dtype=torch.float32)
        save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(tmp_path / "model.safetensors"))
        codes = torch.randint(0, 16, (1, 17, 32))
        codes[:, 0] = torch.randint(0, 48, (1, 32))
        torch.save(codes, tmp_path / "codes.pt")
    (tmp_path / "config.json").write_text(json.dumps({"lm_kwargs": dict(lm_kwargs, **extra)}))
    loaded, model_settings = M.load_moshi(str(tmp_path / "model.safetensors"), str(tmp_path / "config.json"))
    checkpoint = dict(model=loaded.state_dict(), settings=M.new_settings(model_settings, 128, "base"))
    checkpoints.save_checkpoint(str(tmp_path / "ckpt.pt"), checkpoint)
    rebuilt = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(str(tmp_path / "ckpt.pt"))).eval()
    codes = (torch.load(tmp_path / "codes.pt") if (tmp_path / "codes.pt").exists()
             else torch.from_numpy(np.load(tmp_path / "tokens0.npy")[:, :32].astype(np.int64))[None])
    with torch.no_grad():
        a, b = loaded.eval()(codes), rebuilt(codes)
    assert torch.equal(a.logits.nan_to_num(), b.logits.nan_to_num())
    assert loaded.state_dict().keys() == rebuilt.state_dict().keys()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    """An --out that is a file, or lies inside one: one line and exit 2 from every entry point,
    before any training or evaluation."""
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        r = run_train(QUICK + ["--out", str(out)])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and str(tmp_path / "file") in lines[0], r.stderr
        assert "step " not in r.stdout
    base = tmp_path / "base"
    assert run_train(QUICK + ["--pretrain-only", "--pretrain-steps", "1", "--out", str(base)]).returncode == 0
    for script, argv in (("eval_passkey.py", [str(base / "base.pt"), "--out", str(tmp_path / "file" / "e.json")]),
                         ("sweep.py", ["--setting", "horizon", "--tables", "--out", str(tmp_path / "file" / "h")]),
                         ("sweep.py", ["--setting", "horizon", "--work", str(tmp_path / "file")])):
        r = subprocess.run([sys.executable, os.path.join(HERE, script)] + argv, capture_output=True, text=True,
                           cwd=HERE, timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "file" in lines[0], (script, r.stderr)


def test_one_rank_dying_stops_the_other(tmp_path):
    """torchrun with 2 processes: SIGKILL rank 1 mid-training; rank 0 must not hang."""
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py")] + sweep.without(QUICK, ["--pretrain-steps"]) + ["--pretrain-steps", "500", "--out", out]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.startswith("step 3/500"):
            break
    rank1 = [int(p) for p in os.listdir("/proc") if p.isdigit() and is_rank(int(p), out, b"RANK=1")]
    assert len(rank1) == 1
    os.kill(rank1[0], signal.SIGKILL)
    start = time.time()
    proc.stdout.close()
    assert proc.wait(timeout=90) != 0
    assert time.time() - start < 90


def is_rank(pid, marker, rank):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() not in f.read():
                return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            return rank in f.read().split(b"\0")
    except OSError:
        return False


@FAST
@given(st.integers(1, 300), st.one_of(st.none(), st.integers(1, 400)))
def test_attention_pairs_count_the_causal_window(T, window):
    """bench.attention_pairs: the pairs (t, s) with s <= t and t - s < window, counted one by one."""
    import bench
    assert bench.attention_pairs(T, window) == sum(1 for t in range(T) for s in range(t + 1)
                                                   if window is None or t - s < window)


def test_compile_progress_says_what_has_been_compiled(capsys):
    """bench.compile_progress, which --scale runs through the first step of a compiled row: while a
    function compiles it prints the graphs dynamo has made since it started and the compile phases
    that have ended (torch's own timings); what it returns stops it (the thread joined: nothing is
    printed after) and gives the whole of it."""
    import bench
    torch.compile(lambda x: x.cos(), backend="aot_eager")(torch.randn(4))  # compiled before: not counted
    finish = bench.compile_progress(every=0.02)
    assert bench.compile_summary(bench.compile_state()) == "0 graphs"
    f = torch.compile(lambda x: (x.sin() * 2).cos().sum(), backend="aot_eager")
    f(torch.randn(8))
    deadline, printed = time.time() + 10, ""
    while time.time() < deadline and "compile_inner" not in printed:  # a line after the compile ended
        time.sleep(0.05)
        printed += capsys.readouterr().out
    whole = finish()
    printed += capsys.readouterr().out
    time.sleep(0.1)
    assert capsys.readouterr().out == ""  # stopped
    lines = [line for line in printed.splitlines() if line.strip().startswith("compiling,")] or [""]
    assert whole.startswith("1 graphs;") and "compile_inner" in whole, whole
    assert "1 graphs;" in lines[-1] and "compile_inner" in lines[-1], printed


@FAST
@given(st.sampled_from(["", "control", "ttt_only", "erase", "T 24000", "layers compiled", "eager", "LoRA",
                        "not checkpointed", "x"]),
       st.booleans())
def test_scale_rows_bring_what_they_are_compared_against(text, compiled):
    """bench --scale --rows TEXT: the rows whose name holds TEXT, every row any of them is compared
    against (and so on), nothing else; the whole-layer compiled rows only when named, the row with
    moshi's kernels eager only when they are compiled; LoRA's rows last (their Linears stay wrapped)."""
    import bench
    every = bench.scale_runs(3000, None, True) + bench.scale_runs(3000, "layers compiled", True)
    against = {name: ref for name, _, _, ref in every}
    runs = bench.scale_runs(3000, text or None, compiled)
    names = [r[0] for r in runs]
    runnable = {n for n in against if compiled or "eager" not in n}
    expected = {n for n in runnable if (text in n if text else "layers compiled" not in n)}
    while {against[n] for n in expected if against[n]} - expected:
        expected |= {against[n] for n in expected if against[n]}
    assert set(names) == expected and len(names) == len(set(names))
    lora = [i for i, r in enumerate(runs) if r[2]["trains"].startswith("lora")]
    assert lora == list(range(len(runs) - len(lora), len(runs)))


@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_moshi_layers_with_ttt_compile_whole_and_equal_eager(delta):
    """model.compile_layers' premise (train.py --compile-layers, bench.py's compiled rows): every
    layer of a Moshi-shaped model (its depformer, TTT in two of four layers, the fast-weight scan
    with the paper's sum or the erase, gradient checkpointing as at 7B) traces into one graph
    (fullgraph: a graph break fails; dynamo and AOT autograd, eager kernels) and gives eager's loss
    and trained gradients (within 1e-5 relative)."""
    import depformer_steps
    from moshi.models import loaders
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(moshi_7b_kwargs_small(), num_layers=4), dtype=torch.float32)
    lm.transformer.checkpointing = lm.depformer.checkpointing = True
    depformer_steps.apply_contiguous_steps(lm)
    ttt.apply_ttt(lm, [0, 2], 8, 0.3, delta=delta)
    randomise_ttt(lm)
    freeze.apply_freeze(lm, "ttt_only")
    codes = torch.randint(0, 16, (2, 17, 40), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = torch.randint(0, 48, (2, 40), generator=torch.Generator().manual_seed(2))
    params = [p for p in lm.parameters() if p.requires_grad]

    def loss_and_gradients():
        loss = M.multistream_loss(lm, codes, 0.5, 100.0)
        gradients = torch.autograd.grad(loss, params)
        return loss.detach(), gradients

    eager = loss_and_gradients()
    torch._dynamo.reset()
    try:
        M.compile_layers(lm, True, backend="aot_eager", fullgraph=True)
        compiled = loss_and_gradients()
    finally:
        M.compile_layers(lm, False)
        torch._dynamo.reset()
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=0)
    for got, want in zip(compiled[1], eager[1]):
        assert (got - want).norm() <= 1e-5 * want.norm() + 1e-12


def test_grad_checkpointing_recomputes_what_it_names_and_changes_no_gradient(tmp_path):
    """--grad-checkpointing none / depformer / all / N (model.set_checkpointing) on a Moshi-shaped
    model of three layers with TTT (the erase) in all of them, so that each runs backward: in one
    forward and backward each transformer layer's attention runs twice exactly where it recomputes
    (all; N: the first N layers), once elsewhere, the depformer's layer twice unless none, whatever
    was set before; the trained gradients are the same as without recomputation (float32, CPU: within
    1e-6 relative); parameter names are unchanged; bench counts each recomputed layer once; and
    sharded by FSDP2 (one gloo process) the chosen layers recompute to the same gradients."""
    import bench
    import depformer_steps
    from moshi.models import loaders
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(moshi_7b_kwargs_small(), num_layers=3), dtype=torch.float32)
    depformer_steps.apply_contiguous_steps(lm)
    ttt.apply_ttt(lm, [0, 1, 2], 8, 0.3, delta=1.0)
    randomise_ttt(lm)
    freeze.apply_freeze(lm, "ttt_only")
    names = [n for n, _ in lm.named_parameters()]
    codes = torch.randint(0, 16, (2, 17, 24), generator=torch.Generator().manual_seed(1))
    codes[:, 0] = torch.randint(0, 48, (2, 24), generator=torch.Generator().manual_seed(2))
    params = [p for p in lm.parameters() if p.requires_grad]
    calls = [0, 0, 0, 0]  # the transformer's three layers, the depformer's last
    # pre-hooks on a submodule: a recomputation calls the layer's forward (a wrapped one does not go
    # through the layer's own hooks) and stops once it has what the backward needs, before forward hooks
    for i, attention in enumerate([layer.self_attn for layer in lm.transformer.layers] + [lm.depformer.layers[-1]]):
        attention.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    gradients, expected = {}, dict(none=[1, 1, 1, 1], depformer=[1, 1, 1, 2], all=[2, 2, 2, 2])
    expected.update({"1": [2, 1, 1, 2], "2": [2, 2, 1, 2]})
    recomputed = {}  # bench's count of the recomputation: each layer (all alike here) adds the same
    for what in ("2", "none", "1", "all", "depformer", "2", "all", "none"):  # each setting replaces the last
        M.set_checkpointing(lm, what)
        calls[:] = [0, 0, 0, 0]
        gradients[what] = torch.autograd.grad(M.multistream_loss(lm, codes, 0.5, 100.0), params)
        assert calls == expected[what], (what, calls)
        assert [n for n, _ in lm.named_parameters()] == names
        recomputed[what] = bench.step_flops(lm, 24)["recompute"]
    steps = [recomputed[w] for w in ("depformer", "1", "2", "all")]
    assert recomputed["none"] == 0 < steps[0] and steps[1] - steps[0] == steps[2] - steps[1] == steps[3] - steps[2] > 0
    for bad in (True, "0", "3", "transformer"):  # a Config of the bool's days, built in code; N out of range
        with pytest.raises(ValueError, match="one of none, depformer, all, or a number of the transformer's layers "
                                             "from 1 to 2"):
            M.set_checkpointing(lm, bad)
    for what in expected:
        for got, want in zip(gradients[what], gradients["none"]):
            assert (got - want).norm() <= 1e-6 * want.norm() + 1e-12, what
    # sharded (FSDP2, one gloo process): the first two layers recompute, with their weights gathered again
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        M.shard(lm, bf16=False, multistream=True)
        M.set_checkpointing(lm, "2")
        calls[:] = [0, 0, 0, 0]
        M.multistream_loss(lm, codes, 0.5, 100.0).backward()
        assert calls == expected["2"], calls
        sharded = [p for p in lm.parameters() if p.requires_grad]  # fully_shard's own, in the same order
        for p, want in zip(sharded, gradients["none"], strict=True):
            got = p.grad.full_tensor()
            assert (got - want).norm() <= 1e-6 * want.norm() + 1e-12
    finally:
        dist.destroy_process_group()


def test_grad_checkpointing_flag_and_runs_stored_before_it_named_the_depformer(tmp_path):
    """The flag alone is "all" (as it was); a value that is none of the three nor a number of layers,
    and a number that is not between 1 and the model's layers less one, are refused in one line,
    nothing written; a configuration stored when it was a bool resumes as the same setting;
    "depformer" on a model without one is refused in one line, nothing written."""
    assert config.parse_args(["--grad-checkpointing"])[0].grad_checkpointing == "all"
    assert config.parse_args([])[0].grad_checkpointing == "none"
    assert config.parse_args(["--grad-checkpointing", "depformer"])[0].grad_checkpointing == "depformer"
    assert config.parse_args(["--grad-checkpointing", "3"])[0].grad_checkpointing == "3"
    for bad in ("transformer", "-1", "2.5"):
        r = run_train(["--grad-checkpointing", bad, "--out", str(tmp_path / "bad")])
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and bad in r.stderr, r.stderr
    for layers in ("0", "03", "4"):  # the default model has 4 layers: none and all are the ends' names
        r = run_train(QUICK + ["--grad-checkpointing", layers, "--out", str(tmp_path / "n")])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "from 1" in lines[0] and layers in lines[0], r.stderr
        assert layers != "4" or "from 1 to 3" in lines[0]
    assert not (tmp_path / "n").exists() or not os.listdir(tmp_path / "n")
    r = run_train(QUICK + ["--grad-checkpointing", "depformer", "--out", str(tmp_path / "text")])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no depformer" in lines[0], r.stderr
    assert not (tmp_path / "text" / "ckpt.pt").exists()
    with pytest.raises(ValueError, match="no depformer"):  # model.set_checkpointing refuses it too
        M.set_checkpointing(tiny_model(), "depformer")
    for stored, setting in ((True, "all"), (False, "none")):
        c = dataclasses.asdict(config.Config())
        c["grad_checkpointing"] = stored
        checkpoint = dict(config=c, model={}, settings=dict(model=dict(num_layers=4)), stage=0, step=1, optimizer={},
                          stages=[dict(kind="extend", length=256, scale=2.0)])
        folder = tmp_path / f"older_{stored}"
        checkpoints.save_checkpoint(str(folder / "ckpt.pt"), checkpoint)
        resumed = config.resumed_config(dict(resume=True, out=str(folder)))[0]
        assert resumed.grad_checkpointing == setting
        assert config.resumed_config(dict(resume=True, out=str(folder), grad_checkpointing=setting))[0] == resumed
        given = dict(resume=True, out=str(folder), grad_checkpointing="depformer")  # another setting: refused
        with pytest.raises(ValueError, match="--grad-checkpointing"):
            config.resumed_config(given)


def test_profile_step_names_every_part_and_phase():
    """bench.profile_step on a Moshi-shaped model under gradient checkpointing (CPU time here):
    each part has forward and backward time, attention and the MLP their recomputation too (the
    recomputation stops midway by raising, which must still close the part's range), the
    optimizer its own; the parts' shares sum to 1 and the hooks are gone afterwards."""
    import bench
    from moshi.models import loaders
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(moshi_7b_kwargs_small(), num_layers=2), dtype=torch.float32)
    lm.transformer.checkpointing = lm.depformer.checkpointing = True
    codes = torch.randint(0, 16, (1, 17, 24))
    codes[:, 0] = torch.randint(0, 48, (1, 24))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.modules())
    result = bench.profile_step(lm, lambda: M.multistream_loss(lm, codes, 0.5, 100.0).backward(), optimizer.step,
                                torch.device("cpu"))
    parts = result["parts"]
    for part in ("attention", "MLP and TTT", "norms", "depformer"):
        assert parts[part]["forward"] > 0 and parts[part]["backward"] > 0, (part, parts[part])
    assert parts["attention"]["recompute"] > 0 and parts["MLP and TTT"]["recompute"] > 0
    assert parts["optimizer"]["optimizer"] > 0
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1, abs=1e-3)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.modules()) == hooks


def test_serving_counts_each_streams_state_by_what_holds_it():
    """bench.serving on a Moshi-shaped model (CPU, bf16, batches 1 and 3): per stream, the base holds
    no TTT state; YaRN x4's KV cache holds 3 L0 more steps of keys and values per layer than the
    base's; the exact TTT state holds, per TTT layer, a float32 [d, h] sum more than the compact one
    (which drops the sum and reads its one bf16 copy), and the two chunk sizes differ by their
    buffers only; TTT adds no KV cache."""
    import bench
    kwargs = dict(moshi_7b_kwargs_small(), num_layers=4)
    rows = bench.serving(torch.device("cpu"), steps=2, lm_kwargs=kwargs, chunks=(8, 16), batches=(1, 3))
    from moshi.models import loaders
    d, L0 = kwargs["dim"], kwargs["context"]
    h = loaders.get_moshi_lm(None, lm_kwargs=kwargs).transformer.layers[0].gating.linear_out.in_features
    layers = len(ttt.default_layers(kwargs["num_layers"]))
    GiB = 2 ** 30
    per = lambda row, kind: rows[row][f"{kind}_gib_per_stream"] * GiB
    assert per("base, window L0", "ttt_state") == 0 and per("YaRN x4, KV cache 4 L0", "ttt_state") == 0
    assert per("YaRN x4, KV cache 4 L0", "kv_cache") - per("base, window L0", "kv_cache") == \
        kwargs["num_layers"] * 2 * 3 * L0 * d * 2  # keys and values, every head, bf16
    for row in ("TTT 8", "TTT 16", "YaRN x4 + TTT 8"):
        assert per(row, "kv_cache") == per("YaRN x4, KV cache 4 L0" if "YaRN" in row else "base, window L0",
                                           "kv_cache")
    assert per("TTT 8, exact state", "ttt_state") - per("TTT 8", "ttt_state") == layers * d * h * 4
    assert per("TTT 16", "ttt_state") - per("TTT 8", "ttt_state") == layers * 8 * (2 * d + 2 * h) * 2  # V, Z
    for row in rows.values():
        assert [r["batch"] for r in row["runs"]] == [1, 3] and all(r["median_ms"] > 0 for r in row["runs"])
        assert row["other_state_gib_per_stream"] > 0


@pytest.mark.parametrize("trains", ["first norm", "layer 2", "everything", "LoRA"])
def test_step_flops_count_the_products_torch_counts(trains):
    """bench.step_flops' products (every Linear forward, input gradients from where a trained
    parameter first feeds the residual stream, weight gradients where weights train) against
    torch's FlopCounterMode on a forward and backward of a Moshi-shaped model (moshi's 7B keys,
    small sizes, depformer with weights per step). torch's counter does not count the CPU attention
    kernel: attention_pairs is checked above; the TTT path's count is the formula's alone."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    from moshi.models import loaders
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(moshi_7b_kwargs_small(), num_layers=4), dtype=torch.float32)
    lm.requires_grad_(False)
    if trains == "LoRA":  # moshi-finetune's: a LoRA on every Linear, its factors alone train
        freeze.apply_lora(lm, 4, 2.0)
        for m in freeze.lora_modules(lm):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    elif trains == "first norm":
        lm.transformer.layers[0].norm1.alpha.requires_grad_(True)
    elif trains == "layer 2":
        lm.transformer.layers[2].requires_grad_(True)
    else:
        lm.requires_grad_(True)
    T = 40
    codes = torch.randint(0, 16, (1, 17, T))
    codes[:, 0] = torch.randint(0, 48, (1, T))
    with FlopCounterMode(display=False) as counter:
        M.multistream_loss(lm, codes, 0.5, 100.0).backward()
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" not in str(op))
    flops = bench.step_flops(lm, T)
    excess = 0  # the count's stated exception: layer 0's first product, whose LoRA trains, gets its input gradient
    if trains == "LoRA":
        first = lm.transformer.layers[0].self_attn.in_projs[0]
        excess = 2 * T * first.frozen_W.in_features * (first.frozen_W.out_features + first.lora_A.out_features)
    assert counted == flops["linear_forward"] + flops["linear_backward"] - excess > 0


def test_scale_rows_train_what_they_name():
    """bench.train_only after bench.reconfigure, row after row on one Moshi-shaped bf16 model as
    --scale runs them: each trains exactly its set (ttt_lora_in: TTT's conv and W_target and a rank-8
    LoRA on each TTT layer's linear_in, nothing else), in float32 with the rest bf16, and a LoRA on
    linear_in does not outlive its row."""
    import bench
    from moshi.models import loaders
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(moshi_7b_kwargs_small(), num_layers=4), dtype=torch.bfloat16)
    layers = lm.transformer.layers
    gatings, rope = [layer.gating for layer in layers], lm.transformer.rope

    def run(trains, chunk=None):
        for p in lm.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(torch.bfloat16)
        bench.reconfigure(lm, gatings, rope, 64, 64, chunk=chunk, delta=1.0 if chunk else 0.0)
        bench.train_only(lm, trains)
        trained = {id(p) for p in lm.parameters() if p.requires_grad}
        assert all((p.dtype == torch.float32) == (id(p) in trained) for p in lm.parameters())
        return trained

    ttt_params = lambda: {id(p) for m in freeze.ttt_modules(lm) for p in m.ttt_parameters()}
    assert run("control") == {id(layers[0].norm1.alpha)}
    assert run("ttt_only", 8) == ttt_params()
    got = run("ttt_lora_in", 8)
    loras = freeze.lora_modules(lm)
    assert len(loras) == len(ttt.default_layers(4)) and all(m is g.linear_in for m, g in zip(loras, freeze.ttt_modules(lm)))
    assert got == ttt_params() | {id(p) for m in loras for p in (m.lora_A.weight, m.lora_B.weight)}
    assert all(m.lora_A.out_features == 8 for m in loras)
    assert run("ttt_only", 8) == ttt_params() and not freeze.lora_modules(lm)
    assert run("layers") == {id(p) for i in ttt.default_layers(4) for p in layers[i].parameters()}


def test_step_flops_count_the_erases_products_torch_counts():
    """bench.step_flops' forward with the erase in two TTT layers (its fast path: the read, the
    write, the C x C Gram matrix per chunk, the conv and W_target; the rest as above) against torch's
    FlopCounterMode on a forward of a Moshi-shaped model, chunk by chunk as on a CPU: equal but for
    each TTT layer's last chunk's write, which the scan skips (no chunk reads it)."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    from moshi.models import loaders
    torch.manual_seed(0)
    lm = loaders.get_moshi_lm(None, lm_kwargs=dict(moshi_7b_kwargs_small(), num_layers=4), dtype=torch.float32)
    C, T = 8, 40
    ttt.apply_ttt(lm, [0, 2], C, 0.3, delta=1.0)
    lm.requires_grad_(False)
    codes = torch.randint(0, 16, (1, 17, T))
    codes[:, 0] = torch.randint(0, 48, (1, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        M.multistream_loss(lm, codes, 0.5, 100.0)
    counted = sum(v for op, v in counter.get_flop_counts()["Global"].items() if "scaled_dot_product" not in str(op))
    flops = bench.step_flops(lm, T)
    d, h = lm.transformer.layers[0].gating.linear_out.weight.shape
    assert counted == flops["linear_forward"] + flops["ttt_forward"] - 2 * (2 * C * d * h) > 0


# ============================================================================================
# encode_dataset.py: moshi-finetune's audio dataset into token arrays
# ============================================================================================

def interleaver_by_events(alignments, frames, tokenize, padding, end_padding, frame_rate=12.5):
    """moshi-finetune's Interleaver (keep_main_only, no delay, no shift) transcribed as events, not
    as its frame loop: word w is taken at frame c_w = max(floor(start_w * rate), the frame its
    predecessor was taken); frame t shows token t - c_w of the last word taken at or before t if it
    has one, else padding; a padding frame followed by a token becomes end-of-text padding."""
    kept = [(tokenize(w), s) for w, (s, e), who in sorted(alignments, key=lambda a: a[1][0])
            if who == "SPEAKER_MAIN" and s < e]
    taken, c = [], 0
    for tokens, s in kept:
        c = max(c, math.floor(s * frame_rate))
        taken.append((c, tokens))
    text, emitted = [padding] * frames, [False] * frames
    for t in range(frames):
        last = [(c, tokens) for c, tokens in taken if c <= t]
        if last and t - last[-1][0] < len(last[-1][1]):
            text[t], emitted[t] = last[-1][1][t - last[-1][0]], True
    for t in range(1, frames):
        if emitted[t] and text[t - 1] == padding:
            text[t - 1] = end_padding
    return text


WORDS = {"hello": [10, 11], "there": [12], "key": [13, 14, 15], "a": [16], "": []}


def test_text_stream_examples():
    """By hand (12.5 frames per second, padding 3, end-of-text padding 0): a word spanning several
    frames, two words in one frame (the second replaces the first), the other speaker's words and a
    word of no duration dropped, the first frame and the last (a word cut by the end)."""
    import encode_dataset
    A = [("hello", (0.0, 0.5), "SPEAKER_MAIN"),    # frame 0: 10, 11 at frames 0, 1
         ("there", (0.2, 0.3), "SPEAKER_OTHER"),   # another speaker: dropped
         ("key", (0.40, 0.42), "SPEAKER_MAIN"),    # 0.40 * 12.5 = 5: frame 5, 13 at 5 ...
         ("a", (0.50, 0.6), "SPEAKER_MAIN"),       # 6.25: frame 6, replaces key's 14, 15: 16 at 6
         ("hello", (0.64, 0.7), "SPEAKER_MAIN"),   # 8.0 and 8.25: two words in frame 8,
         ("there", (0.66, 0.7), "SPEAKER_MAIN"),   # the second replaces the first: 12 at 8
         ("key", (0.7, 0.7), "SPEAKER_MAIN"),      # no duration: dropped
         ("key", (0.75, 1.0), "SPEAKER_MAIN")]     # 9.375: frame 9 of 11, 13, 14 (15 is past the end)
    got = encode_dataset.text_stream(A, 11, WORDS.__getitem__, 3, 0)
    assert got == [10, 11, 3, 3, 0, 13, 16, 0, 12, 13, 14]
    assert got == interleaver_by_events(A, 11, WORDS.__getitem__, 3, 0)


@FAST
@given(st.lists(st.tuples(st.sampled_from(sorted(WORDS)), st.floats(-0.3, 3.0), st.floats(0.0, 1.0),
                          st.sampled_from(["SPEAKER_MAIN", "SPEAKER_MAIN", "SPEAKER_OTHER"])), max_size=12),
       st.integers(1, 40))
def test_text_stream_is_the_interleavers(words, frames):
    """Random alignments (words that overlap, start before 0 or after the last frame, empty words,
    both speakers): the frame loop gives the event transcription's stream."""
    import encode_dataset
    A = [(w, (s, s + d), who) for w, s, d, who in words]
    assert (encode_dataset.text_stream(A, frames, WORDS.__getitem__, 3, 0)
            == interleaver_by_events(A, frames, WORDS.__getitem__, 3, 0))


SENTENCES = ["the pass key is twelve", "hello there how are you", "fine thanks and you",
             "moshi speaks and listens", "a word spans frames"]


def make_tokenizer(path):
    """A SentencePiece model trained here, ids as Moshi's (unk 0, bos 1, eos 2, pad 3), newline a piece."""
    import sentencepiece
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5), model_prefix=str(path), vocab_size=48, hard_vocab_limit=False,
        minloglevel=2, user_defined_symbols=["\n"], normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3)
    return sentencepiece.SentencePieceProcessor(model_file=str(path) + ".model")


def test_word_tokens_are_moshi_finetunes(tmp_path):
    """A word is encoded alone, stripped, no BOS; lines joined by the newline's piece."""
    import encode_dataset
    sp = make_tokenizer(tmp_path / "spm")
    nl = sp.encode("\n")[-1]
    assert encode_dataset.word_tokens(sp, " hello ") == sp.encode("hello")
    assert encode_dataset.word_tokens(sp, "pass\nkey") == sp.encode("pass") + [nl] + sp.encode("key")


def write_wav(path, audio, rate=24000, width=2):
    """audio [channels, samples] in [-1, 1] as a PCM wav."""
    import wave
    x = np.round(np.clip(audio, -1, 1) * (2 ** (8 * width - 1) - 1)).astype({2: np.int16, 4: np.int32}[width])
    with wave.open(str(path), "wb") as f:
        f.setnchannels(audio.shape[0])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(x.T.tobytes())


def test_wav_reading_is_exact(tmp_path):
    """16- and 32-bit PCM read back as written; 24-bit (written by hand) likewise, signs included."""
    import encode_dataset
    rng = np.random.default_rng(0)
    audio = rng.uniform(-1, 1, (2, 100))
    for width in (2, 4):
        write_wav(tmp_path / "a.wav", audio, width=width)
        scale = 2 ** (8 * width - 1)
        expected = np.round(audio * (scale - 1)) / scale
        assert np.allclose(encode_dataset.read_wav(str(tmp_path / "a.wav")), expected, atol=1e-7)
    ints = rng.integers(-2 ** 23, 2 ** 23, (100, 2))
    raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.ravel())
    import wave
    with wave.open(str(tmp_path / "b.wav"), "wb") as f:
        f.setnchannels(2), f.setsampwidth(3), f.setframerate(24000), f.writeframes(raw)
    assert np.array_equal(encode_dataset.read_wav(str(tmp_path / "b.wav")), (ints.T / 2 ** 23).astype(np.float32))


def untrained_mimi(seed=0):
    """moshi's Mimi with random weights, 2 codebooks per channel, its codebooks (zero until trained,
    which gives code 0 everywhere) drawn around what its encoder puts out, so that codes vary."""
    from moshi.models import loaders
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, num_codebooks=2).eval()
    audio = torch.rand(2, 1, 24000, generator=torch.Generator().manual_seed(seed)) - 0.5
    with torch.no_grad():
        latent = mimi.encode_to_latent(audio, quantize=False)
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            z = rvq.input_proj(latent) if rvq.input_proj is not None else latent  # [2, D, T]
            for layer in rvq.vq.layers:
                codebook = layer._codebook
                codebook.embedding_sum.copy_(z.mean((0, 2)) + torch.randn(codebook.embedding_sum.shape) * z.std((0, 2)).mean())
                codebook._initialized.fill_(1.0)
    return mimi


def test_mimi_blocks_give_the_whole_file_encode():
    """Streaming blocks from a fresh state give the codes of one whole-file encode by moshi's Mimi
    (untrained weights, codes checked to vary), for a file longer than the encoder's attention
    context (250 steps, 10 s): blocks of the default 20 s and of 7 frames, the last one partial."""
    import encode_dataset
    mimi = untrained_mimi()
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 24000 * 24 + 700)).astype(np.float32)
    with torch.no_grad():
        whole = mimi.encode(torch.from_numpy(audio)[:, None])  # [2, K, T]
    assert whole.shape == (2, 2, 301) and len(torch.unique(whole)) > 50
    for frames in (encode_dataset.BLOCK_FRAMES, 7):
        old, encode_dataset.BLOCK_FRAMES = encode_dataset.BLOCK_FRAMES, frames
        try:
            got = encode_dataset.encode_audio(mimi, audio, "cpu")
        finally:
            encode_dataset.BLOCK_FRAMES = old
        assert torch.equal(got, whole.reshape(4, -1)), frames


def make_audio_dataset(folder):
    """What moshi-finetune reads: stereo 24 kHz wavs with their word alignments, a JSONL (two files
    of one conversation, one alone in a subfolder), a tokenizer, an untrained Mimi's weights and the
    config of a tiny Moshi (text card = the tokenizer's pieces, 2 codebooks per speaker)."""
    from safetensors.torch import save_file
    sp = make_tokenizer(folder / "spm")
    save_file(untrained_mimi().state_dict(), str(folder / "mimi.safetensors"))
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir()
    lines, words = [], SENTENCES[0].split() + SENTENCES[3].split()
    for name, seconds, conversation in (("c1", 2.0, "talk"), ("c2", 3.1, "talk"), ("sub/x", 3.0, None)):
        write_wav(folder / f"{name}.wav", rng.uniform(-0.3, 0.3, (2, int(24000 * seconds))))
        starts = np.sort(rng.uniform(0, seconds, 8))
        alignments = [[str(rng.choice(words)), [float(s), float(s + rng.uniform(0.05, 0.6))],
                       str(rng.choice(["SPEAKER_MAIN", "SPEAKER_OTHER"]))] for s in starts]
        (folder / f"{name}.json").write_text(json.dumps({"alignments": alignments}))
        line = {"path": f"{name}.wav", "duration": seconds}
        lines.append(json.dumps(dict(line, conversation=conversation) if conversation else line))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    lm_kwargs = dict(dim=32, text_card=sp.vocab_size(), existing_text_padding_id=3, n_q=4, dep_q=2, card=2048,
                     num_heads=2, num_layers=2, hidden_scale=4.125, causal=True, context=16, max_period=10000,
                     gating="silu", norm="rms_norm_f32", positional_embedding="rope", depformer_dim=16,
                     depformer_num_heads=2, depformer_num_layers=1, depformer_dim_feedforward=32,
                     depformer_multi_linear=True, depformer_pos_emb="none", delays=[0, 0, 1, 0, 1])
    (folder / "config.json").write_text(json.dumps({"lm_kwargs": lm_kwargs}))
    return sp, lm_kwargs


def encode_args(folder, **changes):
    args = dict(jsonl=str(folder / "data.jsonl"), mimi=str(folder / "mimi.safetensors"),
                tokenizer=str(folder / "spm.model"), config=str(folder / "config.json"), out=str(folder / "tokens"))
    args.update(changes)
    return [args.pop("jsonl")] + [x for k, v in args.items() for x in (f"--{k}", v)]


def test_encode_dataset_end_to_end(tmp_path):
    """The command on moshi-finetune's format: one array per conversation (its files joined in
    order) and per lone file, [1 + 2 K, T]; the text row is the Interleaver's (by events) for each
    file's frames, the audio rows Mimi's codes of each channel; a rerun skips what is written; then
    train.py trains a tiny Moshi-format model on the arrays."""
    import encode_dataset
    from moshi.models import loaders
    from moshi.models.lm import LMModel
    from safetensors.torch import save_file
    sp, lm_kwargs = make_audio_dataset(tmp_path)
    cmd = [sys.executable, os.path.join(HERE, "encode_dataset.py")] + encode_args(tmp_path) + ["--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(tmp_path / "tokens").as_posix() for p in (tmp_path / "tokens").rglob("*")
                  if p.is_file()) == ["sub/x.npy", "talk.npy"]
    mimi = loaders.get_mimi(str(tmp_path / "mimi.safetensors"), num_codebooks=2).eval()
    for target, names in (("talk", ["c1", "c2"]), ("sub/x", ["sub/x"])):
        array, start = np.load(tmp_path / "tokens" / f"{target}.npy"), 0
        assert array.dtype == np.int32 and array.shape[0] == 5
        for name in names:
            wav = encode_dataset.read_wav(str(tmp_path / f"{name}.wav"))
            frames = math.ceil(wav.shape[1] / 1920)
            alignments = [(w, tuple(ts), who) for w, ts, who in json.load(open(tmp_path / f"{name}.json"))["alignments"]]
            text = interleaver_by_events(alignments, frames, lambda w: sp.encode(w.strip()), 3, 0)
            assert array[0, start:start + frames].tolist() == text
            assert any(t not in (0, 3) for t in text)
            with torch.no_grad():
                codes = mimi.encode(torch.from_numpy(wav)[:, None]).reshape(4, -1).numpy()
            assert np.array_equal(array[1:, start:start + frames], codes)
            start += frames
        assert start == array.shape[1]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert again.returncode == 0 and "2 already written" in again.stdout and "[1/" not in again.stdout
    torch.manual_seed(0)
    save_file(LMModel(**lm_kwargs).state_dict(), str(tmp_path / "model.safetensors"))
    t = run_train(["--init", str(tmp_path / "model.safetensors"), "--init-config", str(tmp_path / "config.json"),
                   "--data", str(tmp_path / "tokens" / "talk.npy"), str(tmp_path / "tokens" / "sub" / "x.npy"),
                   "--scale", "2", "--steps", "2", "--batch", "2", "--ttt-layers", "1", "--ttt-chunk", "8",
                   "--eval-trials", "1", "--out", str(tmp_path / "run")])
    assert t.returncode == 0, t.stderr
    assert os.path.exists(tmp_path / "run" / "ckpt.pt")


def test_encode_dataset_refuses_bad_input_before_encoding(tmp_path, capsys):
    """A mono wav, another sample rate, a missing or malformed alignment, a duration that is not the
    file's, a bad JSONL line, a tokenizer that is not the model's, a model without the user's
    codebooks: one line, exit 2, no array written."""
    import encode_dataset
    make_audio_dataset(tmp_path)
    good = (tmp_path / "data.jsonl").read_text()
    rng = np.random.default_rng(1)
    write_wav(tmp_path / "mono.wav", rng.uniform(-0.3, 0.3, (1, 24000)))
    write_wav(tmp_path / "rate.wav", rng.uniform(-0.3, 0.3, (2, 16000)), rate=16000)
    write_wav(tmp_path / "noalign.wav", rng.uniform(-0.3, 0.3, (2, 24000)))
    write_wav(tmp_path / "badalign.wav", rng.uniform(-0.3, 0.3, (2, 24000)))
    (tmp_path / "badalign.json").write_text('{"alignments": [["word", [0.1], "SPEAKER_MAIN"]]}')
    sp_small = tmp_path / "other"
    import sentencepiece
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 5), model_prefix=str(sp_small),
                                             vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "mono_config.json").write_text(json.dumps({"lm_kwargs": dict(config["lm_kwargs"], n_q=2)}))
    write_wav(tmp_path / "empty.wav", np.zeros((2, 0)))
    write_wav(tmp_path / "cut.wav", rng.uniform(-0.3, 0.3, (2, 24000)))
    (tmp_path / "cut.wav").write_bytes((tmp_path / "cut.wav").read_bytes()[:-1000])
    outside = tmp_path.parent / f"{tmp_path.name}_outside.wav"
    write_wav(outside, rng.uniform(-0.3, 0.3, (2, 24000)))
    write_wav(tmp_path / "nan.wav", rng.uniform(-0.3, 0.3, (2, 24000)))
    for name in ("mono", "rate", "empty", "cut", "nan"):
        (tmp_path / f"{name}.json").write_text('{"alignments": []}')
    outside.with_suffix(".json").write_text('{"alignments": []}')
    cases = [(dict(), '{"path": "mono.wav", "duration": 1.0}', "channel"),
             (dict(), '{"path": "empty.wav", "duration": 0.0}', "no audio"),
             (dict(), '{"path": "cut.wav", "duration": 1.0}', "less audio than its header"),
             (dict(), '{"path": "nan.wav", "duration": NaN}', "duration nan"),
             (dict(), '{"path": "c1.wav", "duration": 2.0}', "listed twice"),
             (dict(), json.dumps({"path": str(outside), "duration": 1.0}), "outside"),
             (dict(), '{"path": "rate.wav", "duration": 1.0}', "16000 Hz"),
             (dict(), '{"path": "noalign.wav", "duration": 1.0}', "noalign.json"),
             (dict(), '{"path": "badalign.wav", "duration": 1.0}', "alignment 0"),
             (dict(), '{"path": "nan.wav", "duration": 9.0}', "duration 9.0"),
             (dict(), '{"path": "c1.wav"}', "data.jsonl:4"),
             (dict(), '{"path": "missing.wav", "duration": 1.0}', "missing.wav"),
             (dict(tokenizer=str(sp_small) + ".model"), "", "text card"),
             (dict(config=str(tmp_path / "mono_config.json")), "", "n_q 2"),
             (dict(mimi=str(tmp_path / "none.safetensors")), "", "none.safetensors")]
    for changes, line, says in cases:
        (tmp_path / "data.jsonl").write_text(good + line + "\n")
        with pytest.raises(SystemExit) as e:
            encode_dataset.main(encode_args(tmp_path, **changes))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("encode_dataset.py: error: "), err
        assert says in err[0], (says, err)
        assert not (tmp_path / "tokens").exists(), says


def test_encode_dataset_leaves_no_half_written_array(tmp_path, monkeypatch):
    """A run that dies while encoding its second array leaves the first whole and no second one
    (nothing a *.npy glob would take); the rerun encodes only the second."""
    import encode_dataset
    make_audio_dataset(tmp_path)
    real, calls = encode_dataset.np.save, []

    def dying_save(f, array):  # writes half, then dies, on the second array
        calls.append(1)
        if len(calls) == 2:
            f.write(b"\x93NUMPY half")
            raise KeyboardInterrupt
        real(f, array)
    monkeypatch.setattr(encode_dataset.np, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        encode_dataset.main(encode_args(tmp_path) + ["--device", "cpu"])
    written = sorted(p.name for p in (tmp_path / "tokens").rglob("*.npy"))
    assert len(written) == 1
    np.load(next((tmp_path / "tokens").rglob("*.npy")))  # whole
    monkeypatch.setattr(encode_dataset.np, "save", real)
    encode_dataset.main(encode_args(tmp_path) + ["--device", "cpu"])
    assert len(list((tmp_path / "tokens").rglob("*.npy"))) == 2


# ============================================================================================
# On a GPU: the paths a deployment runs (skipped where CUDA is absent; run on the device with
# `python -m pytest -q test_all.py -k cuda`)
# ============================================================================================

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("decay", [1.0, 0.97])
def test_cuda_scan_in_bf16_is_within_its_rounding(decay):
    """ttt_scan on bf16 inputs (the GPU group of chunks) against ttt_chunked in float64 on the same
    inputs, at a size where the GPU path groups chunks: output and gradients within 1e-2 relative
    (bf16's rounding; 2e-3 to 4e-3 seen on an H100)."""
    device, (d, h, T, C) = torch.device("cuda"), (1024, 2816, 4096, 256)
    g = torch.Generator(device).manual_seed(0)
    Z = torch.randn(2, T, h, device=device, generator=g).bfloat16()
    V = (0.1 * torch.randn(2, T, d, device=device, generator=g)).bfloat16()
    W = (torch.randn(d, h, device=device, generator=g) / h ** 0.5).bfloat16()
    dO = torch.randn(2, T, d, device=device, generator=g)
    results = []
    for fn, cast in ((ttt.ttt_chunked, torch.float64), (ttt.ttt_scan, torch.bfloat16)):
        xs = [x.to(cast).requires_grad_() for x in (Z, V, W)]
        out = fn(*xs, 0.01, C, decay=decay)
        out.backward(dO.to(out.dtype))
        results.append([out] + [x.grad for x in xs])
    for name, ref, got in zip(("O", "dZ", "dV", "dW"), *results):
        assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-2, name


@CUDA
def test_cuda_block_masks_made_before_are_the_ones_the_layers_read(tmp_path):
    """window_attention.make_block_masks(model, T, "cuda"), as train.py --compile-layers calls it
    before compiling, makes the mask under the key a compiled layer looks up (no mask made while
    the model runs); and train.py --compile-layers on the GPU (inductor) trains to eager's losses
    within bf16's rounding (1e-2 relative), dynamo meeting no functools.lru_cache on the way."""
    import window_attention
    torch.manual_seed(0)
    m = window_attention.apply_window_attention(M.build_model(dict(dim=64, num_heads=2, num_layers=2, context=64)))
    m = m.cuda()
    window_attention._BLOCK_MASKS.clear()
    window_attention.make_block_masks(m, 256, "cuda")
    made = set(window_attention._BLOCK_MASKS)
    M.compile_layers(m, True)
    try:
        with torch.no_grad():
            m.forward_text(torch.randint(0, M.VOCAB, (1, 1, 256), device="cuda"))
    finally:
        M.compile_layers(m, False)
    assert made == set(window_attention._BLOCK_MASKS) == {(256, 64, "cuda:0")}
    r = run_train(QUICK + ["--pretrain-only", "--device", "cuda", "--out", str(tmp_path / "base")])
    assert r.returncode == 0, r.stderr[-2000:]
    losses = {}
    for flag in ([], ["--compile-layers"]):
        r = run_train(QUICK + ["--init", str(tmp_path / "base" / "base.pt"), "--steps", "2", "--device", "cuda",
                               "--out", str(tmp_path / f"run{len(flag)}")] + flag)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "lru_cache" not in r.stderr, r.stderr[-2000:]  # no cache traced through (window_attention, ttt)
        losses[bool(flag)] = [float(line.split("| loss ")[1].split()[0]) for line in r.stdout.splitlines()
                              if line.startswith("step ") and "| stage 0" in line]
    assert len(losses[True]) == 2 and losses[True] == pytest.approx(losses[False], rel=1e-2), losses


def small_streaming_model(dtype, device, window=64, chunk=16, with_ttt=True, decay=1.0, seed=0, update_clip=0.0,
                          average_after=0, delta=0.0):
    """Everything a deployment streams, small: YaRN x4 at a fixed scale (L0 32) with a window of 64
    kept, TTT on two layers with embedding targets and modulo RoPE, non-zero conv and W_target."""
    torch.manual_seed(seed)
    m = M.build_model(dict(dim=128, num_heads=4, num_layers=4, context=window))
    settings = dict(window=window)
    if with_ttt:
        settings.update(yarn=dict(scale=4.0, original_len=32, widen_context=False), ttt_rope_modulo=True,
                        ttt=dict(layers=[1, 3], chunk_size=chunk, eta=0.5, target_source="embeddings", decay=decay,
                                 update_clip=update_clip, average_after=average_after, delta=delta))
    M.install(m, settings)
    with torch.no_grad():
        for g in m.modules():
            if isinstance(g, ttt.TTTGating):
                g.conv.weight.normal_(std=0.3)
                g.W_target.normal_(std=0.3)
    return m.to(device=device, dtype=dtype).eval()


@CUDA
@torch.no_grad()
@pytest.mark.parametrize("decay,clip,average,delta,compact", [
    (1.0, 0.0, 0, 0.0, None), (0.9, 0.0, 0, 0.0, None), (1.0, 48.0, 4, 0.0, None),  # update norms: 44-54
    (1.0, 48.0, 0, 0.5, None), (1.0, 48.0, 0, 0.5, False), (1.0, 0.0, 0, 0.0, True)])
def test_cuda_graphed_streaming_equals_eager_and_the_parallel_form(decay, clip, average, delta, compact):
    """The path users run: CUDAGraphed(lm.forward_text) one token per step, 256 steps (16 chunk
    boundaries, the window's KV cache wrapped 4 times), batch 2. Graphed equals eager bit for bit;
    in float32 both equal the parallel forward (within 1e-4; 1.7e-5 seen) and LMGen's greedy tokens,
    graphed and eager, are the parallel arg-max at every step; in bf16 streaming is no further from
    the float32 forward than the parallel bf16 forward is (1.25x allowed; 0.186 against 0.192 seen),
    with the exact state and with the compact one (the default with the erase)."""
    from moshi.models.lm import LMGen
    from moshi.utils.compile import CUDAGraphed, no_cuda_graph
    device, B, T = torch.device("cuda"), 2, 256
    x = torch.randint(0, 256, (B, 1, T), device=device, generator=torch.Generator(device).manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        m = small_streaming_model(dtype, device, decay=decay, update_clip=clip, average_after=average, delta=delta)
        for g in freeze.ttt_modules(m):
            g.compact_state = compact
        assert all(g.compact() == (bool(delta) if compact is None else compact) for g in freeze.ttt_modules(m))
        parallel = m.forward_text(x)[1].float()
        exact = copy.deepcopy(m).float().forward_text(x)[1].float()  # the same weights in float32
        outs = {}
        for name in ("eager", "graphed"):
            with m.streaming(B), (no_cuda_graph() if name == "eager" else contextlib.nullcontext()):
                step = CUDAGraphed(m.forward_text)
                outs[name] = torch.cat([step(x[..., t:t + 1])[1].float().clone() for t in range(T)], dim=2)
        assert torch.equal(outs["graphed"], outs["eager"]), dtype
        if dtype == torch.float32:
            torch.testing.assert_close(outs["graphed"], parallel, atol=1e-4, rtol=1e-4)
            tokens = {}
            for name in ("eager", "graphed"):
                gen = LMGen(m, use_sampling=False)
                with gen.streaming(B), (no_cuda_graph() if name == "eager" else contextlib.nullcontext()):
                    tokens[name] = torch.cat([gen.step(x[:, :0, :1])[:, 0] for _ in range(T)], dim=1)
            assert torch.equal(tokens["graphed"], tokens["eager"])
            fed = torch.cat([torch.full((B, 1), m.text_initial_token_id, device=device), tokens["graphed"][:, :-1]], 1)
            assert torch.equal(m.forward_text(fed[:, None])[1][:, 0].argmax(-1), tokens["graphed"])
        else:
            off = lambda a: (a - exact).abs().max().item()
            assert off(outs["graphed"]) <= 1.25 * off(parallel), (off(outs["graphed"]), off(parallel))


@CUDA
@torch.no_grad()
@pytest.mark.parametrize("delta", [0.0, 0.5])
def test_cuda_streaming_under_autocast_with_float32_ttt_layers(delta):
    """A run that trained the TTT layers (float32) on a bf16 base streams under bf16 autocast
    (model.logits, eval_passkey --streaming): token by token, 96 steps (6 chunk boundaries), batch
    2, no further from the float32 model than 1.25x the parallel form under the same autocast."""
    device, B, T = torch.device("cuda"), 2, 96
    x = torch.randint(0, 256, (B, T), device=device, generator=torch.Generator(device).manual_seed(0))
    m = small_streaming_model(torch.float32, device, delta=delta)
    exact = M.logits(m, x)
    m.to(torch.bfloat16)
    for g in freeze.ttt_modules(m):
        g.float()
    assert M.low_precision(m)
    parallel = M.logits(m, x)
    with m.streaming(B):
        streamed = torch.cat([M.logits(m, x[:, t:t + 1]) for t in range(T)], dim=1)
    off = lambda a: (a - exact).abs().max().item()
    assert off(streamed) <= 1.25 * off(parallel), (off(streamed), off(parallel))


@CUDA
@pytest.mark.parametrize("delta,mixed,window", [(0.0, False, 64), (1.0, False, 64), (1.0, True, 64), (1.0, False, 256)])
def test_cuda_streaming_passkey_decoding_replays_a_graph_and_equals_eager_and_parallel(delta, mixed, window,
                                                                                     monkeypatch):
    """eval_passkey --streaming on a GPU: its single-token steps replay one CUDA graph per stream.
    A document of 256 bytes, batch 3, with a window of 64 (the ring KV cache wraps while the prompt
    is fed, the graph captured there; 12 chunk boundaries) or 256 (the prompt in one step, the graph
    captured while decoding): a graph is captured and replayed, and the decoded digits equal eager
    streaming's (NO_CUDA_GRAPH); in float32 also greedy decoding on the parallel form. `mixed`: a
    bf16 base with float32 TTT layers (a trained run's checkpoint), so each step runs under bf16
    autocast inside the graph."""
    import moshi.utils.compile as moshi_compile
    made = []

    class Spy(moshi_compile.CUDAGraphed):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    device = torch.device("cuda")
    m = small_streaming_model(torch.float32, device, window=window, delta=delta)
    with torch.no_grad():
        m.text_linear.weight[48:58] += 0.5  # digits likely, as in the CPU test
    if mixed:
        m.to(torch.bfloat16)
        for g in freeze.ttt_modules(m):
            g.float()
        assert M.low_precision(m)
    tokens, _ = data.passkey_batch(data.load_corpus().val, 256, 3, torch.Generator().manual_seed(1))
    prompt = tokens[:, :-5].to(device)
    monkeypatch.setattr(moshi_compile, "CUDAGraphed", Spy)
    graphed = eval_passkey.streaming_greedy(m, prompt, 5)
    assert made and all(g._graph is not None for g in made)
    with moshi_compile.no_cuda_graph():
        eager = eval_passkey.streaming_greedy(m, prompt, 5)
    assert torch.equal(graphed, eager)
    if not mixed:
        with torch.no_grad():
            for _ in range(5):
                prompt = torch.cat([prompt, M.logits(m, prompt)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(graphed, prompt[:, -5:])


@CUDA
def test_cuda_erase_scan_in_groups_gives_the_chunk_loop():
    """The erase's scan as a GPU runs it (groups of GPU_GROUP_TOKENS, its Gram matrix in float32 from
    bf16 keys, the triangular solve) against the chunk loop in float64 on the same bf16 inputs: the
    output and the gradients of Z and V within 1e-2 relative (bf16's step is 3.9e-3), over 3 groups
    with a ragged last chunk, under bf16 autocast as train.py runs it; with its float32 products in
    TF32 as train.py allows them, within 1.25x the error they have in float32 (and not the same
    numbers: TF32 was used)."""
    device, C = torch.device("cuda"), 64
    T = 2 * ttt.GPU_GROUP_TOKENS + 3 * C + 17
    g = torch.Generator().manual_seed(0)
    Z = (torch.randn(2, T, 48, generator=g) + torch.randn(48, generator=g)).bfloat16()
    V = torch.randn(2, T, 24, generator=g).bfloat16()
    dO = torch.randn(2, T, 24, generator=g, dtype=torch.float64)

    def run(Z, V, precision, device, **autocast):
        Z, V = Z.to(device, precision).requires_grad_(), V.to(device, precision).requires_grad_()
        with torch.autocast(device.type, **autocast):
            out = ttt.ttt_delta_scan(Z, V, 0.3, C, 1.0)
        out.double().backward(dO.to(device))
        return [t.double().cpu() for t in (out, Z.grad, V.grad)]

    exact = run(Z, V, torch.float64, torch.device("cpu"), enabled=False)
    errors, before = {}, torch.backends.cuda.matmul.allow_tf32
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            got = run(Z, V, torch.bfloat16, device, dtype=torch.bfloat16)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        errors[tf32] = [((value - want).norm() / want.norm()).item() for value, want in zip(got, exact)]
    assert max(errors[False]) <= 1e-2, errors
    assert all(t <= 1.25 * f for t, f in zip(errors[True], errors[False])), errors
    assert errors[True] != errors[False], errors  # TF32 did round something: the check above is not vacuous


@CUDA
@pytest.mark.parametrize("delta", [0.0, 1.0])
def test_cuda_compiled_scan_equals_eager(delta):
    """Under torch.compile on a GPU the scans' float32 sums take their traceable form (a product
    with float32 output, then the add; eager fuses them in one baddbmm): with bf16 inputs, 16 chunks
    in groups of 4, the compiled output and gradients are within 1e-2 of eager's (relative norm;
    bf16's step is 3.9e-3) and the graph has no break (fullgraph)."""
    device, B, T, h, d, C = torch.device("cuda"), 2, 512, 64, 32, 32
    g = torch.Generator(device).manual_seed(0)
    Z, V = (torch.randn(B, T, n, device=device, generator=g, dtype=torch.bfloat16) for n in (h, d))
    W = torch.randn(d, h, device=device, generator=g, dtype=torch.bfloat16) * 0.1

    def run(fn):
        inputs = [t.clone().requires_grad_(True) for t in (Z, V, W)]
        if delta:  # the fast part alone
            out = fn(inputs[0], inputs[1], 0.3, C, delta, 4 * C).float()
        else:
            out = fn(inputs[0], inputs[1], inputs[2], 0.3, C, 4 * C).float()
        out.square().mean().backward()
        return [out.detach()] + [t.grad.float() for t in inputs if t.grad is not None]

    scan = ttt.ttt_delta_scan if delta else ttt.ttt_scan
    torch._dynamo.reset()
    eager, compiled = run(scan), run(torch.compile(scan, fullgraph=True))
    torch._dynamo.reset()
    for got, want in zip(compiled, eager):
        assert (got - want).norm() <= 1e-2 * want.norm(), ((got - want).norm() / want.norm()).item()


@CUDA
def test_cuda_window_attention_equals_moshis_masked_attention():
    """flex_attention's window against moshi's masked attention, float32, YaRN, head dim 128: the
    logits and every gradient within 1e-4 relative (2.3e-6 seen on an H100)."""
    import window_attention
    from moshi.modules.transformer import StreamingMultiheadAttention
    torch.manual_seed(0)
    device, T, context = torch.device("cuda"), 700, 100
    m = M.build_model(dict(dim=256, num_heads=2, num_layers=2, context=context)).to(device)
    yarn.apply_yarn(m, 4.0, context, widen_context=False)
    x = torch.randint(0, 256, (2, T + 1), device=device)
    results = []
    for flex in (False, True):
        for layer in m.transformer.layers:
            layer.self_attn.__class__ = window_attention.WindowAttention if flex else StreamingMultiheadAttention
        out = M.logits(m, x[:, :-1])
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()
        results.append([out.detach()] + [p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    assert max(((a - b).norm() / b.norm()).item() for a, b in zip(results[1], results[0])) < 1e-4

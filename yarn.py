"""YaRN: RoPE scaling for context extension, installed into a Moshi transformer.

Implements Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
Models" (arXiv 2309.00071), with HuggingFace transformers' semantics for every detail the paper
leaves open (truncated correction range, clamping, the attention factor on both q and k):

- vanilla RoPE       inv_freq[i] = b^(-2i/D)
- PI (linear)        inv_freq[i] / s                                   (paper eq. 10)
- NTK-aware          base becomes b * s^(D/(D-2))                      (paper eq. 16)
- YaRN               NTK-by-parts ramp between dim(beta_fast) and dim(beta_slow) (eq. 17-19)
                     plus the temperature sqrt(1/t) = 0.1 ln s + 1     (eq. 22)
- dynamic scaling    s = max(s, T / L) recomputed from the current length T (section 3.3);
                     parallel forward only: refused in moshi's streaming (see apply_yarn)

Usage:
    from moshi.models.lm import LMModel
    import yarn
    model = LMModel(...)                               # a pretrained moshi model
    yarn.apply_yarn(model, scale=4, original_len=3000) # RoPE replaced, context widened to 12000
    logits = model.forward_text(tokens)[1]

Only the standard library, torch and moshi's module types are used: copy this file alone.
"""
import math

import torch
from torch import nn


METHODS = ("none", "pi", "ntk", "yarn")


# ---------------------------------------------------------------------------------------------
# The math: inverse frequencies of the D/2 rotation pairs, float32, as pure functions.
# ---------------------------------------------------------------------------------------------

def vanilla_inv_freq(dim: int, base: float) -> torch.Tensor:
    """inv_freq[i] = base^(-2i/dim), i = 0 .. dim/2 - 1 (Su et al.; Moshi's `max_period` is base)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def pi_inv_freq(dim: int, base: float, scale: float) -> torch.Tensor:
    """Position Interpolation (Chen et al. 2023): every frequency divided by the scale."""
    return vanilla_inv_freq(dim, base) / scale


def ntk_inv_freq(dim: int, base: float, scale: float) -> torch.Tensor:
    """NTK-aware scaling: a larger base, b' = b * s^(D / (D - 2)), so the lowest pair is
    interpolated by exactly s while the highest frequencies are barely touched."""
    return vanilla_inv_freq(dim, base * scale ** (dim / (dim - 2)))


def correction_dim(num_rotations: float, dim: int, base: float, original_len: int) -> float:
    """The pair index i whose wavelength 2*pi*base^(2i/D) fits `num_rotations` times in
    `original_len`: dim(r) = D ln(L / (2 pi r)) / (2 ln b)."""
    return dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def correction_range(dim: int, base: float, original_len: int, beta_fast: float = 32.0,
                     beta_slow: float = 1.0, truncate: bool = True) -> tuple[float, float]:
    """(low, high): pairs below `low` rotate more than `beta_fast` times over the original
    context and are kept; pairs above `high` rotate less than `beta_slow` times and are
    interpolated. Clamped as transformers does (high to D - 1, not D/2 - 1)."""
    low = correction_dim(beta_fast, dim, base, original_len)
    high = correction_dim(beta_slow, dim, base, original_len)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(dim: int, base: float, scale: float, original_len: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = True) -> torch.Tensor:
    """YaRN's NTK-by-parts frequencies, [dim // 2] float32 (transformers' semantics).

    inv_freq[i] = extrapolation[i] * (1 - ramp[i]) + interpolation[i] * ramp[i]
    with extrapolation = vanilla, interpolation = vanilla / scale and a linear ramp from 0 at
    `low` to 1 at `high`.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even number, got {dim}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if original_len <= 0:
        raise ValueError(f"original_len must be > 0, got {original_len}")
    if not beta_fast > beta_slow > 0:
        raise ValueError(f"need beta_fast > beta_slow > 0, got {beta_fast}, {beta_slow}")
    extrapolation = vanilla_inv_freq(dim, base)
    interpolation = extrapolation / scale
    low, high = correction_range(dim, base, original_len, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001  # avoids a division by zero, as transformers does
    i = torch.arange(dim // 2, dtype=torch.float32)
    ramp = ((i - low) / (high - low)).clamp(0, 1)
    return extrapolation * (1 - ramp) + interpolation * ramp


def split_counts(dim: int, base: float, original_len: int, beta_fast: float = 32.0,
                 beta_slow: float = 1.0) -> tuple[int, int, int]:
    """How YaRN treats the dim/2 pairs: (kept: ramp 0, extrapolated as trained; blended: 0 < ramp
    < 1; interpolated: ramp 1, divided by the scale). Moshi 7B (head dim 128, L0 3000): (19, 24, 21)."""
    low, high = correction_range(dim, base, original_len, beta_fast, beta_slow)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    kept, interpolated = int((ramp == 0).sum()), int((ramp == 1).sum())
    return kept, dim // 2 - kept - interpolated, interpolated


def beta_fast_like_moshi(dim: int, base: float, original_len: int) -> float:
    """The largest beta_fast of 32 (the paper's), 16, 8, 4, 2 whose split keeps at least the share
    of RoPE pairs that the paper's 32 keeps in Moshi 7B (19 of 64, head dim 128, L0 3000); 1.5 if
    none does. 32 for Moshi 7B itself; 2 for head dim 32 at L0 128, where 32 keeps no pair (the
    fastest turns 20 times over L0) and YaRN x4 then loses the base's retrieval at L0 (results/default_run)."""
    share = split_counts(128, 10_000.0, 3000)[0] / 64
    for beta_fast in (32.0, 16.0, 8.0, 4.0, 2.0):
        if split_counts(dim, base, original_len, beta_fast)[0] >= share * (dim // 2):
            return beta_fast
    return 1.5  # beta_slow is 1: beta_fast must exceed it


def yarn_attention_factor(scale: float, mscale: float = 1.0, mscale_all_dim: float = 0.0) -> float:
    """The YaRN temperature as a factor on both cos and sin: sqrt(1/t) = 0.1 ln(s) + 1.

    q.k then grows by its square, i.e. the logits are divided by t. With `mscale` and
    `mscale_all_dim` both non-zero (DeepSeek's form) the factor is the ratio of two such terms.
    """
    def get_mscale(s: float, m: float = 1.0) -> float:
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    if mscale and mscale_all_dim:
        return get_mscale(scale, mscale) / get_mscale(scale, mscale_all_dim)
    return get_mscale(scale)


def dynamic_scale(length: int, original_len: int, scale: float = 1.0) -> float:
    """Dynamic scaling: the scale grows with the current length T, s' = max(s, T / L)."""
    return max(scale, length / original_len)


def rope_inv_freq(method: str, dim: int, base: float, scale: float, original_len: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = True) -> torch.Tensor:
    """The four methods side by side: `none` (vanilla), `pi`, `ntk`, `yarn`."""
    if method == "none" or scale == 1:
        return vanilla_inv_freq(dim, base)
    if method == "pi":
        return pi_inv_freq(dim, base, scale)
    if method == "ntk":
        return ntk_inv_freq(dim, base, scale)
    if method == "yarn":
        return yarn_inv_freq(dim, base, scale, original_len, beta_fast, beta_slow, truncate)
    raise ValueError(f"unknown RoPE method {method!r}, expected one of {METHODS}")


# ---------------------------------------------------------------------------------------------
# The module: a drop-in for moshi.modules.rope.RotaryEmbedding.
# ---------------------------------------------------------------------------------------------

class YarnRotaryEmbedding(nn.Module):
    """RoPE with PI / NTK / YaRN scaling; same call as moshi's RotaryEmbedding.

    Rotation in float32, Moshi's interleaved pair layout (x[2i], x[2i+1]) or the concatenated
    one, streaming `offset` ([B] tensor) honoured. q and k are both multiplied by the attention
    factor (YaRN only). With `dynamic`, the scale is max(scale, (offset + T) / original_len).
    """

    def __init__(self, scale: float = 1.0, original_len: int = 4096, method: str = "yarn",
                 max_period: float = 10_000.0, interleave: bool = True,
                 beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                 mscale: float = 1.0, mscale_all_dim: float = 0.0, dynamic: bool = False):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown RoPE method {method!r}, expected one of {METHODS}")
        if not scale >= 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        if original_len <= 0:
            raise ValueError(f"original_len must be > 0, got {original_len}")
        self.scale, self.original_len, self.method = float(scale), int(original_len), method
        self.max_period, self.interleave = max_period, interleave
        self.beta_fast, self.beta_slow, self.truncate = beta_fast, beta_slow, truncate
        self.mscale, self.mscale_all_dim, self.dynamic = mscale, mscale_all_dim, dynamic
        self._cache: dict = {}  # (dim, scale, device) -> (inv_freq on the device, factor)

    def frequencies(self, dim: int, scale: float) -> tuple[torch.Tensor, float]:
        """(inv_freq [dim / 2], attention factor) at a given scale."""
        inv_freq = rope_inv_freq(self.method, dim, self.max_period, scale, self.original_len,
                                 self.beta_fast, self.beta_slow, self.truncate)
        factor = 1.0
        if self.method == "yarn":
            factor = yarn_attention_factor(scale, self.mscale, self.mscale_all_dim)
        return inv_freq, factor

    def cos_sin(self, positions: torch.Tensor, dim: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """factor * cos and factor * sin of positions [..., T] -> [..., T, dim / 2], float32.

        The frequencies are cached; the angles are computed per call, in float32 as moshi does:
        a cos/sin table would have to be indexed by offsets only the device knows, and reading
        them on the host costs a synchronisation per attention layer."""
        key = (dim, scale, str(positions.device))
        if key not in self._cache:
            if len(self._cache) > 16:  # dynamic scaling visits many scales
                self._cache.clear()
            inv_freq, factor = self.frequencies(dim, scale)
            self._cache[key] = (inv_freq.to(positions.device), factor)
        inv_freq, factor = self._cache[key]
        angles = positions.float()[..., None] * inv_freq
        return angles.cos() * factor, angles.sin() * factor

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: torch.Tensor,
                time_before_heads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [B, H, T, D] (or [B, T, H, D] with `time_before_heads`); offset: [B] long."""
        T, D = (q.shape[1], q.shape[3]) if time_before_heads else (q.shape[2], q.shape[3])
        if D % 2:
            raise ValueError(f"head dim must be even for RoPE, got {D}")
        offset = offset.view(-1)
        scale = self.scale
        if self.dynamic:  # the current length is needed on the host: one synchronisation
            scale = dynamic_scale(int(offset.max()) + T, self.original_len, self.scale)
        positions = offset[:, None] + torch.arange(T, device=q.device)  # [B, T]
        cos, sin = self.cos_sin(positions, D, scale)  # [B, T, D/2]
        cos, sin = (cos[:, :, None], sin[:, :, None]) if time_before_heads else (cos[:, None], sin[:, None])
        return _Rotation.apply(q, cos, sin, self.interleave), _Rotation.apply(k, cos, sin, self.interleave)


class _Rotation(torch.autograd.Function):
    """rotate() with a backward that rotates the gradient by the opposite angles (a rotation's
    Jacobian is its transpose; the attention factor scales both): it keeps only cos and sin,
    not the float32 intermediates autograd would save, and runs as one more rotation."""

    @staticmethod
    def forward(ctx, x, cos, sin, interleave):
        ctx.save_for_backward(cos, sin)
        ctx.interleave = interleave
        return rotate(x, cos, sin, interleave)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin, ctx.interleave), None, None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotates the pairs of x's last dim by the angles whose (scaled) cos and sin are given,
    in float32, returning x's dtype. Pairs are (x[2i], x[2i+1]) when interleaved (Moshi),
    else (x[i], x[i + D/2])."""
    D = x.shape[-1]
    if interleave:
        pairs = x.float().unflatten(-1, (D // 2, 2))
        xr, xi = pairs[..., 0], pairs[..., 1]
    else:
        xr, xi = x.float()[..., : D // 2], x.float()[..., D // 2:]
    out_r = xr * cos - xi * sin
    out_i = xr * sin + xi * cos
    if interleave:
        return torch.stack([out_r, out_i], dim=-1).flatten(-2).to(x.dtype)
    return torch.cat([out_r, out_i], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Installing it into a moshi model.
# ---------------------------------------------------------------------------------------------

def _refuse_dynamic_streaming(attention: nn.Module, args: tuple) -> None:
    """Dynamic scaling cannot stream exactly through moshi's attention: its KV cache keeps keys
    after RoPE, each rotated at the scale of its own step, while later queries use a larger scale
    (the YaRN paper, section 3.3, caches keys before RoPE for this reason)."""
    rope = getattr(attention, "rope", None)
    if getattr(rope, "dynamic", False) and getattr(attention, "_streaming_state", None) is not None:
        raise RuntimeError("dynamic YaRN cannot stream exactly: moshi's KV cache keeps keys rotated at the "
                           "scale of their own step while later queries use a larger one; stream with a "
                           "fixed scale (dynamic=False, scale = the longest length / original_len)")


def apply_yarn(model: nn.Module, scale: float, original_len: int, method: str = "yarn",
               beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
               mscale: float = 1.0, mscale_all_dim: float = 0.0, dynamic: bool = False,
               widen_context: bool = True) -> nn.Module:
    """Replaces the RoPE of every attention layer of a moshi `LMModel` or `StreamingTransformer`
    (in place) and returns the model.

    Each attention's `context` (its sliding window, and the streaming KV cache's capacity; Moshi
    7B: 3000) is widened to at least ceil(scale * original_len): extending RoPE without it
    extends nothing. Pass `widen_context=False` to keep a deliberate window. The settings are
    recorded as `model.yarn_settings` so a checkpoint can carry them.

    A fixed scale streams exactly (moshi's LMGen, CUDA graphs included). `dynamic=True` is
    refused inside `model.streaming(...)`: moshi caches keys after RoPE, so keys rotated at an
    earlier, smaller scale would meet queries at a larger one.
    """
    transformer = getattr(model, "transformer", model)
    old = getattr(transformer, "rope", None)
    if old is None or not hasattr(transformer, "layers"):
        raise ValueError("apply_yarn needs a moshi LMModel or StreamingTransformer with RoPE "
                         f"(positional_embedding='rope'), got {type(model).__name__}")
    rope = YarnRotaryEmbedding(scale, original_len, method, old.max_period, old.interleave,
                               beta_fast, beta_slow, truncate, mscale, mscale_all_dim, dynamic)
    transformer.rope = rope  # one module shared by all layers, as moshi does
    needed = math.ceil(scale * original_len)
    for layer in transformer.layers:
        attention = layer.self_attn
        attention.rope = rope
        if not getattr(attention, "_yarn_checks_streaming", False):
            attention.register_forward_pre_hook(_refuse_dynamic_streaming)
            attention._yarn_checks_streaming = True
        if widen_context and attention.context is not None and attention.context < needed:
            attention.context = needed
    model.yarn_settings = dict(scale=float(scale), original_len=int(original_len), method=method,
                               beta_fast=beta_fast, beta_slow=beta_slow, truncate=truncate,
                               mscale=mscale, mscale_all_dim=mscale_all_dim, dynamic=dynamic)
    return model

"""In-Place Test-Time Training: the MLP down projection as fast weights, for Moshi.

Implements "In-Place Test-Time Training" (Feng et al., ICLR 2026; the submission's text, as read
here, is in the public repository AlufRon/moshi_in_place, papers/ttt_in_place_paper.txt; official
code ByteDance-Seed/In-Place-TTT, `Qwen3MLP` in hf_models/hf_qwen3/modeling_qwen3.py).
The gated MLP computes O = Z Wd^T with Z = act(H Wg^T) * (H Wu^T). Only the down projection Wd
(Moshi's `gating.linear_out`) adapts while the sequence is read, chunk by chunk (chunk size C):

    O_i      = Z_i Wd_i^T                       chunk i uses the weight left by chunks j < i
    Wd_(i+1) = Wd_i + eta * V_i^T Z_i            Eq. (1): a step on the loss -<Z Wd^T, V>_F
    V        = Conv1D(X) W_target                section 3.2: a depthwise conv within each chunk
                                                 (zero-initialised), then a d x d projection used
                                                 untransposed as the official `ttt_proj.weight`
                                                 (or none: V = Conv1D(X), official `ttt_proj: false`)

Every form below carries the sum of updates S_i = eta * sum_(j<i) V_j^T Z_j (so Wd_i = Wd_0 + S_i):
`ttt_chunked` reads Eq. (1) literally, `ttt_prefix_sum` is the official parallel form (section
3.4, Algorithm 1), `ttt_scan` the memory-bounded form TTTGating runs, `streaming_step` one token at
a time for moshi's LMGen, `streaming_prefill` a prompt at once into a fresh stream. X is the
MLP input (the official default for continual training) or the token embeddings (the paper's X0).
The conv starts at zero, so a freshly converted model equals the base model. Causality holds
because chunk i only sees updates from chunks before it; the last chunk's update is never used.

An option of this project, not the paper's: `decay` gamma forgets, per chunk,

    S_(i+1) = gamma * S_i + eta * V_i^T Z_i       (gamma = 1: Eq. (1))

so the sum of updates stays bounded on a stream without end, as the forgetting gates of gated
delta rules and Titans do; results/horizon says what it does past the trained length.

The paper's inference clipping (Appendix D.2; not in the official code), `update_clip` tau, scales
each chunk's update down to Frobenius norm tau when it is larger:

    eta V_i^T Z_i  ->  eta V_i^T Z_i * min(1, tau / |eta V_i^T Z_i|_F)     (tau = 0: no clipping)

A per-chunk factor on V_i, so every form below takes it as `clip_factors` scaling V.

Another option of this project, `average_after` K: past K chunks, a chunk reads K times the mean
of the updates before it instead of their sum,

    Wd_i = Wd_0 + (K / max(i, K)) * S_i          (K = 0: the sum, Eq. (1))

so what a chunk reads keeps the size it had at chunk K however long the stream, and no update is
forgotten: each is diluted (K / i) rather than decayed (gamma^i). A factor on the fast part's
output per chunk (`average_factors`).

A third option of this project, `delta` rho in (0, 1]: before chunk i writes, the fast weight
forgets what it holds along chunk i's keys, the erase of the delta rule (DeltaNet, gated delta
rules, Titans), normalised by the size of the keys' second moment so that it never amplifies:

    S_(i+1) = S_i + (eta V_i - (rho / |Z_i^T Z_i|_F) Z_i S_i^T)^T Z_i       (rho = 0: Eq. (1))
            = S_i (I - rho Z_i^T Z_i / |Z_i^T Z_i|_F) + eta V_i^T Z_i

The write eta V_i^T Z_i is the paper's. Along the eigenvector k of Z_i^T Z_i (eigenvalue lambda_k)
the erase removes the fraction rho lambda_k / sqrt(sum_k lambda_k^2) <= rho of what S held: nearly
rho along a dominant direction, the one every chunk of text shares, and almost nothing along
directions the chunk barely touches. So what any text writes stops growing, and what one chunk
wrote where others rarely write (a needle) stays. I - rho Z^T Z / |Z^T Z|_F has eigenvalues in
[1 - rho, 1]: the erase never amplifies what S holds, for any input. Z_i S_i^T is what chunk i
reads anyway; |Z_i^T Z_i|_F comes from the C x C Gram matrix, |Z_i^T Z_i|_F = |Z_i Z_i^T|_F.
TTTGating runs it as `ttt_delta_scan`: groups of chunks, S read and written once per group, the
group's erases from one triangular solve (the dual form of the same steps).
train.py runs rho = 1 by default (on a GPU it held far needles to 16x the trained length, where the
sum holds them to 4x; results/horizon); the functions here default to the paper's rho = 0.
With `update_clip`, the paper's clipping applies to the write alone, not to the erase. Not
combined with `decay` or `average_after` (each already bounds the sum another way).

Usage:
    import ttt
    ttt.apply_ttt(model, layers=ttt.default_layers(len(model.transformer.layers)),
                  chunk_size=1024, eta=0.3)       # moshi LMModel, gating MLPs replaced in place
    logits = model.forward_text(tokens)[1]       # identical to the base model at init

Only the standard library, torch and moshi's streaming base class are used: copy this file alone.
"""
import functools
import typing as tp
from dataclasses import dataclass

import torch
from moshi.modules.streaming import State, StreamingModule
from torch import nn
from torch.nn import functional as F


# ---------------------------------------------------------------------------------------------
# The math: Eq. (1) read literally, and the official parallel form.
# ---------------------------------------------------------------------------------------------

def ttt_chunked(Z: torch.Tensor, V: torch.Tensor, W_down: torch.Tensor, eta: float,
                chunk_size: int, decay: float = 1.0, update_clip: float = 0.0,
                average_after: int = 0, delta: float = 0.0) -> torch.Tensor:
    """The chunked fast-weight MLP output, Eq. (1) read literally: one chunk after another.

    Z: [B, T, h] gated activations, V: [B, T, d] targets, W_down: [d, h] (the layout of
    `linear_out.weight`). Returns O: [B, T, d] where chunk i is computed with
    W_down + eta * sum over chunks j < i of decay^(i - 1 - j) V_j^T Z_j. Any T: the last chunk
    may be shorter, and chunk_size >= T is one chunk, i.e. the plain MLP. With `update_clip` tau > 0
    each update eta V_j^T Z_j is scaled to Frobenius norm tau where it is larger (Appendix D.2).
    With `average_after` K > 0, chunk i reads W_down + (K / max(i, K)) * (its sum of updates).
    With `delta` rho > 0, each update also erases rho / |Z_i^T Z_i|_F * (Z_i S_i^T)^T Z_i, S_i = W - W_down.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    B, T, h = Z.shape
    W = W_down.expand(B, *W_down.shape)  # [B, d, h]: one fast weight per sequence
    outputs = []
    for start in range(0, T, chunk_size):
        Z_i = Z[:, start:start + chunk_size]  # [B, C, h]
        V_i = V[:, start:start + chunk_size]  # [B, C, d]
        i = start // chunk_size  # the number of chunks before this one
        read = W if not average_after or i <= average_after else W_down + (average_after / i) * (W - W_down)
        outputs.append(torch.einsum("bch,bdh->bcd", Z_i, read))
        update = eta * torch.einsum("bcd,bch->bdh", V_i, Z_i)  # [B, d, h]
        if update_clip > 0:  # times min(1, tau / |update|_F), written to stay finite where the update is 0
            square = (update * update).sum(dim=(1, 2), keepdim=True)
            update = update * (square / update_clip ** 2).clamp(min=1.0).rsqrt()
        if delta > 0:  # the erase along the chunk's keys; vanishing keys (see _erase_factor) erase nothing
            second = torch.einsum("bch,bcg->bhg", Z_i, Z_i)  # Z_i^T Z_i, [B, h, h]
            factor = _erase_factor((second * second).sum(dim=(1, 2)), delta)[:, None, None]  # rho / |Z_i^T Z_i|_F
            read_fast = torch.einsum("bch,bdh->bcd", Z_i, W - W_down)  # Z_i S_i^T
            update = update - factor * torch.einsum("bcd,bch->bdh", read_fast, Z_i)
        W = W_down + decay * (W - W_down) + update
    return torch.cat(outputs, dim=1)


def ttt_prefix_sum(Z: torch.Tensor, V: torch.Tensor, W_down: torch.Tensor, eta: float,
                   chunk_size: int) -> torch.Tensor:
    """The official parallel form (section 3.4, Algorithm 1): every chunk's update at once, then an
    exclusive prefix sum over the chunk axis n gives each chunk its weight, Eq. (1) unrolled:
        Wd_i = Wd_0 + eta * sum_(j<i) V_j^T Z_j,    O_i = Z_i Wd_i^T
    It holds one [d, h] weight per chunk and sequence: the readable form, not the one to run at
    Moshi's size (ttt_scan). Z: [B, T, h], V: [B, T, d], W_down: [d, h]; any T."""
    B, T, h = Z.shape
    n = -(-T // chunk_size)
    Zc = F.pad(Z, (0, 0, 0, n * chunk_size - T)).view(B, n, chunk_size, h)  # [b, n, c, h]
    Vc = F.pad(V, (0, 0, 0, n * chunk_size - T)).view(B, n, chunk_size, -1)  # [b, n, c, d]
    dW = torch.einsum("bncd,bnch->bndh", Vc, Zc)  # each chunk's update
    W = W_down + eta * (torch.cumsum(dW, dim=1) - dW)  # [b, n, d, h]: the updates of the chunks before
    return torch.einsum("bnch,bndh->bncd", Zc, W).reshape(B, n * chunk_size, -1)[:, :T]


def conv_within_chunks(x: torch.Tensor, conv: nn.Conv1d, chunk_size: int) -> torch.Tensor:
    """Applies a 'same'-padded Conv1d over time to each chunk separately, x: [B, T, d].

    Zero padding at every chunk edge, as the official code does: no target reaches across a
    chunk boundary. A ragged last chunk is zero-padded, which is the same as its edge padding.
    """
    B, T, d = x.shape
    n = -(-T // chunk_size)
    if n * chunk_size != T:
        x = F.pad(x, (0, 0, 0, n * chunk_size - T))
    x = x.reshape(B * n, chunk_size, d).transpose(1, 2)  # [B * n, d, C]
    y = conv(x).transpose(1, 2).reshape(B, n * chunk_size, d)
    return y[:, :T]


def clip_factors(Z: torch.Tensor, V: torch.Tensor, eta: float, chunk_size: int,
                 update_clip: float) -> torch.Tensor:
    """[B, T, 1] float32: min(1, tau / |eta V_i^T Z_i|_F) of each token's chunk i, so that V times
    it gives every form the clipped updates. The norm without forming the [d, h] update, from the
    chunk's C x C Gram matrices: |V_i^T Z_i|_F^2 = sum((V_i V_i^T) * (Z_i Z_i^T)). In float32."""
    B, T, h = Z.shape
    n, wide = -(-T // chunk_size), torch.promote_types(Z.dtype, torch.float32)
    Zc = F.pad(Z.to(wide), (0, 0, 0, n * chunk_size - T)).view(B * n, chunk_size, h)
    Vc = F.pad(V.to(wide), (0, 0, 0, n * chunk_size - T)).view(B * n, chunk_size, -1)
    return _clip_factor(Zc, Vc, eta, update_clip).view(B, n, 1).repeat_interleave(chunk_size, dim=1)[:, :T]


def _clip_factor(Z: torch.Tensor, V: torch.Tensor, eta: float, update_clip: float) -> torch.Tensor:
    """[N] min(1, tau / |eta V^T Z|_F) for Z [N, C, h], V [N, C, d] (float32 or float64), written as
    (max(1, |eta V^T Z|^2 / tau^2))^(-1/2): finite gradients where the update is zero (V starts at 0)."""
    square = (torch.bmm(V, V.transpose(1, 2)) * torch.bmm(Z, Z.transpose(1, 2))).sum((1, 2))
    return (square * (eta / update_clip) ** 2).clamp(min=1.0).rsqrt()


def erase_factors(Z: torch.Tensor, delta: float) -> torch.Tensor:
    """[N] rho / |Z^T Z|_F for chunks Z [N, C, h], |Z^T Z|_F from the C x C Gram matrix (|Z^T Z|_F =
    |Z Z^T|_F), in float32 at least (without a gradient: products in Z's dtype, float32 sums).
    0 where |Z^T Z|_F is below about 2e-10 (float32; see _erase_factor): keys that vanish erase
    nothing, rather than divide by a norm rounded towards zero."""
    if torch.is_grad_enabled() and Z.requires_grad:  # differentiable; in float32 under bf16 autocast too
        with torch.autocast(Z.device.type, enabled=False):
            return _erase_factor(_gram_square(Z.to(torch.promote_types(Z.dtype, torch.float32))), delta)
    return _erase_factor(_gram_square(Z), delta)


def _erase_factor(square: torch.Tensor, delta: float) -> torch.Tensor:
    """rho / sqrt(square), 0 where square is below 1 / sqrt(its dtype's largest float) (float32:
    5e-20, |Z^T Z|_F below 2e-10). Above it the gradient, -rho / (2 square^1.5), stays finite with
    room for the gradient it is multiplied by (float32: 8e9); below it that room shrinks, and under
    about 1e-26 the gradient overflows on its own."""
    normal = square >= torch.finfo(square.dtype).max ** -0.5
    return torch.where(normal, delta * torch.where(normal, square, 1.0).rsqrt(), 0.0)


def average_factors(T: int, chunk_size: int, average_after: int, like: torch.Tensor) -> torch.Tensor:
    """[T, 1]: K / max(i, K) for a token of chunk i (chunks 0 .. K read their plain sum), in float32
    (float64 for float64 `like`) on like's device."""
    i = torch.div(torch.arange(T, device=like.device), chunk_size, rounding_mode="floor")
    return (average_after / i.clamp(min=average_after).to(torch.promote_types(like.dtype, torch.float32)))[:, None]


def default_layers(num_layers: int) -> list[int]:
    """The official choice is every 6th layer (0, 6, 12, ...; Moshi 7B's 32 layers give 6).
    Models with fewer than 12 layers would get one or two, so they take every 2nd layer."""
    every = 6 if num_layers >= 12 else 2
    return list(range(0, num_layers, every))


# ---------------------------------------------------------------------------------------------
# The module: a drop-in for moshi.modules.gating.ActivationGating.
# ---------------------------------------------------------------------------------------------

@dataclass
class _TTTState(State):
    """Streaming state of one TTTGating. Every field is a device tensor of fixed shape, changed in
    place, and every step runs the same kernels whatever its position (see
    `streaming_step`): a CUDA graph captured at one step replays correctly at all others.
    Each sequence of the batch has its own position, so moshi's exec_mask and per-sequence
    reset_streaming work as they do for moshi's own modules. `half` is the conv's kernel_size // 2."""
    offset: torch.Tensor  # [B] long: tokens seen; the token at offset t sits in slot t % C of its chunk
    source: torch.Tensor  # [B, 2 half + 1, d] the target generator's last 2 half + 1 inputs, the token at
    #                       offset t in row t % (2 half + 1): all that can still change a target
    V: torch.Tensor  # [B, half + C, d] its targets as far as its inputs are known, slot s at row half + s
    Z: torch.Tensor  # [B, C, h] its fast-path Z, by slot
    Z_prev: torch.Tensor  # [B, C, h] Z of the last completed chunk
    V_prev: torch.Tensor  # [B, C, d] its targets V = Conv1D(X) W_target
    S: torch.Tensor  # [B, d, h] float32 (the model's dtype with compact_state): the sum of updates
    #                  (eta * sum of V_j^T Z_j, as the layer's options change it) over the completed
    #                  chunks before the last, plus the rows of the last one folded in so far
    S_read: torch.Tensor  # [B, d, h] S in the model's dtype, what a step reads (the parallel form
    #                       reads its float32 sum cast the same way); S itself where S has that dtype
    square: torch.Tensor  # [B] float32 with `delta`: |Z^T Z|_F^2 of the chunk being filled, so far
    square_prev: torch.Tensor  # [B] the same of the last completed chunk

    def reset(self, reset_mask: torch.Tensor) -> None:
        super().reset(reset_mask)
        for buffer in (self.offset, self.source, self.V, self.Z, self.Z_prev, self.V_prev, self.S, self.S_read,
                       self.square, self.square_prev):
            buffer.masked_fill_(reset_mask.view(-1, *[1] * (buffer.dim() - 1)), 0)


class TTTGating(StreamingModule[_TTTState]):
    """Gated MLP whose down projection is a fast weight, updated chunk by chunk.

    Same `linear_in` (d -> 2h, gate then up) and `linear_out` (h -> d) as moshi's
    ActivationGating, so its weights and checkpoint keys carry over. Adds the target generator:
    `conv` (depthwise, kernel 5, zero init; the official `ttt_conv`) and `W_target` (d x d,
    diagonal N(0, 0.02), V = conv(X) @ W_target as the official `ttt_proj.weight`; None with
    `target=False`, V = conv(X)).

    `z_transform(Z, positions)`, if set, is applied to Z in the fast-weight path only (the reads
    and writes of the fast weight, not the base product Z Wd_0^T), e.g. a modulo RoPE.
    `x0` is set by a hook on the transformer when targets come from the token embeddings.

    Inside moshi's `with model.streaming(B):` it gives the parallel form's outputs token by
    token, keeping everything in device tensors (`_TTTState`), so moshi's LMGen can capture a
    step in a CUDA graph (its default). See `streaming_step` for how a chunk's update is folded
    in without a branch. A prompt fed at once into a fresh stream runs the parallel form and hands
    its state over (`streaming_prefill`). A compact state (`compact_state`, set before
    `streaming()`; by default on with the erase `delta`, off without) keeps the sum of updates in
    the model's dtype alone: for bf16, one copy per stream and layer instead of a float32 sum and
    its bf16 read copy, each fold rounding it (results/serving: the drift, the streams per GPU).
    """

    def __init__(self, dim: int, hidden: int, activation: tp.Callable, chunk_size: int,
                 eta: float, kernel_size: int = 5, target_source: str = "hidden",
                 target_init_std: float = 0.02, target: bool = True, decay: float = 1.0,
                 update_clip: float = 0.0, average_after: int = 0, delta: float = 0.0):
        super().__init__()
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if not update_clip >= 0:
            raise ValueError(f"update_clip must be >= 0 (0: none), got {update_clip}")
        if average_after < 0 or average_after != int(average_after):
            raise ValueError(f"average_after must be a whole number of chunks >= 0 (0: none), got {average_after}")
        if not 0 <= delta <= 1:
            raise ValueError(f"delta must be in [0, 1] (0: none), got {delta}")
        if delta and (decay != 1 or average_after):
            raise ValueError(f"delta {delta} with decay {decay} or average_after {average_after}: each bounds the "
                             f"sum of updates another way; use one")
        if kernel_size <= 0 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and > 0, got {kernel_size}")
        if target_source not in ("hidden", "embeddings"):
            raise ValueError(f"target_source must be 'hidden' or 'embeddings', got {target_source!r}")
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)
        self.activation = activation
        self.chunk_size, self.eta, self.target_source = chunk_size, float(eta), target_source
        self.decay = float(decay)  # this project's forgetting per chunk; 1: the paper's rule
        self.update_clip = float(update_clip)  # the paper's clipping of each update's norm; 0: none
        self.average_after = int(average_after)  # ours: past this many chunks, K times the mean; 0: the sum
        self.delta = float(delta)  # ours: the delta rule's erase along each chunk's keys; 0: none
        # Streaming only, a serving choice: keep the sum of updates in the model's dtype, one copy per
        # stream (bf16: half of the float32 sum and no read copy); each fold rounds the update to it,
        # then the sum. None: compact with the erase, which bounds the sum so the rounding does not
        # accumulate (results/serving: no drift over an hour), exact without it (the plain sum drifts).
        self.compact_state: tp.Optional[bool] = None
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=False)
        nn.init.zeros_(self.conv.weight)
        W_target = nn.Parameter(torch.diag(torch.randn(dim) * target_init_std)) if target else None
        self.register_parameter("W_target", W_target)  # [d, d]: V = conv(X) @ W_target
        self._register_load_state_dict_pre_hook(_refuse_earlier_target, with_module=True)
        self.z_transform: tp.Optional[tp.Callable] = None
        self.x0: tp.Optional[torch.Tensor] = None

    def ttt_parameters(self) -> list[nn.Parameter]:
        """What TTT adds to the base MLP: the conv and W_target (if any)."""
        return [self.conv.weight] + ([self.W_target] if self.W_target is not None else [])

    def targets(self, source: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """V = Conv1D(X) W_target [B, T, d], the conv within chunks of `chunk_size`."""
        V = conv_within_chunks(source, self.conv, chunk_size)
        return V if self.W_target is None else V @ self.W_target.to(V.dtype)

    def down_weight(self) -> torch.Tensor:
        """Wd_0 [d, h], the fast weight's starting value: linear_out's weight, or W + s B A when
        moshi's LoRA wraps it (differentiable, so the LoRA factors train through the fast path)."""
        out = self.linear_out
        if hasattr(out, "frozen_W"):  # moshi.modules.lora.LoRALinear
            return out.frozen_W.weight + out.scaling * (out.lora_B.weight @ out.lora_A.weight)
        return out.weight

    def compact(self) -> bool:
        """Whether a stream keeps its sum of updates in the model's dtype alone (`compact_state`)."""
        return bool(self.delta) if self.compact_state is None else bool(self.compact_state)

    def _init_streaming_state(self, batch_size: int) -> _TTTState:
        W = self.down_weight()
        (d, h), B, C, half = W.shape, batch_size, self.chunk_size, self.conv.kernel_size[0] // 2
        zeros = lambda *shape, dtype=W.dtype: torch.zeros(*shape, device=W.device, dtype=dtype)
        S = zeros(B, d, h, dtype=W.dtype if self.compact() else torch.promote_types(W.dtype, torch.float32))
        return _TTTState(B, W.device, offset=zeros(B, dtype=torch.long), source=zeros(B, 2 * half + 1, d),
                         V=zeros(B, half + C, d), Z=zeros(B, C, h), Z_prev=zeros(B, C, h),
                         V_prev=zeros(B, C, d), S=S, S_read=S if W.dtype == S.dtype else zeros(B, d, h),
                         square=zeros(B, dtype=torch.promote_types(W.dtype, torch.float32)),
                         square_prev=zeros(B, dtype=torch.promote_types(W.dtype, torch.float32)))

    def _inputs(self, x: torch.Tensor, x0: tp.Optional[torch.Tensor],
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Z [B, T, h], the target source [B, T, d] and Z for the fast path, for x [B, T, d] at
        `positions` ([T] or [B, T])."""
        B, T, _ = x.shape
        gate, up = self.linear_in(x).view(B, T, 2, -1).unbind(dim=2)
        Z = self.activation(gate) * up
        source = x if self.target_source == "hidden" else x0
        if source is None or source.shape[:2] != x.shape[:2]:
            raise RuntimeError("target_source='embeddings' needs the transformer hook of apply_ttt")
        Zf = Z if self.z_transform is None else self.z_transform(Z, positions)
        return Z, source, Zf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] (the normed hidden states) -> [B, T, d], in the products' dtype (bf16 under
        autocast), as moshi's ActivationGating returns it."""
        state = self._streaming_state
        if state is not None and x.shape[1] > 1 and _fresh(state):  # a prompt: all of it at once
            return streaming_prefill(self, x, self.x0, state)
        if state is not None:  # one token at a time: the same step for every token
            x0 = self.x0
            return torch.cat([streaming_step(self, x[:, t:t + 1], None if x0 is None else x0[:, t:t + 1], state)
                              for t in range(x.shape[1])], dim=1)
        return self._parallel(x, self.x0)

    def _parallel(self, x: torch.Tensor, x0: tp.Optional[torch.Tensor]) -> torch.Tensor:
        """The parallel form over x [B, T, d] from position 0."""
        Z, source, Zf = self._inputs(x, x0, torch.arange(x.shape[1], device=x.device))
        W = self.down_weight()
        V = self.targets(source, self.chunk_size).to(Zf.dtype)  # [B, T, d]
        if self.update_clip > 0:  # each chunk's update clipped: its V scaled
            V = (V * clip_factors(Zf, V, self.eta, self.chunk_size, self.update_clip)).to(Zf.dtype)
        if self.delta:  # the erase makes each chunk's update depend on S: a scan of its own
            return F.linear(Z, W) + ttt_delta_scan(Zf, V, self.eta, self.chunk_size, self.delta).to(Zf.dtype)
        if self.z_transform is None and not self.average_after:  # O_i = Z_i (Wd_0 + eta sum_(j<i) V_j^T Z_j)^T
            return ttt_scan(Z, V, W, self.eta, self.chunk_size, decay=self.decay)
        # The fast path reads and writes a transformed Z, or is scaled per chunk; the base product apart.
        fast = ttt_scan(Zf, V, None, self.eta, self.chunk_size, decay=self.decay)
        if self.average_after:
            fast = (fast * average_factors(x.shape[1], self.chunk_size, self.average_after, fast)).to(fast.dtype)
        return F.linear(Z, W) + fast


def _refuse_earlier_target(module: "TTTGating", state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints of an earlier version held an nn.Linear `target` (conv(X) @ weight^T): refused."""
    if prefix + "target.weight" in state_dict:
        raise ValueError(f"{prefix}target.weight: a checkpoint of an earlier version of ttt.py (an nn.Linear "
                         f"target, before W_target); retrain it with this one")


# ---------------------------------------------------------------------------------------------
# Installing it into a moshi model.
# ---------------------------------------------------------------------------------------------

def _keep_embeddings(transformer: nn.Module, args: tuple) -> None:
    """Hands the transformer's input [B, T, d] (the summed token embeddings, the paper's X0) to
    its TTT layers. It reads the layers from the module it is called on, so a copy of the model
    (copy.deepcopy) feeds its own layers."""
    for layer in transformer.layers:
        if isinstance(layer.gating, TTTGating):
            layer.gating.x0 = args[0]


def apply_ttt(model: nn.Module, layers: tp.Sequence[int], chunk_size: int, eta: float,
              kernel_size: int = 5, target_source: str = "hidden",
              target_init_std: float = 0.02, target: bool = True, decay: float = 1.0,
              update_clip: float = 0.0, average_after: int = 0, delta: float = 0.0) -> nn.Module:
    """Replaces `layer.gating` of the given layer indices of a moshi `LMModel` or
    `StreamingTransformer` by a TTTGating holding the same weights; returns the model.

    Checkpoint keys `...gating.linear_in.weight` / `...gating.linear_out.weight` are unchanged.
    The settings are recorded as `model.ttt_settings` so a checkpoint can carry them.

    The chunk may not be longer than the attention window (moshi's `context`; Moshi 7B: 3000):
    a token more than `context` steps into its chunk would be seen neither by attention nor
    by the fast weight, which holds only completed chunks.
    """
    transformer = getattr(model, "transformer", model)
    num_layers = len(transformer.layers)
    layers = sorted(set(int(i) for i in layers))
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"TTT layers must be a non-empty subset of 0..{num_layers - 1}, got {layers}")
    check_chunk_fits_window(chunk_size, window(transformer))
    for i in layers:
        old = transformer.layers[i].gating
        if isinstance(old, TTTGating):
            raise ValueError(f"layer {i} already has TTT")
        if not (hasattr(old, "linear_in") and isinstance(old.linear_out, nn.Linear)):
            raise ValueError(f"layer {i} has no gating MLP (linear_in / linear_out) to convert")
        hidden, dim = old.linear_out.in_features, old.linear_out.out_features
        weight = old.linear_out.weight
        with torch.device(weight.device):  # built where the model is (a 7B layer is 0.6 GB in float32)
            new = TTTGating(dim, hidden, old.activation, chunk_size, eta, kernel_size,
                            target_source, target_init_std, target, decay, update_clip, average_after, delta)
        new.to(dtype=weight.dtype)
        new.load_state_dict(old.state_dict(), strict=False)  # linear_in, linear_out
        transformer.layers[i].gating = new
    for m in model.modules():  # moshi caches the streaming children on first use
        if isinstance(m, StreamingModule):
            m._cached_children = None
    if target_source == "embeddings":
        transformer.register_forward_pre_hook(_keep_embeddings)
    model.ttt_settings = dict(layers=layers, chunk_size=int(chunk_size), eta=float(eta),
                              kernel_size=int(kernel_size), target_source=target_source,
                              target_init_std=float(target_init_std), target=bool(target), decay=float(decay),
                              update_clip=float(update_clip), average_after=int(average_after), delta=float(delta))
    return model


def window(transformer: nn.Module) -> tp.Optional[int]:
    """The shortest attention window (`context`) of a moshi transformer's layers; None if none."""
    contexts = [layer.self_attn.context for layer in transformer.layers
                if getattr(layer.self_attn, "context", None) is not None]
    return min(contexts, default=None)


def check_chunk_fits_window(chunk_size: int, context: tp.Optional[int]) -> None:
    """ValueError unless chunk_size <= context (None: full attention, any chunk fits)."""
    if context is not None and chunk_size > context:
        raise ValueError(f"TTT chunk {chunk_size} is longer than the attention window {context}: tokens more "
                         f"than {context} steps into a chunk would be seen neither by attention nor by the "
                         f"fast weight (it holds completed chunks only); use a chunk <= {context}")


def load_official_mlp(gating: TTTGating, state_dict: dict) -> TTTGating:
    """Loads one official In-Place TTT MLP (ByteDance-Seed/In-Place-TTT, `Qwen3MLP` of a TTT layer:
    `gate_proj`, `up_proj`, `down_proj`, `ttt_conv` and, unless `ttt_proj: false`, `ttt_proj`) into
    a TTTGating built with the same sizes and SiLU; returns it. The official config's `ttt_lr` is
    eta and `ttt_chunk` the chunk size: set them when building the TTTGating. The official code
    takes its targets' source as an argument; `target_source` chooses it here."""
    names = {"gate_proj.weight", "up_proj.weight", "down_proj.weight", "ttt_conv.weight"}
    names |= {"ttt_proj.weight"} if gating.W_target is not None else set()
    missing, extra = names - set(state_dict), set(state_dict) - names
    if missing or extra:
        raise ValueError(f"official TTT MLP state dict: missing {sorted(missing)}, unexpected {sorted(extra)} "
                         f"(a TTTGating built with target={gating.W_target is not None})")
    ours = {"linear_in.weight": torch.cat([state_dict["gate_proj.weight"], state_dict["up_proj.weight"]]),
            "linear_out.weight": state_dict["down_proj.weight"], "conv.weight": state_dict["ttt_conv.weight"]}
    if gating.W_target is not None:
        ours["W_target"] = state_dict["ttt_proj.weight"]  # the official orientation is ours
    gating.load_state_dict(ours)
    return gating


# ---------------------------------------------------------------------------------------------
# The scans TTTGating's parallel forward runs: ttt_chunked's output with memory independent of
# the number of chunks (the sum), and the erase's in groups (tested against ttt_chunked, outputs
# and gradients).
# ---------------------------------------------------------------------------------------------

# Tokens per group of the scans on a GPU, where each sequential step costs launches and a pass over
# the [B, d, h] sum more than arithmetic. Chosen for the sum from 1024 / 2048 / 4096 on an H100 at
# d 1024, h 2816, chunk 256: 2048 was the fastest at T 32768; 4096 was faster at T <= 16384 but its
# L x L scores took 1.6-2.3x the plain MLP's memory. A CPU is bound by arithmetic instead and scans
# chunk by chunk.
GPU_GROUP_TOKENS = 2048


def ttt_scan(Z: torch.Tensor, V: torch.Tensor, W_down: tp.Optional[torch.Tensor], eta: float,
             chunk_size: int, group: tp.Optional[int] = None, decay: float = 1.0) -> torch.Tensor:
    """The same output as ttt_chunked, with one [B, d, h] float32 sum of updates in memory instead
    of one weight per chunk (autograd would keep every chunk's weight for the backward pass).
    Z and V share a dtype; the products run in it. The updates accumulate in float32 and their
    product is kept apart from Z W_down^T, so bf16 does not round away updates small next to W_down.
    W_down None: the fast part alone, as W_down = 0 without its product.
    `group`: tokens per sequential step, rounded down to whole chunks (at least one); by default
    GPU_GROUP_TOKENS on a GPU and one chunk elsewhere. It changes the speed, not the result.
    `decay` < 1 forgets per chunk as ttt_chunked does; the backward then keeps the sum at the start of
    every group (one [B, d, h] float32 each) instead of recovering it by undoing the updates."""
    group = _group_tokens(Z, chunk_size, group)
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return _FastWeightScan.apply(Z, V, W_down, float(eta), int(chunk_size), int(group), float(decay))


def _group_tokens(Z: torch.Tensor, chunk_size: int, group: tp.Optional[int]) -> int:
    """A scan's tokens per sequential step: `group` (default GPU_GROUP_TOKENS on a GPU, one chunk
    elsewhere) rounded down to whole chunks, at least one; ValueError for a size <= 0."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if group is None:
        group = GPU_GROUP_TOKENS if Z.is_cuda else chunk_size
    if group <= 0:
        raise ValueError(f"group must be > 0 tokens, got {group}")
    return chunk_size * max(1, group // chunk_size)


def _accumulate(S: torch.Tensor, A: torch.Tensor, B: torch.Tensor, alpha: float) -> None:
    """S += alpha * A @ B in place, S float32 (or float64), A and B maybe bf16: one kernel on a
    GPU (float32 output from bf16 operands), a product then an add elsewhere. Under torch.compile
    on a GPU the product then the add, as torch's tracing of baddbmm's out_dtype fails (2.11-2.13)."""
    if A.dtype == S.dtype:
        S.baddbmm_(A, B, alpha=alpha)
    elif S.is_cuda and not torch.compiler.is_compiling():
        torch.baddbmm(S, A, B, alpha=alpha, out_dtype=S.dtype, out=S)
    elif S.is_cuda:
        S.add_(torch.bmm(A, B, out_dtype=S.dtype), alpha=alpha)
    else:
        S.add_(torch.bmm(A, B).to(S.dtype), alpha=alpha)


class _FastWeightScan(torch.autograd.Function):
    """ttt_chunked with memory independent of the number of chunks, in groups of G chunks.

    The base product Z W_down^T is one product over the whole sequence. The sum of the updates,
    S, is carried across groups of L = G * C tokens, one per sequence, in float32 whatever the
    inputs' dtype (the products run in that dtype, e.g. bf16; cast to bf16 together with W_down,
    updates smaller than 2^-8 of it would round away). Inside a group, chunk i also reads the
    updates of the earlier chunks j of the same group, in the dual (linear-attention) form,
    without forming their weights:
        O_g = Z_g (W_down + S_g)^T + eta (M * Z_g Z_g^T) V_g,   M[t, u] = 1 if chunk(t) > chunk(u) else 0
        S_(g+1) = S_g + eta * V_g^T Z_g,                  S_0 = 0
    G = 1 is the plain chunk-by-chunk scan. Larger groups cost L * (h + d) more multiply-adds per
    token but 1/G as many sequential steps: worth it where each step's launches, not its
    arithmetic, are the cost (a GPU at these sizes).

    With decay gamma < 1, chunk k of a group (k = 0 .. G - 1) reads gamma^k S_g, M[t, u] becomes
    gamma^(k(t) - k(u) - 1) where chunk(t) > chunk(u), and S_(g+1) = gamma^G S_g + eta * sum over the
    group's tokens u of gamma^(G - 1 - k(u)) V_u^T Z_u: the same algebra with constant weights.

    Saves only Z, V, W_down and the last group's S. Backward walks the groups in reverse, undoing
    each update to recover S_g, and carries R = sum over later groups k of dO_k^T Z_k:
        dZ_g = dO_g (W_down + S_g) + eta V_g R + eta (dP + dP^T) Z_g,   dP = M * (dO_g V_g^T)
        dV_g = eta Z_g R^T + eta (M * Z_g Z_g^T)^T dO_g,   dW_down = sum over all groups of dO_g^T Z_g
    (the last is R once the walk is done: W_down's gradient costs nothing more). With decay, undoing
    an update would divide by gamma^G at every group, so every group's S is saved instead, and R,
    the gradient reaching S_(g+1), is carried as R <- gamma^G R + sum over the group of gamma^k dO^T Z.
    """

    @staticmethod
    def forward(ctx, Z, V, W_down, eta, chunk_size, group, decay):
        B, T, h = Z.shape
        Z, V = Z.contiguous(), V.contiguous()
        state = torch.promote_types(Z.dtype, torch.float32)  # float32, or float64 for checks
        S = Z.new_zeros(B, V.shape[-1], h, dtype=state)  # [B, d, h]
        O = F.linear(Z, W_down.to(Z.dtype)) if W_down is not None else Z.new_zeros(B, T, V.shape[-1])
        M = _within_group_mask(group, chunk_size, Z, decay)
        read, write = _decay_weights(group, chunk_size, decay, Z.dtype, Z.device)  # [L, 1] each, or None
        last, starts = (T - 1) // group, []
        for n in range(last + 1):
            g = slice(n * group, (n + 1) * group)
            Z_g, V_g, O_g = Z[:, g], V[:, g], O[:, g]
            L = Z_g.shape[1]
            if decay != 1:
                starts.append(S.clone())
            if n > 0:  # the updates of earlier groups
                if read is None:
                    O_g.baddbmm_(Z_g, S.to(Z.dtype).transpose(1, 2))
                else:
                    O_g.add_(torch.bmm(Z_g, S.to(Z.dtype).transpose(1, 2)) * read[:L])
            if M is not None:  # the updates of earlier chunks of this group
                A = torch.bmm(Z_g, Z_g.transpose(1, 2)).mul_(M[:L, :L])  # [B, L, L]
                O_g.baddbmm_(A, V_g, alpha=eta)
            if n < last:  # the last group's update is never used
                if write is not None:
                    S.mul_(decay ** (group // chunk_size))
                _accumulate(S, (V_g if write is None else V_g * write).transpose(1, 2), Z_g, eta)
        ctx.save_for_backward(Z, V, W_down, torch.stack(starts) if decay != 1 else S)
        ctx.eta, ctx.chunk_size, ctx.group, ctx.decay = eta, chunk_size, group, decay
        return O

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dO):
        Z, V, W_down, saved = ctx.saved_tensors
        eta, group, decay, dtype = ctx.eta, ctx.group, ctx.decay, Z.dtype
        M = _within_group_mask(group, ctx.chunk_size, Z, decay)
        read, write = _decay_weights(group, ctx.chunk_size, decay, Z.dtype, Z.device)
        last = (Z.shape[1] - 1) // group
        dO = dO.to(dtype).contiguous()
        S = saved[-1] if decay != 1 else saved.clone()  # the sum the last group read
        R = torch.zeros_like(S)  # dLoss / dS of the next group
        R_down = R if decay == 1 else torch.zeros_like(S)  # sum of dO^T Z: W_down's gradient (R itself without decay)
        dZ = torch.matmul(dO, W_down.to(dtype)) if W_down is not None else torch.zeros_like(Z)  # [B, T, h]
        dV = torch.zeros_like(V)
        for n in range(last, -1, -1):
            g = slice(n * group, (n + 1) * group)
            Z_g, V_g, dO_g, dZ_g, dV_g = Z[:, g], V[:, g], dO[:, g], dZ[:, g], dV[:, g]
            L = Z_g.shape[1]
            if n < last:  # this group's update reaches the later groups
                R_low = R.to(dtype)
                if write is None:
                    dZ_g.baddbmm_(V_g, R_low, alpha=eta)
                    dV_g.baddbmm_(Z_g, R_low.transpose(1, 2), alpha=eta)
                else:
                    dZ_g.add_(torch.bmm(V_g, R_low) * (eta * write[:L]))
                    dV_g.add_(torch.bmm(Z_g, R_low.transpose(1, 2)) * (eta * write[:L]))
                if n > 0 and decay == 1:
                    _accumulate(S, V_g.transpose(1, 2), Z_g, -eta)  # S_(n+1) -> S_n
            if decay != 1:
                S = saved[n]
            if n > 0 and read is None:
                dZ_g.baddbmm_(dO_g, S.to(dtype))
            elif n > 0:
                dZ_g.add_(torch.bmm(dO_g, S.to(dtype)) * read[:L])
            if M is not None:  # within the group
                A = torch.bmm(Z_g, Z_g.transpose(1, 2)).mul_(M[:L, :L])
                dV_g.baddbmm_(A.transpose(1, 2), dO_g, alpha=eta)
                dP = torch.bmm(dO_g, V_g.transpose(1, 2)).mul_(M[:L, :L])
                dZ_g.baddbmm_(dP + dP.transpose(1, 2), Z_g, alpha=eta)
            if decay != 1:  # S_(n+1) = decay^G S_n + ...: the gradient reaching S_n
                R.mul_(decay ** (group // ctx.chunk_size))
                _accumulate(R, (dO_g * read[:L]).transpose(1, 2), Z_g, 1.0)
                if W_down is not None:
                    _accumulate(R_down, dO_g.transpose(1, 2), Z_g, 1.0)
            else:
                _accumulate(R, dO_g.transpose(1, 2), Z_g, 1.0)
        dW_down = R_down.sum(0).to(W_down.dtype) if W_down is not None else None
        return dZ, dV, dW_down, None, None, None, None


def _within_group_mask(group: int, chunk_size: int, like: torch.Tensor,
                       decay: float = 1.0) -> tp.Optional[torch.Tensor]:
    """[L, L]: decay^(chunk(t) - chunk(u) - 1) where position t's chunk comes after position u's,
    else 0; None for one chunk."""
    if group == chunk_size:
        return None
    return _block_mask(group, chunk_size, like.dtype, like.device, decay)


def _made_once(fn):
    """`fn` cached (functools.lru_cache) where it runs eagerly. Under torch.compile it is called as
    it is: dynamo would trace through the cache anyway, making the small masks part of the graph,
    and warns of possible silent errors when it meets one."""
    cached = functools.lru_cache(maxsize=8)(fn)

    @functools.wraps(fn)
    def made(*args, **kwargs):
        return (fn if torch.compiler.is_compiling() else cached)(*args, **kwargs)
    return made


@_made_once
def _block_mask(group: int, chunk_size: int, dtype: torch.dtype, device: torch.device,
                decay: float = 1.0) -> torch.Tensor:
    """Made once per size, dtype and device (each call would be three more kernel launches)."""
    chunk = torch.arange(group, device=device) // chunk_size
    after = chunk[:, None] - chunk[None, :]
    return torch.where(after > 0, decay ** (after - 1).clamp(min=0).double(), 0.0).to(dtype)


@_made_once
def _decay_weights(group: int, chunk_size: int, decay: float, dtype: torch.dtype, device: torch.device):
    """[L, 1] each: decay^k, with which chunk k of a group reads the sum left by earlier groups, and
    decay^(G - 1 - k), with which its update enters the next group's; (None, None) without decay."""
    if decay == 1:
        return None, None
    k = (torch.arange(group, device=device) // chunk_size).double()
    G = group // chunk_size
    return (decay ** k)[:, None].to(dtype), (decay ** (G - 1 - k))[:, None].to(dtype)


def ttt_delta_scan(Z: torch.Tensor, V: torch.Tensor, eta: float, chunk_size: int, delta: float,
                   group: tp.Optional[int] = None) -> torch.Tensor:
    """The fast part of ttt_chunked with `delta` rho (W_down = 0 without its product), per chunk:
        P_i = Z_i S_i^T,    S_(i+1) = S_i + E_i^T Z_i,    E_i = eta V_i - (rho / |Z_i^T Z_i|_F) P_i,    S_0 = 0
    returning P [B, T, d]. The erase makes each step depend on S: there is no prefix sum. As in
    ttt_scan, the chunks run in groups of `group` tokens (whole chunks; default GPU_GROUP_TOKENS on a
    GPU, one chunk elsewhere), S read and written once per group (`_delta_group`). S accumulates in
    float32 (float64 for float64 inputs), as does the work within a group; the products with S
    (each group's update rounded to Z's dtype once) and the keys' Gram matrix run in Z's dtype.
    For the gradient, autograd keeps per group S in Z's dtype, three L x L and two L x d float32
    tensors (L = group) and the errors in Z's dtype: at Moshi 7B's sizes (d 4096, h 11264, L 2048)
    about 110 KB per token and TTT layer, Z itself 22 KB. With bf16 inputs on a GPU, allow TF32
    (`torch.backends.cuda.matmul.allow_tf32 = True`, as train.py does): the group's float32 products
    then run on tensor cores (the scan 1.3x faster at those sizes), at little cost next to bf16's own
    rounding: the keys are bf16, exact in TF32, and the errors are rounded to bf16 after."""
    group = _group_tokens(Z, chunk_size, group)
    B, T, h = Z.shape
    S = Z.new_zeros(B, V.shape[-1], h, dtype=torch.promote_types(Z.dtype, torch.float32))
    outputs = []
    with torch.autocast(Z.device.type, enabled=False):  # the float32 work stays float32 under bf16 autocast
        for start in range(0, T, group):
            g = slice(start, start + group)
            P_g, S = _delta_group(S, Z[:, g], V[:, g], eta, chunk_size, delta, last=start + group >= T)
            outputs.append(P_g)
        return torch.cat(outputs, dim=1)


def _delta_group(S: torch.Tensor, Z: torch.Tensor, V: torch.Tensor, eta: float, chunk_size: int, delta: float,
                 last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ttt_delta_scan's chunks of one group from S: (their reads P, S after them). With R = Z S^T,
    what each token reads of S as the group finds it, A[t, u] = z_t . z_u where chunk(t) > chunk(u)
    (else 0) and c the erase factor of each token's chunk, chunk i reads S_i = S + sum_(j<i) E_j^T Z_j:
        P = R + A E,    E = eta V - c P    =>    (I + c A) E = eta V - c R,
    a unit lower-triangular system for the group's errors E, solved at once; then S + E^T Z.
    `last`: the group ends the sequence, and its update is never used."""
    L, wide, dtype = Z.shape[1], S.dtype, Z.dtype
    chunk, same, later = _chunk_masks(L, chunk_size, Z.device)
    gram = _Gram.apply(Z)  # [B, L, L] float32: z_t . z_u
    square = (gram.square() * same).sum(2)  # [B, L]: row t of its chunk's block
    square = square.new_zeros(square.shape[0], -(-L // chunk_size)).index_add(1, chunk, square)  # |Z_i^T Z_i|_F^2
    c = _erase_factor(square, delta)[:, chunk, None]  # [B, L, 1]
    R = torch.bmm(Z, S.to(dtype).transpose(1, 2)).to(wide)  # [B, L, d]
    if L <= chunk_size:  # one chunk (A = 0): it reads S alone
        P, E = R, eta * V.to(wide) - c * R
    else:
        A = gram * later
        E = torch.linalg.solve_triangular(c * A, eta * V.to(wide) - c * R, upper=False, unitriangular=True)
        P = R + torch.bmm(A, E)
    if not last:
        S = S + torch.bmm(E.to(dtype).transpose(1, 2), Z).to(wide)  # differentiable
    return P.to(dtype), S


@_made_once
def _chunk_masks(L: int, chunk_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each position's chunk [L], and [L, L] bool: where positions t and u share a chunk, and where
    t's chunk comes after u's. Made once per size (every group of a scan keeps them for its gradient)."""
    chunk = torch.arange(L, device=device) // chunk_size
    return chunk, chunk[:, None] == chunk[None, :], chunk[:, None] > chunk[None, :]


class _Gram(torch.autograd.Function):
    """Z Z^T [B, L, L] in float32 (float64 for float64 Z) from Z [B, L, h] in any dtype: products in
    Z's dtype with float32 sums (`_product_f32`). Only Z is kept for the gradient, dZ = (dG + dG^T) Z,
    where autograd through a float32 copy of Z would keep that copy."""

    @staticmethod
    def forward(ctx, Z):
        ctx.save_for_backward(Z)
        return _product_f32(Z, Z.transpose(1, 2))

    @staticmethod
    def backward(ctx, dG):
        Z, = ctx.saved_tensors
        return torch.bmm((dG + dG.transpose(1, 2)).to(Z.dtype), Z)


# ---------------------------------------------------------------------------------------------
# Streaming: one token per step inside moshi's `streaming()`, as LMGen runs it (CUDA graphs on).
# ---------------------------------------------------------------------------------------------

def streaming_step(gating: TTTGating, x: torch.Tensor, x0: tp.Optional[torch.Tensor],
                   state: _TTTState) -> torch.Tensor:
    """One token, x: [B, 1, d] -> [B, 1, d], equal to the parallel form's output for it.

    A token in chunk i reads Wd_0 + eta * sum_(j<i) V_j^T Z_j: all of chunk i - 1's update,
    which is complete only when chunk i opens. Adding a whole [d, h] update at that one step
    would need a branch (or a masked add at every step, which moves the [d, h] state twice
    more per step). Instead the update of chunk i - 1 (`Z_prev`, `V_prev`) is folded into
    `S` a slice of R = ceil(d / C) output rows per step, slice p at slot p, so it is all
    in by the time chunk i + 1 opens; the rows not yet folded are read in the dual form
    from the chunk itself:
        O_t = Z_t Wd_0^T + Z_t S^T + eta * mask_t * (Z_t Z_prev^T) V_prev
    with mask_t = 1 on the rows after slice p. The targets are built as the inputs come: a
    token changes the conv outputs of the `half` slots before it and its own, and a slot's
    output is final once the input `half` slots later is in, or at the end of the chunk.
    Every step runs the same kernels; which slot, which slice and whether a chunk just
    opened are device tensors, so a CUDA graph of one step replays correctly at every
    position. Sequences whose exec_mask is False keep their state unchanged.
    With `delta`, the erase is row-local: row r of chunk i - 1's update is row r of
    (eta V_prev - rho / |Z_prev^T Z_prev|_F P_prev)^T Z_prev (eta times the clip factor, if any),
    P_prev = Z_prev S_(i-1)^T being what chunk i - 1's tokens read, so the same fold and dual form
    serve with V_prev replaced by that difference. P_prev is not kept: the rows of S not folded yet
    still hold S_(i-1), so a fold reads its rows there (Z_prev S_(i-1)[rows]^T, C h R) and the dual
    form reads (Z_t Z_prev^T) P_prev = ((Z_t Z_prev^T) Z_prev) S_(i-1)^T in the same pass over S as
    the token's own read.
    |Z^T Z|_F^2 = |Z Z^T|_F^2 grows as the chunk fills, by the token's row and column of the Gram
    matrix (C h per step, `square`), and is handed over with the chunk (`square_prev`).
    """
    B, C, (d, h) = x.shape[0], gating.chunk_size, state.S.shape[1:]
    half, R = gating.conv.kernel_size[0] // 2, -(-d // C)  # R: rows folded per step
    run = state.exec_mask  # [B] bool
    slot = state.offset % C  # [B]
    Z, source, Zf = gating._inputs(x, x0, state.offset[:, None])
    Zf = Zf.to(state.Z.dtype)  # [B, 1, h]

    # A token in slot 0 opens a chunk: the chunk before it is complete and becomes `prev`.
    opens = ((slot == 0) & run).view(B, 1, 1)
    torch.where(opens, state.Z, state.Z_prev, out=state.Z_prev)
    torch.where(opens, state.V[:, half:], state.V_prev, out=state.V_prev)
    if gating.delta:
        torch.where(opens.view(B), state.square, state.square_prev, out=state.square_prev)
        state.square.masked_fill_(opens.view(B), 0)

    # The token joins its chunk. The conv outputs of slots slot - half .. slot read the inputs
    # of slots slot - 2 half .. slot and, after the token, zeros (not known yet; at the end of
    # the chunk, its edge padding). Later steps rewrite them until they are final.
    arange = lambda n: torch.arange(n, device=x.device)
    _write_rows(state.Z, slot[:, None], Zf, run)
    if gating.delta:  # |Z^T Z|_F^2 = |Z Z^T|_F^2 of the chunk grows by the token's row and column of the Gram
        gram_row = _product_f32(Zf, state.Z.transpose(1, 2))[:, 0]  # [B, C]: z_t . z_u, every slot u
        before = (arange(C)[None] < slot[:, None]).to(gram_row.dtype)  # slots of this chunk before the token
        grow = 2 * (gram_row.square() * before).sum(dim=1) + gram_row.gather(1, slot[:, None])[:, 0].square()
        state.square.add_(torch.where(run, grow.to(state.square.dtype), 0.0))
    K = 2 * half + 1  # rows of state.source
    _write_rows(state.source, (state.offset % K)[:, None], source, run)
    back = arange(K) - 2 * half  # the inputs 2 half .. 0 tokens back, oldest first
    window = (state.offset[:, None] + back) % K  # [B, K] their rows
    inputs = state.source.gather(1, window[..., None].expand(B, -1, d))
    inputs = torch.where((slot[:, None] + back >= 0)[..., None], inputs, 0)  # before the chunk: its edge's zeros
    inputs = F.pad(inputs, (0, 0, 0, half))  # after the token: zeros, not known yet
    V_new = gating.targets(inputs, 3 * half + 1)[:, half:2 * half + 1]
    _write_rows(state.V, slot[:, None] + arange(half + 1), V_new, run)  # rows of slots slot - half .. slot

    # Fold rows [slot R, (slot + 1) R) of prev's update eta * V_prev^T Z_prev into `S`.
    rows = slot[:, None] * R + arange(R)  # [B, R]
    keep = ((rows < d) & run[:, None]).unsqueeze(-1)  # rows past d (when C R > d) add nothing
    rows = rows.clamp(max=d - 1)
    V_rows = state.V_prev.gather(2, rows[:, None, :].expand(B, C, R))  # [B, C, R]
    update = _product_f32(V_rows.transpose(1, 2), state.Z_prev)  # [B, R, h]
    index = rows[:, :, None].expand(B, R, h)
    eta = torch.full((B, 1, 1), gating.eta, device=x.device, dtype=update.dtype)
    if gating.update_clip > 0:  # prev's clip factor, from its Gram matrices (C^2 (d + h) per step)
        wide = update.dtype
        eta = eta * _clip_factor(state.Z_prev.to(wide), state.V_prev.to(wide), gating.eta,
                                 gating.update_clip).view(B, 1, 1)
    change = update.mul_(eta)
    if gating.decay != 1:  # the rows are forgotten as they are folded, each once per chunk
        change.add_(state.S.gather(1, index), alpha=gating.decay - 1)
    if gating.delta:  # the erase of these rows: row r of S_(i-1) Z^T Z is row r of P_prev^T Z, P_prev = Z S_(i-1)^T
        erase = _erase_factor(state.square_prev, gating.delta).to(change.dtype).view(B, 1, 1)
        P_rows = torch.bmm(state.Z_prev, state.S_read.gather(1, index).transpose(1, 2))  # [B, C, R], before the fold
        change.sub_(_product_f32(P_rows.transpose(1, 2), state.Z_prev) * erase)
    state.S.scatter_add_(1, index, change.mul_(keep).to(state.S.dtype))  # compact: rounded to the model's dtype
    state.S_read.scatter_(1, index, state.S.gather(1, index).to(state.S_read.dtype))

    # The output: Wd_0, the folded rows, and the rows of prev not folded yet (dual form).
    unfolded = arange(d) >= (slot[:, None] + 1) * R  # [B, d]
    gram = torch.bmm(Zf, state.Z_prev.transpose(1, 2))  # [B, 1, C]: z_t . z_u over prev's slots u
    pending = torch.bmm(gram, state.V_prev)  # [B, 1, d]
    out = gating.linear_out(Z)  # Z Wd_0^T (under moshi's LoRA without forming W + s B A per step)
    if gating.delta:  # one pass over S: the token's read, and on the unfolded rows (S_(i-1)) prev's read P_prev
        read, erased = torch.bmm(torch.cat([Zf, torch.bmm(gram, state.Z_prev)], dim=1),
                                 state.S_read.transpose(1, 2)).unbind(dim=1)  # [B, d] each
        read, erased = read[:, None], erased[:, None]
    else:
        read = torch.bmm(Zf, state.S_read.transpose(1, 2))  # [B, 1, d]; unfolded rows not forgotten yet
    if gating.decay != 1:  # in float32 at least: gamma rounded to bf16 (0.8984 for 0.9) would bias every read
        wide = torch.promote_types(read.dtype, torch.float32)
        read = read.to(wide) * (1 - (1 - gating.decay) * unfolded.to(wide))[:, None]
    if gating.average_after:  # past K chunks, K times the mean: the token's chunk index is offset // C
        chunk = torch.div(state.offset, C, rounding_mode="floor").clamp(min=gating.average_after)
        average = (gating.average_after / chunk.to(eta.dtype)).view(B, 1, 1)
        read, eta = read * average, eta * average
    pending = eta * pending
    if gating.delta:  # the unfolded rows' erase, in the dual form
        pending = pending - erase * erased
    out = out + read.to(out.dtype)
    out = out + (pending * unfolded[:, None]).to(out.dtype)
    state.offset.add_(run.long())
    return out


def _fresh(state: _TTTState) -> bool:
    """Every sequence at position 0 and running (reads the device: not for a CUDA-graphed step)."""
    return bool(((state.offset == 0) & state.exec_mask).all())


def streaming_prefill(gating: TTTGating, x: torch.Tensor, x0: tp.Optional[torch.Tensor],
                      state: _TTTState) -> torch.Tensor:
    """P tokens at once from a fresh state (every sequence at position 0): the parallel form's
    outputs for x [B, P, d], and the state that P calls of `streaming_step` leave, so the stream
    goes on one token per step from there (a server warming a conversation from its history).

    After P = k C + s tokens, `streaming_step`'s state holds: the chunk being filled (slots < s of
    chunk k; with s = 0 the completed chunk k - 1, whose opening waits for the next token); `prev`,
    the chunk before it (q = k - 1, or k - 2 when s = 0); and in S every update before q, plus
    the first s R rows of q's (all of them when s = 0: its fold ends as the next chunk fills):
        S = decay-weighted sum of U_j over j < q,    rows < s R:  decay * S + U_q
    with U_j = eta V_j^T Z_j, clipped as the layer clips. Built here from the parallel form's Z and V,
    the sum as one product over the tokens before q (memory linear in P); with `delta`, chunk by chunk
    by its rule. Exact in float32 and float64; a compact state is rounded to bf16 once here instead
    of at every fold."""
    out = gating._parallel(x, x0)
    with torch.no_grad():
        _prefill_state(gating, x, x0, state)
    return out


def _prefill_state(gating: TTTGating, x: torch.Tensor, x0: tp.Optional[torch.Tensor], state: _TTTState) -> None:
    B, P, _ = x.shape
    C, half, (d, h) = gating.chunk_size, gating.conv.kernel_size[0] // 2, state.S.shape[1:]
    Z, source, Zf = gating._inputs(x, x0, torch.arange(P, device=x.device))
    V = gating.targets(source, C)  # a ragged last chunk: zeros after its last input, as streaming holds it
    k, s = divmod(P, C)
    current = k if s else k - 1  # the chunk the buffers hold
    q = current - 1  # prev
    start = current * C
    state.Z[:, :P - start] = Zf[:, start:].to(state.Z.dtype)
    state.V[:, half:half + P - start] = V[:, start:].to(state.V.dtype)
    last = torch.arange(max(0, P - (2 * half + 1)), P, device=x.device)  # the last inputs, in their ring rows
    state.source[:, last % (2 * half + 1)] = source[:, last].to(state.source.dtype)
    if gating.delta:  # |Z^T Z|_F^2 of the chunk being filled, so far
        state.square.copy_(_gram_square(state.Z[:, :P - start]))
    if q >= 0:
        state.Z_prev.copy_(Zf[:, q * C:(q + 1) * C])
        state.V_prev.copy_(V[:, q * C:(q + 1) * C])
        wide = torch.promote_types(state.S.dtype, torch.float32)
        Zc = Zf[:, :(q + 1) * C].to(state.Z_prev.dtype).to(wide)  # [B, (q + 1) C, h], as prev holds them
        Vc = V[:, :(q + 1) * C].to(state.V_prev.dtype).to(wide)  # [B, (q + 1) C, d]
        factor = torch.full((B, q + 1), gating.eta, device=x.device, dtype=wide)  # eta, times the clip factor
        if gating.update_clip > 0:
            factor = factor * _clip_factor(Zc.reshape(B * (q + 1), C, h), Vc.reshape(B * (q + 1), C, d), gating.eta,
                                           gating.update_clip).view(B, q + 1)
        if gating.delta:  # each update erases along its keys what S held: chunk by chunk (ttt_delta_scan's rule)
            S = Zc.new_zeros(B, d, h)
            for j in range(q + 1):
                Z_j, V_j = Zc[:, j * C:(j + 1) * C], Vc[:, j * C:(j + 1) * C]
                P_j = torch.bmm(Z_j.to(state.Z.dtype), S.to(state.S_read.dtype).transpose(1, 2))  # what chunk j read
                erase = erase_factors(Z_j, gating.delta).to(wide)[:, None, None]
                U_q = torch.bmm((V_j * factor[:, j, None, None] - erase * P_j.to(wide)).transpose(1, 2), Z_j)
                S = S + U_q if j < q else S
            state.square_prev.copy_(_gram_square(Zc[:, q * C:]))
        else:
            ages = torch.arange(q - 1, -1, -1, device=x.device, dtype=wide)  # chunk j < q: decay^(q - 1 - j)
            weights = (factor[:, :q] * gating.decay ** ages).repeat_interleave(C, dim=1)[..., None]  # [B, q C, 1]
            S = torch.bmm((Vc[:, :q * C] * weights).transpose(1, 2), Zc[:, :q * C])  # [B, d, h]
            U_q = torch.bmm(Vc[:, q * C:].transpose(1, 2), Zc[:, q * C:]) * factor[:, q, None, None]
        rows = d if s == 0 else min(s * (-(-d // C)), d)
        S[:, :rows] = gating.decay * S[:, :rows] + U_q[:, :rows]
        state.S.copy_(S)
        if state.S_read is not state.S:
            state.S_read.copy_(S)
    state.offset.fill_(P)


def _gram_square(Z: torch.Tensor) -> torch.Tensor:
    """[N] |Z^T Z|_F^2 = |Z Z^T|_F^2 of Z [N, C, h], products in Z's dtype with float32 sums."""
    return _product_f32(Z, Z.transpose(1, 2)).square().sum(dim=(1, 2))


def _product_f32(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """A @ B batched, in float32 whatever A and B's dtype (bf16 operands: one kernel on a GPU; under
    autocast, mixed operands as autocast has them)."""
    if A.dtype == torch.float32 or A.dtype == torch.float64:
        return torch.bmm(A, B)
    if A.is_cuda and B.dtype == A.dtype:
        return torch.bmm(A, B, out_dtype=torch.float32)
    return torch.bmm(A.float(), B.float())


def _write_rows(buffer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, run: torch.Tensor) -> None:
    """buffer[b, rows[b, j]] = values[b, j] where run[b]; buffer: [B, N, D], rows: [B, n] distinct
    in each sequence, values: [B, n, D]."""
    index = rows[..., None].expand(-1, -1, buffer.shape[2])
    old = buffer.gather(1, index)
    buffer.scatter_(1, index, torch.where(run.view(-1, 1, 1), values.to(buffer.dtype), old))

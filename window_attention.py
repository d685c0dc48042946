"""Sliding-window attention that computes only the pairs inside the window, for moshi's attention.

moshi's StreamingMultiheadAttention keeps a sliding window (`context`, Moshi 7B: 3000) by masking
a T x T score matrix: in training, scaled_dot_product_attention still computes every pair, so a
step grows as T^2 although only T x context pairs count. Here the same attention runs through
PyTorch's flex_attention with a block mask that skips the blocks outside the window

    query t reads key s  iff  t - context < s <= t

so time and memory grow linearly in T. On a CPU, where flex_attention has no fused kernel (eager,
it makes every score), the same pairs run block by block: each block of queries reads only the keys
its window reaches, one masked product each, forward and backward. Streaming (the KV cache),
cross-attention and per-step weights keep moshi's own path.

Usage:
    import window_attention
    window_attention.apply_window_attention(model)   # a moshi LMModel; its `context` is the window
    loss = ...                                       # train as before: same weights, same keys

Only torch and moshi are used: copy this file alone.
"""
import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from moshi.modules.transformer import StreamingMultiheadAttention
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def window_mask(context: int):
    """flex_attention's mask_mod: key s is visible to query t iff t - context < s <= t."""
    def mask_mod(b, h, t, s):
        return (s <= t) & (t - s < context)
    return mask_mod


_BLOCK_MASKS: dict = {}  # (T, context, device) -> BlockMask; past 32 (more lengths than a run's stages and
# evaluations use) the oldest is dropped, so a long-lived process does not keep every mask it made


def block_mask(T: int, context: int, device: str):
    """The block-sparse mask of a length and window, made once and kept (it is a small kernel of its
    own). A dict, not functools.lru_cache: torch.compile traces through lru_cache, so a compiled layer
    would build the T x T mask again on every call; a mask made here before compiling is read from
    the dict as the graph's input (made while compiling, it is built in the graph once, then the
    graph is compiled again without it)."""
    key = (T, context, device)
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) >= 32:
            _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
        _BLOCK_MASKS[key] = create_block_mask(window_mask(context), None, None, T, T, device=device)
    return _BLOCK_MASKS[key]


def make_block_masks(model: nn.Module, T: int, device) -> None:
    """The block masks of every window of a moshi `LMModel` at length T on a CUDA `device`, made now:
    before torch.compile of its layers, so that their graphs read them (block_mask)."""
    device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as a tensor's device reads
    transformer = getattr(model, "transformer", model)
    if device.type == "cuda":
        for context in {layer.self_attn.context for layer in transformer.layers} - {None}:
            block_mask(T, context, str(device))


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    # flex_attention is fast only compiled (a fused Triton kernel); eager it materialises scores.
    # One compilation per shape, and past dynamo's recompile limit (8) it runs eager without a word:
    # a run with several stage lengths and evaluations passes it, and evaluating 8 documents of
    # 32768 steps then asked for 128 GiB of scores (H200, results/horizon). 64 shapes are allowed.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), over keys t - context < s <= t) v; q, k, v: [B, H, T, D]."""
    if not q.is_cuda:
        return blocked_window_attention(q, k, v, context)
    # inside a compiled layer flex_attention is compiled with it (dynamo would trace through the cache
    # of _compiled_flex_attention anyway, and warns of it)
    attend = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention()
    return attend(q, k, v, block_mask=block_mask(q.shape[2], context, str(q.device)))


def blocked_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context: int) -> torch.Tensor:
    """The same in blocks of `context` queries: a block reads the keys from context - 1 before its
    first query to its last, masked to each query's window, so memory grows as T (2 context)."""
    T, out = q.shape[2], []
    for start in range(0, T, context):
        end, first = min(T, start + context), max(0, start - context + 1)
        t = torch.arange(start, end, device=q.device)[:, None]
        s = torch.arange(first, end, device=q.device)[None]
        mask = window_mask(context)(None, None, t, s)  # [queries, keys] of the block
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, first:end], v[:, :, first:end],
                                                  attn_mask=mask))
    return torch.cat(out, dim=2)


class WindowAttention(StreamingMultiheadAttention):
    """moshi's attention, the same parameters and checkpoint keys, whose parallel forward computes
    only the pairs inside its window. `apply_window_attention` switches a module's class to it."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if (self._streaming_state is not None or self.cross_attention or self.weights_per_step
                or not self.causal or self.context is None or self.kv_repeat != 1):
            return super().forward(query, key, value)
        B, T = query.shape[:2]
        q, k, v = rearrange(self.in_projs[0](query), "b t (p h d) -> p b h t d", p=3, h=self.num_heads)
        if self.rope:
            q, k = self.rope(q, k, torch.zeros(B, device=query.device, dtype=torch.long), time_before_heads=False)
        x = sliding_window_attention(q, k, v, self.context)
        return self.out_projs[0](rearrange(x, "b h t d -> b t (h d)"))


def apply_window_attention(model: nn.Module) -> nn.Module:
    """Switches every self-attention of a moshi `LMModel` or `StreamingTransformer` to
    WindowAttention (in place; parameters untouched) and returns the model."""
    transformer = getattr(model, "transformer", model)
    for layer in transformer.layers:
        if type(layer.self_attn) is StreamingMultiheadAttention:
            layer.self_attn.__class__ = WindowAttention
    return model

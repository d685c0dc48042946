"""Generate YaRN RoPE reference values from HuggingFace transformers' own implementation.

Usage: pip install transformers && python testdata/make_yarn_reference.py
(writes yarn_transformers.json next to this script; run once, the JSON is kept as test data)
"""
import json
import math
import os

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

yarn_init = ROPE_INIT_FUNCTIONS["yarn"]

# (dim, base, scale, original_len, beta_fast, beta_slow, truncate, mscale, mscale_all_dim)
GRID = [
    # defaults: beta_fast=32, beta_slow=1, truncate=True
    (16, 10000, 1.5, 256, 32, 1, True, None, None),
    (16, 10000, 4, 4096, 32, 1, True, None, None),
    (16, 10000, 16, 4096, 32, 1, True, None, None),
    (16, 500000, 16, 256, 32, 1, True, None, None),
    (16, 500000, 4, 4096, 32, 1, True, None, None),
    (64, 10000, 1.5, 4096, 32, 1, True, None, None),
    (64, 10000, 4, 4096, 32, 1, True, None, None),
    (64, 10000, 16, 256, 32, 1, True, None, None),
    (64, 500000, 4, 256, 32, 1, True, None, None),
    (64, 500000, 16, 4096, 32, 1, True, None, None),
    (128, 10000, 1.5, 256, 32, 1, True, None, None),
    (128, 10000, 4, 4096, 32, 1, True, None, None),
    (128, 10000, 16, 4096, 32, 1, True, None, None),
    (128, 500000, 1.5, 4096, 32, 1, True, None, None),
    (128, 500000, 4, 256, 32, 1, True, None, None),
    (128, 500000, 16, 4096, 32, 1, True, None, None),
    # truncate=False
    (16, 10000, 1.5, 256, 32, 1, False, None, None),
    (64, 500000, 4, 256, 32, 1, False, None, None),
    (128, 10000, 16, 4096, 32, 1, False, None, None),
    (128, 500000, 16, 4096, 32, 1, False, None, None),
    # beta_fast=16, beta_slow=2
    (64, 10000, 16, 256, 16, 2, True, None, None),
    (128, 10000, 4, 4096, 16, 2, True, None, None),
    # mscale / mscale_all_dim (attention-factor ratio branch)
    (128, 10000, 16, 4096, 32, 1, True, 1.0, 1.0),
    (128, 10000, 16, 4096, 32, 1, True, 0.707, 0.707),
    (128, 10000, 16, 4096, 32, 1, True, 1.0, 0.0),
    (64, 500000, 4, 4096, 32, 1, True, 1.0, 0.707),
]


def make_config(dim, base, scale, original_len, beta_fast, beta_slow, truncate, mscale, mscale_all_dim):
    max_pos = int(scale * original_len)
    assert max_pos == scale * original_len, "max_position_embeddings must equal scale*original_len exactly"
    rope = {
        "rope_type": "yarn",
        "rope_theta": float(base),
        "factor": float(scale),
        "original_max_position_embeddings": original_len,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "truncate": truncate,
    }
    if mscale is not None:
        rope["mscale"] = mscale
    if mscale_all_dim is not None:
        rope["mscale_all_dim"] = mscale_all_dim
    cfg = LlamaConfig(
        hidden_size=2 * dim,
        num_attention_heads=2,
        head_dim=dim,
        intermediate_size=4 * dim,
        num_hidden_layers=1,
        vocab_size=16,
        max_position_embeddings=max_pos,
        rope_parameters=rope,
    )
    # Make sure transformers kept what we asked for (no recomputation of factor / original length).
    rp = cfg.rope_parameters
    assert rp["rope_type"] == "yarn" and rp["factor"] == scale, rp
    assert rp["original_max_position_embeddings"] == original_len, rp
    assert rp["rope_theta"] == base and cfg.head_dim == dim, rp
    assert rp.get("truncate", True) == truncate
    return cfg


def correction_range(dim, base, original_len, beta_fast, beta_slow, truncate):
    # Replicates transformers' find_correction_range (inner closure, not importable) for printing only.
    def cdim(rot):
        return (dim * math.log(original_len / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = cdim(beta_fast), cdim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def main():
    entries = []
    for dim, base, scale, L, bf, bs, trunc, ms, msad in GRID:
        cfg = make_config(dim, base, scale, L, bf, bs, trunc, ms, msad)
        inv_freq, attn = yarn_init(cfg, torch.device("cpu"))
        assert inv_freq.dtype == torch.float32 and inv_freq.shape == (dim // 2,)
        inv_freq = [float(x) for x in inv_freq.tolist()]

        # Verify the result corresponds to the intended scale: fully-interpolated bins equal extrap/scale (f32).
        pos = float(base) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        extrap = (1.0 / pos).tolist()
        interp = (1.0 / (scale * pos)).tolist()
        low, high = correction_range(dim, base, L, bf, bs, trunc)
        for i in range(dim // 2):
            if i <= low:
                assert inv_freq[i] == extrap[i], (dim, base, scale, L, i)
            if i >= high:
                assert inv_freq[i] == interp[i], (dim, base, scale, L, i)
        note = "  (high > dim//2-1: ramp never reaches 1)" if high > dim // 2 - 1 else ""
        print(f"D={dim:3d} base={base:6d} s={scale:4} L={L:4d} bf={bf} bs={bs} trunc={trunc!s:5} "
              f"mscale={ms} msad={msad}: low={low} high={high} attn={attn!r}{note}")

        entries.append({
            "dim": dim, "base": base, "scale": scale, "original_len": L,
            "beta_fast": bf, "beta_slow": bs, "truncate": trunc,
            "mscale": ms, "mscale_all_dim": msad,
            "attention_factor": float(attn), "inv_freq": inv_freq,
        })

    # Sanity check requested: D=128, base=10000, L=4096, scale=16, defaults -> (20, 46)
    sc = correction_range(128, 10000, 4096, 32, 1, True)
    print("sanity: D=128 base=10000 L=4096 s=16 correction range (low, high) =", sc)
    assert sc == (20, 46)

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "yarn_transformers.json")
    source = (f"Generated by `python testdata/make_yarn_reference.py` with transformers=={transformers.__version__}, "
              f"torch=={torch.__version__.split('+')[0]} (CPU); values from "
              f"transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS['yarn'].")
    with open(out, "w") as f:
        json.dump({"source": source, "configs": entries}, f)
    print("wrote", out, os.path.getsize(out), "bytes,", len(entries), "configs")


if __name__ == "__main__":
    main()

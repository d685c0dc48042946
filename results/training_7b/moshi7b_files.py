"""Moshi 7B's LMModel arguments (moshi's `loaders._lm_kwargs`) with random bf16 weights, saved as Moshi
ships a model (model.safetensors and the json of its arguments), and 4 random token arrays [K, 8 T]
(K: the text stream and the audio codebooks; the last one holds out as validation): what train.py's
--init, --init-config and --data read, at real size, with nothing downloaded. Kept when the folder
already has the same arguments.

    python results/training_7b/moshi7b_files.py FOLDER --length T [--small] [--device cuda]
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("folder")
p.add_argument("--length", type=int, required=True, help="a stage's length: each array is 8 of them")
p.add_argument("--small", action="store_true", help="the same structure (17 streams, the depformer with "
               "weights per step), tiny widths")
p.add_argument("--device", default="cpu", help="where the weights are drawn (a GPU is faster)")
args = p.parse_args()
kw = dict(loaders._lm_kwargs)
dropped = [k for k in ("conditioners", "fuser", "quantize", "lora") if kw.pop(k, None)]  # load_moshi refuses them
if args.small:
    kw.update(dim=64, num_heads=4, num_layers=4, depformer_dim=32, depformer_dim_feedforward=64,
              depformer_num_heads=2, depformer_num_layers=2)
config = json.dumps({"lm_kwargs": kw}, indent=1, sort_keys=True)
os.makedirs(args.folder, exist_ok=True)
weights, config_path = os.path.join(args.folder, "model.safetensors"), os.path.join(args.folder, "config.json")
print("LMModel arguments: moshi's loaders._lm_kwargs" + (f", {dropped} dropped" if dropped else ", nothing dropped")
      + (", shrunk (--small)" if args.small else ""))
if os.path.isfile(weights) and os.path.isfile(config_path) and open(config_path).read() == config:
    print(f"reusing {weights}")
else:
    start = time.time()
    torch.manual_seed(0)
    lm = LMModel(**kw, device=args.device, dtype=torch.bfloat16)
    state = {k: v.detach().contiguous().cpu() for k, v in lm.state_dict().items()}
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    save_file(state, weights + ".tmp")
    os.replace(weights + ".tmp", weights)
    with open(config_path, "w") as f:
        f.write(config)
    print(f"wrote {weights}: {sum(v.numel() for v in state.values()):,} numbers in bf16, "
          f"{os.path.getsize(weights) / 2 ** 30:.1f} GiB, in {time.time() - start:.0f} s")
    del state
rng = np.random.default_rng(0)
T = 8 * args.length
for i in range(4):
    text = rng.integers(0, kw["text_card"], (1, T))
    audio = rng.integers(0, kw["card"], (kw["n_q"], T))
    np.save(os.path.join(args.folder, f"tokens{i}.npy"), np.concatenate([text, audio]).astype(np.int32))
print(f"token arrays: 4 x [{1 + kw['n_q']}, {T}]")

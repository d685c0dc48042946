"""The experiments in miniature, from one base model per setting:

Setting A (the YaRN paper's): every RoPE method, fine-tuning with and without TTT, passkey
accuracy and bits per byte at L0, 2 L0, 4 L0 and 8 L0.
Setting B (Moshi's own): attention kept to a sliding window W, sequences of 4 W; passkey accuracy
for needles near (inside the window) and far (only reachable through the fast weights).

    python sweep.py                    # setting A (CUDA: the GPU preset; CPU: a small version)
    python sweep.py --setting b        # setting B
    python sweep.py --rows vanilla,yarn_x8    # some rows only; rows already in the JSON are skipped
    python sweep.py --tables           # rebuild the markdown table and the plot from the JSON
    python sweep.py --setting b --heatmaps b_ttt_layers   # length x depth heatmaps of some rows
    python sweep.py --setting b --eval-seed 1 --out results/sweep_b_report --rows ...
                                       # the same checkpoints on other passkey documents

Every row starts from the same base checkpoint (pretrained here at L0 with full attention), with
the same data, steps and seed where it trains, except the from-scratch row. Results are written
to the JSON after each row, so an interrupted sweep resumes where it stopped; a row whose
training finished (its folder holds results.json) is evaluated again, not retrained.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

import data

HERE = os.path.dirname(os.path.abspath(__file__))
ROWS = [  # name, label, what to do: evaluate the base with another RoPE, or fine-tune it
    ("vanilla", "vanilla RoPE, no training", ["--method", "none"]),
    ("pi_x8", "PI x8, no training", ["--method", "pi", "--scale", "8"]),
    ("ntk_x8", "NTK-aware x8, no training", ["--method", "ntk", "--scale", "8"]),
    ("yarn_x8", "YaRN x8, no training", ["--method", "yarn", "--scale", "8"]),
    ("dynamic_yarn", "dynamic YaRN, no training", ["--method", "yarn", "--dynamic"]),
    ("yarn_ft", "YaRN x4 fine-tuned, no TTT (control)", ["train", "--ttt-layers", "none", "--mode", "full"]),
    ("ttt_only", "YaRN x4 + TTT, ttt_only", ["train", "--mode", "ttt_only"]),
    ("ttt_layers", "YaRN x4 + TTT, ttt_layers", ["train", "--mode", "ttt_layers"]),
    ("ttt_full", "YaRN x4 + TTT, full", ["train", "--mode", "full"]),
    ("ttt_full_modulo", "YaRN x4 + TTT, full, modulo RoPE", ["train", "--mode", "full", "--ttt-rope-modulo"]),
    # a second fine-tuning seed (batches and W_target init) for TTT against its control
    ("yarn_ft_seed1", "YaRN x4 fine-tuned, no TTT (control), seed 1", ["train", "--ttt-layers", "none", "--mode", "full", "--seed", "1"]),
    ("ttt_full_seed1", "YaRN x4 + TTT, full, seed 1", ["train", "--mode", "full", "--seed", "1"]),
]
ROWS_B = [
    ("window_base", "windowed base, no TTT", ["--method", "none"]),
    ("b_control", "full fine-tuning, no TTT (control)", ["train", "--mode", "full", "--ttt-layers", "none"]),
    ("b_ttt_only", "TTT ttt_only on the frozen base", ["train", "--mode", "ttt_only"]),
    ("b_ttt_only_lr", "TTT ttt_only, lr-ttt 1e-2", ["train", "--mode", "ttt_only", "--lr-ttt", "1e-2"]),
    ("b_ttt_layers", "TTT ttt_layers", ["train", "--mode", "ttt_layers"]),
    ("b_ttt_full", "TTT full", ["train", "--mode", "full"]),
    # what moves ttt_only (the frozen-base recipe), one change at a time
    ("b_ttt_only_eta3", "ttt_only, eta 3", ["train", "--mode", "ttt_only", "--ttt-eta", "3"]),
    ("b_ttt_only_lr3e-3", "ttt_only, lr-ttt 3e-3", ["train", "--mode", "ttt_only", "--lr-ttt", "3e-3"]),
    ("b_ttt_only_long", "ttt_only, 3x the steps", ["train", "--mode", "ttt_only", "--steps", "900"]),
    ("b_ttt_only_emb", "ttt_only, targets from token embeddings", ["train", "--mode", "ttt_only", "--ttt-target", "embeddings"]),
    ("b_ttt_only_chunk64", "ttt_only, chunk 64", ["train", "--mode", "ttt_only", "--ttt-chunk", "64"]),
    ("b_ttt_only_all_layers", "ttt_only, TTT in all 8 layers", ["train", "--mode", "ttt_only", "--ttt-layers", "0,1,2,3,4,5,6,7"]),
    ("b_ttt_only_std0.1", "ttt_only, W_target init std 0.1", ["train", "--mode", "ttt_only", "--ttt-target-std", "0.1"]),
    ("b_ttt_only_far", "ttt_only, training needles all far (depth <= 0.8)", ["train", "--mode", "ttt_only", "--passkey-max-depth", "0.8"]),
    ("b_ttt_only_emb_375", "ttt_only, embeddings targets, 375 steps (10.4% of the base's bytes)",
     ["train", "--mode", "ttt_only", "--ttt-target", "embeddings", "--steps", "375"]),
    ("b_ttt_only_emb_360", "ttt_only, embeddings targets, 360 steps (10.0% of the base's bytes)",
     ["train", "--mode", "ttt_only", "--ttt-target", "embeddings", "--steps", "360"]),
    ("b_ttt_only_combined", "ttt_only, embeddings targets, all 8 layers, far needles, 375 steps",
     ["train", "--mode", "ttt_only", "--ttt-target", "embeddings", "--ttt-layers", "0,1,2,3,4,5,6,7",
      "--passkey-max-depth", "0.8", "--steps", "375"]),
    # a second fine-tuning seed (batches and W_target init) for the rows that compare TTT with its control
    ("b_control_seed1", "full fine-tuning, no TTT (control), seed 1", ["train", "--mode", "full", "--ttt-layers", "none", "--seed", "1"]),
    ("b_ttt_layers_seed1", "TTT ttt_layers, seed 1", ["train", "--mode", "ttt_layers", "--seed", "1"]),
    ("b_ttt_full_seed1", "TTT full, seed 1", ["train", "--mode", "full", "--seed", "1"]),
    # reference: TTT trained from scratch, as many steps and bytes as the base's pretraining
    ("b_scratch_ttt", "TTT from scratch (full mode, the base's steps and batch)", ["scratch", "--mode", "full"]),
]
DEPTHS_B = [0.0, 0.25, 0.5, 0.75, 0.95]
PRESETS_B = {
    "cuda": dict(preset="gpu", L0=1024, window=256, pretrain_steps=1800, pretrain_batch=32, steps=300, batch=16,
                 lr="1e-3", chunk=128, eta="1.0", trials=20, windows=16),
    "cpu": dict(preset="cpu", L0=512, window=128, pretrain_steps=150, pretrain_batch=8, steps=8, batch=4,
                lr="2e-3", chunk=64, eta="1.0", trials=2, windows=2),
}
PRESETS = {
    "cuda": dict(preset="gpu", L0=1024, pretrain_steps=1200, pretrain_batch=32, steps=100, batch=16,
                 lr="1e-3", chunk=256, trials=20, windows=16),
    "cpu": dict(preset="cpu", L0=128, pretrain_steps=150, pretrain_batch=8, steps=8, batch=4,
                lr="2e-3", chunk=32, trials=2, windows=2),
}


def run(cmd):
    """Runs a step of the sweep, its output shown as it comes; stops the sweep if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=HERE).returncode != 0:
        sys.exit(f"sweep: step failed: {' '.join(cmd)}")


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % confidence interval of a proportion (Wilson score)."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def distance(length: int, depth: float) -> int:
    """How many steps before the answer a needle at this depth starts."""
    fixed = len(data.needle(10000)) + len(data.question()) + data.KEY_DIGITS
    return (length - data.KEY_DIGITS) - round(depth * (length - fixed))


def is_far(length: int, depth: float, window: int) -> bool:
    """Whether a needle at this depth starts more than `window` steps before the answer."""
    return distance(length, depth) > window


def tables_b(results: dict, path: str) -> None:
    rows = [(name, label) for name, label, _ in ROWS_B if name in results["rows"]]
    if not rows:
        return
    c, lines = results["config"], []
    lengths = [r["length"] for r in results["rows"][rows[0][0]]["rows"]]
    lines += [f"Window W = {c['window']}; near: needle inside the window, far: beyond it ({c['trials']} "
              f"documents per depth; depths {DEPTHS_B}). Accuracy (95 % interval, documents); bits per byte "
              f"at each length.", "",
              "| row | " + " | ".join(f"near {L} | far {L} | bpb {L}" for L in lengths) + " |",
              "|---" * (3 * len(lengths) + 1) + "|"]
    for name, label in rows:
        cells = []
        for r in results["rows"][name]["rows"]:
            split = {far: [a for d, a in zip(DEPTHS_B, r["by_depth"]) if is_far(r["length"], d, c["window"]) == far]
                     for far in (False, True)}
            n = {far: len(v) * c["trials"] for far, v in split.items()}
            acc = {far: sum(v) / len(v) if v else float("nan") for far, v in split.items()}
            for far in (False, True):
                low, high = wilson(acc[far], n[far]) if n[far] else (float("nan"), float("nan"))
                cells.append(f"{100 * acc[far]:.0f}% ({100 * low:.0f}-{100 * high:.0f}, n {n[far]})")
            cells.append(f"{r['bpb']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    _write_markdown(path, lines)
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(12, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, label) in enumerate(rows):
        points = sorted((distance(r["length"], depth), 100 * acc)
                        for r in results["rows"][name]["rows"] for depth, acc in zip(DEPTHS_B, r["by_depth"]))
        ax.plot(*zip(*points), marker="o", color=colors[i % 20], linestyle="-" if i < 10 else "--", label=label)
    ax.axvline(c["window"], color="grey", linestyle=":", label=f"window W = {c['window']}")
    ax.set_xlabel("needle distance before the question (bytes), lengths 1x and 2x the training length")
    ax.set_ylabel(f"passkey accuracy (%), {c['trials']} documents per point")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path + ".png")
    plt.close(fig)
    print(f"wrote {path}.md and {path}.png")


def _write_markdown(path: str, lines: list[str]) -> None:
    """The table as <path>.md, and on stdout."""
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pyplot():
    """matplotlib's pyplot, headless, or None where it is not installed (the tables still come)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def tables(results: dict, path: str) -> None:
    """The markdown table (accuracy with its 95 % interval, bits per byte) and the plot."""
    rows = [(name, label) for name, label, _ in ROWS if name in results["rows"]]
    if not rows:
        return
    lengths = [r["length"] for r in results["rows"][rows[0][0]]["rows"]]
    n = results["config"]["trials"] * 5
    lines = [f"Passkey accuracy (95 % interval, {n} documents per cell over 5 depths) and bits per byte.",
             "", "| row | " + " | ".join(str(L) for L in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
    for name, label in rows:
        cells = []
        for r in results["rows"][name]["rows"]:
            low, high = wilson(r["passkey"], n)
            cells.append(f"{100 * r['passkey']:.0f}% ({100 * low:.0f}-{100 * high:.0f}), {r['bpb']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    _write_markdown(path, lines)
    plt = _pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in rows:
        rs = results["rows"][name]["rows"]
        ax1.plot(lengths, [100 * r["passkey"] for r in rs], marker="o", label=label)
        ax2.plot(lengths, [r["bpb"] for r in rs], marker="o", label=label)
    for ax, title in ((ax1, "passkey accuracy (%)"), (ax2, "bits per byte")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.set_xlabel("context length (bytes)")
        ax.set_title(title)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".png")
    plt.close(fig)
    print(f"wrote {path}.md and {path}.png")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="a", choices=("a", "b"))
    p.add_argument("--out", default=None, help="JSON / md / png path stem (default results/sweep_<setting>)")
    p.add_argument("--work", default=None, help="checkpoints go here (default out/sweep_<setting>)")
    p.add_argument("--rows", default=None, help="comma list of row names (default: all)")
    p.add_argument("--tables", action="store_true", help="only rebuild the table and plot from the JSON")
    p.add_argument("--heatmaps", default=None, help="comma list of rows: only write their length x depth "
                   "heatmaps (<out>_heatmap_<row>.png) from the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=None, help="passkey documents' seed (default eval_passkey's)")
    args = p.parse_args()
    rows_spec = ROWS if args.setting == "a" else ROWS_B
    args.out = args.out or os.path.join("results", f"sweep_{args.setting}")
    args.work = args.work or os.path.join("out", f"sweep_{args.setting}")
    table = tables if args.setting == "a" else tables_b
    known = [name for name, _, _ in rows_spec]
    wanted = known if args.rows is None else args.rows.split(",")
    if any(r not in known for r in wanted):
        p.error(f"--rows must be among {known}, got {args.rows}")
    json_path = args.out + ".json"
    results = json.load(open(json_path)) if os.path.exists(json_path) else None
    if args.tables or args.heatmaps:
        if results is None:
            p.error(f"no results at {json_path}")
        if not args.heatmaps:
            return table(results, args.out)
        import eval_passkey  # its heatmap, as eval_passkey.py draws it for one checkpoint
        for name in args.heatmaps.split(","):
            if name not in results["rows"]:
                p.error(f"--heatmaps: no row {name!r} in {json_path}")
            row, path = results["rows"][name], f"{args.out}_heatmap_{name}.png"
            if eval_passkey.save_heatmap(path, row["rows"], row["depths"]):
                print(f"wrote {path}")
        return
    c = (PRESETS if args.setting == "a" else PRESETS_B)["cuda" if torch.cuda.is_available() else "cpu"]
    if results is None:
        hardware = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        results = dict(config=dict(c, seed=args.seed, eval_seed=args.eval_seed or "default", hardware=hardware,
                                   torch=torch.__version__), rows={})
    elif results["config"].get("eval_seed", "default") != (args.eval_seed or "default"):
        p.error(f"{json_path} holds results of another --eval-seed; pick another --out")
    lengths = ",".join(str(c["L0"] * 2 ** k) for k in (range(4) if args.setting == "a" else range(2)))
    base = os.path.join(args.work, "base", "base.pt")
    common = ["--original-len", str(c["L0"]), "--seed", str(args.seed), "--lr", c["lr"], "--lr-ttt", c["lr"]]
    scale, extra_eval = "4", []
    if args.setting == "b":  # no RoPE extension: the window keeps positions in range
        common += ["--window", str(c["window"]), "--ttt-eta", c["eta"]]
        scale, extra_eval = "1", ["--depths", ",".join(str(d) for d in DEPTHS_B)]
    needs_base = any(spec[0] != "scratch" for name, _, spec in rows_spec if name in wanted)
    if needs_base and not os.path.exists(base):
        run([sys.executable, "train.py", "--pretrain-only", "--preset", c["preset"], "--pretrain-steps",
             str(c["pretrain_steps"]), "--batch", str(c["pretrain_batch"]), "--log-every", "100",
             "--out", os.path.join(args.work, "base")] + common)
    for name, label, spec in rows_spec:
        if name not in wanted or name in results["rows"]:
            continue
        start = time.time()
        checkpoint, method = base, spec
        if spec[0] in ("train", "scratch"):
            folder = os.path.join(args.work, name)
            if spec[0] == "train":
                start_from = ["--init", base, "--steps", str(c["steps"]), "--batch", str(c["batch"])]
            else:  # no base: stage 0 is empty, the one extension stage (scale 1) trains TTT from scratch
                start_from = ["--preset", c["preset"], "--pretrain-steps", "0", "--steps", str(c["pretrain_steps"]),
                              "--batch", str(c["pretrain_batch"])]
            if not os.path.exists(os.path.join(folder, "results.json")):
                run([sys.executable, "train.py", "--scale", scale, "--ttt-chunk", str(c["chunk"]), "--eval-trials",
                     "1", "--log-every", "50", "--out", folder] + start_from + common + spec[1:])
            checkpoint, method = os.path.join(folder, "ckpt.pt"), []
        eval_json = os.path.join(args.work, f"{name}_eval.json")
        seed = ["--seed", str(args.eval_seed)] if args.eval_seed is not None else []
        run([sys.executable, "eval_passkey.py", checkpoint, "--lengths", lengths, "--trials", str(c["trials"]),
             "--windows", str(c["windows"]), "--out", eval_json] + method + extra_eval + seed)
        row = json.load(open(eval_json))
        row["label"], row["seconds_total"] = label, round(time.time() - start, 1)
        results["rows"][name] = row
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(json_path + ".tmp", json_path)
    table(results, args.out)


if __name__ == "__main__":
    main()

"""Passkey retrieval and bits per byte at several context lengths, for a checkpoint of train.py.

The YaRN repository's protocol (after Landmark Attention), adapted to bytes: a 5-digit key in a
needle line at a chosen depth of filler text, the question at the end, greedy decoding of the 5
digits, exact match. Filler comes from the validation split, keys from a seed never used in
training. Greedy decoding gets all 5 digits right exactly when, reading the true document, the
arg-max prediction at each of the 5 answer positions is the true digit (the first wrong digit
is where greedy decoding would leave the key), so one forward pass per document decides it.

    python eval_passkey.py out/ckpt.pt --lengths 256,512,1024 --trials 20
    python eval_passkey.py out/base.pt --method yarn --scale 4    # no-finetune baselines
    python eval_passkey.py out/ckpt.pt --streaming                # step by step, as Moshi runs
    python eval_passkey.py out/ckpt.pt out/memory/ckpt.pt --lengths 512   # several: one table, the same documents
"""
import argparse
import copy
import math
import os
import sys
import time
import typing as tp

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi loads: compiling dominates small runs

import torch
import torch.nn.functional as F

import checkpoints
import data
import freeze
import model as M
import window_attention
import yarn

# Keys and filler for evaluation come from generators seeded at 2^40 and above; train.py's seeds
# stay far below (seed * 1_000_003 + ...), so no evaluation key sequence is ever a training one.
SEED_FLOOR, SEED_CEILING = 2 ** 40, 2 ** 63  # the ceiling: seed + length + 1000 d stays within torch's 2**64
EVAL_SEED = SEED_FLOOR + 10_007


@torch.no_grad()
def streaming_greedy(model, prompts: torch.Tensor, digits: int, piece: int = 256) -> torch.Tensor:
    """Greedy decoding the way Moshi runs: inside `model.streaming(B)`, the prompt fed in steps of
    up to `piece` tokens, then one token per step, each single-token step a replay of one CUDA
    graph on a GPU, as moshi's LMGen steps (moshi's `CUDAGraphed`; NO_CUDA_GRAPH=1: eager).
    prompts: [B, T] -> [B, digits].

    moshi's KV cache is a ring of exactly `context` keys: a step of n tokens at offset t is exact
    only while t + n <= context (before the ring is full) or n == 1 (after, a longer step would
    overwrite keys still inside the window), so the steps shrink to single tokens there, and every
    step after the first single one is single."""
    from moshi.utils.compile import CUDAGraphed
    contexts = [layer.self_attn.context for layer in model.transformer.layers]
    if any(c is None for c in contexts):
        raise ValueError("streaming needs a finite attention context (the KV cache's capacity)")
    context = min(contexts)
    with model.streaming(prompts.shape[0]):  # a graph holds this stream's state: one per stream
        one_token = CUDAGraphed(lambda tokens: M.logits(model, tokens), disable=not prompts.is_cuda)
        t = 0
        while t < prompts.shape[1]:
            n = min(piece, prompts.shape[1] - t, max(1, context - t))
            tokens = prompts[:, t:t + n]
            out = one_token(tokens) if n == 1 else M.logits(model, tokens)
            t += n
        decoded = [out[:, -1].argmax(-1)]
        for _ in range(digits - 1):
            decoded.append(one_token(decoded[-1][:, None])[:, -1].argmax(-1))
    return torch.stack(decoded, dim=1)


@torch.no_grad()
def passkey_accuracy(model, val, length: int, depths: list[float], trials: int, seed: int,
                     device, batch: int = 8, streaming: bool = False) -> list[list[bool]]:
    """Whether each of `trials` documents of exactly `length` bytes is right, at each depth. Parallel
    mode reads each document once (see the module docstring); streaming mode decodes greedily."""
    model.eval()
    correct = []
    for d, depth in enumerate(depths):
        generator = torch.Generator().manual_seed(seed + 1000 * d)
        tokens, _ = data.passkey_batch(val, length, trials, generator, depths=[depth] * trials)
        correct.append([])
        for start in range(0, trials, batch):
            x = tokens[start:start + batch].to(device)
            if streaming:
                pred = streaming_greedy(model, x[:, :-data.KEY_DIGITS], data.KEY_DIGITS)
            else:
                pred = M.logits(model, x[:, :-1])[:, -data.KEY_DIGITS:].argmax(-1)
            correct[-1] += (pred == x[:, -data.KEY_DIGITS:]).all(dim=1).tolist()
    return correct


@torch.no_grad()
def bits_per_window(model, val, length: int, windows: int, seed: int, device, batch: int = 8) -> list[float]:
    """Each of `windows` random validation windows' mean next-byte cross-entropy in bits: a
    comparison of two models on the same windows can pair them, and its interval can count the
    windows (the text) as well as the models."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    tokens = data.random_windows(val, length + 1, windows, generator)
    bits = []
    for start in range(0, windows, batch):
        x = tokens[start:start + batch].to(device)
        out = M.logits(model, x[:, :-1])
        nats = F.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten(), reduction="none").view(len(x), length)
        bits += (nats.double().mean(1) / math.log(2)).tolist()
    return bits


def evaluate(model, val, lengths: list[int], depths: list[float], trials: int, windows: int,
             device, seed: int = EVAL_SEED, streaming: bool = False,
             progress: tp.Optional[tp.Callable[[dict], None]] = None) -> list[dict]:
    """One row per length: passkey accuracy per depth and overall, and bits per byte, with each
    window's; `progress` is called with each row as it is done."""
    rows = []
    for length in lengths:
        correct = passkey_accuracy(model, val, length, depths, trials, seed + length, device, streaming=streaming)
        acc = [sum(c) / len(c) for c in correct]
        bits = bits_per_window(model, val, length, windows, seed + length, device)
        rows.append(dict(length=length, passkey=sum(acc) / len(acc), by_depth=acc, bpb=sum(bits) / len(bits),
                         bpb_windows=bits, correct=correct))
        if progress:
            progress(rows[-1])
    return rows


def draw_seeds(seed: int, lengths: list[int], n_depths: int) -> set[int]:
    """The generator seeds `evaluate` draws with: at each length L, its validation windows' (seed + L)
    and each depth's documents' (seed + L + 1000 d). Two evaluations share documents or windows where
    these sets meet."""
    return {seed + L + 1000 * d for L in lengths for d in range(max(n_depths, 1))}


@torch.no_grad()
def validation_loss(model, arrays, length: int, windows: int, device, **loss_weights) -> float:
    """Mean multi-stream loss over random validation windows (seeded apart from training);
    `loss_weights`: multistream_loss's text_padding_weight and first_codebook_weight."""
    model.eval()
    tokens = data.token_windows(arrays, length, windows, torch.Generator().manual_seed(EVAL_SEED))
    loss = sum(M.multistream_loss(model, tokens[i:i + 4].to(device), **loss_weights).item() * len(tokens[i:i + 4])
               for i in range(0, windows, 4)) / windows
    model.train()
    return loss


def stage_report(model, corpus, length: int, trials: int, device, multistream: bool, loss_weights: dict) -> str:
    """train.py's line at the end of a stage: validation bits per byte and passkey accuracy at the
    stage's length (validation loss for token streams)."""
    model.eval()
    if multistream:
        return (f"validation loss {validation_loss(model, corpus.val, length, 8, device, **loss_weights):.4f} "
                f"at length {length}")
    row = evaluate(model, corpus.val, [length], [0.1, 0.5, 0.9], trials, 8, device)[0]
    return f"validation {row['bpb']:.3f} bits/byte, passkey {100 * row['passkey']:.0f}% at length {length}"


FINAL_DEPTHS = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]


def is_far(length: int, depth: float, window: tp.Optional[int]) -> bool:
    """Whether a needle at this depth lies wholly outside the attention window of every position
    that predicts an answer digit, so attention cannot read it in one hop (stacked layers could
    relay it; the table's control rows measure whether they do)."""
    if not window:
        return False
    fixed = len(data.needle(10_000)) + len(data.question()) + data.KEY_DIGITS
    needle_end = round(depth * (length - fixed)) + len(data.needle(10_000))
    return (length - data.KEY_DIGITS) - needle_end >= window  # the first digit's query sees farthest back


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % interval of a proportion (Wilson score), right even at 0 and n successes."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def near_far(row: dict, depths: list[float], trials: int, window: tp.Optional[int]) -> dict:
    """Splits a row of `evaluate` into needles inside the window (near) and beyond it (far):
    accuracy, documents right and in all, and the 95 % interval of each."""
    out = {}
    for part, far in (("near", False), ("far", True)):
        hits = [a * trials for d, a in zip(depths, row["by_depth"]) if is_far(row["length"], d, window) == far]
        n, k = trials * len(hits), round(sum(hits))
        out[part] = dict(accuracy=k / n if n else None, right=k, n=n, interval=wilson(k, n))
    return out


def final_table(model, base_model, settings: dict, lengths: list[int], corpus, trials: int, device,
                multistream: bool, method: str, scale: float, beta_fast: float = 32.0, base_extended: bool = False):
    """train.py's closing table, each effect against its own control, at every stage length:
    RoPE scaling: the base with `method` x`scale` (for YaRN also dynamic, the scale max(1, length /
    L0) as the YaRN paper evaluates without fine-tuning, and PI at the same scale) against the base
    as pretrained (vanilla RoPE), none of them trained (not where the run started from a model
    already trained past L0, `base_extended`: its RoPE is part of its training); TTT: the trained
    model against the same weights with the fast weights off (eta 0, so no update ever reaches
    them), a control only in `ttt_only`. Needles are split near / far (inside / beyond the
    attention window, `is_far`). Prints it; returns its rows with the corpus identity (None for
    token streams, whose table is validation loss)."""
    if multistream:  # no passkey in token streams: validation loss of the base and the trained model
        rows = {name: {L: validation_loss(m, corpus.val, L, 8, device, **settings.get("loss", {})) for L in lengths}
                for name, m in (("base", base_model), ("trained", model)) if m is not None}
        print("\nfinal table (validation loss, moshi-finetune's):")
        for name, row in rows.items():
            print(f"{name:<10}" + "".join(f"{L:>8}: {v:.4f}" for L, v in row.items()))
        return None
    for m in model.modules():  # TTT's kept embeddings (a graph, after training) block deepcopy
        if getattr(m, "x0", None) is not None:
            m.x0 = None
    window, ttt_text = settings.get("window"), f"TTT {settings['mode']}" if settings["ttt"] else "no TTT"
    rope = f"{method} x{scale:g}" if method != "none" else "vanilla RoPE"
    models = []
    if base_model is not None and base_extended:
        models += [("RoPE scalings untrained: not compared (the starting model was trained past L0)", None)]
    elif base_model is not None and method != "none":  # YaRN beside PI, the interpolation it refines
        models += [(f"{rope} against its control: the base model, untrained"
                    + (f" (YaRN's beta_fast {beta_fast:g})" if method == "yarn" else ""), None),
                   ("vanilla RoPE (control)", ("none", 1.0, False)), (rope, (method, scale, False))]
        if method == "yarn" and scale > 1:
            models += [("yarn dynamic, x max(1, length / L0)", (method, 1.0, True)),
                       (f"pi x{scale:g} (YaRN's baseline)", ("pi", scale, False))]
    # The same weights with eta 0 are TTT's control only where nothing but TTT trained: in the other
    # modes the rest of the trained weights learned with the fast path on (the control is then a run
    # of the same recipe without TTT, which this table does not have).
    control = settings.get("mode") == "ttt_only"
    models += [(f"{ttt_text} against " + ("its control: the trained model, fast weights off" if control else
                                          "the trained model, fast weights off (not a control: other weights "
                                          "trained with them)") if settings["ttt"] else
                f"{ttt_text} against its control: the trained model and the model it started from", None)]
    if settings["ttt"]:
        models += [("fast weights off, eta 0" + (" (control)" if control else ""), "off"),
                   (f"{rope}, {ttt_text}, trained", "trained")]
    elif base_model is not None:
        models += [(f"{rope}, the starting model, not trained here (control)", (method, scale, False)),
                   (f"{rope}, trained", "trained")]
    rows, lines = {}, []
    for name, how in models:
        if how is None:
            lines.append(name)
            continue
        m = copy.deepcopy(model if how in ("off", "trained") else base_model)
        if isinstance(how, tuple):
            override_rope(m, *how, settings["original_len"], beta_fast)
        for gating in freeze.ttt_modules(m) if how == "off" else []:
            gating.eta = 0.0
        M.set_context(m, window)
        rows[name] = evaluate(m, corpus.val, lengths, FINAL_DEPTHS, trials, 16, device)
        for r in rows[name]:
            r.update(near_far(r, FINAL_DEPTHS, trials, window))
        lines.append((name, rows[name]))
    print(f"\nfinal table: passkey accuracy [95 % interval] (documents) and bits per byte; "
          f"{trials} documents at each of {len(FINAL_DEPTHS)} depths. Attention window "
          f"{window or 'none'}: near needles lie inside it, far ones wholly beyond it.")
    print(table_head(lengths, 40))
    for line in lines:
        print(line if isinstance(line, str) else f"  {line[0]:<38}" + table_cells(line[1]))
    return dict(settings=settings, corpus_files=corpus.files, corpus_sha256=corpus.sha256, depths=FINAL_DEPTHS,
                window=window, rows=rows)


def table_head(lengths: list[int], width: int) -> str:
    """The two header lines of a near / far / bits-per-byte table, after `width` characters of names."""
    return (f"{'':<{width}}" + "".join(f"{'len ' + str(L):>34}" for L in lengths) + "\n"
            + f"{'':<{width}}" + f"{'near':>13}{'far':>13}{'bpb':>8}" * len(lengths))


def table_cells(rows: list[dict]) -> str:
    """One table line's cells: per length, near and far accuracy [95 % interval] (from `near_far`,
    merged into each row) and bits per byte."""
    cells = []
    for r in rows:
        for part in ("near", "far"):
            a, (low, high) = r[part]["accuracy"], r[part]["interval"]
            cells.append(f"{'-':>13}" if a is None else f"{100 * a:>4.0f}% [{100 * low:.0f}-{100 * high:.0f}]".rjust(13))
        cells.append(f"{r['bpb']:>8.2f}")
    return "".join(cells)


def final_report(model, settings: dict, stages: list[dict], corpus, device, multistream: bool, trials: int,
                 method: str, scale: float, beta_fast: float, path: str, config: dict) -> None:
    """train.py's end: the final table at L0 and every stage length against the base checkpoint the
    run started from (if it is still there), written to `path` with the run's configuration."""
    base_path, base_model = settings.get("base_path"), None
    base_len = settings["original_len"]  # the length the starting model trained at
    if base_path and os.path.isfile(base_path):
        if settings.get("base_config"):
            base_model = M.load_moshi(base_path, settings["base_config"])[0].to(device)
        else:
            base = checkpoints.load_checkpoint(base_path)
            base_model = checkpoints.model_from_checkpoint(base, device, base_path)
            base_len = checkpoints.trained_len(base["settings"])
    lengths = sorted({settings["original_len"], base_len} | {s["length"] for s in stages})
    results = final_table(model, base_model, settings, lengths, corpus, trials, device, multistream, method, scale,
                          beta_fast, base_extended=base_len > settings["original_len"])
    if results is not None:
        checkpoints.save_json(path, dict(results, config=config))
        print(f"wrote {path}")


def format_rows(title: str, rows: list[dict]) -> str:
    head = f"{title:<34}" + "".join(f"{r['length']:>16}" for r in rows)
    line = f"{'  passkey accuracy / bits per byte':<34}" + "".join(
        f"{100 * r['passkey']:>9.0f}% {r['bpb']:>5.2f}" for r in rows)
    return head + "\n" + line


# The TTT settings an evaluation may change at inference: (flag, the TTT layer's attribute); the
# parsed value is args.ttt_<attribute>.
INFERENCE_TTT = (("--ttt-decay", "decay"), ("--ttt-update-clip", "update_clip"),
                 ("--ttt-average-after", "average_after"), ("--ttt-delta", "delta"))


def rope_used(args, checkpoint: dict) -> tuple[float, float]:
    """--method's scale (default 1) and YaRN's beta_fast: --beta-fast, else the run's (its config, or an
    adapter's YaRN settings, which store no config), else the paper's 32."""
    run = ((checkpoint.get("config") or {}).get("yarn_beta_fast")
           or (checkpoint["settings"].get("yarn") or {}).get("beta_fast"))
    return args.scale or 1.0, args.beta_fast if args.beta_fast is not None else run or 32.0


def override_rope(model, method: str, scale: float, dynamic: bool, original_len: int, beta_fast: float = 32.0) -> None:
    """Evaluates with another RoPE method at inference, no training (the YaRN paper's baselines)."""
    yarn.apply_yarn(model, scale, original_len, method=method, dynamic=dynamic, beta_fast=beta_fast)


def save_heatmap(path: str, rows: list[dict], depths: list[float]) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    grid = [[100 * a for a in r["by_depth"]] for r in rows]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 3.5))
    image = ax.imshow(list(map(list, zip(*grid))), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(rows)), [str(r["length"]) for r in rows])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("length (bytes)")
    ax.set_ylabel("needle depth")
    fig.colorbar(image, label="passkey accuracy (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


class OneLineParser(argparse.ArgumentParser):
    """Bad input: one line naming the problem on stderr and exit code 2, no usage dump. An option
    given twice is refused (argparse keeps the last one without a word), and options are spelled
    whole (an abbreviation could come to mean another option once one is added)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def parse_known_args(self, args=None, namespace=None):
        args, seen = sys.argv[1:] if args is None else list(args), {}
        for token in args:
            if token == "--":
                break
            name = token.split("=", 1)[0]
            action = self._option_string_actions.get(name)
            if action is not None and action.dest != "help":
                if action.dest in seen:
                    self.error(f"{seen[action.dest]} is given twice: give each option once")
                seen[action.dest] = name
        return super().parse_known_args(args, namespace)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = OneLineParser(prog="eval_passkey.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="+", help="a checkpoint of train.py; several: one table comparing them on the "
                   "same documents")
    p.add_argument("--lengths", default=None, help="comma list; default L0, 2 L0, ... up to 2x the trained length")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=int, default=20, help="documents per length and depth")
    p.add_argument("--windows", type=int, default=16, help="validation windows for bits per byte")
    p.add_argument("--method", choices=yarn.METHODS, default=None, help="override the RoPE method")
    p.add_argument("--scale", type=float, default=None, help="RoPE scale with --method (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic scaling with --method")
    p.add_argument("--beta-fast", type=float, default=None, help="with --method yarn: RoPE pairs that turn more than "
                   "this many times over L0 keep their frequency (default: the run's --yarn-beta-fast, stored in its checkpoint; "
                   "else the paper's 32)")
    p.add_argument("--streaming", action="store_true", help="greedy decoding step by step, as Moshi runs")
    p.add_argument("--ttt-decay", type=float, default=None, help="evaluate with this forgetting per chunk in every "
                   "TTT layer instead of the trained one (an inference-only remedy)")
    p.add_argument("--ttt-update-clip", type=float, default=None, metavar="TAU", help="evaluate with each chunk's "
                   "update clipped to this Frobenius norm in every TTT layer instead of the trained setting (the "
                   "paper's inference clipping, Appendix D.2; 0: none)")
    p.add_argument("--ttt-average-after", type=int, default=None, metavar="K", help="evaluate with every TTT layer "
                   "reading K times the mean of the updates past K chunks instead of the trained setting (0: the sum)")
    p.add_argument("--ttt-delta", type=float, default=None, metavar="RHO", help="evaluate with the delta rule's "
                   "erase rho along each chunk's keys in every TTT layer instead of the trained setting (0: none)")
    p.add_argument("--data", nargs="+", default=None, help="text files (default: the Python stdlib)")
    p.add_argument("--out", default=None, help="JSON path (default: next to the checkpoint)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    def fail(msg):
        p.error(msg)  # one line on stderr, exit code 2

    def int_list(text, name):
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            fail(f"--{name} must be a comma list of integers, got {text!r}")
        return values

    if args.lengths is not None:
        args.lengths = int_list(args.lengths, "lengths")
        if min(args.lengths) < 128:
            fail(f"--lengths must all be >= 128 (needle and question take ~110 bytes), got {args.lengths}")
    try:
        args.depths = [float(v) for v in args.depths.split(",")]
    except ValueError:
        fail(f"--depths must be a comma list of numbers in [0, 1], got {args.depths!r}")
    if not all(0 <= d <= 1 for d in args.depths):
        fail(f"--depths must be in [0, 1], got {args.depths}")
    if not SEED_FLOOR <= args.seed < SEED_CEILING:
        fail(f"--seed must be in [2**40, 2**63), apart from training's seeds; got {args.seed}")
    if args.trials < 1 or args.windows < 1:
        fail(f"--trials and --windows must be >= 1, got {args.trials}, {args.windows}")
    if args.scale is not None and not (math.isfinite(args.scale) and args.scale >= 1):
        fail(f"--scale must be a finite number >= 1, got {args.scale}")
    if (args.scale is not None or args.dynamic) and args.method is None:
        fail("--scale and --dynamic need --method")
    if args.method == "none" and (args.scale not in (None, 1) or args.dynamic):
        given = ([f"--scale {args.scale:g}"] if args.scale not in (None, 1) else []) + ["--dynamic"] * args.dynamic
        fail(f"--method none is plain RoPE, which has no scale: {' and '.join(given)} {'is' if len(given) == 1 else 'are'} "
             f"not for it")
    if args.beta_fast is not None and (args.method != "yarn" or not args.beta_fast > 1):
        fail(f"--beta-fast needs --method yarn and a value > 1 (beta_slow is 1), got {args.beta_fast}")
    if args.ttt_decay is not None and not 0 < args.ttt_decay <= 1:
        fail(f"--ttt-decay must be in (0, 1], got {args.ttt_decay}")
    if args.ttt_update_clip is not None and not (math.isfinite(args.ttt_update_clip) and args.ttt_update_clip >= 0):
        fail(f"--ttt-update-clip must be a finite number >= 0 (0: none), got {args.ttt_update_clip}")
    if args.ttt_average_after is not None and args.ttt_average_after < 0:
        fail(f"--ttt-average-after must be a whole number of chunks >= 0 (0: the sum), got {args.ttt_average_after}")
    if args.ttt_delta is not None and not 0 <= args.ttt_delta <= 1:
        fail(f"--ttt-delta must be in [0, 1] (0: none), got {args.ttt_delta}")
    try:
        M.check_device(args.device)
    except ValueError as e:
        fail(str(e))
    if args.dynamic and args.streaming:
        fail("--dynamic cannot stream exactly (moshi's KV cache keeps keys rotated at the scale of their own "
             "step); stream with a fixed --scale")
    return args, fail


def describe(path: str, settings: dict, model) -> str:
    """A checkpoint's row name in a comparison: its path, what trained, and its fast weights as they
    are evaluated (an inference flag's erase, not the stored one)."""
    g = freeze.ttt_modules(model)[:1]
    return f"{path}: " + (f"{settings.get('mode')}, eta {g[0].eta:g}, erase {g[0].delta:g}" if g else "no TTT")


def compare_table(named_rows: list[tuple[str, list[dict], tp.Optional[int]]], depths: list[float], trials: int) -> str:
    """Several checkpoints' rows of `evaluate` as one table: near / far accuracy [95 % interval]
    (each split by its own window) and bits per byte, at every length."""
    width = max(len(name) for name, _, _ in named_rows) + 2
    return "\n".join([table_head([r["length"] for r in named_rows[0][1]], width)] + [
        f"{name:<{width}}" + table_cells([dict(r, **near_far(r, depths, trials, window)) for r in rows])
        for name, rows, window in named_rows])


def main(argv=None):
    args, fail = parse_args(argv)
    several = len(args.checkpoint) > 1
    outs = [args.out] if args.out else [default_out(path, args) for path in args.checkpoint]
    try:  # every checkpoint and output, before any evaluation
        for out in outs:
            checkpoints.check_writable(out, folder=False)
        loaded = [checkpoints.load_checkpoint(path) for path in args.checkpoint]
        corpus = data.load_corpus(args.data)
    except ValueError as e:
        fail(str(e))
    prepared = [prepare(args, fail, path, checkpoint, corpus) for path, checkpoint in zip(args.checkpoint, loaded)]
    if len({tuple(lengths) for _, lengths in prepared}) > 1:
        fail(f"the checkpoints' default lengths differ ({[lengths for _, lengths in prepared]}): give --lengths")
    results = [evaluate_checkpoint(args, path, checkpoint, model, lengths, corpus)
               for path, checkpoint, (model, lengths) in zip(args.checkpoint, loaded, prepared)]
    if several:
        print(f"\n{args.trials} documents at each of {len(args.depths)} depths {args.depths}; near needles lie inside "
              "each model's attention window, far ones wholly beyond it:")
        print(compare_table([(describe(r["checkpoint"], r["settings"], model), r["rows"], r["settings"].get("window"))
                             for r, (model, _) in zip(results, prepared)], args.depths, args.trials))
    for out, result in (((args.out, dict(checkpoints=results)),) if args.out and several else zip(outs, results)):
        checkpoints.save_json(out, result)
        print(f"wrote {out}")
        if not several and save_heatmap(os.path.splitext(out)[0] + ".png", result["rows"], args.depths):
            print(f"wrote {os.path.splitext(out)[0]}.png")


def default_out(path: str, args) -> str:
    """The JSON beside the checkpoint, named after each flag that changes how it is evaluated."""
    return (os.path.splitext(path)[0] + (f"_{args.method}" if args.method else "")
            + (f"_x{args.scale:g}" if args.scale is not None else "") + ("_dynamic" if args.dynamic else "")
            + ("_streaming" if args.streaming else "")
            + (f"_beta{args.beta_fast:g}" if args.beta_fast is not None else "")
            + (f"_decay{args.ttt_decay:g}" if args.ttt_decay is not None else "")
            + (f"_clip{args.ttt_update_clip:g}" if args.ttt_update_clip is not None else "")
            + (f"_average{args.ttt_average_after}" if args.ttt_average_after is not None else "")
            + (f"_delta{args.ttt_delta:g}" if args.ttt_delta is not None else "") + "_passkey.json")


def prepare(args, fail, path: str, checkpoint: dict, corpus) -> tuple[torch.nn.Module, list[int]]:
    """One checkpoint's model as the flags say (RoPE, TTT at inference, its window) and its lengths;
    a flag it cannot take fails here, before any evaluation."""
    try:
        model = checkpoints.model_from_checkpoint(checkpoint, args.device, path)
    except ValueError as e:
        fail(str(e))
    settings = checkpoint["settings"]
    original_len = settings["original_len"]
    trained_len = checkpoints.trained_len(settings)
    if args.method is not None:
        scale, beta_fast = rope_used(args, checkpoint)
        override_rope(model, args.method, scale, args.dynamic, original_len, beta_fast)
    for flag, name in INFERENCE_TTT:
        if (value := getattr(args, "ttt_" + name)) is not None:
            if not freeze.ttt_modules(model):
                fail(f"{flag}: {path} has no TTT layers")
            for gating in freeze.ttt_modules(model):
                setattr(gating, name, value)
    for gating in freeze.ttt_modules(model)[:1]:
        if gating.delta and (gating.decay != 1 or gating.average_after):
            fail(f"the delta rule's erase ({gating.delta}) with forgetting ({gating.decay}) or the mean past K chunks "
                 f"({gating.average_after}): each bounds the sum of updates another way; use one")
    lengths = args.lengths or [original_len * 2 ** k for k in range(int(math.log2(2 * trained_len / original_len)) + 1)]
    # Full attention unless trained with a window; streaming needs a finite one (the KV cache).
    M.set_context(model, settings.get("window") or (max(lengths) if args.streaming else None))
    window_attention.apply_window_attention(model)  # the window's pairs only: time and memory linear in the length
    if max(lengths) > len(corpus.val):
        fail(f"--lengths up to {max(lengths)} need more validation text ({len(corpus.val)} bytes)")
    return model, lengths


def evaluate_checkpoint(args, path: str, checkpoint: dict, model, lengths: list[int], corpus) -> dict:
    """One prepared checkpoint evaluated: its rows printed, its result returned."""
    settings = checkpoint["settings"]
    start = time.time()
    done = lambda row: print(f"  {path}: length {row['length']} done, {100 * row['passkey']:.0f} % / {row['bpb']:.2f} "
                             f"bits per byte ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = evaluate(model, corpus.val, lengths, args.depths, args.trials, args.windows, args.device, args.seed,
                    args.streaming, progress=done)
    scale, beta_fast = rope_used(args, checkpoint) if args.method else (None, None)
    title = f"{path}" + (f" ({args.method} x{scale:g})" if args.method else "") + "".join(
        f", {flag} {getattr(args, 'ttt_' + name):g} at inference" for flag, name in INFERENCE_TTT
        if getattr(args, "ttt_" + name) is not None)
    print(format_rows(title, rows))
    for r in rows:
        print(f"  length {r['length']}: by depth " + " ".join(f"{100 * a:.0f}%" for a in r["by_depth"]))
    return dict(checkpoint=path, method=args.method, scale=scale, dynamic=args.dynamic,
                beta_fast=beta_fast if args.method == "yarn" else None,
                streaming=args.streaming, ttt_decay=args.ttt_decay, ttt_update_clip=args.ttt_update_clip,
                ttt_average_after=args.ttt_average_after, ttt_delta=args.ttt_delta,
                depths=args.depths, trials=args.trials, windows=args.windows, seed=args.seed,
                corpus_files=corpus.files, corpus_sha256=corpus.sha256, settings=settings,
                rows=rows, seconds=round(time.time() - start, 1))


if __name__ == "__main__":
    main()

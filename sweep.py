"""The project's experiments in miniature: many small trainings at once, several bases each.

Setting "study": can a frozen base learn memory beyond its attention window by training only TTT?
Every row (`study_rows`) runs on each of --bases windowed bases pretrained from different seeds
(head dim 128 on a GPU), is evaluated on a dev set and on a report set of documents fixed before
any row ran, and is pooled over the bases (JSON, markdown, plots).
Setting "horizon": how far past the trained length does the fast memory hold, and what keeps it?
The study's answer rows, and the remedies, evaluated at 4 to 128 times the window, with the
norms of the fast weights along a long document and one-token-per-step streaming at the longest.

    python sweep.py --setting study --measure-parallel 6   # throughput: 6 trainings at once vs one by one
    python sweep.py --setting study --jobs 6 --stop-after 7   # every row on 3 bases, 6 processes on one
                                       # GPU; no job starts after 7 min: the same command resumes
    python sweep.py --setting horizon                      # results/horizon/horizon.{json,md,png}
    python sweep.py --setting horizon --tables             # the table and plot again from the JSON
    python sweep.py --setting horizon --base 1             # only the base of seed 1: one machine's call
                                       # each; the JSON gathers the bases (the same --out)
    python sweep.py --paired a.json,b.json --out pair      # a row against its control on the same windows,
                                       # one eval_passkey.py JSON per base, pooled over the bases
    python sweep.py --setting horizon --data big.txt --out h --work w   # on your own text (train.py's --data)

Results are written to the JSON after each row, so an interrupted sweep resumes where it stopped; a
row whose training finished (its folder holds results.json) is evaluated again, not retrained. The
settings A and B of earlier revisions (one base each) are retired: their tables, logs and the
revision that made them are in results/yarn_and_ttt and results/window_memory.
"""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")  # before moshi loads: compiling dominates small runs

import torch

import checkpoints
import data
import eval_passkey
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))
DEPTHS = [0.0, 0.25, 0.5, 0.75, 0.95]  # the study's needle depths


def wilson(p: float, n: int) -> tuple[float, float]:
    """95 % confidence interval of a proportion p of n (eval_passkey.wilson, which takes the count)."""
    return eval_passkey.wilson(p * n, n)


def distance(length: int, depth: float) -> int:
    """How many steps before the answer a needle at this depth starts."""
    fixed = len(data.needle(10000)) + len(data.question()) + data.KEY_DIGITS
    return (length - data.KEY_DIGITS) - round(depth * (length - fixed))


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


# ---------------------------------------------------------------------------------------------
# Setting "study": rows ranked across independently pretrained windowed bases
# ---------------------------------------------------------------------------------------------

# Windowed bases with Moshi's head dim (128), L0 = 4 W; "cpu" is a smoke test of the harness, not a
# result. jobs: processes at once on the one GPU (these models leave an H100 mostly idle: a step is
# bound by the host launching kernels, results/study/README.md); measure_steps: --measure-parallel's runs.
PRESETS_STUDY = {
    "cuda": dict(preset="head128", L0=1024, window=256, pretrain_steps=1800, pretrain_batch=32, steps=300, batch=16,
                 lr="1e-3", chunk=128, eta="1.0", trials=20, windows=16, jobs=6, measure_steps=100),
    "cpu": dict(preset="cpu", L0=512, window=128, pretrain_steps=30, pretrain_batch=8, steps=8, batch=4,
                lr="2e-3", chunk=64, eta="1.0", trials=2, windows=2, jobs=2, measure_steps=4),
}
# The report set's passkey documents and validation windows: fixed before any study row ran, and,
# like eval_passkey's own seed (the dev set), at 2^40 or above, where no training seed reaches.
REPORT_SEED = 2 ** 41


@dataclasses.dataclass
class StudyRow:
    name: str
    label: str
    flags: list[str]  # train.py's (eval_passkey.py's where train is False) on top of the common ones
    train: bool = True
    chosen_after_report: bool = False  # True for a row added after the report set's results were seen
    eval_flags: list = dataclasses.field(default_factory=list)  # eval_passkey.py's, for a trained row
    same_training: str = ""  # a row whose checkpoint this one evaluates (it trains nothing itself)
    longest: int = 1  # trained through 2 L0, 4 L0, ... up to this multiple of L0 (finetune_command)
    init_row: str = ""  # a row whose trained checkpoint this one starts from (default: the base)
    control: str = "control"  # the no-TTT row trained the same way, which this one is compared with


def far_depth(length: int, window: int) -> float:
    """The deepest needle depth, a multiple of 0.05, whose whole needle lies beyond the window in a
    document of `length` bytes (eval_passkey.is_far). 0.75 for Setting B's training documents (1025
    bytes, W 256): at b_ttt_only_far's 0.8 the needle's last 33 bytes, the key's second copy among
    them, are still inside the window."""
    depths = [k / 20 for k in range(21) if eval_passkey.is_far(length, k / 20, window)]
    if not depths:
        raise ValueError(f"no needle depth is beyond a window of {window} in {length} bytes")
    return max(depths)


def study_rows(c: dict) -> list[StudyRow]:
    layers = M.PRESETS[c["preset"]]["num_layers"]
    depth = far_depth(c["L0"] + 1, c["window"])  # training documents: L0 + 1 bytes (inputs and targets)
    only, control, mlp_in = ["--mode", "ttt_only"], ["--mode", "full", "--ttt-layers", "none"], ["--mode", "ttt_mlp_in"]
    return [
        StudyRow("base", "windowed base, no training", ["--method", "none"], train=False),
        StudyRow("control", "full fine-tuning, no TTT (control)", control),
        StudyRow("ttt_only", "ttt_only (the design's recommendation)", only),
        StudyRow("ttt_only_eta3", f"ttt_only, eta 3: the official eta at our chunk {c['chunk']}, not the official "
                 f"eta x chunk (3 x 4096; the chunk is capped by W {c['window']})", only + ["--ttt-eta", "3"]),
        StudyRow("ttt_only_emb", "ttt_only, targets from token embeddings", only + ["--ttt-target", "embeddings"]),
        StudyRow("ttt_only_far", f"ttt_only, training needles wholly beyond the window (depth <= {depth:g})",
                 only + ["--passkey-max-depth", f"{depth:g}"]),
        StudyRow("ttt_only_all_layers", f"ttt_only, TTT in all {layers} layers",
                 only + ["--ttt-layers", ",".join(str(i) for i in range(layers))]),
        StudyRow("ttt_mlp_in", "ttt_mlp_in: ttt_only + the TTT layers' linear_in (Z trains)", mlp_in),
        StudyRow("ttt_layers", "ttt_layers (upper bound)", ["--mode", "ttt_layers"]),
        # a second fine-tuning seed (batches and W_target init) where the comparison is close
        StudyRow("control_seed1", "full fine-tuning, no TTT (control), seed 1", control + ["--seed", "1"]),
        StudyRow("ttt_only_seed1", "ttt_only, seed 1", only + ["--seed", "1"]),
        StudyRow("ttt_mlp_in_seed1", "ttt_mlp_in, seed 1", mlp_in + ["--seed", "1"]),
    ]


def study_common(c: dict, seed: int) -> list[str]:
    return ["--original-len", str(c["L0"]), "--window", str(c["window"]), "--seed", str(seed), "--lr", c["lr"],
            "--lr-ttt", c["lr"], "--ttt-eta", c["eta"]]


def corpus_flags(c: dict) -> list[str]:
    """The corpus every training and evaluation of the run reads: --data's files, or none (the default)."""
    return ["--data", *c["data"]] if c.get("data") else []


def pretrain_command(c: dict, seed: int, folder: str) -> list[str]:
    return [sys.executable, "train.py", "--pretrain-only", "--preset", c["preset"], "--pretrain-steps",
            str(c["pretrain_steps"]), "--batch", str(c["pretrain_batch"]), "--log-every", "100",
            "--out", folder] + study_common(c, seed) + corpus_flags(c)


def wanted_rows(rows: list[StudyRow], args, p) -> list[str]:
    """The rows --rows names (default: all), with --bases, --base and --jobs checked (one line, exit 2)."""
    known = [r.name for r in rows]
    wanted = known if args.rows is None else args.rows.split(",")
    if any(r not in known for r in wanted):
        p.error(f"--rows must be among {known}, got {args.rows}")
    if args.base is not None and args.bases is not None:
        p.error(f"--base {args.base} names bases, --bases {args.bases} a count from seed 0: give one of them")
    if args.base is not None and named_seeds(args.base) is None:
        p.error(f"--base must be seeds >= 0, comma-separated, each once, got {args.base}")
    if args.bases is not None and args.bases < 1 or args.jobs is not None and args.jobs < 1:
        p.error(f"--bases and --jobs must be >= 1, got {args.bases}, {args.jobs}")
    return wanted


def named_seeds(text: str) -> list[int] | None:
    """--base's comma list of seeds ("1,2"), or None where it is not one (a seed below 0 or twice)."""
    items = text.split(",")
    if not all(i.isascii() and i.isdigit() for i in items) or len(set(map(int, items))) < len(items):
        return None
    return [int(i) for i in items]


def base_seeds(args) -> list[int]:
    """The seeds of the bases this run works on: --base's, or --bases from seed 0 (default 3)."""
    return named_seeds(args.base) if args.base is not None else list(range(args.bases or 3))


def pretrain_jobs(c: dict, seeds: list[int], work: str) -> list[dict]:
    """run_jobs' jobs that pretrain the bases not pretrained yet (work/base<seed>/base.pt)."""
    return [dict(name=f"base{seed}", after=None, log=os.path.join(work, "logs", f"base{seed}.log"),
                 commands=[pretrain_command(c, seed, os.path.join(work, f"base{seed}"))])
            for seed in seeds if not os.path.exists(os.path.join(work, f"base{seed}", "base.pt"))]


# What makes a work folder's checkpoints: a base or training found there is used, not made again.
# corpus: data.Corpus.sha256 of the text read (its files' names and contents), not where they lie
WORK_SETTINGS = ("preset", "L0", "window", "pretrain_steps", "pretrain_batch", "steps", "batch", "lr", "chunk", "eta",
                 "corpus")


def run_preset(presets: dict, args, p) -> dict:
    """This machine's preset with the run's own settings: --pretrain-steps, and the corpus (--data's
    files, or the default), read here so that a file it refuses stops the run before any work."""
    c = presets["cuda" if torch.cuda.is_available() else "cpu"]
    c = dict(c, pretrain_steps=args.pretrain_steps or c["pretrain_steps"],
             data=args.data and [os.path.abspath(path) for path in args.data])  # the jobs run in HERE
    if not args.tables:
        c["corpus"] = read_corpus(args, p).sha256
    return c


def read_corpus(args, p) -> data.Corpus:
    """--data's files, or the default corpus; a file it refuses: p.error (one line, exit 2)."""
    try:
        return data.load_corpus(args.data)
    except ValueError as e:
        p.error(f"--data: {e}")


def as_recorded(held: dict, c: dict) -> dict:
    """A settings.json's or JSON config's settings, read as this revision records them: an earlier
    revision read only the default corpus (the Python stdlib) and did not record its hash, so a file
    without one is taken as of the default corpus: this run's, where it reads the default too."""
    unrecorded = "the default corpus, unrecorded (an earlier revision)"
    return held if "corpus" in held else dict(held, corpus=unrecorded if c["data"] else c["corpus"])


def first_difference(held: dict, this: dict, keys) -> str | None:
    """The first of `keys` whose value in `held` is not `this`'s, in words ("seed 0, this run's is 1"),
    or None."""
    key = next((k for k in keys if held.get(k) != this[k]), None)
    return key and f"{key} {held.get(key)!r}, this run's is {this[key]!r}"


def claim_work(c: dict, seed: int, work: str) -> str | None:
    """Why `work` holds checkpoints of other settings than this run's (None: it holds these, or none
    yet, and its settings.json now says so; a folder of an earlier revision, without one, is taken
    as it is)."""
    settings = {k: c[k] for k in WORK_SETTINGS} | {"seed": seed}
    path = os.path.join(work, "settings.json")
    if not os.path.exists(path):
        return checkpoints.save_json(path, settings)
    with open(path) as f:
        held = as_recorded(json.load(f), c)
    other = first_difference(held, settings, settings)
    return other and f"--work {work} holds checkpoints made with {other}; pick another --work"


def drop_idle_pretraining(todo: list[dict]) -> list[dict]:
    """The jobs without the pretrainings of bases no other job runs on (their rows are all done)."""
    used = {j["name"].split("/")[0] for j in todo if "/" in j["name"]}
    return [j for j in todo if "/" in j["name"] or j["name"] in used]


def long_budget(c: dict, steps: int, longest: int) -> tuple[int, int]:
    """Steps per stage and batch for stages at 2 L0, 4 L0, ... `longest` L0 that see about the tokens
    of `steps` steps of c["batch"] at L0: batch / longest sequences (the stage lengths sum to
    (2 longest - 2) L0)."""
    if longest == 1:
        return steps, c["batch"]
    if longest & (longest - 1):
        raise ValueError(f"stages double up to the longest length: {longest} is not a power of 2")
    batch = c["batch"] // longest
    return round(steps * c["batch"] / (batch * (2 * longest - 2))), batch


def stages_as_pretraining_steps(c: dict, longest: int) -> int:
    """How many pretraining steps (c["pretrain_batch"] sequences of L0) hold the tokens a row trained
    at L0 and then through the stages to `longest` L0 sees: c["steps"] of c["batch"] at L0, then
    long_budget's steps per stage."""
    steps, batch = long_budget(c, c["steps"], longest)
    tokens = c["steps"] * c["batch"] * c["L0"] + steps * batch * (2 * longest - 2) * c["L0"]
    return round(tokens / (c["pretrain_batch"] * c["L0"]))


def finetune_command(c: dict, base: str, folder: str, flags: list[str], seed: int, steps: int,
                     longest: int = 1) -> list[str]:
    # --scale 1: one extension stage, at L0 (train.curriculum); the window keeps positions in range.
    # longest k > 1: train.py's stages at 2 L0, 4 L0, ... k L0 with the base's RoPE (--method none),
    # with batch / k sequences and the steps per stage that give about the tokens of `steps` at L0.
    # A row is the paper's plain sum of updates unless it names the erase (train.py's default is rho 1).
    sum_of_updates = [] if "--ttt-delta" in flags else ["--ttt-delta", "0"]
    scale, (steps, batch) = ["--scale", "1"], long_budget(c, steps, longest)
    if longest > 1:
        scale = ["--scale", str(longest), "--method", "none"]
    return [sys.executable, "train.py", "--init", base, *scale, "--steps", str(steps), "--batch",
            str(batch), "--ttt-chunk", str(c["chunk"]), "--eval-trials", "1", "--log-every", "50",
            "--out", folder] + without(study_common(c, seed), flags) + sum_of_updates + flags + corpus_flags(c)


def without(pairs: list[str], flags: list[str]) -> list[str]:
    """`pairs` (option, value, option, value, ...) less the options `flags` name: a row's own value
    (--ttt-eta 0) replaces the common one, as train.py takes each option once."""
    return [x for option, value in zip(pairs[::2], pairs[1::2]) if option not in flags for x in (option, value)]


def eval_command(c: dict, checkpoint: str, out: str, seed: int, flags: list[str]) -> list[str]:
    return [sys.executable, "eval_passkey.py", checkpoint, "--lengths", f"{c['L0']},{2 * c['L0']}", "--trials",
            str(c["trials"]), "--windows", str(c["windows"]), "--depths", ",".join(str(d) for d in DEPTHS),
            "--seed", str(seed), "--out", out] + flags + corpus_flags(c)


def stop_time(args, start: float) -> float:
    """The time.time() past which run_jobs starts no job: --stop-after minutes from `start` (0: none
    starts), or never."""
    return math.inf if args.stop_after is None else start + 60 * args.stop_after


def run_jobs(jobs: list[dict], at_once: int, on_done=lambda job, seconds: None, stop_at: float = math.inf) -> list[str]:
    """Runs jobs (dicts: name, commands, log, after: the name of a job that must end first, or None),
    up to `at_once` processes at a time (slot i on GPU i modulo the GPUs), each pinned to its own share
    of this machine's cores: the host launching kernels sets the pace of these small models, so each
    process needs a core of its own. A job's commands run one after another, their output appended
    to its log; on_done(job, seconds) follows each job. After a failure, or past `stop_at`
    (time.time()), no job starts; the running ones finish. Returns the failed commands."""
    cores, gpus = sorted(os.sched_getaffinity(0)), torch.cuda.device_count()
    share = max(1, len(cores) // at_once)
    slots = [cores[i * share % len(cores):][:share] for i in range(at_once)]
    pending, running, ended, failed = list(jobs), {}, set(), []
    while pending or running:
        free = [i for i in range(at_once) if i not in running]
        ready = [j for j in pending if j["after"] is None or j["after"] in ended]
        for slot, job in zip(free, ready if not failed and time.time() < stop_at else []):
            pending.remove(job)
            running[slot] = dict(job=job, step=-1, start=time.time(), proc=None)
        for slot, r in list(running.items()):
            code = r["proc"].poll() if r["proc"] else 0
            if code is None:
                continue
            if code != 0:
                failed.append(" ".join(r["job"]["commands"][r["step"]]))
                print(f"sweep: step failed (exit {code}): {failed[-1]}\n  its log, {r['job']['log']}, ends:\n"
                      + "".join(open(r["job"]["log"]).readlines()[-15:]), flush=True)
                del running[slot]
            elif r["step"] + 1 < len(r["job"]["commands"]):
                r["step"] += 1
                cmd = r["job"]["commands"][r["step"]]
                env = dict(os.environ, OMP_NUM_THREADS=str(len(slots[slot])),
                           **({"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus > 1 else {}))
                os.makedirs(os.path.dirname(os.path.abspath(r["job"]["log"])), exist_ok=True)
                with open(r["job"]["log"], "a") as log:
                    log.write("$ " + " ".join(cmd) + "\n")
                    log.flush()
                    r["proc"] = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                 preexec_fn=lambda cpus=slots[slot]: os.sched_setaffinity(0, cpus))
            else:
                ended.add(r["job"]["name"])
                del running[slot]
                on_done(r["job"], time.time() - r["start"])
        if not running and (failed or time.time() >= stop_at or not any(
                j["after"] is None or j["after"] in ended for j in pending)):
            break
        time.sleep(0.5)
    return failed


def split_counts(row: dict, depths: list[float], window: int, trials: int) -> dict:
    """Documents right and in all, [k, n], for near and far needles in one evaluated length; far as
    in train.py's final table (eval_passkey.is_far: the whole needle beyond the window)."""
    split = eval_passkey.near_far(row, depths, trials, window)
    return {part: [split[part]["right"], split[part]["n"]] for part in ("near", "far")}


def study_summary(results: dict) -> dict:
    """Per evaluation set, row and length: near and far [right, documents], pooled over the bases and
    per base, and bits per byte per base."""
    c, summary = results["config"], {}
    for split in ("dev", "report"):
        summary[split] = {}
        for name in dict.fromkeys(n for base in results["rows"].values() for n in base):
            by_length = {}
            for base, records in results["rows"].items():
                if name not in records:
                    continue
                for r in records[name][split]:
                    cell = by_length.setdefault(str(r["length"]), dict(near=[0, 0], far=[0, 0], by_base={}))
                    counts = split_counts(r, c["depths"], c["window"], c["trials"])
                    for key in ("near", "far"):
                        cell[key] = [cell[key][0] + counts[key][0], cell[key][1] + counts[key][1]]
                    cell["by_base"][base] = dict(counts, bpb=r["bpb"])
            summary[split][name] = by_length
    return summary


def percent(k_n: list[int], interval: bool = True) -> str:
    k, n = k_n
    if not n:
        return "-"
    low, high = wilson(k / n, n)
    return f"{100 * k / n:.0f}%" + (f" ({100 * low:.0f}-{100 * high:.0f})" if interval else "")


def the_text(c: dict) -> str:
    """A table's words for the text a run read: "The text: <--data's files> (SHA-256 ...). " or, on the
    default corpus (the Python stdlib), nothing."""
    return f"The text: {', '.join(c['data'])} (SHA-256 {c['corpus'][:16]}). " if c.get("data") else ""


def tables_study(results: dict, path: str) -> None:
    """<path>.md: per evaluation set, a table pooled over the bases and one per base; the plots."""
    c, summary = results["config"], results["summary"]
    known = [r.name for r in study_rows(c)]
    names = [n for n in known if n in summary["dev"]]
    rows = {r.name: r for r in study_rows(c)}
    bases = sorted(results["rows"], key=lambda b: int(b.removeprefix("base")))
    L = [str(c["L0"]), str(2 * c["L0"])]
    first = lambda name: next(results["rows"][b][name] for b in bases if name in results["rows"][b])
    mark = lambda name: rows[name].label + (" †" if rows[name].chosen_after_report else "")
    base_tokens = c["pretrain_steps"] * c["pretrain_batch"] * c["L0"]
    lines = [f"{len(bases)} windowed bases ({', '.join(bases)}): preset {c['preset']}, window W = {c['window']}, "
             f"pretrained at L0 = {c['L0']} for {c['pretrain_steps']} steps of {c['pretrain_batch']} "
             f"({base_tokens / 1e6:.1f} M tokens), each from its own seed. Every row runs on every base; it "
             f"fine-tunes {c['steps']} steps of {c['batch']} at L0, fine-tuning seed {c['seed']} unless it says "
             f"seed 1. Far: the whole needle lies beyond the window; near: not ({c['trials']} documents per "
             f"depth, depths {c['depths']}). Dev set: eval_passkey's documents (seed {c['dev_seed']}); report "
             f"set: other documents and validation windows (seed {c['report_seed']}), fixed before any row ran. "
             f"{the_text(c)}Made on {c['hardware']}, torch {c['torch']}.",
             "", "Pooled: all bases' documents, with the Wilson 95 % interval; it counts documents, not bases, "
             "so the per-base columns (bases in the order above) show the spread between bases. "
             "Tokens: the row's fine-tuning tokens and their share of a base's pretraining tokens; trains: "
             "the share of the parameters that train."]
    parallel = c.get("parallel")
    if parallel:
        lines += ["", f"{parallel['jobs']} processes at once on one {parallel['hardware']}: "
                  f"{parallel['speedup']:.2f}x the throughput of one at a time ({parallel['jobs']} runs of "
                  f"{parallel['steps']} ttt_only steps: {parallel['one_at_a_time_s']:.0f} s one by one, "
                  f"{parallel['at_once_s']:.0f} s at once; training tokens/s {parallel['training_speedup']:.2f}x)."]
    for split in ("dev", "report"):
        lines += ["", f"### Pooled over the bases, {split} set", "",
                  "| row | bases | tokens (share) | trains | " + " | ".join(
                      f"near {l} | far {l} | far {l} per base" for l in L) + f" | bpb {' / '.join(L)} |",
                  "|---" * (4 + 3 * len(L) + 1) + "|"]
        for name in names:
            record, cells = first(name), []
            for l in L:
                s = summary[split][name][l]
                cells += [percent(s["near"]), percent(s["far"]), " / ".join(
                    percent(s["by_base"][b]["far"], interval=False) for b in bases if b in s["by_base"])]
            bpb = " / ".join(f"{sum(v['bpb'] for v in summary[split][name][l]['by_base'].values()) / len(summary[split][name][l]['by_base']):.2f}" for l in L)
            trains = f"{100 * record['trainable'] / record['parameters']:.1f}%" if record["trainable"] else "-"
            tokens = f"{record['tokens'] / 1e6:.3g} M ({100 * record['budget']:.1f}%)" if record["tokens"] else "-"
            lines.append(f"| {mark(name)} | {len(summary[split][name][L[0]]['by_base'])} | {tokens} | {trains} | "
                         + " | ".join(cells) + f" | {bpb} |")
    for b in bases:
        lines += ["", f"### {b}: accuracy on the dev set / the report set; bits per byte on the dev set", "",
                  "| row | " + " | ".join(f"near {l} | far {l}" for l in L) + f" | bpb {' / '.join(L)} |",
                  "|---" * (2 * len(L) + 2) + "|"]
        for name in names:
            if b not in summary["dev"][name][L[0]]["by_base"]:
                continue
            cells = [" / ".join(percent(summary[s][name][l]["by_base"][b][key], interval=key == "far")
                                for s in ("dev", "report")) for l in L for key in ("near", "far")]
            bpb = " / ".join(f"{summary['dev'][name][l]['by_base'][b]['bpb']:.2f}" for l in L)
            lines.append(f"| {mark(name)} | " + " | ".join(cells) + f" | {bpb} |")
    after = [rows[n].label for n in names if rows[n].chosen_after_report]
    lines += ["", f"† chosen after the report set's results were seen: {'; '.join(after)}." if after else
              "No row was chosen after the report set's results were seen."]
    _write_markdown(path, lines)
    plot_study(results, path, names, bases)


def plot_study(results: dict, path: str, names: list[str], bases: list[str]) -> None:
    """<path>_pooled.png: far accuracy of every row, pooled with its interval and per base;
    <path>_<base>.png: accuracy against needle distance, as Setting B's plot, dev and report."""
    plt = _pyplot()
    if plt is None:
        return
    c, summary = results["config"], results["summary"]
    labels = {r.name: r.label for r in study_rows(c)}
    L = [str(c["L0"]), str(2 * c["L0"])]
    colors = plt.get_cmap("tab10").colors
    fig, axes = plt.subplots(2, len(L), figsize=(13, 1.5 + 0.9 * len(names)), sharey=True)
    for i, split in enumerate(("dev", "report")):
        for j, l in enumerate(L):
            ax = axes[i][j]
            for y, name in enumerate(names):
                s = summary[split][name][l]
                if not s["far"][1]:
                    continue
                p = s["far"][0] / s["far"][1]
                low, high = wilson(p, s["far"][1])
                ax.errorbar(100 * p, y, xerr=[[100 * (p - low)], [100 * (high - p)]], fmt="o", color="black", capsize=3)
                for k, b in enumerate(bases):
                    if b in s["by_base"]:
                        k_n = s["by_base"][b]["far"]
                        ax.plot(100 * k_n[0] / k_n[1], y + 0.15 * (k - (len(bases) - 1) / 2), "o", ms=4,
                                color=colors[k % 10], label=b if y == 0 else None, zorder=3)
            ax.set_title(f"far needles at length {l}, {split} set")
            ax.set_xlim(-3, 103)
            ax.set_xlabel("passkey accuracy (%)")
            ax.set_yticks(range(len(names)), [labels[n][:60] for n in names], fontsize=7)
    axes[0][0].invert_yaxis()  # the rows top to bottom, as in the table (the axes share y)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("far needles: all bases' documents pooled, with the 95 % interval (black); each base (colours)")
    fig.tight_layout()
    fig.savefig(path + "_pooled.png")
    plt.close(fig)
    for b in bases:
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
        for ax, split in zip(axes, ("dev", "report")):
            for i, name in enumerate(n for n in names if n in results["rows"][b]):
                points = sorted((distance(r["length"], d), 100 * a) for r in results["rows"][b][name][split]
                                for d, a in zip(c["depths"], r["by_depth"]))
                ax.plot(*zip(*points), marker="o", color=plt.get_cmap("tab20").colors[i % 20],
                        linestyle="-" if i < 10 else "--", label=labels[name][:60])
            ax.axvline(c["window"], color="grey", linestyle=":")
            ax.set_ylim(-3, 103)
            ax.set_title(f"{b}, {split} set")
            ax.set_xlabel(f"needle distance before the question (bytes); window W = {c['window']} dotted")
        axes[0].set_ylabel(f"passkey accuracy (%), {c['trials']} documents per point")
        axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(f"{path}_{b}.png")
        plt.close(fig)
    print(f"wrote {path}_pooled.png and {path}_<base>.png")


def measure_parallel(c: dict, work: str, jobs: int) -> dict:
    """The same short ttt_only fine-tuning `jobs` times one at a time, then `jobs` at once (one
    process each, pinned to its own cores, all on the one GPU): wall times and their ratio, and
    the training steps' own tokens/s (train.py's last log line) one at a time and summed at once."""
    folder = os.path.join(work, "parallel")
    base = os.path.join(work, "base0", "base.pt")
    if not os.path.exists(base):  # a step's throughput does not depend on the weights: a quick base will do
        base = os.path.join(folder, "base", "base.pt")
        if not os.path.exists(base):
            if run_jobs([dict(name="base", after=None, log=os.path.join(folder, "base.log"),
                              commands=[pretrain_command(dict(c, pretrain_steps=20), 0, os.path.dirname(base))])], 1):
                sys.exit("sweep: --measure-parallel could not make its base")
    steps, timing = c["measure_steps"], {}
    for tag, at_once in (("one", 1), ("at_once", jobs)):
        runs = [dict(name=f"{tag}{i}", after=None, log=os.path.join(folder, f"{tag}{i}.log"),
                     commands=[finetune_command(c, base, os.path.join(folder, f"{tag}{i}"), ["--mode", "ttt_only"], 0, steps)])
                for i in range(jobs)]
        for run_ in runs:
            if os.path.exists(run_["log"]):
                os.remove(run_["log"])
        walls, start = [], time.time()
        if run_jobs(runs, at_once, on_done=lambda job, seconds: walls.append(round(seconds, 1))):
            sys.exit("sweep: --measure-parallel: a run failed")
        rates = [float(re.findall(r"([\d,]+) tok/s", open(r["log"]).read())[-1].replace(",", "")) for r in runs]
        timing[tag] = dict(wall=round(time.time() - start, 1), walls=walls, rates=rates)
        print(f"{tag.replace('_', ' ')}: {timing[tag]['wall']:.1f} s wall for {jobs} runs of {steps} steps "
              f"(each {walls} s); training tokens/s {[round(r) for r in rates]}", flush=True)
    cores = len(os.sched_getaffinity(0))
    result = dict(jobs=jobs, steps=steps, batch=c["batch"], length=c["L0"], mode="ttt_only",
                  cores=cores, cores_per_job=max(1, cores // jobs), one_at_a_time_s=timing["one"]["wall"],
                  one_at_a_time_runs_s=timing["one"]["walls"], at_once_s=timing["at_once"]["wall"],
                  at_once_runs_s=timing["at_once"]["walls"], speedup=round(timing["one"]["wall"] / timing["at_once"]["wall"], 3),
                  tok_s_one_at_a_time=timing["one"]["rates"], tok_s_at_once=timing["at_once"]["rates"],
                  training_speedup=round(sum(timing["at_once"]["rates"]) / (sum(timing["one"]["rates"]) / jobs), 3),
                  hardware=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    print(f"{jobs} at once: {result['speedup']:.2f}x the throughput of one at a time (wall), "
          f"{result['training_speedup']:.2f}x in training tokens/s", flush=True)
    return result


def checked_eval_seed(args, p, default: int, apart_from: int, lengths: list[int], n_depths: int) -> int:
    """--eval-seed, or `default`: the seed evaluations draw their documents and windows with. Refused
    below 2**40, where training's seeds lie, from 2**63, and where it would draw any document or
    window of the evaluation seeded `apart_from` at these lengths (eval_passkey.draw_seeds), unless it
    is that seed and that is the default."""
    seed = default if args.eval_seed is None else args.eval_seed
    if not eval_passkey.SEED_FLOOR <= seed < eval_passkey.SEED_CEILING:
        p.error(f"--eval-seed must be in [2**40, 2**63), apart from training's seeds; got {seed}")
    shared = eval_passkey.draw_seeds(seed, lengths, n_depths) & eval_passkey.draw_seeds(apart_from, lengths, n_depths)
    if shared and not seed == apart_from == default:
        p.error(f"--eval-seed {seed} draws some of the documents or windows of seed {apart_from} at lengths "
                f"{lengths}; pick one at least {max(lengths) + 1000 * n_depths} away from it")
    return seed


def study(args, p) -> None:
    c = run_preset(PRESETS_STUDY, args, p)
    rows = study_rows(c)
    wanted = wanted_rows(rows, args, p)
    json_path = args.out + ".json"
    results = json.load(open(json_path)) if os.path.exists(json_path) else None
    if args.tables:
        if results is None or not results["rows"]:
            p.error(f"no study rows at {json_path}")
        results["summary"] = study_summary(results)
        return tables_study(results, args.out)
    # the report set: other documents than the dev set's (eval_passkey's seed) at the study's lengths
    report_seed = checked_eval_seed(args, p, REPORT_SEED, eval_passkey.EVAL_SEED, [c["L0"], 2 * c["L0"]], len(DEPTHS))
    config = dict(c, seed=args.seed, dev_seed=eval_passkey.EVAL_SEED, depths=DEPTHS, torch=torch.__version__,
                  report_seed=report_seed,
                  hardware=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    if results is None:
        results = dict(config=config, rows={})
    else:  # resuming: the same protocol, or another --out
        if other := first_difference(as_recorded(results["config"], c), config, WORK_SETTINGS + (
                "trials", "windows", "seed", "dev_seed", "report_seed", "depths")):
            p.error(f"{json_path} holds a study with {other}; pick another --out")
    jobs = args.jobs or c["jobs"]
    if why := claim_work(c, args.seed, args.work):
        p.error(why)
    if args.measure_parallel:
        results["config"]["parallel"] = measure_parallel(c, args.work, args.measure_parallel)
        return checkpoints.save_json(json_path, results)
    # --- the jobs: each base's pretraining, then every row on every base (row by row, so that a
    # study stopped early has each finished row on every base)
    work, seeds = args.work, base_seeds(args)
    todo = pretrain_jobs(c, seeds, work)
    waits = {j["name"] for j in todo}
    for row in rows:
        for seed in seeds:
            b = f"base{seed}"
            if row.name not in wanted or row.name in results["rows"].get(b, {}):
                continue
            base, folder = os.path.join(work, b, "base.pt"), os.path.join(work, b, row.name)
            checkpoint, commands = base, []
            if row.train:
                checkpoint = os.path.join(folder, "ckpt.pt")
                if not os.path.exists(os.path.join(folder, "results.json")):
                    commands.append(finetune_command(c, base, folder, row.flags, args.seed, c["steps"]))
            evals = {split: os.path.join(work, b, f"{row.name}_{split}.json") for split in ("dev", "report")}
            commands += [eval_command(c, checkpoint, evals[split], config[f"{split}_seed"], [] if row.train else row.flags)
                         for split in ("dev", "report")]
            todo.append(dict(name=f"{b}/{row.name}", after=b if b in waits else None, commands=commands,
                             log=os.path.join(work, "logs", f"{b}_{row.name}.log"), base=b, row=row,
                             folder=folder, checkpoint=checkpoint, evals=evals))
    todo = drop_idle_pretraining(todo)
    waits = {j["name"] for j in todo if "/" not in j["name"]}
    cores = len(os.sched_getaffinity(0))
    print(f"study: {len(todo)} jobs ({len(waits)} bases to pretrain), {jobs} at once on {cores} cores "
          f"({max(1, cores // jobs)} each); logs in {os.path.join(work, 'logs')}", flush=True)
    base_tokens = c["pretrain_steps"] * c["pretrain_batch"] * c["L0"]
    done, start = [0], time.time()

    def record(job, seconds):
        done[0] += 1
        if "row" not in job:
            return print(f"[{done[0]}/{len(todo)} {time.time() - start:.0f} s] {job['name']}: pretrained in "
                         f"{seconds:.0f} s", flush=True)
        row, folder = job["row"], job["folder"]
        r = dict(label=row.label, chosen_after_report=row.chosen_after_report, seconds=round(seconds, 1),
                 tokens=0, trainable=0, **{s: json.load(open(path))["rows"] for s, path in job["evals"].items()})
        if row.train:  # --scale 1: one extension stage of steps x batch sequences at L0 (train.curriculum)
            run = json.load(open(os.path.join(folder, "results.json")))
            r["tokens"] = run["config"]["steps"] * run["config"]["batch"] * run["settings"]["trained_len"]
            r["trainable"] = sum(t.numel() for t in checkpoints.load_checkpoint(os.path.join(folder, "adapter.pt"))["model"].values())
        r["budget"] = r["tokens"] / base_tokens
        r["parameters"] = sum(t.numel() for t in checkpoints.load_checkpoint(job["checkpoint"])["model"].values())
        results["rows"].setdefault(job["base"], {})[row.name] = r
        checkpoints.save_json(json_path, results)
        far = lambda s: "/".join(percent(split_counts(x, DEPTHS, c["window"], c["trials"])["far"], False) for x in r[s])
        print(f"[{done[0]}/{len(todo)} {time.time() - start:.0f} s] {job['name']}: far at {c['L0']}/{2 * c['L0']} "
              f"dev {far('dev')}, report {far('report')} ({seconds:.0f} s)", flush=True)

    failed = run_jobs(todo, jobs, record, stop_time(args, start))
    if done[0] or os.path.exists(json_path):  # a run that ran no job writes nothing
        results["summary"] = study_summary(results)
        checkpoints.save_json(json_path, results)
    if results["rows"]:
        tables_study(results, args.out)
    print(f"study: {time.time() - start:.0f} s wall", flush=True)
    if failed:
        sys.exit(f"sweep: {len(failed)} step(s) failed (above); finished rows are in {json_path}, "
                 f"the same command resumes")
    if done[0] < len(todo):
        print(f"study: stopped by --stop-after with {len(todo) - done[0]} jobs left; run it again (with a longer "
              f"--stop-after, or none) to resume")


# ---------------------------------------------------------------------------------------------
# Setting "horizon": how far past the trained length the fast memory holds (issue: TTT past 4x)
# ---------------------------------------------------------------------------------------------

# Lengths as multiples of the window W; every needle depth here is far (wholly beyond W) at 4 W and up.
# stream: the longest length is also decoded one token per step (the path LMGen runs) on base 0.
# "cpu" is the study's miniature (dim 128, 4 layers, L0 = 4 W as on the GPU): minutes on 2 cores, to 128 W
# as on the GPU since a CPU too computes only the window's pairs (window_attention.py).
PRESETS_HORIZON = {
    # job_gib: GPU memory one job may hold, the largest seen rounded up (an evaluation at 128 W: 27.2-27.3
    # GiB per process in the out-of-memory report of results/horizon/horizon_h200_draw2.log); 6 and 8 at
    # once ran an H200 out of memory, so --jobs is checked against it (jobs_fit)
    "cuda": dict(PRESETS_STUDY["cuda"], multiples=[4, 8, 16, 32, 64, 128], horizon_depths=[0.0, 0.25, 0.5],
                 stream_trials=8, stream_depth=0.25, jobs=4, job_gib=28),
    "cpu": dict(PRESETS_STUDY["cpu"], L0=512, window=128, pretrain_steps=600, pretrain_batch=8, steps=200, batch=8,
                multiples=[4, 8, 16, 32, 64, 128], horizon_depths=[0.0, 0.25, 0.5], trials=10, windows=8,
                stream_trials=2, stream_depth=0.25, jobs=2),
}


def horizon_rows(c: dict) -> list[StudyRow]:
    """The study's rows that answer the horizon question, then the remedies: forgetting per chunk
    (--ttt-decay, ours), K times the mean past K chunks (--ttt-average-after, ours; K = the trained
    length's chunks changes nothing up to it) and the paper's update clipping (--ttt-update-clip at
    1, about half the deeper layers' update norms), trained in or set at inference only; the
    smaller trainable set, a LoRA on the TTT layers' linear_in (--mode ttt_lora_in); and the delta
    rule's erase along each chunk's keys (--ttt-delta, ours), trained in or at inference only; rows
    trained through stages of doubling length, one of them without memory (eta 0), one with the
    control's trainable set (every weight) and memory, and two with a LoRA on every linear (rank 8, 4);
    the control and the rank-4 LoRA at other learning rates (`_lr<rate>`, each side tuned)."""
    study = {r.name: r for r in study_rows(c)}
    mlp_in = ["--mode", "ttt_mlp_in"]
    rows = [study[n] for n in ("base", "control", "ttt_only", "ttt_only_all_layers", "ttt_mlp_in")]
    trained_chunks = c["L0"] // c["chunk"]
    for k in (trained_chunks // 4, trained_chunks // 2):
        rows.append(StudyRow(f"ttt_mlp_in_average{k}", f"ttt_mlp_in, mean past {k} chunks, trained",
                             mlp_in + ["--ttt-average-after", str(k)]))
    rows.append(StudyRow(f"ttt_mlp_in_eval_average{trained_chunks}", f"ttt_mlp_in, mean past {trained_chunks} "
                         "chunks (the trained length) at inference only", mlp_in,
                         eval_flags=["--ttt-average-after", str(trained_chunks)], same_training="ttt_mlp_in"))
    for decay in ("0.99", "0.97"):
        rows.append(StudyRow(f"ttt_mlp_in_decay{decay[2:]}", f"ttt_mlp_in, decay {decay} per chunk, trained",
                             mlp_in + ["--ttt-decay", decay]))
    rows.append(StudyRow("ttt_mlp_in_eval_decay97", "ttt_mlp_in, decay 0.97 at inference only", mlp_in,
                         eval_flags=["--ttt-decay", "0.97"], same_training="ttt_mlp_in"))
    rows.append(StudyRow("ttt_lora_in", "ttt_only + LoRA of rank 8 on the TTT layers' linear_in (Z trains, low rank)",
                         ["--mode", "ttt_lora_in", "--lora-rank", "8"]))
    rows.append(StudyRow("ttt_mlp_in_eval_clip1", "ttt_mlp_in, updates clipped to norm 1 at inference only "
                         "(the paper's)", mlp_in, eval_flags=["--ttt-update-clip", "1"], same_training="ttt_mlp_in"))
    for rho in ("1", "0.3"):
        rows.append(StudyRow(f"ttt_mlp_in_delta{rho}", f"ttt_mlp_in, the delta rule's erase {rho}, trained",
                             mlp_in + ["--ttt-delta", rho]))
        rows.append(StudyRow(f"ttt_mlp_in_eval_delta{rho}", f"ttt_mlp_in, the delta rule's erase {rho} at inference "
                             "only", mlp_in, eval_flags=["--ttt-delta", rho], same_training="ttt_mlp_in"))
    rows.append(StudyRow("ttt_lora_in_delta1", "ttt_lora_in (rank 8), the delta rule's erase 1, trained",
                         ["--mode", "ttt_lora_in", "--lora-rank", "8", "--ttt-delta", "1"]))
    # Longer documents: stages at 2 L0 and 4 L0 (8 and 16 W), about the same tokens as one stage at
    # L0, against the control trained the same way.
    k = 4
    through = (f"trained through {2 * c['L0'] // c['window']} W and {k * c['L0'] // c['window']} W "
               "({} steps of {} per stage)".format(*long_budget(c, c["steps"], k)))
    rows.append(StudyRow(f"control_long{k}", f"full fine-tuning, no TTT, {through} (control)",
                         study["control"].flags, longest=k))
    rows.append(StudyRow(f"ttt_mlp_in_delta1_long{k}", f"ttt_mlp_in, the delta rule's erase 1, {through}",
                         mlp_in + ["--ttt-delta", "1"], longest=k, control=f"control_long{k}"))
    # The same stages after the row trained at L0 (as train.py's curriculum: L0's stage first).
    then = f"then {through.removeprefix('trained ')}"
    rows.append(StudyRow(f"control_then_long{k}", f"full fine-tuning, no TTT, trained at {c['L0'] // c['window']} W, "
                         f"{then} (control)", study["control"].flags, longest=k, init_row="control"))
    rows.append(StudyRow(f"ttt_mlp_in_delta1_then_long{k}", f"ttt_mlp_in, the delta rule's erase 1, trained at "
                         f"{c['L0'] // c['window']} W, {then}", mlp_in + ["--ttt-delta", "1"], longest=k,
                         init_row="ttt_mlp_in_delta1", control=f"control_then_long{k}"))
    rows.append(StudyRow(f"ttt_lora_in_delta1_then_long{k}", f"ttt_lora_in (rank 8), the delta rule's erase 1, "
                         f"trained at {c['L0'] // c['window']} W, {then}",
                         ["--mode", "ttt_lora_in", "--lora-rank", "8", "--ttt-delta", "1"], longest=k,
                         init_row="ttt_lora_in_delta1", control=f"control_then_long{k}"))

    def trained_then_stages(name: str, what: str, flags: list[str], control: str = "control") -> None:
        """The row at L0, then from it through the stages; `control`: its no-TTT row at L0."""
        rows.append(StudyRow(name, f"{what}, trained", flags, control=control))
        rows.append(StudyRow(f"{name}_then_long{k}", f"{what}, trained at {c['L0'] // c['window']} W, {then}", flags,
                             longest=k, init_row=name, control=f"{control}_then_long{k}"))

    # The same as ttt_mlp_in through the stages but without memory (eta 0 writes nothing): the same
    # trainable set, steps and data, so it differs from that row in the memory alone, and its gap to the
    # full fine-tuning control is the trainable set's.
    trained_then_stages("ttt_mlp_in_delta1_eta0", "ttt_mlp_in, erase 1, eta 0 (no memory)",
                        mlp_in + ["--ttt-delta", "1", "--ttt-eta", "0"])
    # The control's trainable set (every weight) with memory: differs from the control in the TTT
    # layers alone, so its gap to the control is the memory's at the control's trainable set.
    trained_then_stages("ttt_full_delta1", "full fine-tuning with TTT, erase 1", ["--mode", "full", "--ttt-delta", "1"])
    # A small set that adapts attention too: moshi's LoRA of rank 8 on every linear (--mode lora_ttt,
    # moshi-finetune's recipe at a lower rank; the TTT layers' linear_in among them, so Z learns).
    trained_then_stages("ttt_lora_all_delta1", "lora_ttt (rank 8 on every linear), erase 1",
                        ["--mode", "lora_ttt", "--lora-rank", "8", "--ttt-delta", "1"])
    # The same at rank 4: 4.9 % of the head128 model's parameters (rank 8: 5.8 %), the 5 %
    # bound on the study's model; at Moshi 7B 1.45 % (rank 8: 1.60 %).
    trained_then_stages("ttt_lora_all_rank4_delta1", "lora_ttt (rank 4 on every linear), erase 1",
                        ["--mode", "lora_ttt", "--lora-rank", "4", "--ttt-delta", "1"])
    # Its twin without memory (eta 0): whose is its cost at 8 W, the memory's or the trainable set's.
    trained_then_stages("ttt_lora_all_rank4_delta1_eta0", "lora_ttt (rank 4 on every linear), erase 1, eta 0 "
                        "(no memory)", ["--mode", "lora_ttt", "--lora-rank", "4", "--ttt-delta", "1", "--ttt-eta", "0"])
    # Other learning rates. On a base that does not over-fit, the pretraining's own makes full
    # fine-tuning worse: the control at 0.3 times it (the first lower rate tried), and each side at its
    # best of four rates at 4 W on the Python corpus's 1,800-step base 0 (control_learning_rate.sh): the
    # control at 0.1 times it, the small set at 0.3 times it (--lr-ttt too, as that script trained it).
    rate = lambda factor: f"{factor * float(c['lr']):g}"
    for lr in (rate(0.3), rate(0.1)):
        flags = study["control"].flags + ["--lr", lr]
        rows.append(StudyRow(f"control_lr{lr}", f"full fine-tuning, no TTT, learning rate {lr} (control)", flags))
        rows.append(StudyRow(f"control_lr{lr}_then_long{k}", f"full fine-tuning, no TTT, learning rate {lr}, "
                             f"trained at {c['L0'] // c['window']} W, {then} (control)", flags, longest=k,
                             init_row=f"control_lr{lr}"))
    small = rate(0.3)
    trained_then_stages(f"ttt_lora_all_rank4_delta1_lr{small}", f"lora_ttt (rank 4 on every linear), erase 1, "
                        f"learning rate {small}", ["--mode", "lora_ttt", "--lora-rank", "4", "--ttt-delta", "1",
                                                   "--lr", small, "--lr-ttt", small], control=f"control_lr{rate(0.1)}")
    return rows


def writes_memory(row: StudyRow) -> bool:
    """Whether a horizon row's TTT layers write anything (eta above 0): a row with eta 0 has no fast
    weight to probe, and its one-token streaming check would test no memory."""
    eta = float(row.flags[row.flags.index("--ttt-eta") + 1]) if "--ttt-eta" in row.flags else None
    return row.name.startswith("ttt") and eta != 0


def jobs_that_fit(c: dict, gpus: int, gib_per_gpu: float) -> int | None:
    """How many processes at once `gpus` GPUs of `gib_per_gpu` each hold at the preset's job_gib each
    (run_jobs puts process i on GPU i modulo the GPUs); None: the preset has no such measure."""
    if "job_gib" not in c:
        return None
    return int(gib_per_gpu // c["job_gib"]) * max(gpus, 1)


def jobs_fit(c: dict, jobs: int, gpus: int, gib_per_gpu: float) -> str | None:
    """Why `jobs` processes at once would run out of memory (None: they fit, or no measure)."""
    most = jobs_that_fit(c, gpus, gib_per_gpu)
    if most is None or jobs <= most:
        return None
    per_gpu = math.ceil(jobs / max(gpus, 1))
    return (f"--jobs {jobs}: {per_gpu} process(es) on a GPU of {gib_per_gpu:.1f} GiB, each up to {c['job_gib']} "
            f"GiB (an evaluation at the longest length), would run out of memory; "
            + (f"at most {most} here" if most else "this GPU holds none"))


def horizon_lengths(c: dict) -> list[int]:
    return [m * c["window"] for m in c["multiples"]]


def horizon_jobs(c: dict, rows: list[StudyRow], wanted: list[str], results: dict, work: str, seeds: list[int],
                 seed: int, asked: list[str] | None = None, eval_seed: int = eval_passkey.EVAL_SEED) -> list[dict]:
    """run_jobs' jobs for the wanted rows not yet in `results`, on each base: pretraining, each
    training, each evaluation, and on base 0 the probe and one-token streaming check of each TTT training
    that writes memory (writes_memory).
    A training and its evaluation are two jobs: a row that starts from, or evaluates, another's
    checkpoint waits for that training only, which runs again where its row is evaluated already but
    its checkpoint is not in `work` (a fresh machine). In the order run_jobs takes them when free:
    the pretrainings, the trainings, the evaluations, then the streaming checks (the slowest); among
    the evaluations and among the checks, the `asked` rows' (default: all) before those of the rows
    they are compared against, so that a run cut short answers the question it was started for first.
    Every evaluation draws its documents and validation windows with `eval_seed`."""
    todo = pretrain_jobs(c, seeds, work)
    lengths = horizon_lengths(c)
    common_eval = ["--trials", str(c["trials"]), "--windows", str(c["windows"]), "--depths",
                   ",".join(str(d) for d in c["horizon_depths"]), "--seed", str(eval_seed)] + corpus_flags(c)
    longest = ["--lengths", str(lengths[-1]), "--depths", str(c["stream_depth"]), "--trials", str(c["stream_trials"]),
               "--windows", "1", "--seed", str(eval_seed)] + corpus_flags(c)

    def pending(*names):  # the first of these jobs still to run (None: what they make is there)
        return next((n for n in names if any(j["name"] == n for j in todo)), None)

    to_evaluate = {(f"base{s}", r.name) for r in rows for s in seeds
                   if r.name in wanted and r.name not in results["rows"].get(f"base{s}", {})}
    sources = {(b, r.same_training or r.init_row) for r in rows for b, name in to_evaluate
               if name == r.name and (r.same_training or r.init_row)}  # trainings other rows read
    for row in rows:
        for base_seed in seeds:
            b = f"base{base_seed}"
            evaluate = (b, row.name) in to_evaluate
            if not evaluate and (b, row.name) not in sources:
                continue
            trained = row.same_training or row.name  # the folder of the training this row evaluates
            folder, checkpoint = os.path.join(work, b, trained), os.path.join(work, b, "base.pt")
            source = row.same_training or row.init_row
            after = pending(f"{b}/{source}/train", b) if source else pending(b)
            log = os.path.join(work, "logs", f"{b}_{row.name}.log")
            if row.same_training:
                checkpoint = os.path.join(folder, "ckpt.pt")
            elif row.train:
                base = os.path.join(work, b, row.init_row, "ckpt.pt") if row.init_row else checkpoint
                checkpoint = os.path.join(folder, "ckpt.pt")
                if not os.path.exists(os.path.join(folder, "results.json")):
                    todo.append(dict(name=f"{b}/{row.name}/train", after=after, log=log, trained=True, commands=[
                        finetune_command(c, base, folder, row.flags, seed, c["steps"], row.longest)]))
                    after = f"{b}/{row.name}/train"
            if not evaluate:  # evaluated already; trained again only for the rows that read it
                continue
            out = os.path.join(work, b, f"{row.name}_horizon.json")
            flags = row.eval_flags if row.train else row.flags
            todo.append(dict(name=f"{b}/{row.name}", after=after, log=log, base=b, row=row.name, out=out, commands=[
                [sys.executable, "eval_passkey.py", checkpoint, "--lengths", ",".join(map(str, lengths)),
                 "--out", out] + common_eval + flags]))
            checked = base_seed == 0 and writes_memory(row) and not row.same_training  # its own TTT training
            if checked and row.name not in results["probe"]:
                probe_out = os.path.join(work, b, f"{row.name}_probe.json")
                todo.append(dict(name=f"{b}/{row.name}/probe", after=after, row=row.name, probe=probe_out,
                                 log=os.path.join(work, "logs", f"{b}_{row.name}_probe.log"), commands=[
                                     [sys.executable, "sweep.py", "--probe", checkpoint, "--probe-length",
                                      str(lengths[-1]), "--out", probe_out] + corpus_flags(c)]))
            if checked and row.name not in results["streaming"]:
                outs = {way: os.path.join(work, b, f"{row.name}_longest_{way}.json") for way in ("parallel", "streaming")}
                todo.append(dict(name=f"{b}/{row.name}/streaming", after=after, row=row.name, outs=outs,
                                 log=os.path.join(work, "logs", f"{b}_{row.name}_streaming.log"), commands=[
                                     [sys.executable, "eval_passkey.py", checkpoint, "--out", outs[way]] + longest
                                     + (["--streaming"] if way == "streaming" else []) for way in outs]))
    kind = lambda j: 0 if "/" not in j["name"] else 1 if j.get("trained") else 3 if "outs" in j else 2
    other = lambda j: kind(j) >= 2 and j["name"].split("/")[1] not in (wanted if asked is None else asked)
    return sorted(drop_idle_pretraining(todo), key=lambda j: (kind(j), other(j)))


def horizon_wanted(rows: list[StudyRow], asked: list[str], start_rows_untested: bool = False) -> list[str]:
    """The rows to evaluate: the asked ones, what they read (another's training, the row they start
    from) and a TTT row's control. start_rows_untested leaves out the rows they start from
    (horizon_jobs still trains those, as the sources of the rows that start from them)."""
    return asked + [n for r in rows if r.name in asked
                    for n in (r.same_training, "" if start_rows_untested else r.init_row,
                              r.control if r.name.startswith("ttt") else "")
                    if n and n not in asked]


def horizon(args, p) -> None:
    c = run_preset(PRESETS_HORIZON, args, p)
    rows = horizon_rows(c)
    asked = wanted_rows(rows, args, p)
    wanted = horizon_wanted(rows, asked, args.start_rows_untested)
    lengths = horizon_lengths(c)
    if not all(eval_passkey.is_far(L, d, c["window"]) for L in lengths for d in c["horizon_depths"]):
        p.error(f"horizon depths {c['horizon_depths']} are not all far at {lengths} with window {c['window']}")
    eval_seed = checked_eval_seed(args, p, eval_passkey.EVAL_SEED, eval_passkey.EVAL_SEED, lengths,
                                  len(c["horizon_depths"]))  # the default draw, or one apart from it
    jobs = args.jobs or c["jobs"]
    if not args.tables and torch.cuda.is_available():
        gpus, gib = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        most = jobs_that_fit(c, gpus, gib)
        if args.jobs is None and most is not None and 0 < most < jobs:  # the preset's number, on a smaller GPU
            print(f"horizon: {most} processes at once, not the preset's {jobs}: {jobs_fit(c, jobs, gpus, gib)}")
            jobs = most
        elif why := jobs_fit(c, jobs, gpus, gib):
            p.error(why)
    json_path = args.out + ".json"
    results = json.load(open(json_path)) if os.path.exists(json_path) else None
    if args.tables:
        if results is None or not results["rows"]:
            p.error(f"no horizon rows at {json_path}")
        depths = results["config"]["horizon_depths"]
        for base_name, rows_of_base in results["rows"].items():
            for name, evaluations in rows_of_base.items():
                for r in evaluations:
                    if len(r.get("by_depth", [])) != len(depths):
                        p.error(f"{json_path}: {base_name} {name} at {r['length']} has no accuracy per depth for each of "
                                f"the configuration's depths {depths}")
        return tables_horizon(results, args.out)
    config = dict(c, jobs=jobs, seed=args.seed, eval_seed=eval_seed, lengths=lengths,
                  torch=torch.__version__,
                  hardware=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
    if results is None:
        results = dict(config=config, rows={}, streaming={}, probe={})
    elif other := first_difference(as_recorded(results["config"], c), config,
                                   WORK_SETTINGS + ("seed", "lengths", "eval_seed")):
        p.error(f"{json_path} holds a horizon with {other}; pick another --out")
    if why := claim_work(c, args.seed, args.work):
        p.error(why)
    todo = horizon_jobs(c, rows, wanted, results, args.work, base_seeds(args), args.seed, asked, eval_seed)
    print(f"horizon: {len(todo)} jobs, lengths {lengths}; logs in {os.path.join(args.work, 'logs')}", flush=True)
    done, start = [0], time.time()

    def record(job, seconds):
        done[0] += 1
        if "probe" in job:
            results["probe"][job["row"]] = json.load(open(job["probe"]))
            print(f"[{done[0]}/{len(todo)}] {job['name']} ({seconds:.0f} s)", flush=True)
        elif "outs" in job:  # the same documents, parallel form against one token per step
            got = {way: json.load(open(path))["rows"][0] for way, path in job["outs"].items()}
            results["streaming"][job["row"]] = dict(length=lengths[-1], depth=c["stream_depth"], **{
                way: r["correct"][0] for way, r in got.items()})
            same = got["parallel"]["correct"] == got["streaming"]["correct"]
            print(f"[{done[0]}/{len(todo)}] {job['name']}: streaming {'==' if same else '!='} parallel per document "
                  f"({seconds:.0f} s)", flush=True)
        elif "row" in job:
            results["rows"].setdefault(job["base"], {})[job["row"]] = json.load(open(job["out"]))["rows"]
            far = " / ".join(f"{100 * r['passkey']:.0f}%" for r in results["rows"][job["base"]][job["row"]])
            print(f"[{done[0]}/{len(todo)} {time.time() - start:.0f} s] {job['name']}: far {far} ({seconds:.0f} s)",
                  flush=True)
        else:
            print(f"[{done[0]}/{len(todo)} {time.time() - start:.0f} s] {job['name']}: "
                  f"{'trained' if job.get('trained') else 'pretrained'} in {seconds:.0f} s", flush=True)
        checkpoints.save_json(json_path, results)

    failed = run_jobs(todo, jobs, record, stop_time(args, start))
    if results["rows"]:
        tables_horizon(results, args.out)
    print(f"horizon: {time.time() - start:.0f} s wall", flush=True)
    if failed:
        sys.exit(f"sweep: {len(failed)} step(s) failed (above); finished rows are in {json_path}, the same command resumes")
    if done[0] < len(todo):
        print(f"horizon: stopped by --stop-after with {len(todo) - done[0]} jobs left; run it again (with a longer "
              f"--stop-after, or none) to resume")


@torch.no_grad()
def probe(checkpoint: str, length: int, out: str, device: str, corpus: data.Corpus) -> None:
    """Why the memory breaks, measured on one passkey document of `length` bytes (depth 0.25, the
    eval seed): in each TTT layer, per chunk i, |eta S_i| (S_i = sum_(j<i) gamma^(i-1-j) V_j^T Z_j,
    the sum of updates chunk i reads, with the layer's clipping and mean past K chunks), |eta V_i^T Z_i|
    (chunk i's update; with the delta rule, the write eta V_i^T Z_i) and the layer output's mean norm
    per token, all Frobenius / Euclidean; and `sum_centred`, the plain sum had each chunk's targets
    been centred on their mean. The document's text is `corpus`'s validation split.
    Written to `out` as JSON."""
    import ttt
    loaded = checkpoints.load_checkpoint(checkpoint)
    model = checkpoints.model_from_checkpoint(loaded, device, checkpoint).eval()
    M.set_context(model, loaded["settings"].get("window"))
    tokens, _ = data.passkey_batch(corpus.val, length, 1, torch.Generator().manual_seed(eval_passkey.EVAL_SEED),
                                   depths=[0.25])
    layers = [(i, layer.gating) for i, layer in enumerate(model.transformer.layers)
              if isinstance(layer.gating, ttt.TTTGating)]
    record = {}

    def hook(i):
        def fn(module, inputs, output):
            x = inputs[0].float()
            Z, source, Zf = module._inputs(x, None if module.x0 is None else module.x0.float(),
                                           torch.arange(x.shape[1], device=x.device))
            V = module.targets(source, module.chunk_size).float()
            C, S, S_centred, r = module.chunk_size, None, None, dict(sum=[], update=[], output=[], sum_centred=[])
            for start in range(0, x.shape[1], C):
                dW = module.eta * V[0, start:start + C].T @ Zf[0, start:start + C].float()  # [d, h]
                if module.update_clip:
                    dW = dW * min(1.0, module.update_clip / max(dW.norm().item(), 1e-30))
                n, K = start // C, module.average_after  # n chunks before this one
                r["sum"].append(0.0 if S is None else S.norm().item() * (K / max(n, K) if K else 1.0))
                r["update"].append(dW.norm().item())
                V_i = V[0, start:start + C]  # the covariance rule: the chunk's mean target taken from each
                dW_centred = module.eta * (V_i - V_i.mean(0)).T @ Zf[0, start:start + C].float()
                r["sum_centred"].append(0.0 if S_centred is None else S_centred.norm().item())
                S_centred = dW_centred if S_centred is None else module.decay * S_centred + dW_centred
                r["output"].append(output[0, start:start + C].float().norm(dim=-1).mean().item())
                if S is not None and module.delta:  # the erase along this chunk's keys
                    Z_i = Zf[0, start:start + C].float()
                    S = S - module.delta / max((Z_i.T @ Z_i).norm().item(), 1e-30) * (S @ Z_i.T) @ Z_i
                S = dW if S is None else module.decay * S + dW  # the sum the next chunk reads
            record[str(i)] = r
        return fn
    handles = [g.register_forward_hook(hook(i)) for i, g in layers]
    M.logits(model, tokens[:, :-1].to(device))
    for h in handles:
        h.remove()
    checkpoints.save_json(out, dict(checkpoint=checkpoint, length=length, chunk=layers[0][1].chunk_size if layers else None,
                          layers=record))
    print(f"wrote {out}")


def bootstrap_over_bases(values: list[float], draws: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 % quantiles) of the mean of `values` (one per base) resampled with
    replacement: the interval a verdict over bases has, not the narrower one of pooled documents."""
    x = torch.tensor(values, dtype=torch.float64)
    picks = torch.randint(len(values), (draws, len(values)), generator=torch.Generator().manual_seed(seed))
    means = x[picks].mean(dim=1)
    return x.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def bootstrap_over_bases_and_windows(diffs: list[list[float]], draws: int = 10000,
                                     seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5 %, 97.5 % quantiles) of the mean of `diffs` [base][window] (a row minus its control
    on each validation window; the same windows on every base) with the bases and the windows each
    resampled with replacement, independently: the interval counts the text drawn as well as the
    bases, since every base is scored on the same windows. (The two-way bootstrap of a crossed design
    is, if anything, wide.) The bases are drawn first, as in bootstrap_over_bases."""
    x = torch.tensor(diffs, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    bases = torch.randint(x.shape[0], (draws, x.shape[0]), generator=generator)
    windows = torch.randint(x.shape[1], (draws, x.shape[1]), generator=generator)
    means = x[bases[:, :, None], windows[:, None, :]].mean(dim=(1, 2))
    return x.mean().item(), means.quantile(0.025).item(), means.quantile(0.975).item()


def window_differences(row: list[dict], control: list[dict]) -> list[list[float]]:
    """Per length, each validation window's bits per byte of `row` minus `control`'s (two models'
    evaluations, eval_passkey.evaluate's rows, on the same windows)."""
    return [[a - z for a, z in zip(r["bpb_windows"], c["bpb_windows"], strict=True)]
            for r, c in zip(row, control, strict=True)]


def mean_and_interval(m: tuple[float, float, float]) -> str:
    """A bootstrap's (mean, low, high) as a table cell of signed bits per byte."""
    return f"{m[0]:+.3f} [{m[1]:+.3f}, {m[2]:+.3f}]"


def paired_files(paths: list[str]) -> list[tuple[str, dict, dict]]:
    """[(name, control, row)]: one eval_passkey.py JSON per base, each of a no-TTT control and then a TTT
    checkpoint evaluated on the same validation windows (per-window bits per byte kept); every file of
    the same draw (corpus, seed, windows, lengths, attention window) and each file and checkpoint once.
    A ValueError says which file does not fit."""
    out, draw, seen = [], None, set()
    for path in paths:
        with open(path) as f:
            runs = json.load(f).get("checkpoints", [])
        name = os.path.splitext(os.path.basename(path))[0]
        if len(runs) != 2 or runs[0]["settings"].get("ttt") is not None or runs[1]["settings"].get("ttt") is None:
            raise ValueError(f"{path}: wants two checkpoints, a control without TTT and then a TTT one")
        if any("bpb_windows" not in r for run in runs for r in run["rows"]):
            raise ValueError(f"{path}: no per-window bits per byte (an eval_passkey.py older than bpb_windows)")
        this = [(run["corpus_sha256"][:16], run["seed"], run["windows"], [r["length"] for r in run["rows"]],
                 run["settings"]["window"]) for run in runs]
        if this[0] != this[1]:
            raise ValueError(f"{path}: its two checkpoints were evaluated on other windows (corpus, seed, windows, "
                             f"lengths, attention window): {this[0]} and {this[1]}")
        if draw not in (None, this[0]):
            raise ValueError(f"{path}: another draw (corpus, seed, windows, lengths, attention window) than the "
                             f"first file's: {this[0]} against {draw}")
        again = {name, runs[0]["checkpoint"], runs[1]["checkpoint"]} & seen
        if again:
            raise ValueError(f"{path}: {sorted(again)[0]} is in an earlier file too: one file per base")
        seen |= {name, runs[0]["checkpoint"], runs[1]["checkpoint"]}
        draw = this[0]
        out.append((name, runs[0], runs[1]))
    return out


def tables_paired(paths: list[str], path: str, split: int | None = None) -> None:
    """<path>.md: a TTT row against its control on the same validation windows, per base (one
    eval_passkey.py JSON each, see paired_files) with an interval over the windows, and pooled over
    the bases with one over the bases and the windows (bootstrap_over_bases_and_windows); with `split`
    K, pooled over the first K windows and over the rest apart (at a sweep's seed, its own K come
    first: the draw is prefix-stable)."""
    pairs = paired_files(paths)
    first = pairs[0][1]
    if split is not None and not 0 < split < first["windows"]:
        raise ValueError(f"--split must be between 1 and the windows less one ({first['windows'] - 1}), got {split}")
    W, lengths = first["settings"]["window"], [r["length"] for r in first["rows"]]
    head = "| | " + " | ".join(f"{L} ({L // W} W)" if W else str(L) for L in lengths) + " |"
    diffs = [window_differences(row["rows"], control["rows"]) for _, control, row in pairs]
    lines = [f"# {os.path.basename(path)}: the TTT row against its control on the same validation windows", "",
             f"{first['windows']} validation windows per length (seed {first['seed']}), the same text for every "
             "base. Per base: bits per byte of the control, of the row, and the row minus the control with a "
             "95 % interval from a bootstrap over the windows; pooled: the mean over the bases and windows with "
             "one over both; and how many passkeys each found.", "", head, "|---" * (len(lengths) + 1) + "|"]
    for (name, control, row), d in zip(pairs, diffs):
        lines.append(f"| {name}: bits per byte, control / row | " + " | ".join(
            f"{c['bpb']:.4f} / {r['bpb']:.4f}" for c, r in zip(control["rows"], row["rows"])) + " |")
        lines.append(f"| {name}: row minus control | " + " | ".join(
            mean_and_interval(bootstrap_over_bases_and_windows([x])) for x in d) + " |")
        n = row["trials"] * len(row["depths"])
        lines.append(f"| {name}: passkeys found, control / row | " + " | ".join(
            f"{round(c['passkey'] * n)} / {round(r['passkey'] * n)} of {n}"
            for c, r in zip(control["rows"], row["rows"])) + " |")
    lines.append(f"| pooled over {len(pairs)} base{'s' * (len(pairs) > 1)}: row minus control | " + " | ".join(
        mean_and_interval(bootstrap_over_bases_and_windows([d[i] for d in diffs]))
        for i in range(len(lengths))) + " |")
    windows = lambda n: f"{n} window{'s' * (n > 1)}"
    parts = [] if split is None else [(f"the first {windows(split)}", slice(split)),
                                      (f"the other {windows(first['windows'] - split)}", slice(split, None))]
    for part, cut in parts:
        lines.append(f"| pooled, {part}: row minus control | " + " | ".join(
            mean_and_interval(bootstrap_over_bases_and_windows([d[i][cut] for d in diffs]))
            for i in range(len(lengths))) + " |")
    lines += [""] + [f"- {name}: control `{control['checkpoint']}`, row `{row['checkpoint']}`"
                     for name, control, row in pairs]
    _write_markdown(path, lines)


def far_by_distance(rows: list[dict], depths: list[float], W: int) -> dict[float, dict[int, float]]:
    """{d: {L: accuracy}}: far retrieval of the needles that lie about d = (1 - depth) L / W windows
    before the question, at each length L where one of `depths` puts them there (rows: one row's
    evaluations, each with its accuracy per depth, `by_depth`, in the order of `depths`)."""
    out = {}
    for r in rows:
        for depth, accuracy in zip(depths, r["by_depth"], strict=True):
            back = round((1 - depth) * r["length"] / W, 6)  # equal distances, one key whatever the rounding
            out.setdefault(back, {})[r["length"]] = accuracy
    return dict(sorted(out.items()))


def tables_horizon(results: dict, path: str) -> None:
    """<path>.md: far retrieval and bits per byte of every row against length, per base, far retrieval
    by how far back the needle lies, each row with memory against the same row without it (eta 0),
    and whether each TTT row's bits per byte stay at or below the no-TTT control's on every base;
    <path>.png."""
    c = results["config"]
    bases = sorted(results["rows"], key=lambda b: int(b.removeprefix("base")))
    labels = {r.name: r.label for r in horizon_rows(c)}
    names = [n for n in labels if any(n in results["rows"][b] for b in bases)]
    lengths, W = c["lengths"], c["window"]
    head = "| row | " + " | ".join(f"{L // W} W" for L in lengths) + " |"
    rule = "|---" * (len(lengths) + 1) + "|"
    drawn = "" if c.get("eval_seed", eval_passkey.EVAL_SEED) == eval_passkey.EVAL_SEED else \
        f", drawn with --eval-seed {c['eval_seed']} (other documents and windows than the default's)"
    lines = [f"{len(bases)} windowed bases ({', '.join(bases)}), preset {c['preset']}, window W = {W}, each "
             f"pretrained for {c['pretrain_steps']} steps of {c['pretrain_batch']}, trained "
             f"(rows that fine-tune: {c['steps']} steps of {c['batch']}) at L0 = {c['L0']} = {c['L0'] // W} W. "
             f"Needles at depths {c['horizon_depths']}, every one wholly beyond the window; {c['trials']} documents "
             f"per depth and length, {c['windows']} validation windows for bits per byte{drawn}. {the_text(c)}"
             f"Each cell lists the bases in order ({' / '.join(bases)}; -: not run on that base). Made on {c['hardware']}, "
             f"torch {c['torch']}.", "",
             "### Far retrieval", "", head, rule]
    cell = lambda name, i, f: " / ".join(f(results["rows"][b][name][i]) if name in results["rows"][b] else "-"
                                         for b in bases)  # "-": the row did not run on that base
    for name in names:
        lines.append(f"| {labels[name]} | " + " | ".join(
            cell(name, i, lambda r: f"{100 * r['passkey']:.0f}%") for i in range(len(lengths))) + " |")
    lines += ["", "### Bits per byte", "", head, rule]
    for name in names:
        lines.append(f"| {labels[name]} | " + " | ".join(
            cell(name, i, lambda r: f"{r['bpb']:.2f}") for i in range(len(lengths))) + " |")
    lines += ["", "### Far retrieval by how far back the needle lies", "", "A needle at depth p of a document of "
              "length L lies about (1 - p) L before the question: each line, the needles that far back, at each "
              "length where one of the depths puts them (rows by name).", "",
              "| row | needle back | " + " | ".join(f"{L // W} W" for L in lengths) + " |", "|---" + rule]
    for name in names:
        by_base = {b: far_by_distance(results["rows"][b][name], c["horizon_depths"], W) for b in bases
                   if name in results["rows"][b]}
        for d in sorted({d for by in by_base.values() for d in by}):
            per_length = [[by_base[b][d].get(L) if b in by_base and d in by_base[b] else None for b in bases]
                          for L in lengths]
            lines.append(f"| {name} | {d:g} W | " + " | ".join(
                "" if all(v is None for v in vs) else " / ".join("-" if v is None else f"{100 * v:.0f}%" for v in vs)
                for vs in per_length) + " |")
    everywhere = [n for n in names if all(n in results["rows"][b] for b in bases)]
    if len(bases) > 1 and everywhere:
        lines += ["", "### Pooled over the bases", "", "Far retrieval and bits per byte, the mean over the bases "
                  "with a 95 % interval from a bootstrap over the bases (each base's value is one sample; the "
                  "documents within a base are not resampled), for the rows that ran on every base.", "", head, rule]
        for name in everywhere:
            cells = []
            for i in range(len(lengths)):
                far = bootstrap_over_bases([100 * results["rows"][b][name][i]["passkey"] for b in bases])
                bpb = bootstrap_over_bases([results["rows"][b][name][i]["bpb"] for b in bases])
                cells.append(f"{far[0]:.0f}% [{far[1]:.0f}-{far[2]:.0f}] / {bpb[0]:.2f} [{bpb[1]:.2f}-{bpb[2]:.2f}]")
            lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += ["", "### Against the no-TTT control trained the same way (full fine-tuning), on every base", ""]
    controls = {r.name: r.control for r in horizon_rows(c)}
    for name in names:
        if not name.startswith("ttt"):
            continue
        ctl = controls[name]
        worse = [f"{b} at {lengths[i] // W} W ({r['bpb']:.3f} against {results['rows'][b][ctl][i]['bpb']:.3f})"
                 for b in bases if name in results["rows"][b] and ctl in results["rows"][b]
                 for i, r in enumerate(results["rows"][b][name]) if r["bpb"] > results["rows"][b][ctl][i]["bpb"]]
        against = [b for b in bases if name in results["rows"][b] and ctl in results["rows"][b]]
        if not against:
            lines.append(f"- {labels[name]}: its control ({ctl}) has not run on the same bases")
            continue
        lines.append(f"- {labels[name]}, against {ctl} on {len(against)} base(s): bits per byte "
                     + ("never above the control's" if not worse else "above the control's at " + "; ".join(worse)))
    paired = [(n, controls[n]) for n in names if n.startswith("ttt") and len(bases) > 1 and all(
        k in results["rows"][b] and all("bpb_windows" in r for r in results["rows"][b][k])
        for b in bases for k in (n, controls[n]))]
    if paired:  # each window scored by the row and its control: the difference per window, over the bases
        windows = len(results["rows"][bases[0]][paired[0][0]][0]["bpb_windows"])
        lines += ["", "### Against the control on the same validation windows, pooled over the bases", "",
                  f"Bits per byte of the row minus its control's, the mean over the bases and the {windows} "
                  "windows with a 95 % interval from a bootstrap over both (the windows are the same text on "
                  "every base, so the interval counts the text drawn as well as the bases).", "", head, rule]
        for name, ctl in paired:
            diffs = [window_differences(results["rows"][b][name], results["rows"][b][ctl]) for b in bases]
            lines.append(f"| {labels[name]} | " + " | ".join(
                mean_and_interval(bootstrap_over_bases_and_windows([d[i] for d in diffs]))
                for i in range(len(lengths))) + " |")
    twins = [(n.replace("_eta0", ""), n) for n in names if "_eta0" in n and n.replace("_eta0", "") in names]
    if twins:  # a row without memory (eta 0) against the same row with it: what the memory alone is worth
        lines += ["", "### With memory against the same row without it (eta 0: the same trainable set, steps and "
                  "data)", "", "Bits per byte of the row with memory minus the row without, per base (below 0: the "
                  "memory predicts better).", "", head, rule]
        for memory, none in twins:
            lines.append(f"| {labels[memory]} | " + " | ".join(" / ".join(
                f"{results['rows'][b][memory][i]['bpb'] - results['rows'][b][none][i]['bpb']:+.3f}"
                if memory in results["rows"][b] and none in results["rows"][b] else "-" for b in bases)
                for i in range(len(lengths))) + " |")
    for name, s in results.get("streaming", {}).items():
        same = s["parallel"] == s["streaming"]
        lines.append(f"- {labels[name]}, base0, {s['length'] // W} W, depth {s['depth']}: one token per step "
                     f"{'gives' if same else 'does not give'} the parallel form's answer on every one of "
                     f"{len(s['parallel'])} documents ({sum(s['streaming'])} right streaming, "
                     f"{sum(s['parallel'])} in parallel)")
    if results.get("probe"):
        first = next(iter(results["probe"].values()))
        n = len(next(iter(first["layers"].values()))["sum"]) if first["layers"] else 0
        at = [i for i in (1, 2, 8, 32, 128, 512) if i < n] + [n - 1]
        lines += ["", f"### Why: norms per chunk on one document of {first['length'] // W} W, base0", "",
                  "|eta S_i| (the sum of updates chunk i reads), |eta dW_i| (chunk i's update) and the TTT layer's "
                  "mean output norm per token, at chunk i (chunk " + str(first["chunk"]) + ").", "",
                  "| row | layer | " + " | ".join(f"chunk {i}: sum / update / output" for i in at) + " |",
                  "|---" * (len(at) + 2) + "|"]
        for name, pr in results["probe"].items():
            for layer, r in pr["layers"].items():
                lines.append(f"| {name} | {layer} | " + " | ".join(
                    f"{r['sum'][i]:.3g} / {r['update'][i]:.3g} / {r['output'][i]:.3g}" for i in at) + " |")
    _write_markdown(path, lines)
    plt = _pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colors, styles = plt.get_cmap("tab10").colors, ["-", "--", ":", "-."]
    for i, name in enumerate(names):
        for k, b in enumerate(bases):
            if name not in results["rows"][b]:
                continue
            rs = results["rows"][b][name]
            for ax, key, f in ((axes[0], "passkey", 100), (axes[1], "bpb", 1)):
                ax.plot([r["length"] // W for r in rs], [f * r[key] for r in rs], marker="o", color=colors[i % 10],
                        linestyle=styles[k % 4], label=f"{name} ({b})")  # the row's name: its label is long
    for ax, what in zip(axes, ("far retrieval (%)", "bits per byte")):
        ax.set_xscale("log", base=2)
        ax.axvline(c["L0"] // W, color="grey", linestyle=":")
        ax.set_xlabel(f"length in windows W = {W} (trained at {c['L0'] // W} W, dotted)")
        ax.set_ylabel(what)
    axes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path + ".png")
    plt.close(fig)
    print(f"wrote {path}.png")


def main():
    p = eval_passkey.OneLineParser(prog="sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="study", choices=("study", "horizon"))
    p.add_argument("--out", default=None, help="JSON / md / png path stem (default results/<setting>/<setting>)")
    p.add_argument("--work", default=None, help="checkpoints go here (default out/sweep_<setting>)")
    p.add_argument("--rows", default=None, help="comma list of row names (default: all)")
    p.add_argument("--tables", action="store_true", help="only rebuild the table and plot from the JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=None, help=f"study: the report set's seed (default "
                   f"{REPORT_SEED}; not the dev set's); horizon: the evaluations' documents and validation windows "
                   f"(default {eval_passkey.EVAL_SEED}; the probe's one document stays the default's); at least "
                   "2**40, apart from training's seeds")
    p.add_argument("--pretrain-steps", type=int, default=None, metavar="N", help="the bases' pretraining steps "
                   f"(default the preset's: {PRESETS_HORIZON['cuda']['pretrain_steps']} on CUDA); a base pretrained "
                   "longer needs an --out and a --work of its own")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE", help="UTF-8 text files every training and "
                   "evaluation reads (train.py's --data; default: the Python stdlib source); its hash is kept with "
                   "the work folder and the JSON")
    p.add_argument("--bases", type=int, default=None, help="windowed bases, pretrained from seeds 0, 1, ... "
                   "(default 3)")
    p.add_argument("--base", default=None, metavar="SEEDS", help="only the bases pretrained from these seeds, "
                   "comma-separated (a run that fits one machine's session; its rows join the JSON beside the "
                   "other bases')")
    p.add_argument("--jobs", type=int, default=None, help="processes at once, spread over the GPUs (default: "
                   f"study {PRESETS_STUDY['cuda']['jobs']} on CUDA, {PRESETS_STUDY['cpu']['jobs']} on CPU; horizon "
                   f"{PRESETS_HORIZON['cuda']['jobs']} on CUDA, fewer where the GPU holds fewer, "
                   f"{PRESETS_HORIZON['cpu']['jobs']} on CPU)")
    p.add_argument("--measure-parallel", type=int, default=None, metavar="J", help="study: only measure the "
                   "throughput of J short trainings one at a time and J at once (into the JSON's config)")
    p.add_argument("--stop-after", type=float, default=None, metavar="MINUTES", help="start no job after this "
                   "many minutes (0: none); the running ones finish, and running it again resumes")
    p.add_argument("--start-rows-untested", action="store_true", default=None, help="horizon: train the rows "
                   "the --rows start from (--init) without evaluating them; the named rows and their controls are "
                   "evaluated")
    p.add_argument("--probe", default=None, metavar="CHECKPOINT", help="horizon: only measure the norms of "
                   "one checkpoint's fast weights along one long document (--probe-length) into --out")
    p.add_argument("--probe-length", type=int, default=None)
    p.add_argument("--paired", default=None, metavar="FILES", help="only tabulate eval_passkey.py JSONs, one per "
                   "base, each of a control and a TTT checkpoint on the same windows, into --out.md (comma list)")
    p.add_argument("--split", type=int, default=None, metavar="K", help="--paired: also pool the first K windows "
                   "and the rest apart (a sweep's own K windows come first at its seed)")
    args = p.parse_args()
    for_a_run = [f"--{k.replace('_', '-')}" for k in ("rows", "eval_seed", "bases", "base", "jobs", "measure_parallel",
                                                      "stop_after", "probe", "probe_length", "start_rows_untested",
                                                      "pretrain_steps", "data")
                 if getattr(args, k) is not None]
    if args.paired is not None:
        if not all(args.paired.split(",")):
            p.error(f"--paired must be a comma list of eval_passkey.py JSON files, got {args.paired!r}")
        unused = for_a_run + ["--tables"] * args.tables + ["--work"] * (args.work is not None)
        if unused or not args.out:
            p.error(f"--paired only tabulates its files into --out; {', '.join(unused)} would not be used"
                    if unused else "--paired needs --out")
        try:
            return tables_paired(args.paired.split(","), args.out, args.split)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--paired: {e}")
    if args.split is not None:
        p.error("--split is for --paired")
    if args.tables and for_a_run:
        p.error(f"--tables rebuilds the tables from the JSON as it is; {', '.join(for_a_run)} would not be used")
    if args.start_rows_untested and (args.setting != "horizon" or args.rows is None):
        p.error("--start-rows-untested is for --setting horizon with --rows (what the named rows start from)")
    if args.pretrain_steps is not None and args.pretrain_steps < 1:
        p.error(f"--pretrain-steps must be >= 1, got {args.pretrain_steps}")
    if args.probe is not None and args.pretrain_steps is not None:
        p.error("--pretrain-steps is for a sweep's bases; --probe measures one checkpoint as it is")
    if args.stop_after is not None and not args.stop_after >= 0:
        p.error(f"--stop-after must be 0 or more minutes; got {args.stop_after}")
    if args.measure_parallel is not None and args.measure_parallel < 1:
        p.error(f"--measure-parallel must be >= 1 trainings, got {args.measure_parallel}")
    if not 0 <= args.seed < 10 ** 6:
        p.error(f"--seed must be in [0, 1000000) (train.py's), got {args.seed}")
    if args.probe is not None:
        if args.probe_length is None or not args.out:
            p.error("--probe needs --probe-length and --out")
        if args.probe_length < 128:
            p.error(f"--probe-length must be >= 128 (a passkey document needs 104 bytes), got {args.probe_length}")
    else:
        args.out = args.out or os.path.join("results", args.setting, args.setting)
        args.work = args.work or os.path.join("out", f"sweep_{args.setting}")
    try:  # every path the sweep writes, before any work
        checkpoints.check_writable(args.out + ("" if args.probe is not None else ".json"), folder=False)
        if args.work:
            checkpoints.check_writable(args.work, folder=True)
    except ValueError as e:
        p.error(str(e))
    if args.probe is not None:
        corpus = read_corpus(args, p)
        try:  # an unreadable checkpoint, one without TTT, a document longer than the text: before any work
            if not checkpoints.load_checkpoint(args.probe)["settings"].get("ttt"):
                raise ValueError(f"{args.probe} has no TTT layer: there is no fast weight to measure")
            if args.probe_length > len(corpus.val):
                raise ValueError(f"a document of {args.probe_length} bytes needs more validation text than "
                                 f"the corpus has ({len(corpus.val)} bytes)")
        except ValueError as e:
            p.error(f"--probe: {e}")
        return probe(args.probe, args.probe_length, args.out, "cuda" if torch.cuda.is_available() else "cpu", corpus)
    return (study if args.setting == "study" else horizon)(args, p)


if __name__ == "__main__":
    main()

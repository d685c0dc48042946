#!/bin/bash
# FSDP2 at scale, the parts fsdp_check.sh leaves open, in the order PARTS names them:
#   resume: `--fsdp` on N processes from a base (`full`, x2), uninterrupted, then killed (SIGKILL, the
#           whole process tree) after its in-stage checkpoint of step >= SAVE_EVERY and `--resume --fsdp`
#           to the end: the weights' difference against the uninterrupted run's, and against the spread
#           of a second uninterrupted run;
#   speed:  steady tokens/s of 1 GPU, N GPUs DDP and N GPUs --fsdp (same extension runs, `full`, x2)
#           at each global batch of SPEED_BATCHES;
#   7b:     Moshi 7B's own configuration (moshi's loaders._lm_kwargs) with random bf16 weights and
#           random token arrays, `full` with --fsdp --grad-checkpointing on N GPUs: the peak GPU memory
#           of each GPU (nvidia-smi) and steady tokens/s; the same on 1 GPU without --fsdp, which
#           train.py's fit check should refuse (its one-line error is printed).
#   bash results/multi_gpu/fsdp_scale.sh                       # 2 GPUs over NCCL, gpu preset; N=4 for 4 GPUs
#   DEVICE=cpu PRESET=cpu L0=128 BATCH=4 STEPS=6 SAVE_EVERY=2 SPEED_STEPS=5 LOG_EVERY=2 SPEED_BATCHES=4 \
#       L7=128 STEPS7=3 bash results/multi_gpu/fsdp_scale.sh   # gloo; a tiny Moshi-shaped model (SMALL7B=1) for 7b
# END7B=kill (default) stops the 7B run once its last step is logged: its stage end (gathering the model
# on rank 0, evaluating an unsharded float32 copy there, writing two 29 GiB files, the final table) is
# not measured; END7B=run lets it finish. The 7B weights and tokens stay in $OUTDIR/moshi7b for reuse.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
N=${N:-2} PRESET=${PRESET:-gpu} DEVICE=${DEVICE:-cuda} L0=${L0:-1024} STEPS=${STEPS:-10} BATCH=${BATCH:-16}
SAVE_EVERY=${SAVE_EVERY:-4} SPEED_STEPS=${SPEED_STEPS:-60} LOG_EVERY=${LOG_EVERY:-20}
SPEED_BATCHES=${SPEED_BATCHES:-"32 64"} L7=${L7:-256} STEPS7=${STEPS7:-6} END7B=${END7B:-kill}
CHECKPOINT7B=${CHECKPOINT7B-"--grad-checkpointing"}  # empty: no activation checkpointing in the 7B run
SMALL7B=${SMALL7B:-$([ "$DEVICE" = cpu ] && echo 1 || echo 0)}
PARTS=${PARTS:-"resume speed 7b"} OUTDIR=${OUTDIR:-out/fsdp_scale}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv; fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || exit 1
echo "revision ${REVISION:-$(git rev-parse --short HEAD 2>/dev/null)}"
echo "N=$N PRESET=$PRESET DEVICE=$DEVICE L0=$L0 STEPS=$STEPS BATCH=$BATCH SAVE_EVERY=$SAVE_EVERY" \
     "SPEED_STEPS=$SPEED_STEPS LOG_EVERY=$LOG_EVERY SPEED_BATCHES='$SPEED_BATCHES' L7=$L7 STEPS7=$STEPS7" \
     "SMALL7B=$SMALL7B END7B=$END7B PARTS='$PARTS' OUTDIR=$OUTDIR NO_TORCH_COMPILE=${NO_TORCH_COMPILE:-}"
mkdir -p "$OUTDIR" || exit 1

# The launcher: runs a command in a session of its own, its output filtered to the screen and a log;
# --kill-after-step K: SIGKILLs the command's whole process tree (torchrun's workers have sessions of
# their own, so their groups too) once a log line `step k/...` with k >= K appears, then exits 0;
# --gpu-mem FILE: samples nvidia-smi every 500 ms meanwhile and prints each GPU's peak.
cat > "$OUTDIR/launch.py" <<'PY'
import argparse, os, re, shutil, signal, subprocess, sys, time
cut = sys.argv.index("--")
p = argparse.ArgumentParser()
p.add_argument("--log", required=True)
p.add_argument("--kill-after-step", type=int, default=None)
p.add_argument("--gpu-mem", default=None)
a, cmd = p.parse_args(sys.argv[1:cut]), sys.argv[cut + 1:]
NOISE = ("OMP_NUM_THREADS", "distributed/run.py", "Warning", "_register_pre_backward_hook", "return func(")

def parents():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(fields[1]), fields[0])  # ppid, state
            except (OSError, ValueError, IndexError):
                pass
    return out

def tree(root):
    table, found, todo = parents(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [c for c, (pp, _) in table.items() if pp == pid]
    return found

def alive(pid):
    state = parents().get(pid)
    return state is not None and state[1] not in ("Z", "X")

def kill_tree(root):
    pids, mine = tree(root), os.getpgid(0)
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except OSError:
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for g in groups - {mine}:
        try:
            os.killpg(g, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.time() + 120
    while time.time() < deadline and any(alive(pid) for pid in pids if pid != root):
        time.sleep(0.1)
    return len(pids)

sampler = None
if a.gpu_mem and shutil.which("nvidia-smi"):
    sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits",
                                "-lms", "500"], stdout=open(a.gpu_mem, "w"), stderr=subprocess.DEVNULL,
                               start_new_session=True)
t0, killed = time.time(), None
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                        errors="replace", start_new_session=True)
with open(a.log, "w") as log:
    def show(line):
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()
    for line in proc.stdout:
        if line.startswith("*****") or any(s in line for s in NOISE):
            continue
        show(line)
        m = re.match(r"step (\d+)/\d+ ", line)
        if a.kill_after_step is not None and m and int(m.group(1)) >= a.kill_after_step:
            n = kill_tree(proc.pid)
            killed = f"+ SIGKILL to the run's {n} processes after the line: {line.strip()}\n"
            break
    rc = proc.wait()
    if killed:
        show(killed)
    show(f"+ ({time.time() - t0:.0f} s, exit {rc})\n")
    if sampler is not None:
        sampler.terminate()
        sampler.wait(timeout=10)
        peak = {}
        for row in open(a.gpu_mem):
            try:
                gpu, used = (int(v) for v in row.split(","))
            except ValueError:
                continue
            peak[gpu] = max(peak.get(gpu, 0), used)
        show("peak GPU memory used (nvidia-smi, every 500 ms): " + (", ".join(
            f"GPU {g} {m / 1024:.1f} GiB" for g, m in sorted(peak.items())) or "no samples") + "\n")
sys.exit(0 if killed else rc)
PY

train() {  # train NPROC OUT LOG [LAUNCHER OPTIONS] -- TRAIN.PY ARGS...; a fresh OUT unless --resume
    local n=$1 out=$2 log=$3 opts=(); shift 3
    while [ "$1" != "--" ]; do opts+=("$1"); shift; done; shift
    local cmd=(torchrun --standalone --nproc_per_node="$n" train.py --preset "$PRESET" --device "$DEVICE"
               --original-len "$L0" --eval-trials 1 --out "$out" "$@")
    echo "+ ${cmd[*]}"
    case " $* " in *" --resume "*) ;; *) rm -rf "$out" ;; esac
    python3 "$OUTDIR/launch.py" --log "$log" "${opts[@]+"${opts[@]}"}" -- "${cmd[@]}" || { echo "FAILED: ${cmd[*]}"; exit 1; }
}
steady() {  # steady LOG BATCH: tok/s between the second and the last log lines (elapsed = tokens / cumulative rate)
    awk -v b="$2" '/^step / { split($2, s, "/"); for (i = 1; i <= NF; i++) { if ($i == "len") L = $(i + 1);
                                                                         if ($i == "tok/s") r = $(i - 1) }
                              gsub(",", "", r); n++; t = s[1] * b * L / r
                              if (n == 2) { s0 = s[1]; t0 = t } s1 = s[1]; t1 = t }
                   END { if (n < 2 || t1 <= t0) printf "nan"; else printf "%.0f", (s1 - s0) * b * L / (t1 - t0) }' "$1"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else printf "-" }'; }
last_loss() { grep "^step " "$1" | tail -1 | sed 's/.*| loss \([^ ]*\) .*/\1/'; }
BASE_DONE=0
base() {  # the base every extension starts from: 1 process, 20 pretraining steps (made once per invocation)
    [ "$BASE_DONE" = 1 ] && return
    train 1 "$OUTDIR/base" "$OUTDIR/base.log" -- --pretrain-only --pretrain-steps 20 --batch "$BATCH" --log-every 5
    BASE_DONE=1
}
extend=(--init "$OUTDIR/base/base.pt" --mode full --scale 2)

part_resume() {
    base
    local args=("${extend[@]}" --steps "$STEPS" --batch "$BATCH" --log-every 1 --fsdp)
    train "$N" "$OUTDIR/whole" "$OUTDIR/whole.log" -- "${args[@]}"
    train "$N" "$OUTDIR/whole_again" "$OUTDIR/whole_again.log" -- "${args[@]}"
    # the step-SAVE_EVERY checkpoint is written before step SAVE_EVERY + 1 is logged (--log-every 1)
    train "$N" "$OUTDIR/killed" "$OUTDIR/killed.log" --kill-after-step $((SAVE_EVERY + 1)) -- \
        "${args[@]}" --save-every "$SAVE_EVERY"
    python3 - "$OUTDIR/killed/ckpt.pt" "$SAVE_EVERY" "$STEPS" <<'PY' || exit 1
import sys, torch
path, save_every, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = torch.load(path, map_location="cpu", weights_only=True)
print(f"killed run's checkpoint: stage {c['stage']}, step {c['step']} of {steps}, fsdp {c['settings'].get('fsdp')}")
if not (c["stage"] == 0 and save_every <= c["step"] < steps):
    sys.exit("not an in-stage checkpoint: the kill came too late (the run reached its stage end)")
PY
    train "$N" "$OUTDIR/killed" "$OUTDIR/resumed.log" -- \
        "${args[@]:2}" --save-every "$SAVE_EVERY" --resume  # the same flags but --init PATH (the first two)
    python3 - "$OUTDIR" <<'PY' || exit 1
import sys, torch
out = sys.argv[1]
load = lambda path: {k: v.double() for k, v in torch.load(path, map_location="cpu", weights_only=True)["model"].items()
                     if v.is_floating_point()}
base, whole = load(f"{out}/base/base.pt"), load(f"{out}/whole/ckpt.pt")
norm = lambda sd: sum(float(v.pow(2).sum()) for v in sd.values()) ** 0.5
update = norm({k: whole[k] - base[k] for k in base})
own = [k for k in whole if k not in base]  # TTT's conv and W_target: not in the base
for name, label in (("whole_again", "second uninterrupted run (the spread)"), ("killed", "killed + --resume --fsdp")):
    other = load(f"{out}/{name}/ckpt.pt")
    assert other.keys() == whole.keys(), (name, sorted(other.keys() ^ whole.keys())[:3])
    tail = (f"; TTT's own tensors |dW| / |W| = {norm({k: other[k] - whole[k] for k in own}) / norm({k: whole[k] for k in own}):.2e}"
            if own else "")
    print(f"{label:37s} vs uninterrupted: |dW| / |W - W0| = {norm({k: other[k] - whole[k] for k in base}) / update:.2e}{tail}")
print("(W0 the base; the resumed run should be of the spread's order)")
PY
    echo "last-step loss: uninterrupted $(last_loss "$OUTDIR/whole.log"), again $(last_loss "$OUTDIR/whole_again.log")," \
         "resumed $(last_loss "$OUTDIR/resumed.log")"
}

part_speed() {
    base
    local b n how rows=()
    for b in $SPEED_BATCHES; do
        for how in "1 ddp" "$N ddp" "$N fsdp"; do
            set -- $how
            n=$1
            train "$n" "$OUTDIR/speed_b${b}_n${n}_$2" "$OUTDIR/speed_b${b}_n${n}_$2.log" --kill-after-step "$SPEED_STEPS" -- \
                "${extend[@]}" --steps "$SPEED_STEPS" --batch "$b" --log-every "$LOG_EVERY" $([ "$2" = fsdp ] && echo --fsdp)
        done
    done
    echo "steady tok/s (steps after the second log line; extension to $((2 * L0)), full, $PRESET preset; each run" \
         "stopped at its last step):"
    printf "%-13s %12s %14s %14s %10s %10s\n" "global batch" "1 GPU" "$N GPUs DDP" "$N GPUs FSDP" "DDP / 1" "FSDP / 1"
    for b in $SPEED_BATCHES; do
        local one ddp fsdp
        one=$(steady "$OUTDIR/speed_b${b}_n1_ddp.log" "$b") ddp=$(steady "$OUTDIR/speed_b${b}_n${N}_ddp.log" "$b")
        fsdp=$(steady "$OUTDIR/speed_b${b}_n${N}_fsdp.log" "$b")
        printf "%-13s %12s %14s %14s %10s %10s\n" "$b" "$one" "$ddp" "$fsdp" "$(ratio "$ddp" "$one")" "$(ratio "$fsdp" "$one")"
    done
}

part_7b() {
    local dir="$OUTDIR/moshi7b" kind
    kind=$([ "$SMALL7B" = 1 ] && echo "a small Moshi-shaped model (SMALL7B=1)" || echo "Moshi 7B")
    python3 results/training_7b/moshi7b_files.py "$dir" --length "$L7" --device "$DEVICE" \
        $([ "$SMALL7B" = 1 ] && echo --small) || exit 1
    local args=(train.py --init "$dir/model.safetensors" --init-config "$dir/config.json"
                --data "$dir"/tokens0.npy "$dir"/tokens1.npy "$dir"/tokens2.npy "$dir"/tokens3.npy
                --original-len "$L7" --scale 1 --mode full $CHECKPOINT7B --steps "$STEPS7" --batch "$N"
                --log-every 1 --eval-trials 1 --device "$DEVICE" --lr 5e-6 --lr-ttt 5e-6)
    # 1 GPU without --fsdp: weights, gradients and AdamW state in float32 need 16 bytes a number
    local cmd=(torchrun --standalone --nproc_per_node=1 "${args[@]}" --out "$OUTDIR/moshi7b_one")
    echo "+ ${cmd[*]}"
    rm -rf "$OUTDIR/moshi7b_one"
    python3 "$OUTDIR/launch.py" --log "$OUTDIR/moshi7b_one.log" --kill-after-step 1 -- "${cmd[@]}" >/dev/null  # log kept
    local refusal
    refusal=$(grep -m1 "train.py: error:" "$OUTDIR/moshi7b_one.log")
    if [ -n "$refusal" ]; then
        echo "1 process, no --fsdp, refused: $refusal"
    elif grep -q "^step 1/" "$OUTDIR/moshi7b_one.log" && [ "$DEVICE" = cpu ]; then
        echo "1 process, no --fsdp: not refused (train.py's fit check is for GPUs only); stopped after step 1"
    elif grep -q "^step 1/" "$OUTDIR/moshi7b_one.log"; then
        echo "UNEXPECTED: 1 GPU without --fsdp was not refused by the fit check (it trained; stopped after step 1)"
    else
        echo "FAILED otherwise: 1 process, no --fsdp; the end of its log ($OUTDIR/moshi7b_one.log):"
        tail -15 "$OUTDIR/moshi7b_one.log"; exit 1
    fi
    # N processes with --fsdp
    cmd=(torchrun --standalone --nproc_per_node="$N" "${args[@]}" --fsdp --out "$OUTDIR/moshi7b_fsdp")
    echo "+ ${cmd[*]}"
    rm -rf "$OUTDIR/moshi7b_fsdp"
    local kill=(--kill-after-step "$STEPS7")
    [ "$END7B" = run ] && kill=()
    if ! python3 "$OUTDIR/launch.py" --log "$OUTDIR/moshi7b_fsdp.log" --gpu-mem "$OUTDIR/moshi7b_fsdp_mem.csv" \
            "${kill[@]+"${kill[@]}"}" -- "${cmd[@]}"; then
        echo "FAILED: $kind, full, --fsdp on $N processes: $(grep -m1 "train.py: error:" "$OUTDIR/moshi7b_fsdp.log" ||
                                                              grep -m1 -i "out of memory" "$OUTDIR/moshi7b_fsdp.log")"
        exit 1
    fi
    local rate
    rate=$(steady "$OUTDIR/moshi7b_fsdp.log" "$N")
    echo "$kind, full, --fsdp $CHECKPOINT7B on $N processes, batch $N x $L7 steps: steady $rate tok/s" \
         "($(awk -v r="$rate" -v t="$((N * L7))" 'BEGIN { if (r + 0 > 0) printf "%.2f s/step", t / r; else printf "-" }'))"
}

for part in $PARTS; do
    start=$SECONDS
    echo; echo "=== part $part"
    case $part in
        resume) part_resume ;;
        speed) part_speed ;;
        7b) part_7b ;;
        *) echo "unknown part $part (resume, speed, 7b)"; exit 1 ;;
    esac
    echo "=== part $part: $((SECONDS - start)) s wall"
done

#!/bin/bash
# DDP check: N processes against 1, same global batch. Prints the weights' difference after
# STEPS steps (against the run-to-run spread of 1 process with itself) and tokens/s.
#   bash results/multi_gpu/ddp_check.sh            # 2 GPUs over NCCL, gpu preset (results/multi_gpu/ddp_h100x2.log)
#   PRESET=cpu DEVICE=cpu STEPS=3 BATCH=4 SPEED_STEPS=6 LOG_EVERY=2 SPEED_BATCHES=4 bash results/multi_gpu/ddp_check.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
N=${N:-2} PRESET=${PRESET:-gpu} DEVICE=${DEVICE:-cuda} STEPS=${STEPS:-20} BATCH=${BATCH:-32}
SPEED_STEPS=${SPEED_STEPS:-100} LOG_EVERY=${LOG_EVERY:-25} SPEED_BATCHES=${SPEED_BATCHES:-"32 32 64 128"}
OUTDIR=${OUTDIR:-out/ddp}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m; fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "revision ${REVISION:-$(git rev-parse --short HEAD 2>/dev/null)}"

train() {  # train NPROC OUT ARGS...
    local n=$1 out=$2; shift 2
    local cmd=(torchrun --standalone --nproc_per_node="$n" train.py --preset "$PRESET" --device "$DEVICE"
               --original-len 1024 --pretrain-only --out "$out" "$@")
    echo "+ ${cmd[*]}"
    rm -rf "$out" "$out.log"; mkdir -p "$OUTDIR"
    "${cmd[@]}" 2>&1 | grep -v -e "OMP_NUM_THREADS" -e "^\*\*\*\*\*" -e "distributed/run.py" | tee "$out.log"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
}
steady() {  # tok/s between the second and the last log lines of a run: elapsed = tokens / cumulative rate
    awk -v b="$2" '/^step / { split($2, s, "/"); r = $(NF - 1); gsub(",", "", r); n++;
                              if (n == 2) { s0 = s[1]; t0 = s[1] * b * 1024 / r } s1 = s[1]; t1 = s[1] * b * 1024 / r }
                   END { printf "%.0f", (s1 - s0) * b * 1024 / (t1 - t0) }' "$1"
}

# 1. weights: the initial model (0 steps), 1 process twice (its own spread), N processes
train 1 "$OUTDIR/init" --pretrain-steps 0 --batch "$BATCH" --eval-trials 1
train 1 "$OUTDIR/one" --pretrain-steps "$STEPS" --batch "$BATCH" --log-every 1 --eval-trials 1
train 1 "$OUTDIR/one_again" --pretrain-steps "$STEPS" --batch "$BATCH" --log-every 1 --eval-trials 1
train "$N" "$OUTDIR/many" --pretrain-steps "$STEPS" --batch "$BATCH" --log-every 1 --eval-trials 1
python3 - "$OUTDIR" "$N" <<'EOF'
import sys, torch
out, n = sys.argv[1], sys.argv[2]
load = lambda name: {k: v.double() for k, v in
                     torch.load(f"{out}/{name}/base.pt", map_location="cpu", weights_only=True)["model"].items()}
init, one = load("init"), load("one")
def norm(sd):
    return sum(float(v.pow(2).sum()) for v in sd.values()) ** 0.5
update = norm({k: one[k] - init[k] for k in one})
for name in ("one_again", "many"):
    other = load(name)
    diff = {k: other[k] - one[k] for k in one}
    worst = max(one, key=lambda k: float(diff[k].norm()) / max(float((one[k] - init[k]).norm()), 1e-30))
    print(f"{name:9s} vs one: |dW| / |W| = {norm(diff) / norm(one):.2e}, |dW| / |W - W0| = {norm(diff) / update:.2e}, "
          f"max |dW| = {max(float(d.abs().max()) for d in diff.values()):.2e}, "
          f"worst tensor {worst}: {float(diff[worst].norm()) / float((one[worst] - init[worst]).norm()):.2e} of its update")
print(f"(1 process vs itself is the run-to-run spread; {n} processes vs 1 should be of the same order)")
EOF

# 2. tokens/s: 1 and N processes in turn, each batch of SPEED_BATCHES (a batch named twice runs twice);
# the steady rate leaves out the steps before the second log line (warm-up, compilation)
i=0
for b in $SPEED_BATCHES; do
    i=$((i + 1))
    for n in 1 "$N"; do
        train "$n" "$OUTDIR/speed${i}_n${n}_b$b" --pretrain-steps "$SPEED_STEPS" --batch "$b" \
            --log-every "$LOG_EVERY" --eval-trials 1
    done
done
i=0
for b in $SPEED_BATCHES; do
    i=$((i + 1)) one=$(steady "$OUTDIR/speed${i}_n1_b$b.log" "$b") many=$(steady "$OUTDIR/speed${i}_n${N}_b$b.log" "$b")
    echo "batch $b (run $i): steady $one tok/s with 1 process, $many with $N:" \
         "$(python3 -c "print(f'{$many / $one:.2f}')")x"
done

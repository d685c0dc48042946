#!/bin/bash
# FSDP2 check: `train.py --fsdp` on N processes against 1 process and against DDP on N processes,
# from the same base, `full` mode; the weights' differences against the run-to-run spread of 1.
#   bash results/multi_gpu/fsdp_check.sh                                # N GPUs over NCCL, gpu preset
#   PRESET=cpu DEVICE=cpu L0=128 STEPS=3 BATCH=4 bash results/multi_gpu/fsdp_check.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
N=${N:-2} PRESET=${PRESET:-gpu} DEVICE=${DEVICE:-cuda} L0=${L0:-1024} STEPS=${STEPS:-10} BATCH=${BATCH:-16}
OUTDIR=${OUTDIR:-out/fsdp}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total --format=csv; fi
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
echo "revision ${REVISION:-$(git rev-parse --short HEAD 2>/dev/null)}"

train() {  # train NPROC OUT ARGS...
    local n=$1 out=$2; shift 2
    local cmd=(python3 -m torch.distributed.run --standalone --nproc_per_node="$n" train.py --preset "$PRESET" --device "$DEVICE"
               --original-len "$L0" --batch "$BATCH" --eval-trials 1 --log-every 1 --out "$out" "$@")
    echo "+ ${cmd[*]}"
    rm -rf "$out"; mkdir -p "$OUTDIR"
    "${cmd[@]}" 2>&1 | grep -v -e "OMP_NUM_THREADS" -e "^\*\*\*\*\*" -e "distributed/run.py" -e "Warning" \
        -e "_register_pre_backward_hook" | tee "$out.log"
    [ "${PIPESTATUS[0]}" = 0 ] || exit 1
}

train 1 "$OUTDIR/base" --pretrain-only --pretrain-steps 20
extend=(--init "$OUTDIR/base/base.pt" --mode full --scale 2 --steps "$STEPS")
train 1 "$OUTDIR/one" "${extend[@]}"
train 1 "$OUTDIR/one_again" "${extend[@]}"
train "$N" "$OUTDIR/sharded" "${extend[@]}" --fsdp
train "$N" "$OUTDIR/ddp" "${extend[@]}"  # the same batch split without sharding
python3 - "$OUTDIR" "$N" <<'PY'
import sys, torch
out, n = sys.argv[1], sys.argv[2]
load = lambda path: {k: v.double() for k, v in torch.load(path, map_location="cpu", weights_only=True)["model"].items()}
base, one = load(f"{out}/base/base.pt"), load(f"{out}/one/ckpt.pt")
norm = lambda sd: sum(float(v.pow(2).sum()) for v in sd.values()) ** 0.5
update = norm({k: one[k] - base[k] for k in base})
for name in ("one_again", "sharded", "ddp"):
    other = load(f"{out}/{name}/ckpt.pt")
    print(f"{name:9s} vs one: |dW| / |W - W0| = {norm({k: other[k] - one[k] for k in base}) / update:.2e}")
sharded, ddp = load(f"{out}/sharded/ckpt.pt"), load(f"{out}/ddp/ckpt.pt")
print(f"sharded vs ddp: |dW| / |W - W0| = {norm({k: sharded[k] - ddp[k] for k in base}) / update:.2e}")
print(f"(1 process vs itself is the run-to-run spread; {n} processes, sharded or not, split each batch "
      f"{n} ways, which moves bf16 products: sharded vs ddp should be of the spread's order)")
PY

#!/usr/bin/env bash
# The horizon on the default run's own base, on a CPU: the recipe that learns far retrieval there
# (ttt_mlp_in, TTT in all 4 layers, 200 steps per stage, trained up to 512 = 2 W), with and without
# forgetting per chunk, with the mean past K chunks, and with the paper's update clipping at inference,
# with a LoRA on linear_in instead (ttt_lora_in), and with the delta rule's erase; each evaluated with
# far needles only at 2, 4, 8 and 16 W (W = 256), and the main rows to 128 W at the end. (Past 16 W the
# full attention's scores ran this 24 GiB machine out of memory, until a CPU computed only the window's.)
#   bash results/horizon/cpu_default_base.sh        # from the repository root; OUT=... to move it
# results/horizon/cpu_default_base/ holds one run's evaluations, probes and logs, copied from $OUT.
set -euo pipefail
OUT=${OUT:-out/horizon_cpu_default}
export NO_TORCH_COMPILE=1 OMP_NUM_THREADS=1
mkdir -p "$OUT"
[ -f "$OUT/base/base.pt" ] || python train.py --pretrain-only --out "$OUT/base" > "$OUT/base.log" 2>&1
run() {  # name, train.py flags (the plain sum, --ttt-delta 0, unless they say otherwise); then the evaluation of the trained checkpoint (and with --ttt-decay at inference)
    local name=$1 sum=(--ttt-delta 0); shift
    case " $* " in *" --ttt-delta "*) sum=() ;; esac  # train.py takes each option once
    [ -f "$OUT/$name/results.json" ] || python train.py --init "$OUT/base/base.pt" --mode ttt_mlp_in --ttt-layers 0,1,2,3 \
        --steps 200 --eval-trials 1 --log-every 50 --out "$OUT/$name" ${sum[@]+"${sum[@]}"} "$@" > "$OUT/$name.log" 2>&1
    python eval_passkey.py "$OUT/$name/ckpt.pt" --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 --trials 20 \
        --windows 16 --out "$OUT/$name/horizon.json" >> "$OUT/$name.log" 2>&1
}
run plain & run decay99 --ttt-decay 0.99 & wait
run decay97 --ttt-decay 0.97 &
python train.py --init "$OUT/base/base.pt" --mode full --ttt-layers none --steps 200 --eval-trials 1 --log-every 50 \
    --out "$OUT/control" > "$OUT/control.log" 2>&1 && python eval_passkey.py "$OUT/control/ckpt.pt" \
    --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 --trials 20 --windows 16 --out "$OUT/control/horizon.json" >> "$OUT/control.log" 2>&1 &
wait
for gamma in 0.97 0.9 0.8; do  # forgetting at inference only, on the model trained without it
    python eval_passkey.py "$OUT/plain/ckpt.pt" --ttt-decay $gamma --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 \
        --trials 20 --windows 16 --out "$OUT/plain/horizon_eval_decay$gamma.json" >> "$OUT/plain.log" 2>&1
done
# The mean past K chunks (ours), trained with K = 2 and 4 (the trained length, 512, is 8 chunks of 64),
# then at inference only on the plain model, and the paper's update clipping at inference only.
run average2 --ttt-average-after 2 & run average4 --ttt-average-after 4 & wait
inference() {  # flag, value, name
    python eval_passkey.py "$OUT/plain/ckpt.pt" "$1" "$2" --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 \
        --trials 20 --windows 16 --out "$OUT/plain/horizon_eval_$3.json" >> "$OUT/plain_$3.log" 2>&1
}
inference --ttt-average-after 8 average8 & inference --ttt-average-after 16 average16 & wait
inference --ttt-average-after 4 average4 & inference --ttt-average-after 2 average2 & wait
inference --ttt-update-clip 1 clip1 & inference --ttt-update-clip 0.5 clip0.5 & wait
lora() {  # rank: a LoRA on the TTT layers' linear_in (--mode ttt_lora_in), evaluated plain and with the mean past 8
    local name=lora_in$1
    [ -f "$OUT/$name/results.json" ] || python train.py --init "$OUT/base/base.pt" --mode ttt_lora_in --lora-rank "$1" \
        --ttt-layers 0,1,2,3 --steps 200 --eval-trials 1 --log-every 50 --out "$OUT/$name" --ttt-delta 0 > "$OUT/$name.log" 2>&1
    for flags in "" "--ttt-average-after 8"; do
        python eval_passkey.py "$OUT/$name/ckpt.pt" $flags --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 --trials 20 \
            --windows 16 --out "$OUT/$name/horizon${flags:+_eval_average8}.json" >> "$OUT/$name.log" 2>&1
    done
}
lora 8 & lora 32 & wait
# The delta rule's erase (ours): trained with rho 1; at inference only on the plain model (rho 1 and 0.3)
# and on the LoRA rows; and a LoRA of rank 8 on linear_in trained with it.
run delta1 --ttt-delta 1 & inference --ttt-delta 1 delta1 & wait
inference --ttt-delta 0.3 delta0.3 &
for rank in 8 32; do
    python eval_passkey.py "$OUT/lora_in$rank/ckpt.pt" --ttt-delta 1 --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 \
        --trials 20 --windows 16 --out "$OUT/lora_in$rank/horizon_eval_delta1.json" >> "$OUT/lora_in$rank.log" 2>&1
done
wait
[ -f "$OUT/lora_in8_delta1/results.json" ] || python train.py --init "$OUT/base/base.pt" --mode ttt_lora_in --lora-rank 8 \
    --ttt-layers 0,1,2,3 --steps 200 --eval-trials 1 --log-every 50 --ttt-delta 1 --out "$OUT/lora_in8_delta1" \
    > "$OUT/lora_in8_delta1.log" 2>&1
python eval_passkey.py "$OUT/lora_in8_delta1/ckpt.pt" --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 --trials 20 \
    --windows 16 --out "$OUT/lora_in8_delta1/horizon.json" >> "$OUT/lora_in8_delta1.log" 2>&1
# The same without memory (eta 0: the same trainable set, nothing written): what the memory adds to it.
[ -f "$OUT/lora_in8_delta1_eta0/results.json" ] || python train.py --init "$OUT/base/base.pt" --mode ttt_lora_in \
    --lora-rank 8 --ttt-layers 0,1,2,3 --steps 200 --eval-trials 1 --log-every 50 --ttt-delta 1 --ttt-eta 0 \
    --out "$OUT/lora_in8_delta1_eta0" > "$OUT/lora_in8_delta1_eta0.log" 2>&1
python eval_passkey.py "$OUT/lora_in8_delta1_eta0/ckpt.pt" --lengths 512,1024,2048,4096 --depths 0,0.2,0.4 --trials 20 \
    --windows 16 --out "$OUT/lora_in8_delta1_eta0/horizon.json" >> "$OUT/lora_in8_delta1_eta0.log" 2>&1
# To 128 W (32768 = 64 times the trained length): a CPU now evaluates only the window's pairs
# (window_attention.py's blocked path), the control, the erase trained, the erase at inference only on
# the plain sum's model, and the plain sum.
long() {  # name, checkpoint, flags
    local name=$1 checkpoint=$2; shift 2
    python eval_passkey.py "$OUT/$checkpoint/ckpt.pt" "$@" --lengths 512,1024,2048,4096,8192,16384,32768 \
        --depths 0,0.2,0.4 --trials 20 --windows 16 --out "$OUT/long_$name.json" > "$OUT/long_$name.log" 2>&1
}
long control control; long delta1 delta1; long plain_eval_delta1 plain --ttt-delta 1; long plain plain
echo done

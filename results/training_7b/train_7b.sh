#!/bin/bash
# train.py at Moshi 7B's size on one GPU, as a user runs it: moshi's 7B configuration with random bf16
# weights in Moshi's format and random token arrays (moshi7b_files.py), `ttt_only` with the erase,
# the window of 3000 kept (--window: without it the stage widens the model's context with the length),
# one stage at T = 2 x 6000 = 12000 (no YaRN: --method none),
# batch 1, chunk 256. One run per line of RUNS, each with its flags added (the default lines: every
# layer recomputed, as bench.py --scale's rows, with moshi's kernels eager, compiled, and every layer
# compiled whole; then, every layer compiled: 16 layers recomputed; the depformer alone, bench.py's
# 56 % MFU row; none, as train.py's default); a run is stopped once step
# STEPS is logged (its stage end, a 7B evaluation and checkpoint, is not measured). Prints per run
# the steady frames/s between the second and the last logged step, the first step's seconds (what
# compiling costs) and the GPU's peak memory in use as nvidia-smi sees it.
#   bash results/training_7b/train_7b.sh
#   L0=625 WINDOW=3000 MODE=lora_ttt BATCH=16 RUNS="--lora-rank 128 --grad-checkpointing" \
#       bash results/training_7b/train_7b.sh   # moshi-finetune's 7B example (1250 frames, batch 16, within the window), with TTT
#   DEVICE=cpu SMALL7B=1 L0=128 STEPS=3 RUNS=--grad-checkpointing bash results/training_7b/train_7b.sh  # tiny, CPU
set -u
# MODE, BATCH and WINDOW set what every run shares (a flag is given once: train.py refuses it twice)
DEVICE=${DEVICE:-cuda} SMALL7B=${SMALL7B:-0} L0=${L0:-6000} STEPS=${STEPS:-8} OUTDIR=${OUTDIR:-out/train_7b}
MODE=${MODE:-ttt_only} BATCH=${BATCH:-1} WINDOW=${WINDOW:-$((L0 / 2))}
RUNS=${RUNS:-"--grad-checkpointing
--grad-checkpointing --moshi-compile
--grad-checkpointing --compile-layers
--grad-checkpointing 16 --compile-layers
--grad-checkpointing depformer --compile-layers
--compile-layers"}
T=$((2 * L0))
echo "revision ${REVISION:-$(git rev-parse --short HEAD 2>/dev/null)}; DEVICE=$DEVICE SMALL7B=$SMALL7B T=$T STEPS=$STEPS MODE=$MODE BATCH=$BATCH WINDOW=$WINDOW"
python3 results/training_7b/moshi7b_files.py "$OUTDIR/moshi7b" --length "$T" --device "$DEVICE" \
    $([ "$SMALL7B" = 1 ] && echo --small) || exit 1
dir="$OUTDIR/moshi7b"
base=(train.py --init "$dir/model.safetensors" --init-config "$dir/config.json"
      --data "$dir"/tokens0.npy "$dir"/tokens1.npy "$dir"/tokens2.npy "$dir"/tokens3.npy
      --original-len "$L0" --window "$WINDOW" --scale 2 --method none --mode "$MODE" --ttt-chunk "$((L0 < 512 ? 16 : 256))"
      --batch "$BATCH" --steps "$((STEPS + 2))" --log-every 1 --eval-trials 1 --device "$DEVICE" --lr 5e-6 --lr-ttt 5e-6)

steady() {  # frames/s between the second and the last step lines (elapsed = frames / cumulative rate)
    awk '/^stage 0: / { for (i = 1; i <= NF; i++) if ($i == "batch") B = $(i + 1) }
         /^step / { split($2, s, "/"); for (i = 1; i <= NF; i++) { if ($i == "len") L = B * $(i + 1); if ($i == "tok/s") r = $(i - 1) }
                    gsub(",", "", r); n++; t = s[1] * L / r; if (n == 1) t1st = t; if (n == 2) { s0 = s[1]; t0 = t } s1 = s[1]; t1 = t }
         END { if (n < 2 || t1 <= t0) printf "nan nan"; else printf "%.0f %.1f", (s1 - s0) * L / (t1 - t0), t1st }' "$1"
}

printf "%-48s %10s %12s %14s %s\n" "run" "frames/s" "first step" "peak GiB (smi)" "last step line"
i=0
while IFS= read -r flags; do
    i=$((i + 1)); name="run$i"; log="$OUTDIR/$name.log"; rm -rf "$OUTDIR/$name"
    mem="$OUTDIR/$name.mem"; : > "$mem"
    if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$mem" & smi=$!
    fi
    # moshi loads able to compile (NO_TORCH_COMPILE empty, as train.py sets it); --moshi-compile turns it on
    # shellcheck disable=SC2086
    env -u NO_TORCH_COMPILE python3 "${base[@]}" $flags --out "$OUTDIR/$name" > "$log" 2>&1 & pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        grep -q "^step $STEPS/" "$log" && { kill "$pid"; break; }
        sleep 1
    done
    wait "$pid" 2>/dev/null
    [ "$DEVICE" = cuda ] && kill "$smi"
    peak=$(sort -n "$mem" | tail -1 | awk '{ printf "%.1f", $1 / 1024 }')
    read -r rate first <<< "$(steady "$log")"
    printf "%-48s %10s %12s %14s %s\n" "${flags:-(no flag added)}" "$rate" "${first} s" "${peak:--}" \
        "$(grep "^step " "$log" | tail -1)"
    grep -q "^step $STEPS/" "$log" || { echo "  did not reach step $STEPS; the end of $log:"; tail -5 "$log"; }
done <<< "$RUNS"

#!/usr/bin/env bash
# Is the small set below full fine-tuning only because full fine-tuning at the pretraining's learning rate
# harms its base? One base pretrained (PRETRAIN_STEPS, default 900: half the preset's, so that it fits one
# short device call) on DATA; on it, trained at 4 W (the horizon's rows `control` and
# `ttt_lora_all_rank4_delta1`, their commands from sweep.py's own finetune_command) the no-TTT control at
# each learning rate of LRS (the first is the preset's), and the small set (rank-4 LoRA on every linear with
# the memory) at the preset's; then each control against the small set, and the base alone against it, on
# the same validation windows (eval_passkey.py, one process per pair, all at once), and `sweep.py --paired`
# tables. On one H200 with installed_python_corpus.py's corpus, PRETRAIN_STEPS=600 LENGTHS=1024 took 226 s
# (horizon_h200_control_lr.log; the defaults: about 5 minutes, an estimate); on 2 CPU cores the miniature
# (PRETRAIN_STEPS=20 STEPS=6 WINDOWS=4 LENGTHS=512, a 20 MB corpus) runs in under 2 minutes.
#   DATA=corpus.txt bash results/horizon/control_learning_rate.sh     # from the repository root
# DATA (required), PRETRAIN_STEPS, STEPS (the fine-tunings', default the preset's), LRS (the preset's, 0.3
# and 0.1 times it: 0.001 0.0003 0.0001 on a GPU), WINDOWS (256), LENGTHS (1024,2048), SEED (the evaluation
# seed, 1099514627793), OUT (out/control_learning_rate).
set -euo pipefail
[[ -n ${DATA:-} && -f ${DATA:-} ]] || { echo "DATA must name a text file (the corpus), got '${DATA:-}'"; exit 2; }
PRETRAIN_STEPS=${PRETRAIN_STEPS:-900} WINDOWS=${WINDOWS:-256}
LENGTHS=${LENGTHS:-1024,2048} SEED=${SEED:-1099514627793} OUT=${OUT:-out/control_learning_rate}
for n in "$PRETRAIN_STEPS" "${STEPS:-1}"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "PRETRAIN_STEPS and STEPS must be positive counts, got $n"; exit 2; }
done
export NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1
LRS=${LRS:-$(python -c 'import sweep, torch
lr = float(sweep.PRESETS_HORIZON["cuda" if torch.cuda.is_available() else "cpu"]["lr"])
print(*(f"{lr * f:g}" for f in (1, 0.3, 0.1)))')}
mkdir -p "$OUT/logs"
# the commands, one per line: the pretraining, then each control, then the small set
python - "$DATA" "$PRETRAIN_STEPS" "${STEPS:-0}" "$OUT" $LRS > "$OUT/commands.txt" <<'EOF'
import os, shlex, sys, torch
import sweep
data, pretrain_steps, steps, out, lrs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), os.path.abspath(sys.argv[4]), sys.argv[5:]
c = sweep.PRESETS_HORIZON["cuda" if torch.cuda.is_available() else "cpu"]
c = dict(c, pretrain_steps=pretrain_steps, steps=steps or c["steps"], data=[os.path.abspath(data)])
if float(lrs[0]) != float(c["lr"]):
    print(f"LRS must start with the preset's learning rate {c['lr']} (the control the sweeps ran), got {lrs[0]}",
          file=sys.stderr)
    sys.exit(2)
rows = {r.name: r for r in sweep.horizon_rows(c)}
base = os.path.join(out, "base", "base.pt")
commands = [sweep.pretrain_command(c, 0, os.path.dirname(base))]
commands += [sweep.finetune_command(dict(c, lr=lr), base, os.path.join(out, f"control_lr{lr}"), rows["control"].flags,
                                    0, c["steps"]) for lr in lrs]
commands.append(sweep.finetune_command(c, base, os.path.join(out, "small_set"), rows["ttt_lora_all_rank4_delta1"].flags,
                                       0, c["steps"]))
print("\n".join(shlex.join(["python"] + command[1:]) for command in commands))
EOF
mapfile -t commands < "$OUT/commands.txt"
run() {  # name command: into $OUT/logs/name.log; skipped where its folder holds results.json / base.pt
  local name=$1; shift
  [[ -f $OUT/$name/results.json || ( $name == base && -f $OUT/base/base.pt ) ]] && return 0
  (cd "$(dirname "$0")/../.." && eval "$*") > "$OUT/logs/$name.log" 2>&1 \
    || { echo "$name failed: $(tail -c 300 "$OUT/logs/$name.log")"; return 1; }
  echo "$name done at $SECONDS s"
}
run base "${commands[0]}"
pids=() i=1
for lr in $LRS; do run "control_lr$lr" "${commands[$i]}" & pids+=($!); i=$((i + 1)); done
run small_set "${commands[$i]}" & pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
score() {  # name control: the control checkpoint against the small set on the same windows
  python eval_passkey.py "$2" "$OUT/small_set/ckpt.pt" --lengths "$LENGTHS" --windows "$WINDOWS" --trials 1 \
      --depths 0.5 --seed "$SEED" --data "$DATA" --out "$OUT/$1.json" > "$OUT/logs/score_$1.log" 2>&1 \
    && python sweep.py --paired "$OUT/$1.json" --out "$OUT/$1" > /dev/null
}
pids=()
score base "$OUT/base/base.pt" & pids+=($!)
for lr in $LRS; do score "control_lr$lr" "$OUT/control_lr$lr/ckpt.pt" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
echo "scored at $SECONDS s"
for name in base $(for lr in $LRS; do echo "control_lr$lr"; done); do
  grep -E "bits per byte, control / row|row minus control" "$OUT/$name.md" | head -2 | sed "s/^/$name: /"
done

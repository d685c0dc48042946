#!/usr/bin/env bash
# Is the small set below full fine-tuning only because of the learning rates? One base pretrained
# (PRETRAIN_STEPS, default the preset's) on DATA; on it, trained at 4 W (the horizon's rows `control` and
# `ttt_lora_all_rank4_delta1`, their commands from sweep.py's own finetune_command), the no-TTT control at
# each learning rate of LRS and the small set (rank-4 LoRA on every linear with the memory) at each of
# SMALL_LRS, all at once; then every control, and the base alone, against every small set on the same
# validation windows (eval_passkey.py, one process per pair, all at once), and `sweep.py --paired` tables:
# the best small set against the best control is the fair comparison (both tuned on these windows).
# On one H200 with installed_python_corpus.py's corpus: PRETRAIN_STEPS=600 LENGTHS=1024, the control at three
# rates and the small set at the preset's, took 226 s (revision bdbb9f1, horizon_h200_control_lr.log); on
# 2 CPU cores the miniature (PRETRAIN_STEPS=20 STEPS=6 WINDOWS=4 LENGTHS=512, a 20 MB corpus, three rates
# each) runs in 275 s.
#   DATA=corpus.txt bash results/horizon/control_learning_rate.sh     # from the repository root
# DATA (required), PRETRAIN_STEPS, STEPS (the fine-tunings', default the preset's), LRS (the control's: the
# preset's, 0.3 and 0.1 times it, 0.001 0.0003 0.0001 on a GPU), SMALL_LRS (the small set's: the preset's, 3
# and 0.3 times it), WINDOWS (256), LENGTHS (1024,2048), SEED (the evaluation seed, 1099514627793), OUT
# (out/control_learning_rate). A pair's files: OUT/<control>_vs_small_set_lr<rate>.{json,md}, <control>
# being `base` or control_lr<rate>. A training already done in OUT is reused when its command and corpus
# are this run's (so more rates can be added to a run), refused otherwise. On one H200 with the defaults:
# 426 s (horizon_h200_tuned_lr.log).
set -euo pipefail
[[ -n ${DATA:-} && -f ${DATA:-} ]] || { echo "DATA must name a text file (the corpus), got '${DATA:-}'"; exit 2; }
WINDOWS=${WINDOWS:-256} LENGTHS=${LENGTHS:-1024,2048} SEED=${SEED:-1099514627793} OUT=${OUT:-out/control_learning_rate}
for n in "${PRETRAIN_STEPS:-1}" "${STEPS:-1}" "$WINDOWS" "$SEED"; do
  [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "PRETRAIN_STEPS, STEPS, WINDOWS and SEED must be positive counts, got $n"; exit 2; }
done
[[ $LENGTHS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "LENGTHS must be a comma list of lengths, got $LENGTHS"; exit 2; }
export NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1
rates() {  # the preset's learning rate times each factor
  python -c 'import sys, sweep, torch
lr = float(sweep.PRESETS_HORIZON["cuda" if torch.cuda.is_available() else "cpu"]["lr"])
print(*(f"{lr * float(f):g}" for f in sys.argv[1:]))' "$@"
}
LRS=${LRS:-$(rates 1 0.3 0.1)} SMALL_LRS=${SMALL_LRS:-$(rates 1 3 0.3)}
# the commands, one per line: the pretraining, then each control, then each small set (a bad rate: exit 2 here)
listed=$(python - "$DATA" "${PRETRAIN_STEPS:-0}" "${STEPS:-0}" "$OUT" "$LRS" "$SMALL_LRS" <<'PY'
import os, shlex, sys, torch
import sweep
data, pretrain_steps, steps, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), os.path.abspath(sys.argv[4])
c = sweep.PRESETS_HORIZON["cuda" if torch.cuda.is_available() else "cpu"]
try:
    lrs, small_lrs = ([f"{float(x):g}" for x in rates.split()] for rates in sys.argv[5:7])
    assert lrs and small_lrs and min(map(float, lrs + small_lrs)) > 0
    assert len(set(lrs)) == len(lrs) and len(set(small_lrs)) == len(small_lrs)
except (ValueError, AssertionError):
    print(f"LRS and SMALL_LRS must be positive learning rates, each once, got '{sys.argv[5]}' and '{sys.argv[6]}'",
          file=sys.stderr)
    sys.exit(2)
c = dict(c, pretrain_steps=pretrain_steps or c["pretrain_steps"], steps=steps or c["steps"],
         data=[os.path.abspath(data)])
rows = {r.name: r for r in sweep.horizon_rows(c)}
base = os.path.join(out, "base", "base.pt")
commands = [("base", sweep.pretrain_command(c, 0, os.path.dirname(base)))]
for name, row, rates in (("control", "control", lrs), ("small_set", "ttt_lora_all_rank4_delta1", small_lrs)):
    commands += [(f"{name}_lr{lr}", sweep.finetune_command(dict(c, lr=lr), base, os.path.join(out, f"{name}_lr{lr}"),
                                                          rows[row].flags, 0, c["steps"])) for lr in rates]
print("\n".join(f"{name} {shlex.join(['python'] + command[1:])}" for name, command in commands))
PY
)
mapfile -t commands <<< "$listed"
mkdir -p "$OUT/logs"
printf "%s\n" "${commands[@]}" > "$OUT/commands.txt"
# a run already done in OUT is reused only if it was this command on this corpus (logs/<name>.command)
corpus=$(sha256sum "$DATA" | cut -c1-16)
trained() { [[ -f $OUT/$1/results.json || ( $1 == base && -f $OUT/base/base.pt ) ]]; }
for line in "${commands[@]}"; do
  name=${line%% *}
  if trained "$name" && [[ $(cat "$OUT/logs/$name.command" 2>/dev/null) != "$corpus ${line#* }" ]]; then
    echo "$OUT/$name was trained by another command or corpus than this run's (see $OUT/logs/$name.command): give another OUT"
    exit 2
  fi
done
run() {  # name command: into $OUT/logs/name.log; skipped where its folder holds results.json / base.pt
  local name=$1; shift
  trained "$name" && return 0
  echo "$corpus $*" > "$OUT/logs/$name.command"
  (cd "$(dirname "$0")/../.." && eval "$*") > "$OUT/logs/$name.log" 2>&1 \
    || { echo "$name failed: $(tail -c 300 "$OUT/logs/$name.log")"; return 1; }
  echo "$name done at $SECONDS s"
}
all_done() {  # wait for every process of $@; 1 if any failed (each says why itself)
  local p failed=0
  for p in "$@"; do wait "$p" || failed=1; done
  return $failed
}
names=() pids=()
for line in "${commands[@]}"; do
  names+=("${line%% *}")
  [[ ${line%% *} == base ]] && { run base "${line#* }"; continue; }
  run "${line%% *}" "${line#* }" & pids+=($!)
done
all_done "${pids[@]}" || exit 1
score() {  # name control row: a control checkpoint against a small set on the same windows
  python eval_passkey.py "$2" "$3" --lengths "$LENGTHS" --windows "$WINDOWS" --trials 1 --depths 0.5 \
      --seed "$SEED" --data "$DATA" --out "$OUT/$1.json" > "$OUT/logs/score_$1.log" 2>&1 \
    && python sweep.py --paired "$OUT/$1.json" --out "$OUT/$1" > /dev/null \
    || { echo "scoring $1 failed: $(tail -c 300 "$OUT/logs/score_$1.log")"; return 1; }
}
pids=()
for small in $(printf "%s\n" "${names[@]}" | grep "^small_set_"); do
  for control in base $(printf "%s\n" "${names[@]}" | grep "^control_"); do
    checkpoint=$OUT/$control/ckpt.pt
    [[ $control == base ]] && checkpoint=$OUT/base/base.pt
    score "${control}_vs_$small" "$checkpoint" "$OUT/$small/ckpt.pt" & pids+=($!)
  done
done
all_done "${pids[@]}" || exit 1
echo "scored at $SECONDS s"
for f in "$OUT"/*_vs_small_set_lr*.md; do
  grep -E "bits per byte, control / row|row minus control" "$f" | head -2
done

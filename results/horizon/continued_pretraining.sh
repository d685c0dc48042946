#!/usr/bin/env bash
# Is a small set's cost at the trained length full fine-tuning's continued pretraining of a base that
# had too little? One base (BASE, default seed 0) pretrained twice: for the preset's steps, and for as
# many more as hold the tokens full fine-tuning sees through the stages (sweep.stages_as_pretraining_steps).
# On each, the TTT row (ROW) and its no-TTT control (full fine-tuning) are trained through the stages
# and scored on the same validation windows (paired_windows.sh, the two run at once), then:
#   cross: the control from the preset's base against the row from the longer-pretrained one (both have
#          had the control's full-weight tokens: as fine-tuning, or as more pretraining first);
#   bases: the two pretrained bases alone, on the same windows.
# So the row's cost is read three ways: on the preset's base (plain), on a base pretrained on (longer),
# and after the same full-weight tokens (cross). On one H200 (horizon_h200_pretraining.log) both pairs
# were scored by 522 s; the cross and bases evaluations took 38 s more: a 10-minute call holds it only
# just (its first run's timeout of 550 s stopped those two; they ran in a second call).
#   bash results/horizon/continued_pretraining.sh           # from the repository root, on a GPU
# ROW, CONTROL, SEEDS, WINDOWS, LENGTHS, DATA as paired_windows.sh's (here LENGTHS 1024,2048 and WINDOWS 256 by
# default: the cost is at 4 W); LONGER: the longer pretraining's steps (default: the preset's and the
# stages' tokens, 2100 on a GPU); OUT.
set -euo pipefail
here=$(dirname "$0")
export ROW=${ROW:-ttt_lora_all_rank4_delta1_then_long4} SEEDS=${SEEDS:-1099514627793}
export WINDOWS=${WINDOWS:-256} LENGTHS=${LENGTHS:-1024,2048} BASE=${BASE:-0} NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out/continued_pretraining}
read -r preset longer control < <(python -c 'import sys, sweep, torch
c = sweep.PRESETS_HORIZON["cuda" if torch.cuda.is_available() else "cpu"]
rows = {r.name: r for r in sweep.horizon_rows(c)}
print(c["pretrain_steps"], c["pretrain_steps"] + sweep.stages_as_pretraining_steps(c, 4),
      rows[sys.argv[1]].control if sys.argv[1] in rows else "-")' "$ROW")
[[ $control != - ]] || { echo "ROW must be a horizon row of sweep.py, got $ROW"; exit 2; }
export CONTROL=${CONTROL:-$control}  # the row's own control unless CONTROL names another
LONGER=${LONGER:-$longer}
[[ $BASE =~ ^[0-9]+$ ]] || { echo "BASE must be one base's seed (0, 1, ...), got $BASE"; exit 2; }
if ! [[ $LONGER =~ ^[0-9]+$ ]] || ((LONGER <= preset)); then
  echo "LONGER must be more pretraining steps than the preset's $preset, got $LONGER"; exit 2
fi
mkdir -p "$OUT"
echo "base $BASE pretrained for $preset steps (plain) and $LONGER (longer); row $ROW; $WINDOWS windows at $LENGTHS"
OUT="$OUT/plain" bash "$here/paired_windows.sh" > "$OUT/plain.log" 2>&1 &
plain=$!
OUT="$OUT/longer" PRETRAIN_STEPS=$LONGER bash "$here/paired_windows.sh" > "$OUT/longer.log" 2>&1 &
longer_run=$!
status=0
wait $plain || { status=1; echo "plain failed: $(tail -c 300 "$OUT/plain.log")"; }
wait $longer_run || { status=1; echo "longer failed: $(tail -c 300 "$OUT/longer.log")"; }
((status == 0)) || exit 1
echo "both pairs trained and scored at $SECONDS s"
at() { echo "$OUT/$1/w/base$BASE/$2"; }
score() {  # name seed checkpoint...: the checkpoints on the pairs' windows, into seed<seed>_<name>.json
  python eval_passkey.py "${@:3}" --lengths "$LENGTHS" --windows "$WINDOWS" --trials 1 --depths 0.5 --seed "$2" \
      ${DATA:+--data $DATA} --out "$OUT/seed$2_$1.json" > "$OUT/seed$2_$1.log" 2>&1
}
for seed in $SEEDS; do
  score cross "$seed" "$(at plain "$CONTROL"/ckpt.pt)" "$(at longer "$ROW"/ckpt.pt)" &
  score bases "$seed" "$(at plain base.pt)" "$(at longer base.pt)" &
  wait
  for pair in plain longer; do cp "$OUT/$pair/seed${seed}_base$BASE.json" "$OUT/seed${seed}_$pair.json"; done
  for pair in plain longer cross; do
    python sweep.py --paired "$OUT/seed${seed}_$pair.json" --out "$OUT/seed${seed}_$pair"
  done
done
echo "done at $SECONDS s"

#!/usr/bin/env bash
# A TTT row through the stages against its no-TTT control on many validation windows, paired: the sweep
# trains both on each base (its pretraining, the 4 W trainings, the stages to 16 W); as soon as a base's
# pair is trained, one eval_passkey.py call scores both on the same windows, once per seed; once every
# base's pair is trained the sweep is stopped (its own 16-window evaluations repeat earlier runs'), and
# `sweep.py --paired` pools each seed's files over the bases and windows. On one H200, bases 0 and 1 at
# 4-16 W with one seed (the run of horizon_h200_windows.log, made with the same steps before they were this
# script): trained by 455 s, 582 s in all; one base: trained by 321 s, then under 40 s per seed at 4 W and
# 8 W (horizon_h200_windows_default.log); three bases do not fit a 10-minute call. On 2 CPU cores (the
# miniature: BASES=1 LENGTHS=512,1024 WINDOWS=4, two seeds): trained by 621 s.
#   bash results/horizon/paired_windows.sh                  # from the repository root, on a GPU
#   BASES=2 SEEDS="1099511637783 1099514627793" bash results/horizon/paired_windows.sh
# SEEDS: the default evaluation seed (1099511637783) draws the sweep's own 16 windows first (the draw is
# prefix-stable), so a run with it scores the same checkpoints on those windows and on more. ROW: a
# horizon row trained through the stages (ttt_lora_all_rank4_delta1_lr<rate>_then_long4: the small set at
# its own learning rate, against the control at its own). CONTROL: the no-TTT row it is scored against
# (default the row's own control; control_lr<rate>_then_long4: full fine-tuning at another learning rate,
# trained beside the row's own control, which is then not scored; on 2 CPU cores BASE=0 PRETRAIN_STEPS=40
# LENGTHS=512 WINDOWS=4 with control_lr0.0006_then_long4: trained by 802 s, 806 s in all). PRETRAIN_STEPS: the
# bases' pretraining steps (default the preset's; continued_pretraining.sh runs it with more). BASE:
# one base's seed, in place of BASES bases from seed 0. DATA: text files the bases, trainings and
# evaluations read (sweep.py --data, space-separated; default the Python stdlib). FAR: lengths (a comma
# list, default none) at which far retrieval and bits per byte of both are measured as soon as they are
# trained, beside the windows' scoring: 8 documents per depth 0, 0.25 and 0.5 (every needle beyond the
# window at 16 W and past), 16 windows, eval_passkey.py's default seed; OUT/far_base<b>.json holds the
# pair, OUT/far.md the table. On one H200, one base, FAR=4096,8192,16384,32768 with WINDOWS=256 at
# 1024-4096: trained by 262-328 s, 363-460 s in all (horizon_h200_tuned_lr_more.log; 64 windows at 32768
# alone: 45-64 s after training); two bases at once did not fit 540 s (horizon_h200_tuned_lr.log, call 4). On 2 CPU cores BASE=0
# ROW=ttt_lora_all_rank4_delta1_lr0.0006_then_long4 PRETRAIN_STEPS=40 LENGTHS=512 WINDOWS=4 FAR=1024,2048: 477 s.
set -euo pipefail
ROW=${ROW:-ttt_lora_all_rank4_delta1_then_long4}
case $ROW in
  control*) echo "ROW is a control: name a TTT row trained through the stages, got $ROW"; exit 2 ;;
  *_then_long4) ;;
  *) echo "ROW must be a row trained through the stages (a name ending _then_long4), got $ROW"; exit 2 ;;
esac
# the row's own control unless CONTROL names another
CONTROL=${CONTROL:-$(python -c 'import sys, sweep, torch
rows = {r.name: r for r in sweep.horizon_rows(sweep.PRESETS_HORIZON["cuda" if torch.cuda.is_available() else "cpu"])}
print(rows[sys.argv[1]].control if sys.argv[1] in rows else "")' "$ROW")}
[[ -n $CONTROL ]] || { echo "ROW must be a horizon row of sweep.py, got $ROW"; exit 2; }
[[ $CONTROL == control*_then_long4 ]] \
  || { echo "CONTROL must be a no-TTT row trained through the stages (control..._then_long4), got $CONTROL"; exit 2; }
rows=$ROW,$CONTROL  # the sweep adds the row's own control if CONTROL is another
BASES=${BASES:-2}
if [[ -n ${BASE:-} ]]; then
  [[ $BASE =~ ^[0-9]+$ ]] || { echo "BASE must be one base's seed (0, 1, ...), got $BASE"; exit 2; }
  which=(--base "$BASE") seeds=$BASE
else
  which=(--bases "$BASES") seeds=$(seq 0 $((BASES - 1)))
fi
SEEDS=${SEEDS:-1099514627793}
WINDOWS=${WINDOWS:-128}
LENGTHS=${LENGTHS:-1024,2048,4096}
FAR=${FAR:-}
[[ -z $FAR || $FAR =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { echo "FAR must be a comma list of lengths, got $FAR"; exit 2; }
OUT=${OUT:-out/paired_windows}
export NO_TORCH_COMPILE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
setsid python sweep.py --setting horizon --rows "$rows" --start-rows-untested "${which[@]}" --jobs 4 \
    ${PRETRAIN_STEPS:+--pretrain-steps "$PRETRAIN_STEPS"} ${DATA:+--data $DATA} --out "$OUT/sweep" --work "$OUT/w" > "$OUT/sweep.log" 2>&1 &
sweep=$!
# the sweep refuses a work folder or JSON of other settings (another corpus, other steps) before any job:
# wait for its first line of work, so that such a refusal is not taken for trainings found done
started() { grep -q "^horizon: [0-9]* jobs" "$OUT/sweep.log"; }
until started; do
  kill -0 $sweep 2>/dev/null || started \
    || { echo "the sweep stopped before any work: $(tail -c 300 "$OUT/sweep.log")"; exit 1; }
  sleep 1
done
# a training is done when its results.json is there (train.py writes it last; so does a run resumed in OUT)
trained() { [[ -f $OUT/w/base$1/$CONTROL/results.json && -f $OUT/w/base$1/$ROW/results.json ]]; }
rm -f "$OUT"/seed*.md "$OUT/far.md"  # an earlier run's tables and scores, in a reused OUT
scorers=()
for b in $seeds; do
  (
    trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed scoring leaves no far evaluation running
    rm -f "$OUT"/seed*_base$b.json "$OUT"/far_base$b*.json
    until trained $b; do kill -0 $sweep 2>/dev/null || exit 1; sleep 5; done
    far=()
    for r in ${FAR:+"$CONTROL" "$ROW"}; do  # one process each, beside the windows' scoring
      python eval_passkey.py "$OUT/w/base$b/$r/ckpt.pt" --lengths "$FAR" --trials 8 --depths 0,0.25,0.5 --windows 16 \
          ${DATA:+--data $DATA} --out "$OUT/far_base${b}_$r.json" > "$OUT/far_base${b}_$r.log" 2>&1 & far+=($!)
    done
    for seed in $SEEDS; do
      python eval_passkey.py "$OUT/w/base$b/$CONTROL/ckpt.pt" "$OUT/w/base$b/$ROW/ckpt.pt" \
          --lengths "$LENGTHS" --windows "$WINDOWS" --trials 1 --depths 0.5 --seed "$seed" ${DATA:+--data $DATA} \
          --out "$OUT/seed${seed}_base$b.json" > "$OUT/seed${seed}_base$b.log" 2>&1
    done
    for p in "${far[@]}"; do wait "$p"; done
    if [[ -n $FAR ]]; then  # the two in one file, the control first, as an eval_passkey.py call of both writes it
      python -c 'import json, sys
json.dump({"checkpoints": [json.load(open(f)) for f in sys.argv[2:]]}, open(sys.argv[1], "w"), indent=1)' \
          "$OUT/far_base$b.json" "$OUT/far_base${b}_$CONTROL.json" "$OUT/far_base${b}_$ROW.json"
    fi
  ) &
  scorers+=($!)
done
all_trained() { for b in $seeds; do trained "$b" || return 1; done; }
until all_trained; do
  kill -0 $sweep 2>/dev/null \
    || { echo "the sweep ended before every pair was trained: $(tail -c 300 "$OUT/sweep.log")"; exit 1; }
  sleep 5
done
echo "every pair trained at $SECONDS s: stopping the sweep"
kill -- -$sweep 2>/dev/null || true
failed=0
for p in "${scorers[@]}"; do wait "$p" || failed=1; done
wait
((failed == 0)) || { echo "a scoring failed: see $OUT/seed*_base*.log and $OUT/far_base*.log"; exit 1; }
for seed in $SEEDS; do
  files=$(for b in $seeds; do echo "$OUT/seed${seed}_base$b.json"; done | paste -sd,)
  python sweep.py --paired "$files" --out "$OUT/seed$seed"
done
if [[ -n $FAR ]]; then
  python sweep.py --paired "$(for b in $seeds; do echo "$OUT/far_base$b.json"; done | paste -sd,)" --out "$OUT/far"
fi

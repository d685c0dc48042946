#!/bin/bash
# Zero-shot RoPE scalings on the first run's two bases (seed 0 and 1): vanilla, PI, YaRN static at
# x2 and x4 and dynamic, over YaRN's beta_fast. Usage: bash grid.sh OUTDIR BASE0 BASE1 DEVICE PARALLEL
out=$1; base0=$2; base1=$3; device=${4:-cpu}; parallel=${5:-2}
mkdir -p $out
for base in $base0 $base1; do
  s=$([ $base = $base0 ] && echo seed0 || echo seed1)
  echo "$s|vanilla|"
  echo "$s|pi_x4|--method pi --scale 4"
  echo "$s|pi_dynamic|--method pi --dynamic"
  for b in 2 4 8 32; do  # beta_fast must exceed beta_slow, 1
    echo "$s|yarn_x4_beta$b|--method yarn --scale 4 --beta-fast $b"
    echo "$s|yarn_x2_beta$b|--method yarn --scale 2 --beta-fast $b"
    echo "$s|yarn_dynamic_beta$b|--method yarn --dynamic --beta-fast $b"
  done
done | while IFS='|' read s name args; do
  base=$([ $s = seed0 ] && echo $base0 || echo $base1)
  echo "python eval_passkey.py $base $args --lengths 128,192,256,384,512 --trials 20 --device $device --out $out/${s}_$name.json > $out/${s}_$name.log 2>&1"
done | xargs -P $parallel -I{} bash -c "{}"
python - $out <<'PY'
import glob, json, os, sys
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(f))
    rows[os.path.basename(f)[:-5]] = [dict(length=r["length"], passkey=r["passkey"], by_depth=r["by_depth"], bpb=r["bpb"])
                                     for r in d["rows"]]
json.dump(rows, open(os.path.join(sys.argv[1], "grid.json"), "w"), indent=1)
for name, rs in rows.items():
    print(f"{name:<28}" + "".join(f"{100 * r['passkey']:5.0f}% {r['bpb']:.2f}" for r in rs))
PY

#!/usr/bin/env bash
# The phase-2 study (issue "LEGO that pays", item 3): from one phase-1 model, phase 2 over
# init (random, stack, identity) x learning rate (1e-4, 3e-4, 1e-3) in sequence mode, then
# token mode (the spec's) for the spec's recipe (random, 1e-4) and for the best sequence
# configuration; each run is chosen and compared by its **validation** routed perplexity only
# (the test split is printed beside it for the record, never used to choose). The epochs are
# studied inside each run: phase 2 is evaluated after every epoch (and at epoch 0, before any
# step), and early stopping keeps the best.
#
#   bash scripts/fetch-shakespeare.sh
#   bash scripts/phase2-study.sh                      # Shakespeare, config T, 2 epochs a phase
#   DATA="" EPOCHS=4 bash scripts/phase2-study.sh      # the synthetic corpus instead
#   INITS="random identity" LRS="1e-4 1e-3" TOKEN=no bash scripts/phase2-study.sh   # a subset
#   MODES="sequence token" bash scripts/phase2-study.sh   # the whole grid in both modes
#
# Each configuration is one run of the main example with --load of the same phase-1
# checkpoint (so phase 1, the threshold and the hard examples are shared), --baseline of one
# shared baseline checkpoint (trained by the first run that needs it) and a small
# --frontier-windows (the frontier is not what is studied). On Shakespeare a sequence-mode
# configuration takes about 7 minutes and a token-mode one about 10 on 2 cores. Setting
# PHASE1=<a phase-1 checkpoint of the same data and settings> skips training phase 1.
# Results: target/phase2-study/<config>/report.json and target/phase2-study/study.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA-data/shakespeare}
EPOCHS=${EPOCHS:-2}
OUT=${OUT:-target/phase2-study}
INITS=${INITS:-random stack identity}
LRS=${LRS:-1e-4 3e-4 1e-3}
MODES=${MODES:-sequence}
TOKEN=${TOKEN:-yes}
mkdir -p "$OUT"
common=(--tokenizer byte --seq-len 64 --batch-size 32 --epochs "$EPOCHS" --frontier-windows 4
  --baseline "$OUT/base.baseline.safetensors")
[ -n "$DATA" ] && common+=(--data "$DATA")

cargo build --release --example true_early_exit
# A copy, so that a rebuild during the study does not change the program under it.
BIN=$OUT/true_early_exit
cp target/release/examples/true_early_exit "$BIN"

# Phase 1 once: a given checkpoint, or a run that trains it (and a first phase 2 and the
# baseline).
if [ -n "${PHASE1:-}" ] && [ ! -f "$OUT/base.phase1.safetensors" ]; then
  cp "$PHASE1" "$OUT/base.phase1.safetensors"
fi
if [ ! -f "$OUT/base.phase1.safetensors" ]; then
  "$BIN" "${common[@]}" --phase2-mode sequence --save "$OUT/base.safetensors" --out "$OUT/base"
fi

# The table: every configuration under $OUT that has a report (so runs of subsets add up).
write_table() {
  python3 - "$OUT" >"$OUT/study.csv" <<'EOF'
import glob, json, os, sys
print("init,lr2,mode,val_ppl_routed_epoch0,best_val_ppl_routed,best_epoch,test_ppl_full_depth,test_ppl_early_exit")
for report in sorted(glob.glob(os.path.join(sys.argv[1], "*-*-*", "report.json"))):
    name = os.path.basename(os.path.dirname(report))
    init, rest = name.split("-", 1)
    lr2, mode = rest.rsplit("-", 1)
    r = json.load(open(report))
    curve = [c["val_ppl"] for c in r["training"]["phase2"][0]["stage"]["curve"] if c.get("val_ppl") is not None]
    best = min(curve)
    model = [m for m in r["models"] if m["name"].startswith("phase 2")][0]
    ee = model.get("test_early_exit") or {}
    print(f'{init},{lr2},{mode},{curve[0]:.4f},{best:.4f},{curve.index(best)},'
          f'{model["test_full_depth"]["ppl"]:.4f},{ee.get("ppl", float("nan")):.4f}')
EOF
}
# One configuration: run it, unless its report is there.
study_row() {
  local init=$1 lr2=$2 mode=$3
  local dir="$OUT/$init-$lr2-$mode"
  [ -f "$dir/report.json" ] ||
    "$BIN" "${common[@]}" --load "$OUT/base.phase1.safetensors" --init "$init" --lr2 "$lr2" \
      --phase2-mode "$mode" --out "$dir" 2>"$dir.log" >/dev/null || { echo "failed: $dir (see $dir.log)"; return; }
  echo "done: $init $lr2 $mode ($(date +%H:%M))"
}
for init in $INITS; do
  for lr2 in $LRS; do
    for mode in $MODES; do
      study_row "$init" "$lr2" "$mode"
    done
  done
done
# Token mode (the spec's) for the spec's recipe and for the best sequence configuration.
if [ "$TOKEN" = yes ] && [[ " $MODES " != *" token "* ]]; then
  write_table
  best=$(grep ',sequence,' "$OUT/study.csv" | sort -t, -k5 -g | head -1 | cut -d, -f1,2 || true)
  study_row random 1e-4 token
  if [ -n "$best" ] && [ "$best" != "random,1e-4" ]; then study_row "${best%,*}" "${best#*,}" token; fi
fi

write_table
echo "chosen by validation (lowest routed validation PPL):"
sort -t, -k5 -g "$OUT/study.csv" | grep -v '^init' | head -1
column -s, -t "$OUT/study.csv"

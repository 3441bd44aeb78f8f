#!/usr/bin/env bash
# The phase-2 study (issue "LEGO that pays", item 3): from one phase-1 model, phase 2 over
# init (random, stack, identity) x learning rate (1e-4, 3e-4, 1e-3) x mode (sequence, token),
# each run chosen and compared by its **validation** routed perplexity only (the test split
# is printed beside it for the record, never used to choose).
#
#   bash scripts/fetch-shakespeare.sh
#   bash scripts/phase2-study.sh                      # Shakespeare, config T, 2 epochs a phase
#   DATA="" EPOCHS=4 bash scripts/phase2-study.sh      # the synthetic corpus instead
#   INITS="random identity" LRS="1e-4 1e-3" MODES=sequence bash scripts/phase2-study.sh   # a subset
#
# Each configuration is one run of the main example with --load of the same phase-1
# checkpoint (so phase 1, the threshold and the hard examples are shared) and a small
# --frontier-windows (the frontier is not what is studied). Every run still trains the
# 4-layer baseline (the example always does), so on Shakespeare the study takes hours: it is
# not the README's command. Results: target/phase2-study/<config>/report.json and
# target/phase2-study/study.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA-data/shakespeare}
EPOCHS=${EPOCHS:-2}
OUT=${OUT:-target/phase2-study}
INITS=${INITS:-random stack identity}
LRS=${LRS:-1e-4 3e-4 1e-3}
MODES=${MODES:-sequence token}
mkdir -p "$OUT"
common=(--tokenizer byte --seq-len 64 --batch-size 32 --epochs "$EPOCHS" --frontier-windows 4)
[ -n "$DATA" ] && common+=(--data "$DATA")

cargo build --release --example true_early_exit
BIN=target/release/examples/true_early_exit

# Phase 1 once (with the spec's phase 2, which is also the study's first row).
if [ ! -f "$OUT/base.phase1.safetensors" ]; then
  "$BIN" "${common[@]}" --phase2-mode sequence --save "$OUT/base.safetensors" --out "$OUT/base"
fi

echo "init,lr2,mode,best_val_ppl_routed,best_epoch,test_ppl_full_depth,test_ppl_early_exit" >"$OUT/study.csv"
for init in $INITS; do
  for lr2 in $LRS; do
    for mode in $MODES; do
      dir="$OUT/$init-$lr2-$mode"
      [ -f "$dir/report.json" ] ||
        "$BIN" "${common[@]}" --load "$OUT/base.phase1.safetensors" --init "$init" --lr2 "$lr2" \
          --phase2-mode "$mode" --out "$dir" 2>"$dir.log" >/dev/null || { echo "failed: $dir (see $dir.log)"; continue; }
      python3 - "$dir/report.json" "$init" "$lr2" "$mode" >>"$OUT/study.csv" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
p2 = r["training"]["phase2"][0]["stage"]
curve = [c["val_ppl"] for c in p2["curve"] if c.get("val_ppl") is not None]
best = min(curve)
model = [m for m in r["models"] if m["name"].startswith("phase 2")][0]
ee = model.get("test_early_exit") or {}
print(f'{sys.argv[2]},{sys.argv[3]},{sys.argv[4]},{best:.4f},{curve.index(best)},'
      f'{model["test_full_depth"]["ppl"]:.4f},{ee.get("ppl", float("nan")):.4f}')
EOF
    done
  done
done

echo "chosen by validation (lowest routed validation PPL):"
sort -t, -k4 -g "$OUT/study.csv" | grep -v '^init' | head -1
column -s, -t "$OUT/study.csv"

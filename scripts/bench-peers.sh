#!/usr/bin/env bash
# Runs lego's model bench and the PyTorch peer (../shared/peers/torch_bench.py) one right
# after the other for each measurement, on 2 threads, and prints the ratio ours / PyTorch
# beside the figures of ../shared/PEERS.md.
#
#   scripts/bench-peers.sh            # train T S M, decode S M at batch 1 and 8
#   QUICK=1 scripts/bench-peers.sh    # fewer reps (a smoke run)
#   THREADS=1 scripts/bench-peers.sh  # 1 thread (PEERS.md's column is then the 2-thread one)
#   ONLY=decode scripts/bench-peers.sh  # only the decode (or train) pairs
#
# Our bench binary is built once up front and run directly, so edits made to src/ while this
# runs do not change what is measured. Results: stdout and target/bench-peers.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

PEER=${PEER:-../shared/peers/torch_bench.py}
[ -f "$PEER" ] || PEER=/work/shared/peers/torch_bench.py
THREADS=${THREADS:-2}
ONLY=${ONLY:-train,decode}
QUICK=${QUICK:-0}
python3 -c "import torch" 2>/dev/null || { echo "torch is not importable: pip install torch" >&2; exit 1; }

# Build once; cargo prints the bench executable's path in its JSON messages.
BIN=$(cargo bench --bench model --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "model":
        print(m["executable"])' | tail -1)
[ -x "$BIN" ] || { echo "could not build the model bench" >&2; exit 1; }
echo "lego bench: $BIN; peer: $PEER; threads $THREADS; load $(cut -d' ' -f1-3 /proc/loadavg)"

# PEERS.md, PyTorch 2.15, 2 threads.
declare -A PEERS_MD=([train_T_32]=50900 [train_S_16]=6180 [train_M_8]=1210
  [decode_S_1]=820 [decode_M_1]=190 [decode_S_8]=3880 [decode_M_8]=800)

field() { sed -n "s/.*[ ]$1=\([0-9.]*\).*/\1/p" | head -1; }
CSV=target/bench-peers.csv
mkdir -p target
echo "part,config,batch,threads,lego_tok_per_s,lego_best,torch_tok_per_s,torch_min,torch_max,peers_md,ratio" >"$CSV"
ROWS=()

run_pair() { # part cfg batch peer_reps
  local part=$1 cfg=$2 batch=$3 preps=$4 ours out theirs tmin tmax
  [ "$QUICK" = 1 ] && preps=2
  local -a env=(LEGO_BENCH=$part LEGO_BENCH_CONFIGS=$cfg LEGO_BENCH_THREADS=$THREADS
    LEGO_BENCH_BATCHES=$batch LEGO_BENCH_QUICK=$QUICK LEGO_BENCH_CSV=target/bench-peers-lego-last.csv)
  out=$(env "${env[@]}" "$BIN" | grep '^RESULT lego')
  ours=$(field tok_per_s_median <<<"$out")
  local best
  best=$(field tok_per_s_best <<<"$out")
  if [ "$part" = train ]; then
    out=$(python3 "$PEER" train "$cfg" "$preps" "$THREADS" | grep '^RESULT')
    theirs=$(field tok_per_s_median <<<"$out")
  else
    out=$(python3 "$PEER" decode "$cfg" "$preps" "$THREADS" "$batch" | grep '^RESULT')
    theirs=$(field new_tok_per_s_median <<<"$out")
  fi
  # The peer prints "<key>=median min=.. max=.."; decode also prints prefill figures after.
  local key=tok_per_s_median
  [ "$part" = decode ] && key=new_tok_per_s_median
  tmin=$(sed -n "s/.* $key=[0-9.]* min=\([0-9.]*\).*/\1/p" <<<"$out" | head -1)
  tmax=$(sed -n "s/.* $key=[0-9.]* min=[0-9.]* max=\([0-9.]*\).*/\1/p" <<<"$out" | head -1)
  local pm=${PEERS_MD[${part}_${cfg}_$batch]:-}
  local ratio
  ratio=$(python3 -c "print(f'{$ours/$theirs:.2f}')")
  echo "$part,$cfg,$batch,$THREADS,$ours,$best,$theirs,$tmin,$tmax,$pm,$ratio" >>"$CSV"
  ROWS+=("$(printf '%-7s %-3s %5s %11s %11s %11s %11s %7s' "$part" "$cfg" "$batch" "$ours" "$best" "$theirs" "${pm:--}" "$ratio")")
  echo "${ROWS[-1]}   (load $(cut -d' ' -f1 /proc/loadavg))"
}

if [[ ,$ONLY, == *,train,* ]]; then
  run_pair train T 32 15
  run_pair train S 16 9
  run_pair train M 8 5
fi
if [[ ,$ONLY, == *,decode,* ]]; then
  for cfg in S M; do
    for b in 1 8; do run_pair decode "$cfg" "$b" 7; done
  done
fi

echo
echo "tokens/s, $THREADS threads, median (lego 'best' = fastest rep); train: batch x seq as DEVELOPERS.md;"
echo "decode: new tokens/s of the decode steps (prompt 16, 128 greedy tokens)"
printf '%-7s %-3s %5s %11s %11s %11s %11s %7s\n' part cfg batch lego lego_best torch_now PEERS.md ours/torch
printf '%s\n' "${ROWS[@]}"
echo "wrote $CSV; load $(cut -d' ' -f1-3 /proc/loadavg)"

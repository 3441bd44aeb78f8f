#!/usr/bin/env bash
# Runs lego's model bench and the PyTorch peer (../shared/peers/torch_bench.py) one right
# after the other for each measurement, on 2 threads, and prints the ratio ours / PyTorch
# beside the figures of ../shared/PEERS.md.
#
#   scripts/bench-peers.sh            # train T S M, decode S M at batch 1 and 8
#   QUICK=1 scripts/bench-peers.sh    # fewer reps (a smoke run)
#   THREADS=1 scripts/bench-peers.sh  # 1 thread (PEERS.md's column is then the 2-thread one)
#   ONLY=decode scripts/bench-peers.sh  # only the decode (or train, or llama2c) pairs
#   LLAMA2C=path/to/llama2.c scripts/bench-peers.sh   # also batch-1 decode beside llama2.c
#   LLAMA2C_ROUNDS=7                  # rounds of ours / llama2.c, alternating (median of ratios)
#
# llama2.c: give LLAMA2C the directory of a llama2.c checkout you fetched yourself (it is never
# vendored here). Its run.c is built into target/llama2c with `gcc -Ofast -march=native
# -fopenmp`, random S and M checkpoints are written there by
# ../shared/peers/write_llama2c_random.py (needs numpy), and `run` decodes prompt 16 + 128
# greedy tokens with OMP_NUM_THREADS=$THREADS; its own "achieved tok/s" is set beside our
# batch-1 decode, the two alternating round by round (the ratio: the median of the rounds'). Each decode row also gives our rate as a share of the roofline:
# weight bytes per token over the read bandwidth measured over that model's own weight size
# (lego::kernels::roofline, printed by the model bench).
#
# Our bench binary is built once up front and run directly, so edits made to src/ while this
# runs do not change what is measured. Results: stdout and target/bench-peers.csv.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS_DIR=${PEERS_DIR:-../shared/peers}
PEER=${PEER:-$PEERS_DIR/torch_bench.py}
THREADS=${THREADS:-2}
ONLY=${ONLY:-train,decode,llama2c}
QUICK=${QUICK:-0}
LLAMA2C=${LLAMA2C:-}
HAVE_TORCH=1
python3 -c "import torch" 2>/dev/null || { HAVE_TORCH=0; echo "torch is not importable (pip install torch): PyTorch pairs skipped" >&2; }

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
echo "part,config,batch,threads,lego_tok_per_s,lego_best,peer,peer_tok_per_s,peer_min,peer_max,peers_md,ratio,roof_share" >"$CSV"
ROWS=()

# Our bench once for one measurement: prints its RESULT line.
ours_result() { # part cfg batch (OUR_REPS: reps, if set)
  env LEGO_BENCH="$1" LEGO_BENCH_CONFIGS="$2" LEGO_BENCH_THREADS="$THREADS" LEGO_BENCH_BATCHES="$3" \
    LEGO_BENCH_QUICK="$QUICK" ${OUR_REPS:+LEGO_BENCH_REPS=$OUR_REPS} \
    LEGO_BENCH_CSV=target/bench-peers-lego-last.csv "$BIN" | grep '^RESULT lego'
}

row() { # part cfg batch ours best peer theirs tmin tmax peers_md ratio roof
  echo "$1,$2,$3,$THREADS,$4,$5,$6,$7,$8,$9,${10},${11},${12}" >>"$CSV"
  ROWS+=("$(printf '%-7s %-3s %5s %11s %11s %-8s %11s %11s %7s %7s' "$1" "$2" "$3" "$4" "$5" "$6" "$7" "${10:--}" "${11}" "${12:--}")")
  echo "${ROWS[-1]}   (load $(cut -d' ' -f1 /proc/loadavg))"
}

run_pair() { # part cfg batch peer_reps: ours beside PyTorch
  local part=$1 cfg=$2 batch=$3 preps=$4 out ours best theirs tmin tmax roof
  [ "$QUICK" = 1 ] && preps=2
  out=$(ours_result "$part" "$cfg" "$batch")
  ours=$(field tok_per_s_median <<<"$out")
  best=$(field tok_per_s_best <<<"$out")
  roof=$(field roof_share <<<"$out")
  [ "$HAVE_TORCH" = 1 ] || { row "$part" "$cfg" "$batch" "$ours" "$best" - - - - "" - "$roof"; return; }
  if [ "$part" = train ]; then
    out=$(python3 "$PEER" train "$cfg" "$preps" "$THREADS" | grep '^RESULT')
  else
    out=$(python3 "$PEER" decode "$cfg" "$preps" "$THREADS" "$batch" | grep '^RESULT')
  fi
  # The peer prints "<key>=median min=.. max=.."; decode also prints prefill figures after.
  local key=tok_per_s_median
  [ "$part" = decode ] && key=new_tok_per_s_median
  theirs=$(field $key <<<"$out")
  tmin=$(sed -n "s/.* $key=[0-9.]* min=\([0-9.]*\).*/\1/p" <<<"$out" | head -1)
  tmax=$(sed -n "s/.* $key=[0-9.]* min=[0-9.]* max=\([0-9.]*\).*/\1/p" <<<"$out" | head -1)
  local ratio
  ratio=$(python3 -c "print(f'{$ours/$theirs:.2f}')")
  row "$part" "$cfg" "$batch" "$ours" "$best" pytorch "$theirs" "$tmin" "$tmax" "${PEERS_MD[${part}_${cfg}_$batch]:-}" "$ratio" "$roof"
}

# llama2.c's run.c, built and fed random checkpoints of our configs, beside our batch-1 decode.
# The two alternate for LLAMA2C_ROUNDS rounds (ours: 3 reps of the model bench; then one run of
# run.c), and the ratio is the median of the rounds' own ratios: on a machine whose speed drifts
# within minutes, a pair measured back to back is what compares.
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
run_llama2c() { # cfg
  local cfg=$1 dir=target/llama2c out o t
  mkdir -p "$dir"
  [ -x "$dir/run" ] || gcc -Ofast -march=native -fopenmp -o "$dir/run" "$LLAMA2C/run.c" -lm
  [ -f "$dir/model_$cfg.bin" ] || python3 "$PEERS_DIR/write_llama2c_random.py" "$dir" "$cfg" >/dev/null
  local rounds=${LLAMA2C_ROUNDS:-7} ours_all=() theirs_all=() ratios=() roofs=()
  [ "$QUICK" = 1 ] && rounds=2
  for _ in $(seq "$rounds"); do
    out=$(OUR_REPS=3 ours_result decode "$cfg" 1)
    o=$(field tok_per_s_median <<<"$out")
    roofs+=("$(field roof_share <<<"$out")")
    t=$(OMP_NUM_THREADS=$THREADS "$dir/run" "$dir/model_$cfg.bin" -z "$dir/tokenizer_$cfg.bin" \
      -t 0 -n 144 -i abcdefghijklmn 2>&1 >/dev/null | sed -n 's/achieved tok\/s: \([0-9.]*\)/\1/p')
    ours_all+=("$o")
    theirs_all+=("$t")
    ratios+=("$(python3 -c "print($o/$t)")")
  done
  local ours best theirs lo hi ratio roof pm
  ours=$(median "${ours_all[@]}")
  best=$(printf '%s\n' "${ours_all[@]}" | sort -g | tail -1)
  theirs=$(median "${theirs_all[@]}")
  lo=$(printf '%s\n' "${theirs_all[@]}" | sort -g | head -1)
  hi=$(printf '%s\n' "${theirs_all[@]}" | sort -g | tail -1)
  ratio=$(python3 -c "print(f'{$(median "${ratios[@]}"):.2f}')")
  roof=$(median "${roofs[@]}")
  pm=$([ "$cfg" = S ] && echo 2470 || echo 340)
  echo "  llama2.c $cfg rounds (ours / theirs): $(paste -d/ <(printf '%s\n' "${ours_all[@]}") <(printf '%s\n' "${theirs_all[@]}") | tr '\n' ' ')"
  row decode "$cfg" 1 "$ours" "$best" llama2.c "$theirs" "$lo" "$hi" "$pm" "$ratio" "$roof"
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
if [[ ,$ONLY, == *,llama2c,* ]]; then
  if [ -n "$LLAMA2C" ] && [ -f "$LLAMA2C/run.c" ]; then
    for cfg in S M; do run_llama2c "$cfg"; done
  else
    echo "LLAMA2C is not set to a llama2.c checkout (with run.c): llama2.c pairs skipped" >&2
  fi
fi

echo
echo "tokens/s, $THREADS threads, median (lego 'best' = fastest rep); train: batch x seq as DEVELOPERS.md;"
echo "decode: new tokens/s of the decode steps (prompt 16, 128 greedy tokens); llama2.c: its own"
echo "tok/s over the whole sequence; 'of roof': our decode rate over the measured roofline"
printf '%-7s %-3s %5s %11s %11s %-8s %11s %11s %7s %7s\n' part cfg batch lego lego_best peer peer_now PEERS.md ours/peer "of roof"
printf '%s\n' "${ROWS[@]}"
echo "wrote $CSV; load $(cut -d' ' -f1-3 /proc/loadavg)"

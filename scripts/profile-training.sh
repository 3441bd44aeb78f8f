#!/usr/bin/env bash
# Where a training step's time goes: the model bench's training part under `perf`, for each
# config and thread count, each sample put in one group (the GEMM kernel, its packing,
# attention, the elementwise ops, memory, the kernel's scheduler, ...). Prints one markdown
# table per config: a column per thread count, each the share of that run's on-CPU samples,
# with the step time, the CPUs the run kept busy (perf stat's task-clock over wall time) and
# each thread's share of the samples.
#
#   scripts/profile-training.sh                    # T, S and M on 1 and 2 threads (~6 min)
#   CONFIGS=T THREADS="1 2" scripts/profile-training.sh
#   REPS=20 scripts/profile-training.sh            # timed steps a run (default: by config)
#
# Needs `perf` (Debian: linux-perf) with permission to sample this process
# (kernel.perf_event_paranoid <= 2). Nothing else may run on the cores meanwhile. The bench
# binary is built once up front and run directly. Raw data: target/profile-training/.
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIGS=${CONFIGS:-T S M}
THREADS=${THREADS:-1 2}
OUT=target/profile-training
mkdir -p "$OUT"
command -v perf >/dev/null || { echo "perf is not installed (Debian: apt install linux-perf)" >&2; exit 1; }

BIN=$(cargo bench --bench model --no-run --message-format=json 2>/dev/null |
  python3 -c 'import sys,json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "model":
        print(m["executable"])')
[ -x "$BIN" ] || { echo "could not build the model bench" >&2; exit 1; }

# The group of a symbol (perf's name for it), first match wins.
group() {
  awk '
    /sgemm_kernel|kernel_target/          { print "GEMM kernel (matrixmultiply)"; next }
    /packing::pack/                       { print "GEMM packing (matrixmultiply)"; next }
    /simd::.*matmul_xwt/                  { print "small-M product (our SIMD kernel)"; next }
    /attention|softmax|attend/            { print "attention and softmax"; next }
    /cross_entropy|logsumexp/             { print "cross-entropy"; next }
    /swiglu|sigmoid|silu|expf/            { print "SwiGLU"; next }
    /rmsnorm|rms_norm/                    { print "RMSNorm"; next }
    /rope/                                { print "RoPE"; next }
    /binary|unary|add_scalar|mul_scalar/  { print "elementwise ops"; next }
    /adamw|optim/                         { print "AdamW"; next }
    /embedding|gather/                    { print "embedding"; next }
    /rand|Normal|ziggurat|Ziggurat/       { print "model initialisation (random weights)"; next }
    /autograd|backward_with|topological/  { print "autograd bookkeeping"; next }
    /memmove|memcpy|memset/               { print "memmove / memset (copies)"; next }
    /malloc|free|sysmalloc|_int_|calloc|memalign|pool::/ { print "allocator and buffer pool"; next }
    /page_fault|clear_page|handle_mm|do_anonymous|alloc_pages|memcg|lru|folio|zap_|unmap/ { print "page faults (kernel)"; next }
    /schedule|finish_task_switch|futex|sched_yield|spin_unlock|try_to_wake|wake_up|irqrestore|syscall|entry_SYSCALL|pick_next|update_curr|dequeue|enqueue/ { print "thread sleep / wake (kernel)"; next }
    /rayon|crossbeam|call_mut|FnMut|FnOnce|Fn<|registry|join_context|bridge/ { print "closures and rayon (op bodies inlined into them, hand-offs)"; next }
    { print "other" }'
}

declare -A STEP CPUS THREADSHARE
for cfg in $CONFIGS; do
  case $cfg in T) reps=${REPS:-30} ;; S) reps=${REPS:-6} ;; *) reps=${REPS:-2} ;; esac
  for t in $THREADS; do
    tag="$cfg-$t"
    echo "profiling $cfg on $t thread(s), $reps steps ..." >&2
    env LEGO_BENCH=train LEGO_BENCH_CONFIGS="$cfg" LEGO_BENCH_THREADS="$t" LEGO_BENCH_REPS="$reps" \
      perf record -q -F 999 -o "$OUT/$tag.data" -- \
      perf stat -e task-clock -o "$OUT/$tag.stat" -- "$BIN" > "$OUT/$tag.bench" 2>&1
    STEP[$tag]=$(grep -o 'median_ms=[0-9.]*' "$OUT/$tag.bench" | head -1 | cut -d= -f2)
    CPUS[$tag]=$(awk '/CPUs utilized/ { for (i = 1; i <= NF; i++) if ($i == "#") print $(i + 1) }' "$OUT/$tag.stat")
    # Samples by symbol (percent, symbol), then by group.
    perf report -i "$OUT/$tag.data" --no-children --sort symbol --stdio 2>/dev/null |
      awk '/^ +[0-9.]+%/ { p = $1; sub("%", "", p); $1 = ""; $2 = ""; print p "\t" $0 }' > "$OUT/$tag.symbols"
    cut -f2 "$OUT/$tag.symbols" | group | paste <(cut -f1 "$OUT/$tag.symbols") - |
      awk -F'\t' '{ s[$2] += $1 } END { for (g in s) printf "%s\t%.1f\n", g, s[g] }' > "$OUT/$tag.groups"
    # Each thread's share of the samples (the main thread, then rayon's workers).
    THREADSHARE[$tag]=$(perf report -i "$OUT/$tag.data" --no-children --sort pid --stdio 2>/dev/null |
      awk '/^ +[0-9.]+%/ { sub("%", "", $1); printf "%s%.0f", sep, $1; sep = " / " }')
  done
  # The table: groups ordered by their share in the first thread count's run.
  first=$(echo $THREADS | cut -d' ' -f1)
  printf '\n### Config %s\n\n| group |' "$cfg"
  for t in $THREADS; do printf ' %s thread(s) |' "$t"; done
  printf '\n|---|'
  for t in $THREADS; do printf -- '---:|'; done
  printf '\n'
  sort -t$'\t' -k2 -rn "$OUT/$cfg-$first.groups" | cut -f1 | while read -r g; do
    printf '| %s |' "$g"
    for t in $THREADS; do
      v=$(awk -F'\t' -v g="$g" '$1 == g { print $2 }' "$OUT/$cfg-$t.groups")
      printf ' %s %% |' "${v:-0.0}"
    done
    printf '\n'
  done
  printf '| *step (median ms)* |'; for t in $THREADS; do printf ' %s |' "${STEP[$cfg-$t]}"; done; printf '\n'
  printf '| *CPUs busy (task-clock / wall)* |'; for t in $THREADS; do printf ' %s |' "${CPUS[$cfg-$t]}"; done; printf '\n'
  printf '| *samples per thread, %%* |'; for t in $THREADS; do printf ' %s |' "${THREADSHARE[$cfg-$t]}"; done; printf '\n'
done

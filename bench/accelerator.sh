#!/usr/bin/env bash
# Measured against planned on the attached accelerator: every case of bench/accelerator.py compiled
# in parallel processes into a persistent compilation cache (the platform allocator, so that no
# process keeps the device memory its autotuning used), then each timed alone in a fresh process
# that loads its executable from that cache, most important first.
#
#   bash bench/accelerator.sh OUT_DIR [CASE ...]     # default: the GPU cases
#   bash bench/accelerator.sh --tiny [OUT_DIR [CASE ...]]  # each case on a tiny model (a CPU runs it)
#
# Writes OUT_DIR/accelerator.jsonl (a line per case), OUT_DIR/cases.log (every case's output) and
# prints the table; with --tiny and no OUT_DIR, into a new temporary folder it names. CASE_TIMEOUT
# (s, default 420) bounds each case; PYTHON picks the interpreter; ACCEL_ARGS adds options to every
# case (--tiny adds --tiny there).
set -u
usage="usage: bash bench/accelerator.sh [--tiny] OUT_DIR [CASE ...]"
compile_first=1
if [ "${1:-}" = "--tiny" ]; then
  shift
  ACCEL_ARGS="${ACCEL_ARGS:-} --tiny"
  compile_first=0  # nothing to autotune on a tiny model: each case compiles in its own timed run
  [ $# -eq 0 ] && set -- "$(mktemp -d)"
fi
out=${1:?$usage}
shift
cases=("$@")
if [ ${#cases[@]} -eq 0 ]; then
  cases=(gpt2_124m gpt2_124m_noremat gpt2_124m_dots gpt2_124m_dots_no_batch gpt2_124m_offload gpt2_124m_fused
         gpt2_124m_fused_noremat gpt2_124m_fused_dots gpt2_124m_fp8 gpt2_124m_xla
         llama_1b_b16 llama_1b_b16_dots_no_batch llama_1b_b16_fused llama_1b_b16_fused_dots llama_1b_b16_fp8
         moe_dropless moe_dropless_dots moe_capacity moe_dense_twin long8k_cudnn long8k_xla long8k_chunked)
fi
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
logs=$(mktemp -d)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)}
for c in "${cases[@]}"; do
  : >"$logs/$c.compile.log"
  [ "$compile_first" = 1 ] || continue
  XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout "${CASE_TIMEOUT:-420}" "$py" "$here/accelerator.py" "$c" ${ACCEL_ARGS:-} \
    --compile-only >"$logs/$c.compile.log" 2>&1 &
done
wait
for c in "${cases[@]}"; do
  timeout "${CASE_TIMEOUT:-420}" "$py" "$here/accelerator.py" "$c" ${ACCEL_ARGS:-} --out "$out/accelerator.jsonl" >"$logs/$c.log" 2>&1
  echo "[$c exit $?]" >>"$logs/$c.log"
  grep -h "^$c " "$logs/$c.log"
done
for c in "${cases[@]}"; do
  echo "===== $c" >>"$out/cases.log"
  cat "$logs/$c.compile.log" "$logs/$c.log" >>"$out/cases.log"
done
"$py" - "$here" "$out/accelerator.jsonl" "$logs" "${cases[@]}" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from accelerator import HEADER, row
rows = {}
try:
    rows = {r["case"]: r for r in map(json.loads, open(sys.argv[2]))}
except FileNotFoundError:
    pass
print(HEADER)
for case in sys.argv[4:]:
    lines = Path(sys.argv[3], f"{case}.log").read_text().splitlines()
    why = next((x for x in reversed(lines) if x.startswith(f"{case}: ")), "failed: see cases.log")
    print(row(rows[case]) if case in rows else f"{case:<20}{why.removeprefix(case + ': ')}")
PY
echo "wrote $out/accelerator.jsonl and $out/cases.log"

#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what each part measures), for a machine with one GPU and torch but
# no Ray and no network. Run from anywhere; it works in the repository root.
#
# The parts run in 6 invocations, each under its own `timeout` (SIGTERM, which the script records against the
# part under way, then SIGKILL 3 s later): a hung or crashed CUDA context costs only its own group. The group
# timeouts add up to 445 s; with the environment lines and the closing summary the whole script stays under
# LIMIT = 470 s (7.8 min) whatever happens, since each group's timeout is cut to the time left. Each part also
# stops itself at its own cap inside these timeouts, and the JSON file is rewritten after every result.
# Expected on one H100: about 4 minutes.
#
# Fashion-MNIST (part 6) is read from $FASHION_ROOT (default data/fashion_mnist: an ignored folder that the device
# tool carries); without its four IDX .gz files part 6 is skipped with one line.
# Output: $OUT (the device tool's folder) or ./gpu_check_out: gpu_check.json and gpu_check.log.
# GPU_CHECK_ARGS adds arguments to every invocation: GPU_CHECK_ARGS="--device cpu --quick" runs this script's
# flow on a machine without a GPU (a dry run of the timeouts, --append and the summary).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
fashion="${FASHION_ROOT:-data/fashion_mnist}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
read -r -a extra <<< "${GPU_CHECK_ARGS:-}"
py=(python3 benchmarks/gpu_check.py --out "$out" --fashion-root "$fashion" ${extra[@]+"${extra[@]}"})
start=$(date +%s)
LIMIT=470     # seconds for the whole script
SUMMARY=10    # kept for the closing summary

group() {  # group SECONDS ARGS...: gpu_check.py ARGS under a timeout of SECONDS, or of what is left before LIMIT
  local want=$1 left
  shift
  left=$(( LIMIT - SUMMARY - 3 - ($(date +%s) - start) ))
  (( want > left )) && want=$left
  if (( want < 10 )); then
    echo "gpu_check.sh: no time left for $*"
    return
  fi
  timeout -k 3 "$want" "${py[@]}" "$@"
  echo "gpu_check.sh: exit $? after $(( $(date +%s) - start )) s ($*, timeout ${want} s)"
}

{
  echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), $(nproc) CPUs"
  timeout 5 nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm \
    --format=csv || echo "no nvidia-smi"
  timeout 10 python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available())" || echo "torch did not import"
  ls -l "$fashion" 2>/dev/null || echo "no Fashion-MNIST folder at $fashion: part 6 will be skipped"
  # The groups and their timeouts (seconds); the part caps inside are in gpu_check_parts.PARTS.
  group 85 --parts 1 2 3              # environment 10 + portability 30 + sync audit 30
  group 85 --append --parts 4         # graphs 70
  group 70 --append --parts 5         # shard loop 55
  group 75 --append --parts 6         # Fashion-MNIST 60
  group 85 --append --parts 7         # processes 70
  group 45 --append --parts 8         # vmap 30
  timeout "$SUMMARY" "${py[@]}" --summary   # every result line again, at the end of the output
  echo "gpu_check.sh: done in $(( $(date +%s) - start )) s"
} 2>&1 | tee "$out/gpu_check.log"

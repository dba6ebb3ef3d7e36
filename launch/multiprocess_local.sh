#!/usr/bin/env bash
# N processes of `asft train` on this machine, joined like the hosts of a pod, over CPU devices.
#
#   launch/multiprocess_local.sh N CONFIG.yaml [key=value ...]
#
# Each process gets ASFT_COORDINATOR_ADDRESS (localhost:$PORT), ASFT_NUM_PROCESSES=N,
# ASFT_PROCESS_ID=i, JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES, and the same arguments; process i
# writes its output to $LOG_DIR/process_i.log. When any process fails, the others are stopped and
# the script exits with that status.
#
# Variables:
#   PORT             coordinator port (default 12321)
#   DEVICES          CPU devices per process (default 2)
#   LOG_DIR          where the per-process logs go (default: a new temporary folder, printed)
#   PYTHON           interpreter (default python)
#   DRY_RUN=1        print the commands instead of running them
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
n=$1
shift
port=${PORT:-12321}
devices=${DEVICES:-2}
python=${PYTHON:-python}
log_dir=${LOG_DIR:-}

if [[ ${DRY_RUN:-0} == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    echo "ASFT_COORDINATOR_ADDRESS=localhost:$port ASFT_NUM_PROCESSES=$n ASFT_PROCESS_ID=$i JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices $python -m asft_jax train $*"
  done
  exit 0
fi

log_dir=${log_dir:-$(mktemp -d -t asft-multiprocess-XXXXXX)}
mkdir -p "$log_dir"
echo "logs: $log_dir/process_*.log" >&2
pids=()
for ((i = 0; i < n; i++)); do
  ASFT_COORDINATOR_ADDRESS=localhost:$port ASFT_NUM_PROCESSES=$n ASFT_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=$devices \
    "$python" -m asft_jax train "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

remaining=$n
while ((remaining > 0)); do
  status=0
  wait -n -p done_pid "${pids[@]}" || status=$?
  remaining=$((remaining - 1))
  if ((status != 0)); then
    for ((i = 0; i < n; i++)); do [[ ${pids[i]} == "$done_pid" ]] && failed=$i; done
    echo "asft: process ${failed:-?} of $n exited with status $status; stopping the others (see $log_dir/process_${failed:-0}.log)" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
tail -n 1 "$log_dir/process_0.log"

#!/usr/bin/env bash
# `asft train` on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...), from this checkout.
#
#   TPU_NAME=my-pod ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh CONFIG.yaml [key=value ...]
#
# 1. reuses the TPU VM named $TPU_NAME, or creates it;
# 2. copies this checkout (`git archive HEAD`, so commit first) to every worker and installs it
#    with JAX for TPU;
# 3. runs the same `python -m asft_jax train CONFIG [key=value ...]` on --worker=all (the workers
#    join through JAX's TPU cluster detection: ASFT_DISTRIBUTED=auto);
# 4. copies each worker's log to $LOG_DIR/worker_<i>.log.
# The run directory (output_dir in the config) must be a filesystem every worker mounts (NFS,
# Filestore, or a bucket through gcsfuse). Data paths must exist on every worker (or be Hub ids).
#
# Variables:
#   TPU_NAME          TPU VM name (required)
#   ZONE              zone (required)
#   ACCELERATOR_TYPE  e.g. v4-32 (needed only to create the VM)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   PROJECT           gcloud project (default: gcloud's configured one)
#   NUM_WORKERS       workers whose logs to collect (default: read from the VM; 4 in a dry run)
#   REMOTE_DIR        code folder on the workers (default asft-jax)
#   LOG_DIR           local folder for the logs (default tpu_logs/$TPU_NAME)
#   DRY_RUN=1         print the commands instead of running them
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... ZONE=... [ACCELERATOR_TYPE=...] $0 CONFIG.yaml [key=value ...]" >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=${REMOTE_DIR:-asft-jax}
log_dir=${LOG_DIR:-tpu_logs/$TPU_NAME}
dry=${DRY_RUN:-0}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
[[ -n ${PROJECT:-} ]] && where+=(--project "$PROJECT")

run() {  # prints the command in a dry run, runs it otherwise
  if [[ $dry == 1 ]]; then
    local line
    line=$(printf '%q ' "$@")
    echo "${line% }"
  else
    "$@"
  fi
}

train_args=$(printf '%q ' "$@")
train_args=${train_args% }
remote="set -e; mkdir -p $remote_dir && tar -xzf asft-jax.tar.gz -C $remote_dir && cd $remote_dir \
&& python3 -m pip install -q -e . 'jax[tpu]' \
&& ASFT_DISTRIBUTED=auto python3 -m asft_jax train $train_args > ~/asft_train.log 2>&1"

if [[ $dry == 1 ]] || ! "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  run "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE to create the VM}" --version "$runtime"
fi
archive=$(mktemp -t asft-jax-XXXXXX.tar.gz)
trap 'rm -f "$archive"' EXIT
run git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:asft-jax.tar.gz" "${where[@]}" --worker=all
status=0
run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$remote" || status=$?

if [[ $dry == 1 ]]; then
  workers=${NUM_WORKERS:-4}
else
  workers=${NUM_WORKERS:-$("${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(networkEndpoints.len())')}
fi
run mkdir -p "$log_dir"
for ((i = 0; i < workers; i++)); do
  run "${gcloud_tpu[@]}" scp "$TPU_NAME:asft_train.log" "$log_dir/worker_$i.log" "${where[@]}" --worker="$i" || true
done
[[ $dry == 1 ]] || echo "logs: $log_dir/worker_*.log (exit status $status)" >&2
exit "$status"

#!/bin/sh
# Entrypoint of the pagedserve images: the server's (or the router's) flags from the environment,
# so one image serves every region and Kubernetes sets a model by environment, not by command line.
#
#   PAGEDSERVE_COMMAND            serve (default) | router | model (then "$@" is passed as is)
#   PAGEDSERVE_MODEL              --model: a directory, hub id or fsspec URL (s3://bucket/prefix)
#   PAGEDSERVE_MODEL_PUBLIC_KEY   --model-public-key: the Ed25519 key file the manifest must verify with
#   PAGEDSERVE_SERVED_MODEL_NAME  --served-model-name
#   PAGEDSERVE_HOST / _PORT       --host (default 0.0.0.0) / --port (default 8000)
#   PAGEDSERVE_MAX_MODEL_LEN      --max-model-len
#   PAGEDSERVE_GPU_MEMORY_UTILIZATION  --gpu-memory-utilization
#   PAGEDSERVE_TENSOR_PARALLEL_SIZE    --tensor-parallel-size
#   PAGEDSERVE_DEVICE             --device (auto|cpu|cuda)
#   PAGEDSERVE_API_KEY_FILE       --api-key-file (PAGEDSERVE_API_KEYS is read by the server itself)
#   PAGEDSERVE_SHUTDOWN_TIMEOUT   --shutdown-timeout (keep it below terminationGracePeriodSeconds)
#   PAGEDSERVE_ROUTER_CONFIG      router: --config (default /etc/pagedserve/router.yaml)
#   PAGEDSERVE_EXTRA_ARGS         more flags, split on whitespace
# Arguments given to the container come last and win over the environment.
set -eu

cmd="${PAGEDSERVE_COMMAND:-serve}"
# The Secret shipped in deploy/k8s holds a placeholder: never serve with it.
keys="${PAGEDSERVE_API_KEY_FILE:-}"
if [ -n "$keys" ] && grep -q 'REPLACE_ME' "$keys"; then
  echo "entrypoint: $keys still holds the placeholder key; write the real keys (docs/runbooks/rotate-api-keys.md)" >&2
  exit 1
fi
case "$cmd" in
  model)
    exec pagedserve model "$@"
    ;;
  router)
    set -- --config "${PAGEDSERVE_ROUTER_CONFIG:-/etc/pagedserve/router.yaml}" \
      --host "${PAGEDSERVE_HOST:-0.0.0.0}" --port "${PAGEDSERVE_PORT:-9000}" "$@"
    # shellcheck disable=SC2086  # split on purpose: a list of flags
    exec pagedserve router ${PAGEDSERVE_EXTRA_ARGS:-} "$@"
    ;;
  serve) ;;
  *)
    echo "entrypoint: PAGEDSERVE_COMMAND must be serve, router or model, got '$cmd'" >&2
    exit 2
    ;;
esac

# Each optional flag only when its variable is set; the container arguments ("$@") come last.
set -- --host "${PAGEDSERVE_HOST:-0.0.0.0}" --port "${PAGEDSERVE_PORT:-8000}" "$@"
add() {  # add FLAG VALUE: only when VALUE is set and not empty
  if [ -n "$2" ]; then
    extra="$extra $1 $2"
  fi
}
extra=""
add --model "${PAGEDSERVE_MODEL:-}"
add --model-public-key "${PAGEDSERVE_MODEL_PUBLIC_KEY:-}"
add --served-model-name "${PAGEDSERVE_SERVED_MODEL_NAME:-}"
add --max-model-len "${PAGEDSERVE_MAX_MODEL_LEN:-}"
add --gpu-memory-utilization "${PAGEDSERVE_GPU_MEMORY_UTILIZATION:-}"
add --tensor-parallel-size "${PAGEDSERVE_TENSOR_PARALLEL_SIZE:-}"
add --device "${PAGEDSERVE_DEVICE:-}"
add --api-key-file "${PAGEDSERVE_API_KEY_FILE:-}"
add --shutdown-timeout "${PAGEDSERVE_SHUTDOWN_TIMEOUT:-}"
# Values above are paths, URLs, names and numbers (no spaces): word splitting is safe and intended.
# shellcheck disable=SC2086
exec pagedserve serve $extra ${PAGEDSERVE_EXTRA_ARGS:-} "$@"

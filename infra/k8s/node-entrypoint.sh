#!/bin/sh
# One pod of the multi-node Indexed Job (infra/k8s/multi-node-job-template.json), called as
#   node-entrypoint.sh --nodes=N --rdzv-port=P -- <the worker's flow-run command>
# Every pod gets the same launch layout through the environment (the `launch` section's GRPO_LAUNCH_* variables),
# with the rendezvous at pod 0 (<job name>-0.grpo-nodes, the headless Service of rendezvous-service.yaml); pod 0
# runs the flow run, the others join its training stages with `grpo node` until the flow releases them (or the
# Job ends them when pod 0 ends).
set -eu
nodes="" port=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes="${1#--nodes=}" ;;
    --rdzv-port=*) port="${1#--rdzv-port=}" ;;
    --) shift; break ;;
    *) echo "node-entrypoint.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
: "${nodes:?--nodes=N is required}" "${port:?--rdzv-port=P is required}"
: "${JOB_NAME:?set from the job-name label}" "${JOB_COMPLETION_INDEX:?set by an Indexed Job}"
export GRPO_LAUNCH_NODES="${nodes}"
export GRPO_LAUNCH_RDZV_ID="${JOB_NAME}"
if [ "${JOB_COMPLETION_INDEX}" = "0" ]; then
  # pod 0 hosts the rendezvous: "localhost" makes its launcher the host even before its DNS name resolves
  export GRPO_LAUNCH_RDZV_ENDPOINT="localhost:${port}"
  exec "$@"
fi
export GRPO_LAUNCH_RDZV_ENDPOINT="${JOB_NAME}-0.grpo-nodes:${port}"
exec grpo node

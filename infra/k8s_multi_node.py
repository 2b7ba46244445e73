"""The multi-node GPU work pool's base job template, derived from the one-node template: one flow run as an Indexed
Job of `nodes` pods, `gpu_count` GPUs each.

    python -m infra.k8s_multi_node           # write infra/k8s/multi-node-job-template.json
    python -m infra.k8s_multi_node --check   # exit 1 when the committed file is out of date

What it adds to infra/k8s/base-job-template.json (everything else, and each variable, is that file's):
* `completionMode: Indexed`, completions = parallelism = `nodes`; pod i's hostname is `<job name>-i`.
* `subdomain: grpo-nodes`: with the headless Service of infra/k8s/rendezvous-service.yaml, pod 0 is reachable at
  `<job name>-0.grpo-nodes:<rdzv_port>`, where every node's launcher meets (torch's c10d rendezvous).
* The container runs infra/k8s/node-entrypoint.sh (before the worker's command): it sets GRPO_LAUNCH_NODES,
  _RDZV_ENDPOINT and _RDZV_ID (the `launch` section, from the environment) from the job's name and index; pod 0
  runs the flow run (the worker's command), the others `grpo node`, joining each training stage until the flow
  releases them.
* `successPolicy`: the Job succeeds when pod 0 (the flow run) does; any pod's failure fails it (backoff 0:
  retries are Prefect's, and a retried stage rendezvouses again).
* The project's data, models and reports on a ReadWriteMany volume (`shared_volume_claim`) at /shared, the same
  path on every node: global rank 0 writes the outputs, every rank reads the inputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

K8S = Path(__file__).resolve().parent / "k8s"
BASE = K8S / "base-job-template.json"
TEMPLATE = K8S / "multi-node-job-template.json"
SERVICE = "grpo-nodes"  # infra/k8s/rendezvous-service.yaml
NODE_LABEL = {"app.kubernetes.io/component": "grpo-node"}
SHARED = "/shared"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by Kubernetes on a Job's pods
ENTRYPOINT = "infra/k8s/node-entrypoint.sh"  # relative to the image's working directory, the project

VARIABLES: dict[str, dict[str, Any]] = {
    "nodes": {"title": "Nodes", "description": "Pods (nodes) of the run, gpu_count GPUs each: pod 0 runs the flow, "
              "the others `grpo node`.", "type": "integer", "minimum": 1, "default": 2},
    "rdzv_port": {"title": "Rendezvous Port", "description": "Port of pod 0 where the nodes' launchers meet (c10d).",
                  "type": "integer", "minimum": 1, "maximum": 65535, "default": 29400},
    "shared_volume_claim": {"title": "Shared Volume Claim", "description": "A ReadWriteMany PersistentVolumeClaim "
                            "mounted at /shared on every pod: set paths.data_dir, models_dir and reports_dir under it.",
                            "type": "string", "default": "grpo-shared"},
}


def template(base: dict[str, Any]) -> dict[str, Any]:
    """The multi-node template from the one-node one (see the module docstring)."""
    out = copy.deepcopy(base)
    out["variables"]["title"] = "GRPO multi-node GPU Kubernetes job"
    out["variables"]["description"] = (
        "Job variables of the grpo-k8s-gpu-multinode work pool: the grpo-k8s-gpu pool's, plus nodes, rdzv_port "
        "and shared_volume_claim. One flow run is an Indexed Job of `nodes` pods with gpu_count GPUs each "
        "(infra/README.md, section 7).")
    out["variables"]["properties"].update(copy.deepcopy(VARIABLES))
    job = out["job_configuration"]["job_manifest"]
    spec = job["spec"]
    spec.update({"completionMode": "Indexed", "completions": "{{ nodes }}", "parallelism": "{{ nodes }}",
                 "successPolicy": {"rules": [{"succeededIndexes": "0"}]}})
    pod = spec["template"]
    pod["metadata"]["labels"].update(NODE_LABEL)
    pod["spec"]["subdomain"] = SERVICE
    (container,) = pod["spec"]["containers"]
    # the variables inside longer strings: rendered as text (a lone placeholder keeps the variable's type, and
    # Kubernetes takes only strings in env values and arguments)
    container["command"] = ["/bin/sh", ENTRYPOINT, "--nodes={{ nodes }}", "--rdzv-port={{ rdzv_port }}", "--"]
    container["env"] = [  # the worker puts the `env` variable's entries before this one
        {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"}}},
    ]
    container["ports"] = [{"name": "rendezvous", "containerPort": "{{ rdzv_port }}"}]
    container["volumeMounts"].append({"name": "shared", "mountPath": SHARED})
    claim = {"claimName": "{{ shared_volume_claim }}"}
    pod["spec"]["volumes"].append({"name": "shared", "persistentVolumeClaim": claim})
    return out


def render() -> str:
    return json.dumps(template(json.loads(BASE.read_text(encoding="utf-8"))), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the committed template is out of date")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = TEMPLATE.is_file() and TEMPLATE.read_text(encoding="utf-8") == text
        print(f"{TEMPLATE} {'is up to date' if current else 'is out of date: run python -m infra.k8s_multi_node'}")
        return 0 if current else 1
    TEMPLATE.write_text(text, encoding="utf-8")
    print(f"{TEMPLATE} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())

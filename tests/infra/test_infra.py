"""Offline checks of the deployment files: prefect.yaml and everything under infra/.

Each file is checked with the tool that will consume it wherever that tool is importable here: Prefect's
own prefect.yaml model, schedule builder, templating, pull-step runner and job-configuration renderer;
Prefect's server-side base-job-template and job-variable validation; accelerate's config loader and
`accelerate launch` argument handling; `docker compose config` when a compose CLI exists. No network, no
server, no GPU; the one real multi-process launch is marked slow.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
PREFECT_YAML = ROOT / "prefect.yaml"
K8S_TEMPLATE = INFRA / "k8s" / "base-job-template.json"
ACCEL = INFRA / "accelerate"
DOCKER = INFRA / "docker"
COMPOSE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"

DEPLOYMENTS = {"nightly-retrain", "on-demand", "gpu-retrain", "gpu-retrain-multinode"}
PROCESS_POOL, K8S_POOL, K8S_MULTI_POOL = "grpo-process", "grpo-k8s-gpu", "grpo-k8s-gpu-multinode"
K8S_MULTI_TEMPLATE = INFRA / "k8s" / "multi-node-job-template.json"
KUBERNETES_VERSION = "1.33"  # the oldest release where an Indexed Job's successPolicy is stable


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _pyproject_pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d.split("==", 1)[1] for d in deps if d.split("==", 1)[0] == name)


# --------------------------------------------------------------------------------------------- parsing

STRUCTURED = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml"), *INFRA.rglob("*.json"), PREFECT_YAML])


def test_infra_files_exist():
    expected = [
        PREFECT_YAML, K8S_TEMPLATE, COMPOSE, ENV_EXAMPLE, DOCKER / "Dockerfile.gpu", INFRA / "README.md",
        *(ACCEL / f"{n}.yaml" for n in ("single_gpu", "ddp_multi_gpu", "fsdp", "deepspeed_zero2", "multi_node",
                                         "cpu_2proc")),
    ]
    missing = [_rel(p) for p in expected if not p.is_file()]
    assert not missing, f"missing: {missing}"


@pytest.mark.parametrize("path", STRUCTURED, ids=_rel)
def test_yaml_and_json_files_parse(path):
    doc = json.loads(path.read_text()) if path.suffix == ".json" else _load_yaml(path)
    assert isinstance(doc, dict) and doc, f"{_rel(path)} is not a non-empty mapping"


# ------------------------------------------------------------------------------------------ prefect.yaml


@pytest.fixture(scope="module")
def prefect_doc() -> dict[str, Any]:
    return _load_yaml(PREFECT_YAML)


@pytest.fixture(scope="module")
def deployments(prefect_doc) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in prefect_doc["deployments"]}


def test_prefect_yaml_validates_with_prefects_own_model(prefect_doc):
    """The pydantic model `prefect deploy` parses prefect.yaml with (it skips the file on errors)."""
    models = pytest.importorskip("prefect.cli.deploy._models", reason="Prefect's prefect.yaml model moved")
    model = models.PrefectYamlModel.model_validate(prefect_doc)
    assert {d.name for d in model.deployments} == DEPLOYMENTS
    assert model.prefect_version == _pyproject_pin("prefect")
    for d in model.deployments:
        assert d.work_pool is not None and d.work_pool.name
        assert d.enforce_parameter_schema is True


def test_deployment_names_and_pools(deployments):
    assert set(deployments) == DEPLOYMENTS
    assert deployments["nightly-retrain"]["work_pool"]["name"] == PROCESS_POOL
    assert deployments["on-demand"]["work_pool"]["name"] == PROCESS_POOL
    assert deployments["gpu-retrain"]["work_pool"]["name"] == K8S_POOL
    assert deployments["gpu-retrain-multinode"]["work_pool"]["name"] == K8S_MULTI_POOL


def _flow_function(path: Path, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    return None


def _is_flow_decorator(dec: ast.expr) -> bool:
    target = dec.func if isinstance(dec, ast.Call) else dec
    return (isinstance(target, ast.Name) and target.id == "flow") or (
        isinstance(target, ast.Attribute) and target.attr == "flow")


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_is_a_flow_and_parameters_fit_its_signature(deployments, name):
    """The entrypoint file exists, defines a @flow function, and the parameters pass the schema Prefect
    derives from that function (what the server enforces with enforce_parameter_schema)."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint
    from prefect.utilities.schema_tools import validate

    dep = deployments[name]
    file, func = dep["entrypoint"].rsplit(":", 1)
    path = ROOT / file
    assert path.is_file(), f"{name}: entrypoint file {file} does not exist"
    fn = _flow_function(path, func)
    assert fn is not None, f"{name}: {file} defines no function {func}"
    assert any(_is_flow_decorator(d) for d in fn.decorator_list), f"{func} is not decorated with @flow"

    cwd = os.getcwd()
    os.chdir(ROOT)  # Prefect resolves file entrypoints against the working directory, as the worker does
    try:
        schema = parameter_schema_from_entrypoint(dep["entrypoint"]).model_dump_for_openapi()
    finally:
        os.chdir(cwd)
    params = dep.get("parameters") or {}
    unknown = set(params) - set(schema["properties"])
    assert not unknown, f"{name}: parameters {unknown} are not arguments of {func}"
    validate(params, schema, raise_on_error=True, preprocess=True, ignore_required=False)


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_overrides_are_valid_pipeline_settings(deployments, name):
    """The pipeline's own config loader accepts params_path + overrides (a typo would fail every run)."""
    from grpo_steps.platform.config import load_config

    params = deployments[name]["parameters"]
    cfg = load_config(ROOT / params["params_path"], params.get("overrides") or [])
    assert cfg.tracking.tracking_uri.startswith(("http://", "https://")), "deployments should log to a server"
    # grpo_steps.platform.tracking treats a location without '://' as a local path.
    assert "://" in cfg.tracking.artifact_location


def test_nightly_schedule_is_a_valid_utc_cron(deployments):
    from cronsim import CronSim

    (sched,) = deployments["nightly-retrain"]["schedules"]
    assert sched["timezone"] == "UTC" and sched.get("active", True) is True
    fires = CronSim(sched["cron"], datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    assert next(fires) == datetime(2026, 1, 2, 2, 0, tzinfo=UTC)
    assert next(fires) == datetime(2026, 1, 3, 2, 0, tzinfo=UTC)

    # The same conversion `prefect deploy` applies to each schedule entry.
    sched_mod = pytest.importorskip("prefect.cli.deploy._schedules")
    built = sched_mod._schedule_config_to_deployment_schedule(sched)
    assert built["schedule"].cron == sched["cron"] and built["schedule"].timezone == "UTC"


def test_only_the_nightly_deployment_is_scheduled(deployments):
    assert not deployments["on-demand"].get("schedules")
    assert not deployments["gpu-retrain"].get("schedules")
    assert not deployments["gpu-retrain-multinode"].get("schedules")


def _pull_steps(prefect_doc, dep) -> list[dict[str, Any]]:
    return dep["pull"] if "pull" in dep else prefect_doc["pull"]


def test_pull_step_keeps_env_placeholder_at_deploy_time_and_resolves_on_the_worker(
        prefect_doc, deployments, monkeypatch, tmp_path):
    """Deploy time (`prefect deploy`, variable unset): the `{{ $GRPO_PROJECT_DIR }}` placeholder is stored
    as is. Run time: Prefect's step runner fills it from the worker's environment and changes into it."""
    from prefect.deployments.steps import core as steps_core
    from prefect.utilities.templating import PlaceholderType, apply_values, find_placeholders

    steps = _pull_steps(prefect_doc, deployments["nightly-retrain"])
    assert steps == _pull_steps(prefect_doc, deployments["on-demand"])
    (step,) = steps
    assert list(step) == ["prefect.deployments.steps.set_working_directory"]
    kinds = {p.type for p in find_placeholders(steps)}
    assert kinds == {PlaceholderType.ENV_VAR}, "only env placeholders: blocks/variables would need the API"

    monkeypatch.delenv("GRPO_PROJECT_DIR", raising=False)
    assert apply_values(steps, {}, remove_notset=False) == steps  # what `prefect deploy` stores

    async def _identity(template, client=None):
        return template

    # No block/variable placeholders (asserted above), so these API look-ups are no-ops; stub the client.
    monkeypatch.setattr(steps_core, "resolve_block_document_references", _identity)
    monkeypatch.setattr(steps_core, "resolve_variables", _identity)
    monkeypatch.delenv("PREFECT__FLOW_RUN_ID", raising=False)
    monkeypatch.setenv("GRPO_PROJECT_DIR", str(tmp_path))
    monkeypatch.chdir(ROOT)  # restored after the test
    out = asyncio.run(steps_core.run_steps(copy.deepcopy(steps), print_function=lambda *a, **k: None))
    assert Path(os.getcwd()).resolve() == tmp_path.resolve()
    assert Path(out["directory"]).resolve() == tmp_path.resolve()


@pytest.mark.parametrize("name", ["gpu-retrain", "gpu-retrain-multinode"])
def test_gpu_deployment_pulls_into_the_image_project_dir(prefect_doc, deployments, name):
    (step,) = _pull_steps(prefect_doc, deployments[name])
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    dockerfile = (DOCKER / "Dockerfile.gpu").read_text()
    assert re.search(rf"^WORKDIR {re.escape(directory)}$", dockerfile, re.M)
    assert f"GRPO_PROJECT_DIR={directory}" in dockerfile


def test_process_deployments_job_variables_fit_prefects_process_pool_schema(deployments):
    """Validated against the default process-pool template Prefect ships (what `work-pool create` uses)."""
    from prefect.utilities.schema_tools import validate

    spec = importlib.util.find_spec("prefect")
    meta = Path(spec.origin).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    if not meta.is_file():
        pytest.skip("this Prefect ships no worker metadata")
    schema = json.loads(meta.read_text())["prefect"]["process"]["default_base_job_configuration"]["variables"]
    for name in ("nightly-retrain", "on-demand"):
        job_vars = deployments[name]["work_pool"].get("job_variables") or {}
        validate(job_vars, schema, raise_on_error=True, preprocess=True, ignore_required=True)


# ------------------------------------------------------------------------------ k8s base job template


@pytest.fixture(scope="module")
def k8s_template() -> dict[str, Any]:
    return json.loads(K8S_TEMPLATE.read_text())


def test_k8s_template_variables_is_a_valid_json_schema(k8s_template):
    variables = k8s_template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    jsonschema.Draft202012Validator.check_schema(variables)
    gpu = variables["properties"]["gpu_count"]
    assert gpu["type"] == "integer" and gpu["default"] == 1
    for var in ("image", "namespace", "env", "cpu_request", "memory_request", "node_selector", "tolerations"):
        assert var in variables["properties"], var
    # every default satisfies its own schema (checked by Prefect when the pool is created, too)
    for name, prop in variables["properties"].items():
        if "default" in prop:
            jsonschema.Draft7Validator(variables).validate({name: prop["default"]})


def test_k8s_template_passes_prefect_server_validation(k8s_template):
    """What the Prefect API runs on `prefect work-pool create --base-job-template`: every placeholder is a
    declared variable, the schema is valid, and each default passes it."""
    from prefect.utilities.schema_tools import is_valid_schema, validate

    try:
        from prefect.server.schemas.actions import validate_base_job_template
    except ImportError:  # pragma: no cover - moved in another Prefect version
        pytest.skip("prefect.server.schemas.actions.validate_base_job_template not importable")
    validate_base_job_template(k8s_template)
    variables = k8s_template["variables"]
    is_valid_schema(variables, preprocess=False)
    defaults = {k: p["default"] for k, p in variables["properties"].items() if "default" in p}
    validate(defaults, variables, raise_on_error=True, preprocess=False, ignore_required=True,
             allow_none_with_default=False)


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_template_uses_gpu_count_for_the_gpu_limit(k8s_template):
    manifest = k8s_template["job_configuration"]["job_manifest"]
    limits = _container(manifest)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "{{ gpu_count }}"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == "{{ node_selector }}" and pod["tolerations"] == "{{ tolerations }}"
    assert _container(manifest)["image"] == "{{ image }}"


def _render(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Render like the Kubernetes worker: Prefect's BaseJobConfiguration.from_template_and_values with a
    configuration class carrying the Kubernetes fields (prefect-kubernetes is not installed here)."""
    from prefect.workers.base import BaseJobConfiguration

    class K8sJobConfiguration(BaseJobConfiguration):
        namespace: str = "default"
        job_manifest: dict[str, Any]
        cluster_config: Any = None
        job_watch_timeout_seconds: int | None = None
        pod_watch_timeout_seconds: int = 60
        stream_output: bool = True

    class _NoClient:  # nothing in the template needs the API (no block/variable placeholders)
        pass

    cfg = asyncio.run(K8sJobConfiguration.from_template_and_values(template, values, client=_NoClient()))
    return cfg.model_dump()


def test_gpu_deployment_job_variables_validate_and_render(k8s_template, deployments, monkeypatch):
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    monkeypatch.setenv("GRPO_IMAGE", "registry.example.com/grpo-pipeline:test")
    # deploy-time templating, as `prefect deploy` does with the environment
    job_vars = apply_values(deployments["gpu-retrain"]["work_pool"]["job_variables"], os.environ,
                            remove_notset=False)
    assert job_vars["image"] == "registry.example.com/grpo-pipeline:test"
    assert isinstance(job_vars["gpu_count"], int) and job_vars["gpu_count"] >= 1
    validate(job_vars, k8s_template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)

    rendered = _render(k8s_template, job_vars)
    manifest = rendered["job_manifest"]
    container = _container(manifest)
    assert container["image"] == "registry.example.com/grpo-pipeline:test"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == job_vars["gpu_count"]
    assert container["resources"]["requests"] == {"cpu": job_vars["cpu_request"],
                                                  "memory": job_vars["memory_request"]}
    assert "cpu" not in container["resources"]["limits"], "an unset variable drops its key"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert rendered["namespace"] == manifest["metadata"]["namespace"] == "grpo"

    # a flow-run override of the GPU count reaches the limit as an integer
    more = _render(k8s_template, {**job_vars, "gpu_count": 4})
    assert _container(more["job_manifest"])["resources"]["limits"]["nvidia.com/gpu"] == 4
    with pytest.raises(Exception, match="gpu_count|-1"):
        validate({"gpu_count": -1}, k8s_template["variables"], raise_on_error=True, ignore_required=True)


# ------------------------------------------------------------------ k8s multi-node template (Indexed Job)


@pytest.fixture(scope="module")
def k8s_multi_template() -> dict[str, Any]:
    return json.loads(K8S_MULTI_TEMPLATE.read_text())


def test_multi_node_template_is_current_with_the_base_template():
    from infra import k8s_multi_node

    assert k8s_multi_node.main(["--check"]) == 0, "run python -m infra.k8s_multi_node"


def test_multi_node_template_passes_prefect_server_validation(k8s_multi_template):
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import validate

    validate_base_job_template(k8s_multi_template)
    variables = k8s_multi_template["variables"]
    jsonschema.Draft202012Validator.check_schema(variables)
    defaults = {k: p["default"] for k, p in variables["properties"].items() if "default" in p}
    validate(defaults, variables, raise_on_error=True, preprocess=False, ignore_required=True)
    with pytest.raises(Exception, match="nodes|0"):
        validate({"nodes": 0}, variables, raise_on_error=True, ignore_required=True)


def _as_the_worker_submits(rendered: dict[str, Any], command: str) -> dict[str, Any]:
    """What the Kubernetes worker does to the rendered manifest before it creates the Job: the flow-run command
    as the container's args, the `env` variable's entries before the template's, a name for the Job."""
    import shlex

    job = copy.deepcopy(rendered["job_manifest"])
    container = _container(job)
    container["args"] = shlex.split(command)
    own = container.get("env")  # the template's list, or the `{{ env }}` placeholder the worker replaces
    container["env"] = [*({"name": k, "value": v} for k, v in rendered["env"].items()),
                        *(own if isinstance(own, list) else [])]
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x7k2p"
    job["metadata"]["labels"] = {k: str(v) for k, v in (job["metadata"].get("labels") or {}).items()}
    return job


def test_multi_node_job_renders_to_a_valid_indexed_job_with_its_rendezvous(k8s_multi_template, deployments,
                                                                           monkeypatch):
    """Rendered with the deployment's job variables (as the worker renders them), the manifest is a valid batch/v1
    Job by the Kubernetes object schema: one pod per node, gpu_count GPUs each, pod 0 reachable through the
    headless Service, the shared volume on every pod."""
    import kubernetes_validate
    from prefect.utilities.schema_tools import validate
    from prefect.utilities.templating import apply_values

    monkeypatch.setenv("GRPO_IMAGE", "registry.example.com/grpo-pipeline:test")
    dep = deployments["gpu-retrain-multinode"]
    job_vars = apply_values(dep["work_pool"]["job_variables"], os.environ, remove_notset=False)
    validate(job_vars, k8s_multi_template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
    job = _as_the_worker_submits(_render(k8s_multi_template, {**job_vars, "nodes": 3}),
                                 "prefect flow-run execute")
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)

    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]} and spec["backoffLimit"] == 0
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "grpo-nodes"
    container = _container(job)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == job_vars["gpu_count"] == 8
    assert container["command"] == ["/bin/sh", "infra/k8s/node-entrypoint.sh", "--nodes=3", "--rdzv-port=29400",
                                    "--"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "grpo-shared"}} in pod["volumes"]

    service = _load_yaml(INFRA / "k8s" / "rendezvous-service.yaml")
    kubernetes_validate.validate(service, KUBERNETES_VERSION, strict=True)
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == pod["subdomain"]
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    # the deployment keeps the project's data, models and reports on the shared volume
    from grpo_steps.platform.config import load_config

    cfg = load_config(ROOT / "params.yaml", dep["parameters"]["overrides"])
    assert all(p.startswith("/shared/") for p in (cfg.paths.data_dir, cfg.paths.models_dir, cfg.paths.reports_dir))


def test_one_node_job_renders_to_a_valid_kubernetes_job(k8s_template, deployments, monkeypatch):
    import kubernetes_validate
    from prefect.utilities.templating import apply_values

    monkeypatch.setenv("GRPO_IMAGE", "registry.example.com/grpo-pipeline:test")
    job_vars = apply_values(deployments["gpu-retrain"]["work_pool"]["job_variables"], os.environ, remove_notset=False)
    job = _as_the_worker_submits(_render(k8s_template, job_vars), "prefect flow-run execute")
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def _entrypoint(tmp_path: Path, index: str, *args: str) -> subprocess.CompletedProcess:
    """infra/k8s/node-entrypoint.sh as a pod runs it, with `grpo` on PATH recording how it was called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "grpo").write_text("#!/bin/sh\necho \"grpo $*\"; env | grep ^GRPO_LAUNCH_ | sort\n")
    (bin_dir / "grpo").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "JOB_NAME": "grpo-pipeline-x7k2p", "JOB_COMPLETION_INDEX": index}
    return subprocess.run(["/bin/sh", str(INFRA / "k8s" / "node-entrypoint.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_node_entrypoint_runs_the_flow_on_pod_0_and_grpo_node_on_the_others(tmp_path, monkeypatch):
    launch = ["--nodes=3", "--rdzv-port=29400", "--"]
    lead = _entrypoint(tmp_path, "0", *launch, "sh", "-c", "echo flow-run; env | grep ^GRPO_LAUNCH_ | sort")
    other = _entrypoint(tmp_path, "2", *launch, "prefect", "flow-run", "execute")
    assert lead.returncode == other.returncode == 0, lead.stderr + other.stderr
    layout = ["GRPO_LAUNCH_NODES=3", "GRPO_LAUNCH_RDZV_ENDPOINT=grpo-pipeline-x7k2p-0.grpo-nodes:29400",
              "GRPO_LAUNCH_RDZV_ID=grpo-pipeline-x7k2p"]
    # pod 0 hosts the rendezvous (localhost: its launcher binds the store whether or not its name resolves yet)
    assert lead.stdout.split() == ["flow-run", layout[0], "GRPO_LAUNCH_RDZV_ENDPOINT=localhost:29400", layout[2]]
    assert other.stdout.splitlines() == ["grpo node", *layout]
    assert _entrypoint(tmp_path, "1", "--", "true").returncode != 0  # no layout given: refused

    # what every pod's `grpo` then reads: the launch section from those variables
    from grpo_steps.platform.config import load_config

    for line in layout:
        key, value = line.split("=", 1)
        monkeypatch.setenv(key, value)
    cfg = load_config(ROOT / "params.yaml")
    assert (cfg.launch.nodes, cfg.launch.rdzv_endpoint, cfg.launch.rdzv_id) == (
        3, "grpo-pipeline-x7k2p-0.grpo-nodes:29400", "grpo-pipeline-x7k2p")


# ------------------------------------------------------------------------------------- accelerate

ACCEL_EXPECTED = {
    # file: (distributed_type, num_processes, num_machines, use_cpu)
    "single_gpu": ("NO", 1, 1, False),
    "ddp_multi_gpu": ("MULTI_GPU", 8, 1, False),
    "fsdp": ("FSDP", 8, 1, False),
    "deepspeed_zero2": ("DEEPSPEED", 8, 1, False),
    "multi_node": ("MULTI_GPU", 16, 2, False),
    # MULTI_GPU selects accelerate's torchrun launcher; with no CUDA the processes run MULTI_CPU on gloo.
    "cpu_2proc": ("MULTI_GPU", 2, 1, True),
}


@pytest.mark.parametrize("name", sorted(ACCEL_EXPECTED))
def test_accelerate_config_loads_with_accelerates_loader(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    dist, nproc, nmachines, use_cpu = ACCEL_EXPECTED[name]
    cfg = load_config_from_file(str(ACCEL / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == dist
    assert (cfg.num_processes, cfg.num_machines, cfg.use_cpu) == (nproc, nmachines, use_cpu)
    if not use_cpu:
        assert cfg.mixed_precision in ("bf16", "fp16", "no")


def _launch_args(name: str, *extra: str):
    """`accelerate launch` argument handling up to (not including) starting processes."""
    launch = pytest.importorskip("accelerate.commands.launch")
    if not hasattr(launch, "_validate_launch_command"):
        pytest.skip("accelerate.commands.launch._validate_launch_command not available")
    args = launch.launch_command_parser().parse_args(
        ["--config_file", str(ACCEL / f"{name}.yaml"), *extra, "-m", "grpo_steps.cli", "grpo"])
    args, _defaults, _mp = launch._validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", ["single_gpu", "ddp_multi_gpu", "cpu_2proc"])
def test_accelerate_launch_accepts_config(name):
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    args = _launch_args(name)
    if name == "single_gpu":
        assert not args.multi_gpu
        cmd, env = prepare_simple_launcher_cmd_env(args)
        assert cmd[-3:] == ["-m", "grpo_steps.cli", "grpo"] or cmd[-2:] == ["grpo_steps.cli", "grpo"]
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    else:
        assert args.multi_gpu, "must take the torchrun launcher to start several processes"
        env = prepare_multi_gpu_env(args)
        assert int(args.nproc_per_node) == ACCEL_EXPECTED[name][1]
        if name == "cpu_2proc":
            assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_fsdp_config_is_fsdp2_with_transformer_wrap_and_the_grpo_stage_shards_under_it(monkeypatch):
    from accelerate.utils.launch import prepare_multi_gpu_env

    from grpo_steps.platform.config import load_config
    from grpo_steps.stages.grpo import launch_sharding

    args = _launch_args("fsdp")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"].lower() == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):  # what the launched grpo stage reads
        monkeypatch.setenv(k, env[k])
    assert launch_sharding(load_config(None)).model.sharding == "fsdp2"
    wrapped = set(env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","))
    assert wrapped == {"Qwen2DecoderLayer", "LlamaDecoderLayer"}
    # the class names exist in the installed transformers (a source scan: importing the models takes seconds)
    spec = importlib.util.find_spec("transformers")
    assert spec is not None and spec.origin
    for arch, cls in (("qwen2", "Qwen2DecoderLayer"), ("llama", "LlamaDecoderLayer")):
        source = Path(spec.origin).parent / "models" / arch / f"modeling_{arch}.py"
        assert f"class {cls}(" in source.read_text(), cls


def test_deepspeed_config_zero2_with_json_file():
    args = _launch_args("deepspeed_zero2")
    assert args.use_deepspeed
    cfg = _load_yaml(ACCEL / "deepspeed_zero2.yaml")["deepspeed_config"]
    ds_path = ROOT / cfg["deepspeed_config_file"]  # relative to the repo root, where launches run
    assert ds_path.is_file()
    ds = json.loads(ds_path.read_text())
    assert ds["zero_optimization"]["stage"] == 2
    # no dataloader is prepared by the trainer, so DeepSpeed needs a concrete micro-batch size
    assert isinstance(ds["train_micro_batch_size_per_gpu"], int)
    # accelerate refuses these keys next to a deepspeed_config_file
    ignored = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
               "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
               "zero3_save_16bit_model", "mixed_precision"}
    assert not ignored & set(cfg)


def test_multi_node_placeholder_is_overridden_by_the_launch_script():
    cfg = _load_yaml(ACCEL / "multi_node.yaml")
    assert cfg["main_process_ip"].endswith(".invalid"), "placeholder must never resolve"
    args = _launch_args("multi_node", "--main_process_ip", "10.0.0.1", "--machine_rank", "1")
    assert args.multi_gpu and (args.main_process_ip, int(args.machine_rank)) == ("10.0.0.1", 1)

    script = ACCEL / "launch_multi_node.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("MAIN_PROCESS_IP", "MACHINE_RANK")}
    res = subprocess.run(["bash", str(script), "grpo"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "MAIN_PROCESS_IP" in res.stderr


_PROBE = """
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=not torch.cuda.is_available())
total = acc.reduce(torch.ones(1) * (acc.process_index + 1), reduction="sum").item()
print(f"PROBE {acc.process_index} {acc.num_processes} {acc.distributed_type.value} {total:g}", flush=True)
acc.wait_for_everyone()
# tear the group down before exit: a live gloo group can abort the interpreter's shutdown
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
def test_cpu_2proc_launches_two_gloo_processes(tmp_path):
    """A real `accelerate launch` with cpu_2proc.yaml: two ranks, all-reduce over gloo, no GPU."""
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists():
        pytest.skip("accelerate CLI not on PATH")
    exe = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    probe = tmp_path / "probe.py"
    probe.write_text(_PROBE)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([exe, "launch", "--config_file", str(ACCEL / "cpu_2proc.yaml"), str(probe)],
                         env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = sorted(re.findall(r"PROBE (\d) (\d) (\w+) (\d+)", res.stdout))  # the ranks' lines may interleave
    assert ranks == [("0", "2", "MULTI_CPU", "3"), ("1", "2", "MULTI_CPU", "3")], res.stdout + res.stderr[-2000:]


# ---------------------------------------------------------------------------------------- docker

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])((?:[^{}]|\{[^{}]*\})*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose-style interpolation (${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, $$): enough to check that
    every variable without a default is provided by .env.example."""
    if isinstance(obj, dict):
        return {k: _interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", ":?") and not value:
            value = None
        if value is not None:
            return value
        if op in (":-", "-"):
            return _interpolate(arg, env)
        raise AssertionError(f"compose variable {name} has no default and is not in .env.example ({arg})")

    return _VAR.sub(sub, obj)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _interpolate(_load_yaml(COMPOSE), _env_example())


def test_compose_has_the_expected_services(compose):
    services = compose["services"]
    assert {"postgres", "minio", "minio-init", "mlflow", "mlflow-users", "prefect-server", "worker"} <= set(services)
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        assert "image" in svc or "build" in svc, name
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_wiring(compose, prefect_doc):
    env = _env_example()
    s = compose["services"]
    mlflow_cmd, mlflow_env = " ".join(s["mlflow"]["command"]), s["mlflow"]["environment"]
    db = f"postgresql+psycopg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/"
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == db + env["MLFLOW_DB"]  # the environment, not argv
    assert mlflow_env["MLFLOW_AUTH_DATABASE_URI"] == db + env["MLFLOW_AUTH_DB"]
    assert '--artifacts-destination "s3://$MLFLOW_BUCKET"' in mlflow_cmd
    assert mlflow_env["MLFLOW_BUCKET"] == env["MLFLOW_BUCKET"]
    assert s["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow" in s["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert s["minio-init"]["environment"]["MLFLOW_BUCKET"] == env["MLFLOW_BUCKET"]
    assert 'mc mb --ignore-existing "local/$MLFLOW_BUCKET"' in " ".join(s["minio-init"]["command"])
    db_url = s["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and db_url.endswith(f"@postgres:5432/{env['PREFECT_DB']}")

    worker = s["worker"]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    assert pool == PROCESS_POOL and worker["command"][worker["command"].index("--type") + 1] == "process"
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["GRPO_PROJECT_DIR"] == "/opt/grpo"
    # the process deployments log to the compose MLflow server by its service name
    overrides = {d["name"]: d["parameters"]["overrides"] for d in prefect_doc["deployments"]}
    assert "tracking.tracking_uri=http://mlflow:5000" in overrides["nightly-retrain"]

    for name, svc in s.items():
        if "build" in svc:
            ctx = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert (ctx / svc["build"]["dockerfile"]).is_file(), f"{name}: dockerfile not found"


SECRETS = ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_PIPELINE_PASSWORD",
           "MLFLOW_VIEWER_PASSWORD", "MLFLOW_SECRET_KEY", "PREFECT_AUTH_STRING")


def test_compose_servers_require_auth_and_jobs_take_credentials_from_the_environment(compose):
    env = _env_example()
    s = compose["services"]
    mlflow_cmd, mlflow_env = " ".join(s["mlflow"]["command"]), s["mlflow"]["environment"]
    assert "exec mlflow server --app-name basic-auth" in mlflow_cmd and "umask 077" in mlflow_cmd
    assert mlflow_env["MLFLOW_AUTH_CONFIG_PATH"] == "/tmp/basic_auth.ini"
    assert "default_permission = READ" in mlflow_cmd  # what `viewer` (and any user) may do by default
    assert mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == env["MLFLOW_SECRET_KEY"]
    users = s["mlflow-users"]
    assert users["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert (COMPOSE.parent / users["volumes"][0].split(":")[0]).resolve() == ROOT / "infra" / "mlflow_users.py"
    assert users["environment"]["MLFLOW_PIPELINE_PASSWORD"] == env["MLFLOW_PIPELINE_PASSWORD"]
    auth = s["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert auth == env["PREFECT_AUTH_STRING"] and ":" in auth
    worker = s["worker"]["environment"]
    assert worker["PREFECT_API_AUTH_STRING"] == auth
    assert worker["MLFLOW_TRACKING_USERNAME"] == "pipeline"
    assert worker["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_PIPELINE_PASSWORD"]
    assert s["worker"]["depends_on"]["mlflow-users"]["condition"] == "service_completed_successfully"


def test_env_example_has_only_placeholder_secrets():
    env = _env_example()
    for key in SECRETS:
        assert "change-me" in env[key], f"{key} in .env.example must be a placeholder"
    assert len(env["MINIO_ROOT_PASSWORD"]) >= 8, "MinIO refuses root passwords shorter than 8 characters"
    assert (DOCKER / ".gitignore").read_text().split().count(".env") == 1


def test_compose_secrets_have_no_defaults():
    text = COMPOSE.read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{secret} must be required (${{{secret}:?...}})"


def _docker_compose_v2() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        ok = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if ok else None


def test_docker_compose_config():
    cmd = _docker_compose_v2()
    if cmd is None:
        pytest.skip("`docker compose version` does not work here (no compose v2 plugin)")
    res = subprocess.run([*cmd, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_gpu_dockerfile():
    ins = _dockerfile_instructions(DOCKER / "Dockerfile.gpu")
    ops = [op for op, _ in ins]
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]
    assert args["TORCH_VERSION"] == _pyproject_pin("torch")
    assert "download.pytorch.org/whl/cu" in args["TORCH_INDEX_URL"]
    runs = [rest for op, rest in ins if op == "RUN"]
    torch_idx = next(i for i, r in enumerate(runs) if "TORCH_INDEX_URL" in r)
    deps_idx = next(i for i, r in enumerate(runs) if "requirements" in r)
    assert torch_idx < deps_idx, "the CUDA torch build must be installed before the project's pins"
    for op, rest in ins:
        if op == "COPY" and "--from" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} missing from the build context"
    assert "ENTRYPOINT" in ops and "CMD" in ops and ops.index("FROM") == next(
        i for i, op in enumerate(ops) if op != "ARG")
    cmd = json.loads(next(rest for op, rest in ins if op == "CMD"))
    assert cmd == ["grpo", "run"]


def test_mlflow_dockerfile_matches_project_pin():
    ins = _dockerfile_instructions(DOCKER / "Dockerfile.mlflow")
    args = dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)
    assert args["MLFLOW_VERSION"] == _pyproject_pin("mlflow")


def test_shell_scripts_parse():
    for script in [*INFRA.rglob("*.sh")]:
        subprocess.run(["bash" if script.name.endswith("multi_node.sh") else "sh", "-n", str(script)], check=True)


def test_readme_mentions_existing_paths():
    readme = (INFRA / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:infra/|tests/|flows/|grpo_steps/)[\w./-]*\w)", readme))
    assert paths, "README should point at the infra files"
    created_by_the_reader = {"infra/docker/.env"}  # git-ignored copy of .env.example
    missing = sorted(p for p in paths - created_by_the_reader if not (ROOT / p).exists())
    assert not missing, f"README refers to missing paths: {missing}"

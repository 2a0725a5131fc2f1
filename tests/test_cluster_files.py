"""The cluster files a user hands to Ray, KubeRay and Serve: valid for their tools, and pointing at
entrypoints and configs that exist in this checkout."""
import importlib.util
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from lacy.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _entrypoint_ok(command: str) -> None:
    """`lacy COMMAND [--ray] --config FILE [overrides]`: the command's module exists and the config loads."""
    from jobs.cli import module_of

    argv = shlex.split(command)
    assert argv[0] == "lacy", command
    module = module_of(argv[1], "--ray" in argv)
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    rest = [a for a in argv[2:] if a != "--ray"]
    assert rest[0] == "--config", command
    load_config(ROOT / rest[1], rest[2:])


def _app_config_ok(args: dict) -> None:
    """A Serve application's args as services.cascade:app reads them: a config and its overrides."""
    overrides = args.get("overrides", [])
    load_config(ROOT / args["config"], shlex.split(overrides) if isinstance(overrides, str) else overrides)


def test_ray_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    # AWS fills each type's CPU/GPU resources from its instance type; the GPU type runs the CUDA image.
    assert any("gpu" in t.get("docker", {}).get("worker_image", "") for t in types.values()), "no GPU type"
    # The launcher installs the project with the same pins as the Makefile.
    setup = " ".join(raw["setup_commands"])
    for needle in ("torch==2.13.0", "requirements.txt", "--no-deps -r requirements-nodeps.txt"):
        assert needle in setup


def test_ray_cluster_yaml_rejects_a_broken_copy():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    raw["available_node_types"][raw["head_node_type"]]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="many"):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("name", ["rayjob.yaml", "rayservice.yaml"])
def test_kuberay_manifests(name):
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}[name]
    spec = doc["spec"]
    cluster = spec["rayClusterSpec" if name == "rayjob.yaml" else "rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert cluster["workerGroupSpecs"], "no worker groups"
    if name == "rayjob.yaml":
        _entrypoint_ok(spec["entrypoint"])
    else:
        serve = yaml.safe_load(spec["serveConfigV2"])
        for app in serve["applications"]:
            module, attr = app["import_path"].split(":")
            assert attr == "app" and importlib.util.find_spec(module) is not None
            _app_config_ok(app["args"])


def test_kuberay_network_policy_keeps_the_job_api_inside_the_cluster():
    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "networkpolicy.yaml").read_text())
    assert doc["kind"] == "NetworkPolicy" and doc["spec"]["policyTypes"] == ["Ingress"]
    assert doc["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    internal, public = doc["spec"]["ingress"]
    assert {p["port"] for p in internal["ports"]} >= {8265, 6379}  # job submission, GCS: cluster pods only
    assert [p["port"] for p in public["ports"]] == [8000]


def test_nothing_on_a_vm_or_laptop_binds_every_interface():
    """The dashboard (job submission = code execution) and MLflow bind to private or loopback addresses
    on VMs and laptops; 0.0.0.0 only inside Kubernetes pods, behind the NetworkPolicy."""
    for path in [ROOT / "ray_cluster.yaml", *sorted((ROOT / "cluster").glob("*.sh"))]:
        assert "0.0.0.0" not in path.read_text(), path
    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    ssh = raw["provider"]["security_group"]["IpPermissions"]
    assert [(r["FromPort"], r["IpRanges"][0]["CidrIp"] != "0.0.0.0/0") for r in ssh] == [(22, True)]


def test_serve_config_yaml_is_a_valid_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "services" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(raw)
    assert schema.http_options.host == "127.0.0.1"
    for app in raw["applications"]:
        _app_config_ok(app["args"])


def test_a_ray_we_start_gives_serves_proxy_time_to_start() -> None:
    """Serve's default 5 s for a starting HTTP proxy was too short on loaded cores; a Ray our jobs start
    (and cluster/env.sh's `ray start`) hands its processes 60 s, read where Serve reads it."""
    import os
    import subprocess
    import sys

    code = ("import ray\nfrom services.runtime import init_ray\ninit_ray()\n"
            "@ray.remote\ndef timeout():\n"
            "    from ray.serve._private.constants import PROXY_READY_CHECK_TIMEOUT_S\n"
            "    return PROXY_READY_CHECK_TIMEOUT_S\n"
            "print('TIMEOUT', ray.get(timeout.remote()))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parent.parent)
    assert "TIMEOUT 60.0" in out.stdout, out.stderr[-2000:]
    assert "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-60}" in (
        Path(__file__).resolve().parent.parent / "cluster" / "env.sh").read_text()

"""The cluster files, checked without a cloud: launcher YAMLs against Ray's own autoscaler schema (and its
default-filling), KubeRay manifests against the ray.io/v1 CRD fields they use, the Dockerfile against
pyproject.toml. No cluster is started here."""
import json
import os
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RAY_PIN = next(re.search(r"==([\d.]+)", d).group(1) for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray["))
IMAGE = re.search(r"-t (\S+) ", (CLUSTER / "Dockerfile").read_text()).group(1).split("/", 1)[1]  # name:tag after registry

# Fields of the KubeRay ray.io/v1 CRDs (ray-operator/config/crd/bases, KubeRay >= 1.1) that manifests here may use.
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                   "suspend", "headServiceAnnotations"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "enableIngress", "headService"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                "scaleStrategy", "suspend"}
RAYJOB_SPEC = {"entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector", "submissionMode",
               "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "jobId", "metadata",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "submitterPodTemplate", "suspend"}
RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "upgradeStrategy", "serveService", "excludeHeadPodFromServeSvc",
                   "deploymentUnhealthySecondThreshold", "serviceUnhealthySecondThreshold",
                   "rayClusterDeletionDelaySeconds"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def load_launcher(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_passes_rays_schema_and_default_filling(name):
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_launcher(name)
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)          # as written (no unknown keys: the schema forbids them)
    validate_config(prepare_config(raw))      # after Ray fills in the provider's defaults, as `ray up` does
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types and types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert sum(t["max_workers"] for t in types.values()) >= raw["max_workers"]
    assert all(t["min_workers"] <= t["max_workers"] for t in types.values())
    assert raw["docker"]["image"].endswith(IMAGE)
    assert all("RAY_AUTH_MODE=token" in cmd for cmd in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
               if cmd.strip().startswith(("ray start", "RAY_AUTH_MODE")))


def test_launcher_schema_check_rejects_a_typo():
    import ray.autoscaler
    raw = load_launcher("aws.yaml")
    raw["max_worker"] = raw.pop("max_workers")
    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(raw, schema)


def check_pod_template(template: dict, where: str) -> None:
    containers = template["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c["name"] and c["image"].endswith(IMAGE), where
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c.get("env", []), f"{where}: set RAY_AUTH_MODE explicitly"
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert req.get("nvidia.com/gpu") == lim.get("nvidia.com/gpu"), f"{where}: GPU requests must equal limits"
    mounts = {m["name"] for c in containers for m in c.get("volumeMounts", [])}
    assert mounts <= {v["name"] for v in template["spec"].get("volumes", [])}, f"{where}: mount without a volume"


def check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC}"
    assert spec["rayVersion"] == RAY_PIN
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())  # CRD: map of strings
    check_pod_template(spec["headGroupSpec"]["template"], f"{where} head")
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in spec["workerGroupSpecs"]:
        assert set(g) <= WORKER_GROUP, f"{where}: unknown fields {set(g) - WORKER_GROUP}"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        check_pod_template(g["template"], f"{where} {g['groupName']}")


def test_kuberay_raycluster_uses_crd_fields():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob_uses_crd_fields_and_a_real_entrypoint():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"unknown fields {set(spec) - RAYJOB_SPEC}"
    assert spec["submissionMode"] in SUBMISSION_MODES
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)  # a YAML string, as the CRD wants
    check_cluster_spec(spec["rayClusterSpec"], "RayJob")
    # the entrypoint names a script and config of this repo and joins the job's cluster
    words = spec["entrypoint"].split()
    assert words[0] == "python" and (ROOT / words[1]).is_file() and (ROOT / words[words.index("-c") + 1]).is_file()
    assert "ray.address=auto" in words
    from rlaif_ray.config import load_config
    load_config(ROOT / words[words.index("-c") + 1], [w for w in words[words.index("-c") + 2:]])


def test_kuberay_rayservice_serves_with_rlaif_ray_app_builder(toy_world):
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from rlaif_ray.config import load_config
    from rlaif_ray.serve.app import app_builder, llm_config

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    spec = doc["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, f"unknown fields {set(spec) - RAYSERVICE_SPEC}"
    assert spec["upgradeStrategy"]["type"] in UPGRADE_TYPES
    check_cluster_spec(spec["rayClusterConfig"], "RayService")
    # serveConfigV2 is a YAML string that Ray Serve's own deploy schema accepts (as `serve deploy` would)
    raw = yaml.safe_load(spec["serveConfigV2"])
    serve_config = ServeDeploySchema.model_validate(raw)
    assert raw["http_options"]["host"] == "0.0.0.0"  # KubeRay's serve service reaches the proxy on the pod IP
    (app,) = raw["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields), f"unknown keys {set(app) - set(ServeApplicationSchema.model_fields)}"
    assert serve_config.applications[0].import_path == "rlaif_ray.serve.app:app_builder"
    module, name = app["import_path"].split(":")
    assert getattr(__import__(module, fromlist=[name]), name) is app_builder
    # the builder's args are a checkpoint plus dotted overrides of this repo's config tree
    args = dict(app["args"])
    assert args.pop("checkpoint").startswith("/mnt/runs/")
    cfg = load_config(None, [f"{key}={value}" for key, value in args.items()])
    assert cfg.serve.gpus_per_replica >= 1 and cfg.serve.max_replicas >= cfg.serve.min_replicas
    config = llm_config(cfg, toy_world.policy)  # Ray Serve's LLMConfig accepts the engine settings
    assert config.placement_group_config["bundles"][0]["GPU"] == cfg.serve.gpus_per_replica
    assert "TORCHDYNAMO_DISABLE" not in config.runtime_env["env_vars"]  # a GPU replica keeps vLLM's compiled path
    # the bearer token's variable comes from a Secret in every container that may build or run the app
    key_env = cfg.serve.api_key_env
    groups = [spec["rayClusterConfig"]["headGroupSpec"], *spec["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            assert any(e["name"] == key_env and "secretKeyRef" in e.get("valueFrom", {}) for e in c["env"])


def test_dockerfile_matches_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    py = PYPROJECT["project"]["requires-python"]
    minor = re.search(r">=3\.(\d+)", py).group(1)
    assert base == f"rayproject/ray:{RAY_PIN}-py3{minor}-gpu"   # an official Ray GPU image, same Ray and Python
    # the image installs the GPU lock by hash, and the lock holds what pyproject's gpu profile pins
    assert re.search(r"pip install [^\n]*--require-hashes --no-deps -r locks/gpu\.txt", text)
    lock = (ROOT / "locks" / "gpu.txt").read_text()
    for pin in PYPROJECT["project"]["optional-dependencies"]["gpu"]:
        if "==" in pin:
            name, version = pin.split("==")
            assert re.search(rf"^{re.escape(name)}=={re.escape(version)} ", lock, re.M), f"locks/gpu.txt lacks {pin}"
    assert re.search(rf"^ray=={re.escape(RAY_PIN)} ", lock, re.M)
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repo"
    assert f"ray.__version__ == '{RAY_PIN}'" in text

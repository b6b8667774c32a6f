"""Packaging read, not run: the Dockerfile, the KubeRay RayService and the generated docs.

There is no container engine or Kubernetes here, so these tests check what reading can:
the files an image copies exist and reach the build context, the image runs the README's
command as a non-root user, the RayService deploys exactly the shipped serve config, and
the operator docs' configuration reference is the one the settings models generate.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
SERVE_CONFIG = REPO / "configs" / "serve_config.yaml"
RAYSERVICE = REPO / "configs" / "kuberay" / "rayservice.yaml"
RAYSERVICE_SCHEMA = REPO / "configs" / "kuberay" / "rayservice.schema.json"
OPERATIONS_MD = REPO / "docs" / "operations.md"
# Files the app opens beside its package (REPO_ROOT) at run time, and what pip needs to build.
RUNTIME_FILES = [
    "pyproject.toml", "README.md",
    "configs/serve_config.yaml", "configs/receivers.yaml",
    "models/localization_model.onnx", "models/model_card.json", "models/golden_features.npy",
    "serve_app/static/map.html", "serve_app/static/map.js", "serve_app/static/map.css",
    "deployments/app.py", "deployments/ingress.py", "deployments/map_page.py",
]


# -- Dockerfile ------------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip().rstrip("/") for ln in lines if ln.strip() and not ln.startswith("#")]


def _match(path: str, pattern: str) -> bool:
    if pattern.startswith("**/"):  # at any depth
        parts = path.split("/")
        return any(fnmatch.fnmatchcase("/".join(parts[i:]), pattern[3:])
                   for i in range(len(parts)))
    return fnmatch.fnmatchcase(path, pattern)  # (`*` also spans `/`: errs on excluding)


def ignored(rel: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `rel` (or a folder above it) out of the build context."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pat in patterns:  # the last matching pattern wins, as in Docker
        negate = pat.startswith("!")
        if any(_match(p, pat.lstrip("!")) for p in prefixes):
            excluded = not negate
    return excluded


def copy_sources() -> list[str]:
    """The sources of every COPY/ADD from the build context (not from another stage)."""
    sources = []
    for word, args in dockerfile():
        if word not in ("COPY", "ADD"):
            continue
        tokens = [t for t in shlex.split(args) if not t.startswith("--")]
        assert "--from" not in args, "multi-stage COPY: extend this test"
        sources += tokens[:-1]
    return sources


def readme_run_command() -> str:
    """The command of Quickstart step 1 of the README (after the locked install)."""
    m = re.search(r"^pip install -c requirements\.lock -e \. && (.+?)\s+# 1\.",
                  (REPO / "README.md").read_text(), re.MULTILINE)
    assert m, "README quickstart step 1 not found"
    return m.group(1).strip()


def test_every_copy_source_exists_and_reaches_the_build_context():
    patterns = dockerignore_patterns()
    sources = copy_sources()
    assert sources
    for src in sources:
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        assert not ignored(src.rstrip("/"), patterns), f"COPY {src}: excluded by .dockerignore"
    for rel in RUNTIME_FILES:
        assert (REPO / rel).is_file(), rel
        covered = any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/")
                      for s in sources)
        assert covered, f"{rel} is needed at run time but no COPY brings it in"
        assert not ignored(rel, patterns), f"{rel} is excluded by .dockerignore"
    # Sanity of the matcher itself: what must stay out does.
    for rel in (".git/config", "tests/conftest.py", "serve_app/__pycache__/x.pyc", "state/a"):
        assert ignored(rel, patterns), rel


def test_image_installs_editable_so_the_app_finds_configs_and_models():
    # REPO_ROOT is the folder above serve_app/: a wheel install would look for configs/ and
    # models/ in site-packages, where they are not.
    [install] = [a for a in instructions("RUN") if "pip install" in a]
    assert re.search(r"pip install -c requirements\.lock -e \.(\s|$)", install), install
    workdir = instructions("WORKDIR")[-1]
    for src, dst in (shlex.split(a)[-2:] for a in instructions("COPY")):
        assert not dst.startswith("/") or dst.startswith(workdir), (src, dst)


def test_cmd_is_the_readme_run_command():
    [cmd] = instructions("CMD")
    argv = json.loads(cmd)  # exec form: signals reach `rfloc`, which stops Serve cleanly
    assert " ".join(argv) == readme_run_command() == "rfloc serve"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rfloc"] == "serve_app.cli:main"
    assert not instructions("ENTRYPOINT")


def test_runs_as_a_numeric_non_root_user():
    users = instructions("USER")
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can verify it.
    assert user.isdigit() and int(user) > 0, users[-1]
    pod = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert pod["template"]["spec"]["securityContext"]["runAsUser"] == int(user)
    assert not any("sudo" in a for a in instructions("RUN"))


def test_healthcheck_and_only_port_8000_exposed():
    [check] = instructions("HEALTHCHECK")
    assert "CMD" in check and "http://127.0.0.1:8000/health" in check
    assert "wget" in check  # installed by the image (KubeRay's probes use it too)
    assert any("wget" in a and "apt-get install" in a for a in instructions("RUN"))
    exposed = [p for a in instructions("EXPOSE") for p in a.split()]
    assert exposed == ["8000"]
    assert yaml.safe_load(SERVE_CONFIG.read_text())["http_options"]["port"] == 8000


def test_container_listens_on_all_interfaces_through_rfloc_http_host():
    from serve_app.docgen import env_names
    from serve_app.settings import EnvSettings

    env = " ".join(instructions("ENV"))
    assert re.search(r"\bRFLOC_HTTP_HOST=0\.0\.0\.0\b", env), env
    assert env_names("http_host", EnvSettings.model_fields["http_host"]) == ["RFLOC_HTTP_HOST"]
    assert "env.http_host" in (REPO / "serve_app" / "cli.py").read_text()


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [ray] = [d for d in deps if d.startswith("ray[")]
    return ray.split("==")[1]


def test_ray_version_build_arg_matches_pin_and_manifest():
    args = dict(a.split("=", 1) for a in instructions("ARG") if "=" in a)
    assert args["RAY_VERSION"] == ray_pin()
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    spec = rayservice()["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray_pin()


def test_static_files_are_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "static/*" in data["package-data"]["serve_app"]


# -- KubeRay RayService ----------------------------------------------------------------------

def manifests() -> dict[str, dict]:
    """The documents of the KubeRay manifest by kind."""
    docs = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document of each kind"
    return by_kind


def rayservice() -> dict:
    return manifests()["RayService"]


# MLflow's own client settings (read by MLflow from the environment, not by EnvSettings).
MLFLOW_CLIENT_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_SERVER_CERT_PATH"}


def test_serve_config_v2_is_the_shipped_serve_config():
    shipped = yaml.safe_load(SERVE_CONFIG.read_text())
    v2 = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    # The deliberate differences: on Kubernetes the proxies listen on the pod network, and
    # every deployment has at least two replicas (a fixed count spread one per pod).
    assert shipped["http_options"]["host"] == "127.0.0.1"
    assert v2["http_options"]["host"] == "0.0.0.0"
    expected = copy.deepcopy(shipped)
    expected["http_options"]["host"] = "0.0.0.0"
    for dep, v2_dep in zip(expected["applications"][0]["deployments"],
                           v2["applications"][0]["deployments"], strict=True):
        assert dep["name"] == v2_dep["name"]
        if "autoscaling_config" in dep:
            auto = dep["autoscaling_config"]
            auto["min_replicas"] = max(2, auto["min_replicas"])
            auto["max_replicas"] = max(auto["max_replicas"], auto["min_replicas"])
        else:
            dep["num_replicas"] = max(2, dep["num_replicas"])
        if "max_replicas_per_node" in v2_dep:
            dep["max_replicas_per_node"] = 1
    assert v2 == expected


def test_every_deployment_on_kuberay_has_two_replicas_on_two_pods():
    spec = rayservice()["spec"]
    cfg = yaml.safe_load(spec["serveConfigV2"])
    [group] = spec["rayClusterConfig"]["workerGroupSpecs"]
    for dep in cfg["applications"][0]["deployments"]:
        least = dep.get("autoscaling_config", {}).get("min_replicas") or dep["num_replicas"]
        assert least >= 2, dep["name"]
        per_node = dep.get("max_replicas_per_node")
        if per_node is not None:  # enough pods at the group's minimum for the fixed count
            assert group["minReplicas"] * per_node >= least, dep["name"]
    assert group["minReplicas"] >= 2


def test_network_policy_opens_only_the_serve_port_to_clients():
    policy = manifests()["NetworkPolicy"]
    spec = policy["spec"]
    pods = rayservice()["spec"]["rayClusterConfig"]
    labels = [pods["headGroupSpec"]["template"]["metadata"]["labels"],
              *(g["template"]["metadata"]["labels"] for g in pods["workerGroupSpecs"])]
    selector = spec["podSelector"]["matchLabels"]
    assert all(selector.items() <= lab.items() for lab in labels), "selects every Ray pod"
    assert spec["policyTypes"] == ["Ingress"]
    open_rules = [r for r in spec["ingress"] if not r.get("from")]
    assert open_rules == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    for rule in spec["ingress"]:
        if rule.get("from"):
            peers = rule["from"]
            assert all("ipBlock" not in p for p in peers), "no address-based openings"
            assert all(p.get("podSelector", {}).get("matchLabels") for p in peers), rule
    internal = [r for r in spec["ingress"] if r.get("from") and "ports" not in r]
    assert internal == [{"from": [{"podSelector": {"matchLabels": selector}}]}]


@pytest.mark.parametrize("which", ["shipped", "kuberay"])
def test_serve_configs_pass_serve_schema(which):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.docgen import USER_CONFIG_MODELS
    from serve_app.settings import AppArgs

    text = SERVE_CONFIG.read_text() if which == "shipped" else rayservice()["spec"][
        "serveConfigV2"]
    cfg = yaml.safe_load(text)
    ServeDeploySchema.model_validate(cfg)
    for app in cfg["applications"]:
        AppArgs.model_validate(app.get("args") or {})
        for dep in app["deployments"]:
            if "user_config" in dep:
                model = USER_CONFIG_MODELS[dep["name"]]
                assert set(dep["user_config"]) <= set(model.model_fields), dep["name"]
                model.model_validate(dep["user_config"])


def test_rayservice_passes_its_schema_and_the_schema_has_teeth():
    from jsonschema import Draft202012Validator

    schema = json.loads(RAYSERVICE_SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    doc = rayservice()
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    typo = copy.deepcopy(doc)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert not validator.is_valid(typo)
    bad = copy.deepcopy(doc)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert not validator.is_valid(bad)


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayservice_is_sized_autoscaled_and_private():
    spec = rayservice()["spec"]
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas go to the workers
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # dashboard not public
    [group] = cluster["workerGroupSpecs"]
    assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert group["maxReplicas"] > group["minReplicas"]

    # The workers at the group's minimum hold every replica at its autoscaling maximum.
    cfg = yaml.safe_load(spec["serveConfigV2"])
    needed = sum(
        d["ray_actor_options"]["num_cpus"]
        * (d.get("autoscaling_config", {}).get("max_replicas") or d.get("num_replicas", 1))
        for d in cfg["applications"][0]["deployments"])
    [worker] = group["template"]["spec"]["containers"]
    assert group["minReplicas"] * _cpus(worker["resources"]["limits"]["cpu"]) >= needed
    assert worker["resources"]["requests"] == worker["resources"]["limits"]

    # Token auth from a Secret; no token, password or key written in the manifest.
    assert cluster["authOptions"] == {"mode": "token", "secretName": "rfloc-ray-auth"}
    [headc] = head["template"]["spec"]["containers"]
    assert headc["image"] == worker["image"]
    assert headc["env"] == worker["env"]
    secret = {"REDIS_URL", "RFLOC_ADMIN_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD"}
    for var in headc["env"]:
        if var["name"] in secret or any(w in var["name"] for w in ("TOKEN", "PASSWORD")):
            assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
            assert "value" not in var, var["name"]
        else:
            assert "@" not in str(var.get("value", "")), var["name"]  # no user:pass@ URL
    assert secret <= {v["name"] for v in headc["env"]}


def test_rayservice_env_vars_are_documented_settings():
    """Pod env: the service's settings, or the Serve options `rfloc serve` sets (and the
    replay of a request caught on a dying Ingress replica), same values."""
    from serve_app.cli import HAPROXY_REPLAY_ENV, LOOPBACK_ENV
    from serve_app.docgen import env_names
    from serve_app.settings import EnvSettings

    known = {n for name, f in EnvSettings.model_fields.items() for n in env_names(name, f)}
    known |= MLFLOW_CLIENT_ENV
    serve_opts = {k: v for k, v in {**LOOPBACK_ENV, **HAPROXY_REPLAY_ENV}.items()
                  if k.startswith("RAY_SERVE_")}
    cluster = rayservice()["spec"]["rayClusterConfig"]
    [headc] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    [workerc] = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"]
    for container in (headc, workerc):
        env = {v["name"]: v.get("value") for v in container["env"]}
        assert set(env) <= known | set(serve_opts), container["name"]
        assert {k: env.get(k) for k in serve_opts} == serve_opts, container["name"]


# -- docs/operations.md ------------------------------------------------------------------------

def test_configuration_reference_is_generated_from_settings():
    from serve_app.docgen import main, render_reference, replace_section

    text = OPERATIONS_MD.read_text(encoding="utf-8")
    assert replace_section(text, render_reference()) == text, (
        "docs/operations.md is stale: run python -m serve_app.docgen")
    assert main(["--check"]) == 0


def test_reference_lists_every_setting_with_its_default():
    from serve_app.docgen import USER_CONFIG_MODELS, env_names
    from serve_app.settings import AppArgs, EnvSettings

    text = OPERATIONS_MD.read_text(encoding="utf-8")
    for name, field in EnvSettings.model_fields.items():
        for var in env_names(name, field):
            assert f"`{var}`" in text, var
    for model in (AppArgs, *USER_CONFIG_MODELS.values()):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, (model.__name__, name)


def test_operations_doc_covers_the_operator_commands():
    text = OPERATIONS_MD.read_text(encoding="utf-8")
    for needle in ("rfloc serve", "ray start --head --port=6380", "serve deploy configs/",
                   "serve status", "RAY_AUTH_MODE=token", "ray get-auth-token --generate",
                   "rfloc promote", "rfloc rollback", "rfloc models", "configs/kuberay/",
                   "(observability.md)", "8265", "8000"):
        assert needle in text, needle

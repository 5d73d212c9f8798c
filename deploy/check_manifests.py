"""Cross-checks of deploy/ that schema validation cannot see.

- prometheus/alerts.yml: severity, summary, description and a runbook_url whose
  anchor is a heading of deploy/README.md; metric names from DESIGN section 9;
  a firing and a quiet promtool test per alert in alerts_test.yml.
- k8s/prometheusrule.yaml holds exactly the groups of alerts.yml
  (``--write-prometheusrule`` regenerates it).
- k8s manifests (``--rendered FILE``: `kubectl kustomize` output; else the files
  kustomization.yaml lists): no namespace; env names batchd reads; ConfigMap
  and Secret references that resolve (the Secret against secret.example.yaml);
  Service, ServiceMonitor and PodDisruptionBudget selecting the pods; probes on
  /healthz and /readyz; a termination grace longer than preStop plus drain.
- compose/docker-compose.yml: depends_on targets, build context, mounted
  paths, and variable names batchd reads.

Needs PyYAML (installed with kubernetes-validate). Exits 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from check_dashboard import REPO, check_expr_metrics

DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
K8S = DEPLOY / "k8s"
RULE_FILE = K8S / "prometheusrule.yaml"
README = DEPLOY / "README.md"

RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by
#   python deploy/check_manifests.py --write-prometheusrule
# Edit alerts.yml, then regenerate; deploy/check.sh fails when they differ.
# If your Prometheus selects rules by label (kube-prometheus-stack:
# `release: <name>`), add that label in an overlay.
"""
SEVERITIES = {"critical", "warning", "info"}
# Variables the image or the platform read that are not pydantic settings.
PLATFORM_ENV = {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "HOME", "TZ"}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def prometheus_rule(alerts: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "batchd",
            "labels": {"app.kubernetes.io/name": "batchd", "app.kubernetes.io/component": "server"},
        },
        "spec": {"groups": alerts["groups"]},
    }


def write_prometheus_rule() -> None:
    body = yaml.safe_dump(prometheus_rule(load(ALERTS)), sort_keys=False, width=100)
    RULE_FILE.write_text(RULE_HEADER + body)


def github_anchor(heading: str) -> str:
    anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return anchor.replace(" ", "-")


def check_alerts() -> list[str]:
    problems: list[str] = []
    alerts = load(ALERTS)
    anchors = {
        github_anchor(m.group(1))
        for m in re.finditer(r"^#{1,6}\s+(.+)$", README.read_text(), re.M)
    } if README.exists() else set()
    tests = load(ALERTS_TEST)["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])

    for group in alerts["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if name is None:
                problems += check_expr_metrics(f"rule {rule.get('record')}", rule["expr"])
                continue
            where = f"alert {name}"
            if rule.get("labels", {}).get("severity") not in SEVERITIES:
                problems.append(f"{where}: severity label must be one of {sorted(SEVERITIES)}")
            notes = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not notes.get(key):
                    problems.append(f"{where}: {key} annotation missing")
            runbook = notes.get("runbook_url", "")
            if runbook != f"README.md#{name.lower()}":
                problems.append(f"{where}: runbook_url must be README.md#{name.lower()}")
            elif name.lower() not in anchors:
                problems.append(f"{where}: deploy/README.md has no heading '{name}'")
            if name not in fires:
                problems.append(f"{where}: alerts_test.yml has no case where it fires")
            if name not in quiet:
                problems.append(f"{where}: alerts_test.yml has no case where it stays quiet")
            problems += check_expr_metrics(where, rule["expr"])

    rule_doc = load(RULE_FILE)
    if rule_doc != prometheus_rule(alerts):
        problems.append(
            "k8s/prometheusrule.yaml differs from prometheus/alerts.yml: run "
            "python deploy/check_manifests.py --write-prometheusrule"
        )
    return problems


def settings_env_names(path: Path = REPO / "batchd" / "config.py") -> set[str] | None:
    """Environment names of batchd.config.Settings, read without importing it."""
    if not path.exists():
        return None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "Settings":
            names: set[str] = set()
            for item in node.body:
                if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                    continue
                aliases = [
                    c.value
                    for kw in getattr(item.value, "keywords", [])
                    if kw.arg == "validation_alias"
                    for c in ast.walk(kw.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                names.update(aliases or [f"BATCHD_{item.target.id.upper()}"])
            return names
    return None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            found.append((f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]))
    return found


def check_k8s(docs: list[dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
        if "namespace" in doc["metadata"]:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: sets a namespace")
    if "Secret" in by_kind:
        problems.append("a Secret is part of the kustomization: keep credentials out of it")
    for kind in ("Deployment", "Service", "ConfigMap", "Job", "PodDisruptionBudget",
                 "ServiceMonitor", "PrometheusRule"):
        if kind not in by_kind:
            problems.append(f"no {kind} in the manifests")
    if problems:
        return problems

    env_names = settings_env_names()
    secret = load(K8S / "secret.example.yaml")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in by_kind["ConfigMap"]}

    def known_env(where: str, name: str) -> None:
        if env_names is not None and name not in env_names | PLATFORM_ENV:
            problems.append(f"{where}: batchd reads no variable {name}")

    for name, data in configmaps.items():
        for key in data:
            known_env(f"ConfigMap/{name}", key)
    for key in secret_keys:
        known_env("secret.example.yaml", key)

    for where, template in _pod_specs(docs):
        spec = template["spec"]
        if not spec.get("securityContext", {}).get("runAsNonRoot"):
            problems.append(f"{where}: runAsNonRoot is not set")
        for c in spec["containers"]:
            cwhere = f"{where} container {c['name']}"
            if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                problems.append(f"{cwhere}: readOnlyRootFilesystem is not set")
            if not c.get("resources", {}).get("requests") or not c["resources"].get("limits"):
                problems.append(f"{cwhere}: needs resource requests and limits")
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if "/var/lib/batchd" not in mounts:
                problems.append(f"{cwhere}: /var/lib/batchd must be a writable volume")
            elif where.startswith("Deployment/"):
                # Replicas share the spool and archive: a pod-local volume
                # would lose what a dead pod had spooled.
                name = next(m["name"] for m in c["volumeMounts"]
                            if m["mountPath"] == "/var/lib/batchd")
                volume = next((v for v in spec.get("volumes", []) if v["name"] == name), {})
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                pvc = next((p for p in by_kind.get("PersistentVolumeClaim", [])
                            if p["metadata"]["name"] == claim), None)
                if pvc is None or "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
                    problems.append(f"{cwhere}: /var/lib/batchd must be a ReadWriteMany "
                                    "PersistentVolumeClaim in the manifests")
            for ref in c.get("envFrom", []):
                cm = ref.get("configMapRef", {}).get("name")
                if cm is not None and cm not in configmaps:
                    problems.append(f"{cwhere}: no ConfigMap {cm}")
            for env in c.get("env", []):
                known_env(cwhere, env["name"])
                key_ref = env.get("valueFrom", {}).get("secretKeyRef")
                if key_ref and (key_ref["name"] != secret["metadata"]["name"]
                                or key_ref["key"] not in secret_keys):
                    problems.append(f"{cwhere}: {env['name']} names a Secret key "
                                    "secret.example.yaml does not have")

    deployment = by_kind["Deployment"][0]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ports:
            problems.append(f"Deployment: {probe} must GET {path} on a named container port")
    if env.get("BATCHD_HTTP_HOST") != "0.0.0.0":  # noqa: S104 (compared, not bound)
        problems.append("Deployment: BATCHD_HTTP_HOST must be 0.0.0.0 to be reachable")
    grace = float(env.get("BATCHD_SHUTDOWN_GRACE_SECONDS") or 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    sleep = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
    if pod["spec"].get("terminationGracePeriodSeconds", 30) <= grace + sleep:
        problems.append("Deployment: terminationGracePeriodSeconds must exceed preStop + drain")

    services = by_kind["Service"]
    for svc in services:
        if not _selects(svc["spec"].get("selector", {}), pod_labels):
            problems.append(f"Service/{svc['metadata']['name']}: selector misses the pods")
        for p in svc["spec"]["ports"]:
            if p.get("targetPort") not in ports and p.get("targetPort") not in ports.values():
                problems.append(f"Service/{svc['metadata']['name']}: targetPort not on the pods")
    for pdb in by_kind["PodDisruptionBudget"]:
        if not _selects(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            problems.append(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pod")
    for sm in by_kind["ServiceMonitor"]:
        selector = sm["spec"]["selector"]["matchLabels"]
        scraped = [s for s in services if _selects(selector, s["metadata"]["labels"])]
        if not scraped:
            problems.append(f"ServiceMonitor/{sm['metadata']['name']}: selects no Service")
            continue
        svc = scraped[0]
        svc_ports = {p.get("name") for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in svc_ports or ep.get("path") != "/metrics":
                problems.append(f"ServiceMonitor/{sm['metadata']['name']}: scrape a named "
                                "Service port at /metrics")
        job_label = sm["spec"].get("jobLabel")
        job = svc["metadata"]["labels"].get(job_label) if job_label else svc["metadata"]["name"]
        if job != "batchd":
            problems.append(f"ServiceMonitor/{sm['metadata']['name']}: job label would be "
                            f"{job!r}, the alerts expect 'batchd'")
    return problems


def check_compose(path: Path = DEPLOY / "compose" / "docker-compose.yml") -> list[str]:
    problems: list[str] = []
    services = load(path)["services"]
    env_names = settings_env_names()
    for name, svc in services.items():
        where = f"compose service {name}"
        for dep in svc.get("depends_on", {}):
            if dep not in services:
                problems.append(f"{where}: depends on unknown service {dep}")
        build = svc.get("build")
        if build and not (path.parent / build["context"] / build["dockerfile"]).exists():
            problems.append(f"{where}: no {build['dockerfile']} in build context")
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not (path.parent / source).exists():
                problems.append(f"{where}: mounts missing path {source}")
        if svc.get("image") == "batchd:local" and env_names is not None:
            for key in svc.get("environment", {}):
                if key not in env_names | PLATFORM_ENV:
                    problems.append(f"{where}: batchd reads no variable {key}")
    if not (DEPLOY / "prometheus" / "prometheus.yml").exists():
        problems.append("compose: deploy/prometheus/prometheus.yml is missing")
    return problems


def kustomization_docs() -> list[dict[str, Any]]:
    kust = load(K8S / "kustomization.yaml")
    docs: list[dict[str, Any]] = []
    for name in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-prometheusrule", action="store_true",
                        help="regenerate k8s/prometheusrule.yaml from alerts.yml and exit")
    parser.add_argument("--rendered", type=Path,
                        help="`kubectl kustomize deploy/k8s` output to check")
    args = parser.parse_args()
    if args.write_prometheusrule:
        write_prometheus_rule()
        print(f"wrote {RULE_FILE.relative_to(REPO)}")
        return 0
    if args.rendered:
        docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    else:
        docs = kustomization_docs()
    problems = check_alerts() + check_k8s(docs) + check_compose()
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"OK alerts, compose and {len(docs)} Kubernetes resources cross-checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())

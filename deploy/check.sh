#!/usr/bin/env bash
# Validates deploy/: alert rules with promtool (from Debian's prometheus package, unpacked, not
# installed), Kubernetes manifests against the API schemas (kubernetes-validate, PyPI), YAML
# lint, the compose file's structure, the Grafana dashboard's JSON, and the Salesforce package
# source with Salesforce's own CLI (`sf project convert source`, offline; @salesforce/cli from
# npm, installed once into $tools/sf: about 300 MB and a minute, reused by later runs).
set -euo pipefail
cd "$(dirname "$0")"
tools=${PORTALS_CRM_TOOLS:-/tmp/portals-crm-tools}
mkdir -p "$tools"

promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
  if [ ! -x "$tools/usr/bin/promtool" ]; then
    (cd "$tools" && (apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }) \
      && dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb)
  fi
  promtool="$tools/usr/bin/promtool"
fi
"$promtool" check rules prometheus/alerts.yml
"$promtool" test rules prometheus/alerts.test.yml

if [ ! -x "$tools/venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q kubernetes-validate yamllint
fi
"$tools/venv/bin/yamllint" -d '{extends: relaxed, rules: {line-length: disable}}' \
  k8s prometheus compose grafana/provisioning
"$tools/venv/bin/kubernetes-validate" --strict k8s/deployment.yaml k8s/configmap.yaml k8s/secret.example.yaml

"$tools/venv/bin/python" - <<'PY'
import json, yaml
keda = list(yaml.safe_load_all(open("k8s/keda-scaledobject.yaml")))
scaled = next(d for d in keda if d["kind"] == "ScaledObject")
trigger = scaled["spec"]["triggers"][0]
assert trigger["type"] == "rabbitmq" and trigger["metadata"]["protocol"] == "http", "KEDA must use protocol: http (counts unacked)"
import re
meta = trigger["metadata"]
assert meta.get("useRegex") == "true" and meta.get("operation") == "sum", "KEDA must sum the shared and the tenant queues"
queues = re.compile(meta["queueName"])
for name in ["crm.sync", "crm.sync.t.acme"]:
    assert queues.search(name), f"KEDA must count {name}"
for name in ["crm.retry.5s", "crm.dead", "crm.sync.route"]:
    assert not queues.search(name), f"KEDA must not count {name}"
compose = yaml.safe_load(open("compose/docker-compose.yml"))
services = compose["services"]
for name in ["rabbitmq", "emulator", "worker-1", "worker-2", "prometheus", "grafana"]:
    assert name in services, f"compose lacks {name}"
for name, service in services.items():
    assert "image" in service or "build" in service, f"{name}: image or build"
    for dep in service.get("depends_on", {}):
        assert dep in services, f"{name} depends on unknown {dep}"
assert services["emulator"]["build"].get("target") == "dev", "the emulator runs the Dockerfile's dev target"
for name in ["worker-1", "worker-2"]:
    assert services[name]["build"].get("target") in (None, "service"), f"{name} runs the service image"
dockerfile = open("Dockerfile").read()
assert "--no-default-features" in dockerfile.split("AS build\n", 1)[1].split("FROM", 1)[0], "the service build leaves out dev-tools"
assert dockerfile.rstrip().split("FROM")[-1].strip().startswith("base AS service"), "the default target is the service"
dashboard = json.load(open("grafana/dashboards/portals-crm.json"))
assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
print(f"deploy/ ok: KEDA trigger, {len(services)} compose services, {len(dashboard['panels'])} dashboard panels")
PY

if [ ! -x "$tools/sf/node_modules/.bin/sf" ]; then
  mkdir -p "$tools/sf"
  # undici 7 needs Node 22's zstd; Node 20 (Debian's) runs the CLI with undici 6.
  printf '{"overrides":{"undici":"6.21.3"}}\n' > "$tools/sf/package.json"
  npm install --prefix "$tools/sf" --no-audit --no-fund --loglevel=error @salesforce/cli >/dev/null
fi
export SF_DISABLE_TELEMETRY=true SF_AUTOUPDATE_DISABLE=true SF_SKIP_NEW_VERSION_CHECK=true
converted=$(mktemp -d)
(cd salesforce && "$tools/sf/node_modules/.bin/sf" project convert source --source-dir force-app \
  --output-dir "$converted/mdapi" >/dev/null)
echo "deploy/salesforce ok: converted by sf ($(find "$converted/mdapi" -type f | wc -l) metadata files)"
rm -rf "$converted"

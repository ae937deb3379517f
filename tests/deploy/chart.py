"""Render the Helm chart with the real `helm` binary, and tell built-in kinds from custom resources.

Also a command line for .ci/deploy-checks:
  python -m tests.deploy.chart split RENDERED BUILTIN_OUT CRD_OUT   built-in kinds and CRDs into two files
  python -m tests.deploy.chart rules RENDERED OUT                   the PrometheusRule's spec as a rules file
  python -m tests.deploy.chart kube-versions                        the Kubernetes versions to validate
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "stream"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


def claimed_kube_minors() -> list[tuple[int, int]]:
    """The Kubernetes minors Chart.yaml's kubeVersion claims: ">=1.A.0-0 <1.B.0-0" -> 1.A .. 1.(B-1)."""
    text = (CHART / "Chart.yaml").read_text()
    match = re.search(r'^kubeVersion: *"?>= *1\.(\d+)\.0(?:-0)? +< *1\.(\d+)\.0(?:-0)?"?\s*$', text, re.MULTILINE)
    if not match:
        raise ValueError('Chart.yaml kubeVersion must read ">=1.A.0-0 <1.B.0-0": a range .ci/deploy-checks validates')
    low, high = int(match[1]), int(match[2])
    return [(1, minor) for minor in range(low, high)]


def kube_versions() -> list[str]:
    """The versions .ci/deploy-checks validates: every minor the chart claims. Each must be one that
    kubernetes-validate has schemas for, or the claim would be more than is validated."""
    from kubernetes_validate.utils import all_versions

    known = {tuple(int(x) for x in v.split(".")[:2]) for v in all_versions()}
    claimed = claimed_kube_minors()
    unknown = [f"{a}.{b}" for a, b in claimed if (a, b) not in known]
    if unknown:
        raise ValueError(f"Chart.yaml kubeVersion claims {', '.join(unknown)}, which the installed "
                         "kubernetes-validate has no schemas for: lower the upper bound or upgrade it")
    return [f"{a}.{b}.0" for a, b in claimed]


# The newest version the chart claims (Chart.yaml kubeVersion); a `go install`ed helm would
# otherwise render for its built-in default, v1.20, and refuse the chart.
KUBE_VERSION = "{}.{}.0".format(*claimed_kube_minors()[-1])

# Kinds kubernetes-validate has schemas for (validated strictly), and the custom resources it has none
# for (checked against tests/deploy/crds.py instead). Any other kind is an error: a new kind must be
# put in one of the two lists on purpose.
BUILTIN_KINDS = {
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "Service"),
    ("v1", "ServiceAccount"),
    ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
}


class RenderError(Exception):
    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(stderr)
        self.returncode = returncode
        self.stderr = stderr


def helm_binary() -> str | None:
    """$HELM, then helm on PATH, then where `go install` puts it."""
    for candidate in (os.environ.get("HELM"), shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    installed = Path(gopath) / "bin" / "helm"
    return str(installed) if installed.is_file() else None


def render_text(
    values_files: list[Path] | tuple[Path, ...] = (),
    values: dict | None = None,
    *,
    release: str = "stream",
    namespace: str = "prod",
    kube_version: str = KUBE_VERSION,
    helm: str | None = None,
) -> str:
    """`helm template` output; `values` (a dict, last) is given as a values file, like `-f`."""
    helm = helm or helm_binary()
    if helm is None:
        raise FileNotFoundError("helm is not installed")
    args = [helm, "template", release, str(CHART), "--namespace", namespace, "--kube-version", kube_version]
    for path in values_files:
        args += ["--values", str(path)]
    extra = None
    if values is not None:
        # JSON is YAML; helm reads the values file from stdin with `--values -`.
        args += ["--values", "-"]
        extra = json.dumps(values)
    proc = subprocess.run(args, input=extra, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise RenderError(proc.returncode, proc.stderr)
    return proc.stdout


def documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def render(values_files=(), values: dict | None = None, **kwargs) -> list[dict]:
    return documents(render_text(values_files, values, **kwargs))


def find(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict]) -> dict:
    containers = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["stream"]
    return containers[0]


def environment(docs: list[dict]) -> dict[str, str]:
    """What the container sees: the ConfigMap it reads (envFrom), then its own env (which wins)."""
    env: dict[str, str] = {}
    configmaps = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    c = container(docs)
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    for var in c.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def split(docs: list[dict]) -> tuple[list[dict], list[dict]]:
    builtin, crds = [], []
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in BUILTIN_KINDS:
            builtin.append(doc)
        elif key in CRD_KINDS:
            crds.append(doc)
        else:
            raise ValueError(f"unexpected kind {key[1]} ({key[0]}): add it to BUILTIN_KINDS or CRD_KINDS")
    return builtin, crds


def _main(argv: list[str]) -> int:
    command, *paths = argv
    if command == "kube-versions":
        try:
            print(" ".join(kube_versions()))
        except ValueError as error:
            print(error, file=sys.stderr)
            return 1
        return 0
    docs = documents(Path(paths[0]).read_text())
    if command == "split":
        builtin, crds = split(docs)
        Path(paths[1]).write_text(yaml.safe_dump_all(builtin, sort_keys=False))
        Path(paths[2]).write_text(yaml.safe_dump_all(crds, sort_keys=False))
        print(f"{paths[0]}: {len(builtin)} built-in objects, {len(crds)} custom resource(s) "
              f"({', '.join(sorted(d['kind'] for d in crds)) or 'none'})")
        return 0
    if command == "rules":
        rules = [d for d in docs if d["kind"] == "PrometheusRule"]
        if len(rules) != 1:
            print(f"{paths[0]}: expected one PrometheusRule, found {len(rules)}", file=sys.stderr)
            return 1
        Path(paths[1]).write_text(yaml.safe_dump(rules[0]["spec"], sort_keys=False))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

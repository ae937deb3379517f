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


VALIDATED_ANNOTATION = "stream/validated-kubernetes"


def _chart_yaml() -> str:
    return (CHART / "Chart.yaml").read_text()


def kube_lower_bound() -> tuple[int, int]:
    """The oldest minor the chart supports: Chart.yaml kubeVersion ">=1.A.0-0", a lower bound only (an upper
    bound would make helm refuse even upgrades of running releases once a cluster moves past it)."""
    match = re.search(r'^kubeVersion: *"?>= *1\.(\d+)\.0(?:-0)?"?\s*$', _chart_yaml(), re.MULTILINE)
    if not match:
        raise ValueError('Chart.yaml kubeVersion must read ">=1.A.0-0": a lower bound only')
    return (1, int(match[1]))


def stated_kube_minors() -> list[tuple[int, int]]:
    """The minors the chart states it is validated for: Chart.yaml annotation
    stream/validated-kubernetes "1.A-1.B" -> 1.A .. 1.B."""
    value = (yaml.safe_load(_chart_yaml()).get("annotations") or {}).get(VALIDATED_ANNOTATION, "")
    match = re.fullmatch(r"1\.(\d+)-1\.(\d+)", str(value))
    if not match:
        raise ValueError(f'Chart.yaml annotation {VALIDATED_ANNOTATION} must read "1.A-1.B", not {value!r}')
    low, high = int(match[1]), int(match[2])
    return [(1, minor) for minor in range(low, high + 1)]


def kube_versions() -> list[str]:
    """The versions .ci/deploy-checks validates: every minor from the chart's lower bound (kubeVersion) to the
    newest the installed kubernetes-validate has schemas for. A minor in between that it does not know is an
    error. tests/deploy/test_assets.py checks that this is the range the chart states."""
    from kubernetes_validate.utils import all_versions

    known = {tuple(int(x) for x in v.split(".")[:2]) for v in all_versions()}
    low = kube_lower_bound()
    newest = max((v for v in known if v[0] == 1), default=None)
    if newest is None or newest < low:
        raise ValueError(f"the installed kubernetes-validate knows no Kubernetes from 1.{low[1]} on: upgrade it")
    wanted = [(1, minor) for minor in range(low[1], newest[1] + 1)]
    unknown = [f"{a}.{b}" for a, b in wanted if (a, b) not in known]
    if unknown:
        raise ValueError(f"the installed kubernetes-validate has no schemas for {', '.join(unknown)}")
    return [f"{a}.{b}.0" for a, b in wanted]


# The newest version the chart states it is validated for; a `go install`ed helm would otherwise render for
# its built-in default, v1.20, and refuse the chart.
KUBE_VERSION = "{}.{}.0".format(*stated_kube_minors()[-1])

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
            versions = kube_versions()
            stated = [f"{a}.{b}.0" for a, b in stated_kube_minors()]
        except ValueError as error:
            print(error, file=sys.stderr)
            return 1
        if versions != stated:  # tests/deploy/test_assets.py fails on it too
            print(f"note: Chart.yaml {VALIDATED_ANNOTATION} states {stated[0]}..{stated[-1]}, but "
                  f"{versions[0]}..{versions[-1]} are validated: update the annotation", file=sys.stderr)
        print(" ".join(versions))
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

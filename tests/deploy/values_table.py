"""The values table of helm/stream/README.md, made from values.yaml and its `# --` comments.

  python -m tests.deploy.values_table           print the table
  python -m tests.deploy.values_table --write   replace the table in the README (between the markers)

A key with a `# --` comment is one row (its children are not listed); other mappings are walked into.
tests/deploy/test_assets.py checks that the README holds exactly this table.
"""

from __future__ import annotations

import json
import re
import sys

import yaml

from tests.deploy.chart import CHART

VALUES = CHART / "values.yaml"
README = CHART / "README.md"
BEGIN = "<!-- values table: python -m tests.deploy.values_table --write -->"
END = "<!-- end of values table -->"

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):")
_COMMENT = re.compile(r"^ *# ?(?P<text>.*)$")


def descriptions(text: str) -> dict[str, str]:
    """key path -> description, from `# -- ...` comments (and the comment lines right after them)."""
    found: dict[str, str] = {}
    path: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in text.splitlines():
        comment = _COMMENT.match(line)
        if comment:
            body = comment.group("text")
            if body.startswith("-- "):
                pending = [body[3:]]
            elif pending is not None:
                pending.append(body)
            continue
        key = _KEY.match(line)
        if key is None:
            if not line.strip().startswith("-"):
                pending = None
            continue
        indent = len(key.group("indent"))
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, key.group("key")))
        if pending is not None:
            found[".".join(k for _, k in path)] = " ".join(pending).strip()
        pending = None
    return found


def rows(values: dict, described: dict[str, str], prefix: str = "") -> list[tuple[str, object, str]]:
    out = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path not in described and isinstance(value, dict) and value:
            out += rows(value, described, f"{path}.")
        else:
            out.append((path, value, described.get(path, "")))
    return out


def table() -> str:
    text = VALUES.read_text()
    lines = ["| key | default | description |", "|---|---|---|"]
    for path, value, description in rows(yaml.safe_load(text), descriptions(text)):
        default = json.dumps(value, separators=(", ", ": ")).replace("|", r"\|")
        description = description.replace("|", r"\|")
        lines.append(f"| `{path}` | `{default}` | {description} |")
    return "\n".join(lines)


def readme_with_table(readme: str) -> str:
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:start] + "\n" + table() + "\n" + readme[end:]


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        README.write_text(readme_with_table(README.read_text()))
    else:
        print(table())

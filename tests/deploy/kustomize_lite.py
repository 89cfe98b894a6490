"""A small kustomize for the subset deploy/k8s uses (the kustomize and kubectl binaries are not available offline):
`resources` (files and kustomization directories), `namespace`, `configMapGenerator` with `files` (stable names:
`generatorOptions.disableNameSuffixHash`), and inline JSON 6902 `patches` with a kind/name `target`. Anything else
in a kustomization.yaml is an error, so a manifest never relies on a feature this renderer would silently skip.

Not a test module: tests/deploy/test_k8s.py imports it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions", "patches"}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PersistentVolume",
    "StorageClass",
    "CustomResourceDefinition",
    "PriorityClass",
}


class KustomizeError(ValueError):
    pass


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build directory` would print (same content; order: resources, then generated)."""
    directory = directory.resolve()
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{directory}: kind must be Kustomization")
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += build(path)
        elif path.is_file():
            _inside(directory, path)  # kustomize's load restrictor: plain files only from the kustomization's tree
            objects += load_documents(path)
        else:
            raise KustomizeError(f"{directory}: resource {entry} does not exist")
    objects += _generate_config_maps(directory, spec)
    for patch in spec.get("patches", []):
        _apply_patch(objects, patch, directory)
    if "namespace" in spec:
        for obj in objects:
            _set_namespace(obj, spec["namespace"])
    seen: set[tuple[str, str]] = set()
    for obj in objects:
        ident = (obj["kind"], obj["metadata"]["name"])
        if ident in seen:
            raise KustomizeError(f"{directory}: {ident[0]}/{ident[1]} is defined twice")
        seen.add(ident)
    return objects


def _inside(directory: Path, path: Path) -> None:
    try:
        path.relative_to(directory)
    except ValueError:
        raise KustomizeError(f"{path} is outside {directory} (kustomize's load restrictor refuses it)") from None


def _generate_config_maps(directory: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    generators = spec.get("configMapGenerator", [])
    if generators and not (spec.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise KustomizeError(f"{directory}: generated names need generatorOptions.disableNameSuffixHash here")
    maps = []
    for gen in generators:
        if set(gen) - {"name", "files"}:
            raise KustomizeError(f"{directory}: configMapGenerator supports name and files only")
        data: dict[str, str] = {}
        for item in gen["files"]:
            key, _, source = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
            path = (directory / source).resolve()
            _inside(directory, path)
            if key in data:
                raise KustomizeError(f"{directory}: {gen['name']} has two files named {key}")
            data[key] = path.read_text()
        maps.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return maps


def _set_namespace(obj: dict[str, Any], namespace: str) -> None:
    if obj["kind"] not in CLUSTER_SCOPED:
        obj["metadata"]["namespace"] = namespace
    if obj["kind"] in {"RoleBinding", "ClusterRoleBinding"}:
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace


def _apply_patch(objects: list[dict[str, Any]], patch: dict[str, Any], directory: Path) -> None:
    if set(patch) != {"target", "patch"} or set(patch["target"]) - {"kind", "name"}:
        raise KustomizeError(f"{directory}: only inline JSON 6902 patches with a kind/name target are supported")
    target = patch["target"]
    matches = [
        o
        for o in objects
        if o["kind"] == target.get("kind", o["kind"])
        and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
    ]
    if not matches:
        raise KustomizeError(f"{directory}: patch target {target} matches nothing")
    operations = yaml.safe_load(patch["patch"])
    if not isinstance(operations, list):
        raise KustomizeError(f"{directory}: a JSON 6902 patch is a list of operations")
    for obj in matches:
        for op in operations:
            json_patch(obj, op)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: dict[str, Any], op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) in place; a missing parent is an error, as in kustomize."""
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError):
            raise KustomizeError(f"{op['op']} {op['path']}: {part!r} does not exist") from None
    value = copy.deepcopy(op.get("value"))
    if op["op"] == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value
    elif op["op"] in ("replace", "remove"):
        exists = (0 <= int(last) < len(node)) if isinstance(node, list) else last in node
        if not exists:
            raise KustomizeError(f"{op['op']} {op['path']}: nothing there")
        if op["op"] == "remove":
            del node[int(last) if isinstance(node, list) else last]
        else:
            node[int(last) if isinstance(node, list) else last] = value
    else:
        raise KustomizeError(f"unsupported patch operation {op['op']!r}")

"""Validation of rendered manifests against the upstream CRDs in tests/data/k8s (unmodified copies; the
README there names their tags), as the API server validates a custom resource created with strict field
validation: the served version's openAPIV3Schema with unknown fields refused, types (nullable,
int-or-string), enums, patterns, bounds, required fields, list-map and set uniqueness, the root metadata
as ObjectMeta, and the CEL rules that apply at creation (evaluated with the `cel` package; the transition
rules that read oldSelf apply to updates only). Core kinds are checked with kubernetes-validate."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cel
import jsonschema
import kubernetes_validate
import yaml

CRD_DIR = Path(__file__).resolve().parent / "data" / "k8s"
K8S_VERSION = "1.35.0"  # the Kubernetes schemas of core kinds (the kubectl / client version the project installs)
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
OBJECT_META = {  # the parts of ObjectMeta a manifest sets (the rest is the server's)
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {
            "type": "object",
            "propertyNames": {"pattern": LABEL_KEY},
            "additionalProperties": {
                "type": "string",
                "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                "maxLength": 63,
            },
        },
        "annotations": {
            "type": "object",
            "propertyNames": {"pattern": LABEL_KEY},
            "additionalProperties": {"type": "string"},
        },
    },
}


def strict(schema: Any) -> Any:
    """A CRD structural schema as JSON Schema: objects with declared properties take no others (the API
    server prunes them; strict field validation refuses them), and the Kubernetes extensions in JSON terms."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: strict(value) if key in ("items", "additionalProperties", "allOf", "anyOf", "oneOf", "not") else value
        for key, value in schema.items()
        if key != "properties"
    }
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
    if schema.get("x-kubernetes-embedded-resource"):
        out.setdefault("properties", {}).update(
            {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
        )
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _cel_rules(validator, rules, instance, schema) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if re.search(r"\boldSelf\b", rule["rule"]):
            continue  # a transition rule: only on update
        try:
            passed = cel.evaluate(rule["rule"], {"self": instance})
        except Exception as error:
            yield jsonschema.ValidationError(f"CEL rule {rule['rule']!r} could not be evaluated: {error}")
            continue
        if passed is not True:
            yield jsonschema.ValidationError(rule.get("message") or f"failed rule: {rule['rule']}")


def _unique_keys(validator, keys, instance, schema) -> Iterator[jsonschema.ValidationError]:
    seen = set()
    for item in instance if isinstance(instance, list) else []:
        key = tuple(repr(item.get(k)) for k in keys) if isinstance(item, dict) else repr(item)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entries for key {dict(zip(keys, key))}")
        seen.add(key)


def _list_type(validator, kind, instance, schema) -> Iterator[jsonschema.ValidationError]:
    if kind == "set" and isinstance(instance, list) and len({repr(x) for x in instance}) != len(instance):
        yield jsonschema.ValidationError("duplicate entries in a set")


CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {
        "x-kubernetes-validations": _cel_rules,
        "x-kubernetes-list-map-keys": _unique_keys,
        "x-kubernetes-list-type": _list_type,
    },
)


@functools.cache
def crd_validators() -> dict[tuple, Any]:
    """(apiVersion, kind) -> a validator of that served CRD version (the CRDs are read once)."""
    index = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = strict(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            index[(f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])] = CrdValidator(schema)
    return index


def errors(doc: dict[str, Any]) -> list[str]:
    """What the API server would refuse in one object, as 'path: message' lines (empty: valid)."""
    validator = crd_validators().get((doc.get("apiVersion"), doc.get("kind")))
    if validator is None:
        group = str(doc.get("apiVersion")).split("/")[0]
        if "." in group and not group.endswith(".k8s.io"):  # a custom resource (core groups: rbac, networking, ...)
            return [f"no CRD for {doc.get('apiVersion')} {doc.get('kind')} in {CRD_DIR}"]
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            return [f"{'.'.join(map(str, error.path))}: {error.message}"]
        return []
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '.'}: {error.message}" for error in validator.iter_errors(doc)
    ]


def check(docs) -> None:
    """Assert that every object is valid, naming each problem."""
    problems = [f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}: {line}" for d in docs for line in errors(d)]
    assert problems == [], "\n".join(problems)

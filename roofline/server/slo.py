"""Latency classes and tenants on the server: who sent a request, its priority and its SLO.

`--slo-class interactive=ttft:1s,tpot:100ms,priority:0` names a class; `--tenant NAME=weight:2,class:interactive`
gives a tenant a fair-share weight and a default class. A tenant is an API key when the server has keys
(NAME is then the key itself; the engine only ever sees a digest of it) and otherwise the request's
OpenAI `user` field. A request may name a class (`slo_class`), bring its own targets (`slo`), and set
`priority`; what it leaves out comes from its tenant's class.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from roofline.engine.fair_share import DEFAULT_TENANT
from roofline.errors import ConfigError
from roofline.sampling_params import SLO
from roofline.server.auth import bearer_token
from roofline.openai.errors import APIError

NO_CLASS = "none"  # the metrics label of requests without targets
CUSTOM_CLASS = "custom"  # the label of requests that bring their own targets and name no class
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(ms|s)?\s*$")


@dataclass(frozen=True)
class SLOClass:
    """A named latency class: targets and a priority (lower runs first)."""

    name: str
    slo: SLO | None = None
    priority: int = 0


@dataclass(frozen=True)
class TenantSpec:
    """A tenant's fair-share weight and default class."""

    weight: float = 1.0
    slo_class: str | None = None


@dataclass(frozen=True)
class Job:
    """How the engine should treat one HTTP request."""

    priority: int
    slo: SLO | None
    tenant: str
    class_name: str  # the metrics label


def parse_duration_ms(text: str) -> float:
    """'1s', '250ms' or a bare number of milliseconds -> milliseconds."""
    m = _DURATION.match(text)
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"not a positive duration: {text!r} (try 1s or 100ms)")
    return float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)


def _fields(text: str, what: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip():
        raise ConfigError(f"{what} must look like NAME=key:value,...; got {text!r}")
    fields = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = item.partition(":")
        if not sep or not value.strip():
            raise ConfigError(f"{what} {name!r}: {item!r} is not key:value")
        fields[key.strip().lower()] = value.strip()
    return name.strip(), fields


def parse_slo_class(text: str) -> SLOClass:
    """`NAME=ttft:1s,tpot:100ms,priority:0` (any subset of the keys) -> SLOClass."""
    name, fields = _fields(text, "--slo-class")
    unknown = set(fields) - {"ttft", "tpot", "priority"}
    if unknown:
        raise ConfigError(f"--slo-class {name!r}: unknown key {sorted(unknown)[0]!r} (use ttft, tpot, priority)")
    ttft = parse_duration_ms(fields["ttft"]) if "ttft" in fields else None
    tpot = parse_duration_ms(fields["tpot"]) if "tpot" in fields else None
    try:
        priority = int(fields.get("priority", "0"))
    except ValueError:
        raise ConfigError(f"--slo-class {name!r}: priority must be an integer, got {fields['priority']!r}") from None
    slo = SLO(ttft, tpot)
    return SLOClass(name, None if slo.is_empty else slo, priority)


def parse_tenant(text: str) -> tuple[str, TenantSpec]:
    """`NAME=weight:2,class:interactive` -> (NAME, TenantSpec)."""
    name, fields = _fields(text, "--tenant")
    unknown = set(fields) - {"weight", "class"}
    if unknown:
        raise ConfigError(f"--tenant {name!r}: unknown key {sorted(unknown)[0]!r} (use weight, class)")
    try:
        weight = float(fields.get("weight", "1"))
    except ValueError:
        weight = -1.0
    if not 0 < weight < float("inf"):
        raise ConfigError(f"--tenant {name!r}: weight must be a number > 0, got {fields.get('weight')!r}")
    return name, TenantSpec(weight, fields.get("class"))


def key_tenant(key: str) -> str:
    """The engine's name for the tenant of an API key: a digest, so keys never reach logs or metrics."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def tenant_name(configured: str, has_keys: bool) -> str:
    """The engine's tenant id for a name given to --tenant (an API key when the server has keys, else a user)."""
    return key_tenant(configured) if has_keys else f"user:{configured}"


def tenant_weights(tenants: dict[str, TenantSpec], has_keys: bool) -> dict[str, float]:
    """The engine's tenant -> weight map."""
    return {tenant_name(name, has_keys): spec.weight for name, spec in tenants.items()}


def check_classes(classes: dict[str, SLOClass], tenants: dict[str, TenantSpec]) -> None:
    """Every class a tenant names exists."""
    for name, spec in tenants.items():
        if spec.slo_class is not None and spec.slo_class not in classes:
            raise ConfigError(f"--tenant {name!r} names class {spec.slo_class!r}, which no --slo-class defines")


def resolve_job(req, classes: dict[str, SLOClass], tenants: dict[str, TenantSpec], has_keys: bool,
                authorization: bytes | None) -> Job:
    """Priority, targets and tenant of a request (`req`: chat or completion fields); an unknown class is a 400."""
    if has_keys:
        token = bearer_token(authorization)
        configured = token.decode(errors="replace") if token else None
        tenant = key_tenant(configured) if configured else DEFAULT_TENANT
    else:
        configured = req.user
        tenant = f"user:{req.user}" if req.user else DEFAULT_TENANT
    spec = tenants.get(configured) if configured is not None else None
    class_name = req.slo_class or (spec.slo_class if spec else None)
    if class_name is not None and class_name not in classes:
        known = ", ".join(sorted(classes)) or "none are defined"
        raise APIError(400, f"unknown slo_class {class_name!r} (known: {known})", code="invalid_value",
                       param="slo_class")
    cls = classes.get(class_name) if class_name else None
    slo = cls.slo if cls else None
    if req.slo is not None:  # the request's own targets win, field by field
        base = slo or SLO()
        slo = SLO(req.slo.ttft_ms if req.slo.ttft_ms is not None else base.ttft_ms,
                  req.slo.tpot_ms if req.slo.tpot_ms is not None else base.tpot_ms)
        slo = None if slo.is_empty else slo
    priority = req.priority if "priority" in req.model_fields_set or cls is None else cls.priority
    label = class_name or (CUSTOM_CLASS if slo is not None else NO_CLASS)
    return Job(priority, slo, tenant, label)

"""Request fields -> StructuredSpec: OpenAI's `response_format` and roofline's `guided_regex` / `guided_grammar`.

Only the shape is checked here; whether a schema, regex or grammar compiles is the grammar engine's
answer (the engine compiles it before the request is queued: a 400 naming what failed).
"""

from __future__ import annotations

from typing import Any

from roofline.engine.structured import GRAMMAR_MISSING, grammar_available
from roofline.errors import InvalidRequestError
from roofline.sampling_params import StructuredSpec
from roofline.openai.errors import APIError
from roofline.server.protocol import SamplingFields

_FORMAT_TYPES = ("text", "json_object", "json_schema")


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, code="invalid_value", param=param)


def _from_response_format(fmt: dict[str, Any]) -> StructuredSpec | None:
    kind = fmt.get("type")
    if kind not in _FORMAT_TYPES:
        raise _bad(f"response_format.type must be one of {', '.join(_FORMAT_TYPES)}, got {kind!r}",
                   "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec.json_object()
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format json_schema needs a json_schema object: {\"name\": ..., \"schema\": {...}}",
                   "response_format.json_schema")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("response_format.json_schema.name must be a non-empty string", "response_format.json_schema.name")
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        raise _bad("response_format.json_schema.strict must be a boolean", "response_format.json_schema.strict")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema must be a JSON schema object",
                   "response_format.json_schema.schema")
    return StructuredSpec.json(schema)


def structured_spec(req: SamplingFields) -> StructuredSpec | None:
    """The constraint a request asks for (at most one of response_format, guided_regex, guided_grammar), or None."""
    found: list[tuple[str, StructuredSpec]] = []
    try:
        if req.response_format is not None:
            spec = _from_response_format(req.response_format)
            if spec is not None:
                found.append(("response_format", spec))
        if req.guided_regex is not None:
            found.append(("guided_regex", StructuredSpec.regex(req.guided_regex)))
        if req.guided_grammar is not None:
            found.append(("guided_grammar", StructuredSpec.grammar(req.guided_grammar)))
    except InvalidRequestError as exc:
        raise _bad(str(exc), "response_format") from None
    if not found:
        return None
    if len(found) > 1:
        raise _bad(f"give one output constraint, not {' and '.join(name for name, _ in found)}", found[1][0])
    param, spec = found[0]
    if not grammar_available():
        raise APIError(400, GRAMMAR_MISSING, code="grammar_engine_missing", param=param)
    return spec

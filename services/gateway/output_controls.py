"""The OpenAI fields that steer token choice beyond temperature/top-p: logit_bias and response_format, checked
here (a 400 naming the field) and put on the wire for the workers, which apply them.

The gateway never compiles a grammar (that needs the worker's tokenizer and xgrammar): it checks that a
json_schema is a JSON object a JSON Schema validator accepts, and sends it as text.
"""

from __future__ import annotations

import json
import re

from jsonschema.validators import Draft202012Validator, validator_for

from crescent.services.gateway.errors import ApiError
from crescent.services.gateway.schema import ResponseFormat

MAX_LOGIT_BIAS = 300  # OpenAI's own cap on the number of biased tokens
MAX_SCHEMA_BYTES = 64 << 10


def logit_bias_ids(bias: dict[str, float] | None, vocab_size: int | None) -> dict[int, float]:
    """OpenAI's ``{"<token id>": bias}`` as ``{id: bias}``; ids must be in the vocabulary, biases in [-100, 100]."""
    if not bias:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias holds {len(bias)} tokens; at most {MAX_LOGIT_BIAS}", param="logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        token = int(key) if re.fullmatch(r"[0-9]{1,10}", key) else None
        if token is None or token < 0 or (vocab_size is not None and token >= vocab_size):
            raise ApiError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size})",
                           param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise ApiError(400, f"logit_bias value {value} for token {key} is outside [-100, 100]",
                           param="logit_bias")
        out[token] = float(value)
    return out


def response_format_wire(fmt: ResponseFormat | None) -> str:
    """"" for free text; else the JSON the worker compiles: {"type": "json_object"} or {"type": "json_schema",
    "schema": {...}}."""
    if fmt is None or fmt.type == "text":
        return ""
    if fmt.type == "json_object":
        return json.dumps({"type": "json_object"})
    spec = fmt.json_schema
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ApiError(400, "response_format json_schema needs {'name': ..., 'schema': {...}}",
                       param="response_format.json_schema")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ApiError(400, "response_format.json_schema.schema must be a JSON object",
                       param="response_format.json_schema.schema")
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except Exception as exc:  # SchemaError, or a $schema we do not know
        raise ApiError(400, f"response_format.json_schema.schema is not a valid JSON Schema: "
                            f"{str(exc).splitlines()[0]}", param="response_format.json_schema.schema") from exc
    text = json.dumps({"type": "json_schema", "schema": schema})
    if len(text) > MAX_SCHEMA_BYTES:
        raise ApiError(400, f"the response_format schema is {len(text)} bytes; at most {MAX_SCHEMA_BYTES}",
                       param="response_format.json_schema.schema")
    return text

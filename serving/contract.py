"""The OpenAPI document as the server's contract, built from the config the replica serves.

FastAPI's generated document knows the request models' types but not the limits the checks in
:mod:`serving.api` apply (they come from ``serve.limits`` and the dataset's character names), nor
the statuses the edge and the budgets answer with. :func:`contract` completes it so that a request
the schema allows is one the server accepts, and every status the server can answer is listed with
its body:

- limits as constraints: frames (``maxItems``; for ``continue`` the sum with ``k``, one ``anyOf``
  branch per caption count), caption length and a pattern that needs a visible character and
  refuses control characters, steps, guidance, seed, the reference images' number,
  names and size;
- every status with the one error shape (``ErrorBody``), ``Retry-After`` on a 503;
- the API key declared only when the server has one.

What no JSON Schema can say is left to the description: that a reference image is a PNG whose
sides are within ``max_image_side`` (refused with 422 / 413).
"""

from __future__ import annotations

import copy
import functools
import unicodedata

from storygpt.config import ServeLimits

from serving.api import DATA_URL_PREFIX, MAX_SEED, max_image_chars

ERROR_BODY = {
    "type": "object", "required": ["detail", "field", "errors"],
    "properties": {
        "detail": {"type": "string", "description": "one line naming the first field at fault"},
        "field": {"type": "string", "description": "that field, dotted (captions[2], reference_images['Emma'], body)"},
        "errors": {"type": "array", "items": {
            "type": "object", "required": ["field", "message"],
            "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
        "error_id": {"type": "string", "description": "500 only: the id the server log files the detail under"},
    },
}
STORY_ERRORS = {
    "400": "malformed JSON, or a header that would switch off cancellation",
    "401": "the API key is missing or wrong",
    "408": "the body did not arrive within serve.limits.body_timeout_s",
    "411": "a chunked body: send it with Content-Length",
    "413": "the body or a reference image is over its cap",
    "422": "a field is invalid or over a limit (the field is named)",
    "500": "an unexpected failure; the detail is in the server log under error_id",
    "503": "the server draws as many stories as it can; retry after Retry-After seconds",
}


@functools.cache
def caption_pattern() -> str:
    """A caption with at least one visible character and no control or surrogate character: the
    same rule as :func:`serving.api._check_captions`, which first folds every run of whitespace
    (control characters such as tab and newline included) into one space. Whitespace and format
    characters such as zero-width spaces do not count as visible. Lone UTF-16 surrogates (only
    possible as ``\\ud800``-style JSON escapes) are refused too, but left out of the pattern: the
    regex engines of schema validators work on UTF-8 text, which has none, and refuse such a class."""
    banned, invisible = [], []
    for code in CODE_POINTS:
        ch = chr(code)
        category = unicodedata.category(ch)
        banned.append(category == "Cc" and not ch.isspace())  # tabs, newlines: spaces to the server
        invisible.append(category in ("Cc", "Cf") or ch.isspace())
    return f"^[^{_ranges(banned)}]*[^{_ranges(invisible)}][^{_ranges(banned)}]*$"


# Control, surrogate, format and space characters all lie in planes 0-2 and 14; the other planes
# hold letters, private use and unassigned code points only (checked against Python's database by
# tests/test_serve_contract.py), so the scan skips them: 1.6 s instead of 4.5 on one core.
CODE_POINTS = [*range(0x30000), *range(0xE0000, 0xF0000)]


def _ranges(hits: list[bool]) -> str:
    """A regex class body of the code points in CODE_POINTS whose entry in ``hits`` is true."""
    # (surrogates never hit: the callers leave category Cs out)
    out, start, last = [], None, None
    for code, hit in zip([*CODE_POINTS, None], [*hits, False]):
        contiguous = last is not None and code == last + 1
        if start is not None and (not hit or not contiguous):
            out.append(_escape(start) + ("" if last == start else "-" + _escape(last)))
            start = None
        if hit and start is None:
            start = code
        last = code
    return "".join(out)


def _escape(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)  # astral: the character itself


def contract(openapi: dict, limits: ServeLimits, names: list[str], api_key_required: bool) -> dict:
    """``openapi`` (FastAPI's document) with the served limits, statuses and security."""
    doc = copy.deepcopy(openapi)
    schemas = doc["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorBody"] = ERROR_BODY
    for model in ("StoryRequest", "ContinueRequest"):
        _constrain(schemas[model]["properties"], limits, names)
    _continue_frames(schemas["ContinueRequest"], limits.max_frames)

    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            statuses = STORY_ERRORS if path.startswith("/v1/stories") else {"500": STORY_ERRORS["500"]}
            for status, why in statuses.items():
                if status == "401" and not api_key_required:
                    continue
                responses[status] = {"description": why, "content": error_ref}
            if "503" in responses:
                responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                               "description": "seconds to wait"}}
            if not api_key_required:
                operation.pop("security", None)
    if not api_key_required:
        doc["components"].pop("securitySchemes", None)
    return doc


def _constrain(properties: dict, limits: ServeLimits, names: list[str]) -> None:
    properties["captions"].update(maxItems=limits.max_frames, items={
        "type": "string", "minLength": 1, "maxLength": limits.max_caption_chars, "pattern": caption_pattern()})
    properties["steps"]["anyOf"][0].update(minimum=1, maximum=limits.max_steps)
    properties["guidance"]["anyOf"][0].update(minimum=1, maximum=limits.max_guidance)
    properties["seed"].update(minimum=0, maximum=MAX_SEED - 1)
    if "reference_images" in properties:
        image = {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png",
                 "maxLength": max_image_chars(limits) + len(DATA_URL_PREFIX)}  # the server's own bound
        properties["reference_images"]["anyOf"][0] = {
            "type": "object", "maxProperties": limits.max_reference_images,
            "propertyNames": {"enum": list(names)}, "additionalProperties": image}


def _continue_frames(model: dict, max_frames: int) -> None:
    """captions + k <= max_frames, as one branch per caption count."""
    model["properties"]["k"]["maximum"] = max_frames - 1
    model["anyOf"] = [{"properties": {"captions": {"minItems": n, "maxItems": n},
                                      "k": {"maximum": max_frames - n}}}
                      for n in range(1, max_frames + 1)]

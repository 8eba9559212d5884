"""The HTTP API's request bodies and every check a request goes through before a model sees it.

Two layers, both answering with a 4xx whose message names the field:
1. structure (pydantic, strict, ``extra="forbid"``): types, required fields, unknown fields,
   an empty ``captions`` list, ``k < 0`` — FastAPI turns these into 422s (:func:`describe_errors`);
2. limits (:func:`check_story`, :func:`check_continuation`): ``cfg.serve.limits`` and the
   dataset's character names, and decoding the reference images (valid base64 PNGs, size, sides).

No Ray here: the checks are plain functions the tests call directly too.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import unicodedata
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from storygpt.config import ServeLimits
from storygpt.data.characters import CharacterTable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_SEED = 2**62  # seed + frame index stays a valid torch seed
DATA_URL_PREFIX = "data:image/png;base64,"
MAX_PNG_CHUNKS = 64  # ahead of the image data (see _check_png_chunks)


class RequestError(ValueError):
    """A request the server refuses: ``field`` (dotted, e.g. ``captions[2]``) and why."""

    def __init__(self, field: str, message: str, status: int = 422, retry_after_s: int | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status
        self.headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None

    def body(self) -> dict:
        return error_body([(self.field, self.message)])


def error_body(errors: list[tuple[str, str]]) -> dict:
    """What every 4xx answers: ``detail`` (one line naming the first field) and ``errors``."""
    field, message = errors[0]
    return {"detail": f"{field}: {message}", "field": field,
            "errors": [{"field": f, "message": m} for f, m in errors]}


# ----------------------------------------------------------------------------- request bodies
def _integral(value):
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema's ``integer`` says); 3.5,
    strings and booleans stay refused by the strict check that follows."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integer = Annotated[int, BeforeValidator(_integral)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    captions: list[str] = Field(min_length=1, description="one caption per frame, in order", examples=[
        ["Emma waves hello in the forest.", "Later, she sits down with Bruno.", "They eat lunch."]])
    steps: Integer | None = Field(default=None, description="denoising steps (default: char_ldm.sample_steps)")
    guidance: float | None = Field(default=None, description="classifier-free guidance scale, >= 1 "
                                                             "(default: char_ldm.guidance_scale)")
    seed: Integer = Field(default=0, description="frame i is drawn with seed + i: the same request, the same frames")


class StoryRequest(_Body):
    """``POST /v1/stories`` and ``/v1/stories/stream``."""

    reference_images: dict[str, str] | None = Field(
        default=None, description="character name -> base64 PNG (a data: URL is accepted too). A frame "
        "whose caption names one of these characters is drawn from the Char-LDM's own fused "
        "conditioning of its caption with these images; other frames from the aligner's.")


class ContinueRequest(_Body):
    """``POST /v1/stories/continue``: draw ``captions``, then let the LM write and draw ``k`` more."""

    k: Integer = Field(ge=0, description="frames the LM writes the caption of, after the given ones")


# ----------------------------------------------------------------------------- what a model runs
@dataclass(frozen=True)
class StoryJob:
    """A checked request, as the deployments take it (plain data: it crosses process boundaries)."""

    captions: list[str]
    k: int  # continued frames (0: draw the captions only)
    steps: int
    guidance: float
    seed: int
    references: dict[str, np.ndarray]  # canonical character name -> (H, W, 3) uint8


def check_story(req: StoryRequest, limits: ServeLimits, table: CharacterTable, defaults: tuple[int, float]) -> StoryJob:
    captions = _check_captions(req.captions, 0, limits)
    references = check_reference_images(req.reference_images or {}, limits, table)
    return StoryJob(captions, 0, *_check_sampling(req, limits, defaults), references)


def check_continuation(req: ContinueRequest, limits: ServeLimits, defaults: tuple[int, float]) -> StoryJob:
    captions = _check_captions(req.captions, req.k, limits)
    return StoryJob(captions, req.k, *_check_sampling(req, limits, defaults), {})


def _check_captions(captions: list[str], k: int, limits: ServeLimits) -> list[str]:
    if len(captions) > limits.max_frames:
        raise RequestError("captions", f"at most {limits.max_frames} frames per story, got {len(captions)}")
    if len(captions) + k > limits.max_frames:
        raise RequestError("k", f"{len(captions)} captions + k={k} continued frames exceeds the "
                                f"{limits.max_frames} frames a story may have")
    out = []
    for i, caption in enumerate(captions):
        if len(caption) > limits.max_caption_chars:  # as sent: the limit the OpenAPI document states
            raise RequestError(f"captions[{i}]", f"at most {limits.max_caption_chars} characters, got {len(caption)}")
        text = " ".join(caption.split())  # newlines would end a caption inside the LM's context
        if not "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip():
            raise RequestError(f"captions[{i}]", "empty caption (nothing but spaces or zero-width characters)")
        bad = next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cs")), None)
        if bad is not None:  # NUL, terminal escapes, lone UTF-16 surrogates (not encodable as UTF-8)
            raise RequestError(f"captions[{i}]", f"control or surrogate character U+{ord(bad):04X} is not allowed")
        out.append(text)
    return out


def _check_sampling(req: _Body, limits: ServeLimits, defaults: tuple[int, float]) -> tuple[int, float, int]:
    steps = defaults[0] if req.steps is None else req.steps
    guidance = defaults[1] if req.guidance is None else req.guidance
    if not 1 <= steps <= limits.max_steps:
        raise RequestError("steps", f"expected 1..{limits.max_steps}, got {steps}")
    if not math.isfinite(guidance) or not 1 <= guidance <= limits.max_guidance:
        raise RequestError("guidance", f"expected 1..{limits.max_guidance}, got {guidance}")
    if not 0 <= req.seed < MAX_SEED:
        raise RequestError("seed", f"expected 0 <= seed < 2**62, got {req.seed}")
    return steps, float(guidance), req.seed


def check_reference_images(images: dict[str, str], limits: ServeLimits, table: CharacterTable) -> dict[str, np.ndarray]:
    """Canonical character name -> (H, W, 3) uint8, every image a checked PNG."""
    if len(images) > limits.max_reference_images:
        raise RequestError("reference_images", f"at most {limits.max_reference_images} images, got {len(images)}")
    out: dict[str, np.ndarray] = {}
    for name, data in images.items():
        field = f"reference_images[{name!r}]"
        character = table.get(name)
        if character is None:
            raise RequestError(field, f"unknown character; this model knows {', '.join(table.names)}")
        if character.name in out:
            raise RequestError(field, f"{character.name} has two reference images")
        out[character.name] = decode_png(data, field, limits)
    return out


def max_image_chars(limits: ServeLimits) -> int:
    """The longest base64 text (its data: prefix removed) a reference image may arrive as."""
    return 4 * math.ceil(limits.max_image_bytes / 3) + 4


def decode_png(data: str, field: str, limits: ServeLimits) -> np.ndarray:
    from PIL import Image

    if data.startswith(DATA_URL_PREFIX):
        data = data[len(DATA_URL_PREFIX):]
    if len(data) > max_image_chars(limits):  # before decoding anything
        raise RequestError(field, f"image larger than {limits.max_image_bytes} bytes", status=413)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field, "not valid base64") from None
    if len(raw) > limits.max_image_bytes:
        raise RequestError(field, f"image larger than {limits.max_image_bytes} bytes", status=413)
    if not raw.startswith(PNG_SIGNATURE):
        raise RequestError(field, "not a PNG image (expected base64 of a .png file)")
    _check_png_chunks(raw, field)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size  # from the header: checked before any pixel is decoded
            if max(width, height) > limits.max_image_side:
                raise RequestError(field, f"image is {width}x{height}; at most {limits.max_image_side} "
                                          "pixels a side", status=413)
            pixels = np.asarray(image.convert("RGB"))
    except RequestError:
        raise
    except Exception as err:  # PIL: truncated or corrupt data
        raise RequestError(field, f"not a readable PNG ({type(err).__name__})") from None
    return pixels


def _check_png_chunks(raw: bytes, field: str) -> None:
    """At most MAX_PNG_CHUNKS chunks before the image data. PIL parses every chunk ahead of IDAT
    in Python: one legal 4 MB image made of tiny text chunks costs about a second of CPU, and a
    request carries several; an image needs a handful (IHDR, PLTE, a few metadata chunks)."""
    offset = len(PNG_SIGNATURE)
    for _ in range(MAX_PNG_CHUNKS):
        if offset + 8 > len(raw):
            return  # truncated: PIL says so, below
        length = int.from_bytes(raw[offset:offset + 4], "big")
        if raw[offset + 4:offset + 8] in (b"IDAT", b"IEND"):
            return
        offset += 12 + length  # length, type, data, CRC
    raise RequestError(field, f"PNG has more than {MAX_PNG_CHUNKS} chunks before its image data")


# ----------------------------------------------------------------------------- 422 messages
def describe_errors(errors: list[dict]) -> tuple[int, dict]:
    """FastAPI's validation errors → (status, body) naming each field plainly: ``captions[1]``,
    ``k``, ``body`` (bad JSON answers 400)."""
    out = []
    status = 422
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        field = _dotted(loc) or "body"
        kind = e.get("type", "")
        if kind == "json_invalid":
            status = 400
            out.append(("body", f"not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"))
        elif kind == "missing":
            out.append((field, "required" if loc else "a JSON object body is required"))
        elif kind == "extra_forbidden":
            out.append((field, "unknown field"))
        elif kind == "model_type" or (not loc and kind.endswith("_type")):
            out.append((field, "expected a JSON object"))
        elif kind == "too_short" and field == "captions":
            out.append((field, "give at least one caption"))
        else:
            out.append((field, f"{e.get('msg', 'invalid')} (got {_short(e.get('input'))})"))
    return status, error_body(out or [("body", "invalid request")])


def _dotted(loc: list) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

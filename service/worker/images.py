"""Encode PIL images as PNG, JPEG or WebP; PNGs carry the generation parameters in a text chunk."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image, PngImagePlugin

from service.jobs.model import MEDIA_TYPES


def encode(image: Image.Image, fmt: str, parameters: dict[str, Any] | None = None) -> bytes:
    """The image in ``fmt``; PNG gets a ``parameters`` tEXt chunk (prompt, seed, model, variant, steps…)."""
    buf = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", json.dumps(parameters, sort_keys=True))
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=95)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=90)
    else:
        raise ValueError(f"unknown output format {fmt!r}; use one of {', '.join(MEDIA_TYPES)}")
    return buf.getvalue()


def encode_b64(image: Image.Image, fmt: str, parameters: dict[str, Any] | None = None) -> str:
    return base64.b64encode(encode(image, fmt, parameters)).decode("ascii")

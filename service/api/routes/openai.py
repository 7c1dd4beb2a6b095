"""``POST /v1/images/generations``: the OpenAI Images API shape over the same jobs.

Extension fields (``seed``, ``num_inference_steps``/``steps``, ``guidance_scale``/``guidance``,
``negative_prompt``, ``variant``) go in the same body (OpenAI SDK: ``extra_body={...}``). Unknown OpenAI
fields (``quality``, ``style``, ``user``…) are accepted and ignored. Only ``response_format=b64_json``.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from service.api.deps import JobsDep, SettingsDep
from service.api.errors import validation_problem
from service.api.routes.common import finished_or_accepted, principal
from service.api.schemas import GenerateRequest, OpenAIImage, OpenAIImageRequest, OpenAIImagesResponse
from service.registry import parse_size

router = APIRouter(prefix="/v1/images", tags=["openai"])


def _to_native(body: OpenAIImageRequest) -> GenerateRequest:
    if body.response_format != "b64_json":
        raise validation_problem("response_format", "only 'b64_json' is supported (no hosted URLs)")
    width = height = None
    if body.size and body.size != "auto":
        try:
            width, height = parse_size(body.size)
        except ValueError as e:
            raise validation_problem("size", str(e)) from None
    try:
        return GenerateRequest(prompt=body.prompt, negative_prompt=body.negative_prompt, model=body.model,
                               variant=body.variant, width=width, height=height,
                               num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
                               seed=body.seed, n=body.n, output_format=body.output_format)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def _as_size(exc: RequestValidationError) -> RequestValidationError:
    """Report width/height problems against the field the OpenAI client actually sent: ``size``."""
    errors = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if loc and loc[-1] in ("width", "height"):
            err = {**err, "loc": ("body", "size"), "msg": f"{loc[-1]} {err.get('msg', '')}"}
        errors.append(err)
    return RequestValidationError(errors)


@router.post("/generations", response_model=OpenAIImagesResponse, summary="OpenAI-compatible image generation")
async def generations(body: OpenAIImageRequest, request: Request, jobs: JobsDep, settings: SettingsDep,
                      idempotency_key: Annotated[str | None, Header()] = None) -> Response:
    start = time.perf_counter()
    native = _to_native(body)
    try:
        sub = await jobs.submit(native, idempotency_key=idempotency_key, principal=principal(request))
    except RequestValidationError as e:
        raise _as_size(e) from None
    job = await jobs.wait(sub.job.id, settings.limits.sync_timeout_s)
    done = await finished_or_accepted(jobs, job)
    if isinstance(done, JSONResponse):
        return done
    assert done.result is not None
    p = done.params
    jobs.metrics.request_duration.labels(p.model, p.variant, "openai").observe(time.perf_counter() - start)
    answer = OpenAIImagesResponse(
        created=int(done.finished_at or time.time()), model=p.model, variant=p.variant, output_format=p.output_format,
        size=f"{p.width}x{p.height}",
        data=[OpenAIImage(b64_json=i.b64_json, seed=i.seed) for i in done.result.images])
    return JSONResponse(answer.model_dump(mode="json"), headers={"X-Job-Id": done.id})

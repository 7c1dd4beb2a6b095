"""``POST /v1/images/generations``: the OpenAI Images API shape over the same jobs.

Extension fields (``seed``, ``num_inference_steps``/``steps``, ``guidance_scale``/``guidance``,
``negative_prompt``, ``variant``, ``loras``) go in the same body (OpenAI SDK: ``extra_body={...}``). Unknown OpenAI
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
from service.api.job_errors import InvalidField
from service.api.routes.common import finished_or_accepted, principal
from service.api.schemas import GenerateRequest, OpenAIImage, OpenAIImageRequest, OpenAIImagesResponse
from service.registry import parse_size

router = APIRouter(prefix="/v1/images", tags=["openai"])


def _to_native(body: OpenAIImageRequest) -> GenerateRequest:
    width = height = None
    if body.size and body.size != "auto":
        try:
            width, height = parse_size(body.size)
        except ValueError as e:
            raise validation_problem("size", str(e)) from None
    try:
        return GenerateRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            model=body.model,
            variant=body.variant,
            width=width,
            height=height,
            num_inference_steps=body.num_inference_steps,
            guidance_scale=body.guidance_scale,
            seed=body.seed,
            n=body.n,
            output_format=body.output_format,
            loras=body.loras,
        )
    except ValidationError as e:  # width/height come from `size`: report the field the client sent
        raise RequestValidationError(
            [
                {**err, "loc": ("body", "size"), "msg": f"{err['loc'][-1]} {err['msg']}"}
                if err.get("loc") and err["loc"][-1] in ("width", "height")
                else err
                for err in e.errors()
            ]
        ) from None


@router.post("/generations", response_model=OpenAIImagesResponse, summary="OpenAI-compatible image generation")
async def generations(
    body: OpenAIImageRequest,
    request: Request,
    jobs: JobsDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> Response:
    start = time.perf_counter()
    native = _to_native(body)
    try:
        sub = await jobs.submit(native, idempotency_key=idempotency_key, principal=principal(request))
    except InvalidField as e:  # width/height came from `size`: name the field the client sent
        if e.field in ("width", "height"):
            raise InvalidField("size", f"{e.field} {e.message}", e.kind) from None
        raise
    job = await jobs.wait(sub.job.id, settings.limits.sync_timeout_s)
    done = await finished_or_accepted(jobs, job)
    if isinstance(done, JSONResponse):
        return done
    assert done.result is not None
    p = done.params
    jobs.metrics.request_duration.labels(p.model, p.variant, "openai").observe(time.perf_counter() - start)
    answer = OpenAIImagesResponse(
        created=int(done.finished_at or time.time()),
        model=p.model,
        variant=p.variant,
        output_format=p.output_format,
        size=f"{p.width}x{p.height}",
        loras=p.loras,
        data=[OpenAIImage(b64_json=i.b64_json, seed=i.seed) for i in done.result.images],
    )
    return JSONResponse(answer.model_dump(mode="json"), headers={"X-Job-Id": done.id})

"""The dependencies the routes declare: typed handles on what the app's lifespan keeps on
`app.state`, and the guards of the /v1 routes.

    @router.get("/centers")
    async def centers(model: ModelDep) -> JSONResponse: ...

The lifespan (service/app.py) is the one place that sets `app.state`; this module is the
one place that reads it. A test swaps any of these for its own:
`app.dependency_overrides[get_model] = lambda: other_model`. The image routes take the
ImagePipeline built at start-up from the settings, model, batcher, decode pool and metrics
(`get_image_pipeline`): a test that swaps one of those for them swaps the pipeline.

Every dependency here is `async`: FastAPI runs a plain `def` dependency in its thread pool,
a hop per request that a getter does not need.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from center_embed.enrolment import CentersSnapshot
from center_embed.errors import UserError
from center_embed.service.batcher import MicroBatcher
from center_embed.service.decode_pool import DecodeExecutor
from center_embed.service.error_codes import ErrorCode
from center_embed.service.errors import ApiError
from center_embed.service.pipeline import ImagePipeline
from center_embed.service.prometheus import Metrics
from center_embed.service.security import CHALLENGE, KeyChecker, bearer
from center_embed.service.served_model import ServedModel
from center_embed.service.settings import Settings

# --------------------------------------------------------------------------- what the app holds


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_model(request: Request) -> ServedModel:
    return request.app.state.model


async def get_batcher(request: Request) -> MicroBatcher:
    return request.app.state.batcher


async def get_decoder(request: Request) -> DecodeExecutor:
    """The threads that decode images (`for_image`: small and large ones apart), parse JSON
    bodies and compute /v1/distances, off the event loop."""
    return request.app.state.decoder


async def get_image_pipeline(request: Request) -> ImagePipeline:
    """What the image routes run their images through, built once when the app started
    (from the settings, model, batcher, decode pool and metrics above): one dependency
    where five would cost ~10 µs each on every image request."""
    return request.app.state.pipeline


async def get_key_checker(request: Request) -> KeyChecker:
    return request.app.state.keys


async def get_admin_key_checker(request: Request) -> KeyChecker:
    return request.app.state.admin_keys


async def get_centers(model: Annotated[ServedModel, Depends(get_model)]) -> CentersSnapshot:
    """The centers snapshot of a request, taken once when it starts: it answers from these
    to the end, whatever enrolment happens meanwhile (service/served_model.py)."""
    try:
        return model.current_centers()
    except UserError as e:  # the centers file was replaced by something unreadable
        raise ApiError(ErrorCode.CENTERS_UNAVAILABLE, str(e)) from None


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ModelDep = Annotated[ServedModel, Depends(get_model)]
BatcherDep = Annotated[MicroBatcher, Depends(get_batcher)]
DecoderDep = Annotated[DecodeExecutor, Depends(get_decoder)]
KeyCheckerDep = Annotated[KeyChecker, Depends(get_key_checker)]
AdminKeyCheckerDep = Annotated[KeyChecker, Depends(get_admin_key_checker)]
CentersDep = Annotated[CentersSnapshot, Depends(get_centers)]
ImagePipelineDep = Annotated[ImagePipeline, Depends(get_image_pipeline)]


# --------------------------------------------------------------------------- guards

BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def check_bearer(
    checker: KeyChecker, credentials: HTTPAuthorizationCredentials | None, kind: str
) -> None:
    """401 unless `credentials` is a bearer token `checker` accepts (`kind`: what to ask for)."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            ErrorCode.UNAUTHORIZED, f"missing {kind}: send Authorization: Bearer <key>", CHALLENGE
        )
    if not checker.accepts(credentials.credentials):
        raise ApiError(ErrorCode.UNAUTHORIZED, f"invalid {kind}", CHALLENGE)


async def require_key(checker: KeyCheckerDep, credentials: BearerDep) -> None:
    """401 unless the request carries an accepted API key (when the service has keys)."""
    if checker.enabled:
        check_bearer(checker, credentials, "API key")


async def v1_guards(request: Request, checker: KeyCheckerDep, credentials: BearerDep) -> None:
    """The guards of every /v1 route, in this order: an API key (when the service has keys),
    readiness, no unknown query parameter. One dependency, not three: each costs ~10 µs on
    every request."""
    await require_key(checker, credentials)
    await require_ready(request)
    await no_unknown_query(request)


async def admin_guards(
    request: Request, checker: AdminKeyCheckerDep, credentials: BearerDep
) -> None:
    """The enrolment routes' guards: as v1_guards, with an admin key instead of a query key.
    403 when the service has no admin keys (enrolment is off); query keys do not open these
    routes."""
    if not checker.enabled:
        raise ApiError(
            ErrorCode.ENROLMENT_DISABLED,
            "enrolment is off: set CENTER_EMBED_ADMIN_KEYS to open PUT/DELETE /v1/centers/{name}",
        )
    check_bearer(checker, credentials, "admin key")
    await require_ready(request)
    await no_unknown_query(request)


async def require_ready(request: Request) -> None:
    """503 until the model is loaded and warmed up (for good, when the warm-up failed)."""
    state = request.app.state
    if not state.ready:
        failure = state.warmup_error
        message = (
            f"model failed to warm up: {failure}" if failure else "model is loading or warming up"
        )
        raise ApiError(ErrorCode.NOT_READY, message)


async def no_unknown_query(request: Request) -> None:
    """Refuse query parameters the route does not declare: `?topk=3` must not pass silently."""
    route = request.scope.get("route")
    declared = {p.alias for p in getattr(getattr(route, "dependant", None), "query_params", [])}
    unknown = sorted(set(request.query_params) - declared)
    if unknown:
        allowed = ", ".join(sorted(declared)) or "none"
        raise ApiError(
            ErrorCode.VALIDATION_ERROR, f"unknown query parameter(s) {unknown}; allowed: {allowed}"
        )


V1_GUARDS = [Depends(v1_guards)]
ADMIN_GUARDS = [Depends(admin_guards)]

"""/v1/model and /v1/centers: what the served model is, and its class centers."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from center_embed.service.deps import CentersDep, ModelDep, SettingsDep
from center_embed.service.routes.common import errors, v1_router
from center_embed.service.schemas import CentersResponse, ModelResponse

router = v1_router()


@router.get("/model", response_model=ModelResponse, responses=errors(401, 503))
async def model_info(model: ModelDep, centers: CentersDep, settings: SettingsDep) -> JSONResponse:
    """The model's metadata (the file's: enrolled classes are listed by /v1/centers), the
    limits in force and the execution provider in use."""
    return JSONResponse(
        {
            "metadata": model.metadata(),
            "limits": settings.limits(),
            "provider": model.provider,
            "runtime": model.runtime,
            "model": model.summary(centers),
        }
    )


@router.get("/centers", response_model=CentersResponse, responses=errors(401, 503))
async def centers(model: ModelDep, centers: CentersDep) -> JSONResponse:
    """Every class center in label order, enrolled ones included, and the centers' version."""
    counts = centers.centers.image_counts()
    thresholds = centers.centers.thresholds
    rows = [
        {
            "label": i,
            "class_name": name,
            "center": center,
            "unknown_threshold": thresholds.get(name),
            "images": counts.get(name),
        }
        for i, (name, center) in enumerate(
            zip(centers.names, centers.centers.centers.tolist(), strict=True)
        )
    ]
    return JSONResponse(
        {
            "centers": rows,
            "dim": model.info.embedding_dim,
            "distance": model.info.distance,
            "version": centers.version,
        }
    )

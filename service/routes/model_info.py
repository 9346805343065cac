"""/v1/model and /v1/centers: what the served model is, and its class centers."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from center_embed.service.deps import ModelDep, SettingsDep
from center_embed.service.routes.common import errors, v1_router
from center_embed.service.schemas import CentersResponse, ModelResponse

router = v1_router()


@router.get("/model", response_model=ModelResponse, responses=errors(401, 503))
async def model_info(model: ModelDep, settings: SettingsDep) -> JSONResponse:
    """The model's metadata, the limits in force and the execution provider in use."""
    return JSONResponse(
        {
            "metadata": model.metadata(),
            "limits": settings.limits(),
            "provider": model.provider,
            "runtime": model.runtime,
            "model": model.summary(),
        }
    )


@router.get("/centers", response_model=CentersResponse, responses=errors(401, 503))
async def centers(model: ModelDep) -> JSONResponse:
    """Every class center, in label order."""
    rows = [
        {"label": i, "class_name": name, "center": center}
        for i, (name, center) in enumerate(
            zip(model.info.class_names, model.centers.tolist(), strict=True)
        )
    ]
    return JSONResponse({"centers": rows, "dim": model.info.embedding_dim})

"""Request and response bodies (they are the OpenAPI schema; tests/openapi.json is a copy).

The routes answer with plain JSON built from numpy (no per-float pydantic validation on the
hot path); these models describe that JSON, and the tests and the schemathesis run check
that every answer conforms.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# A 1x1 red PNG: the example request that /docs offers and schemathesis sends.
EXAMPLE_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. bad_image, queue_full")
    message: str = Field(description="what went wrong, naming the part or field")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImagesRequest(BaseModel):
    """Images as strict base64 strings (data URIs such as data:image/png;base64,... too)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"images": [f"data:image/png;base64,{EXAMPLE_PNG}"]}]}
    )
    images: list[str] = Field(min_length=1, description="base64-encoded image files")


class DistancesRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"embeddings": [[0.5, -1.0]]}]})
    embeddings: list[list[float]] = Field(
        min_length=1, description="vectors of the model's embedding dim; finite values"
    )


class ModelSummary(BaseModel):
    sha256: str = Field(description="SHA-256 of the ONNX file served")
    precision: str
    embedding_dim: int
    num_classes: int
    centers_version: int = Field(
        description="version of the centers answered with (0: the model file's own classes)"
    )
    unknown_threshold: float | None = Field(
        description="the model's global threshold: an unknown_score above it is unknown "
        "(classes may have their own: GET /v1/centers)"
    )
    provider: str = Field(description="onnxruntime execution provider in use")


class Classification(BaseModel):
    label: int = Field(description="index of the nearest center")
    class_name: str = Field(description="class name of the nearest center")
    min_distance: float = Field(
        description="squared Euclidean distance ‖e − c‖² to the nearest center, >= 0 (a "
        "model of format 1 answers its own distance kind: `distance` in /v1/model)"
    )
    unknown_score: float = Field(
        description="the evidence that the image belongs to no class, higher = more unknown "
        "(its formula: `unknown_score` in /v1/model; not a distance, may be negative)"
    )
    unknown: bool = Field(
        description="unknown_score above the unknown threshold of the nearest class"
    )
    distances: dict[str, float] = Field(
        description="squared distance to each center by class name, nearest first "
        "(the top_k nearest when top_k is given)"
    )
    atypicality: float | None = Field(
        None,
        description="how far the image's low-level feature statistics lie beyond the "
        "training images', in unknown-score units (0: typical); a part of its unknown_score. "
        "Images only (absent for /v1/distances vectors); 0 for a model exported without it",
    )
    embedding: list[float] | None = Field(
        None, description="the image's embedding (only with return_embeddings=true)"
    )


class ClassifyResponse(BaseModel):
    results: list[Classification]
    model: ModelSummary


class EmbedResponse(BaseModel):
    embeddings: list[list[float]]
    dim: int


class Center(BaseModel):
    label: int
    class_name: str
    center: list[float]
    unknown_threshold: float | None = Field(
        description="the class's own unknown threshold (null: the model's global one, if any)"
    )
    images: int | None = Field(
        description="images an enrolled class was computed from (null: a trained class)"
    )


class CentersResponse(BaseModel):
    centers: list[Center]
    dim: int
    distance: str = Field(
        description="what `distances` hold: squared_euclidean in a model of format 2; a "
        "format-1 file's own kind (which may be squared_euclidean_minus_norm)"
    )
    version: int = Field(description="grows by one with each enrolment or removal")


class EnrolmentResponse(BaseModel):
    class_name: str
    action: str = Field(description="enrol (a new or replaced class), add (images) or remove")
    images: int = Field(description="images the class's center is computed from (0: removed)")
    label: int | None = Field(description="the class's label now (null once removed)")
    unknown_threshold: float | None = Field(description="the class's own threshold, if any")
    num_classes: int
    version: int = Field(description="the centers' version after this change")


class RuntimeInfo(BaseModel):
    runtime: str = Field(description="inference runtime: onnxruntime or openvino")
    precision: str = Field(description="arithmetic precision in use: fp32, bf16, int8, fp16")
    reason: str = Field(description="why this runtime and precision (auto says what it saw)")
    provider: str = Field(description="the device, in the runtime's words")
    threads: int = Field(description="intra-op threads asked for (0: the runtime's default)")


class ModelResponse(BaseModel):
    metadata: dict[str, Any] = Field(description="the model's center_embed.* metadata")
    limits: dict[str, float | int] = Field(description="request limits in force")
    provider: str = Field(description="onnxruntime execution provider actually in use")
    runtime: RuntimeInfo
    model: ModelSummary


class Status(BaseModel):
    status: str


# ------------------------------------------------------------------ OpenAPI request bodies


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def images_body() -> dict[str, Any]:
    """The requestBody of /v1/embed and /v1/classify: multipart files or JSON base64."""
    files = {
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "items": {"type": "string", "format": "binary"},
                "description": "image files, one part each",
            }
        },
        "required": ["files"],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": files},
                "application/json": {"schema": _inline(ImagesRequest)},
            },
        }
    }


def vectors_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(DistancesRequest)}},
        }
    }

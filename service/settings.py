"""The service's options, each declared once, read from `CENTER_EMBED_*` environment variables.

    CENTER_EMBED_MODEL=model.onnx CENTER_EMBED_MAX_BATCH=32 center-embed serve ...

Settings are built by the app factory (never at import time), so tests build their own
`Settings(...)` and pass it to `create_app`. `center-embed serve --help` lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from center_embed.errors import UserError
from center_embed.imageio import SAFE_FORMATS, known_formats
from center_embed.runtime import SERVING_DEFAULT_RUNTIME, RuntimeOptions

MiB = 1024 * 1024


def _split_commas(value: object) -> object:
    """'a, b,,c' -> ['a', 'b', 'c']: lists come from the environment comma-separated."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CENTER_EMBED_", frozen=True)

    model: Path | None = Field(None, description="the ONNX model to serve")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="execution provider")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: one per core)")
    decode_threads: int = Field(
        0,
        ge=0,
        description="decode processes (and threads) for small images, half as many for large "
        "ones (0: one per core)",
    )
    decode_timeout_s: float = Field(
        5.0,
        gt=0,
        description="longest decode of one image (its worker process is then killed); 504",
    )
    runtime: Literal["auto", "onnxruntime", "openvino"] = Field(
        SERVING_DEFAULT_RUNTIME,
        description="inference runtime; auto picks by what is installed and the CPU "
        "(checked by the model's self-check)",
    )
    precision: Literal["auto", "fp32", "bf16", "int8", "fp16"] = Field(
        "auto", description="arithmetic precision (auto: bf16 under OpenVINO on bf16 CPUs)"
    )

    max_batch: int = Field(64, ge=1, description="most images in one onnxruntime run")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000, description="longest wait to fill a batch while others are arriving"
    )
    max_queue: int = Field(512, ge=1, description="most images waiting; beyond it: 429")
    timeout_s: float = Field(10.0, gt=0, description="queue + inference time limit; beyond: 504")

    max_body_bytes: int = Field(32 * MiB, ge=1024, description="largest request body; 413")
    max_images: int = Field(64, ge=1, description="most images in one request; 413")
    max_vectors: int = Field(1024, ge=1, description="most vectors in one /v1/distances; 413")
    max_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="most pixels in one image, checked before decoding; 413. Decoding one "
        "takes at most 20 bytes per pixel beyond its encoded size (320 MiB at 4096², WebP "
        "lossless the worst), each decode process at most twice that plus 256 MiB (RLIMIT_AS)",
    )
    max_request_pixels: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="most pixels of all images of one request, from their headers; 413",
    )
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(SAFE_FORMATS),
        description="comma-separated Pillow formats decoded (others: 415)",
    )

    # The connection (service/protocol.py and server.py); limits a proxy would otherwise set.
    http: Literal["auto", "httptools", "h11"] = Field(
        "auto", description="uvicorn's HTTP parser (auto: httptools when installed)"
    )
    max_header_bytes: int = Field(
        16 * 1024, ge=1024, description="largest request line + headers; 431, closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="time to send a request's headers (slowloris); 408, closed"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="time to send a request's body once its headers are in; 408"
    )
    keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections are closed")
    write_timeout_s: float = Field(
        10.0,
        gt=0,
        description="time a peer may leave a response unread (slow reader); then the "
        "connection is aborted",
    )
    max_connections: int = Field(
        256, ge=1, description="open connections per worker; beyond it: 503, closed"
    )
    graceful_shutdown_s: float | None = Field(
        None,
        gt=0,
        description="on SIGTERM, time in-flight requests get before a 503 (default: timeout_s + 5)",
    )

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated keys; any one opens /v1 (none: open)"
    )
    api_keys_file: Path | None = Field(None, description="a file of keys, one per line")
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="comma-separated keys that open the enrolment routes PUT/DELETE "
        "/v1/centers/{name} (none: those routes are off)",
    )
    centers_file: Path | None = Field(
        None, description="where enrolled centers persist (default: <model>.centers.npz beside it)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS (none: off)"
    )

    @field_validator("api_keys", "admin_keys", "cors_origins", "image_formats", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        formats = [f.upper() for f in value]
        unknown = sorted(set(formats) - known_formats())
        if unknown:
            raise ValueError(f"unknown image format(s) {unknown}; Pillow knows these: "
                             f"{', '.join(sorted(known_formats()))}")  # fmt: skip
        if not formats:
            raise ValueError("at least one image format must be allowed")
        return formats

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_images > self.max_queue:
            raise ValueError(
                f"max_images ({self.max_images}) must not exceed max_queue ({self.max_queue}): "
                "such a request could never be queued"
            )
        return self

    @property
    def shutdown_grace_s(self) -> float:
        """What in-flight requests get on SIGTERM: by default every admitted request can end
        by its own deadline (timeout_s, the decoding included) before the server stops."""
        if self.graceful_shutdown_s is not None:
            return self.graceful_shutdown_s
        return self.timeout_s + 5.0

    def runtime_options(self) -> RuntimeOptions:
        """What runs the model: device, threads, runtime and precision, as one value."""
        return RuntimeOptions(self.device, self.threads, self.runtime, self.precision)

    def keys(self) -> list[bytes]:
        """Every accepted API key: api_keys plus the lines of api_keys_file (# comments).

        A key file that holds no key is an error, never an open API."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read the API key file {self.api_keys_file}: {e}") from None
            found = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
            if not found:
                raise UserError(f"the API key file {self.api_keys_file} holds no key")
            keys += found
        return [k.encode() for k in keys]

    def limits(self) -> dict[str, float | int]:
        """The limits in force, as /v1/model reports them."""
        names = ("max_body_bytes", "max_images", "max_vectors", "max_pixels", "max_batch",
                 "max_wait_ms", "max_queue", "timeout_s", "max_request_pixels",
                 "max_header_bytes", "header_timeout_s", "body_timeout_s", "keep_alive_s",
                 "max_connections")  # fmt: skip
        return {name: getattr(self, name) for name in names}

"""The error taxonomy, written once: every error code the service answers with, its HTTP
status, and what each status means.

An error answer is JSON `{"error": {"code": ..., "message": ...}}`. The server raises
`ApiError(ErrorCode.X, message)` (service/errors.py), so a code and its status never
disagree; the routes document each status with its meaning below (the OpenAPI response
descriptions); the Python client (service/client.py) raises one exception class per status.
No web framework is imported here: the client imports this module and stays light.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """A stable, machine-readable error code (its value, e.g. "bad_image") and its status."""

    status: int

    def __new__(cls, code: str, status: int) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.status = status
        return member

    BAD_REQUEST = "bad_request", 400  # refused by the framework before any route ran
    MALFORMED_BODY = "malformed_body", 400
    BODY_TIMEOUT = "body_timeout", 408  # the body did not arrive within body_timeout_s
    HEADER_TIMEOUT = "header_timeout", 408  # sent by service/protocol.py, then closed
    BAD_IMAGE = "bad_image", 400
    BAD_BASE64 = "bad_base64", 400
    BAD_TENSOR = "bad_tensor", 400  # /v2 infer: wrong input, shape, datatype, output
    UNAUTHORIZED = "unauthorized", 401
    ENROLMENT_DISABLED = "enrolment_disabled", 403  # no admin keys configured
    CLASS_NOT_FOUND = "class_not_found", 404  # DELETE /v1/centers/{name} of no class
    NOT_FOUND = "not_found", 404
    METHOD_NOT_ALLOWED = "method_not_allowed", 405
    PAYLOAD_TOO_LARGE = "payload_too_large", 413  # refused by the framework, as BAD_REQUEST
    BODY_TOO_LARGE = "body_too_large", 413
    TOO_MANY_IMAGES = "too_many_images", 413
    TOO_MANY_VECTORS = "too_many_vectors", 413
    IMAGE_TOO_LARGE = "image_too_large", 413
    TOO_MANY_PIXELS = "too_many_pixels", 413  # all images of a request, from their headers
    TOO_MANY_PARTS = "too_many_parts", 413  # multipart parts of any name
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415
    UNSUPPORTED_IMAGE_FORMAT = "unsupported_image_format", 415
    LAST_CLASS = "cannot_remove_last_class", 409
    CANNOT_ADD = "cannot_add_to_trained_class", 409  # mode=add on a class enrolled by training
    VALIDATION_ERROR = "validation_error", 422
    BAD_CLASS_NAME = "bad_class_name", 422  # empty, too long, control characters, '/'
    OUT_OF_RANGE = "out_of_range", 422  # vectors whose distances would overflow float32
    NON_FINITE_OUTPUT = "non_finite_output", 422  # the model gave NaN/inf for this input
    QUEUE_FULL = "queue_full", 429
    HEADERS_TOO_LARGE = "headers_too_large", 431  # sent by service/protocol.py, then closed
    INTERNAL = "internal", 500  # a bug; never the answer to bad input
    NOT_READY = "not_ready", 503
    SHUTTING_DOWN = "shutting_down", 503
    CENTERS_UNAVAILABLE = "centers_unavailable", 503  # the centers file cannot be read/written
    TOO_MANY_CONNECTIONS = "too_many_connections", 503  # service/protocol.py, then closed
    TIMEOUT = "timeout", 504


STATUS_MEANINGS: dict[int, str] = {
    400: "malformed body, undecodable image or bad base64 (the message names the part)",
    401: "missing or invalid API key (an admin key on the enrolment routes)",
    403: "enrolment routes are off: the service has no admin keys",
    408: "the request's headers or body did not arrive in time",
    404: "no such route, or no such class to remove",
    405: "the route does not take this method",
    409: "the change would remove the last class, or add images to a trained class",
    413: "body, image count, vector count, part count or image pixels over the limit",
    415: "unsupported Content-Type or image format",
    422: "request fails validation, a bad class name, vectors out of range, or non-finite "
    "model outputs",
    429: "queue full: retry later",
    431: "request headers too large",
    500: "internal error: a bug in the service",
    503: "model not loaded and warmed up yet, shutting down, too many connections, or the "
    "centers file cannot be read or written",
    504: "no answer within the per-request timeout",
}

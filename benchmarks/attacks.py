"""The payloads of issue 11's attacks, written once: the hardening tests and
benchmarks/bench_soak.py both import them (`from benchmarks.attacks import ...`).

Each function returns bytes (an image, a body, or a whole raw HTTP request); none sends
anything. All are small to build (a few KB to a few MB) except where the attack is the size.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from PIL import Image

BOUNDARY = "attack-boundary-7d3f"


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def needle_png(width: int = 1_000_000, height: int = 1) -> bytes:
    """A PNG whose IHDR says width x height, all zero pixels (a few KB): item 1, once 5.4 GB."""
    return encode(Image.new("L", (width, height)))


def big_blank(side: int = 4096, fmt: str = "WEBP") -> bytes:
    """A side x side blank image: 702 bytes as lossless WebP, 0.3-0.5 s to decode at 4096²
    (item 4's slow decoding)."""
    return encode(
        Image.new("RGB", (side, side)), fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )


def deep_png(grey: np.ndarray) -> bytes:
    """The 8-bit grey image `grey` as a 16-bit PNG (values * 257): item 8."""
    return encode(Image.fromarray(grey.astype(np.uint16) * 257))


def ico_with_png(side: int = 12_000) -> bytes:
    """An ICO whose one entry is a side x side PNG (1-bit, tiny IDAT): Pillow decodes the PNG
    inside Image.open, past any pixel check (item 7)."""
    png = png_bomb(side, side)
    header = struct.pack("<HHH", 0, 1, 1)  # reserved, type 1 (icon), one image
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 1-bit pixels with a tiny IDAT: a
    decompression bomb as a decoder sees it before it inflates anything."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # item 9


def exif_rotated(pixels: np.ndarray) -> tuple[bytes, bytes]:
    """(the pixels tagged EXIF orientation 6, the pixels physically rotated): item 10."""
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 270° to view
    tagged = encode(Image.fromarray(pixels), "PNG", exif=exif)
    upright = encode(Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_270), "PNG")
    return tagged, upright


def multipart(*images: bytes) -> tuple[str, bytes]:
    """(content type, body) of `files` parts."""
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="i{i}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(images)
    ]
    return f"multipart/form-data; boundary={BOUNDARY}", b"".join(
        parts
    ) + f"--{BOUNDARY}--\r\n".encode()


def many_parts(count: int = 600_000) -> tuple[str, bytes]:
    """A multipart body of `count` tiny parts (item 6: 3.8 s of parsing on the event loop)."""
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'.encode()
    return (
        f"multipart/form-data; boundary={BOUNDARY}",
        part * count + f"--{BOUNDARY}--\r\n".encode(),
    )


def huge_vectors(dim: int, value: float = 2e19) -> bytes:
    """A /v1/distances body of finite values whose squared distances overflow float32
    (item 3: once a 500)."""
    return json.dumps({"embeddings": [[value] + [0.0] * (dim - 1)]}).encode()


def long_vector(megabytes: float = 30.0) -> bytes:
    """One vector of ~`megabytes` MB of JSON (item 6: 1.46 s of parsing on the loop)."""
    count = int(megabytes * 1e6 / 5)
    return b'{"embeddings": [[' + b",".join([b"0.25"] * count) + b"]]}"


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A raw HTTP/1.1 request (Content-Length set from the body unless given)."""
    headers = {"Host": "127.0.0.1", **headers}
    headers.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


def header_flood(lines: int, line_bytes: int = 1000) -> bytes:
    """The start of a request followed by `lines` header lines (item 2: once 1 GB in)."""
    line = b"X-Flood: " + b"a" * (line_bytes - 11) + b"\r\n"
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * lines


def short_body(path: str = "/v1/distances", declared: int = 1000, sent: int = 10) -> bytes:
    """A request whose Content-Length is larger than the body that follows (item 11)."""
    return request(
        "POST",
        path,
        {"Content-Type": "application/json", "Content-Length": str(declared)},
        b"{" * sent,
    )


def long_path(length: int = 65_536) -> str:
    """A path of `length` characters (percent-encoded; 65,532 once decoded at the default)
    with control characters in it (item 12)."""
    return "/" + "%0a%1b" + "x" * (length - 7)

"""The attack set, written once: the hardening tests import it (`from tests import
attacks`, the one test module beside tests.helpers that tests may import) and
benchmarks/bench_soak.py mixes it into its load.

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


# --------------------------------------------------------------------------- round 2


def repeated_scan_jpeg(side: int = 4096, scans: int = 10_000) -> bytes:
    """A progressive JPEG whose last scan is repeated until it has `scans` scans: one held
    a decoder ~17 s at 4096² before scans were counted (about 400 KB)."""
    import re

    data = encode(Image.new("RGB", (side, side)), "JPEG", progressive=True)
    sos = [m.start() for m in re.finditer(rb"\xff\xda", data)]
    last = data[sos[-1] : data.rindex(b"\xff\xd9")]
    return data[: sos[-1]] + last * (scans - len(sos) + 1) + b"\xff\xd9"


def float_tiff(side: int = 4096) -> bytes:
    """A deflate TIFF of side² float32 zeros (tens of KB): 540 MB to decode before the
    decoders converted deep pixels in bands."""
    return encode(Image.new("F", (side, side)), "TIFF", compression="tiff_adobe_deflate")


def empty_lists_body(count: int = 4_000_000) -> bytes:
    """{"images": [[], [], ...]}: once one validation error object per element (5.8 GB)."""
    return b'{"images": [' + b",".join([b"[]"] * count) + b"]}"


def string_vectors_body(count: int = 1_000_000) -> bytes:
    """{"embeddings": [["a"], ...]}: once +1.3 GB of errors, and strings coerced to floats."""
    return b'{"embeddings": [' + b",".join([b'["a"]'] * count) + b"]}"


def v2_nulls_body(count: int = 1_000_000) -> bytes:
    """{"inputs": [null, ...]}: once parsed on the event loop (5 s frozen, +1.4 GB)."""
    return b'{"inputs": [' + b",".join([b"null"] * count) + b"]}"

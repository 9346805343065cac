"""What decoding in killable worker processes costs the service, per image.

    python benchmarks/bench_decode_pool.py --images 1000

Side by side in one run, on the same small images one at a time: imageio.decode_image in
this process (what a decode thread did before the pool) and DecodePool.decode (a worker
process, the bytes sent over a socket and the pixels read back). Prints microseconds per
image for each, the difference and the ratio, for PNG and JPEG; writes benchmarks/results.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

from _common import add_json_argument, write_results


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=1000, help="images per round and format")
    p.add_argument("--size", type=int, default=32, help="side of the images (and the model's)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    add_json_argument(p)
    return p.parse_args()


def encoded(fmt: str, n: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


def per_image_us(decode, images: list[bytes]) -> float:
    started = time.perf_counter()
    for data in images:
        decode(data)
    return (time.perf_counter() - started) / len(images) * 1e6


def main() -> int:
    args = parse_args()
    from center_embed.imageio import decode_image
    from center_embed.service.decode_pool import DecodePool

    max_pixels = 4096 * 4096
    pool = DecodePool(1, max_pixels)
    pool.wait_ready()
    results = {}
    try:
        for fmt in ("PNG", "JPEG"):
            images = encoded(fmt, args.images, args.size)
            here, pooled = [], []
            for _ in range(args.rounds):  # interleaved: both see the same machine
                here.append(per_image_us(lambda d: decode_image(d, args.size, max_pixels),
                                         images))  # fmt: skip
                pooled.append(per_image_us(
                    lambda d: pool.decode(d, args.size, max_pixels, None,
                                          time.monotonic() + 30), images))  # fmt: skip
            a, b = statistics.median(here), statistics.median(pooled)
            results[fmt] = {"in_process_us": a, "pool_us": b, "added_us": b - a, "ratio": b / a}
            print(f"{fmt:<5} in process {a:7.1f} µs/image, pool {b:7.1f} µs/image: "
                  f"+{b - a:.1f} µs ({b / a:.2f}x), median of {args.rounds} rounds")  # fmt: skip
    finally:
        pool.close()
    write_results("decode-pool", {"images": args.images, "size": args.size, **results},
                  args.json)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

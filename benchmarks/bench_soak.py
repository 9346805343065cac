"""Soak: `center-embed serve` under 64 clients mixing good requests with every attack of the
attack set (tests/attacks.py), for a while; the status of every answer, the server's memory
over time, and the latency of good requests.

    python benchmarks/bench_soak.py model.onnx                 # 600 s, 64 clients
    python benchmarks/bench_soak.py model.onnx --seconds 60

Good requests' latency is measured by observers: `--observers` clients sending good requests
only, in a process of their own (this script in a hidden mode), so that what the attacking
process does to itself (writing 30 MB bodies, a thousand sockets) never counts against the
server. Three rounds on one server, the observers in each:

1. quiet: the observers alone (`--quiet-seconds`);
2. busy: the observers and `--clients` clients sending good requests only (`--busy-seconds`);
3. under attack: the observers and `--clients` clients of which 30% of requests are attacks
   (`--seconds`).

Side by side: the observers' p50/p99 in each round, and the ratios under attack / quiet and
under attack / busy. Required: no 5xx to a good request, none to an attack but a 504 to
one whose point is a costly decode (DECODE_COST_ATTACKS: large images are decoded at a low
priority, and may time out under load), and the server's peak RSS (its decode workers
included) under --rss-bound-mb. Traffic goes to 127.0.0.1 only; every loop is
bounded in time and every read has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import Counter

import numpy as np
from _common import add_json_argument, http_get, serve, tree_rss_mb, write_results
from PIL import Image

from tests import attacks

READ_TIMEOUT = 60.0
ROUNDS = ("quiet", "busy", "under attack")
# Attacks whose point is a costly decode (images over 1024² pixels, or held on purpose): the
# service decodes large images at a low CPU priority, so under load they may time out (504)
# by design. Every other attack must be answered 4xx or have its connection closed.
DECODE_COST_ATTACKS = ("slow decode", "float tiff", "needle png", "10k-scan jpeg",
                       "100-scan jpeg")  # fmt: skip


def main() -> int:
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    p.add_argument("model", nargs="?", help="an exported ONNX model")
    p.add_argument("--seconds", type=float, default=600.0, help="the round under attack")
    p.add_argument("--quiet-seconds", type=float, default=10.0, help="the observers alone")
    p.add_argument("--busy-seconds", type=float, default=30.0, help="good traffic only")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--observers", type=int, default=8, help="good-only clients, apart")
    p.add_argument("--rss-bound-mb", type=float, default=1024.0)
    p.add_argument("--observe", nargs=3, type=float, help=argparse.SUPPRESS)  # port dim ends
    add_json_argument(p)
    args = p.parse_args()
    if args.observe:
        return observe(*map(int, args.observe[:2]), args.observe[2], args.observers)
    if args.model is None:
        p.error("the following arguments are required: model")
    with serve(args.model, log_level="error", ready_timeout=120, stop_timeout=60) as server:
        dim = int(model_dim(server.port))
        payloads = Payloads(dim)
        plan = {"quiet": (0, args.quiet_seconds, False), "busy": (args.clients, args.busy_seconds,
                False), "under attack": (args.clients, args.seconds, True)}  # fmt: skip
        runs = {name: observed(server, payloads, dim, args.observers, *plan[name])
                for name in ROUNDS}  # fmt: skip
    ok, results = report(runs, server.exit_code, server.stderr, args.rss_bound_mb)
    write_results("soak", results, args.json)
    return 0 if ok else 1


def observed(server, payloads, dim: int, observers: int, clients: int, seconds: float,
             attack: bool) -> dict:  # fmt: skip
    """One round: the observers' process and, beside it, `clients` clients here; both stop
    at the same time (the observers start later, after their imports)."""
    ends = time.time() + seconds
    command = [sys.executable, __file__, "--observe", str(server.port), str(dim), str(ends),
               "--observers", str(observers)]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE) as process:
        run = asyncio.run(soak(server.port, server.pid, payloads, clients, seconds, attack))
        out, _ = process.communicate(timeout=seconds + 120)
    seen = json.loads(out)
    run["clients"], run["observers"] = clients, observers
    run["observed"] = [tuple(item) for item in seen["good"]]
    run["observer_statuses"] = Counter({(kind, status): n for kind, status, n in seen["statuses"]})
    return run


def observe(port: int, dim: int, ends: float, clients: int) -> int:
    """The observers' process, until `ends` (time.time()): good requests only; their
    latencies as JSON on stdout."""
    payloads = Payloads(dim, with_attacks=False)
    run = asyncio.run(soak(port, None, payloads, clients, max(ends - time.time(), 0.0), False))
    statuses = [[kind, status, n] for (kind, status), n in run["statuses"].items()]
    print(json.dumps({"good": run["good"], "statuses": statuses}))
    return 0


class Payloads:
    """Every request of the soak, built once: (kind, raw request bytes or a callable)."""

    def __init__(self, dim: int, with_attacks: bool = True) -> None:
        rng = np.random.default_rng(0)
        good = attacks.encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)))
        vector = ('{"embeddings": [[' + ",".join(["0.5"] * dim) + "]]}").encode()
        grey = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        tagged, _ = attacks.exif_rotated(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8))
        json_type = {"Content-Type": "application/json"}
        self.good = {
            "good classify": files_request("/v1/classify", good),
            "good distances": attacks.request("POST", "/v1/distances", json_type, vector),
        }
        self.attacks: dict[str, bytes | str] = {}
        if not with_attacks:
            return
        self.attacks = {
            "needle png": files_request("/v1/classify", attacks.needle_png()),
            "16-bit png": files_request("/v1/classify", attacks.deep_png(grey)),
            "ico 12000²": files_request("/v1/classify", attacks.ico_with_png()),
            "eps": files_request("/v1/classify", attacks.EPS),
            "exif 6": files_request("/v1/embed", tagged),
            "2e19 vector": vectors_request(attacks.huge_vectors(dim)),
            "30 MB vector": vectors_request(attacks.long_vector(30)),
            "slow decode": files_request("/v1/classify", *[attacks.big_blank(4096)] * 3),
            "300k parts": multipart_request(*attacks.many_parts(300_000)),
            "header flood": attacks.header_flood(4096),
            "slowloris": "slowloris",
            "short body": attacks.short_body(),
            "64 KB path": attacks.request("GET", attacks.long_path(), {}),
            "10k-scan jpeg": files_request("/v1/classify", attacks.repeated_scan_jpeg()),
            # as many scans as allowed, on a size the small images' pool takes when baseline
            "100-scan jpeg": files_request("/v1/classify", attacks.repeated_scan_jpeg(1024, 100)),
            "float tiff": files_request("/v1/classify", attacks.float_tiff()),
            "4M [] body": attacks.request("POST", "/v1/embed", json_type,
                                          attacks.empty_lists_body()),
            "1M string vectors": vectors_request(attacks.string_vectors_body()),
            "v2 1M nulls": attacks.request("POST", "/v2/models/center_embed/infer", json_type,
                                           attacks.v2_nulls_body()),
        }  # fmt: skip


def files_request(path: str, *images: bytes) -> bytes:
    content_type, body = attacks.multipart(*images)
    return attacks.request("POST", path, {"Content-Type": content_type}, body)


def vectors_request(body: bytes) -> bytes:
    return attacks.request("POST", "/v1/distances", {"Content-Type": "application/json"}, body)


def multipart_request(content_type: str, body: bytes) -> bytes:
    return attacks.request("POST", "/v1/embed", {"Content-Type": content_type}, body)


async def exchange(port: int, data: bytes | str) -> tuple[str, float]:
    """One request on its own connection: (status or what happened, seconds)."""
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, TimeoutError) as e:
        return f"connect failed ({type(e).__name__})", time.perf_counter() - started
    try:
        if data == "slowloris":
            writer.write(b"GET /healthz HTTP/1.1\r\n")
            for _ in range(200):  # a header line every 0.1 s: at most 20 s
                await asyncio.sleep(0.1)
                writer.write(b"X-a: b\r\n")
                await writer.drain()
        else:
            writer.write(data)
            await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        status = head.split(b" ", 2)[1].decode()
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
        await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT)
        return status, time.perf_counter() - started
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        return f"closed ({type(e).__name__})", time.perf_counter() - started
    except TimeoutError:
        return "no answer in 60 s", time.perf_counter() - started
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def soak(port: int, pid: int | None, payloads, clients: int, seconds: float,
               attack: bool) -> dict:  # fmt: skip
    """`clients` clients for `seconds`, 30% of their requests attacks when `attack`: the
    statuses, the good requests' (kind, seconds) and, given the server's `pid`, its memory."""
    deadline = time.monotonic() + seconds
    statuses: Counter = Counter()
    good_latency: list[tuple[str, float]] = []  # (kind, seconds)
    rss: list[tuple[float, float]] = []

    async def client(index: int) -> None:
        rng = random.Random(index)
        kinds = list(payloads.attacks) if attack else []
        while time.monotonic() < deadline:
            if kinds and rng.random() < 0.3:
                kind = rng.choice(kinds)
                status, _ = await exchange(port, payloads.attacks[kind])
            else:
                kind = rng.choice(list(payloads.good))
                status, seconds_taken = await exchange(port, payloads.good[kind])
                if status == "200":
                    good_latency.append((kind, seconds_taken))
            statuses[(kind, status)] += 1

    async def watch_memory() -> None:
        started = time.monotonic()
        while pid is not None and time.monotonic() < deadline:
            rss.append((time.monotonic() - started, tree_rss_mb(pid)))  # decode workers too
            await asyncio.sleep(1.0)

    await asyncio.gather(watch_memory(), *(client(i) for i in range(clients)))
    return {"statuses": statuses, "good": good_latency, "rss": rss, "seconds": seconds}


def report(runs: dict[str, dict], exit_code, stderr: str, bound_mb: float) -> tuple[bool, dict]:
    """Print the soak's figures; (passed, the figures for the results file)."""
    loud = runs["under attack"]
    print(f"{'kind':<16} status counts (under attack: {loud['seconds']:g} s)")
    by_kind: dict[str, Counter] = {}
    for (kind, status), count in (loud["statuses"] + loud["observer_statuses"]).items():
        by_kind.setdefault(kind, Counter())[status] = count
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:<16} {dict(counts)}")
    every = sum((run["statuses"] + run["observer_statuses"] for run in runs.values()), Counter())
    fives = {k: c for k, c in every.items() if k[1].startswith("5")}
    bad = {k: c for k, c in fives.items()
           if k[1] != "504" or k[0] not in DECODE_COST_ATTACKS}  # fmt: skip
    rss = [m for run in runs.values() for _, m in run["rss"]]
    timeline = [f"{t:.0f}s:{m:.0f}" for t, m in loud["rss"][:: max(1, len(loud["rss"]) // 10)]]
    print(f"server RSS MB (decode workers included): start {rss[0]:.0f}, max "
          f"{max(rss):.0f}, end {rss[-1]:.0f} (bound {bound_mb:g}); under attack: "
          f"{' '.join(timeline)}")  # fmt: skip
    good = {name: latency(f"observers, {name}", run["observed"]) for name, run in runs.items()}
    good["in the attacking process"] = latency("in the attacking process", loud["good"])
    for base in ("quiet", "busy"):
        if good[base].get("answered") and good["under attack"].get("answered"):
            ratio = good["under attack"]["p99_ms"] / good[base]["p99_ms"]
            good[f"p99_ratio_over_{base}"] = ratio
            print(f"observers' p99 under attack / {base}: {ratio:.2f}")
    asgi = "Exception in ASGI" in stderr
    print(f"5xx: {dict(fives) or 'none'}; server exit status after SIGTERM: {exit_code}")
    print(f"'Exception in ASGI application' in the server log: {asgi}")
    ok = not bad and max(rss) <= bound_mb and exit_code == 0 and not asgi
    print("PASS" if ok else f"FAIL: {bad or ''}")
    results = {
        "seconds": {name: run["seconds"] for name, run in runs.items()},
        "clients": loud["clients"], "observers": loud["observers"],
        "statuses": {kind: dict(counts) for kind, counts in sorted(by_kind.items())},
        "bad_5xx": {f"{k[0]} {k[1]}": c for k, c in bad.items()},
        "rss_mb": {"start": rss[0], "max": max(rss), "end": rss[-1], "bound": bound_mb,
                   "timeline": loud["rss"]},
        "good_requests": good, "exit_status": exit_code, "exception_in_asgi": asgi, "passed": ok,
    }  # fmt: skip
    return ok, results


def latency(name: str, good: list[tuple[str, float]]) -> dict:
    """Good requests' count, p50 and p99 (ms), in all and by kind, printed."""
    if not good:
        return {"answered": 0}
    figures = {}
    for kind in [None, *sorted({kind for kind, _ in good})]:
        lat = sorted(t for k, t in good if kind in (None, k))
        p50_ms, p99_ms = statistics.median(lat) * 1000, p99(lat) * 1000
        print(f"good requests, {name}{'' if kind is None else f', {kind}'}: {len(lat)} "
              f"answered 200, p50 {p50_ms:.1f} ms, p99 {p99_ms:.1f} ms")  # fmt: skip
        figures[kind or "all"] = {"answered": len(lat), "p50_ms": p50_ms, "p99_ms": p99_ms}
    return {**figures.pop("all"), "by_kind": figures}


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def model_dim(port: int) -> int:
    info = json.loads(http_get(port, "/v1/model", timeout=10)[1])
    return next(v for k, v in find_items(info) if k.endswith("embedding_dim"))


def find_items(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from find_items(v, f"{prefix}.{k}")
    else:
        yield prefix, value


if __name__ == "__main__":
    os.environ.setdefault("CENTER_EMBED_THREADS", "1")
    raise SystemExit(main())

"""`center-embed serve` against LitServe: the same ONNX file, the same JSON requests.

    python benchmarks/bench_litserve.py model.onnx --images ../shared/data/cifar10/test
    python benchmarks/bench_litserve.py model.onnx --runtime onnxruntime   # like with like

LitServe (pip install litserve) is what users would pick to serve the file themselves. Both
servers run at once, each in its own process tree on 127.0.0.1:

- ours: `center-embed serve MODEL` with serve's defaults (CENTER_EMBED_RUNTIME and
  CENTER_EMBED_PRECISION are taken out of its environment), or the runtime `--runtime` names;
- LitServe: this script in a hidden mode, a LitAPI that base64-decodes the request's image
  and decodes it (OnnxModel.decode), stacks the requests' images into one batch
  (max_batch_size 64, batch_timeout 2 ms: ours waits at most 2 ms too), runs OnnxModel under
  onnxruntime fp32 (the plain runtime) and answers what ours does for one image: label,
  class_name, min_distance, unknown_score, unknown, distances by class name, atypicality.
  One inference worker on the CPU; LitServe's defaults otherwise.

1. One image to each: the same label and class name (and min distances within 1e-3
   relative when both run onnxruntime fp32), else the script stops.
2. Interleaved rounds (ours, LitServe, ours, LitServe, ...) of `--concurrency` keep-alive
   clients each sending one image per request, `{"images": ["<base64>"]}` (the same body
   bytes for both; only the path differs), for `--seconds`: requests/s (median over the
   rounds), non-200 statuses, the server's CPU time per request (utime + stime of every
   process in its tree, from /proc) and its tree's peak resident memory. The other server
   is stopped (SIGSTOP) during a round: an idle LitServe polls its queues.
3. Concurrency 1: p50 and p99 latency over `--single` requests.

Ratios: ours / LitServe for throughput; LitServe / ours for p50, p99 and CPU per request
(above 1, ours is ahead). The load generator is _common's minimal HTTP/1.1 client. LitServe
is stopped with SIGTERM, then SIGKILL, to its whole process group.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import http.client
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from _common import (
    Server,
    add_json_argument,
    descendants,
    free_port,
    http_get,
    load,
    load_files,
    serve,
    tree_cpu_seconds,
    tree_rss_mb,
    write_results,
)
from bench_service import sequential

OURS_PATH = "/v1/classify"
LITSERVE_PATH = "/predict"  # LitAPI's default api_path
MAX_BATCH_SIZE = 64
BATCH_TIMEOUT_S = 0.002  # our batcher's longest wait
RUNTIME_VARIABLES = ("CENTER_EMBED_RUNTIME", "CENTER_EMBED_PRECISION")
ANSWER_KEYS = ("label", "class_name", "min_distance", "unknown_score", "unknown")


def main() -> int:
    args = parse_args()
    if args.litserve_worker:
        return litserve_worker(args.model, args.port)
    files = load_files(args.images, 512)
    print(f"model {args.model}; {len(files)} distinct images; {os.cpu_count()} CPUs; "
          f"concurrency {args.concurrency}; {args.rounds} rounds of {args.seconds:g} s load "
          f"each; load average before: {os.getloadavg()[0]:.2f}")  # fmt: skip
    env = {"CENTER_EMBED_RUNTIME": args.runtime} if args.runtime else {}
    with (
        without_variables(RUNTIME_VARIABLES),
        serve(args.model, env) as ours,
        litserve(args.model) as theirs,
    ):
        results = compare(args, files, {"ours": ours, "LitServe": theirs})
    results["ours"]["exit_status"] = ours.exit_code
    results["LitServe"]["exit_status"] = theirs.exit_code
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    write_results("litserve", results, args.json)
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model", help="an exported ONNX model")
    p.add_argument("--images", help="a folder of image files to send (default: synthetic PNGs)")
    p.add_argument("--concurrency", type=int, default=32, help="clients under load (default 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of one load round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per server, interleaved")
    p.add_argument("--single", type=int, default=500, help="requests at concurrency 1")
    p.add_argument(
        "--runtime", choices=("auto", "onnxruntime", "openvino"),
        help="our server's runtime (default: serve's own default; onnxruntime compares like "
        "with like: LitServe runs onnxruntime fp32)",
    )  # fmt: skip
    p.add_argument("--litserve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    add_json_argument(p)
    return p.parse_args()


@contextlib.contextmanager
def without_variables(names: tuple[str, ...]) -> Iterator[None]:
    """These environment variables out of os.environ (servers started here inherit it)."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --------------------------------------------------------------------------- the comparison


def compare(args: argparse.Namespace, files: list[bytes], servers: dict[str, Server]) -> dict:
    """Answers checked, warm-up, interleaved load rounds, concurrency 1: the results."""
    payloads = [json.dumps({"images": [base64.b64encode(f).decode()]}).encode() for f in files]
    paths = {"ours": OURS_PATH, "LitServe": LITSERVE_PATH}
    bodies = {name: [raw_request(path, p) for p in payloads] for name, path in paths.items()}
    served = json.loads(http_get(servers["ours"].port, "/v1/model")[1])["runtime"]
    print(f"ours: {served['runtime']} {served['precision']} ({served['reason']}); LitServe "
          f"{importlib.metadata.version('litserve')}: onnxruntime fp32")  # fmt: skip
    like = (served["runtime"], served["precision"]) == ("onnxruntime", "fp32")
    answers = check_answers(servers, paths, payloads[0], like)
    for name, server in servers.items():
        asyncio.run(load(server.port, bodies[name][:8], 8, 1.0))  # warm both up
    figures = rounds(servers, bodies, args)
    for name, server in servers.items():
        (other,) = (s for n, s in servers.items() if n != name)
        with paused(other):
            latencies = asyncio.run(sequential(server.port, bodies[name], args.single))
        p50, p99 = np.percentile(latencies, [50, 99])
        figures[name]["single"] = {"requests": len(latencies), "p50_ms": p50, "p99_ms": p99}
    return {
        "model": str(args.model), "images": len(files), "concurrency": args.concurrency,
        "seconds": args.seconds, "rounds": args.rounds,
        "litserve_version": importlib.metadata.version("litserve"),
        "litserve_config": {"accelerator": "cpu", "workers_per_device": 1,
                            "max_batch_size": MAX_BATCH_SIZE, "batch_timeout": BATCH_TIMEOUT_S,
                            "runtime": "onnxruntime", "precision": "fp32"},
        "ours_runtime": served, "answers": answers, **figures, "ratios": ratios(figures),
    }  # fmt: skip


def raw_request(path: str, body: bytes) -> bytes:
    """A whole keep-alive HTTP/1.1 request: POST `path` with the JSON `body`."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: application/json\r\n\r\n"
    ).encode()
    return head + body


def post_json(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def check_answers(servers: dict[str, Server], paths: dict[str, str], payload: bytes,
                  like: bool) -> dict:  # fmt: skip
    """The same image to both: the same label and class name, and min distances within 1e-3
    relative where both run onnxruntime fp32 (`like`); SystemExit if not."""
    answers = {}
    for name, server in servers.items():
        status, body = post_json(server.port, paths[name], payload)
        if status != 200:
            raise SystemExit(f"{name} answered {status}: {body[:500]!r}")
        answers[name] = {key: json.loads(body)["results"][0][key] for key in ANSWER_KEYS}
    ours, theirs = answers["ours"], answers["LitServe"]
    same = (ours["label"], ours["class_name"]) == (theirs["label"], theirs["class_name"])
    difference = abs(ours["min_distance"] - theirs["min_distance"]) / max(
        abs(ours["min_distance"]), 1e-12
    )
    close = difference <= 1e-3 or not like
    print(f"answers: ours {ours['class_name']} ({ours['label']}) min distance "
          f"{ours['min_distance']:.6g}; LitServe {theirs['class_name']} ({theirs['label']}) "
          f"min distance {theirs['min_distance']:.6g}; relative difference {difference:.2e}"
          f"{'' if like else ' (not checked: ours runs another runtime or precision)'}: "
          f"{'match' if same and close else 'MISMATCH'}")  # fmt: skip
    if not (same and close):
        raise SystemExit("the two servers disagree on the same image")
    return {**answers, "min_distance_relative_difference": difference, "checked_distance": like}


def rounds(servers: dict[str, Server], bodies: dict[str, list[bytes]],
           args: argparse.Namespace) -> dict[str, dict]:  # fmt: skip
    """Interleaved load rounds: each server's rates, CPU per request, statuses, memory."""
    figures = {name: {"rounds_requests_per_second": [], "rounds_cpu_ms_per_request": [],
                      "statuses": Counter(), "peak_tree_rss_mb": 0.0}
               for name in servers}  # fmt: skip
    for r in range(args.rounds):
        for name, server in servers.items():
            (other,) = (s for n, s in servers.items() if n != name)
            m = asyncio.run(measure(server, other, bodies[name], args.concurrency, args.seconds))
            f = figures[name]
            f["rounds_requests_per_second"].append(m["rate"])
            f["rounds_cpu_ms_per_request"].append(m["cpu_ms_per_request"])
            f["statuses"].update(m["statuses"])
            f["peak_tree_rss_mb"] = max(f["peak_tree_rss_mb"], m["peak_rss_mb"])
            print(f"round {r + 1} {name:8s} {m['rate']:7.1f} req/s, "
                  f"{m['cpu_ms_per_request']:.2f} server CPU ms/request, statuses "
                  f"{dict(m['statuses'])}, peak tree RSS {m['peak_rss_mb']:.0f} MB")  # fmt: skip
    for f in figures.values():
        f["requests_per_second"] = statistics.median(f["rounds_requests_per_second"])
        f["cpu_ms_per_request"] = statistics.median(f["rounds_cpu_ms_per_request"])
        f["non_200"] = sum(n for status, n in f["statuses"].items() if status != 200)
    return figures


async def measure(server: Server, other: Server, bodies: list[bytes], clients: int,
                  seconds: float) -> dict:  # fmt: skip
    """One load round on `server`, `other` stopped meanwhile (SIGSTOP: an idle LitServe
    polls its queues, about a tenth of a core here): requests/s, statuses, its tree's CPU
    ms per answered request and peak RSS."""
    peak = [tree_rss_mb(server.pid)]

    async def sample_memory() -> None:
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            await asyncio.sleep(0.5)
            peak.append(tree_rss_mb(server.pid))

    with paused(other):
        before = tree_cpu(server.pid)
        result, _ = await asyncio.gather(
            load(server.port, bodies, clients, seconds), sample_memory()
        )
        used = tree_cpu(server.pid) - before
    return {"rate": result["ok"] / result["seconds"], "statuses": result["statuses"],
            "cpu_ms_per_request": used / max(result["ok"], 1) * 1000,
            "peak_rss_mb": max(peak)}  # fmt: skip


@contextlib.contextmanager
def paused(server: Server) -> Iterator[None]:
    """`server` and every process under it stopped (SIGSTOP) for the block, then resumed."""
    pids = [server.pid, *descendants(server.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def ratios(figures: dict[str, dict]) -> dict[str, float]:
    """ours / LitServe for throughput, LitServe / ours for the costs; printed."""
    ours, theirs = figures["ours"], figures["LitServe"]
    out = {
        "throughput_ours_over_litserve": ratio(
            ours["requests_per_second"], theirs["requests_per_second"]
        ),
        "cpu_litserve_over_ours": ratio(theirs["cpu_ms_per_request"], ours["cpu_ms_per_request"]),
        "p50_litserve_over_ours": ratio(theirs["single"]["p50_ms"], ours["single"]["p50_ms"]),
        "p99_litserve_over_ours": ratio(theirs["single"]["p99_ms"], ours["single"]["p99_ms"]),
    }
    print(f"ours {ours['requests_per_second']:.0f} req/s, LitServe "
          f"{theirs['requests_per_second']:.0f} req/s: ratio "
          f"{out['throughput_ours_over_litserve']:.2f} (medians over the rounds; non-200: "
          f"ours {ours['non_200']}, LitServe {theirs['non_200']})")  # fmt: skip
    print(f"CPU ours {ours['cpu_ms_per_request']:.2f} ms/request, LitServe "
          f"{theirs['cpu_ms_per_request']:.2f} ms/request: ratio "
          f"{out['cpu_litserve_over_ours']:.2f}; peak tree RSS ours "
          f"{ours['peak_tree_rss_mb']:.0f} MB, LitServe "
          f"{theirs['peak_tree_rss_mb']:.0f} MB")  # fmt: skip
    for q in ("p50", "p99"):
        print(f"{q} ours {ours['single'][f'{q}_ms']:.1f} ms, LitServe "
              f"{theirs['single'][f'{q}_ms']:.1f} ms: ratio "
              f"{out[f'{q}_litserve_over_ours']:.2f} (concurrency 1)")  # fmt: skip
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# --------------------------------------------------------------------------- process trees


def process_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state, CPU ticks: utime + stime + cutime + cstime,
    so that a child reaped between two readings stays counted, in its parent)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks = sum(int(f) for f in fields[11:15])
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0], ticks)
    return table


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants (every thread of each)."""
    return sum(tree_cpu_seconds(pid).values())


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    return [pid for pid, (_, group, state, _) in process_table().items()
            if group == pgid and state != "Z"]  # fmt: skip


# --------------------------------------------------------------------------- LitServe


@contextlib.contextmanager
def litserve(model: str, ready_timeout: float = 180.0) -> Iterator[Server]:
    """This script's LitServe mode in a new session (its own process group), ready."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (stop_group closes it)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(model), "--litserve-worker",
         "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
    )  # fmt: skip
    server = Server(port, process, log)
    try:
        wait_healthy(server, ready_timeout)
        yield server
    finally:
        stop_group(server)


def wait_healthy(server: Server, timeout: float) -> None:
    """Until GET /health answers 200 (every LitServe worker set up); SystemExit if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"LitServe exited: {server.read_log()[-3000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_get(server.port, "/health")[0] == 200:
                return
        time.sleep(0.2)
    raise SystemExit(f"LitServe was not ready in {timeout:g} s: {server.read_log()[-3000:]}")


def stop_group(server: Server, grace: float = 10.0) -> None:
    """SIGTERM to LitServe's whole process group, SIGKILL to what is left after `grace` s;
    says how many processes (if any) outlived both."""
    pgid = server.pid  # start_new_session: the leader's pid names the group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            server.process.poll()  # reap the leader, so it no longer counts
            if not group_members(pgid):
                break
            time.sleep(0.1)
        if not group_members(pgid):
            break
    server.exit_code = server.process.wait(10)
    server.stderr = server.read_log()
    server.log.close()
    left = group_members(pgid)
    print(f"LitServe stopped with exit status {server.exit_code}; processes left: "
          f"{left or 'none'}", flush=True)  # fmt: skip
    if server.exit_code not in (0, -signal.SIGTERM, -signal.SIGKILL):
        print(server.stderr[-3000:])


def litserve_worker(model: str, port: int) -> int:
    """The hidden mode: LitServe serving `model` on 127.0.0.1:`port` until stopped."""
    import litserve as ls

    api = lit_api_class()(
        model, max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S,
        api_path=LITSERVE_PATH,
    )  # fmt: skip
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)
    return 0


@functools.cache
def lit_api_class() -> type:
    """The LitAPI users would write for the file, built on first use (litserve imported
    here only: --help must not need it)."""
    import litserve as ls

    from center_embed.runtime import OnnxModel, RuntimeOptions

    class OnnxLitAPI(ls.LitAPI):
        def __init__(self, model: str, **kwargs) -> None:
            super().__init__(**kwargs)
            self.model_path = model

        def setup(self, device) -> None:
            options = RuntimeOptions(device="cpu", threads=0, runtime="onnxruntime",
                                     precision="fp32")  # fmt: skip
            self.model = OnnxModel(self.model_path, options, spinning=False)
            self.names = self.model.info.class_names

        def decode_request(self, request) -> np.ndarray:
            return self.model.decode(base64.b64decode(request["images"][0]))

        def batch(self, inputs) -> np.ndarray:
            return np.stack(inputs)

        def predict(self, x) -> dict[str, np.ndarray]:
            out = self.model.run(x)
            return {**out, "unknown": self.model.unknown(out)}

        def unbatch(self, output) -> list[dict]:
            keys = ("labels", "min_distances", "unknown_scores", "unknown", "distances",
                    "atypicality")  # fmt: skip
            columns = [output[key].tolist() for key in keys]
            rows = zip(*columns, strict=True)
            return [dict(zip(keys, row, strict=True)) for row in rows]

        def encode_response(self, output) -> dict:
            label = output["labels"]
            return {"results": [{
                "label": label, "class_name": self.names[label],
                "min_distance": output["min_distances"],
                "unknown_score": output["unknown_scores"], "unknown": output["unknown"],
                "distances": dict(zip(self.names, output["distances"], strict=True)),
                "atypicality": output["atypicality"],
            }]}  # fmt: skip

    OnnxLitAPI.__qualname__ = "OnnxLitAPI"  # found by name: see __getattr__
    return OnnxLitAPI


def __getattr__(name: str):
    """`OnnxLitAPI` on demand (PEP 562): LitServe starts its inference workers by spawn,
    which unpickles the LitAPI by module and name, while the class needs litserve."""
    if name == "OnnxLitAPI":
        return lit_api_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())

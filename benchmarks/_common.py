"""What the benchmark scripts share: the results file, a local server, an HTTP load.

The scripts run as `python benchmarks/bench_x.py ...`, so this folder is first on sys.path
and they import this module as `from _common import ...` (the tests, from the repository
root, as `benchmarks._common`). Importing it puts the repository root first on sys.path,
so that a script measures this checkout's `center_embed`, not an installed copy of another
one; `CENTER_EMBED_STAGED=1` says the caller staged the package on PYTHONPATH itself
(benchmarks/gpu_session.sh) and leaves sys.path alone.

The results record every script writes (`write_results`):

    {"benchmark": name, "command": "python benchmarks/bench_x.py ...", "commit": sha
     (+ "-dirty" when the tree has changes), "date": ISO date-time UTC, "machine": {"cpu",
     "flags", "cores", "gpu"}, "results": {...the benchmark's figures...}}

to benchmarks/results/<name>-<YYYY-MM-DD>.json, or to the path of the script's `--json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import http.client
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The CPU features that decide which kernels the runtimes pick (bf16, int8, AMX tiles).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "amx_tile")

if os.environ.get("CENTER_EMBED_STAGED") != "1" and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- results


def add_json_argument(parser) -> None:
    """The `--json FILE` every benchmark takes: where its results record goes."""
    parser.add_argument(
        "--json", metavar="FILE", help="write the results here (default: benchmarks/results/"
        "<name>-<date>.json)",
    )  # fmt: skip


def results_path(name: str, path: str | Path | None = None) -> Path:
    """`path` if given, else benchmarks/results/<name>-<today, UTC>.json."""
    if path:
        return Path(path)
    return RESULTS / f"{name}-{datetime.datetime.now(datetime.UTC):%Y-%m-%d}.json"


def write_results(name: str, results: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write the results record (module docstring) atomically; its path.

    Rewriting the same path (e.g. after every stage of a long benchmark) replaces the file
    whole, so a reader never sees half of one."""
    out = results_path(name, path)
    record = {
        "benchmark": name,
        "command": command_line(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=2, default=_plain) + "\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"results written to {out}", flush=True)
    return out


def _plain(value: Any) -> Any:
    """numpy scalars and arrays, Paths, Counters and the like as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Counter):
        return {str(k): v for k, v in value.items()}
    return str(value)


def command_line() -> str:
    """The command as typed: `python` and sys.argv, quoted where needed."""
    return shlex.join(["python", *sys.argv])


@functools.cache
def git_commit() -> str:
    """HEAD's sha, "-dirty" when tracked files changed; without git, $CENTER_EMBED_COMMIT
    (gpu_session.sh's copy of the tree has no .git), else "unknown"."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)  # fmt: skip
        if head.returncode == 0:
            status = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("CENTER_EMBED_COMMIT", "unknown")


@functools.cache
def machine() -> dict[str, Any]:
    """{"cpu": model name, "flags": the CPU_FLAGS it has, "cores", "gpu": name or None}."""
    model, flags = _cpu_facts()
    return {
        "cpu": model,
        "flags": [f for f in CPU_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "gpu": _gpu_name(),
    }


def _cpu_facts() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo, else from lscpu, else what platform says."""
    facts: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            facts.setdefault(key.strip().lower(), value.strip())
    if not facts.get("model name") and shutil.which("lscpu"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                key, _, value = line.partition(":")
                facts.setdefault(key.strip().lower(), value.strip())
    import platform

    model = facts.get("model name") or platform.processor() or platform.machine()
    return model, set(facts.get("flags", "").split())


def _gpu_name() -> str | None:
    """The first GPU's name: torch's view where the script imported torch, else nvidia-smi."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)  # fmt: skip
            names = out.stdout.strip().splitlines()
            if out.returncode == 0 and names:
                return names[0].strip()
    return None


# --------------------------------------------------------------------------- a local server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class Server:
    """`center-embed serve` in another process; exit_code and stderr once stopped."""

    port: int
    process: subprocess.Popen
    log: Any  # the file its stderr goes to (a pipe could fill up and stall it)
    exit_code: int | None = None
    stderr: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def read_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def start_server(model, env: dict[str, str] | None = None, log_level: str = "warning") -> Server:
    """`center-embed serve model` on 127.0.0.1 at a free port, `env` added to ours."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (stop_server closes it)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "center_embed.cli", "serve", str(model), "--port", str(port),
         "--log-level", log_level],
        env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=log,
    )  # fmt: skip
    return Server(port, process, log)


def wait_ready(server: Server, timeout: float = 60.0) -> None:
    """Until GET /readyz answers 200; SystemExit if the server exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"the server exited: {server.read_log()[-2000:]}")
        with contextlib.suppress(OSError):
            if http_get(server.port, "/readyz")[0] == 200:
                return
        time.sleep(0.1)
    raise SystemExit("the server did not become ready")


def stop_server(server: Server, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL after `timeout` s; sets and returns the exit status."""
    if server.exit_code is not None:
        return server.exit_code
    server.process.send_signal(signal.SIGTERM)
    try:
        server.exit_code = server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.exit_code = server.process.wait()
    server.stderr = server.read_log()
    server.log.close()
    print(f"server stopped with exit status {server.exit_code}", flush=True)
    if server.exit_code != 0:
        print(server.stderr[-3000:])
    return server.exit_code


@contextlib.contextmanager
def serve(model, env: dict[str, str] | None = None, log_level: str = "warning",
          ready_timeout: float = 60.0, stop_timeout: float = 30.0) -> Iterator[Server]:  # fmt: skip
    """A ready server for the `with` block, stopped after it whatever happens."""
    server = start_server(model, env, log_level)
    try:
        wait_ready(server, ready_timeout)
        yield server
    finally:
        stop_server(server, stop_timeout)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def descendants(pid: int) -> list[int]:
    """The process ids of `pid`'s children, their children, and so on."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the service's decode worker
    processes included), MB; processes that end while being read count as 0."""
    total = 0.0
    for current in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            total += rss_mb(current)
    return total


def _cpu_of(stat_file: Path, reaped: bool = False) -> float:
    """User + system CPU seconds from a /proc stat file (a process's or a thread's); with
    `reaped`, its children's that ended and were waited for too (cutime + cstime)."""
    fields = stat_file.read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11 : 15 if reaped else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a server, split: its main thread ("event_loop": uvicorn's loop), its
    other threads ("threads": the runtime's, the inference and decode threads), and its
    descendant processes ("workers": the decode workers, LitServe's workers; those that
    ended and were waited for included). Threads that ended are not counted: compare two
    readings of a server whose threads live long."""
    split = {"event_loop": 0.0, "threads": 0.0, "workers": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            split["event_loop" if task.name == str(pid) else "threads"] += _cpu_of(task / "stat")
    with contextlib.suppress(OSError):
        whole = Path(f"/proc/{pid}/stat")
        split["workers"] += _cpu_of(whole, reaped=True) - _cpu_of(whole)
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            split["workers"] += _cpu_of(Path(f"/proc/{child}/stat"), reaped=True)
    return split


def cpu_per_request_ms(before: dict[str, float], after: dict[str, float], requests: int
                       ) -> dict[str, float]:  # fmt: skip
    """Two tree_cpu_seconds readings over `requests` answers: CPU ms per request, per part
    and in all ("total")."""
    split = {k: (after[k] - before[k]) / max(requests, 1) * 1000 for k in before}
    return {**split, "total": sum(split.values())}


# --------------------------------------------------------------------------- HTTP load


def load_files(folder: str | None, limit: int) -> list[bytes]:
    """Up to `limit` files spread over `folder` (recursively), else synthetic 32x32 PNGs."""
    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        step = max(1, len(paths) // limit)
        return [p.read_bytes() for p in paths[::step][:limit]]
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for _ in range(limit):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files


BOUNDARY = "benchboundary7d1f"


def multipart(data: bytes, path: str = "/v1/classify") -> bytes:
    """A whole HTTP request: POST `path` with `data` as the multipart part "files"."""
    body = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="x.jpg"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
    ).encode()
    return head + body


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> int:
    """One request on a keep-alive connection; the status code (the body is read whole)."""
    writer.write(data)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return status


async def load(
    port: int, bodies: list[bytes], clients: int, seconds: float, pid: int | None = None
) -> dict:
    """`clients` keep-alive connections sending `bodies` in turn for `seconds`: the status of
    every answer, each request's latency (ms) and, given the server's `pid`, its memory.

    A minimal HTTP/1.1 client on asyncio streams with the request bytes prepared once, so
    that on a small machine it takes as little CPU from the server as it can."""
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    rss: list[float] = [] if pid is None else [rss_mb(pid)]
    started = time.perf_counter()
    stop = started + seconds

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                statuses[await request(reader, writer, bodies[i % len(bodies)])] += 1
                latencies.append((time.perf_counter() - t) * 1000)
                i += clients
        finally:
            writer.close()

    async def sample_memory() -> None:
        while pid is not None and time.perf_counter() < stop:
            await asyncio.sleep(0.5)
            rss.append(rss_mb(pid))

    everyone = asyncio.gather(sample_memory(), *(client(k) for k in range(clients)))
    await asyncio.wait_for(everyone, seconds + 60)
    elapsed = time.perf_counter() - started
    if pid is not None:
        rss.append(rss_mb(pid))
    return {"ok": statuses[200], "statuses": statuses, "latencies": latencies,
            "seconds": elapsed, "rss_mb": rss}  # fmt: skip

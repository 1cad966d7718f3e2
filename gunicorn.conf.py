"""Gunicorn settings for slow mobile uploads behind a PaaS router; the Procfile and README use them."""

import ctypes
import os
import shutil
import tempfile

from dotenv import load_dotenv

load_dotenv()  # the same .env the app reads; the real environment wins


def _count(name, default):
    value = os.environ.get(name, default)
    if not value.isdecimal() or int(value) < 1:
        raise SystemExit(f"Configuration error: {name} must be a whole number of at least 1, got {value!r}.")
    return int(value)


# The platform says where to listen through $PORT; without it, stay on loopback.
bind = f"0.0.0.0:{os.environ['PORT']}" if os.environ.get("PORT") else "127.0.0.1:8000"
wsgi_app = "app:create_app()"

# gthread spends a thread on each request until its client has sent all of it (and on each
# new connection for up to 5 s until its first byte), so threads are what slow phones and idle
# connections use up: 20 trickling uploads and 20 silent connections, all on one worker, still
# leave threads for everyone else. Threads are cheap to park; only app.ACTIVE_REQUESTS (2) of
# them run at once (and small uploads waiting on their storage), because more running threads
# on one core only share the GIL (64 running: analyze p99 7x its p50; 2: under 2x). Bodies
# waiting for their turn are spooled to disk.
worker_class = "gthread"
workers = _count("WEB_CONCURRENCY", "2")
threads = _count("GUNICORN_THREADS", "64")

# glibc gives threads malloc arenas of their own (up to 8 per core) and memory freed in one is
# not reused by another: with 64 threads, 16 concurrent 5 MiB uploads took a worker to 190 MiB.
# One arena (what MALLOC_ARENA_MAX=1 does, set here so every way of starting gets it) brought
# that to 53 MiB at the same speed: the GIL lets one thread allocate at a time anyway.
M_ARENA_MAX = -8
try:
    ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
except (OSError, AttributeError):  # not glibc: nothing to cap
    pass

# Load the app once in the master: a bad setting stops the start with one message, the
# generated API key is made once, and unfinished uploads are cleaned up only when no
# worker can be writing one (a worker replaced after a crash does not clean up again).
preload_app = True

# gthread workers are restarted when their main loop is stuck this long; requests themselves
# are bounded by the app's CLIENT_TIMEOUT on the socket.
timeout = 25
# Routers stop the old release with SIGTERM and kill it 30 s later: finish uploads first.
graceful_timeout = 20
# Longer than a router's idle timeout, so it never reuses a connection we just closed.
keepalive = 75

# The app writes one access line per request itself (text or JSON, with request id and
# duration), so gunicorn's own access log stays off rather than doubling every line.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# Metrics (METRICS_TOKEN): each worker writes its counts to files in one folder, made fresh at
# every start so counts start from zero, which any worker's scrape adds up. Set before the app is
# loaded: prometheus_client chooses how to keep counts when it is imported. A worker that dies
# keeps its counts in the sum; only its gauges of what is happening now are dropped.
if os.environ.get("METRICS_TOKEN"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="skin-metrics-")


def child_exit(server, worker):
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

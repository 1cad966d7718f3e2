"""Gunicorn settings for slow mobile uploads behind a PaaS router; the Procfile and README use them."""

import os

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

# Threads let one worker wait on a slow client's upload or on an fsync while another
# request runs; more than two per worker only adds GIL contention on one core.
worker_class = "gthread"
workers = _count("WEB_CONCURRENCY", "2")
threads = _count("GUNICORN_THREADS", "2")

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

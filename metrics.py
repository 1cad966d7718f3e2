"""What the service counts for Prometheus, and the scrape that adds up the counts of every worker.

prometheus_client is imported only when metrics are on (METRICS_TOKEN). Under gunicorn,
gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a folder made fresh at each start: every
worker writes its counts to files there, a scrape by any worker sums them, and a replaced
worker's counts stay counted. Without it (flask run, the tests) the counts are the process's own.
Every label value comes from a fixed set, whatever a client sends.
"""

import os

METHODS = frozenset({"GET", "POST", "DELETE", "OPTIONS", "HEAD", "PUT", "PATCH"})
ANALYSIS_RESULTS = frozenset({"new", "stored", "fixture"})
LIMITS = frozenset({"upload", "analyze", "auth-failures"})  # app.RATE_LIMITS' names
# Most requests take milliseconds; uploads over slow networks and a failing bucket, seconds.
SECONDS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads


class Metrics:
    """The service's counters, histograms and gauges, labelled from fixed sets only.

    ``routes`` are the route templates (``/images/<image_id>``); ``codes`` the error codes the
    service can answer with. Anything else is counted as ``unmatched`` or ``other``.
    """

    def __init__(self, routes, codes, content_types):
        import prometheus_client as prometheus  # only now: metrics are on

        self._prometheus = prometheus
        self.routes, self.codes, self.content_types = (
            frozenset(routes),
            frozenset(codes),
            frozenset(content_types),
        )
        self.registry = prometheus.CollectorRegistry()

        def metric(kind, name, help_text, labels=(), **options):
            return kind(f"skin_{name}", help_text, labels, registry=self.registry, **options)

        counter, histogram = prometheus.Counter, prometheus.Histogram
        self._requests = metric(counter, "http_requests", "Requests answered.", ("route", "method", "status"))
        self._latency = metric(
            histogram,
            "http_request_duration_seconds",
            "Time to answer a request.",
            ("route",),
            buckets=SECONDS,
        )
        self._upload_bytes = metric(counter, "upload_bytes", "Bytes of images stored.", ("type",))
        self._images = metric(counter, "images_stored", "Images stored.", ("type",))
        self._analyses = metric(counter, "analyses", "Analyses answered, by result.", ("result",))
        self._refusals = metric(counter, "refusals", "Requests answered with an error, by code.", ("code",))
        self._storage_failures = metric(counter, "storage_failures", "Requests failed by the registry.")
        self._queue_wait = metric(
            histogram, "admission_wait_seconds", "Time waited for a turn to run.", buckets=SECONDS
        )
        self._waiting = metric(
            prometheus.Gauge,
            "admission_waiting",
            "Requests waiting for a turn now.",
            multiprocess_mode="livesum",
        )
        self._cut_off = metric(counter, "slow_clients_cut_off", "Bodies dropped after CLIENT_TIMEOUT (408).")
        self._replays = metric(counter, "idempotent_replays", "Uploads answered from an Idempotency-Key.")
        self._limited = metric(counter, "rate_limited", "Requests refused by a rate limit.", ("limit",))

    def request(self, route, method, status, seconds):
        route = route if route in self.routes else "unmatched"
        self._requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self._latency.labels(route).observe(seconds)

    def upload(self, content_type, size):
        content_type = content_type if content_type in self.content_types else "other"
        self._upload_bytes.labels(content_type).inc(size)
        self._images.labels(content_type).inc()

    def analysis(self, result):
        self._analyses.labels(result if result in ANALYSIS_RESULTS else "other").inc()

    def refusal(self, code):
        self._refusals.labels(code if code in self.codes else "other").inc()

    def storage_failure(self):
        self._storage_failures.inc()

    def queued(self, seconds):
        self._queue_wait.observe(seconds)

    def waiting(self, change):
        self._waiting.inc(change)

    def cut_off(self):
        self._cut_off.inc()

    def replay(self):
        self._replays.inc()

    def rate_limited(self, limit):
        self._limited.labels(limit if limit in LIMITS else "other").inc()

    def scrape(self):
        """The text a Prometheus scrape gets: every live and dead worker's counts added up."""
        prometheus = self._prometheus
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return prometheus.generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = prometheus.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return prometheus.generate_latest(registry)


class NoMetrics:
    """What the service uses when metrics are off: the same calls, counting nothing."""

    def request(self, route, method, status, seconds):
        pass

    def upload(self, content_type, size):
        pass

    def analysis(self, result):
        pass

    def refusal(self, code):
        pass

    def storage_failure(self):
        pass

    def queued(self, seconds):
        pass

    def waiting(self, change):
        pass

    def cut_off(self):
        pass

    def replay(self):
        pass

    def rate_limited(self, limit):
        pass

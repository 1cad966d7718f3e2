"""Benchmark of the service against a bare-WSGI ceiling; run with .venv/bin/python bench/run.py."""

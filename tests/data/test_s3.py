"""Object storage for real: a local S3 server (moto) behind a proxy that fails 20% of requests.

The SDK's own retries are off (AWS_MAX_ATTEMPTS=1), so every injected failure reaches the project's
retries: the converter's uploads and streaming's downloads (download_retry).
"""

import http.client
import http.server
import random
import threading

import pytest

from composer_prx.data.convert import ConvertConfig, convert
from composer_prx.data.dataset import build_dataloader
from tests.data.test_convert import make_folder


class FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards HTTP requests to ``upstream``; answers 500 InternalError to a seeded ``failure_rate`` of them."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], failure_rate: float, seed: int = 0):
        self.upstream, self.failure_rate = upstream, failure_rate
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.requests = self.failures = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)

    def should_fail(self) -> bool:
        with self.lock:
            self.requests += 1
            fail = self.rng.random() < self.failure_rate
            self.failures += fail
            return fail


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        return

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.server.should_fail():
            payload = b"<Error><Code>InternalError</Code><Message>injected failure</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = f"{self.server.upstream[0]}:{self.server.upstream[1]}"
        conn.request(self.command, self.path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


@pytest.fixture
def flaky_s3(monkeypatch):
    """(endpoint URL, proxy) of a moto S3 server with bucket "prx", reached through a 20%-failing proxy."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                       "AWS_RETRY_MODE": "standard"}.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="prx")
    proxy = FlakyProxy((host, port), failure_rate=0.2)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    yield endpoint, proxy
    proxy.shutdown()
    server.stop()


def test_convert_to_s3_and_stream_an_exact_epoch_through_failures(tmp_path, flaky_s3, monkeypatch):
    import tempfile

    _, proxy = flaky_s3
    good, _ = make_folder(tmp_path / "in", n=120)
    cfg = ConvertConfig(base_resolution=64, patch_size=8, format="png", shard_size=1 << 15)  # many shards
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    summary = convert([str(tmp_path / "in")], "s3://prx/data", cfg)
    assert sum(summary.written.values()) == len(good)
    assert not list((tmp_path / "tmp").iterdir())  # streamed through a temporary folder that is gone
    assert convert([str(tmp_path / "in")], "s3://prx/data", cfg).skipped_existing  # reads the remote marker

    upload_failures, upload_requests = proxy.failures, proxy.requests
    # A download attempt is a HEAD and a GET, so at 20% it fails 36% of the time and streaming's
    # retries (exponential back-off from 1 s) would give up on one of ~200 shard downloads in every
    # few runs. At 10% an attempt fails 19% of the time: 10 attempts fail together with p ~ 6e-8.
    proxy.failure_rate = 0.1
    for workers, extra in ((0, {}), (2, {"predownload": 8})):
        loader = build_dataloader("s3://prx/data", str(tmp_path / f"cache{workers}"), batch_size=8, resolution=32,
                                  patch_size=8, seed=2, download_retry=10, num_workers=workers, **extra)
        seen = [c for batch in loader for c in batch["caption"]]
        assert sorted(seen) == sorted(good), f"workers={workers} {extra}"
        del loader
    downloads = proxy.requests - upload_requests, proxy.failures - upload_failures
    print(f"proxy: {upload_failures} of {upload_requests} upload and {downloads[1]} of {downloads[0]} "
          "download requests failed")
    assert upload_failures >= 5 and upload_failures / upload_requests > 0.1  # failures really happened
    assert downloads[1] >= 5 and downloads[1] / downloads[0] > 0.05

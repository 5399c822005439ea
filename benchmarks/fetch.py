"""How fast a node fetches a prefix of many small objects (a product set in a bucket) into its own disk:
`ObjectListing.fetch` with its parallel requests against one request at a time, side by side in one run, from an
S3 server on this machine (moto's, from ".[test]"), as it answers (well under a millisecond a request) and with a
delay added to every answer (--latency-ms, default 20: about a request's round trip to a bucket in the same region).

    python benchmarks/fetch.py [--objects 10000] [--size 20000] [--latency-ms 20]

Ends with `parallel/serial: R.RRx` (objects per second, with the delay).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import LocalS3  # noqa: E402
from tuneprod.storage import FETCH_WORKERS, ObjectListing  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=10000)
    parser.add_argument("--size", type=int, default=20000, help="bytes per object (a small JPEG)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added to every answer of the server")
    args = parser.parse_args()
    s3 = LocalS3()
    answer = s3.server._server.app  # moto's WSGI application, served by werkzeug in threads
    delay = {"s": 0.0}

    def delayed(environ, start_response):
        time.sleep(delay["s"])
        return answer(environ, start_response)

    s3.server._server.app = delayed
    body = bytes(range(256)) * (args.size // 256 + 1)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.client.put_object(Bucket=s3.BUCKET, Key=f"shop/c{i % 100:03d}/{i:06d}.jpg",
                                                      Body=body[:args.size]), range(args.objects)))
    print(f"uploaded {args.objects} objects of {args.size} bytes in {time.monotonic() - started:.0f} s")
    listing = ObjectListing.of(s3.uri("shop"))
    rates = {}
    try:
        for latency in (0.0, args.latency_ms):
            delay["s"] = latency / 1000
            for workers in (1, FETCH_WORKERS):
                root = Path(tempfile.mkdtemp(prefix="fetch"))
                started = time.monotonic()
                listing.fetch(root, progress=lambda _: None, workers=workers)
                rates[latency, workers] = args.objects / (time.monotonic() - started)
                print(f"{latency:4.0f} ms added: {workers:>2} request(s) at a time: {rates[latency, workers]:7.0f} "
                      f"objects/s", flush=True)
                shutil.rmtree(root)
    finally:
        s3.stop()
    print(f"parallel/serial: {rates[args.latency_ms, FETCH_WORKERS] / rates[args.latency_ms, 1]:.2f}x "
          f"(with {args.latency_ms:g} ms a request; {rates[0.0, FETCH_WORKERS] / rates[0.0, 1]:.2f}x as the local "
          f"server answers)")

if __name__ == "__main__":
    main()

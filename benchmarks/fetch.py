"""How fast a node fetches a prefix of many small objects (a product set in a bucket) into its own disk:
`ObjectListing.fetch` with its parallel requests against one request at a time, side by side in one run, from an
S3 server on this machine (moto's, from ".[test]").

    python benchmarks/fetch.py [--objects 10000] [--size 20000] [--rounds 2]

Ends with `parallel/serial: R.RRx` (objects per second, the medians of the rounds). A local server answers in well
under a millisecond, where a real bucket takes tens of milliseconds a request: there, the parallel requests count
for more.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
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
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    s3 = LocalS3()
    body = bytes(range(256)) * (args.size // 256 + 1)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: s3.client.put_object(Bucket=s3.BUCKET, Key=f"shop/c{i % 100:03d}/{i:06d}.jpg",
                                                      Body=body[:args.size]), range(args.objects)))
    print(f"uploaded {args.objects} objects of {args.size} bytes in {time.monotonic() - started:.0f} s")
    listing = ObjectListing.of(s3.uri("shop"))
    rates = {1: [], FETCH_WORKERS: []}
    try:
        for round_ in range(args.rounds):
            for workers in rates:
                root = Path(tempfile.mkdtemp(prefix="fetch"))
                started = time.monotonic()
                listing.fetch(root, progress=lambda _: None, workers=workers)
                rate = args.objects / (time.monotonic() - started)
                rates[workers].append(rate)
                print(f"round {round_ + 1}: {workers:>2} request(s) at a time: {rate:7.0f} objects/s", flush=True)
                shutil.rmtree(root)
    finally:
        s3.stop()
    serial, parallel = (statistics.median(rates[w]) for w in (1, FETCH_WORKERS))
    print(f"serial {serial:.0f} objects/s, {FETCH_WORKERS} at a time {parallel:.0f} objects/s")
    print(f"parallel/serial: {parallel / serial:.2f}x")


if __name__ == "__main__":
    main()

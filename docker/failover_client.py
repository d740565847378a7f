"""Closed-loop load through the load balancer, for docker/test.sh (standard library only).

WORKERS threads POST one PNG each, back to back, until DURATION_S has passed. A 503 is retried
after its Retry-After (at most RETRIES times), as the API asks of its clients; any other answer
that is not 200, or a broken connection, is a lost request. Prints a JSON summary; exits 1 if any
request was lost:

    python3 docker/failover_client.py http://127.0.0.1:18000/predict examples/digit-3.png
"""

import argparse
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter


def post(url: str, body: bytes) -> tuple[int | None, str | None]:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "image/png"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            response.read()
            return response.status, None
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, error.headers.get("Retry-After")
    except OSError:
        return None, None


def run_worker(
    url: str, body: bytes, deadline: float, retries: int, counts: Counter, lock: threading.Lock
) -> None:
    while time.monotonic() < deadline:
        for attempt in range(retries + 1):
            status, retry_after = post(url, body)
            if status != 503 or attempt == retries:
                break
            with lock:
                counts["retried_503"] += 1
            time.sleep(min(float(retry_after or 1), 5.0))
        with lock:
            counts["ok" if status == 200 else f"lost_{status}"] += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("image")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--retries", type=int, default=5)
    args = parser.parse_args()
    with open(args.image, "rb") as file:
        body = file.read()
    counts: Counter = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + args.duration_s
    threads = [
        threading.Thread(
            target=run_worker, args=(args.url, body, deadline, args.retries, counts, lock)
        )
        for _ in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lost = sum(n for key, n in counts.items() if key.startswith("lost_"))
    print(json.dumps({**counts, "lost": lost}, sort_keys=True))
    sys.exit(1 if lost or not counts["ok"] else 0)


if __name__ == "__main__":
    main()

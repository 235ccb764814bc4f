#!/usr/bin/env python3
"""A load run against `fusec serve`: N chat requests at concurrency C, then (with
--check) each one alone, checking every output equals its output served alone.

Usage: serve_load.py URL MODEL [--requests 64] [--concurrency 16] [--max-tokens 32] [--check]

Prints wall time, requests/s, generated tokens/s, mean and worst latency, and the
server's own metrics (preemptions, tokens/s). Standard library only.
"""

import argparse
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 12 times 7?",
    "Write a haiku about the sea.", "Who wrote Hamlet?", "What does a CPU do?",
    "Give me a synonym for happy.", "How many legs does a spider have?",
]


def post(url, body):
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        return {l.split()[0]: float(l.split()[1]) for l in r.read().decode().splitlines()
                if l and not l.startswith("#")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    url = a.url.rstrip("/")

    def body(i):
        q = QUESTIONS[i % len(QUESTIONS)]
        return {"model": a.model, "max_tokens": a.max_tokens - (i % 4) * 4,
                "messages": [{"role": "user", "content": f"{q} (request {i})"}]}

    def one(i):
        t = time.monotonic()
        r = post(url, body(i))
        return r["choices"][0]["token_ids"], time.monotonic() - t

    before = metrics(url)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=a.concurrency) as pool:
        together = list(pool.map(one, range(a.requests)))
    wall = time.monotonic() - start
    after = metrics(url)
    tokens = sum(len(ids) for ids, _ in together)
    lat = [t for _, t in together]
    print(f"{a.requests} requests at concurrency {a.concurrency}: {wall:.1f} s, "
          f"{a.requests / wall:.2f} requests/s, {tokens} tokens generated, "
          f"{tokens / wall:.1f} generated tokens/s; latency mean {sum(lat) / len(lat):.1f} s, "
          f"worst {max(lat):.1f} s; preemptions "
          f"{int(after['fusec_preemptions_total'] - before['fusec_preemptions_total'])}")
    if a.check:
        start = time.monotonic()
        alone = [one(i) for i in range(a.requests)]
        wall1 = time.monotonic() - start
        same = sum(x[0] == y[0] for x, y in zip(together, alone))
        print(f"alone, one at a time: {wall1:.1f} s, {tokens / wall1:.1f} generated tokens/s; "
              f"{same}/{a.requests} outputs equal to their run alone")
        if same != a.requests:
            raise SystemExit(1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""`fusec serve` driven by the official `openai` client (pinned in scripts/serve-test.sh).

Usage: serve_client_test.py BASE_URL PACED_URL
  BASE_URL   a server of examples/tiny-chat/model.toml, e.g. http://127.0.0.1:PORT
  PACED_URL  the same model served with --step-delay-ms (slow enough to disconnect
             from a request while it runs)

Checks: the models list; whole and streamed completions and chat completions; 64
requests (half streamed) at concurrency 16, each equal to its output served alone; a
client that closes its stream in the middle (its sequence is freed); a request over
the context limit and malformed JSON (4xx with a JSON error); the metrics endpoint.
"""

import json
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai

MODEL = "tiny-chat"
WORDS = "the cat is on hat hello world what capital of France Paris".split()


def metrics(base):
    with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.split()
            out[name] = float(value)
    return out


def wait_for(what, check, timeout=30.0):
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out waiting: {what}")
        time.sleep(0.02)


def request(i):
    """Request i of 64: completions or chat, text or token ids, streamed when odd."""
    n = 2 + (i * 7) % 19
    text = " ".join(WORDS[(i * 5 + k * 3) % len(WORDS)] for k in range(n))
    max_tokens = 4 + (i * 11) % 37
    stream = i % 2 == 1
    if i % 4 == 3:
        return "chat", dict(messages=[{"role": "user", "content": text}],
                            max_tokens=max_tokens, stream=stream)
    prompt = text if i % 4 != 2 else [((i * 31 + k * 17) % 250) + 3 for k in range(n + 3)]
    return "completion", dict(prompt=prompt, max_tokens=max_tokens, stream=stream,
                              extra_body={"ignore_eos": i % 8 < 4})


def run(client, i):
    """Request i's (text, finish_reason, token ids), whole or streamed."""
    kind, args = request(i)
    if kind == "chat":
        if not args["stream"]:
            r = client.chat.completions.create(model=MODEL, **args)
            c = r.choices[0]
            return c.message.content, c.finish_reason, c.model_extra.get("token_ids")
        text, finish, ids = "", None, []
        for chunk in client.chat.completions.create(model=MODEL, **args):
            c = chunk.choices[0]
            text += c.delta.content or ""
            ids += c.model_extra.get("token_ids", [])
            if c.finish_reason:
                assert finish is None, "two finish reasons"
                finish = c.finish_reason
        return text, finish, ids
    if not args["stream"]:
        r = client.completions.create(model=MODEL, **args)
        c = r.choices[0]
        assert r.usage.completion_tokens == len(c.model_extra["token_ids"])
        return c.text, c.finish_reason, c.model_extra["token_ids"]
    text, finish, ids = "", None, []
    for chunk in client.completions.create(model=MODEL, **args):
        c = chunk.choices[0]
        text += c.text
        ids += c.model_extra.get("token_ids", [])
        if c.finish_reason:
            assert finish is None, "two finish reasons"
            finish = c.finish_reason
    return text, finish, ids


def test_basics(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL], models
    r = client.completions.create(model=MODEL, prompt="the cat is on the hat", max_tokens=12,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length", r
    assert r.usage.completion_tokens == 12 and len(r.choices[0].model_extra["token_ids"]) == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="the cat is on the hat", max_tokens=12, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == r.choices[0].text, (streamed, r.choices[0].text)
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=8)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    print("ok  models, completion whole and streamed, chat")


def test_sampling(client):
    # The client's own sampling parameters: a seed gives the same text every time.
    def sample(seed, stream=False):
        args = dict(model=MODEL, messages=[{"role": "user", "content": "tell me a story"}],
                    max_tokens=16, temperature=0.9, top_p=0.95, seed=seed)
        if not stream:
            return client.chat.completions.create(**args).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **args) if c.choices)
    first = sample(11)
    assert first == sample(11) == sample(11, stream=True), first
    others = {sample(s) for s in (12, 13, 14)}
    assert others != {first}, (first, others)
    print("ok  sampling with temperature, top_p and seed")


def test_concurrent(client, base):
    before = metrics(base)
    alone = [run(client, i) for i in range(64)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda i: run(client, i), range(64)))
    for i, (a, t) in enumerate(zip(alone, together)):
        assert a == t, f"request {i}: alone {a!r}, at concurrency 16 {t!r}"
        assert a[1] in ("stop", "length"), a
        assert a[2], f"request {i} generated nothing"
    after = metrics(base)
    finished = after["fusec_requests_finished_total"] - before["fusec_requests_finished_total"]
    assert finished == 128, f"{finished} of 128 requests finished"
    assert after["fusec_requests_failed_total"] == before["fusec_requests_failed_total"]
    print(f"ok  64 requests at concurrency 16 equal served alone "
          f"({int(after['fusec_preemptions_total'])} preemptions so far)")


def test_disconnect(paced_client, paced):
    before = metrics(paced)
    stream = paced_client.completions.create(model=MODEL, prompt="the cat", max_tokens=100,
                                             stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices[0].finish_reason is None
    assert metrics(paced)["fusec_running_sequences"] == 1
    stream.close()
    wait_for("the closed stream's request is cancelled", lambda: (
        metrics(paced)["fusec_requests_cancelled_total"]
        == before["fusec_requests_cancelled_total"] + 1))
    m = metrics(paced)
    wait_for("its sequence is freed", lambda: metrics(paced)["fusec_running_sequences"] == 0)
    assert metrics(paced)["fusec_kv_blocks_used"] == 0
    assert m["fusec_requests_finished_total"] == before["fusec_requests_finished_total"]
    # The server goes on serving.
    r = paced_client.completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")
    print("ok  a client that disconnects mid-stream frees its sequence")


def test_errors(client, base):
    try:
        client.completions.create(model=MODEL, prompt="the cat", max_tokens=500)
        raise AssertionError("a request over the context limit was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.code == "context_length_exceeded", e
    try:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "the " * 200}], max_tokens=1)
        raise AssertionError("a prompt over the context limit was accepted")
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e
    try:
        client.completions.create(model="no-such-model", prompt="a", max_tokens=1)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e
    for body in (b'{"model": "tiny-chat", "prompt": ', b"\xff not json", b"[1, 2"):
        req = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=30)
            raise AssertionError(f"malformed JSON {body!r} was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 400, e.code
            err = json.loads(e.read())["error"]
            assert err["type"] == "invalid_request_error" and err["message"], err
    with urllib.request.urlopen(base + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}
    print("ok  over the context limit, unknown model, malformed JSON: 4xx with JSON errors")


def main():
    base, paced = sys.argv[1].rstrip("/"), sys.argv[2].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    paced_client = openai.OpenAI(base_url=paced + "/v1", api_key="unused", max_retries=0,
                                 timeout=120)
    print(f"openai {openai.__version__} against {base} and {paced}")
    test_basics(client)
    test_sampling(client)
    test_concurrent(client, base)
    test_disconnect(paced_client, paced)
    test_errors(client, base)
    m = metrics(base)
    assert m["fusec_running_sequences"] == 0 and m["fusec_queue_length"] == 0, m
    assert m["fusec_kv_blocks_used"] == 0, m
    print("all client tests passed")


if __name__ == "__main__":
    main()

"""Abuse test of `qadapter serve`: a normal request's latency idle and while abusive clients run, side by side.

    python benchmarks/abuse_test.py --model tiny                # self-started server, tiny random model
    python benchmarks/abuse_test.py --model path/to/model [--adapter DIR] [--phase-seconds 40]

A self-started server (``--model``: ``tiny`` or a model folder; as in load_test.py) runs with an
API key and its default limits (SECURITY.md, "Server"), ``--read-timeout`` excepted. One client
sends normal chat completions (``--max-tokens`` greedy tokens, EOS barred: equal work), one after
another, for ``--phase-seconds`` with the server otherwise idle, then as long again while these
run at the same time, each repeating its abuse until the phase ends:

    huge-body     declares a 100 MB body and streams it; the server answers 413 after the head
    chunked-body  streams a body with no Content-Length; 413 once the limit is passed
    stop-strings  long answers with 4 stop strings of the maximum length
    max-size      bodies of exactly the size limit holding the longest prompt the server tokenizes (far over the
                  context): 400 after reading, parsing and tokenizing it
    slowloris     ``--slowloris`` connections that each trickle a header byte a second, reopened when closed

Reported: the normal latency p50/p95 in each phase and their ratio (target: at most 2), and what
each abuser got. Written to ``<out>/abuse-<model>-<timestamp>.json`` and ``.md``. Traffic goes
to 127.0.0.1 only, every loop is bounded by the phase, every socket by a timeout.
"""

from __future__ import annotations

import argparse
import json
import secrets
import selectors
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from bench import REPO, machine, write_atomic
from load_test import percentile, started_server

from qadapter.serve import MAX_CHARS_PER_TOKEN

WORDS = "the cat sat on a mat and the dog ran to the red log".split()
HUGE_BYTES = 100 * 2**20
CHUNK = 64 * 1024
ABUSERS = ("huge-body", "chunked-body", "stop-strings", "max-size", "slowloris")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="start a server on this base: 'tiny' or a model folder")
    p.add_argument("--adapter", type=Path, help="adapter the server serves (default: a fresh one on --model)")
    p.add_argument("--phase-seconds", type=float, default=40.0, help="length of each phase (idle, abused)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per normal request")
    p.add_argument("--slowloris", type=int, default=200, help="connections that trickle their headers")
    p.add_argument("--read-timeout", type=float, default=10.0, help="the server's --read-timeout (shorter than its default, so slowloris connections cycle within a phase)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="the server's --max-request-bytes (its default)")
    p.add_argument("--max-stop-chars", type=int, default=256, help="the server's --max-stop-chars (its default)")
    p.add_argument("--abusers", default=",".join(ABUSERS), help=f"which abusers run, comma-separated (default: all of {', '.join(ABUSERS)})")
    p.add_argument("--abuse-pause", type=float, default=0.2, help="seconds each body abuser waits between attempts (flooding is a rate limiter's job)")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if min(args.phase_seconds, args.max_tokens, args.read_timeout, args.max_request_bytes, args.max_stop_chars) <= 0 or args.slowloris < 0:
        p.error("--phase-seconds, --max-tokens, --read-timeout, --max-request-bytes, --max-stop-chars must be > 0, --slowloris >= 0")
    args.abusers = [name for name in args.abusers.split(",") if name]
    if not set(args.abusers) <= set(ABUSERS):
        p.error(f"--abusers: choose among {', '.join(ABUSERS)}")
    args.max_batch_size = 32  # what started_server passes on: the server's default
    return args


# ---------------------------------------------------------------------------------------------
# Raw HTTP on loopback


class Target:
    """Where and how to reach the server."""

    def __init__(self, url: str, key: str) -> None:
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.key = key

    def connect(self, timeout: float = 30.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def head(self, *lines: str) -> bytes:
        return "\r\n".join(["POST /v1/chat/completions HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {self.key}",
                            "Content-Type: application/json", *lines, "", ""]).encode()


def read_status(sock: socket.socket) -> int:
    """The status code of the response arriving on ``sock``."""
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a status line")
        data += chunk
    return int(data.split(b" ", 2)[1])


def send_until_answered(sock: socket.socket, chunk: bytes, total: int) -> tuple[str, float]:
    """Send ``chunk`` after ``chunk``, ``total`` bytes at most, until the server answers; returns (its status, or
    "reset", and the seconds it took)."""
    started, sent = time.perf_counter(), 0
    try:
        while sent < total and not _readable(sock):
            sock.sendall(chunk)
            sent += len(chunk)
        return str(read_status(sock)), time.perf_counter() - started
    except (BrokenPipeError, ConnectionResetError):  # it answered and closed with our bytes still arriving: the reset can come first
        return "reset", time.perf_counter() - started


def _readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ)
        return bool(sel.select(0))


def post_json(target: Target, body: bytes) -> int:
    with target.connect() as sock:
        sock.sendall(target.head(f"Content-Length: {len(body)}", "Connection: close") + body)
        return read_status(sock)


# ---------------------------------------------------------------------------------------------
# Abusers: each repeats its attempt until ``stop`` is set, recording (outcome, seconds)


def oversize_body(target: Target, stop: threading.Event, pause: float, chunked: bool) -> list[tuple[str, float]]:
    """100 MB bodies streamed in 64 KiB pieces, declared in Content-Length or chunked (no length)."""
    results = []
    data = b"x" * CHUNK
    head = target.head("Transfer-Encoding: chunked" if chunked else f"Content-Length: {HUGE_BYTES}")
    chunk = f"{CHUNK:x}\r\n".encode() + data + b"\r\n" if chunked else data
    while not stop.is_set():
        with target.connect() as sock:
            sock.sendall(head)
            results.append(send_until_answered(sock, chunk, HUGE_BYTES))
        stop.wait(pause)
    return results


def stop_strings(target: Target, stop: threading.Event, max_chars: int, max_tokens: int) -> list[tuple[str, float]]:
    """Long answers with 4 stop strings of the maximum length, made of the model's words (partial matches all along)."""
    stops = [(" ".join(WORDS[i:] + WORDS) * max_chars)[:max_chars - 1] + "!" for i in range(4)]
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "tell me about the cat"}], "max_tokens": 4 * max_tokens,
                       "min_tokens": 4 * max_tokens, "temperature": 0, "stop": stops}).encode()
    results = []
    while not stop.is_set():
        started = time.perf_counter()
        results.append((str(post_json(target, body)), time.perf_counter() - started))
    return results


def max_size(target: Target, stop: threading.Event, limit: int, prompt_chars: int, pause: float) -> list[tuple[str, float]]:
    """The most work one request can ask before decoding: a body of exactly ``limit`` bytes (JSON whitespace after the
    message) whose prompt is the longest the server tokenizes (``prompt_chars`` of words, far more tokens than fit,
    or as many as the body holds)."""
    chars = min(prompt_chars, limit - 100)  # 100: the JSON around the message
    words = (" ".join(WORDS) * (chars // 10 + 1))[:chars]
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": words}]}).encode()
    body = body[:-1] + b" " * (limit - len(body)) + b"}"
    assert len(body) == limit
    results = []
    while not stop.is_set():
        started = time.perf_counter()
        results.append((str(post_json(target, body)), time.perf_counter() - started))
        stop.wait(pause)
    return results


def slowloris(target: Target, stop: threading.Event, count: int) -> dict[str, Any]:
    """``count`` connections that each send a header byte a second; one the server closes is reopened."""
    start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    opened: dict[socket.socket, float] = {}
    lifetimes: list[float] = []
    refused = 0

    def open_one() -> None:
        nonlocal refused
        try:
            sock = target.connect(timeout=5)
            sock.sendall(start)
            sock.setblocking(False)
            opened[sock] = time.monotonic()
        except OSError:
            refused += 1

    for _ in range(count):
        open_one()
    most_open = len(opened)
    while not stop.wait(1.0):
        for sock in list(opened):
            try:
                sock.send(b"X")  # "X-...": a header that never ends
                closed = sock.recv(1) == b""
            except BlockingIOError:
                closed = False
            except OSError:
                closed = True
            if closed:
                lifetimes.append(time.monotonic() - opened.pop(sock))
                sock.close()
                open_one()
        most_open = max(most_open, len(opened))
    for sock in opened:
        sock.close()
    return {"connections": count, "closed_by_server": len(lifetimes), "could_not_connect": refused, "most_open_at_once": most_open,
            "lifetime_p50_s": percentile(lifetimes, 50), "lifetime_max_s": max(lifetimes, default=None)}


def context_tokens(model: Path) -> int:
    """The model's context in tokens, as the server reads it (qadapter.serve.context_window)."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    for key in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return int(AutoTokenizer.from_pretrained(model).model_max_length)


# ---------------------------------------------------------------------------------------------
# The normal client and the phases


def normal_latencies(client: Any, args: argparse.Namespace, seconds: float) -> tuple[list[float], list[str]]:
    """Normal requests one after another for ``seconds``: latencies of those that succeeded, and the errors."""
    latencies, errors = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            reply = client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": WORDS[len(latencies) % len(WORDS)] + " is what"}],
                max_tokens=args.max_tokens, temperature=0, extra_body={"min_tokens": args.max_tokens},
            )
            assert reply.usage.completion_tokens == args.max_tokens
            latencies.append(time.perf_counter() - started)
        except Exception as exc:  # counted and reported; the run goes on
            errors.append(f"{type(exc).__name__}: {exc}")
    return latencies, errors


def abused_phase(client: Any, target: Target, args: argparse.Namespace, prompt_chars: int) -> tuple[list[float], list[str], dict[str, Any]]:
    stop = threading.Event()
    outcomes: dict[str, Any] = {}
    jobs = {
        "huge-body": lambda: oversize_body(target, stop, args.abuse_pause, chunked=False),
        "chunked-body": lambda: oversize_body(target, stop, args.abuse_pause, chunked=True),
        "stop-strings": lambda: stop_strings(target, stop, args.max_stop_chars, args.max_tokens),
        "max-size": lambda: max_size(target, stop, args.max_request_bytes, prompt_chars, args.abuse_pause),
        "slowloris": lambda: slowloris(target, stop, args.slowloris),
    }

    def run(name: str, job: Callable[[], Any]) -> None:
        try:
            outcomes[name] = job()
        except Exception as exc:  # an abuser that broke is reported, not hidden
            outcomes[name] = {"error": f"{type(exc).__name__}: {exc}"}

    threads = [threading.Thread(target=run, args=(name, jobs[name]), daemon=True) for name in args.abusers]
    for thread in threads:
        thread.start()
    time.sleep(min(2.0, args.read_timeout / 2))  # let every abuser get going
    try:
        latencies, errors = normal_latencies(client, args, args.phase_seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    return latencies, errors, {name: summarize_abuser(outcome) for name, outcome in outcomes.items()}


def summarize_abuser(outcome: Any) -> dict[str, Any]:
    if isinstance(outcome, dict):
        return outcome
    seconds = [s for _, s in outcome]
    return {"attempts": len(outcome), "outcomes": dict(Counter(o for o, _ in outcome)),
            "seconds_p50": percentile(seconds, 50), "seconds_max": max(seconds, default=None)}


def phase_summary(latencies: list[float], errors: list[str]) -> dict[str, Any]:
    return {"requests": len(latencies) + len(errors), "failed": len(errors), "errors": sorted(set(errors))[:5],
            "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
            "latency_mean_s": sum(latencies) / len(latencies) if latencies else None}


def markdown(report: dict[str, Any]) -> str:
    idle, abused, ratio = report["idle"], report["abused"], report["ratio_p50"]

    def ms(x: float | None) -> str:
        return "–" if x is None else f"{x * 1e3:.0f}"

    lines = [
        "# qadapter serve: abuse test", "", f"`python {report['command']}`", "",
        f"Server: {report['server']}. Normal request: {report['max_tokens']} greedy tokens, one after another, "
        f"{report['phase_seconds']:g} s per phase.", "",
        "| phase | requests | failed | latency p50 / p95 / mean, ms |", "|---|---|---|---|",
        *(f"| {name} | {p['requests']} | {p['failed']} | {ms(p['latency_p50_s'])} / {ms(p['latency_p95_s'])} / {ms(p['latency_mean_s'])} |"
          for name, p in (("idle", idle), ("abused", abused))), "",
        f"**Ratio abused / idle: p50 {ratio:.2f}×, p95 {report['ratio_p95']:.2f}×** (target ≤ 2× for both: {'met' if max(ratio, report['ratio_p95']) <= 2 else 'NOT met'}).", "",
        "| abuser | what it got |", "|---|---|",
        *(f"| {name} | {json.dumps(outcome)} |" for name, outcome in report["abusers"].items()), "",
    ]
    m = report["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
              f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.", ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    from openai import OpenAI

    stamp = time.strftime("%Y%m%d-%H%M%S")
    info = machine()
    key = secrets.token_urlsafe(24)
    limits = ["--read-timeout", str(args.read_timeout), "--max-request-bytes", str(args.max_request_bytes), "--max-stop-chars", str(args.max_stop_chars)]
    with tempfile.TemporaryDirectory(prefix="qadapter-abuse-") as tmp, started_server(args, Path(tmp), limits, {"QADAPTER_API_KEY": key}) as url:
        client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
        normal_latencies(client, args, 3.0)  # warm-up
        idle = phase_summary(*normal_latencies(client, args, args.phase_seconds))
        prompt_chars = context_tokens(Path(tmp) / "tiny-model" if args.model == "tiny" else Path(args.model)) * MAX_CHARS_PER_TOKEN
        latencies, errors, abusers = abused_phase(client, Target(url, key), args, prompt_chars)
        abused = phase_summary(latencies, errors)
    name = args.model if args.model == "tiny" else Path(args.model).name
    report = {
        "timestamp": stamp, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "server": f"self-started on {args.model}, --api-key, " + " ".join(limits), "max_tokens": args.max_tokens,
        "phase_seconds": args.phase_seconds, "machine": info, "idle": idle, "abused": abused,
        "ratio_p50": abused["latency_p50_s"] / idle["latency_p50_s"], "ratio_p95": abused["latency_p95_s"] / idle["latency_p95_s"],
        "abusers": abusers,
    }
    write_atomic(args.out / f"abuse-{name}-{stamp}.json", json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    write_atomic(args.out / f"abuse-{name}-{stamp}.md", md)
    print(md)
    if idle["failed"] or abused["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main(parse_args())

"""Bounded load test of `qadapter serve`: N concurrent streaming clients on loopback, then a report.

    python benchmarks/load_test.py --model tiny --clients 10                 # self-started server, tiny random model
    python benchmarks/load_test.py --model bundled [--adapter runs/demo/adapter] [--clients 50]
    python benchmarks/load_test.py --url http://127.0.0.1:8000/v1 [--model-id a+b]   # a server already running

Each of ``--clients`` clients sends ``--requests-per-client`` streaming chat completions one after
another (``--max-tokens`` each, ``--min-tokens`` to make lengths equal), all clients at once, with
the official ``openai`` client. The run stops by itself: every request has a timeout and the whole
run ``--timeout`` seconds. A self-started server (``--model``: ``tiny``, ``bundled`` or a model
folder) serves ``--adapter``, or a fresh adapter made on that base (its Q is 0, its cost that of any
adapter), and is stopped at the end. Only loopback addresses are accepted.

Reported: failed requests, latency and time to first token (p50/p95), completion tokens per second
over the whole run (from the servers' usage counts). Written to
``<out>/load-<model>-<timestamp>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlparse

from bench import REPO, build_tiny, machine, write_atomic

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = [
    "Tell me about the cat on the mat.",
    "Why is the sky blue?",
    "Say something nice about dogs.",
    "What is the answer to two plus two?",
    "Where do red and green make yellow?",
    "How fast can a small dog run?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000/v1 (loopback only)")
    where.add_argument("--model", help="start a server on this base: 'tiny', 'bundled' or a model folder")
    p.add_argument("--adapter", type=Path, help="adapter the self-started server serves (default: a fresh one on --model)")
    p.add_argument("--model-id", help="model id to request (default: the first adapter model the server lists)")
    p.add_argument("--clients", type=int, default=50, help="concurrent streaming clients")
    p.add_argument("--requests-per-client", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=None, help="bar EOS before this many tokens (default: --max-tokens, so every answer has the same length)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha-0", type=float, default=None, help="α₀ per request (default: the adapter's own)")
    p.add_argument("--max-batch-size", type=int, default=32, help="the self-started server's --max-batch-size")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run; unfinished requests count as failed")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for a self-started server (first use of 'bundled' converts the model)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if min(args.clients, args.requests_per_client, args.max_tokens, args.max_batch_size) < 1 or args.timeout <= 0:
        p.error("--clients, --requests-per-client, --max-tokens, --max-batch-size must be >= 1 and --timeout > 0")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}): this tool never loads another machine")
    args.min_tokens = args.max_tokens if args.min_tokens is None else args.min_tokens
    return args


# ---------------------------------------------------------------------------------------------
# A self-started server


def fresh_adapter(model: str, folder: Path) -> Path:
    """A new (Q ≡ 0) adapter on ``model``, saved to ``folder``: the same decoding cost as a trained one."""
    from qadapter import QAdapterConfig, QAdapterModel, load_base

    QAdapterModel.create(load_base(model, device="cpu"), QAdapterConfig()).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5):
                return
        except urllib.error.HTTPError:  # an answer, e.g. 401 from a server with an API key: it is up
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"no server answered at {url} within {timeout:.0f} s")


@contextmanager
def started_server(args: argparse.Namespace, tmp: Path, extra: Sequence[str] = (), env: Mapping[str, str] = {}) -> Iterator[str]:
    """`qadapter serve` in a subprocess on a free loopback port, with ``extra`` options and ``env`` variables;
    stopped (SIGTERM, then SIGKILL) on exit."""
    if args.model == "tiny":
        source = tmp / "tiny-model"
        build_tiny(source)
        source = str(source)
    else:
        source = args.model
    adapter = args.adapter or fresh_adapter(source, tmp / "adapter")
    port = free_port()
    command = [sys.executable, "-m", "qadapter", "serve", "--adapter", str(adapter), "--model", source, "--port", str(port),
               "--max-batch-size", str(args.max_batch_size), *extra]
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **env))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(url, proc, args.startup_timeout)
        yield url
    except BaseException:
        sys.stderr.write(log_path.read_text()[-4000:])
        raise
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Clients


async def one_request(client: Any, args: argparse.Namespace, model_id: str, prompt: str) -> dict[str, Any]:
    """One streaming chat completion: latency, time to first token, completion tokens, or the error."""
    extra: dict[str, Any] = {"min_tokens": args.min_tokens}
    if args.alpha_0 is not None:
        extra["alpha_0"] = args.alpha_0
    started = time.perf_counter()
    first = None
    tokens = 0
    finish = None
    try:
        stream = await client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
            temperature=args.temperature, stream=True, stream_options={"include_usage": True}, extra_body=extra,
        )
        async for chunk in stream:
            if chunk.choices:
                if first is None and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as exc:  # counted, reported, and the run goes on
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if finish is None:
        return {"ok": False, "error": "the stream ended without a finish reason"}
    return {"ok": True, "latency_s": time.perf_counter() - started, "ttft_s": first, "completion_tokens": tokens}


async def run_clients(args: argparse.Namespace, url: str, model_id: str) -> tuple[list[dict[str, Any]], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=args.timeout)
    results: list[dict[str, Any]] = []

    async def one_client(i: int) -> None:
        for k in range(args.requests_per_client):
            results.append(await one_request(client, args, model_id, PROMPTS[(i + k) % len(PROMPTS)]))

    started = time.perf_counter()
    tasks = [asyncio.create_task(one_client(i)) for i in range(args.clients)]
    done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    wall = time.perf_counter() - started
    await client.close()
    missing = args.clients * args.requests_per_client - len(results)
    results += [{"ok": False, "error": f"not finished within --timeout {args.timeout:g} s"}] * missing
    return results, wall


# ---------------------------------------------------------------------------------------------
# Report


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    latency = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r["completion_tokens"] for r in ok)
    errors = sorted({r["error"] for r in results if not r["ok"]})
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": errors[:5],
        "latency_p50_s": percentile(latency, 50),
        "latency_p95_s": percentile(latency, 95),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "completion_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]

    def ms(x: float | None) -> str:
        return "–" if x is None else f"{x * 1e3:.0f}"

    m = report["machine"]
    return "\n".join([
        "# qadapter serve: load test", "", f"`python {report['command']}`", "",
        f"{report['clients']} concurrent streaming clients × {report['requests_per_client']} request(s), model `{report['model_id']}` "
        f"({report['server']}), {report['max_tokens']} max tokens (min {report['min_tokens']}), temperature {report['temperature']:g}"
        + (f", α₀ = {report['alpha_0']:g}" if report["alpha_0"] is not None else "") + ".", "",
        "| requests | failed | latency p50 / p95, ms | time to first token p50 / p95, ms | completion tokens | wall, s | tokens/s |",
        "|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['failed']} | {ms(s['latency_p50_s'])} / {ms(s['latency_p95_s'])} | {ms(s['ttft_p50_s'])} / {ms(s['ttft_p95_s'])} "
        f"| {s['completion_tokens']} | {s['wall_s']:.2f} | {s['tokens_per_s']:.1f} |", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}, "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}.",
        *([f"", "Errors (first distinct ones): " + "; ".join(s["errors"])] if s["errors"] else []), "",
    ])


def main(args: argparse.Namespace) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    info = machine()
    with tempfile.TemporaryDirectory(prefix="qadapter-load-") as tmp, ExitStack() as stack:  # the server stops first
        if args.model:
            url = stack.enter_context(started_server(args, Path(tmp)))
        else:
            url = args.url.rstrip("/")
            wait_until_up(url, None, 10)
        with urllib.request.urlopen(f"{url}/models", timeout=10) as response:
            ids = [m["id"] for m in json.load(response)["data"]]
        model_id = args.model_id or next((i for i in ids if i != "base"), "base")
        results, wall = asyncio.run(run_clients(args, url, model_id))
    name = "url" if args.url else Path(args.model).name if args.model not in ("tiny", "bundled") else args.model
    report = {
        "timestamp": stamp, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "server": args.url or f"self-started on {args.model}, --max-batch-size {args.max_batch_size}",
        "model_id": model_id, "clients": args.clients, "requests_per_client": args.requests_per_client,
        "max_tokens": args.max_tokens, "min_tokens": args.min_tokens, "temperature": args.temperature, "alpha_0": args.alpha_0,
        "machine": info, "summary": summarize(results, wall),
    }
    write_atomic(args.out / f"load-{name}-{stamp}.json", json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    write_atomic(args.out / f"load-{name}-{stamp}.md", md)
    print(md)
    if report["summary"]["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main(parse_args())

"""Load test of `lmforge serve` on loopback: 32 concurrent clients for 30 s against a small model, with
malformed requests mixed in; the server with batching on and with --no-batching, interleaved.

    python benchmarks/serve_load.py [--clients 32] [--seconds 30] [--repeats 1] [--endpoints generate,classify]

Two small models, each made once under .cache/bench/ (see the two functions below):
- generate: the default GPT (`lmforge pretrain`'s, 4 layers, width 256) trained 300 steps on the KJV; each
  request is greedy, 16 new tokens, the prompt the first 2-8 words of an SST-2 dev sentence (so prompts
  of different lengths: batched requests are left-padded);
- classify: a 2-layer, width-128 BERT pre-trained 300 steps as a masked LM, fine-tuned on 2,000 SST-2
  sentences; each request one SST-2 dev sentence.
Each client sends a request and waits for the answer; every 10th request is malformed (bad JSON, a number
for the text, a value over a limit, a seed torch cannot take, an empty or a thousand stop strings, a text of
almost --max-body-bytes) and must get a 4xx. Latencies are of the well-formed requests.

Each mode starts its own server process (serve's default threads) and ends it with SIGTERM; a 5xx, a
dropped connection or a server that does not exit cleanly counts as a server error.
Goals (issue): no 5xx and no crash, above all none for a well-formed request that shared a batch with a
malformed one; batching on >= 2x the requests/s of batching off.
Last line: RESULT rps=... p99_ms=... batching_gain=... server_errors=... valid_5xx=...  (rps, p99, gain:
generate; classify_* the same for classification; server_errors, valid_5xx (5xx answers to well-formed
requests): all modes)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"

BODY_LIMIT = 1 << 20  # the server's default --max-body-bytes
ALMOST_THE_BODY_LIMIT = "great " * ((BODY_LIMIT - 100) // 6)  # too many tokens, taking a second to count
MALFORMED = {
    "generate": [b'{"prompt": "And God said",', b'{"prompt": 42}', b'{"prompt": "And", "max_new_tokens": 100000}',
                 json.dumps({"prompt": "And", "seed": 2**63}).encode(), json.dumps({"prompt": "And", "stop": [""]}).encode(),
                 json.dumps({"prompt": "And", "stop": ["x"] * 1000}).encode(),
                 json.dumps({"prompt": ALMOST_THE_BODY_LIMIT}).encode()],
    "classify": [b'{"inputs": ["a fine film",', b'{"inputs": 42}', json.dumps({"inputs": "great " * 600}).encode(),
                 json.dumps({"inputs": ALMOST_THE_BODY_LIMIT}).encode()],
}
QUIET = ["--log.progress", "false", "--log.trackers", "[]"]
LMFORGE = [sys.executable, "-m", "lmforge"]


def generate_run() -> Path:
    run = ROOT / ".cache" / "bench" / "serve-gpt-kjv"
    if not (run / "model.safetensors").is_file():
        subprocess.run(LMFORGE + ["pretrain", "--train.max_steps", "300", "--eval.every", "300", "--log.samples", "0",
                                  "--log.run_dir", str(run), *QUIET], check=True, stdout=subprocess.DEVNULL)
    return run


def classify_run() -> Path:
    run = ROOT / ".cache" / "bench" / "serve-tiny-sst2"
    if (run / "model.safetensors").is_file():
        return run
    work = run.parent / "serve-work"
    train = work / "train.txt"
    work.mkdir(parents=True, exist_ok=True)
    train.write_text("\n".join((SST2 / "train.txt").read_text(encoding="utf-8").splitlines()[:2000]) + "\n",
                     encoding="utf-8")
    if not (work / "mlm" / "model.safetensors").is_file():
        subprocess.run(LMFORGE + ["pretrain", "--config", str(ROOT / "configs" / "mlm-kjv.yaml"), "--model.n_layer", "2", "--model.d_model", "128", "--model.n_head", "2", "--train.max_steps",
                                  "300", "--eval.every", "300", "--log.run_dir", str(work / "mlm"), *QUIET],
                       check=True, stdout=subprocess.DEVNULL)
    subprocess.run(LMFORGE + ["finetune", "--finetune.init_from", str(work / "mlm"), "--finetune.train", str(train),
                              "--finetune.format", "sst", "--finetune.epochs", "1", "--train.lr", "1e-3",
                              "--log.run_dir", str(run), *QUIET], check=True, stdout=subprocess.DEVNULL)
    return run


async def request(reader, writer, path: bytes, body: bytes) -> int:
    """One HTTP/1.1 request on a kept-alive connection -> the status code. Written on asyncio's streams
    rather than with an HTTP client library: the load generator shares the 2 cores with the server, so
    it must spend as little CPU a request as possible."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body))
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length"))
    await reader.readexactly(length)
    return status


def good_body(endpoint: str, text: str, n: int) -> bytes:
    if endpoint == "generate":
        words = text.split()[:2 + n % 7]
        return json.dumps({"prompt": " ".join(words), "max_new_tokens": 16, "temperature": 0}).encode()
    return json.dumps({"inputs": text}).encode()


async def client(port: int, endpoint: str, texts: list[str], offset: int, until: float, stats: dict) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = f"/v1/{endpoint}".encode()
    n = offset
    try:
        while time.perf_counter() < until:
            n += 1
            bad = n % 10 == 0
            malformed = MALFORMED[endpoint]
            body = malformed[n // 10 % len(malformed)] if bad else good_body(endpoint, texts[n % len(texts)], n)
            start = time.perf_counter()
            try:
                status = await request(reader, writer, path, body)
            except (ConnectionError, asyncio.IncompleteReadError):
                stats["server_errors"] += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if status >= 500 or (bad and status < 400) or (not bad and status != 200):
                stats["server_errors" if status >= 500 else "wrong_status"] += 1
                if status >= 500 and not bad:  # what batching must never do: fail a request for its neighbour
                    stats["valid_5xx"] += 1
            elif bad:
                stats["refused"] += 1
            else:
                stats["latencies"].append(time.perf_counter() - start)
    finally:
        writer.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, batching: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cmd = LMFORGE + ["serve", str(run), "--port", str(port), "--max-input-tokens", "120", "--max-new-tokens", "64"]
    proc = subprocess.Popen(cmd + ([] if batching else ["--no-batching"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return proc, port
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"serve_load: the server exited: {proc.stderr.read()}")
            time.sleep(0.5)
    sys.exit("serve_load: the server did not start within 120 s")


async def load(port: int, endpoint: str, texts: list[str], clients: int, seconds: float) -> dict:
    stats = {"latencies": [], "server_errors": 0, "wrong_status": 0, "refused": 0, "valid_5xx": 0}
    until = time.perf_counter() + seconds
    await asyncio.gather(*(client(port, endpoint, texts, i * 7, until, stats) for i in range(clients)))
    return stats


def run_mode(endpoint: str, run: Path, batching: bool, texts: list[str], args) -> dict:
    proc, port = start_server(run, batching)
    asyncio.run(load(port, endpoint, texts, args.clients, 3))  # warm-up
    stats = asyncio.run(load(port, endpoint, texts, args.clients, args.seconds))
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    if code != 0:
        stats["server_errors"] += 1
        print(f"server exited with {code}: {proc.stderr.read()[-2000:]}", file=sys.stderr)
    lat = sorted(stats["latencies"])
    stats.update(rps=len(lat) / args.seconds, p50_ms=1000 * lat[len(lat) // 2] if lat else float("nan"),
                 p99_ms=1000 * lat[int(len(lat) * 0.99)] if lat else float("nan"))
    print(f"{endpoint:8s} batching {'on ' if batching else 'off'}: {stats['rps']:7.1f} requests/s  p50 "
          f"{stats['p50_ms']:7.1f} ms  p99 {stats['p99_ms']:7.1f} ms  malformed refused {stats['refused']}  "
          f"5xx/dropped {stats['server_errors']} (5xx to valid requests {stats['valid_5xx']})  wrong status "
          f"{stats['wrong_status']}", flush=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--repeats", type=int, default=1, help="on/off pairs, interleaved; medians are reported")
    ap.add_argument("--endpoints", default="generate,classify")
    args = ap.parse_args()
    if not SST2.is_dir():
        sys.exit(f"serve_load: {SST2} not found (expected ../shared/data beside the checkout)")
    texts = [line.split(" ", 1)[1] for line in (SST2 / "dev.txt").read_text(encoding="utf-8").splitlines() if " " in line]
    endpoints = args.endpoints.split(",")
    runs = {e: {"generate": generate_run, "classify": classify_run}[e]() for e in endpoints}
    results = {(e, b): [] for e in endpoints for b in (True, False)}
    for _ in range(args.repeats):
        for e in endpoints:
            for batching in (True, False):
                results[e, batching].append(run_mode(e, runs[e], batching, texts, args))
    med = lambda e, b, key: statistics.median(r[key] for r in results[e, b])  # noqa: E731
    errors = sum(r["server_errors"] + r["wrong_status"] for rs in results.values() for r in rs)
    valid_5xx = sum(r["valid_5xx"] for rs in results.values() for r in rs)
    figures = []
    for e in endpoints:
        gain = med(e, True, "rps") / med(e, False, "rps")
        print(f"{e}: batching gain {gain:.2f}x (goal >= 2)")
        prefix = "" if e == endpoints[0] else f"{e}_"
        figures += [f"{prefix}rps={med(e, True, 'rps'):.1f}", f"{prefix}p50_ms={med(e, True, 'p50_ms'):.1f}",
                    f"{prefix}p99_ms={med(e, True, 'p99_ms'):.1f}", f"{prefix}batching_gain={gain:.2f}",
                    f"{prefix}rps_off={med(e, False, 'rps'):.1f}"]
    print(f"server errors {errors} (goal 0), of which 5xx to valid requests {valid_5xx} (goal 0)")
    print("RESULT " + " ".join(figures[:4]) + f" server_errors={errors} valid_5xx={valid_5xx} " + " ".join(figures[4:]))


if __name__ == "__main__":
    main()

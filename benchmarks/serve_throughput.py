"""`vlmalign serve` throughput: requests/s with 1, 4 and 16 concurrent clients.

A server is started as its own process (``python -m vlmalign serve``) on a tiny random-init
LLaVA (built into a temporary folder unless ``--model`` names one), once per ``--max-batch-size``
value (default 8, the server's default, and 1: the same queue without batching). Each client is
a thread with its own official ``openai`` client that sends requests back to back: one image as
a data: URL plus a question, greedy, ``--max-tokens`` tokens at most. Every level first sends
one warm-up request per client (not timed), then times ``--requests`` requests in all.
Reported per level: requests/s (requests / wall time), latency p50 / p95, and the mean number of
requests per generate batch (from the server's ``/health`` counters).

    .venv/bin/python benchmarks/serve_throughput.py --json serve.json
    .venv/bin/python benchmarks/serve_throughput.py --url http://127.0.0.1:8000 --model-name NAME

Measured numbers and machine conditions: docs/SERVING.md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def _image_url(size=(64, 48)) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 220)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, api_key: str = "none") -> dict:
    """Time ``requests`` requests from ``clients`` concurrent clients against the server at ``url``."""
    import httpx
    import openai
    image = _image_url()
    pool = [openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=600) for _ in range(clients)]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    tokens = [0]
    lock = threading.Lock()

    def ask(client) -> float:
        t = time.perf_counter()
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        with lock:
            tokens[0] += r.usage.completion_tokens
        return time.perf_counter() - t

    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(ask, pool))   # warm-up: one per client
        tokens[0] = 0
        before = httpx.get(url + "/health").json()
        per_client = [requests // clients + (i < requests % clients) for i in range(clients)]
        start = time.perf_counter()
        lat = [x for chunk in ex.map(lambda i: [ask(pool[i]) for _ in range(per_client[i])], range(clients))
               for x in chunk]
        wall = time.perf_counter() - start
    after = httpx.get(url + "/health").json()
    batches = after["batches"] - before["batches"]
    lat.sort()
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 3),
            "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens[0] / wall, 1),
            "latency_p50_s": round(statistics.median(lat), 3),
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
            "requests_per_batch": round((after["requests"] - before["requests"]) / max(batches, 1), 2)}


def _start_server(model_dir: str, name: str, batch: int, threads: int | None):
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "vlmalign", "serve", "--model", model_dir, "--port", str(port),
                             "--model-name", name, "--device", "cpu", "--max-batch-size", str(batch)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import httpx
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode}")
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not start in 120 s")


def conditions() -> dict:
    import torch
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": "cpu"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: a tiny random-init llava built for the run)")
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--model-name", default="bench", help="the model name the server serves")
    p.add_argument("--api-key", default="none", help="API key of the server given with --url")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 1], help="--max-batch-size of the servers")
    p.add_argument("--requests", type=int, default=48, help="timed requests per level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server process")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    report = {"conditions": conditions(), "max_tokens": args.max_tokens, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        targets = [(None, args.url)] if args.url else [(b, None) for b in args.batch_sizes]
        model = args.model
        if not args.url and model is None:
            from vlmalign.models import save_tiny
            model = save_tiny("llava", os.path.join(tmp, "model"))
        for batch, url in targets:
            proc = None
            if url is None:
                proc, url = _start_server(model, args.model_name, batch, args.threads)
            try:
                for c in args.concurrency:
                    row = {"max_batch_size": batch, **run_level(url, args.model_name, c, args.requests,
                                                                  args.max_tokens, args.api_key)}
                    report["runs"].append(row)
                    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=60)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report["conditions"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

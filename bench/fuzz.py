"""Fuzzing: 20,000 mutated prompts (API and editor format) through conversion and validation in
process, then 2,000 hostile HTTP bodies against a default `python main.py` in a subprocess.

A crash is an exception escaping conversion or validation (which must report every problem as
data), or the server process dying; every reply with a 5xx status is counted too. Seeded, so a
run can be repeated. Last line: `crashes=<n> http_5xx=<n>`."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.context import Services  # noqa: E402
from engine.paths import Paths  # noqa: E402
from engine.registry import NodeRegistry  # noqa: E402
from engine.validation import validate_prompt  # noqa: E402
from engine.workflow import WorkflowFormatError, is_ui_format, to_api_prompt  # noqa: E402
from nodes import builtin_node_types  # noqa: E402
from tests.adversarial.payloads import apng_bomb, multipart, one_bit_png  # noqa: E402
from tests.web.prompt_helpers import editor_image_workflow  # noqa: E402

SEED_PROMPT: dict[str, Any] = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                 "color": 0}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "fz"}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x.safetensors"}},
    "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
    "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512,
                                                       "batch_size": 1}},
    "7": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0],
        "seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["4", 2]}},
    "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    "10": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
}
STRINGS = ["", "x", "euler", "normal", "in.png", "../../etc/passwd", "a" * 5000, "\x00",
           "\ud800", "%date:yyyy%/x", "[output]", "C:\\x", "1e999", "NaN", "é" * 300]
NUMBERS = [0, -1, 1, 2**31, 2**63, -2**63, 10**40, 0.5, -0.0, 1e308, float("nan"),
           float("inf"), -float("inf"), True, False]


def random_value(rng: random.Random, node_ids: list[str], depth: int = 0) -> Any:
    """A value of any JSON-ish kind, often one that looks like a link or a widget value."""
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(NUMBERS)
    if pick < 0.55:
        return rng.choice(STRINGS)
    if pick < 0.75 and node_ids:
        slot = rng.choice([0, 1, 2, -1, 99, "0", 1.5, None])
        return [rng.choice([*node_ids, "missing", 7, None]), slot]
    if pick < 0.85 or depth > 3:
        return None
    if pick < 0.93:
        return [random_value(rng, node_ids, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(STRINGS[:4]): random_value(rng, node_ids, depth + 1)}


def mutate(prompt: dict[str, Any], rng: random.Random, class_types: list[str]) -> None:
    """One random change: a node removed, retyped, replaced by junk or rewired; an input
    removed or set to any value; a link into a cycle."""
    node_ids = list(prompt)
    node_id = rng.choice(node_ids)
    body = prompt[node_id]
    op = rng.randrange(8)
    if op == 0:
        del prompt[node_id]
    elif op == 1 and isinstance(body, dict):
        body["class_type"] = rng.choice([*class_types, "Nope", "", None, 5])
    elif op == 2:
        prompt[node_id] = random_value(rng, node_ids)
    elif op == 3 and isinstance(body, dict) and isinstance(body.get("inputs"), dict):
        inputs = body["inputs"]
        name = rng.choice([*inputs, "extra"]) if inputs else "extra"
        inputs[name] = random_value(rng, node_ids)
    elif op == 4 and isinstance(body, dict) and isinstance(body.get("inputs"), dict):
        body["inputs"].pop(rng.choice([*body["inputs"], "none"]), None)
    elif op == 5 and isinstance(body, dict):
        body["inputs"] = random_value(rng, node_ids)
    elif op == 6 and isinstance(body, dict) and isinstance(body.get("inputs"), dict):
        body["inputs"][rng.choice(["image", "images", "x"])] = [node_id, 0]  # a self loop
    else:
        prompt[str(rng.randrange(100))] = {"class_type": rng.choice(class_types),
                                           "inputs": {"x": random_value(rng, node_ids)}}


def containers(value: Any) -> list[Any]:
    """Every dict and list inside `value` (itself included), iteratively."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (dict, list)):
            found.append(item)
            stack.extend(item.values() if isinstance(item, dict) else item)
    return found


def mutate_anywhere(document: Any, rng: random.Random) -> None:
    """Replace, drop or add one entry of one dict or list anywhere in `document`."""
    target = rng.choice(containers(document))
    if isinstance(target, dict):
        key = rng.choice([*target, "extra"]) if target else "extra"
        if rng.random() < 0.3:
            target.pop(key, None)
        else:
            target[key] = random_value(rng, ["1", "2", "3"])
    elif target:
        index = rng.randrange(len(target))
        if rng.random() < 0.3:
            del target[index]
        else:
            target[index] = random_value(rng, ["1", "2", "3"])


def editor_form(rng: random.Random) -> dict[str, Any]:
    """The editor-format test workflow (EmptyImage, ImageInvert, SaveImage, PreviewImage) with
    a few random changes anywhere in it."""
    workflow = editor_image_workflow(rng.randrange(1, 200), "fz")
    for _ in range(rng.randrange(4)):
        mutate_anywhere(workflow, rng)
    return workflow


def fuzz_validation(count: int, seed: int) -> tuple[int, Counter[str]]:
    """Convert and validate `count` mutated prompts; (crashes, outcome counts)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as base:
        registry = NodeRegistry()
        registry.register_all(builtin_node_types())
        services = Services(Paths.from_base(Path(base)))
        object_info = registry.object_info(services)
        class_types = list(object_info)
        crashes, outcomes = 0, Counter[str]()
        for index in range(count):
            prompt = json.loads(json.dumps(SEED_PROMPT))
            for _ in range(rng.randrange(1, 6)):
                if prompt:
                    mutate(prompt, rng, class_types)
            if index % 3 == 2:
                mutate_anywhere(prompt, rng)
            body: Any = editor_form(rng) if index % 10 == 9 else prompt
            try:
                outcomes[check_one(body, registry, services, object_info)] += 1
            except Exception:  # noqa: BLE001 - a crash is what this bench counts
                crashes += 1
                if crashes <= 5:
                    print(f"crash on prompt {index}:\n{traceback.format_exc()}", flush=True)
    return crashes, outcomes


def check_one(body: Any, registry: NodeRegistry, services: Services,
              object_info: dict[str, Any]) -> str:
    """What the server does with a POSTed prompt: convert the editor format, then validate."""
    if is_ui_format(body):
        try:
            body = to_api_prompt(body, object_info)
        except WorkflowFormatError:
            return "refused: editor format"
    result = validate_prompt(body, registry, services)
    return "valid" if result.error is None and not result.node_errors else "refused"


# -- HTTP -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(base: Path, port: int) -> subprocess.Popen:
    log = open(base / "server.log", "ab")  # noqa: SIM115 - kept open for the child's life
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--base-directory",
                                str(base), "--port", str(port)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start; see {base / 'server.log'}")


def prompt_bodies(rng: random.Random) -> bytes:
    """A hostile POST /prompt body."""
    valid = json.dumps({"prompt": SEED_PROMPT}).encode()
    choice = rng.randrange(10)
    if choice == 9:
        return json.dumps({"prompt": editor_form(rng)}, default=str).encode()
    if choice == 0:
        return valid[:rng.randrange(len(valid))]  # truncated
    if choice == 1:
        data = bytearray(valid)
        for _ in range(rng.randrange(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if choice == 2:
        depth = rng.choice([99, 101, 1000, 100_000])
        return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    if choice == 3:
        return valid.replace(b'"seed": 1', rng.choice([b'"seed": NaN', b'"seed": 1e999',
                                                       b'"seed": ' + b"9" * 5000]))
    if choice == 4:
        return json.dumps({"prompt": SEED_PROMPT, "number": rng.choice(
            ["nan", "inf", "-1e400", None, [], {}, "12"])}).encode()
    if choice == 5:
        return valid[:-1] + b', "prompt_id": "\\ud800x", "client_id": "\\udfff"}'
    if choice == 6:
        return json.dumps({"prompt": rng.choice([[], "x", 5, None, {"1": []}]),
                           "extra_data": rng.choice([[], "x", {"extra_pnginfo": 5}])}).encode()
    if choice == 7:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    prompt = json.loads(json.dumps(SEED_PROMPT))
    mutate(prompt, rng, ["EmptyImage", "SaveImage", "LoadImage"])
    return json.dumps({"prompt": prompt, "front": rng.random() < 0.5},
                      default=str).encode()


def upload_body(rng: random.Random) -> tuple[bytes, str]:
    """A hostile multipart upload and its content type."""
    names = [b"ok.png", b"a" * 300 + b".png", b"a\x00b.png", b"../x.png", b"a" * 20_000,
             b"x/y.png", "é.png".encode()]
    data = rng.choice([apng_bomb(64, 64, 3), apng_bomb(4000, 4000, 300), one_bit_png(64, 64),
                       b"not an image", b""])
    body = multipart(rng.choice(names), data)
    boundary = rng.choice(["LoomBoundary", "other", ""])
    if rng.random() < 0.2:
        body = body[:rng.randrange(len(body))]
    return body, f"multipart/form-data; boundary={boundary}"


def random_request(rng: random.Random) -> tuple[str, str, bytes, dict[str, str]]:
    """(method, path, body, headers) for one hostile request."""
    pick = rng.randrange(10)
    json_headers = {"Content-Type": "application/json"}
    if pick < 4:
        return "POST", "/prompt", prompt_bodies(rng), json_headers
    if pick == 4:
        body, content_type = upload_body(rng)
        return "POST", rng.choice(["/upload/image", "/upload/mask"]), body, {
            "Content-Type": content_type}
    if pick == 5:
        path = rng.choice(["/queue", "/interrupt", "/history", "/free", "/settings",
                           "/settings/x", "/jobs/cancel"])
        return "POST", path, prompt_bodies(rng), json_headers
    if pick == 6:
        name = rng.choice(["a.json", "b" * 300, "%00", "..%2F..%2Fx", "w%2Fx.json", "é" * 200])
        return rng.choice(["POST", "GET", "DELETE"]), f"/userdata/{name}", b"{}", {}
    if pick == 7:
        query = rng.choice(["filename=" + "a" * 300, "filename=x.png&type=nope",
                            "filename=../x&subfolder=..", "filename=%00", "filename=x.png&"
                            "preview=webp;abc&channel=zz", "filename=" + "é" * 200])
        return "GET", f"/view?{query}", b"", {}
    if pick == 8:
        query = rng.choice(["max_items=x", "max_items=-5", "offset=99999999999999999999",
                            "max_items=10&offset=-3", "max_items=" + "9" * 5000])
        return "GET", rng.choice(["/history?", "/api/jobs?limit=3&"]) + query, b"", {}
    return "GET", rng.choice(["/object_info/%00", "/history/\u00e9", "/jobs/x",
                              "/view_metadata/checkpoints?filename=a.safetensors",
                              "/internal/files/../../x"]), b"", {}


async def fire(base_url: str, count: int, seed: int) -> Counter[int]:
    """Send `count` hostile requests, 8 at a time; the status codes (0: no reply)."""
    rng = random.Random(seed)
    requests = [random_request(rng) for _ in range(count)]
    statuses: Counter[int] = Counter()
    gate = asyncio.Semaphore(8)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
            async with gate:
                try:
                    async with session.request(method, base_url + path, data=body or None,
                                               headers=headers) as reply:
                        await reply.read()
                        statuses[reply.status] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    statuses[0] += 1
        await asyncio.gather(*(one(*request) for request in requests))
    return statuses


def fuzz_http(count: int, seed: int) -> tuple[int, Counter[int], str]:
    """(server deaths, status counts, server log) for `count` requests to a fresh server."""
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        port = free_port()
        process = start_server(base, port)
        try:
            statuses = asyncio.run(fire(f"http://127.0.0.1:{port}", count, seed))
            died = int(process.poll() is not None)
        finally:
            process.terminate()
            process.wait(30)
        return died, statuses, (base / "server.log").read_text(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    started = time.perf_counter()
    crashes, outcomes = fuzz_validation(args.prompts, args.seed)
    print(f"validation: {args.prompts} prompts in {time.perf_counter() - started:.1f} s, "
          f"{crashes} crashes; outcomes {dict(outcomes)}", flush=True)
    started = time.perf_counter()
    died, statuses, log = fuzz_http(args.requests, args.seed)
    server_5xx = sum(n for status, n in statuses.items() if status >= 500)
    print(f"http: {args.requests} requests in {time.perf_counter() - started:.1f} s; statuses "
          f"{dict(sorted(statuses.items()))}; server died: {bool(died)}; tracebacks in its "
          f"log: {log.count('Traceback')}")
    for problem, seen in Counter(traceback_ends(log)).most_common():
        print(f"  server traceback x{seen}: {problem}")
    print(f"crashes={crashes + died} http_5xx={server_5xx}")


def traceback_ends(log: str) -> list[str]:
    """The exception line that ends each traceback in a server log."""
    ends, inside = [], False
    for line in log.splitlines():
        if line.startswith("Traceback"):
            inside = True
        elif inside and line and not line.startswith((" ", "\t")):
            ends.append(line[:200])
            inside = False
    return ends


if __name__ == "__main__":
    main()

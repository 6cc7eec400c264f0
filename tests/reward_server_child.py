"""Reward servers for tests/test_reward_server.py, each run in its own process.

    python tests/reward_server_child.py fake                      # /health right, POST MODE/score wrong
    python tests/reward_server_child.py serve-reward NAME [...]   # `treegrpo serve-reward` with the reward below

The fake server (no torch import: it starts at once) answers POST /notjson/score with text,
/noscores/score with JSON without scores, /strings/score with strings for scores, /short/score with
one score too few.

``served_spread`` is cheap and depends on the images and the prompts (so a mix-up of either shows):
per-image std plus 0.01 per prompt character. A batch with the prompt ``!fail`` raises, one with
``!sleep`` takes 1.5 s; option ``fail_after`` (>= 0): every call after that many raises.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002
        pass

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self._send(json.dumps({"reward": "fake", "format": 1, "treegrpo": "test"}).encode())

    def do_POST(self):  # noqa: N802
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["prompts"])
        mode = self.path.strip("/").split("/")[0]
        self._send({"notjson": b"<html>502 Bad Gateway</html>",
                    "noscores": json.dumps({"result": [0.0] * n}).encode(),
                    "strings": json.dumps({"scores": ["0.5"] * n}).encode(),
                    "short": json.dumps({"scores": [0.5] * (n - 1)}).encode()}[mode])


if __name__ == "__main__" and sys.argv[1:] == ["fake"]:
    fake = ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
    print(f"serving fake at http://127.0.0.1:{fake.server_address[1]}", flush=True)
    fake.serve_forever()

import time  # noqa: E402 - below the fake server, which needs none of this

import torch  # noqa: E402

from treegrpo.rewards.base import _REGISTRY, register_reward  # noqa: E402


def spread_score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.flatten(1).std(dim=1) + 0.01 * torch.tensor([len(p) for p in prompts], dtype=torch.float32)


class ServedSpread:
    def __init__(self, fail_after: int = -1) -> None:
        self.fail_after, self.calls = fail_after, 0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        if "!sleep" in prompts:
            time.sleep(1.5)
        if "!fail" in prompts or 0 <= self.fail_after < self.calls:
            raise RuntimeError("the scorer broke (test)")
        return spread_score(images, prompts)


if "served_spread" not in _REGISTRY:
    register_reward("served_spread")(ServedSpread)

if __name__ == "__main__":
    torch.set_num_threads(1)
    from treegrpo.cli import main

    sys.exit(main(sys.argv[1:]))

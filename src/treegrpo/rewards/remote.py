"""Rewards over HTTP: `serve_reward` serves any registered reward from its own process (its own
environment, its own GPU); the ``remote`` reward calls such a server and is used like any other.

Wire format (version 1; JSON bodies, UTF-8):

- ``GET /health`` -> 200 ``{"reward": NAME, "format": 1, "treegrpo": VERSION}``
- ``POST /score`` with ``{"prompts": [B strings], "images": BASE64}``, where BASE64 is the base64
  of a ``.npy`` file (``numpy.save``, no pickles) holding an array [B, 3, H, W]: ``uint8`` in
  0..255 (divided by 255 on the server) or ``float16`` / ``float32`` / ``float64`` in [0, 1].
  -> 200 ``{"scores": [B numbers]}``; non-finite scores are written ``NaN``, ``Infinity``,
  ``-Infinity`` (as Python's ``json`` does).
- Errors: 400 (a malformed request), 404 (another path), 500 (the reward raised), each with a
  body ``{"error": MESSAGE}``.

The server scores one request at a time (a lock around the reward: GPU models are not
thread-safe); requests from several training processes queue. It has no authentication: bind it to
127.0.0.1 (the default) or a private network only.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import numpy as np
import torch

from treegrpo.config import ConfigError
from treegrpo.rewards.base import Reward, build_reward, register_reward

FORMAT = 1
_IMAGE_DTYPES = ("uint8", "float16", "float32", "float64")


class RemoteRewardError(OSError):
    """The reward server could not be reached, timed out, or answered something unusable."""


# ------------------------------------------------------------------ the wire format
def encode_images(images: torch.Tensor, dtype: str = "float32") -> str:
    """images [B, 3, H, W] float in [0, 1] -> base64 of a .npy file (float32, or uint8 = round(255 x))."""
    x = images.detach().to("cpu", torch.float32)
    if dtype == "uint8":  # the pixels a PNG of the image holds (as `treegrpo sample` writes them)
        array = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    else:
        array = x.numpy()
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_images(data: Any) -> torch.Tensor:
    """The inverse of `encode_images`: base64 .npy -> [B, 3, H, W] float32 in [0, 1]; ValueError if malformed."""
    if not isinstance(data, str):
        raise ValueError(f"'images' must be a base64 string of a .npy file, got {type(data).__name__}")
    try:
        array = np.load(io.BytesIO(base64.b64decode(data, validate=True)), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - binascii, numpy header and pickle errors alike
        raise ValueError(f"'images' is not base64 of a .npy file without pickles ({type(err).__name__}: {err})") from None
    if array.dtype.name not in _IMAGE_DTYPES:
        raise ValueError(f"'images' must hold {'/'.join(_IMAGE_DTYPES)}, got {array.dtype}")
    if array.ndim != 4 or array.shape[1] != 3:
        raise ValueError(f"'images' must be an array [B, 3, H, W], got shape {list(array.shape)}")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.float() / 255 if array.dtype == np.uint8 else tensor.float()


# ------------------------------------------------------------------ the server
class _Handler(BaseHTTPRequestHandler):
    server: "RewardServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - one line per error only
        pass

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/") == "/health":
            from treegrpo import __version__

            self._answer(200, {"reward": self.server.reward_name, "format": FORMAT, "treegrpo": __version__})
        else:
            self._answer(404, {"error": f"no such path {self.path!r}: use GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._answer(404, {"error": f"no such path {self.path!r}: use POST /score"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, {"error": "POST /score needs a Content-Length header"})
            return
        try:
            images, prompts = self._parse(self.rfile.read(length))
        except ValueError as err:
            self._answer(400, {"error": str(err)})
            return
        try:
            with self.server.lock:
                scores = torch.as_tensor(self.server.reward(images, prompts), dtype=torch.float32).flatten().cpu()
        except Exception as err:  # noqa: BLE001 - the client sees the reward's own error
            self._answer(500, {"error": f"reward {self.server.reward_name!r} raised {type(err).__name__}: {err}"})
            return
        if scores.numel() != len(prompts):
            self._answer(500, {"error": f"reward {self.server.reward_name!r} returned {scores.numel()} scores "
                                        f"for {len(prompts)} images"})
            return
        self._answer(200, {"scores": scores.tolist()})

    @staticmethod
    def _parse(body: bytes) -> tuple[torch.Tensor, list[str]]:
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"the body is not JSON ({err}); send {{\"prompts\": [...], \"images\": BASE64_NPY}}") from None
        if not isinstance(request, dict) or not {"prompts", "images"} <= set(request):
            raise ValueError("the body must be a JSON object with keys 'prompts' and 'images'")
        prompts = request["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("'prompts' must be a list of strings")
        images = decode_images(request["images"])
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return images, prompts


class RewardServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer answering the wire format above for one reward."""

    daemon_threads = True

    def __init__(self, reward_name: str, reward: Reward, host: str = "127.0.0.1", port: int = 0) -> None:
        self.reward_name, self.reward, self.lock = reward_name, reward, threading.Lock()
        super().__init__((host, port), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, not a traceback: typically a client that gave up (timed out) before the answer."""
        import sys

        error = sys.exc_info()[1]
        print(f"treegrpo serve-reward: a request from {client_address[0]} failed: {type(error).__name__}: {error}",
              file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def serve_reward(name: str, options: dict[str, Any], host: str = "127.0.0.1", port: int = 0,
                 ready: Callable[[RewardServer], None] | None = None) -> None:
    """Build reward `name` with `options`, then serve it until interrupted (port 0: a free port).
    `ready(server)` is called once the socket listens (e.g. to print the address)."""
    reward = build_reward(name, **options)  # load the model first: a listening server is a ready one
    try:
        server = RewardServer(name, reward, host, port)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port "
                      f"(0 picks a free one)") from None
    with server:
        if ready is not None:
            ready(server)
        server.serve_forever()


# ------------------------------------------------------------------ the client reward
@register_reward("remote")
class RemoteReward:
    """``remote``: the scores of a reward served by ``treegrpo serve-reward NAME`` (see the module
    docstring for the wire format), [B] float32 on the images' device.

    ``url``: the server's address (``http://HOST:PORT``, as ``serve-reward`` prints it);
    ``timeout``: seconds to wait for one answer; ``dtype``: how images travel, ``float32`` (exact)
    or ``uint8`` (4x smaller; the pixels of a PNG, ``round(255 x)``). The server is asked for its
    health when the reward is built, so a wrong address fails before any sampling. A failed call
    raises `RemoteRewardError`, which the trainer retries (``reward.retries``) like any reward error.
    """

    def __init__(self, url: str = "", timeout: float = 120.0, dtype: str = "float32") -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"reward 'remote' needs reward.options.remote.url, the address `treegrpo serve-reward NAME` "
                              f"prints (e.g. http://127.0.0.1:8000), got {url!r}")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ConfigError(f"reward.options.remote.timeout must be a number of seconds > 0, got {timeout!r}")
        if dtype not in ("float32", "uint8"):
            raise ConfigError(f"reward.options.remote.dtype must be 'float32' or 'uint8', got {dtype!r}")
        self.url, self.timeout, self.dtype = url.rstrip("/"), float(timeout), dtype
        health = self._request("GET", "/health")
        if not isinstance(health, dict) or health.get("format") != FORMAT or not isinstance(health.get("reward"), str):
            raise RemoteRewardError(f"{self.url}/health did not answer like `treegrpo serve-reward` (format {FORMAT}): "
                                    f"{_shorten(health)}")
        self.served = health["reward"]

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One HTTP request; the decoded JSON answer, or RemoteRewardError saying what went wrong."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        where = f"the reward server at {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:2000].decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
            raise RemoteRewardError(f"{where} answered {method} {path} with HTTP {err.code}: {detail}") from None
        except (TimeoutError, socket.timeout):
            raise RemoteRewardError(f"{where} did not answer {method} {path} within {self.timeout:g} s "
                                    f"(raise reward.options.remote.timeout if the model is just slow)") from None
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise RemoteRewardError(f"{where} did not answer {method} {path} within {self.timeout:g} s "
                                        f"(raise reward.options.remote.timeout if the model is just slow)") from None
            raise RemoteRewardError(f"cannot reach {where} ({reason}); is `treegrpo serve-reward NAME --port PORT` "
                                    f"running there?") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RemoteRewardError(f"{where} sent a malformed answer to {method} {path} (not JSON): "
                                    f"{_shorten(raw)}") from None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"reward 'remote' expects images [B, 3, H, W] in [0, 1], got {shape}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward 'remote' got {images.shape[0]} images but {len(prompts)} prompts")
        answer = self._request("POST", "/score", {"prompts": list(prompts), "images": encode_images(images, self.dtype)})
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RemoteRewardError(f"the reward server at {self.url} sent a malformed answer to POST /score "
                                    f"(expected {{\"scores\": [numbers]}}): {_shorten(answer)}")
        if len(scores) != images.shape[0]:
            raise RemoteRewardError(f"the reward server at {self.url} sent {len(scores)} scores for "
                                    f"{images.shape[0]} images")
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def _shorten(value: Any, limit: int = 200) -> str:
    text = value.decode(errors="replace") if isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."

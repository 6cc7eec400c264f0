"""Rewards over HTTP: real `treegrpo serve-reward` processes on 127.0.0.1 (tests/reward_server_child.py
adds the cheap test reward ``served_spread``) and the ``remote`` reward calling them.

Checked: the same scores as the reward in process (float32 and uint8 on the wire, NaN kept), the
eval command with ``--rewards remote``, each failure (server down, timeout, the reward raising, an
answer that is not JSON, has no scores, or the wrong number) as one clear error after the retries,
bad requests answered 400 / 404, and a training run whose server breaks: it stops with a checkpoint
of the finished iterations and a resume against a working server equals an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reward_server_child import spread_score

import treegrpo
from treegrpo.checkpoint import checkpoint_dirs
from treegrpo.cli import main
from treegrpo.config import ConfigError, load_config
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rewards import build_reward
from treegrpo.rewards.remote import RemoteRewardError, encode_images
from treegrpo.rewards.retry import RetryingReward, RewardError
from treegrpo.trainer import Trainer

TESTS = Path(__file__).resolve().parent
CHILD = TESTS / "reward_server_child.py"


class Server:
    """A child process serving on 127.0.0.1 (a free port); `url` waits for the line it prints."""

    def __init__(self, *args: str) -> None:
        path = os.pathsep.join([str(TESTS.parent / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.args = args
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it until the end, it must not fill up
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        self._url: str | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout=120):
                    self.stop()
                    pytest.fail(f"server {self.args} printed no address within 120 s")
            line = self.proc.stdout.readline()
            if "http://127.0.0.1:" not in line:
                self.stop()
                self.log.seek(0)
                pytest.fail(f"server {self.args} did not start: {line!r} {self.log.read()[-2000:]}")
            self._url = line.split(" at ")[1].split()[0]
        return self._url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def servers():
    """Started together (the two treegrpo ones import torch: seconds), stopped at the end of the module."""
    spec = {"spread": ("serve-reward", "served_spread", "--port", "0"),
            "train": ("serve-reward", "served_spread", "--port", "0", "--reward-option", "fail_after=2"),
            "fake": ("fake",), "doomed": ("fake",)}
    started = {name: Server(*args) for name, args in spec.items()}
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


PROMPTS = ["a cat", "a red circle", "dog"]


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 12, 20, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the same scores
def test_health_names_the_reward_and_remote_scores_equal_the_reward_in_process(servers):
    url = servers["spread"].url
    with urllib.request.urlopen(url + "/health", timeout=10) as answer:
        assert json.loads(answer.read()) == {"reward": "served_spread", "format": 1, "treegrpo": treegrpo.__version__}
    remote = build_reward("remote", url=url)
    assert remote.served == "served_spread"
    x = images(5)
    prompts = ["a cat", "a dog on a mat", "x", "a red circle", ""]
    assert torch.equal(remote(x, prompts), spread_score(x, prompts))  # float32 on the wire: exact
    # uint8 on the wire: the scores of the PNG's pixels, not of the floats
    as_png = (x * 255).round() / 255
    small = build_reward("remote", url=url, dtype="uint8")(x, prompts)
    assert torch.equal(small, spread_score(as_png, prompts)) and not torch.equal(small, spread_score(x, prompts))
    # a non-finite score travels as such (the trainer masks it)
    x[1, 0, 0, 0] = float("nan")
    scores = remote(x, prompts)
    assert math.isnan(scores[1]) and torch.equal(scores[[0, 2, 3, 4]], spread_score(x, prompts)[[0, 2, 3, 4]])


def test_eval_with_rewards_remote_gives_the_in_process_scores(servers, tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    with (folder / "index.jsonl").open("w") as index:
        for i, prompt in enumerate(PROMPTS):
            array = (images(1, seed=i)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i}.png")
            index.write(json.dumps({"file": f"{i}.png", "prompt": prompt}) + "\n")
    code = main(["eval", "--images", str(folder), "--rewards", "remote,served_spread",
                 "--reward-option", f"remote:url={servers['spread'].url}", "--out", str(tmp_path / "eval.json")])
    assert code == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert metrics["images"] == 3.0 and metrics["reward/remote"] == metrics["reward/served_spread"]
    capsys.readouterr()
    assert main(["eval", "--images", str(folder), "--rewards", "remote", "--reward-option", "remote:ur=http://x"]) == 2
    assert "unknown option 'ur' in reward.options.remote; reward 'remote' takes: url, timeout, dtype" in capsys.readouterr().err


def test_eval_retries_a_failing_server_then_exits_1_with_the_servers_error(servers, tmp_path, capsys):
    folder = tmp_path / "samples"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "0.png")
    (folder / "index.jsonl").write_text(json.dumps({"file": "0.png", "prompt": "!fail"}) + "\n")
    (tmp_path / "c.yaml").write_text("reward: {retries: 1, retry_delay: 0}\n")
    code = main(["eval", "--images", str(folder), "--rewards", "remote", "--config", str(tmp_path / "c.yaml"),
                 "--reward-option", f"remote:url={servers['spread'].url}"])
    err = capsys.readouterr().err
    assert code == 1 and "reward 'remote' failed 2 times on prompt '!fail'" in err
    assert "HTTP 500: reward 'served_spread' raised RuntimeError: the scorer broke (test)" in err


# ---------------------------------------------------------------- failures: one clear error after the retries
def failing_call(reward, prompts: list[str] = PROMPTS):
    calls = []
    wrapped = RetryingReward("remote", reward, retries=1, delay=0.25, sleep=calls.append)
    with pytest.raises(RewardError) as err:
        wrapped(images(len(prompts)), prompts)
    assert calls == [0.25]  # retried once, then failed
    message = str(err.value)
    assert message.startswith(f"reward 'remote' failed 2 times on prompt {prompts[0]!r}") and "RemoteRewardError" in message
    return message


def test_server_down(servers):
    doomed = servers["doomed"]
    reward = build_reward("remote", url=doomed.url)
    doomed.stop()
    message = failing_call(reward)
    assert f"cannot reach the reward server at {doomed.url}" in message and "treegrpo serve-reward NAME" in message
    with pytest.raises(RemoteRewardError, match="cannot reach the reward server"):  # and when building it
        build_reward("remote", url=doomed.url)


def test_a_server_slower_than_the_timeout(servers):
    reward = build_reward("remote", url=servers["spread"].url, timeout=0.5)
    message = failing_call(reward, ["!sleep", "a cat"])  # the served reward takes 1.5 s on this batch
    assert "did not answer POST /score within 0.5 s (raise reward.options.remote.timeout" in message


def test_the_served_reward_raising(servers):
    message = failing_call(build_reward("remote", url=servers["spread"].url), ["!fail", "a cat"])
    assert "answered POST /score with HTTP 500: reward 'served_spread' raised RuntimeError: the scorer broke" in message


@pytest.mark.parametrize("mode, expected", [
    ("notjson", "sent a malformed answer to POST /score (not JSON): <html>502 Bad Gateway</html>"),
    ("noscores", "sent a malformed answer to POST /score (expected {\"scores\": [numbers]}): {'result'"),
    ("strings", "sent a malformed answer to POST /score (expected {\"scores\": [numbers]}): {'scores': ['0.5'"),
    ("short", "sent 2 scores for 3 images"),
])
def test_a_malformed_or_wrong_length_answer(servers, mode, expected):
    url = f"{servers['fake'].url}/{mode}"
    assert f"the reward server at {url} {expected}" in failing_call(build_reward("remote", url=url))


def test_bad_options_and_bad_requests():
    with pytest.raises(ConfigError, match="needs reward.options.remote.url"):
        build_reward("remote")
    with pytest.raises(ConfigError, match="timeout must be a number of seconds > 0"):
        build_reward("remote", url="http://127.0.0.1:1", timeout=0)
    with pytest.raises(ConfigError, match="dtype must be 'float32' or 'uint8'"):
        build_reward("remote", url="http://127.0.0.1:1", dtype="float16")


def test_the_server_answers_bad_requests_400_and_unknown_paths_404(servers):
    url = servers["spread"].url

    def post(path: str, body: bytes) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url + path, data=body, method="POST"), timeout=10) as a:
                return a.status, json.loads(a.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]

    assert post("/score", b"{nope")[0] == 400 and "the body is not JSON" in post("/score", b"{nope")[1]
    two = encode_images(images(2))
    assert post("/score", json.dumps({"prompts": ["a"], "images": two}).encode()) == (400, "2 images but 1 prompts")
    code, message = post("/score", json.dumps({"prompts": ["a"], "images": "AAAA"}).encode())
    assert code == 400 and "'images' is not base64 of a .npy file" in message
    flat = encode_images(images(1)[:, :1])  # one channel
    assert post("/score", json.dumps({"prompts": ["a"], "images": flat}).encode()) == (
        400, "'images' must be an array [B, 3, H, W], got shape [1, 1, 12, 20]")
    assert post("/scores", b"{}")[0] == 404
    assert post("/score", json.dumps({"prompts": ["a", "b"], "images": two}).encode()) == (
        200, {"scores": spread_score(images(2), ["a", "b"]).tolist()})


def test_serve_reward_refuses_bad_arguments_before_serving(servers, capsys):
    assert main(["serve-reward", "served_sprad", "--port", "0"]) == 2
    assert "Did you mean 'served_spread'" in capsys.readouterr().err
    assert main(["serve-reward", "served_spread", "--reward-option", "fail_aftr=1"]) == 2
    assert "unknown option 'fail_aftr' in reward.options.served_spread" in capsys.readouterr().err
    assert main(["serve-reward", "served_spread", "--reward-option", "fail_after"]) == 2
    assert "must look like KEY=VALUE" in capsys.readouterr().err
    busy = servers["spread"].url.rsplit(":", 1)[1]
    assert main(["serve-reward", "served_spread", "--port", busy]) == 1
    assert f"cannot listen on 127.0.0.1:{busy}" in capsys.readouterr().err


# ---------------------------------------------------------------- training against a server that breaks
def trainer(run: Path, url: str) -> Trainer:
    config = load_config(None, [
        "model.family=analytic", "method.k=2", "method.window=2", "train.iterations=4", "train.prompts_per_iteration=2",
        "train.progress=false", "eval.every=0", "eval.num_seeds=1", "eval.grid_prompts=2", "train.checkpoint_every=0",
        "log.trackers=[]", "log.tree_every=0", "optim.kl_coef=0", "optim.lr=0.02", "optim.clip_range=0.2",
        "reward.weights={remote: 1.0}", "reward.eval=[served_spread]", "reward.retries=1", "reward.retry_delay=0",
        f"reward.options={{remote: {{url: '{url}'}}}}"])
    return Trainer(config, run, policy=GaussianPolicy(data_std=0.5, latent_shape=(3, 4, 4)), train_prompts=["p0", "p1"])


def test_training_stops_with_a_checkpoint_when_the_server_breaks_and_resumes_losing_nothing(servers, tmp_path):
    full = trainer(tmp_path / "full", servers["spread"].url)
    full.train()
    # The "train" server fails every call after its second: iteration 3's reward (one call per iteration).
    cut = trainer(tmp_path / "cut", servers["train"].url)
    with pytest.raises(RewardError, match=r"reward 'remote' failed 2 times on prompt 'p[01]'.*HTTP 500.*"
                                          r"saved at iteration 2; .*treegrpo train --resume"):
        cut.train()
    # checkpoint_every=0: without the failure's own checkpoint there would be none
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["iter_000002"]
    # Resume against a working server (another port: the url may change on resume).
    resumed = trainer(tmp_path / "cut", servers["spread"].url)
    resumed.train()
    assert torch.equal(resumed.policy.gain.detach(), full.policy.gain.detach())

    def metrics(run: Path) -> list[dict]:
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "wall_seconds" and not k.startswith("memory/")} for r in lines]

    assert len(metrics(tmp_path / "full")) == 5 and metrics(tmp_path / "cut") == metrics(tmp_path / "full")

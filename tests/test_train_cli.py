"""End-to-end: a tiny training run through the CLI writes every artefact; sample/eval read it back."""

import json

import pytest

from treegrpo.cli import main
from treegrpo.worlds.shapes import SHAPES_WORLD

TINY = [*SHAPES_WORLD, "train.iterations=2", "train.prompts_per_iteration=2", "eval.num_seeds=1", "eval.every=1",
        "eval.grid_prompts=3", "train.checkpoint_every=1", "method.k=2", "method.window=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["train", *TINY, "--output-dir", str(out), "--quiet"]) == 0
    return out


def test_a_tiny_run_writes_every_file(run_dir):
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "samples/start.png", "samples/iter_000002.png",
                 "samples/start_vs_latest.png"]:
        assert (run_dir / name).is_file(), name
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["iter_000001", "iter_000002"]
    assert (ckpts[-1] / "trainable.safetensors").is_file() and (ckpts[-1] / "optimizer.pt").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    first = records[1]
    for key in ["wall_seconds", "model_calls/rollout", "model_calls/total", "train/shapes_mean", "train/shapes_std",
                "train/loss", "train/approx_kl", "train/clip_frac", "train/ratio_mean", "train/ratio_min",
                "train/ratio_max", "lr", "eval/acc/shape", "eval/reward/shapes"]:
        assert key in first, key
    # k = 2, w = 2, T = 10 per prompt: 1 + 2 + 4 * (8 - start) + start calls without CFG.
    start = int(first["window_start"])
    assert first["model_calls/rollout"] == 2 * (start + 3 + 4 * (10 - start - 2))
    assert first["train/first_ratio_dev"] == 0.0  # old log-probs in the training layout: exactly on-policy
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["base"]) == set(summary["final"]) and "acc/shape" in summary["final"]


def test_sample_and_eval_read_a_run_directory(run_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a black background\na blue square on a white background\n")
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(run_dir), "--prompts", str(prompts), "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 4 and all((out / r["file"]).is_file() for r in index)
    assert {r["prompt"] for r in index} == set(prompts.read_text().split("\n")[:2])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--prompts", str(prompts), "--seeds", "1",
                 "--rewards", "shape,color", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"reward/shape", "reward/color", "acc/shape", "acc/color", "acc/background"}


def test_rerunning_a_finished_run_resumes_instead_of_restarting(run_dir, capsys):
    before = (run_dir / "metrics.jsonl").read_text()
    assert main(["train", *TINY, "--output-dir", str(run_dir), "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["train", "optim.lrr=1"], "Did you mean optim.lr"),
    (["train", "reward.weights={nope: 1.0}"], "unknown reward 'nope'"),
    (["train", *SHAPES_WORLD, "train.prompt_balance=template"], "not a prompt of the compositional world"),
    (["sample", "--checkpoint", "/does/not/exist", "--out", "/tmp/x"], "does not exist"),
    (["eval", "--prompts", "/no/such/prompts.txt"], "does not exist"),
])
def test_user_errors_print_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

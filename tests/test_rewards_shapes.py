"""Shapes-world rewards: the shipped classifier, pixel colour scores, the composite, JPEG rewards."""

from __future__ import annotations

import pytest
import torch

from treegrpo.rewards import available_rewards, build_reward
from treegrpo.rewards.shapes import shapes_accuracy
from treegrpo.worlds.classifier import CLASSES, OTHER, default_weights_path, load_shape_classifier, shape_probabilities
from treegrpo.worlds.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapePrompt, all_prompts, render_batch

HELD_OUT_SEED = 424242  # never used by classifier training (seed 0) or its evaluation (12345)
NAMES = ["shape", "color", "background", "shapes", "jpeg_compressibility", "jpeg_incompressibility"]


@pytest.fixture(scope="module")
def rendered() -> tuple[torch.Tensor, list[ShapePrompt]]:
    prompts = all_prompts() * 10  # 540 images, 10 per prompt
    return render_batch(prompts, torch.Generator().manual_seed(HELD_OUT_SEED)), prompts


def _texts(prompts: list[ShapePrompt]) -> list[str]:
    return [p.text for p in prompts]


def _swap(prompts: list[ShapePrompt], field: str) -> list[ShapePrompt]:
    """The same prompts with `field` replaced by the next value of its vocabulary (always wrong)."""
    vocab = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}[field]
    out = []
    for p in prompts:
        wrong = vocab[(vocab.index(getattr(p, field)) + 1) % len(vocab)]
        out.append(ShapePrompt(**{**p.__dict__, field: wrong}))
    return out


def test_shipped_weights_are_small_and_load_offline():
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    model = load_shape_classifier()
    assert load_shape_classifier() is model  # cached
    assert not model.training


def test_classifier_is_accurate_on_held_out_renders(rendered):
    images, prompts = rendered
    probs = shape_probabilities(images)
    assert probs.shape == (len(prompts), len(CLASSES))
    assert torch.allclose(probs.sum(1), torch.ones(len(prompts)), atol=1e-5)
    truth = torch.tensor([SHAPES.index(p.shape) for p in prompts])
    accuracy = (probs.argmax(1) == truth).float().mean().item()
    assert accuracy >= 0.97
    # It also stays right under mild pixel noise, as a policy's samples have.
    noisy = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (shape_probabilities(noisy).argmax(1) == truth).float().mean() >= 0.95


def test_classifier_calls_degenerate_images_other():
    g = torch.Generator().manual_seed(3)
    flats = torch.tensor(list(BACKGROUNDS.values()) + list(COLOURS.values())).view(-1, 3, 1, 1).expand(-1, 3, 16, 16)
    noise = torch.rand(32, 3, 16, 16, generator=g)
    for images in (flats, noise):
        assert (shape_probabilities(images).argmax(1) == OTHER).float().mean() >= 0.9


def test_accuracy_is_near_perfect_on_renders(rendered):
    images, prompts = rendered
    acc = shapes_accuracy(images, _texts(prompts))
    assert set(acc) == {"shape", "color", "background"}
    for key, value in acc.items():
        assert value.dtype == torch.bool and value.shape == (len(prompts),)
    assert acc["color"].all() and acc["background"].all()
    assert acc["shape"].float().mean() >= 0.97
    # Wrong prompts make the matching attribute wrong, and leave the others right.
    assert not shapes_accuracy(images, _texts(_swap(prompts, "colour")))["color"].any()
    assert not shapes_accuracy(images, _texts(_swap(prompts, "background")))["background"].any()
    wrong_shape = shapes_accuracy(images, _texts(_swap(prompts, "shape")))
    assert wrong_shape["shape"].float().mean() <= 0.03 and wrong_shape["color"].all()


def test_rewards_are_high_on_correct_renders(rendered):
    images, prompts = rendered
    texts = _texts(prompts)
    for name in ("shape", "color", "background", "shapes"):
        scores = build_reward(name)(images, texts)
        assert scores.shape == (len(prompts),) and scores.dtype == torch.float32
        assert ((scores >= 0) & (scores <= 1)).all()
        assert scores.mean() > 0.95, name
    assert build_reward("color")(images, texts).min() > 0.9
    assert build_reward("background")(images, texts).min() > 0.99


@pytest.mark.parametrize(("reward", "field"), [("shape", "shape"), ("color", "colour"), ("background", "background"),
                                               ("shapes", "colour"), ("shapes", "shape"), ("shapes", "background")])
def test_a_wrong_prompt_lowers_the_matching_reward(rendered, reward, field):
    images, prompts = rendered
    fn = build_reward(reward)
    right = fn(images, _texts(prompts))
    wrong = fn(images, _texts(_swap(prompts, field)))
    assert wrong.mean() < 0.1
    assert (right - wrong).mean() > 0.85


def test_degenerate_images_score_low_on_shapes():
    g = torch.Generator().manual_seed(4)
    prompts = [all_prompts()[i] for i in torch.randint(54, (48,), generator=g).tolist()]
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts]).view(-1, 3, 1, 1)
    empty = bg.expand(-1, 3, 16, 16).contiguous()  # the right background and nothing on it
    uniform = torch.rand(48, 3, 16, 16, generator=g)
    gaussian = (0.5 + 0.3 * torch.randn(48, 3, 16, 16, generator=g)).clamp(0, 1)
    fg = torch.tensor([COLOURS[p.colour] for p in prompts]).view(-1, 3, 1, 1)
    mask = (torch.rand(48, 1, 16, 16, generator=g) < 0.3).float()  # prompted colours as salt on the background
    speckle = bg * (1 - mask) + fg * mask
    shapes, color = build_reward("shapes"), build_reward("color")
    texts = _texts(prompts)
    for name, images in {"empty": empty, "uniform": uniform, "gaussian": gaussian, "speckle": speckle}.items():
        assert shapes(images, texts).max() < 0.1, name
    assert color(empty, texts).max() < 1e-3  # no foreground, no colour credit


def test_background_score_penalises_a_noisy_border():
    prompt = ShapePrompt("red", "circle", "gray")
    gray = torch.full((16, 3, 16, 16), 0.5)
    noisy = (gray + 0.3 * torch.randn(gray.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    reward = build_reward("background")
    assert reward(gray, [prompt.text] * 16).min() > 0.99
    assert reward(noisy, [prompt.text] * 16).max() < 0.5


def test_jpeg_rewards_have_the_right_sign():
    flat = torch.full((4, 3, 16, 16), 0.5)
    noisy = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    images = torch.cat([flat, noisy])
    texts = ["a red circle on a black background"] * 8
    inc = build_reward("jpeg_incompressibility")(images, texts)
    comp = build_reward("jpeg_compressibility")(images, texts)
    assert torch.equal(comp, -inc)
    assert (inc[:4] > 0.3).all() and (inc[4:] < 2).all()  # kB
    assert inc[4:].min() > inc[:4].max() + 0.1  # noise is larger
    assert comp[:4].min() > comp[4:].max()  # flat is more compressible


def test_build_reward_knows_every_name():
    assert set(NAMES) <= set(available_rewards())
    images = render_batch(all_prompts()[:4], torch.Generator().manual_seed(8))
    texts = _texts(all_prompts()[:4])
    for name in NAMES:
        scores = build_reward(name)(images, texts)
        assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    with pytest.raises(KeyError, match="shapes"):
        build_reward("shapez")


@pytest.mark.parametrize("name", ["shape", "color", "background", "shapes"])
def test_non_shapes_prompts_are_refused_with_the_reward_name(name):
    images = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=f"reward '{name}' only scores shapes-world prompts"):
        build_reward(name)(images, ["a photo of an astronaut riding a horse"])
    with pytest.raises(ValueError, match=f"reward '{name}' got 1 images but 2 prompts"):
        build_reward(name)(images, ["a red circle on a black background"] * 2)


def test_shapes_accuracy_refuses_non_shapes_prompts():
    with pytest.raises(ValueError, match="'shapes_accuracy' only scores shapes-world prompts"):
        shapes_accuracy(torch.zeros(1, 3, 16, 16), ["a photo of a cat"])


def test_classifier_training_is_reproducible_for_a_seed(tmp_path):
    from safetensors.torch import load_file

    from treegrpo.worlds.classifier import train_shape_classifier

    paths = [tmp_path / f"{name}.safetensors" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (0, 0, 1)):
        metrics = train_shape_classifier(path, steps=10, seed=seed, progress=False)
        assert {"train_loss", "acc_rendered", "acc_other", "train_seconds"} <= set(metrics)
    a, b, c = (load_file(str(p)) for p in paths)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    model = load_shape_classifier(paths[0])
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, len(CLASSES))

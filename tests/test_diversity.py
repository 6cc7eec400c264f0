"""Diversity metrics against closed forms, the feature hook, and GARDO's diversity-weighted advantages
against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from treegrpo.advantages import diversity_weighted_advantages, tree_advantages
from treegrpo.diversity import (DiversityFeature, available_features, cosine_diversity, group_nearest_neighbour, lgmd,
                                nearest_neighbour_distance, per_image_diversity, pixel_distance,
                                register_diversity_feature, resolve_features)
from treegrpo.evaluation import summarize_eval
from treegrpo.tree import Tree, TreeShape
from treegrpo.worlds.shapes import SHAPES_WORLD, parse_prompt, render_batch
from treegrpo.worlds.shapes_layout import shapes_layout


def test_cosine_diversity_closed_forms():
    same = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])  # same direction: cos = 1
    assert cosine_diversity(same) == pytest.approx(0.0, abs=1e-12)
    assert cosine_diversity(torch.eye(4)) == pytest.approx(1.0)  # orthogonal
    assert cosine_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)  # opposite
    # three vectors at 0, 90 and 180 degrees: pair distances 1, 2, 1 -> mean 4 / 3
    assert cosine_diversity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])) == pytest.approx(4 / 3)


def test_lgmd_on_known_latents():
    d = 16
    z = torch.zeros(3, 4, 2, 2)
    z[1] += 1.0  # ||z1 - z0|| = sqrt(16) -> / sqrt(16) = 1 -> log 1 = 0
    z[2] += 3.0  # to z0: 3 -> log 3; to z1: 2 -> log 2
    expected = (0.0 + math.log(3.0) + math.log(2.0)) / 3
    assert lgmd(z) == pytest.approx(expected)
    assert z[0].numel() == d
    # identical latents hit the documented floor instead of -inf
    assert lgmd(torch.ones(2, 5)) == pytest.approx(math.log(1e-6))


def test_pixel_distance_closed_forms():
    a = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert pixel_distance(torch.cat([a, a])) == pytest.approx(0.0, abs=1e-12)
    assert pixel_distance(torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])) == pytest.approx(1.0)
    assert pixel_distance(torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5)])) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 samples"):
        pixel_distance(a)


def test_per_image_terms_average_to_the_per_prompt_pair_mean():
    g = torch.Generator().manual_seed(1)
    p, s = 3, 4
    images, latents = torch.rand(p * s, 3, 6, 6, generator=g), torch.randn(p * s, 2, 3, 3, generator=g)
    feats = torch.randn(p * s, 5, generator=g)
    feature = DiversityFeature("f", lambda im, pr: feats, "cosine")
    out = per_image_diversity(images, latents, ["x"] * (p * s), s, {"f": feature})
    assert set(out) == {"diversity/lgmd", "diversity/pixel", "diversity/f"}
    assert all(v.shape == (p * s,) for v in out.values())
    chunks = lambda x: [x[i * s:(i + 1) * s] for i in range(p)]  # noqa: E731
    assert float(out["diversity/f"].mean()) == pytest.approx(sum(cosine_diversity(c) for c in chunks(feats)) / p, rel=1e-6)
    assert float(out["diversity/lgmd"].mean()) == pytest.approx(sum(lgmd(c) for c in chunks(latents)) / p, rel=1e-6)
    assert float(out["diversity/pixel"].mean()) == pytest.approx(sum(pixel_distance(c) for c in chunks(images)) / p, rel=1e-6)
    with pytest.raises(ValueError, match="expected P"):
        per_image_diversity(images[:-1], latents[:-1], ["x"] * (p * s - 1), s, {})


def test_shapes_layout_finds_the_shape_centre_and_size():
    prompts = [parse_prompt("a red circle on a black background")] * 2
    images = render_batch(prompts, torch.Generator().manual_seed(0))
    layout = shapes_layout(images)
    # the renderer's own draws (same generator order: radius, then cx, cy)
    g = torch.Generator().manual_seed(0)
    r = (0.2 + 0.15 * torch.rand(2, generator=g)) * 16
    cx = r + (16 - 2 * r) * torch.rand(2, generator=g)
    cy = r + (16 - 2 * r) * torch.rand(2, generator=g)
    torch.testing.assert_close(layout[:, 0], cx / 16, atol=0.02, rtol=0)
    torch.testing.assert_close(layout[:, 1], cy / 16, atol=0.02, rtol=0)
    torch.testing.assert_close(layout[:, 2], r / 16 / math.sqrt(2), atol=0.03, rtol=0)
    # an empty image has no shape: centre, extent 0
    assert shapes_layout(torch.zeros(1, 3, 16, 16)).tolist() == [[0.5, 0.5, 0.0]]


def test_scene_layout_is_object_coverage_per_cell_of_the_compositional_world():
    from treegrpo.worlds.compose import Placed, render_scenes
    from treegrpo.worlds.compose_layout import scene_layout

    def scene(cx, cy, r=5.0, colour="red"):
        return [Placed(colour, "square", cx, cy, r)]

    images = render_scenes([scene(6, 6), scene(6, 6, colour="blue"), scene(26, 26), scene(6, 6, r=3.5), []])
    f = scene_layout(images)
    assert f.shape == (5, 16)
    side = 2 * 0.85 * 5.0  # a square of half-side 0.85 r
    assert float(f[0].sum()) * 64 == pytest.approx(side ** 2, rel=0.05)  # coverage adds up to the area
    assert int(f[0].argmax()) == 0 and int(f[2].argmax()) == 15  # top-left cell, bottom-right cell
    assert torch.allclose(f[0], f[1], atol=1e-6)  # colour is the prompt's, not the layout's
    assert float((f[0] - f[3]).norm()) > 0.1 and float(f[4].abs().max()) == 0.0  # size counts; empty is zero
    assert list(resolve_features(None, {}, "compose")) == ["scene_layout", "single_centre"]
    assert "scene_layout" not in resolve_features(None, {}, "sd3")  # a real SD3 model is not this world


def test_single_centre_is_the_single_objects_centre_and_its_diversity_the_pairwise_pixel_distance():
    from treegrpo.worlds.compose import Placed, render_scenes
    from treegrpo.worlds.compose_layout import single_centre

    images = render_scenes([[Placed("red", "circle", 8, 10, 5.0)], [Placed("red", "circle", 20, 10, 5.0)],
                            [Placed("red", "circle", 8, 26, 4.0)], [Placed("blue", "square", 9, 9, 4.0)],
                            [Placed("blue", "square", 9, 9, 4.0)], []])
    prompts = ["a red circle"] * 3 + ["two blue squares", "two blue squares", "a red circle"]
    c = single_centre(images, prompts)
    assert c[:3].flatten().tolist() == pytest.approx([8, 10, 20, 10, 8, 26], abs=0.1)  # anti-aliased: to 0.1 px
    assert torch.isnan(c[3:]).all()  # other templates, and an image without an object
    feature = resolve_features(["single_centre"], {}, "compose")["single_centre"]
    assert feature.partial
    lgmd_input = torch.randn(6, 4)
    # Two prompts x 3 seeds: the first is single (pairs 12, 16 and 20 px apart), the second drops out.
    scenes = images[[0, 1, 2, 3, 4, 3]]
    out = per_image_diversity(scenes, lgmd_input, ["a red circle"] * 3 + ["two blue squares"] * 3, 3,
                              {"single_centre": feature})
    summary = summarize_eval(out)
    assert summary["diversity/single_centre"] == pytest.approx((12 + 16 + 20) / 3, abs=0.2)


def test_feature_resolution_registry_and_errors():
    assert "layout" in available_features()

    class ClipLike:
        def image_features(self, images):
            return images.flatten(1)

    rewards = {"hpsv2.1": ClipLike(), "shapes": object()}
    auto = resolve_features(None, rewards, "shapes")
    assert list(auto) == ["cosine_hpsv2.1", "layout"] and auto["cosine_hpsv2.1"].metric == "cosine"
    assert list(resolve_features(None, rewards, "sd3")) == ["cosine_hpsv2.1"]
    assert list(resolve_features([], rewards, "shapes")) == []
    assert list(resolve_features(["layout"], rewards, "sd3")) == ["layout"]
    with pytest.raises(ValueError, match="neither a loaded reward with image features.*Valid here: hpsv2.1, layout"):
        resolve_features(["shapes"], rewards, "shapes")
    with pytest.raises(ValueError, match="registered twice"):
        register_diversity_feature("layout", shapes_layout)
    bad = DiversityFeature("bad", lambda im, pr: torch.zeros(im.shape[0]))
    with pytest.raises(ValueError, match=r"must return \[N, D\]"):
        bad(torch.zeros(2, 3, 4, 4), ["a", "b"])


def test_clip_rewards_expose_their_image_embeddings():
    from treegrpo.rewards.preference import Aesthetic, ClipScore, HPSv21, PickScore

    for cls in (ClipScore, PickScore, HPSv21, Aesthetic):
        assert callable(getattr(cls, "image_features", None)), cls.__name__


def test_nearest_neighbour_distance():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    d = nearest_neighbour_distance(e, "cosine")
    cos01 = 1 / math.sqrt(1.01)
    torch.testing.assert_close(d, torch.tensor([1 - cos01, 1 - cos01, 1 - 0.1 / math.sqrt(1.01)], dtype=torch.float64))
    torch.testing.assert_close(nearest_neighbour_distance(torch.tensor([[0.0], [1.0], [3.0]]), "euclidean"),
                               torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    group = torch.tensor([0, 0, 0, 1, 1])
    feats = torch.tensor([[0.0], [1.0], [3.0], [5.0], [9.0]])
    mask = torch.tensor([True, True, True, True, False])
    torch.testing.assert_close(group_nearest_neighbour(feats, group, "euclidean", mask),
                               torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0], dtype=torch.float64))


def test_gardo_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mu = 3
    d = torch.tensor([0.4, 0.1, 0.2, 0.1])  # mean(d) = 0.2
    adv = diversity_weighted_advantages(r, torch.zeros(4, dtype=torch.long), d)
    # below the mean: w = 1; r = mu: (0) * 1.0; above: (6 - 3) * 0.1 / 0.2
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 0.0, 1.5]))
    # two groups with a masked leaf: it gets 0 and stays out of mu and mean(d)
    r2 = torch.tensor([1.0, 3.0, 100.0, 0.0, 4.0])
    d2 = torch.tensor([0.3, 0.1, 9.0, 0.5, 0.5])
    g2 = torch.tensor([0, 0, 0, 1, 1])
    mask = torch.tensor([True, True, False, True, True])
    adv2 = diversity_weighted_advantages(r2, g2, d2, mask)
    torch.testing.assert_close(adv2, torch.tensor([-1.0, 1.0 * 0.1 / 0.2, 0.0, -2.0, 2.0 * 1.0]))
    # no spread -> 0; all leaves alike (mean d = 0) -> w = 1
    torch.testing.assert_close(diversity_weighted_advantages(torch.ones(3), torch.zeros(3, dtype=torch.long), torch.rand(3)),
                               torch.zeros(3))
    torch.testing.assert_close(diversity_weighted_advantages(r, torch.zeros(4, dtype=torch.long), torch.zeros(4)),
                               r - 3.0)
    with pytest.raises(ValueError, match="must all be"):
        diversity_weighted_advantages(r, torch.zeros(4, dtype=torch.long), d[:3])


def test_tree_advantages_with_diversity_replace_leaf_normalisation():
    shape = TreeShape.flow_grpo(num_steps=2, group_size=4)
    tree = Tree.roots_for(shape, 1, torch.zeros(4, 1))
    for _ in range(2):
        tree.add_level(torch.zeros(4, 1), torch.zeros(4))
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    edges = tree_advantages(tree, {"r": r}, diversity=torch.tensor([0.4, 0.1, 0.2, 0.1]))
    torch.testing.assert_close(edges[2], torch.tensor([-2.0, -1.0, 0.0, 1.5]))
    plain = tree_advantages(tree, {"r": r})
    torch.testing.assert_close(plain[2], (r - 3) / r.std(unbiased=False))


def test_a_tiny_run_logs_diversity_and_trains_with_gardo(tmp_path):
    import json

    from treegrpo.config import ConfigError, load_config
    from treegrpo.trainer import Trainer

    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle on a black background\na blue square on a white background\n")
    overrides = [*SHAPES_WORLD, "train.iterations=1", "train.prompts_per_iteration=2", "eval.num_seeds=3", f"eval.prompts={prompts}",
                 "eval.grid_prompts=2", "eval.diversity_grid_prompts=2", "eval.diversity_grid_seeds=3", "method.k=2",
                 "method.window=2", "method.diversity_weight=gardo", "log.trackers=[]", "train.progress=false"]
    summary = Trainer(load_config(None, overrides), tmp_path / "run").train()
    for part in ("base", "final"):
        for key in ("diversity/lgmd", "diversity/pixel", "diversity/layout"):
            assert math.isfinite(summary[part][key]), (part, key)
    assert summary["base"]["diversity/layout"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/diversity/layout" in records[0] and records[1]["train/diversity_nn"] > 0
    for tag in ("start", "iter_000001"):
        assert (tmp_path / "run" / "samples" / "diversity" / f"{tag}.png").is_file()
    from treegrpo.report import write_run_report

    html = write_run_report(tmp_path / "run").read_text()
    curves = html.split('id="diversity-curves">', 1)[1].split("</div>", 1)[0]
    assert "<svg" in curves and "layout" in curves and "lgmd" in curves
    grids = html.split('id="diversity-grids">', 1)[1]
    assert "a red circle on a black background" in grids and "base" in grids and "iteration 1" in grids
    assert "1000000, 1000001, 1000002" in grids
    with pytest.raises(ConfigError, match="method.diversity_feature: 'nope'"):
        Trainer(load_config(None, [*overrides, "method.diversity_feature=nope"]), tmp_path / "run2")
    with pytest.raises(ConfigError, match="'single_centre' is defined for some prompts only"):
        Trainer(load_config(None, [*overrides, "method.diversity_feature=single_centre"]), tmp_path / "run3")
    with pytest.raises(ConfigError, match="must be none or gardo"):
        load_config(None, ["method.diversity_weight=guard"])


def test_gardo_weights_the_flow_matching_objective_s_leaf_advantages(tmp_path, monkeypatch):
    """With optim.objective=flow_matching the leaves' advantages are GARDO's diversity-weighted ones,
    not the plain standardised rewards: the option acts on both objectives."""
    import treegrpo.advantages as advantages_module
    import treegrpo.trainer as trainer_module
    from treegrpo.config import load_config
    from treegrpo.trainer import Trainer

    seen: dict[str, list[torch.Tensor]] = {"gardo": [], "matching_input": []}

    def spy_gardo(*args, **kwargs):
        out = diversity_weighted_advantages(*args, **kwargs)
        seen["gardo"].append(out)
        return out

    real_weights = trainer_module.matching_weights

    def spy_weights(advantage, group, mask=None):
        seen["matching_input"].append(advantage)
        return real_weights(advantage, group, mask)

    monkeypatch.setattr(advantages_module, "diversity_weighted_advantages", spy_gardo)
    monkeypatch.setattr(trainer_module, "matching_weights", spy_weights)
    overrides = [*SHAPES_WORLD, "train.iterations=1", "train.prompts_per_iteration=2", "eval.every=0", "method.k=2",
                 "method.window=2", "method.diversity_weight=gardo", "optim.objective=flow_matching", "log.trackers=[]",
                 "train.progress=false"]
    Trainer(load_config(None, overrides), tmp_path / "run").train()
    # GARDO runs twice per iteration: for the edges (tree_advantages) and for the flow-matching step, last.
    assert len(seen["gardo"]) == 2 and len(seen["matching_input"]) == 1
    assert seen["matching_input"][0] is seen["gardo"][-1]
    assert float(seen["gardo"][-1].abs().sum()) > 0  # the rewards had spread: a real weighting, not zeros

"""The tree picture: one SVG edge per tree edge, coloured in the order of the advantages."""

import re

import torch

from treegrpo.advantages import tree_advantages
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rollout import rollout
from treegrpo.tree import TreeShape
from treegrpo.tree_record import record_tree
from treegrpo.tree_svg import advantage_colour, layout, tree_svg


def _record(shape: TreeShape):
    policy = GaussianPolicy(latent_shape=(3, 8, 8))
    tree = rollout(policy, ["a", "b"], shape, generator=torch.Generator().manual_seed(1))
    images = (tree.leaves.clamp(-1, 1) + 1) / 2
    rewards = {"bright": images.mean(dim=(1, 2, 3))}
    edges = tree_advantages(tree, rewards)
    return record_tree(tree, edges, images, rewards, ["a", "b"], iteration=12)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def test_every_tree_edge_is_drawn_once_with_the_leaves_and_the_window():
    shape = TreeShape.treegrpo(num_steps=10, k=3, w=3, start=2)
    rec = _record(shape)
    svg = tree_svg(rec)
    edges = re.findall(r'<line class="edge"[^>]*>', svg)
    # 1 root chain of 2 ODE steps, 3 + 9 + 27 window edges, 27 leaves x 5 ODE tail steps.
    assert len(edges) == rec.num_edges == 2 + 3 + 9 + 27 + 27 * 5
    assert svg.count('class="leaf-thumb"') == rec.num_leaves == 27
    assert svg.count('class="window"') == 3  # trained steps 2, 3, 4 shaded
    assert svg.count("data:image/png;base64,") == 27
    assert f'data-edges="{rec.num_edges}"' in svg
    # Edges per step match the tree: step i has as many edges as level i + 1 has nodes.
    steps = [int(s) for s in re.findall(r'data-step="(\d+)"', svg)]
    assert [steps.count(i) for i in range(10)] == [1, 1, 3, 9, 27, 27, 27, 27, 27, 27]


def test_edge_colours_order_by_advantage():
    rec = _record(TreeShape.treegrpo(num_steps=6, k=3, w=2, start=0))
    svg = tree_svg(rec)
    pairs = re.findall(r'<line class="edge"[^>]*stroke="(#[0-9a-f]{6})"[^>]*data-adv="([^"]+)"', svg)
    assert len(pairs) == rec.num_edges
    values = sorted((float(a), _rgb(c)) for c, a in pairs)
    assert values[0][0] < 0 < values[-1][0]  # the picture has both credited and blamed edges
    blue_minus_red = [rgb[2] - rgb[0] for _, rgb in values]
    assert all(a <= b for a, b in zip(blue_minus_red, blue_minus_red[1:]))  # monotone in the advantage
    strongest = max(values, key=lambda v: abs(v[0]))  # the scale spans [-max |A|, max |A|]
    assert strongest[1] == ((33, 102, 172) if strongest[0] > 0 else (215, 48, 39))


def test_colour_scale_is_symmetric_and_neutral_at_zero():
    assert advantage_colour(0.0, 2.0) == "#bebebe"
    assert advantage_colour(float("nan"), 2.0) == "#bebebe"
    assert advantage_colour(5.0, 2.0) == advantage_colour(2.0, 2.0) == "#2166ac"  # clipped at +vmax
    neg, pos = _rgb(advantage_colour(-1.0, 2.0)), _rgb(advantage_colour(1.0, 2.0))
    assert neg[0] > neg[2] and pos[2] > pos[0]


def test_inner_nodes_sit_at_the_mean_height_of_their_children():
    rec = _record(TreeShape.dance_grpo(num_steps=4, group_size=4, trained_steps=(0, 1)))
    ys = layout(rec, row=10.0, top=0.0)
    assert torch.allclose(ys[4], torch.tensor([5.0, 15.0, 25.0, 35.0], dtype=torch.float64))
    assert torch.allclose(ys[0], torch.tensor([20.0], dtype=torch.float64))  # the root: mean of its 4 branches

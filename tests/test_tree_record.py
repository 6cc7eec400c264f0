"""Tree records: one prompt's trees cut out of a real rollout, with the trainer's edge advantages."""

import pytest
import torch

from treegrpo.advantages import tree_advantages
from treegrpo.policies.analytic import GaussianPolicy
from treegrpo.rollout import rollout
from treegrpo.tree import TreeShape
from treegrpo.tree_record import TreeRecord, list_records, record_tree, thumbnails


def _forest(shape: TreeShape, prompts: list[str], side: int = 8):
    policy = GaussianPolicy(latent_shape=(3, side, side))
    tree = rollout(policy, prompts, shape, generator=torch.Generator().manual_seed(0))
    images = (tree.leaves.clamp(-1, 1) + 1) / 2  # [L, 3, side, side] in [0, 1]
    rewards = {"bright": images.mean(dim=(1, 2, 3)), "red": images[:, 0].mean(dim=(1, 2))}
    edges = tree_advantages(tree, rewards, weights={"bright": 0.8, "red": 0.2})
    return tree, images, rewards, edges


def test_the_record_holds_one_prompts_trees_with_their_edge_advantages():
    shape = TreeShape.treegrpo(num_steps=6, k=3, w=2, start=1, trees_per_prompt=2)
    tree, images, rewards, edges = _forest(shape, ["a", "b", "c"])
    rec = record_tree(tree, edges, images, rewards, ["a", "b", "c"], iteration=7,
                      weights={"bright": 0.8, "red": 0.2}, prompt_index=1)
    assert rec.prompt == "b" and rec.iteration == 7 and rec.num_steps == 6
    # Two trees of 9 leaves; edges: per tree 1 (step 0) + 3 + 9 + 9 * 3 (ODE tails).
    assert rec.num_leaves == 18
    assert rec.num_edges == 2 * (1 + 3 + 9 + 9 * 3)
    for level in range(1, 7):
        n_prev = 2 * shape.nodes_at(level - 1)
        assert rec.parent[level].shape[0] == 2 * shape.nodes_at(level)
        assert int(rec.parent[level].min()) == 0 and int(rec.parent[level].max()) == n_prev - 1
        # The same values as the trainer's advantages for prompt 1's nodes (contiguous block 1 of 3).
        keep = tree.prompt[level] == 1
        assert torch.equal(rec.advantage[level], edges[level][keep])
    leaves = tree.leaf_prompt == 1
    assert torch.equal(rec.rewards["bright"], rewards["bright"][leaves])
    assert torch.allclose(rec.leaf_reward(), 0.8 * rewards["bright"][leaves] + 0.2 * rewards["red"][leaves])
    assert rec.thumbnails.dtype == torch.uint8 and rec.thumbnails.shape == (18, 3, 8, 8)  # small leaves kept as they are


def test_save_and_load_round_trip(tmp_path):
    shape = TreeShape.dance_grpo(num_steps=4, group_size=5, trained_steps=(0, 2))
    tree, images, rewards, edges = _forest(shape, ["a", "b"])
    rec = record_tree(tree, edges, images, rewards, ["a", "b"], iteration=3, weights={"bright": 0.8, "red": 0.2})
    path = rec.save(tmp_path / "trees")
    assert path.name == "iter_000003.json" and path.with_suffix(".safetensors").is_file()
    back = TreeRecord.load(path)
    assert (back.iteration, back.prompt, back.branching, back.stochastic, back.trained, back.weights) == \
        (3, "a", [5, 1, 1, 1], [True] * 4, [True, False, True, False], {"bright": 0.8, "red": 0.2})
    for a, b in zip(rec.parent + rec.advantage, back.parent + back.advantage):
        assert torch.equal(a, b)
    assert torch.equal(back.thumbnails, rec.thumbnails) and torch.equal(back.rewards["red"], rec.rewards["red"])
    assert list_records(tmp_path) == [path]


def test_thumbnails_shrink_big_images_and_keep_small_ones():
    big = torch.rand(2, 3, 128, 96)
    small = thumbnails(big, 48)
    assert small.shape == (2, 3, 48, 36) and small.dtype == torch.uint8
    # Area averaging: a constant image stays that constant.
    assert torch.all(thumbnails(torch.full((1, 3, 128, 128), 0.5), 48) == 128)
    assert thumbnails(torch.rand(1, 3, 16, 16), 48).shape == (1, 3, 16, 16)


def test_a_prompt_outside_the_rollout_is_refused():
    shape = TreeShape.treegrpo(num_steps=4, k=2, w=1, start=0)
    tree, images, rewards, edges = _forest(shape, ["a"])
    with pytest.raises(ValueError, match="out of range"):
        record_tree(tree, edges, images, rewards, ["a"], iteration=1, prompt_index=3)

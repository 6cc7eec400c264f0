"""The shapes-world renderer draws what the prompt says."""

from __future__ import annotations

import pytest
import torch

from treegrpo.worlds.shapes import (BACKGROUNDS, COLOURS, SHAPES, ShapePrompt, all_prompts, parse_prompt, render,
                                    render_batch)


def _alpha(images: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """Shape coverage recovered from pixels: [B, H, W] in [0, 1] (images are exact blends)."""
    fg = torch.tensor([COLOURS[p.colour] for p in prompts]).view(-1, 3, 1, 1)
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts]).view(-1, 3, 1, 1)
    return ((images - bg) * (fg - bg)).sum(1) / ((fg - bg) ** 2).sum(1)


def test_there_are_54_distinct_prompts():
    prompts = all_prompts()
    assert len(prompts) == 54
    assert len({p.text for p in prompts}) == 54
    assert {p.shape for p in prompts} == set(SHAPES)


def test_parse_round_trip_and_clear_error():
    for p in all_prompts():
        assert parse_prompt(p.text) == p
    assert parse_prompt("  A Red Circle on a White background ") == ShapePrompt("red", "circle", "white")
    for bad in ["a purple circle on a white background", "a red hexagon on a black background",
                "a red circle on a pink background", "a photo of a cat"]:
        with pytest.raises(ValueError, match="not a shapes-world prompt"):
            parse_prompt(bad)


def test_border_is_background_and_centre_is_shape_colour():
    prompts = all_prompts() * 4
    images = render_batch(prompts, torch.Generator().manual_seed(0))
    assert images.shape == (len(prompts), 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    bg = torch.tensor([BACKGROUNDS[p.background] for p in prompts])
    fg = torch.tensor([COLOURS[p.colour] for p in prompts])
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # [B, 3, 4]
    assert torch.equal(corners, bg.view(-1, 3, 1).expand_as(corners))
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    exact = (border == bg.view(-1, 3, 1)).all(dim=1).float().mean()
    assert exact > 0.95  # a shape may just touch the border
    # The pixel holding the shape's centroid is fully covered, so it is exactly the shape colour.
    alpha = _alpha(images, prompts)
    ys, xs = torch.meshgrid(torch.arange(16.0) + 0.5, torch.arange(16.0) + 0.5, indexing="ij")
    cy = (alpha * ys).sum((1, 2)) / alpha.sum((1, 2))
    cx = (alpha * xs).sum((1, 2)) / alpha.sum((1, 2))
    centre = images[torch.arange(len(prompts)), :, cy.long(), cx.long()]  # [B, 3]
    assert torch.allclose(centre, fg)


def test_geometry_of_the_three_shapes():
    g = torch.Generator().manual_seed(1)
    n = 8
    fill, top_bottom = {}, {}
    for shape in SHAPES:
        prompts = [ShapePrompt("red", shape, "black")] * n
        alpha = _alpha(render_batch(prompts, g, size=64), prompts)  # fine grid: 12.8-22.4 px radius
        rows, cols = alpha.sum(2), alpha.sum(1)  # [n, 64] row / column widths
        fills, ratios = [], []
        for i in range(n):
            r_idx = torch.nonzero(rows[i] > 0.5)[:, 0]
            c_idx = torch.nonzero(cols[i] > 0.5)[:, 0]
            height, width = len(r_idx), len(c_idx)
            fills.append(alpha[i].sum() / (height * width))
            top = rows[i, r_idx[0] + height // 4]
            bottom = rows[i, r_idx[0] + (3 * height) // 4]
            ratios.append(top / bottom)
        fill[shape], top_bottom[shape] = torch.stack(fills), torch.stack(ratios)
    # A triangle pointing up: a quarter down it is about a third as wide as three quarters down.
    assert (top_bottom["triangle"] < 0.5).all()
    assert ((top_bottom["square"] - 1).abs() < 0.05).all()
    assert ((top_bottom["circle"] - 1).abs() < 0.1).all()
    # The square fills its bounding box, the circle about pi/4 of it, the triangle about half
    # (the box counts partly covered edge pixels, the 0.5-wide cut drops the apex rows).
    assert (fill["square"] > 0.88).all()
    assert ((fill["circle"] - 0.74).abs() < 0.06).all()
    assert ((fill["triangle"] - 0.5).abs() < 0.07).all()
    assert fill["square"].min() > fill["circle"].max() > fill["triangle"].max()


def test_square_fills_more_than_circle_at_16px():
    g = torch.Generator().manual_seed(2)
    mean_fill = {}
    for shape in ("circle", "square"):
        prompts = [ShapePrompt("blue", shape, "white")] * 32
        alpha = _alpha(render_batch(prompts, g), prompts)
        bbox = (alpha.sum(2) > 0.5).sum(1) * (alpha.sum(1) > 0.5).sum(1)
        mean_fill[shape] = (alpha.sum((1, 2)) / bbox).mean()
    assert mean_fill["square"] > mean_fill["circle"] + 0.1


def test_rendering_is_deterministic_for_a_seed():
    prompts = all_prompts()
    a = render_batch(prompts, torch.Generator().manual_seed(7))
    b = render_batch(prompts, torch.Generator().manual_seed(7))
    c = render_batch(prompts, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(render(prompts[3].text, seed=5), render(prompts[3], seed=5))

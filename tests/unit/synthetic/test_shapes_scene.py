"""Scenes and rendering: pixels agree with the stated ground truth."""

import numpy as np
import pytest

from vlmalign.data.synthetic import (COLOURS, Scene, ShapeObject, ShapesConfig, cell_names, render,
                                     sample_scene)
from vlmalign.data.synthetic.scene import _cell_box

CONFIGS = [
    ShapesConfig(),
    ShapesConfig(grid=3, image_size=48, min_objects=1, max_objects=9, jitter=True,
                 object_size=(0.4, 1.0),
                 colours=tuple(COLOURS), shapes=("circle", "square", "triangle", "cross", "diamond")),
    ShapesConfig(image_size=32, jitter=False, object_size=(0.3, 1.0)),
]


def test_cell_names():
    assert cell_names(2) == ["top left", "top right", "bottom left", "bottom right"]
    assert cell_names(3) == ["top left", "top center", "top right", "middle left", "center",
                             "middle right", "bottom left", "bottom center", "bottom right"]
    with pytest.raises(ValueError):
        cell_names(4)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "grid3-all", "small-nojitter"])
def test_rendered_pixels_match_scene(config):
    rng = np.random.default_rng(0)
    bg = np.array(config.background, dtype=np.uint8)
    for _ in range(150):
        scene = sample_scene(rng, config)
        assert config.min_objects <= len(scene.objects) <= config.max_objects
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        assert len({o.cell for o in scene.objects}) == len(scene.objects)
        px = np.asarray(render(scene))
        assert px.shape == (config.image_size, config.image_size, 3)
        covered = np.zeros(px.shape[:2], dtype=bool)
        for o in scene.objects:
            rgb = np.array(COLOURS[o.colour], dtype=np.uint8)
            x, y = o.centre
            assert (px[y, x] == rgb).all(), (o, px[y, x])
            l, t, r, b = o.bbox
            # the bbox lies strictly inside the object's own cell (1-pixel margin: no touching)
            cl, ct, cr, cb = _cell_box(cell_names(config.grid).index(o.cell), config.grid,
                                       config.image_size)
            assert cl < l < r < cr and ct < t < b < cb, (o, (cl, ct, cr, cb))
            box = px[t:b, l:r].reshape(-1, 3)
            is_obj = (box == rgb).all(1)
            assert ((box == bg).all(1) | is_obj).all(), "only object colour and background in bbox"
            assert is_obj.mean() > 0.2, "shape fills a good part of its box"
            covered[t:b, l:r] = True
        assert (px[~covered] == bg).all(), "nothing drawn outside the objects' boxes"
        # count answers: number of distinct object colours visible == colours of the scene
        seen = {tuple(v) for v in px.reshape(-1, 3)} - {tuple(bg)}
        assert seen == {COLOURS[o.colour] for o in scene.objects}


def test_jitter_zero_centres_objects():
    config = ShapesConfig(jitter=0, object_size=(0.75, 0.75))
    scene = sample_scene(np.random.default_rng(1), config)
    for o in scene.objects:
        cl, ct, cr, cb = _cell_box(cell_names(2).index(o.cell), 2, 64)
        l, t, r, b = o.bbox
        assert (l - cl, t - ct) == (cr - r, cb - b) == (4, 4)


def test_render_resize_keeps_colours():
    scene = Scene((ShapeObject("red", "square", "top left", (4, 4, 24, 24)),), grid=2, image_size=64)
    big = np.asarray(render(scene, 128))
    assert big.shape == (128, 128, 3)
    assert (big[28, 28] == COLOURS["red"]).all() and (big[100, 100] == 255).all()


def test_scene_queries_and_json_roundtrip():
    scene = Scene((ShapeObject("blue", "square", "bottom right", (40, 40, 60, 60)),
                   ShapeObject("red", "circle", "top left", (2, 2, 20, 20)),
                   ShapeObject("red", "triangle", "top right", (34, 2, 54, 22))), grid=2)
    assert [o.cell for o in scene.objects] == ["top left", "top right", "bottom right"]  # reading order
    assert scene.count() == 3 and scene.count(shape="circle") == 1 and scene.count(colour="red") == 2
    assert scene.count(shape="cross") == 0
    assert scene.has("red", "circle") and not scene.has("blue", "circle")
    assert scene.object_at("top right").shape == "triangle" and scene.object_at("bottom left") is None
    assert scene.find("blue", "square").cell == "bottom right"
    assert scene.empty_cells == ["bottom left"]
    assert Scene.from_json(scene.to_json()) == scene
    with pytest.raises(ValueError):
        Scene((ShapeObject("red", "circle", "center", (2, 2, 20, 20)),), grid=2)
    with pytest.raises(ValueError):
        Scene((ShapeObject("red", "circle", "top left", (2, 2, 9, 9)),
               ShapeObject("blue", "circle", "top left", (10, 10, 20, 20))), grid=2)


@pytest.mark.parametrize("bad", [
    dict(colours=("red", "mauve")), dict(shapes=("circle", "hexagon")), dict(colours=("red",)),
    dict(grid=4), dict(min_objects=0), dict(min_objects=3, max_objects=2), dict(max_objects=5),
    dict(colours=("red", "blue"), shapes=("circle", "square"), max_objects=4),
    dict(image_size=8), dict(question_types=("colour", "mood")), dict(question_types=()),
    dict(object_size=(0.1, 0.5)), dict(jitter=1.5), dict(jitter=-0.1), dict(train_images=0), dict(ranked_size=1),
    dict(background=(220, 30, 30)),
])
def test_config_rejects(bad):
    with pytest.raises(ValueError):
        ShapesConfig(**bad)


def test_config_roundtrip_and_aliases():
    c = ShapesConfig(question_types=["color", "count"], colours=["red", "blue"])
    assert c.question_types == ("colour", "count") and c.colours == ("red", "blue")
    assert ShapesConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        ShapesConfig.from_dict({"sed": 1})

"""The image root: symlinked image folders work, paths and file links that leave the root are
refused, and a root that does not exist is refused once, up front."""

from __future__ import annotations

import pytest
from data_helpers import draw, dump

from vlmalign.cli.main import main
from vlmalign.data import compute_stats, load_records, validate_file
from vlmalign.data.batching import ImageLoader
from vlmalign.data.images import load_image, resolve_image_path
from vlmalign.data.schema import ImageRef
from vlmalign.errors import DataError


def record(image):
    return {"image": image, "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                              {"from": "gpt", "value": "A."}]}


@pytest.fixture
def cluster(tmp_path):
    """project/train.json with project/images -> ../scratch/coco (a shared image store)."""
    store = tmp_path / "scratch" / "coco"
    draw(store / "a.png")
    draw(store / "sub" / "b.png")
    draw(tmp_path / "secret.png")
    project = tmp_path / "project"
    project.mkdir()
    (project / "images").symlink_to(store, target_is_directory=True)
    return project


def test_symlinked_image_folder_inside_the_root(cluster, capsys):
    path = dump(cluster / "train.json", [record("images/a.png"), record("images/sub/b.png")])
    assert validate_file(path).ok
    assert len(load_records(path).records) == 2
    assert load_image(ImageRef(path="images/sub/b.png"), cluster).size == (8, 8)
    assert main(["data", "validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "2 records, 0 bad"


def test_symlinked_root(cluster):
    path = dump(cluster / "train.json", [record("a.png"), record("sub/b.png")])
    assert validate_file(path, cluster / "images").ok
    # an absolute path through the link names a file inside the root
    assert resolve_image_path(str(cluster / "images" / "a.png"), cluster / "images") == \
        (cluster.parent / "scratch" / "coco" / "a.png").resolve()


@pytest.mark.parametrize("link_in", ["project", "store"])
def test_file_symlink_out_of_the_root_is_refused(cluster, link_in):
    folder = cluster if link_in == "project" else cluster / "images"
    (folder / "evil.png").symlink_to(cluster.parent / "secret.png")
    name = "evil.png" if link_in == "project" else "images/evil.png"
    with pytest.raises(DataError, match="escapes the image root"):
        resolve_image_path(name, cluster)
    path = dump(cluster / "train.json", [record(name)])
    [p] = validate_file(path).problems
    assert (p.index, p.field) == (0, "images[0]") and "escapes the image root" in p.reason


@pytest.mark.parametrize("name", ["../secret.png", "images/../../secret.png",
                                  "images/sub/../../../secret.png"])
def test_dot_dot_out_of_the_root_is_refused(cluster, name):
    with pytest.raises(DataError, match="escapes the image root"):
        resolve_image_path(name, cluster)
    with pytest.raises(DataError, match="escapes the image root"):
        resolve_image_path(str(cluster.parent / "secret.png"), cluster)


def test_missing_root_is_refused_once(tmp_path, capsys):
    path = dump(tmp_path / "d.json", [record(f"{i}.png") for i in range(50)])
    missing = tmp_path / "nope"
    for call in (lambda: validate_file(path, missing), lambda: load_records(path, missing),
                 lambda: compute_stats(path, missing),
                 lambda: ImageLoader(object(), missing)):
        with pytest.raises(DataError, match="image root .*nope.* does not exist"):
            call()
    assert main(["data", "validate", str(path), "--image-root", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "nope" in err and err.startswith("error: ")
    draw(tmp_path / "file.png")
    with pytest.raises(DataError, match="is not a directory"):
        validate_file(path, tmp_path / "file.png")
    assert validate_file(path, missing, check_images=False).ok  # no image is opened


def test_link_to_a_folder_above_the_root_opens_nothing(cluster):
    (cluster / "up").symlink_to(cluster.parent, target_is_directory=True)
    with pytest.raises(DataError, match="escapes the image root"):
        resolve_image_path("up/secret.png", cluster)
    assert resolve_image_path("up/project/images/a.png", cluster).name == "a.png"  # back inside

import os

if os.environ.get("VLMALIGN_TIMM_INNER"):   # the timm side environment: before anything imports torchvision
    from timm_env import allow_torchvision_without_ops
    allow_torchvision_without_ops()

import pytest  # noqa: E402

from vlmalign.data.synthetic import ShapesConfig, generate_shapesworld  # noqa: E402
from vlmalign.methods import logps  # noqa: E402
from vlmalign.models import save_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_logps_notes():
    """methods/logps.py logs each prefix-sharing fallback note once per process; every test starts
    from no notes logged and leaves none behind, so a test that checks for the note does not depend
    on which tests ran before it."""
    logps._warned.clear()
    yield
    logps._warned.clear()


@pytest.fixture(scope="module")
def shapes_llava(tmp_path_factory):
    """A folder with ShapesWorld ``data/`` (8 training and 4 held-out images, one question per
    record with the image after it) and a tiny LLaVA ``model/``: the smallest run of any method."""
    root = tmp_path_factory.mktemp("shapes_llava")
    generate_shapesworld(root / "data", ShapesConfig(seed=0, train_images=8, eval_images=4, image_position="after",
                                                     max_turns=1))
    save_tiny("llava", str(root / "model"))
    return root

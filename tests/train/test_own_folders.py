"""``--dataset folder``: a researcher's own images, DATA_ROOT/<split>/<class>/<image>, trained and evaluated from
the command line like the datasets metasam knows (docs/data.md, "Your own data")."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metasam.cli.main import main

SPLITS = {"train": 5, "val": 3, "test": 3}
TINY = ["--ways", "3", "--shots", "1", "--queries", "1", "--iterations", "2", "--val-every", "2", "--val-tasks", "2",
        "--meta-batch", "2", "--no-progress"]


def make_folders(root: Path, splits=SPLITS, shared_class=None) -> Path:
    """Class folders of 3 small noisy RGB images each; ``shared_class`` puts a class of that name in every split."""
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        names = [f"{split}_{c}" for c in range(n)] + ([shared_class] if shared_class else [])
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            base = rng.integers(0, 256, (12, 12, 3))
            for i in range(3):
                image = np.clip(base + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def test_a_folder_of_ones_own_images_trains_and_evaluates_from_the_cli(tmp_path):
    data, run = make_folders(tmp_path / "data"), tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["dataset"], cfg["train_split"], cfg["val_split"], cfg["test_split"]) == ("folder", "train", "val", "test")
    assert (cfg["inner_lr"], cfg["image_size"], cfg["hidden"]) == (0.01, 84, 32)  # MiniImageNet's standard settings
    assert main(["evaluate", str(run), "--episodes", "4", "--no-progress"]) == 0
    result = json.loads((run / "eval_best_4_seed1234.json").read_text())
    assert result["test_split"] == "test" and len(result["task_accuracies"]) == 4


def test_a_class_in_two_splits_and_a_missing_split_are_refused_before_anything_is_written(tmp_path, capsys):
    data = make_folders(tmp_path / "data", shared_class="cat")
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--out", str(tmp_path / "a")]) == 2
    assert "class 'cat' is in both 'folder:train' and 'folder:val'" in capsys.readouterr().err
    data = make_folders(tmp_path / "data2", splits={"train": 5, "test": 3})
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--val-split val: ImageFolderClasses: folder {data / 'val'} does not exist" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_image_size_and_the_filters_are_flags_and_checked(tmp_path, capsys):
    """--image-size and --hidden reach the data and the model (a smaller Conv-4 on 40×40 images of one's own
    folders); a size four 2×2 poolings cannot take is refused in one line, before anything is written."""
    data, run = make_folders(tmp_path / "data"), tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--image-size", "40", "--hidden", "8",
                 "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["image_size"], cfg["hidden"]) == (40, 8)
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["model"]["kwargs"]["image_size"] == 40
    weights = checkpoint["learner"]["model"]
    assert weights["features.0.weight"].shape == (8, 3, 3, 3) and weights["head.weight"].shape == (3, 8 * 2 * 2)
    capsys.readouterr()
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--image-size", "8",
                 "--out", str(tmp_path / "small")]) == 2
    assert capsys.readouterr().err.strip() == "metasam train: error: --image-size must be an int >= 16, got 8"
    assert not (tmp_path / "small").exists()


def test_a_split_may_be_an_absolute_path_and_resnet12_refuses_a_width(tmp_path, capsys):
    data, run = make_folders(tmp_path / "data"), tmp_path / "run"
    elsewhere = tmp_path / "elsewhere"
    (data / "test").rename(elsewhere)
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--test-split", str(elsewhere),
                 "--out", str(run)]) == 0
    assert main(["evaluate", str(run), "--episodes", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", "folder", "--data-root", str(data), *TINY, "--model", "resnet12",
                 "--hidden", "8", "--out", str(tmp_path / "resnet")]) == 2
    assert "ResNet-12's widths are fixed" in capsys.readouterr().err

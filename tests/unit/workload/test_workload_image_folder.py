"""``image-folder``: a torchvision model by name on class sub-folders of images, with the class
list fixing every label's index on every party."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch
from paths import REPO

from teefl.errors import TeeflError
from teefl.workload.api import Party, RoundInfo
from teefl.workload.resolve import resolve_workload

EXAMPLE = REPO / "examples" / "image-folder"
_spec = importlib.util.spec_from_file_location(
    "examples_image_folder_generate", EXAMPLE / "generate.py"
)
assert _spec is not None and _spec.loader is not None
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)  # by path: both examples have a generate.py
CLASSES = _gen.CLASSES
generate = _gen.generate

# tiny images keep ResNet-18 cheap: these tests are about the plumbing, not the accuracy
OPTIONS = {"model": "resnet18", "classes": CLASSES, "image_size": 8, "batch_size": 8}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    generate(root, ["col1", "col2"], 30, 8, seed=0)
    return root


def workload(**over):
    return resolve_workload("image-folder", {**OPTIONS, **over})


def test_train_and_evaluate(folders):
    w = workload()
    data = w.load(Party("col1", 0, 2, 0, folders / "col1"))
    assert len(data.train) == 24 and len(data.test) == 6  # test_fraction 0.2 of 30
    model = w.build_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = w.train(model, data, RoundInfo(1, 11))
    ev = w.evaluate(model, data)
    assert tr["samples"] == 24 and tr["loss"] > 0
    assert ev["samples"] == 6 and 0 <= ev["accuracy"] <= 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_is_reproducible_from_the_round_seed(folders):
    w = workload(augment=["hflip", "crop"])
    data = w.load(Party("col1", 0, 2, 0, folders / "col1"))
    runs = []
    for seed in (5, 5, 6):
        model = w.build_model(0)
        w.train(model, data, RoundInfo(1, seed))
        runs.append(model.fc.weight.detach().clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_labels_follow_the_stated_classes_not_the_folders_found(folders, tmp_path):
    """A party without 'dots' still numbers 'horizontal' 1 and 'vertical' 2, as its peers do."""
    party = tmp_path / "p"
    for cls in ("horizontal", "vertical"):
        shutil.copytree(folders / "col1" / cls, party / cls)
    w = workload(test_fraction=0.5)
    data = w.load(Party("p", 0, 1, 0, party))
    labels = {data.train.dataset.targets[i] for i in data.train.indices}
    labels |= {data.test.dataset.targets[i] for i in data.test.indices}
    assert labels == {1, 2}


def test_unknown_class_folder_is_an_error(folders, tmp_path):
    shutil.copytree(folders / "col1", tmp_path / "p")
    (tmp_path / "p" / "cats").mkdir()
    with pytest.raises(TeeflError, match=r"class folder\(s\) cats are not among"):
        workload().instance.load(Party("p", 0, 1, 0, tmp_path / "p"))


def test_train_and_test_folders_are_the_splits(folders, tmp_path):
    shutil.copytree(folders / "col1", tmp_path / "p" / "train")
    shutil.copytree(folders / "col2", tmp_path / "p" / "test")
    data = workload().load(Party("p", 0, 1, 0, tmp_path / "p"))
    assert (len(data.train), len(data.test)) == (30, 30)


def test_shard_mode_splits_the_images(folders):
    w = workload()
    parts = [w.load(Party(f"c{i}", i, 3, 0, folders / "col1", data_mode="shard")) for i in range(3)]
    seen = [set(p.train.indices) | set(p.test.indices) for p in parts]
    assert sum(len(s) for s in seen) == 30 and not (seen[0] & seen[1] or seen[1] & seen[2])


def test_model_by_name_seeded_never_downloaded():
    a, b = workload().build_model(4), workload().build_model(4)
    assert a.fc.out_features == 3
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    small = workload(model="mobilenet_v3_small", model_args={"dropout": 0.5}).build_model(0)
    assert small.classifier[-1].out_features == 3


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"model": "resnet9000"}, "workload.options.model: Value error, unknown torchvision"),
        ({"model_args": {"weights": "DEFAULT"}}, "weights are never downloaded"),
        ({"classes": ["a"]}, "workload.options.classes: List should have at least 2 items"),
        ({"classes": ["a", "a"]}, "classes: each class once"),
        ({"std": [0.5, 0, 0.5]}, "workload.options.std: Value error, std must be > 0"),
        ({"augment": ["rotate"]}, "workload.options.augment.0: Input should be 'hflip' or 'crop'"),
    ],
)
def test_option_errors_name_the_key(over, needle):
    with pytest.raises(TeeflError) as exc:
        resolve_workload("image-folder", {**OPTIONS, **over})
    assert needle.replace("Value error, ", "") in str(exc.value)


def test_missing_folder_and_data_dir(tmp_path):
    with pytest.raises(TeeflError, match="pass --data-dir"):
        workload().instance.load(Party("p", 0, 1))
    with pytest.raises(TeeflError, match="image folder not found"):
        workload(subdir="nope").instance.load(Party("p", 0, 1, 0, tmp_path))

"""Users' own datasets: .npz files and image folders written here with numpy and PIL, arrays given to the Python
API, the validation split, and the normalisation statistics. Real file formats, no mocks."""
from __future__ import annotations

import io
import os
import pickle
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from noprop_dist.config import ConfigError, load_config
from noprop_dist.data import (
    DatasetFileError,
    DatasetNotFoundError,
    ImageDataset,
    builtin,
    channel_stats,
    dataset_for,
    files,
    load_dataset,
)

# ---------------------------------------------------------------- helpers


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, c, h, w) whose first pixel holds the image's index, so each image is told apart."""
    x = np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    return x


def _labels(n: int, m: int) -> np.ndarray:
    return (np.arange(n) % m).astype(np.int64)


def _npz_arrays(c: int = 3, h: int = 5, w: int = 7, n=(20, 8), m: int = 4) -> dict[str, np.ndarray]:
    """A valid file's arrays, images NCHW."""
    return {"train_images": _images(n[0], c, h, w, 1), "train_labels": _labels(n[0], m),
            "test_images": _images(n[1], c, h, w, 2), "test_labels": _labels(n[1], m)}


def _one_line(e: BaseException, *parts: str) -> str:
    """The error's message, checked: one line, at most ~300 characters, holding every part."""
    msg = str(e)
    assert "\n" not in msg and len(msg) <= 300, msg
    for p in parts:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def _assert_same(a: ImageDataset, b: ImageDataset) -> None:
    for f in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert a.num_classes == b.num_classes and a.mean == b.mean and a.std == b.std


def _reference_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scaled = x.astype(np.float64) / 255.0
    return scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))


def _save_image(path, pixels: np.ndarray, **kw) -> None:
    """pixels: uint8 (H, W) grey or (H, W, 3) RGB; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **kw)


class _Planted:
    """A pickle payload that would run a shell command (a harmless one: it creates a marker file)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------- npz: layouts and what a file may hold

def test_npz_layouts_give_the_same_nchw_arrays(tmp_path):
    """(N, H, W), (N, H, W, 1) and (N, 1, H, W) of grey images load alike; (N, H, W, 3) and (N, 3, H, W) too."""
    grey = _npz_arrays(c=1)
    layouts = {"nhw": lambda x: x[:, 0], "nhwc": lambda x: x.transpose(0, 2, 3, 1), "nchw": lambda x: x}
    loaded = []
    for i, (tag, to) in enumerate(layouts.items()):
        path = tmp_path / f"grey_{tag}.npz"
        save = np.savez_compressed if i % 2 else np.savez
        save(path, **{k: to(v) if k.endswith("images") else v for k, v in grey.items()})
        loaded.append(load_dataset("npz", path=str(path)))
    for ds in loaded:
        assert ds.image_shape == (1, 5, 7) and ds.train_x.flags["C_CONTIGUOUS"] and ds.train_x.dtype == np.uint8
        np.testing.assert_array_equal(ds.train_x, grey["train_images"])
        np.testing.assert_array_equal(ds.test_x, grey["test_images"])
        assert ds.train_y.dtype == np.int64 and ds.num_classes == 4 and ds.class_names is None
    assert loaded[0].name == "grey_nhw"
    rgb = _npz_arrays(c=3)
    np.savez(tmp_path / "nchw.npz", **rgb)
    np.savez(tmp_path / "nhwc.npz", **{k: v.transpose(0, 2, 3, 1) if k.endswith("images") else v
                                       for k, v in rgb.items()})
    a, b = load_dataset("npz", path=str(tmp_path / "nchw.npz")), load_dataset("npz", path=str(tmp_path / "nhwc.npz"))
    _assert_same(a, b)
    np.testing.assert_array_equal(a.train_x, rgb["train_images"])
    mean, std = _reference_stats(rgb["train_images"])
    np.testing.assert_allclose(a.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(a.std, std, rtol=1e-12)


@pytest.mark.parametrize("shape, what", [((6, 3, 5, 3), "ambiguous"), ((6, 1, 5, 3), "ambiguous"),
                                         ((6, 2, 5, 4), "neither"), ((6, 5), "shape"), ((6, 1, 2, 3, 4), "shape")])
def test_npz_layout_that_is_ambiguous_or_wrong_is_refused(tmp_path, shape, what):
    arrays = _npz_arrays()
    arrays["test_images"] = np.zeros(shape, np.uint8)
    arrays["test_labels"] = _labels(shape[0], 4)
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(path))
    _one_line(e.value, str(path), "test_images", what)


def test_npz_class_names_set_the_number_of_classes(tmp_path):
    arrays = _npz_arrays(m=3)
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays, class_names=np.array(["ant", "bee", "cat", "dog", "elk"]))
    ds = load_dataset("npz", path=str(path))
    assert ds.num_classes == 5 and ds.class_names == ("ant", "bee", "cat", "dog", "elk") and ds.name == "mine"
    arrays["train_labels"][3] = 7
    np.savez(path, **arrays, class_names=np.array(["ant", "bee", "cat", "dog", "elk"]))
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(path))
    assert _one_line(e.value) == f"{path}: train_labels holds 7 outside 0..4 (m = 5 from class_names)"


def test_npz_labels_n_by_1_and_any_integer_type_are_accepted(tmp_path):
    arrays = _npz_arrays()
    path = tmp_path / "a.npz"
    np.savez(path, **arrays)
    np.savez(tmp_path / "b.npz", **arrays | {"train_labels": arrays["train_labels"].astype(np.uint8)[:, None],
                                            "test_labels": arrays["test_labels"].astype(np.int32)[:, None]})
    _assert_same(load_dataset("npz", path=str(path)), load_dataset("npz", path=str(tmp_path / "b.npz")))


def test_npz_val_split_is_the_files_own(tmp_path):
    arrays = _npz_arrays() | {"val_images": _images(6, 3, 5, 7, 3), "val_labels": _labels(6, 4)}
    path = tmp_path / "v.npz"
    np.savez(path, **arrays)
    ds = load_dataset("npz", path=str(path), train_limit=10)
    np.testing.assert_array_equal(ds.val_x, arrays["val_images"])  # limits leave the validation split whole
    split, x, y = ds.eval_split()
    assert split == "val" and x is ds.val_x and y is ds.val_y and len(ds.train_y) == 10


def _bad_npz_cases():
    """name -> (arrays to save (or None: bytes written as they are), the key the message names, what it says)."""
    good = _npz_arrays()
    return {
        "missing key": ({k: v for k, v in good.items() if k != "test_labels"}, "test_labels",
                        "has train_images"),
        "float images": (good | {"train_images": good["train_images"].astype(np.float32) / 255}, "train_images",
                         ".astype(np.uint8)"),
        "int64 images": (good | {"test_images": good["test_images"].astype(np.int64)}, "test_images", "uint8"),
        "rank 2 images": (good | {"train_images": good["train_images"].reshape(20, -1)}, "train_images", "shape"),
        "lengths": (good | {"train_labels": good["train_labels"][:-1]}, "train_labels", "19 labels for the 20"),
        "float labels": (good | {"test_labels": good["test_labels"].astype(np.float64)}, "test_labels", "integers"),
        "bool labels": (good | {"test_labels": good["test_labels"] > 1}, "test_labels", "bool"),
        "labels rank 2": (good | {"train_labels": np.zeros((20, 2), np.int64)}, "train_labels", "(N, 1)"),
        "negative label": (good | {"test_labels": good["test_labels"] - 1}, "test_labels",
                           "holds -1; labels are class indices"),
        "one class": (good | {"train_labels": np.zeros(20, np.int64), "test_labels": np.zeros(8, np.int64)},
                      "m = 1", "at least 2"),
        "val images only": (good | {"val_images": good["test_images"]}, "val_images", "without val_labels"),
        "split shapes": (good | {"test_images": _images(8, 3, 5, 6)}, "test_images", "same"),
        "duplicate class": (good | {"class_names": np.array(["a", "b", "a", "c"])}, "class_names", "twice"),
        "empty class name": (good | {"class_names": np.array(["a", "", "b", "c"])}, "class_names[1]", "non-empty"),
        "byte class names": (good | {"class_names": np.array([b"a", b"b", b"c", b"d"])}, "class_names", "unicode"),
        "header too large": (good | {"train_labels": np.zeros(20, dtype=[(f"field_{i}", "i1") for i in range(800)])},
                             "train_labels", "Header"),
    }


@pytest.mark.parametrize("case", list(_bad_npz_cases()))
def test_a_bad_npz_is_one_line_naming_the_file_and_key(tmp_path, case):
    arrays, key, what = _bad_npz_cases()[case]
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(path))
    _one_line(e.value, str(path), key, what)


@pytest.mark.parametrize("content, what", [
    (b"", "not an .npz archive"),
    (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not an .npz archive"),
    (b"PK\x03\x04" + bytes(100), "not an .npz archive"),  # a zip's magic, then nothing of a zip
    ("truncated", "cannot be read"),
    ("npy", "one .npy array"),
])
def test_npz_that_is_not_an_archive_is_one_line_naming_it(tmp_path, content, what):
    path = tmp_path / "mine.npz"
    if content == "truncated":  # the central directory survives, a member's compressed bytes do not
        buf = io.BytesIO()
        np.savez_compressed(buf, **_npz_arrays())
        raw = bytearray(buf.getvalue())
        raw[200:400] = bytes(200)
        path.write_bytes(bytes(raw))
    elif content == "npy":
        np.save(tmp_path / "one.npy", np.zeros((3, 8, 8), np.uint8))
        os.replace(tmp_path / "one.npy", path)
    else:
        path.write_bytes(content)
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(path))
    _one_line(e.value, str(path), what)


def test_npz_with_pickles_is_refused_without_running_code(tmp_path):
    """Guards: an object array (or a pickle named .npz) loaded with allow_pickle=True would run the command."""
    marker = tmp_path / "pwned"
    planted = tmp_path / "planted.npz"
    planted.write_bytes(pickle.dumps({"train_images": _Planted(marker)}))
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(planted))
    _one_line(e.value, str(planted))
    obj = tmp_path / "obj.npz"
    np.savez(obj, **_npz_arrays() | {"train_labels": np.array([_Planted(marker)] * 20, dtype=object)})
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(obj))
    _one_line(e.value, str(obj), "train_labels", "object array")
    assert not marker.exists(), "loading ran the planted command"


def test_npz_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("npz", path=str(tmp_path / "nope.npz"))
    _one_line(e.value, str(tmp_path / "nope.npz"), "no such file")
    with pytest.raises(DatasetFileError) as e:
        load_dataset("npz", path=str(tmp_path))
    _one_line(e.value, str(tmp_path), "directory")


# ---------------------------------------------------------------- from_arrays

def test_from_arrays_numpy_and_torch_agree():
    arrays = _npz_arrays(c=3)
    nhwc = {k: v.transpose(0, 2, 3, 1) if k.endswith("images") else v for k, v in arrays.items()}
    a = ImageDataset.from_arrays(*nhwc.values(), name="mine", class_names=["a", "b", "c", "d"])
    b = ImageDataset.from_arrays(*(torch.from_numpy(np.ascontiguousarray(v)) for v in arrays.values()),
                                 name="mine", class_names=("a", "b", "c", "d"))
    _assert_same(a, b)
    np.testing.assert_array_equal(a.train_x, arrays["train_images"])
    assert a.name == "mine" and a.class_names == ("a", "b", "c", "d") and a.val_x is None
    assert a.eval_split()[0] == "test" and a.train_x.flags["C_CONTIGUOUS"] and b.train_y.dtype == np.int64


def test_class_names_given_as_numpy_strings_become_plain_strings():
    """Bug seen: list(np.load(f)["class_names"]) holds np.str_, which chain.pt kept and torch.load(weights_only=True)
    then refused: the chain of a run with such names could not be loaded."""
    arrays = _npz_arrays()
    names = list(np.array(["a", "b", "c", "d"]))
    ds = ImageDataset.from_arrays(*arrays.values(), class_names=names)
    assert all(type(n) is str for n in ds.class_names), [type(n) for n in ds.class_names]


@pytest.mark.parametrize("change, arg, what", [
    ({"train_labels": np.array([0, 1] * 10, dtype=np.float32)}, "train_labels", "integers"),
    ({"test_images": _images(8, 3, 5, 7).astype(np.float64)}, "test_images", "uint8"),
    ({"train_images": [[1, 2]]}, "train_images", "numpy array or a torch tensor"),
    ({"val_labels": _labels(4, 4)}, "val_labels", "without val_images"),
    ({"test_labels": torch.tensor([0, 1, 2, 3, 4, 5, 6, -2])}, "test_labels", "holds -2"),
])
def test_from_arrays_names_the_argument(change, arg, what):
    arrays = _npz_arrays() | change
    with pytest.raises(DatasetFileError) as e:
        ImageDataset.from_arrays(arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                                 arrays["test_labels"], val_labels=arrays.get("val_labels"))
    _one_line(e.value, "from_arrays", arg, what)


def test_positional_construction_and_eval_split():
    """benchmarks/gpu_check.py builds one positionally, as before the validation split existed."""
    x, y = _images(10, 1, 4, 4), _labels(10, 2)
    ds = ImageDataset("synthetic", x, y, x[:4], y[:4], 2, (0.5,), (0.25,))
    assert ds.val_x is None and ds.class_names is None and ds.eval_split()[0] == "test"


# ---------------------------------------------------------------- image folders

def _grey(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(root, splits=("train", "test"), classes=("zebra", "ant", "Moose"), per_class=3, rgb=False, size=(6, 5)):
    """PNG images in root/<split>/<class>/; returns {split: [(path, pixels, class)]} in the order they load."""
    out = {}
    for s_i, split in enumerate(splits):
        rows = []
        for c_i, cls in enumerate(sorted(classes)):
            for k in range(per_class):
                pixels = (_rgb if rgb else _grey)(*size, seed=100 * s_i + 10 * c_i + k)
                path = root / split / cls / f"img_{k:02d}.png"
                _save_image(path, pixels)
                rows.append((path, pixels, c_i))
        out[split] = rows
    return out


def test_image_folder_grey_pngs(tmp_path):
    root = tmp_path / "shapes"
    made = _folder(root)
    (root / "train" / "ant" / "README.txt").write_text("not an image: skipped")
    ds = load_dataset("image_folder", path=str(root))
    assert ds.name == "shapes" and ds.class_names == ("Moose", "ant", "zebra") and ds.num_classes == 3
    assert ds.image_shape == (1, 6, 5) and ds.train_x.dtype == np.uint8 and ds.train_x.flags["C_CONTIGUOUS"]
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        np.testing.assert_array_equal(x[:, 0], np.stack([p for _, p, _ in made[split]]))
        np.testing.assert_array_equal(y, [c for _, _, c in made[split]])
    mean, std = _reference_stats(ds.train_x)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-12)
    assert ds.val_x is None


def test_image_folder_rgb_png_and_jpeg_with_grey_replicated(tmp_path):
    root = tmp_path / "mixed"
    made = _folder(root, rgb=True, classes=("a", "b"))
    smooth = np.stack([*np.meshgrid(np.arange(5) * 40, np.arange(6) * 30), np.full((6, 5), 90)], -1).astype(np.uint8)
    _save_image(root / "test" / "b" / "zz_extra.JPG", smooth, quality=95)
    grey = _grey(6, 5, 8)
    _save_image(root / "train" / "a" / "zz_grey.png", grey)
    ds = load_dataset("image_folder", path=str(root))
    assert ds.image_shape == (3, 6, 5) and len(ds.test_y) == 7 and ds.test_y[-1] == 1
    np.testing.assert_array_equal(ds.train_x[:3], np.stack([p for _, p, _ in made["train"][:3]]).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.train_x[3], np.stack([grey] * 3))  # a/zz_grey.png sorts after a/img_*
    jpeg = ds.test_x[-1].transpose(1, 2, 0).astype(int)
    assert np.abs(jpeg - smooth.astype(int)).mean() < 10  # lossy, but the same picture


def test_image_folder_image_size_resizes_every_image(tmp_path):
    root = tmp_path / "sizes"
    _folder(root, classes=("a", "b"), per_class=2)
    odd = root / "train" / "b" / "big.png"
    _save_image(odd, _grey(12, 9, 9))
    with pytest.raises(DatasetFileError) as e:
        load_dataset("image_folder", path=str(root))
    _one_line(e.value, str(odd), "9x12", "data.image_size")
    ds = load_dataset("image_folder", path=str(root), image_size=4)
    assert ds.image_shape == (1, 4, 4)
    with Image.open(odd) as im:
        expected = np.asarray(im.convert("L").resize((4, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ds.train_x[2, 0], expected)  # b/big.png sorts before b/img_*


def test_image_folder_val_folder_is_the_val_split(tmp_path):
    root = tmp_path / "v"
    made = _folder(root, splits=("train", "test", "val"), classes=("a", "b"))
    ds = load_dataset("image_folder", path=str(root))
    np.testing.assert_array_equal(ds.val_x[:, 0], np.stack([p for _, p, _ in made["val"]]))
    assert ds.eval_split()[0] == "val" and ds.val_y.tolist() == [0, 0, 0, 1, 1, 1]


def test_image_folder_progress_lines(tmp_path, monkeypatch):
    root = tmp_path / "p"
    _folder(root, classes=("a", "b"))
    monkeypatch.setattr(files, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    load_dataset("image_folder", path=str(root), log=lines.append)
    assert lines and all(line.startswith(str(root)) and "/12 images decoded" in line for line in lines)


@pytest.mark.parametrize("damage, error, what", [
    ("empty class", DatasetFileError, "empty class folder"),
    ("corrupt", DatasetFileError, "not a readable image"),
    ("truncated", DatasetFileError, "cannot decode"),
    ("unknown test class", DatasetFileError, "train/ lacks"),
    ("no test", DatasetNotFoundError, "no such folder"),
    ("one class", DatasetFileError, "at least 2"),
])
def test_image_folder_damage_is_one_line_naming_it(tmp_path, damage, error, what):
    root = tmp_path / "d"
    _folder(root, classes=("a", "b"))
    named = {"empty class": root / "train" / "c", "corrupt": root / "test" / "a" / "img_01.png",
             "truncated": root / "train" / "b" / "img_00.png", "unknown test class": root / "test" / "c",
             "no test": root / "test", "one class": root / "train"}[damage]
    if damage == "empty class":
        named.mkdir()
        (named / "notes.txt").write_text("no image here")
    elif damage == "corrupt":
        named.write_bytes(b"\x89PNG\r\n" + bytes(50))
    elif damage == "truncated":
        named.write_bytes(named.read_bytes()[:60])  # the header survives, the pixels do not
    elif damage == "unknown test class":
        _save_image(named / "x.png", _grey(6, 5, 0))
    elif damage == "no test":
        for f in sorted(named.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        named.rmdir()
    else:
        for f in sorted((named / "b").iterdir()):
            f.unlink()
        (named / "b").rmdir()
    with pytest.raises(error) as e:
        load_dataset("image_folder", path=str(root))
    _one_line(e.value, str(named), what)


# ---------------------------------------------------------------- the validation split

def _unique_dataset(n=200, m=4) -> tuple[ImageDataset, np.ndarray]:
    """A dataset whose training images are all different (pixel 0 and 1 hold the index), unbalanced classes."""
    x = _images(n, 1, 4, 4)
    x[:, 0, 0, 1] = np.arange(n) // 256
    y = np.minimum(np.arange(n) % 7, m - 1)  # class 3 holds 4/7 of the images
    return ImageDataset.from_arrays(x, y, x[:20], y[:20], name="u"), x


def _index(x: np.ndarray) -> np.ndarray:
    return x[:, 0, 0, 0].astype(int) + 256 * x[:, 0, 0, 1].astype(int)


def test_val_fraction_is_stratified_disjoint_and_fixed_by_the_seed():
    ds, _ = _unique_dataset()
    cfg = load_config(None, ["data.name=arrays", "data.val_fraction=0.25"])
    out = dataset_for(cfg, ds)
    counts = np.bincount(ds.train_y)
    np.testing.assert_array_equal(np.bincount(out.val_y), [round(0.25 * c) for c in counts])
    train_idx, val_idx = _index(out.train_x), _index(out.val_x)
    assert not set(train_idx) & set(val_idx) and len(train_idx) + len(val_idx) == len(ds.train_y)
    assert (np.diff(train_idx) > 0).all() and (np.diff(val_idx) > 0).all()  # both keep the original order
    np.testing.assert_array_equal(out.train_y, ds.train_y[train_idx])
    assert out.eval_split()[0] == "val"
    mean, std = _reference_stats(out.train_x)  # statistics of what trains, not of the whole set
    np.testing.assert_allclose(out.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(out.std, std, rtol=1e-12)
    again = dataset_for(cfg, ds)
    np.testing.assert_array_equal(_index(again.val_x), val_idx)
    other = dataset_for(load_config(None, ["data.name=arrays", "data.val_fraction=0.25", "train.seed=1"]), ds)
    assert not np.array_equal(_index(other.val_x), val_idx)
    np.testing.assert_array_equal(np.bincount(other.val_y), np.bincount(out.val_y))


def test_val_fraction_after_the_limits():
    full = load_dataset("digits")
    ds = load_dataset("digits", train_limit=500, test_limit=100, val_fraction=0.2, seed=3)
    limited = load_dataset("digits", train_limit=500)
    assert len(ds.train_y) + len(ds.val_y) == 500 and len(ds.test_y) == 100 and len(full.train_y) > 500
    np.testing.assert_array_equal(np.bincount(ds.val_y), [round(0.2 * c) for c in np.bincount(limited.train_y)])


def test_val_fraction_beside_an_own_val_split_is_refused(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, **_npz_arrays() | {"val_images": _images(6, 3, 5, 7), "val_labels": _labels(6, 4)})
    with pytest.raises(ConfigError) as e:
        load_dataset("npz", path=str(path), val_fraction=0.1)
    assert _one_line(e.value) == (f"data.val_fraction: {path} has its own validation split (6 images); leave "
                                  "data.val_fraction at 0 to use it")


def test_val_fraction_that_empties_a_class_is_one_line():
    x, y = _images(12, 1, 4, 4), np.array([0] * 10 + [1] * 2)
    ds = ImageDataset.from_arrays(x, y, x, y, class_names=["cat", "dog"])
    with pytest.raises(ConfigError) as e:
        dataset_for(load_config(None, ["data.name=arrays", "data.val_fraction=0.8"]), ds)
    _one_line(e.value, "data.val_fraction", "'dog'")


def test_dataset_for_applies_limits_to_given_arrays_and_refuses_another_name():
    ds, _ = _unique_dataset()
    out = dataset_for(load_config(None, ["data.name=arrays", "data.train_limit=50"]), ds)
    idx = np.random.default_rng(0).permutation(200)[:50]
    np.testing.assert_array_equal(out.train_x, ds.train_x[idx])
    with pytest.raises(ConfigError, match="data.name"):
        dataset_for(load_config(None, ["data.name=digits"]), ds)
    with pytest.raises(ConfigError, match="from_arrays"):
        load_dataset("arrays")


# ---------------------------------------------------------------- BloodMNIST's own val split

def test_bloodmnist_val_split_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "MEDMNIST_DEFAULT_DIR", str(tmp_path / "none"))
    rng = np.random.default_rng(0)
    arrays = {f"{s}_{k}": (rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8) if k == "images"
                           else (np.arange(n) % 8).reshape(n, 1).astype(np.uint8))
              for s, n in (("train", 16), ("val", 8), ("test", 8)) for k in ("images", "labels")}
    np.savez_compressed(tmp_path / "bloodmnist.npz", **arrays)
    ds = load_dataset("bloodmnist", root=str(tmp_path))
    np.testing.assert_array_equal(ds.val_x, arrays["val_images"].transpose(0, 3, 1, 2))
    assert ds.val_y.tolist() == list(range(8)) and ds.eval_split()[0] == "val"
    with pytest.raises(ConfigError, match="bloodmnist has its own validation split"):
        load_dataset("bloodmnist", root=str(tmp_path), val_fraction=0.2)


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("shape", [(50, 3, 9, 11), (3, 1, 700, 600), (1, 3, 1, 1)])
def test_channel_stats_equal_the_float64_reference(shape):
    x = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    x[:, :, 0, 0] = 255  # extremes, so every value of the histogram range is exercised
    mean, std = channel_stats(x)
    ref_mean, ref_std = _reference_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(std, ref_std, rtol=1e-12, atol=1e-15)
    assert all(isinstance(v, float) for v in mean + std)


def test_channel_stats_make_no_float_copy():
    """Guards: the statistics were computed on x.astype(np.float64), a copy 8x the size of the uint8 images
    (8.8 GiB for BloodMNIST-128)."""
    x = np.random.default_rng(2).integers(0, 256, (1000, 3, 100, 100), dtype=np.uint8)  # 30 MB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        channel_stats(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * x.nbytes, f"peak {peak / 1e6:.1f} MB for {x.nbytes / 1e6:.1f} MB of images"


# ---------------------------------------------------------------- digits, unchanged by the move

def test_digits_unchanged():
    """The arrays and statistics load_dataset("digits") gave before the move: the split rule and float64 stats."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(0)
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        is_test[idx[: round(0.2 * len(idx))]] = True
    for limit, ds in ((None, load_dataset("digits")), (300, load_dataset("digits", train_limit=300))):
        trx, try_ = x[~is_test], y[~is_test]
        if limit:
            keep = np.random.default_rng(0).permutation(len(try_))[:limit]
            trx, try_ = trx[keep], try_[keep]
        np.testing.assert_array_equal(ds.train_x, trx)
        np.testing.assert_array_equal(ds.train_y, try_)
        np.testing.assert_array_equal(ds.test_x, x[is_test])
        np.testing.assert_array_equal(ds.test_y, y[is_test])
        mean, std = _reference_stats(trx)
        np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(ds.std, std, rtol=1e-12)
        assert ds.num_classes == 10 and ds.val_x is None and ds.name == "digits"


# ---------------------------------------------------------------- the CLI: a bad file is one line, exit 2

def _bad_npz(tmp_path) -> tuple[list[str], str]:
    bad = tmp_path / "bad.npz"
    np.savez(bad, **_npz_arrays() | {"train_images": np.zeros((20, 5, 7, 3), np.float32)})
    return ["data.name=npz", f"data.path={bad}"], "train_images"


def _bad_folder(tmp_path) -> tuple[list[str], str]:
    root = tmp_path / "imgs"
    _folder(root, classes=("a", "b"))
    (root / "test" / "b" / "img_01.png").write_bytes(b"not a png")
    return ["data.name=image_folder", f"data.path={root}"], "img_01.png"


def _arrays_name(tmp_path) -> tuple[list[str], str]:
    return ["data.name=arrays"], "Python API"


@pytest.mark.parametrize("make", [_bad_npz, _bad_folder, _arrays_name])
def test_cli_bad_data_exits_2_with_one_line_and_no_run_dir(tmp_path, capsys, make):
    from noprop_dist.run import main

    sets, named = make(tmp_path)
    rc = main(["--set", *sets, f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and named in err[0], err
    assert not (tmp_path / "run").exists()

"""folder, webdataset and hf formats, on tiny generated fixtures."""

import io
import json
import logging
import os
import tarfile

import pytest
import torch
from PIL import Image

from pocketdit.data import build_dataset, collate
from pocketdit.data.folder import ImageFolderDataset
from pocketdit.data.hf import HFImageDataset
from pocketdit.data.transforms import BadSampleError, preprocess, resize_and_crop
from pocketdit.data.webdataset import WebDatasetShards

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _png(colour, size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _expected(colour):
    return torch.tensor(colour, dtype=torch.float32) / 127.5 - 1


# ---------------------------------------------------------------------------------------------- transforms


def test_resize_shorter_side_then_center_crop():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white left sixth is cropped away
    out = resize_and_crop(image, 10)
    assert out.size == (10, 10)
    tensor = preprocess(image, 10)
    assert tensor.shape == (3, 10, 10) and torch.allclose(tensor, torch.full_like(tensor, -1.0))
    squashed = preprocess(image, 10, center_crop=False)
    assert squashed[:, :, 0].mean() > 0.9  # not cropped: the white quarter is still there


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert torch.allclose(preprocess(image, 8), torch.ones(3, 8, 8))


# -------------------------------------------------------------------------------------------------- folder


def _txt_folder(root):
    os.makedirs(root / "sub")
    (root / "red.png").write_bytes(_png(COLOURS["red"]))
    (root / "red.txt").write_text("a red square\n")
    (root / "sub" / "green.png").write_bytes(_png(COLOURS["green"]))
    (root / "sub" / "green.txt").write_text("a green square")
    (root / "blue.png").write_bytes(_png(COLOURS["blue"]))  # no caption
    (root / "broken.png").write_bytes(_png(COLOURS["red"])[:40])  # truncated
    (root / "broken.txt").write_text("a broken image")
    return root


def test_folder_txt_captions_and_skips(tmp_path, caplog):
    root = _txt_folder(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(root, resolution=8)
    assert ds.skipped == 1 and "blue.png" in ds.skipped_items[0][0] and "missing caption" in ds.skipped_items[0][1]
    assert "blue.png" in caplog.text
    assert len(ds) == 3  # broken.png is only found when loaded
    samples = {ds[i]["caption"]: ds[i] for i in range(len(ds))}
    assert set(samples) == {"a red square", "a green square"}  # the broken item falls through to the next
    assert ds.skipped == 2 and any("broken.png" in p and "broken image" in r for p, r in ds.skipped_items)
    red = samples["a red square"]["image"]
    assert red.shape == (3, 8, 8) and torch.allclose(red[:, 4, 4], _expected(COLOURS["red"]), atol=1e-5)


def test_folder_verify_images_finds_broken_up_front(tmp_path):
    ds = ImageFolderDataset(_txt_folder(tmp_path / "imgs"), resolution=8, verify_images=True)
    assert len(ds) == 2 and ds.skipped == 2


def test_folder_raise_names_path_and_problem(tmp_path):
    root = _txt_folder(tmp_path / "imgs")
    with pytest.raises(BadSampleError, match=r"blue\.png.*missing caption"):
        ImageFolderDataset(root, on_error="raise")
    os.remove(root / "blue.png")
    ds = ImageFolderDataset(root, resolution=8, on_error="raise")
    broken = [i for i in range(len(ds)) if ds.items[i][0].endswith("broken.png")][0]
    with pytest.raises(BadSampleError, match=r"broken\.png.*broken image"):
        ds[broken]


def test_folder_metadata_jsonl(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("red", "green"):
        (root / f"{name}.png").write_bytes(_png(COLOURS[name]))
    (root / "red.txt").write_text("ignored: metadata wins")
    lines = [
        {"file_name": "red.png", "text": "a red thing"},
        {"file_name": "green.png", "text": "a green thing"},
        {"file_name": "gone.png", "text": "missing file"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(l) for l in lines))
    ds = build_dataset("folder", root=str(root), resolution=8)
    assert sorted(ds[i]["caption"] for i in range(len(ds))) == ["a green thing", "a red thing"]
    assert ds.skipped == 1 and "gone.png" in ds.skipped_items[0][0]
    (root / "metadata.jsonl").write_text('{"file_name": "red.png", "text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2"):
        ImageFolderDataset(root)


def test_folder_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="on_error"):
        ImageFolderDataset(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="no usable captioned images"):
        ImageFolderDataset(tmp_path)


# --------------------------------------------------------------------------------------------- webdataset


def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _shards(tmp_path):
    _write_shard(tmp_path / "shard-000.tar", [
        ("000.png", _png(COLOURS["red"])), ("000.txt", b"a red square"),
        ("001.jpg", _png(COLOURS["green"])), ("001.json", json.dumps({"caption": "a green square"}).encode()),
    ])
    _write_shard(tmp_path / "shard-001.tar", [
        ("002.png", _png(COLOURS["blue"])),  # no caption
        ("003.png", b"not an image"), ("003.txt", b"broken"),
        ("004.txt", b"caption without image"),
        ("005.webp", _png(COLOURS["blue"])), ("005.txt", b"a blue square"),
    ])
    return str(tmp_path / "shard-{000..001}.tar")


def test_webdataset_reads_shards_and_skips(tmp_path, caplog):
    ds = build_dataset("webdataset", urls=_shards(tmp_path), resolution=8)
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    assert [s["caption"] for s in samples] == ["a red square", "a green square", "a blue square"]
    assert samples[0]["meta"]["key"] == "000" and samples[0]["meta"]["shard"].endswith("shard-000.tar")
    assert torch.allclose(samples[2]["image"][:, 0, 0], _expected(COLOURS["blue"]), atol=1e-5)
    assert ds.skipped == 3
    reasons = " ".join(f"{p} {r}" for p, r in ds.skipped_items)
    assert "shard-001.tar:002 missing caption" in reasons and "003.png broken image" in reasons
    assert "004 no image member" in reasons and "shard-001.tar:002" in caplog.text
    batch = collate(samples)
    assert batch["image"].shape == (3, 3, 8, 8)


def test_webdataset_raise_and_missing_shard(tmp_path):
    pattern = _shards(tmp_path)
    with pytest.raises(BadSampleError, match=r"shard-001\.tar:002: missing caption"):
        list(WebDatasetShards(pattern, resolution=8, on_error="raise"))
    with pytest.raises(FileNotFoundError, match="shards not found"):
        WebDatasetShards(str(tmp_path / "shard-{000..002}.tar"))
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        list(WebDatasetShards([str(tmp_path / "bad.tar")]))


def test_webdataset_workers_split_shards(tmp_path):
    ds = WebDatasetShards(_shards(tmp_path), resolution=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    assert sorted(s["caption"] for s in loader) == ["a blue square", "a green square", "a red square"]


# ------------------------------------------------------------------------------------------------------ hf


def test_hf_save_to_disk(tmp_path):
    import datasets

    images = [Image.open(io.BytesIO(_png(COLOURS[c]))) for c in ("red", "green", "blue")]
    table = datasets.Dataset.from_dict(
        {"image": images, "caption": ["a red square", "", "a blue square"]}
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"caption_column='text'.*columns: \['image', 'caption'\]"):
        HFImageDataset(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"split='test'.*\['train'\]"):
        HFImageDataset(str(tmp_path / "dd"), caption_column="caption", split="test")
    ds = build_dataset("hf", path=str(tmp_path / "dd"), caption_column="caption", resolution=8)
    assert len(ds) == 3
    assert ds[1]["caption"] == "a blue square"  # row 1 has an empty caption: skipped, next row used
    assert ds.skipped == 1 and "row 1" in ds.skipped_items[0][0]
    red = ds[0]["image"]
    assert torch.allclose(red[:, 3, 3], _expected(COLOURS["red"]), atol=1e-5)
    with pytest.raises(BadSampleError, match="row 1.*missing caption"):
        HFImageDataset(str(tmp_path / "dd"), caption_column="caption", on_error="raise")[1]


def test_hf_imagefolder(tmp_path):
    train = tmp_path / "folder" / "train"
    train.mkdir(parents=True)
    (train / "red.png").write_bytes(_png(COLOURS["red"]))
    (train / "green.png").write_bytes(_png(COLOURS["green"]))
    (train / "metadata.jsonl").write_text(
        json.dumps({"file_name": "red.png", "text": "a red square"}) + "\n"
        + json.dumps({"file_name": "green.png", "text": "a green square"}) + "\n"
    )
    ds = HFImageDataset(str(tmp_path / "folder"), resolution=8)
    assert sorted(ds[i]["caption"] for i in range(2)) == ["a green square", "a red square"]
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        HFImageDataset(str(tmp_path / "missing_dir"))

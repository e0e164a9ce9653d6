"""Image files: decoded as uint8 RGB, sizes from headers as (height, width), one-line errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kacli.data.images import image_size, load_image
from kacli.errors import KacliError


def textured(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_load_image(tmp_path):
    arr = textured(12, 17).permute(1, 2, 0).numpy()
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.bmp")
    Image.fromarray(arr[:, :, 0]).save(tmp_path / "gray.png")
    for name in ("a.png", "a.bmp"):
        img = load_image(tmp_path / name)
        assert img.dtype == torch.uint8 and img.shape == (3, 12, 17)
        assert torch.equal(img, torch.from_numpy(arr).permute(2, 0, 1))
    gray = load_image(tmp_path / "gray.png")
    assert gray.shape == (3, 12, 17) and torch.equal(gray[0], gray[2])
    with pytest.raises(KacliError, match="image not found") as e:
        load_image(tmp_path / "missing.jpg")
    assert e.value.path == str(tmp_path / "missing.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(KacliError, match="not a readable image") as e:
        load_image(tmp_path / "text.png")
    assert e.value.path == str(tmp_path / "text.png")


def test_image_size_is_height_then_width_and_fails_like_load_image(tmp_path):
    Image.new("RGB", (17, 12)).save(tmp_path / "wide.png")  # PIL sizes are (width, height)
    assert image_size(tmp_path / "wide.png") == (12, 17) == tuple(load_image(tmp_path / "wide.png").shape[1:])
    with pytest.raises(KacliError, match="image not found") as e:
        image_size(tmp_path / "missing.jpg")
    assert e.value.path == str(tmp_path / "missing.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(KacliError, match=r"not a readable image \(UnidentifiedImageError\)") as e:
        image_size(tmp_path / "text.png")
    assert e.value.path == str(tmp_path / "text.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(KacliError, match="image path is not a file"):
        image_size(tmp_path / "folder.png")


def test_the_readers_form_no_import_circle():
    """The shared helpers sit in leaf modules: kacli.data.images imports nothing of kacli.data, and
    the VOC and YOLO readers import nothing of kacli.data.readers (which imports them)."""
    import ast
    from pathlib import Path

    import kacli.data.images
    import kacli.data.voc
    import kacli.data.yolo

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imported(kacli.data.images) if m.startswith("kacli.data")}
    for reader in (kacli.data.voc, kacli.data.yolo):
        assert "kacli.data.readers" not in imported(reader)

"""`massmerge predict` on a CLIP image artifact: image files, folders and path lists, in input order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import build_tiny_clip_artifact

from massmerge.artifact import load
from massmerge.cli import main
from massmerge.data.images import preprocess_for as image_preprocess


@pytest.fixture(scope="module")
def clip_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("clip_predict")
    build_tiny_clip_artifact(root)
    images = root / "images"
    gen = torch.Generator().manual_seed(9)
    for i in range(5):
        (images / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = (torch.rand(36 + i, 44, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"sub{i % 2}" / f"img{i}.png")
    return root / "art", images


def _predict(args: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    main(["predict", *args])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_a_folder_matches_the_loaded_model(clip_artifact, capsys) -> None:
    art, images = clip_artifact
    rows = _predict([str(art), str(images), "--batch-size", "2"], capsys)
    paths = sorted(images.rglob("*.png"))
    assert [r["input"] for r in rows] == [str(p) for p in paths] and [r["index"] for r in rows] == list(range(1, 6))
    model = load(art)
    preprocess = image_preprocess(model, art / "model")
    pixels = torch.stack([preprocess(Image.open(p)) for p in paths])
    assert pixels.shape[-1] == 32  # the tiny model's own image size
    out = model({"pixel_values": pixels})
    names = model.manifest.task_names
    assert [r["task"] for r in rows] == [names[t] for t in out.task.tolist()]
    assert [r["label"] for r in rows] == out.label.tolist()
    for r in rows:
        assert r["class"] == f"c{r['task'][-1]}_{r['label']}" and r["task"] in r["selected"]


def test_predict_one_image_and_a_path_list(clip_artifact, capsys, tmp_path) -> None:
    art, images = clip_artifact
    paths = sorted(images.rglob("*.png"))
    single = _predict([str(art), str(paths[3])], capsys)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p.relative_to(images)) for p in reversed(paths)) + "\n")
    (tmp_path / "sub0").symlink_to(images / "sub0")
    (tmp_path / "sub1").symlink_to(images / "sub1")
    listed = _predict([str(art), str(listing), "--batch-size", "4"], capsys)
    assert len(single) == 1 and len(listed) == 5
    for key in ("task", "label", "class", "selected"):
        assert listed[1][key] == single[0][key]
    assert listed[1]["probs"] == pytest.approx(single[0]["probs"], abs=1e-5)  # batch size moves the last digit


def test_bad_image_inputs_are_one_line_errors(clip_artifact, capsys, tmp_path) -> None:
    art, _ = clip_artifact
    (tmp_path / "empty").mkdir()
    (tmp_path / "list.txt").write_text("nope.png\n")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for inputs, message in [(tmp_path / "empty", "no image files"), (tmp_path / "list.txt", "nope.png' does not exist"),
                            (tmp_path / "broken.png", "not a readable image"), (tmp_path / "gone", "no such")]:
        with pytest.raises(SystemExit) as exc:
            main(["predict", str(art), str(inputs)])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert exc.value.code == 2 and last.startswith("error: ") and message in last and "Traceback" not in err

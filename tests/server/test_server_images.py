"""``massmerge serve`` on a CLIP image artifact: base64 images in, predict's rows out; bad images one line."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import build_tiny_clip_artifact

from massmerge.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from server_fixtures import serving


@pytest.fixture(scope="module")
def clip_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("serve_clip")
    build_tiny_clip_artifact(root)
    gen = torch.Generator().manual_seed(9)
    (root / "images").mkdir()
    paths = []
    for i in range(5):
        pixels = (torch.rand(36 + i, 44, 3, generator=gen) * 255).to(torch.uint8).numpy()
        paths.append(root / "images" / f"img{i}.{'png' if i % 2 else 'jpg'}")
        Image.fromarray(pixels).save(paths[-1])
    return root / "art", paths


def test_base64_images_get_predicts_rows_and_bad_ones_are_named(clip_artifact, capsys):
    art, paths = clip_artifact
    capsys.readouterr()
    main(["predict", str(art), str(paths[0].parent)])
    expected = {Path(row.pop("input")).name: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    encoded[1] = "data:image/png;base64," + encoded[1]  # a data: URL is accepted too
    with serving(art) as server:
        answer = server.client.post("/v1/predict", json={"inputs": encoded})
        assert answer.status_code == 200, answer.text
        for path, row in zip(paths, answer.json()["predictions"]):
            want = expected[path.name]
            assert (row["task"], row["label"], row["class"], row["selected"]) == \
                (want["task"], want["label"], want["class"], want["selected"])
            assert row["probs"] == pytest.approx(want["probs"], abs=1e-5)
        broken = base64.b64encode(b"not an image").decode()
        bad = server.client.post("/v1/predict", json={"inputs": [encoded[0], broken]})
        assert bad.status_code == 422 and bad.json()["error"].startswith("inputs[1]: not a decodable image")
        garbled = server.client.post("/v1/predict", json={"inputs": ["%%%not base64"]})
        assert garbled.status_code == 422 and garbled.json()["error"].startswith("inputs[0]: not base64")
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format="PNG")
        small = server.client.post("/v1/predict", json={"inputs": [base64.b64encode(buffer.getvalue()).decode()]})
        assert small.status_code == 200 and len(small.json()["predictions"]) == 1

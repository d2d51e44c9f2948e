"""A base that came sharded stays sharded in the artifact: ``massmerge build`` of a tiny Flan-T5 base saved by
``save_pretrained(max_shard_size=...)`` writes ``model/`` as transformers does (shards + index, each shard listed
with size and sha256), ``load`` rebuilds the model from the shards and generates what the unsharded artifact
generates, ``save_artifact(load(x))`` writes ``x`` again, and a hostile index is one line naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from glue_fixtures import SENTENCES, save_full_expert, widened_base

from massmerge.artifact import load, read_manifest, save_artifact
from massmerge.artifact.save import shard_plan
from massmerge.artifact.verify import sha256_file
from massmerge.checkpoints import largest_shard_bytes
from massmerge.cli import main
from massmerge.errors import MassMergeError

transformers = pytest.importorskip("transformers")
INDEX = "model/model.safetensors.index.json"
SHARD_SIZE = "8KB"  # the tiny T5 is ~60 KB: several shards


def sharded_copy(base: Path, out: Path) -> Path:
    """``base`` saved again by transformers in shards, its config and tokenizer files as they were."""
    model = transformers.T5ForConditionalGeneration.from_pretrained(base)
    model.save_pretrained(out, max_shard_size=SHARD_SIZE)
    for file in base.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copyfile(file, out / file.name)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    base = widened_base(root)
    sharded = sharded_copy(base, root / "sharded")
    experts = [str(save_full_expert(base, root / f"full_{t}", 10 + i, scale=1.5)) for i, t in enumerate("abc")]
    out = {"base": base, "sharded_base": sharded}
    for name, source in (("one", base), ("sharded", sharded)):
        main(["build", "--base", str(source), "--experts", *experts, "--task-names", "a", "b", "c",
              "--output", str(root / f"art_{name}"), "--max-size", "0"])
        out[name] = root / f"art_{name}"
    return out


def test_a_sharded_base_is_kept_as_shards_each_listed(built) -> None:
    art = built["sharded"]
    manifest = read_manifest(art)
    index = json.loads((art / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert manifest.base.file == INDEX and len(shards) > 1 and not (art / "model" / "model.safetensors").exists()
    assert manifest.base.max_shard_bytes == largest_shard_bytes(built["sharded_base"])
    for name in shards:
        entry = manifest.files[f"model/{name}"]
        assert entry.bytes == (art / "model" / name).stat().st_size and entry.sha256 == sha256_file(art / "model" / name)
    assert set(index["metadata"]) == {"total_parameters", "total_size"}
    # every shard within the limit unless a single tensor is bigger; the unsharded base stays one file
    for name in shards:
        keys = [k for k, v in index["weight_map"].items() if v == name]
        from safetensors import safe_open

        with safe_open(str(art / "model" / name), "pt") as handle:
            assert sorted(handle.keys()) == sorted(keys)
            size = sum(handle.get_tensor(k).nbytes for k in keys)
        assert size <= manifest.base.max_shard_bytes or len(keys) == 1
    assert read_manifest(built["one"]).base.file == "model/model.safetensors"
    assert read_manifest(built["one"]).base.max_shard_bytes is None


def test_load_rebuilds_from_the_shards_and_generates_as_the_unsharded_artifact(built) -> None:
    one, sharded = load(built["one"]), load(built["sharded"])
    for key, value in one.model.state_dict().items():
        assert torch.equal(value, sharded.model.state_dict()[key]), key
    tok = transformers.AutoTokenizer.from_pretrained(built["sharded"] / "model")
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    a = one.generate(batch, max_new_tokens=6)
    b = sharded.generate(batch, max_new_tokens=6)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.routing.selected, b.routing.selected)
    # transformers itself reads the artifact's index (plain HF generate of the base)
    plain_one = transformers.T5ForConditionalGeneration.from_pretrained(built["one"] / "model").eval()
    plain_sharded = transformers.T5ForConditionalGeneration.from_pretrained(built["sharded"] / "model").eval()
    assert torch.equal(plain_one.generate(**batch, max_new_tokens=6), plain_sharded.generate(**batch, max_new_tokens=6))


def test_save_of_a_loaded_sharded_artifact_writes_it_again(built, tmp_path) -> None:
    save_artifact(load(built["sharded"]), tmp_path / "again")
    first, second = (json.loads((d / "manifest.json").read_text()) for d in (built["sharded"], tmp_path / "again"))
    assert first == second
    for name in first["files"]:
        assert (tmp_path / "again" / name).read_bytes() == (built["sharded"] / name).read_bytes(), name


def test_shard_plan_is_transformers_split() -> None:
    state = {"a": torch.zeros(4), "b": torch.zeros(4), "big": torch.zeros(40), "c": torch.zeros(2),
             "d": torch.zeros(4)}
    assert shard_plan(state, 32) == [["big"], ["a", "b"], ["c", "d"]]  # 16 + 16; 8 + 16; big alone, where it came
    assert shard_plan(state, 10_000) == [list(state)]


# ----- hostile sharded artifacts: one line naming the file --------------------------------------------------------

def hostile(built: dict[str, Path], tmp_path: Path, change) -> Path:
    """A copy of the sharded artifact, ``change(dir, manifest, index)`` applied; the index's manifest entry
    re-hashed so the checksum passes and the index's content is what is judged."""
    art = tmp_path / "hostile"
    shutil.copytree(built["sharded"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    index = json.loads((art / INDEX).read_text())
    change(art, manifest, index)
    (art / INDEX).write_text(json.dumps(index))
    manifest["files"][INDEX] = {"sha256": sha256_file(art / INDEX), "bytes": (art / INDEX).stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))
    return art


def first_shard(index: dict) -> tuple[str, str]:
    key = next(iter(index["weight_map"]))
    return key, index["weight_map"][key]


def point_at(name: str):
    def change(art: Path, manifest: dict, index: dict) -> None:
        key, _ = first_shard(index)
        index["weight_map"][key] = name
    return change


def drop_shard(art: Path, manifest: dict, index: dict) -> None:
    _, shard = first_shard(index)
    (art / "model" / shard).unlink()
    manifest["files"].pop(f"model/{shard}")


def unnamed_shard(art: Path, manifest: dict, index: dict) -> None:
    _, shard = first_shard(index)
    for key, value in list(index["weight_map"].items()):
        if value == shard:
            del index["weight_map"][key]


def single_beside(art: Path, manifest: dict, index: dict) -> None:
    shutil.copyfile(art / "model" / first_shard(index)[1], art / "model" / "model.safetensors")
    manifest["files"]["model/model.safetensors"] = {"sha256": sha256_file(art / "model" / "model.safetensors"),
                                                    "bytes": (art / "model" / "model.safetensors").stat().st_size}


def tensor_moved(art: Path, manifest: dict, index: dict) -> None:
    """The index puts a tensor in another (real, listed) shard than the one holding it."""
    key, shard = first_shard(index)
    other = next(v for v in index["weight_map"].values() if v != shard)
    index["weight_map"][key] = other


def no_limit(art: Path, manifest: dict, index: dict) -> None:
    manifest["base"]["max_shard_bytes"] = None


@pytest.mark.parametrize(("change", "fragments"), [
    (point_at("../factors.safetensors"), [INDEX, "'../factors.safetensors'", "not a file inside model/"]),
    (point_at("/etc/model-00001-of-00002.safetensors"), [INDEX, "not a file inside model/"]),
    (point_at("sub/model-00001-of-00002.safetensors"), [INDEX, "not a file inside model/"]),
    (point_at("config.json"), [INDEX, "'config.json'", "not a shard file name"]),
    (point_at("model-00009-of-00009.safetensors"), ["model/model-00009-of-00009.safetensors", "missing"]),
    (drop_shard, ["model/model-0000", "missing"]),
    (unnamed_shard, ["model/model-0000", "does not name"]),
    (single_beside, ["manifest.json", "model/model.safetensors", "beside the shard index"]),
    (tensor_moved, ["model/model-0000", "is missing (the index puts it in this shard)"]),
    (no_limit, ["manifest.json", "base.max_shard_bytes"]),
])
def test_a_hostile_shard_index_is_one_line_naming_the_file(built, tmp_path, change, fragments) -> None:
    art = hostile(built, tmp_path, change)
    with pytest.raises(MassMergeError) as info:
        load(art)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)

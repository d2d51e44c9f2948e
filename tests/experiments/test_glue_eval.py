"""FusionBench's GLUE scoring on hand-checkable cases, our generation against FusionBench's call, and
`massmerge evaluate` on the offline replica of Flan-T5 + FusionBench's experts + nyu-mll/glue."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from glue_fixtures import build_hub, glue_config, save_base, save_glue

from massmerge.experiments import glue_metrics as gm
from massmerge.experiments.evaluate_config import parse_benchmark_config
from massmerge.experiments.generation_eval import decoded_targets, generate_texts, methods_of, summarize

# ----- scoring -------------------------------------------------------------------------------------------------


def test_exact_match_is_the_raw_string() -> None:
    score = gm.score_task("rte", ["yes", "no", "yes ", "Yes"], ["yes", "yes", "yes", "yes"])
    assert (score.metric, score.value, score.count) == ("accuracy", 0.25, 4)


def test_spearman_by_hand() -> None:
    # ranks of x: 1, 2, 3, 4; of y: 2, 1, 4, 3 -> d^2 = 4 -> rho = 1 - 6*4/(4*15) = 0.6
    assert gm.spearman([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0])[0] == pytest.approx(0.6)
    assert gm.spearman([1, 2, 3], [3, 2, 1])[0] == pytest.approx(-1.0)
    assert list(gm.ranks([10.0, 20.0, 20.0, 5.0])) == [2.0, 3.5, 3.5, 1.0]  # ties: the average rank


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (50,), generator=gen).double().tolist()  # many ties
    y = (torch.rand(50, generator=gen) * 5).tolist()
    assert gm.spearman(x, y)[0] == pytest.approx(float(stats.spearmanr(x, y)[0]), abs=1e-12)


def test_unparseable_outputs_count_as_zero() -> None:
    score = gm.score_task("stsb", ["4.0", "oops", "1.0", "2.5"], ["5.0", "0.2", "1.2", "3.0"])
    # outputs 4, 0, 1, 2.5 against 5, 0.2, 1.2, 3: the same order -> rho 1
    assert score.metric == "spearman" and score.value == pytest.approx(1.0) and score.parsed == 3


def test_undefined_spearman_is_none_with_a_reason() -> None:
    none = gm.score_task("stsb", ["no", "idea", "x"], ["1.0", "2.0", "3.0"])
    assert none.value is None and "no output parses" in none.note
    constant = gm.score_task("stsb", ["3.0", "3.0", "3.0"], ["1.0", "2.0", "3.0"])
    assert constant.value is None and "constant" in constant.note
    nan = gm.score_task("stsb", ["nan", "1.0", "2.0"], ["1.0", "2.0", "3.0"])
    assert nan.value is None and "NaN" in nan.note
    row = summarize({"rte": {"value": 0.5, "metric": "accuracy", "count": 2},
                     "stsb": none.as_dict()}, {"rte": {"value": 1.0}, "stsb": {"value": 0.8}})
    assert row["avg"] is None and row["avg_defined"] == 0.5 and row["normalized"] == {"rte": 0.5}
    json.dumps(row, allow_nan=False)


# ----- generation as FusionBench runs it ----------------------------------------------------------------------


def test_generation_equals_fusion_bench_call(tmp_path: Path) -> None:
    """Ours: batches with the tokenizer's attention mask. FusionBench's: ``generate(input_ids, max_length=10)``
    on the whole padded input_ids, with the mask transformers 4.x inferred from the pad id (5.x no longer infers
    it for encoder-decoders: see massmerge.data.glue), and its label round trip. Same strings, same targets."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from massmerge.data.glue import read_glue_split

    base = save_base(tmp_path / "base")
    data = read_glue_split(save_glue(tmp_path / "glue", rows=5, tasks=("mnli",)), "mnli")
    tok = AutoTokenizer.from_pretrained(base)
    model = T5ForConditionalGeneration.from_pretrained(base).eval()
    ours = generate_texts(model, tok, data.prompts, batch_size=2)
    enc = tok(data.prompts, padding="max_length", truncation=True, return_tensors="pt")
    labels = tok(data.targets, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    with torch.no_grad():
        inferred = enc["input_ids"].ne(tok.pad_token_id).long()
        theirs = tok.batch_decode(model.generate(enc["input_ids"], attention_mask=inferred, max_length=10),
                                  skip_special_tokens=True)
    kept = [[t for t in row.tolist() if t not in tok.all_special_ids and t > 0] for row in labels]
    assert ours == theirs and any(ours)
    assert decoded_targets(tok, data.targets) == tok.batch_decode(kept, skip_special_tokens=True) == data.targets


# ----- the config and the end-to-end run ---------------------------------------------------------------------


def test_smile_and_mass_run_by_default(tmp_path: Path) -> None:
    raw = glue_config(("cola", "rte"), output=tmp_path)
    assert methods_of(parse_benchmark_config({k: v for k, v in raw.items() if k != "methods"})) == [
        "zeroshot", "experts", "task_arithmetic", "ties", "tsv_m", "smile", "mass"]
    assert methods_of(parse_benchmark_config({**raw, "methods": ["experts", "smile"]})) == ["experts", "smile"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hub(tmp_path_factory.mktemp("glue"), ("cola", "rte", "stsb"))


def _evaluate(hub: Path, tmp: Path, config: dict) -> subprocess.CompletedProcess:
    (tmp / "bench.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub / "hub")}
    command = [sys.executable, "-m", "massmerge", "evaluate", "--config", str(tmp / "bench.yaml"),
               "--cache-dir", str(tmp / "cache"), "--device", "cpu"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_evaluate_runs_the_static_rows_offline_and_resumes(hub: Path, tmp_path: Path) -> None:
    config = glue_config(("cola", "rte", "stsb"), output=tmp_path / "out")
    first = _evaluate(hub, tmp_path, config)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "evaluate-generate"
    assert list(report["methods"]) == ["pretrained", "experts", "task_arithmetic", "ties", "tsv_m"]
    assert [(t["glue_task"], t["split"], t["size"]) for t in report["tasks"]] == [
        ("cola", "validation", 4), ("rte", "validation", 4), ("stsb", "validation", 4)]
    rows = report["methods"]
    assert rows["experts"]["scores"]["cola"] == 1.0  # the trained expert answers its split word for word
    assert rows["pretrained"]["scores"]["cola"] < 1.0  # and the base does not
    assert rows["task_arithmetic"]["options"] == {"alpha": 0.3}
    stsb = rows["pretrained"]["scores"]["stsb"]
    assert stsb is None and "Spearman is undefined" in rows["pretrained"]["notes"]["stsb"]
    assert rows["pretrained"]["avg"] is None and "undefined" in (tmp_path / "out" / "report.md").read_text()
    cached = sorted(p.name for p in (tmp_path / "cache" / "evals").iterdir())
    assert len(cached) == 5 * 3
    second = _evaluate(hub, tmp_path, config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "merging" not in second.stderr  # every score came from the cache
    assert json.loads((tmp_path / "out" / "report.json").read_text())["methods"] == rows


def test_evaluate_lora_experts_and_one_line_errors(hub: Path, tmp_path: Path) -> None:
    config = glue_config(("cola", "rte"), lora=True, output=tmp_path / "out",
                         methods=["experts", "tsv_m", "smile", "mass"])
    run = _evaluate(hub, tmp_path, config)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["methods"]) == {"experts", "tsv_m", "SMILE-2", "MASS", "MASS (unmasked pooling)"}
    assert report["methods"]["SMILE-2"]["options"]["experts"] == "lora"
    bad = _evaluate(hub, tmp_path, {**config, "methods": ["experts", "smiles"]})
    assert bad.returncode == 2 and "unknown method 'smiles'" in bad.stderr.strip().splitlines()[-1]


def test_evaluate_runs_the_smile_row_offline_cached_and_resumed(hub: Path, tmp_path: Path) -> None:
    """SMILE-2: FusionBench's upscaling of every changed Linear of the full experts, by the same protocol; each
    task cached under every SMILE setting; a second run builds nothing."""
    config = glue_config(("cola", "rte", "stsb"), output=tmp_path / "out", methods=["experts", "smile"])
    first = _evaluate(hub, tmp_path, config)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["methods"]
    assert list(rows) == ["experts", "SMILE-2"]
    assert rows["SMILE-2"]["options"] == {"k": None, "gate_k": None, "top_k": 2, "experts": "full"}
    assert set(rows["SMILE-2"]["scores"]) == {"cola", "rte", "stsb"}
    assert all(v is None or -1.0 <= v <= 1.0 for v in rows["SMILE-2"]["scores"].values())
    assert "| SMILE-2 |" in (tmp_path / "out" / "report.md").read_text()
    assert "building SMILE-2" in first.stderr + first.stdout
    assert len([p for p in (tmp_path / "cache" / "evals").iterdir() if "smile" in p.name]) == 3
    second = _evaluate(hub, tmp_path, config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building SMILE-2" not in second.stderr + second.stdout  # every score from the cache
    assert json.loads((tmp_path / "out" / "report.json").read_text())["methods"] == rows


def test_evaluate_runs_the_mass_rows_offline_streamed_cached_and_resumed(hub: Path, tmp_path: Path) -> None:
    """MASS and MASS (unmasked pooling): each prompt routed in the encoder and generated under its task set, by
    the same protocol as the static rows, each task's score cached; a second run factors nothing."""
    config = glue_config(("cola", "rte", "stsb"), output=tmp_path / "out", methods=["experts", "mass"])
    first = _evaluate(hub, tmp_path, config)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["methods"]
    assert list(rows) == ["experts", "MASS", "MASS (unmasked pooling)"]
    for row in ("MASS", "MASS (unmasked pooling)"):
        assert set(rows[row]["scores"]) == {"cola", "rte", "stsb"}
        assert all(v is None or 0.0 <= v <= 1.0 or -1.0 <= v <= 1.0 for v in rows[row]["scores"].values())
    assert rows["MASS (unmasked pooling)"]["options"] == {"pooling": "unmasked_mean"}
    assert "mass" not in report["not_yet_runnable"] and "MASS (unmasked pooling)" in (
        tmp_path / "out" / "report.md").read_text()
    assert "factoring the experts for MASS" in first.stderr + first.stdout
    second = _evaluate(hub, tmp_path, config)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "factoring the experts for MASS" not in second.stderr + second.stdout  # every score from the cache
    assert json.loads((tmp_path / "out" / "report.json").read_text())["methods"] == rows


def test_swapped_weights_reach_the_aliases_and_are_put_back(tmp_path: Path) -> None:
    from massmerge.adapters.seq2seq import Seq2SeqAdapter
    from massmerge.experiments.generation_eval import weights

    adapter = Seq2SeqAdapter()
    model = adapter.load_model(str(save_base(tmp_path / "base")))
    keys = adapter.encoder_keys(model)
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
    params = {"shared.weight": base["shared.weight"] + 1.0, "lm_head.weight": base["lm_head.weight"] * 2}
    with weights(model, base, params) as swapped:
        state = swapped.state_dict()
        for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            assert torch.equal(state[name], params["shared.weight"]), name
        assert torch.equal(state["lm_head.weight"], params["lm_head.weight"])
    after = model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in keys)
    assert torch.equal(after["encoder.embed_tokens.weight"], base["shared.weight"])


@pytest.mark.parametrize(("lora", "max_size"), [(False, "1.5"), (True, "1.12")])
def test_the_mass_rows_score_the_factors_build_ships(tmp_path: Path, lora: bool, max_size: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The MASS rows serve the parts ``massmerge build`` writes from the same experts and settings: the factors
    cut to the size budget (rank scale below 1 here) and rounded to the storage dtype, bit for bit, and the same
    router."""
    from glue_fixtures import save_full_expert, save_lora_expert
    from safetensors.torch import load_file

    from massmerge.artifact import read_manifest
    from massmerge.artifact.save import factor_tensors
    from massmerge.cli import main
    from massmerge.experiments import generation_eval
    from massmerge.experiments.cache import EvalCache
    from massmerge.experiments.generation_eval import mass_parts, prepare

    base = save_base(tmp_path / "base")
    glue = save_glue(tmp_path / "glue", rows=2, tasks=("cola", "rte"))
    experts = [save_lora_expert(base, tmp_path / f"e{i}", 20 + i, base_id=str(base)) if lora
               else save_full_expert(base, tmp_path / f"e{i}", 10 + i) for i in range(2)]
    config = parse_benchmark_config({
        "family": "seq2seq", "base": str(base), "tokenizer": str(base), "methods": ["mass"],
        "tasks": [{"name": t, "expert": str(e), "dataset": str(glue)} for t, e in zip(("cola", "rte"), experts)],
        "mass": {"max_size": float(max_size)}, "eval": {"batch_size": 2, "device": "cpu"}, "output": str(tmp_path / "out")})
    bench = prepare(config, log=lambda _: None)
    parts = mass_parts(bench)
    served = []  # the models the MASS rows generate with (generation itself is covered above)
    monkeypatch.setattr(generation_eval, "generate_texts", lambda model, tok, prompts, *, routed, **_: (
        served.append(routed) or [""] * len(prompts)))
    generation_eval.mass_rows(bench, EvalCache(tmp_path / "cache", generation_eval.GenerationScoreKey(
        task="run", protocol="test", options={})), None)
    assert len(served) == 4 and all(m.factors is served[0].factors for m in served)
    assert [m.settings.pooling for m in served] == ["mean", "mean", "unmasked_mean", "unmasked_mean"]
    main(["build", "--base", str(base), "--experts", *map(str, experts), "--task-names", "cola", "rte",
          "--output", str(tmp_path / "art"), "--max-size", max_size])
    manifest = read_manifest(tmp_path / "art")
    assert parts.rank_scale < 1.0 and parts.rank_scale == manifest.rank_scale
    shipped = load_file(str(tmp_path / "art" / "factors.safetensors"))
    scored = factor_tensors(parts.factors, parts.store)
    assert scored.keys() == shipped.keys()
    for key, value in scored.items():
        assert value.dtype == shipped[key].dtype and torch.equal(value, shipped[key]), key
    assert {k: [f.rank for f in v] for k, v in parts.factors.matrices.items()} == manifest.ranks
    assert parts.factors.accepted == manifest.accepted
    assert parts.serve == manifest.serve
    row = factor_tensors(served[0].factors, parts.store)  # what the row served, in the stored dtype
    for key, value in row.items():
        assert torch.equal(value, shipped[key]), key
    assert served[0].settings.routing_layers == manifest.serve.routing_layers

"""``massmerge merge`` and ``massmerge info`` end to end, through the installed entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from massmerge import merging
from massmerge.cli import main
from massmerge.cli.app import expand_multi_value_options

CLI = [sys.executable, "-c", "from massmerge.cli import main; main()"]


def run(*args: str) -> subprocess.CompletedProcess:
    """The real entry point in a fresh interpreter (slow: imports torch; used for a few end-to-end checks)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def run_in_process(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """``main`` in this process, with the same exit-code and stderr contract as the script."""
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    base = {"enc.weight": torch.randn(16, 12), "enc.bias": torch.randn(16), "step": torch.tensor([3])}
    save_file(base, str(tmp_path / "base.safetensors"))
    experts = []
    for t in range(3):
        state = {k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in base.items()}
        path = tmp_path / f"expert{t}.safetensors"
        save_file(state, str(path))
        experts.append(path)
    return tmp_path / "base.safetensors", experts


@pytest.mark.parametrize("method,flags,opts", [
    ("tsv_m", ["--rank-fraction", "0.25"], {"rank_fraction": 0.25}),
    ("ties", ["--ties-density", "0.3", "--alpha", "0.8"], {"density": 0.3, "alpha": 0.8}),
    ("iso_cts", ["--common-fraction", "0.5"], {"common_fraction": 0.5}),
    ("task_arithmetic", [], {}),
    ("weight_average", [], {}),
    ("iso_c", ["--alpha", "1.2"], {"alpha": 1.2}),
])
def test_merge_writes_what_the_library_computes(tmp_path, checkpoints, capsys, method, flags, opts):
    base, experts = checkpoints
    out = tmp_path / "merged.safetensors"
    result = run_in_process(capsys, "merge", "--method", method, "--base", str(base), "--experts", *map(str, experts),
                 "--output", str(out), *flags)
    assert result.returncode == 0, result.stderr
    merged = load_file(str(out))
    base_state = load_file(str(base))
    tvs = [{k: load_file(str(e))[k] - base_state[k] for k in ("enc.weight", "enc.bias")} for e in experts]
    expected = merging.merge(method, base_state, tvs, **opts)
    assert list(merged) == list(base_state) or set(merged) == set(base_state)
    for key in base_state:
        assert merged[key].dtype == base_state[key].dtype and merged[key].shape == base_state[key].shape
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-6, atol=1e-6)


def test_exclude_leaves_keys_at_the_base(tmp_path, checkpoints, capsys):
    base, experts = checkpoints
    out = tmp_path / "m.safetensors"
    result = run_in_process(capsys, "merge", "--method", "tsv_m", "--base", str(base), "--experts", *map(str, experts),
                 "--exclude", "*.bias", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert torch.equal(load_file(str(out))["enc.bias"], load_file(str(base))["enc.bias"])


def test_info_lists_keys_shapes_dtypes(checkpoints):
    base, _ = checkpoints
    result = run("info", str(base))
    assert result.returncode == 0
    for text in ("enc.weight", "[16, 12]", "F32", "I64", "3 tensors"):
        assert text in result.stdout


@pytest.mark.parametrize("extra,needle", [
    (["--method", "nope"], "--method 'nope'"),
    (["--method", "ties", "--rank-fraction", "0.5"], "--rank-fraction does not apply"),
    (["--method", "tsv_m", "--rank-fraction", "2"], "--rank-fraction"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, checkpoints, capsys, extra, needle):
    base, experts = checkpoints
    out = tmp_path / "m.safetensors"
    result = run_in_process(capsys, "merge", "--base", str(base), "--experts", *map(str, experts), "--output", str(out), *extra)
    assert result.returncode == 2
    assert needle in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_expand_multi_value_options():
    argv = ["merge", "--experts", "a", "b", "--alpha", "1", "--experts=c", "--base", "x"]
    assert expand_multi_value_options(argv) == [
        "merge", "--experts", "a", "--experts", "b", "--alpha", "1", "--experts=c", "--base", "x"]


def test_script_end_to_end_and_error_contract(tmp_path, checkpoints):
    """The installed entry point in a fresh process: a merge, then a bad expert (exit 2, one line, no file)."""
    base, experts = checkpoints
    out = tmp_path / "m.safetensors"
    ok = run("merge", "--method", "tsv_m", "--base", str(base), "--experts", *map(str, experts), "--output", str(out))
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    bad_out = tmp_path / "bad.safetensors"
    bad = run("merge", "--method", "tsv_m", "--base", str(base), "--experts", str(experts[0]), str(broken),
              "--output", str(bad_out))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ") and str(broken) in bad.stderr and bad.stderr.count("\n") == 1
    assert not bad_out.exists()


# ----- CLI conventions (issue 12, item 3) ---------------------------------------------------------------------

COMMANDS = ["merge", "build", "predict", "serve", "evaluate", "suite", "info"]


def help_text(capsys: pytest.CaptureFixture, *args: str) -> str:
    result = run_in_process(capsys, *args, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_version(capsys):
    from massmerge import __version__

    result = run_in_process(capsys, "--version")
    assert result.returncode == 0 and result.stdout.strip() == f"massmerge {__version__}"
    assert __version__ and __version__[0].isdigit()


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_uses_conventional_metavars(capsys, command):
    """PATH, FLOAT, INT, NAME...: no typer type labels (``<bool>``, ``<path>``, ``<list[Path]>``), no braces."""
    import re

    text = help_text(capsys, *([command] if command else []))
    assert not re.search(r"<[a-z]", text), text
    assert "{" not in text.split("\n")[0], text
    assert "--no-no-" not in text and "--help  " in text.replace("\n", " ") + "  "
    for line in text.splitlines():
        match = re.match(r"\s+(--[a-z-]+)(?: / --[a-z-]+)?(?: (\S+))?", line)
        if match and match.group(2) and not match.group(2).startswith("["):
            metavar = match.group(2)
            assert metavar.isupper() or "|" in metavar or "," in metavar, line


def test_usage_names_the_arguments(capsys):
    assert "Usage: massmerge predict [OPTIONS] ARTIFACT INPUTS" in help_text(capsys, "predict")
    assert "Usage: massmerge info [OPTIONS] PATH" in help_text(capsys, "info")
    assert "Usage: massmerge [OPTIONS] COMMAND [ARGS]..." in help_text(capsys)


def _options(command: str) -> dict[str, object]:
    """The click options of a command, by their first flag."""
    import typer

    from massmerge.cli import app

    group = typer.main.get_command(app)
    return {p.opts[0]: p for p in group.commands[command].params if p.param_type_name == "option"}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_default_shows_in_help(capsys, command):
    """An option whose default is a value shows it; an unset-by-default option states what unset means."""
    import re

    blocks: dict[str, str] = {}  # first flag -> its whole help entry (continuation lines are indented deeper)
    for line in help_text(capsys, command).splitlines():
        match = re.match(r"^  (--[a-z-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif line.startswith("   ") and blocks:
            blocks[current] += " " + line.strip()
    for flag, option in _options(command).items():
        if flag == "--help" or option.required or option.is_flag and not option.secondary_opts:
            continue  # required, or a plain on/off flag that is off unless given
        described = blocks[flag]
        # unset means "none" (no filter, no extra output, no rule): nothing to show
        exempt = {"--include", "--exclude", "--task", "--export-artifact", "--data-dir", "--tasks", "--mass-layer",
                  "--router"}
        if option.default is None and flag in exempt:
            continue
        assert "[default:" in described, f"{command} {flag}: {described}"


def test_suite_help_shows_where_things_go(capsys):
    text = " ".join(help_text(capsys, "suite").split())
    assert "[default: massmerge- suite/PRESET]" in text or "[default: massmerge-suite/PRESET]" in text
    from massmerge.data.tasks import DEFAULT_PRESET
    from massmerge.experiments.suite import SuiteConfig

    assert f"[default: {DEFAULT_PRESET}]" in text and ".cache/massmerge/suite" in text
    assert SuiteConfig().preset == DEFAULT_PRESET  # the library and the CLI run the same default preset
    assert "[default: all cores]" in text and "[default: 0.3]" in text


def test_one_flag_per_idea_across_commands():
    """--output everywhere; the same eps and size-budget flags in build and suite."""
    for command in COMMANDS:
        flags = set(_options(command))
        assert not {"--out", "--out-dir", "--rank-scale"} & flags, command
        if command not in ("info", "serve"):  # serve writes no file
            assert "--output" in flags, command
    for command in ("build", "suite"):
        option = _options(command)["--deredundancy"]
        assert option.secondary_opts == ["--no-deredundancy"]
        assert {"--eps", "--max-size"} <= set(_options(command))
    assert _options("build")["--eps"].default == _options("suite")["--eps"].default


def test_files_written_by_merge_have_the_umask_modes(tmp_path, checkpoints, capsys):
    import os
    import stat

    base, experts = checkpoints
    out = tmp_path / "new" / "dir" / "m.safetensors"
    old = os.umask(0o022)
    try:
        result = run_in_process(capsys, "merge", "--method", "tsv_m", "--base", str(base), "--experts",
                                *map(str, experts), "--output", str(out))
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o755


def test_suite_report_files_have_the_umask_modes(tmp_path):
    import os
    import stat

    from report_fixtures import fake_report  # the suite's own synthetic report

    from massmerge.experiments import report as suite_report

    old = os.umask(0o022)
    try:
        suite_report.write_report(fake_report(), tmp_path / "report", show=False)
    finally:
        os.umask(old)
    written = sorted((tmp_path / "report").iterdir())
    assert {"report.json", "report.md"} <= {p.name for p in written}
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in written), [oct(p.stat().st_mode) for p in written]
    assert stat.S_IMODE((tmp_path / "report").stat().st_mode) == 0o755


def test_info_on_an_artifact_lists_manifest_and_tensors(tmp_path):
    pytest.importorskip("transformers")
    from toy_mass import make_parts

    from massmerge.artifact import save_artifact
    from massmerge.mass import MASSModel, mean_pool

    base, factors, heads, settings = make_parts(3, 0)
    save_artifact(MASSModel(base, factors, heads, settings, pool=mean_pool()), tmp_path / "art")
    result = run("info", str(tmp_path / "art"))
    assert result.returncode == 0, result.stderr
    for text in ("MASS artifact", "tasks (3)", "heads:", "factors.safetensors", "heads.safetensors",
                 "base.safetensors", "design ranks", "/U", "F16"):
        assert text in result.stdout, text


def test_progress_in_a_log_file_shows_stage_step_elapsed_and_eta(monkeypatch, capsys):
    """stderr is not a terminal here (captured), as in a log file: plain lines, including while one slow
    step is still running, and none for a stage that fails."""
    import re
    import time

    from massmerge import progress

    monkeypatch.setattr(progress, "FIRST_LINE_AFTER_SECONDS", 0.05)
    monkeypatch.setattr(progress, "LOG_EVERY_SECONDS", 0.1)
    monkeypatch.setattr(progress, "_enabled", True)

    def slow(n: int):
        for i in range(n):
            time.sleep(0.35)
            yield i

    assert list(progress.track(slow(3), "factorizing experts", total=3)) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    pattern = r"factorizing experts: (\d)/3 \(\d+%\), elapsed \d:\d\d:\d\d, eta (\?|\d:\d\d:\d\d)"
    assert lines and all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[0].startswith("factorizing experts: 0/3") and lines[0].endswith("eta ?")  # heartbeat, step 1 running
    assert lines[-1].startswith("factorizing experts: 3/3 (100%)")

    with pytest.raises(RuntimeError):
        for item in progress.track(slow(3), "failing stage", total=3):
            if item == 1:
                raise RuntimeError("boom")
    assert "3/3" not in capsys.readouterr().err


def test_no_third_party_bar_before_an_error_line(tmp_path):
    """A build that fails after loading the base model: stderr is the one error line (transformers' own
    "Loading weights" bar and load reports are silenced)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, max_position_embeddings=16)
    transformers.BertModel(config).save_pretrained(tmp_path / "base")
    heads = []
    for t in range(3):
        heads.append(tmp_path / f"h{t}.safetensors")
        save_file({"weight": torch.randn(2, 8)}, str(heads[-1]), metadata={"kind": "zero_shot", "logit_scale": "10",
                                                                  "task": f"t{t}"})
    experts = [tmp_path / "base", tmp_path / "base", tmp_path / "absent.safetensors"]
    result = run("build", "--base", str(tmp_path / "base"), "--experts", *map(str, experts),
                 "--heads", *map(str, heads), "--output", str(tmp_path / "art"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: --experts: {experts[2]}: no such file or directory"], result.stderr


def test_info_shows_a_multi_layer_router_in_brief():
    """Dozens of routing layers print as a count, the first and the last, and how they combine."""
    from massmerge.cli.info import _layers_text
    from massmerge.mass.config import make_serve_settings

    layers = tuple(f"encoder.layer.{i}.intermediate.dense" for i in range(5))
    text = _layers_text(make_serve_settings(routing_layers=layers, layer_combine="ppca"))
    assert text == "5 routing layers (encoder.layer.0.intermediate.dense ... encoder.layer.4.intermediate.dense, ppca)"
    assert _layers_text(make_serve_settings(routing_layers=layers[:1])) == f"routing layers {layers[0]}"


def test_help_imports_neither_torch_nor_transformers():
    """``massmerge --help`` starts fast (issue 13: under 1 s): it parses flags without importing torch, and the
    third-party silencing sets environment switches instead of importing transformers (0.9 s on its own)."""
    code = ("import sys\nfrom massmerge.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'huggingface_hub') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
    assert "Usage: massmerge" in result.stdout


def test_predict_flags_are_the_serve_settings():
    """predict's serve flags are derived from ServeSettings (one declaration): every flag, its metavar and its
    help sentence; ``--routing-layer`` repeatable."""
    from massmerge.mass.config import serve_flags

    options = _options("predict")
    for flag in serve_flags():
        option = options[flag.flag]
        assert option.metavar == flag.metavar and option.help.startswith(flag.help), flag.flag
        assert option.multiple == flag.multiple and option.default is None
    assert {"--router", "--strategy", "--device", "--output"} <= set(options)

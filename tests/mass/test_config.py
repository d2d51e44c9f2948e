"""Serve and build settings: a bad value is one error naming the flag."""

from __future__ import annotations

import pytest

from massmerge.errors import OptionError
from massmerge.mass import make_build_settings, make_serve_settings




@pytest.mark.parametrize("option,value,flag", [("eta", 1.5, "--eta"), ("top_k", 0, "--top-k"),
                                               ("tau", -1.0, "--tau"), ("mode", "nope", "--mode"),
                                               ("head_rule", "vote", "--head-rule"), ("pooling", "max", "--pooling")])
def test_serve_setting_errors_name_the_option(option, value, flag):
    with pytest.raises(OptionError, match=flag):
        make_serve_settings(routing_layers=("x",), **{option: value})


@pytest.mark.parametrize("option,value,flag", [("rank_fraction", 0.0, "--rank-fraction"), ("eps", 2.0, "--eps"),
                                               ("svd", "qr", "--svd"), ("max_size", -1.0, "--max-size")])
def test_build_setting_errors_name_the_option(option, value, flag):
    with pytest.raises(OptionError, match=flag):
        make_build_settings(**{option: value})


# ----- one declaration: flags, YAML fields and help are derived from ServeSettings (issue 28) --------------------

def test_every_serve_setting_is_a_flag_but_the_router_study_ablation():
    from massmerge.mass.config import ServeSettings, serve_flags

    flags = {flag.field: flag for flag in serve_flags()}
    assert set(ServeSettings.model_fields) - set(flags) == {"first_pass"}
    assert flags["routing_layers"].flag == "--routing-layer" and flags["routing_layers"].multiple
    assert (flags["eta"].metavar, flags["top_k"].metavar, flags["dtype"].metavar, flags["mode"].metavar) == \
        ("FLOAT", "INT", "DTYPE", "NAME")
    assert all(flag.help == ServeSettings.model_fields[name].description for name, flag in flags.items())
    assert flags["routing_layers"].value(["a", "b"]) == ("a", "b") and flags["routing_layers"].value([]) is None


def test_a_new_field_is_a_new_flag_and_a_new_yaml_field():
    """What one new field (e.g. ``max_new_tokens``) gives, without another edit: a flag with its metavar and
    help, and an optional field with its bounds in a section built by unset_serve_fields."""
    from pydantic import Field, ValidationError, create_model

    from massmerge.mass import config

    class Grown(config.ServeSettings):
        max_new_tokens: int | None = Field(default=None, ge=1, description="generation: new tokens per input")

    flag = config._flag_of("max_new_tokens", Grown.model_fields["max_new_tokens"])
    assert (flag.flag, flag.metavar, flag.kind, flag.help) == ("--max-new-tokens", "INT", int,
                                                              "generation: new tokens per input")
    section = create_model("Section", **config.unset_serve_fields(settings=Grown))
    assert section().max_new_tokens is None and section(max_new_tokens=5).max_new_tokens == 5
    with pytest.raises(ValidationError):
        section(max_new_tokens=0)


def test_evaluate_mass_section_is_the_serve_settings_less_those_set_elsewhere():
    from pydantic import ValidationError

    from massmerge.experiments.evaluate_config import SERVE_SET_ELSEWHERE, MassOptions, parse_benchmark_config
    from massmerge.mass.config import ServeSettings

    serve = set(ServeSettings.model_fields) - set(SERVE_SET_ELSEWHERE)
    assert serve <= set(MassOptions.model_fields)
    assert all(MassOptions.model_fields[name].description == ServeSettings.model_fields[name].description
               for name in serve)
    for bad in ({"tau": float("inf")}, {"eta": 1.0}, {"top_k": 0}, {"layer_combine": "sum"}):
        with pytest.raises(ValidationError):
            MassOptions(**bad)
    tasks = [{"name": f"t{i}", "expert": "e", "dataset": "d"} for i in range(2)]
    config = parse_benchmark_config({"base": "b", "tasks": tasks, "mass": {"layer_combine": "ppca", "eta": 0.1},
                                     "eval": {"batch_size": 8}})
    assert config.serve_overrides() == {"layer_combine": "ppca", "eta": 0.1, "batch_size": 8, "dtype": None}

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

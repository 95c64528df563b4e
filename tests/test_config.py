"""SparsityConfig: defaults, validation messages, from_dict/to_dict, schedule helpers."""

from __future__ import annotations

import json

import pytest

import distk
from distk.config import SparsityConfig


def test_contract_fields_and_defaults():
    cfg = SparsityConfig()
    assert distk.SparsityConfig is SparsityConfig
    expected = {
        "density": 0.01, "k": None, "method": "bucketed", "recall_target": 0.95,
        "buckets": None, "k_per_bucket": None, "interleaved": True, "error_feedback": True,
        "momentum": 0.0, "clip_norm": None, "warmup_steps": 0, "warmup_density": 0.25,
        "dense_steps": 0, "value_dtype": "auto", "value_bits": None, "sync_every": 1,
        "outer_lr": 1.0, "outer_momentum": 0.0, "outer_nesterov": True,
        "min_numel": 1024, "small_tensors": "dense", "value_levels": "centres",
        "exchange": "auto",
        "nonfinite": "raise", "stats_interval": 10, "recall_interval": 50,
        "adam_dense_steps": 75, "adam_warmup_steps": 200, "adam_value_dtype": "bfloat16",
        # Shared masks, EF21 and memory (docs/comm-and-compressor.md).
        "mask": "auto", "mask_policy": "union", "mask_ahead": False, "mask_beta": 0.9,
        "mask_explore": 0.25, "feedback": "residual", "feedback_beta": 0.0,
        "residual_dtype": "auto",
        # SparseLoCo's recipe (docs/outer.md, "The SparseLoCo recipe").
        "error_decay": 1.0, "bucket_layout": "flat", "outer_average": "all",
        "outer_clip": "none",
    }
    assert cfg.to_dict() == expected


def test_round_trip_through_json():
    cfg = SparsityConfig(density=0.001, method="exact", value_dtype="bfloat16", k=7,
                         exchange="reduce_scatter", nonfinite="skip", clip_norm=2.5)
    assert SparsityConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SparsityConfig.from_dict(None) == SparsityConfig()
    assert SparsityConfig.from_dict({}) == SparsityConfig()


@pytest.mark.parametrize("key,close", [("densty", "density"), ("k_per_buckets", "k_per_bucket"),
                                       ("nonfinit", "nonfinite"), ("momentun", "momentum")])
def test_unknown_key_suggests_closest(key, close):
    with pytest.raises(ValueError, match=f"unknown SparsityConfig key '{key}'; "
                                         f"did you mean '{close}'"):
        SparsityConfig.from_dict({key: 1})


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ValueError, match="valid keys: density, k, method"):
        SparsityConfig.from_dict({"zzzzzz": 1})


@pytest.mark.parametrize("key,value,allowed", [
    ("density", 0.0, "a number in \\(0, 1\\] or 'auto'"),
    ("density", 1.5, "a number in \\(0, 1\\] or 'auto'"),
    ("density", "0.1", "a number in \\(0, 1\\] or 'auto'"),
    ("k", 0, "None or an integer >= 1"),
    ("k", 2.0, "None or an integer >= 1"),
    ("method", "topk", "one of \\('bucketed', 'exact', 'dense'\\)"),
    ("recall_target", 0.0, "a number in \\(0, 1\\]"),
    ("buckets", 0, "None or an integer >= 1"),
    ("k_per_bucket", -1, "None or an integer >= 1"),
    ("interleaved", 1, "a bool \\(true or false\\)"),
    ("error_feedback", "yes", "a bool \\(true or false\\)"),
    ("momentum", 1.0, "a number in \\[0, 1\\)"),
    ("clip_norm", 0, "None or a finite number > 0"),
    ("clip_norm", float("inf"), "None or a finite number > 0"),
    ("warmup_steps", -1, "an integer >= 0"),
    ("warmup_density", 0.0, "a number in \\(0, 1\\]"),
    ("warmup_density", 0.001, "at least density=0.01 \\(the warm-up decays towards density\\)"),
    ("dense_steps", 1.5, "an integer >= 0"),
    ("value_dtype", "int8", "None, 'auto' or one of \\('float32', 'bfloat16', 'float16'\\)"),
    ("min_numel", -5, "an integer >= 0"),
    ("exchange", "ring", "one of \\('auto', 'allgather', 'reduce_scatter', 'dense'\\)"),
    ("nonfinite", "ignore", "one of \\('raise', 'skip', 'zero'\\)"),
    ("stats_interval", 0, "an integer >= 1"),
    ("recall_interval", True, "an integer >= 0"),
    ("error_decay", 0.0, "a number in \\(0, 1\\]"),
    ("error_decay", 1.5, "a number in \\(0, 1\\]"),
    ("bucket_layout", "rows", "one of \\('flat', 'tile'\\)"),
    ("outer_average", "mean", "one of \\('all', 'senders'\\)"),
    ("outer_clip", "max", "one of \\('none', 'median'\\)"),
])
def test_bad_values_name_key_value_and_allowed(key, value, allowed):
    extra = {"warmup_steps": 10} if key == "warmup_density" else {}
    with pytest.raises(ValueError, match=f"SparsityConfig.{key} must be {allowed}, "
                                         f"got {repr(value).replace('(', '.').replace(')', '.')}"):
        SparsityConfig.from_dict({key: value, **extra})


def test_bad_type_of_mapping():
    with pytest.raises(ValueError, match="expects a dict, got list"):
        SparsityConfig.from_dict([("density", 0.1)])


def test_k_schedule():
    cfg = SparsityConfig(density=0.01)
    assert cfg.k_at(1000, 0) == 10 and cfg.k_at(10, 0) == 1  # at least one entry
    assert SparsityConfig(k=50).k_at(1000, 0) == 50
    assert SparsityConfig(k=50).k_at(20, 0) == 20  # never more than the tensor
    warm = SparsityConfig(density=0.01, warmup_steps=2, warmup_density=0.25, dense_steps=3)
    assert [warm.is_dense_step(10_000, s) for s in range(5)] == [True] * 3 + [False] * 2
    # Warm-up counts from the end of the dense steps.
    assert [warm.k_at(10_000, s) for s in range(3, 7)] == [2500, 500, 100, 100]
    # With a fixed k, the warm-up decays from warmup_density to k / numel.
    fixed = SparsityConfig(k=100, warmup_steps=2, warmup_density=0.25)
    assert [fixed.k_at(10_000, s) for s in range(4)] == [2500, 500, 100, 100]
    assert SparsityConfig(method="dense").is_dense_step(10**6, 100)
    assert SparsityConfig(min_numel=1024).is_dense_step(1023, 100)


def test_wire_dtype_and_replace():
    import torch

    assert SparsityConfig(value_dtype="bfloat16").wire_dtype == torch.bfloat16
    assert SparsityConfig().wire_dtype is None
    with pytest.raises(ValueError, match="SparsityConfig.density"):
        SparsityConfig().replace(density=2.0)

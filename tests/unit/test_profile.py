"""common/profile.py: interpolation, extrapolation, the loader, and the shipped profiles."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from common.profile import PROFILE_DIR, LatencyProfile, list_profiles, load_profile

REPO = Path(__file__).resolve().parents[2]

DOC = {
    "name": "synthetic",
    "description": "made up for tests",
    "model": {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "dtype": "float16", "vocab_size": 100,
              "max_context": 1024},
    "prefill": {"tokens": [100, 200, 400], "seconds": [1.0, 2.0, 6.0]},
    "decode": {"batch": [1, 3], "context": [10, 30], "seconds": [[1.0, 2.0], [3.0, 6.0]]},
}


@pytest.fixture
def profile() -> LatencyProfile:
    return LatencyProfile.from_dict(copy.deepcopy(DOC))


def test_prefill_at_grid_points(profile):
    for tokens, seconds in zip(DOC["prefill"]["tokens"], DOC["prefill"]["seconds"], strict=True):
        assert profile.prefill_time(tokens) == pytest.approx(seconds)


def test_prefill_between_grid_points(profile):
    assert profile.prefill_time(150) == pytest.approx(1.5)
    assert profile.prefill_time(300) == pytest.approx(4.0)


def test_prefill_extrapolates_from_the_end_segments(profile):
    assert profile.prefill_time(800) == pytest.approx(14.0)  # slope 0.02 s/token past 400
    assert profile.prefill_time(50) == pytest.approx(0.5)  # slope 0.01 s/token below 100


def test_extrapolation_is_clamped_at_zero(profile):
    assert profile.prefill_time(0) == pytest.approx(0.0)
    assert profile.prefill_time(-1000) == 0.0
    doc = copy.deepcopy(DOC)
    doc["prefill"] = {"tokens": [1, 2], "seconds": [2.0, 1.0]}  # falling: would go negative past 3
    falling = LatencyProfile.from_dict(doc)
    assert falling.prefill_time(10) == 0.0
    assert falling.prefill_time(3) == pytest.approx(0.0)


def test_single_point_profile_is_constant():
    zero = load_profile("zero")
    assert zero.prefill_time(10_000) == 0.0
    assert zero.decode_step_time(64, 4096) == 0.0


def test_decode_at_grid_points(profile):
    for b, batch in enumerate(DOC["decode"]["batch"]):
        for c, context in enumerate(DOC["decode"]["context"]):
            assert profile.decode_step_time(batch, context) == pytest.approx(DOC["decode"]["seconds"][b][c])


def test_decode_is_bilinear(profile):
    assert profile.decode_step_time(1, 20) == pytest.approx(1.5)  # along context
    assert profile.decode_step_time(2, 10) == pytest.approx(2.0)  # along batch
    # centre of the cell: the mean of the four corners (1 + 2 + 3 + 6) / 4
    assert profile.decode_step_time(2, 20) == pytest.approx(3.0)
    assert profile.decode_step_time(2, 25) == pytest.approx(0.5 * (1.75 + 5.25))


def test_decode_extrapolates_and_clamps(profile):
    assert profile.decode_step_time(5, 30) == pytest.approx(10.0)  # slope 2 s per request at context 30
    assert profile.decode_step_time(1, 50) == pytest.approx(3.0)
    assert profile.decode_step_time(1, -100) == 0.0


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("prefill"), "not a latency profile"),
    (lambda d: d["model"].pop("head_dim"), "not a latency profile"),
    (lambda d: d["model"].update(extra=1), "not a latency profile"),
    (lambda d: d["prefill"].update(tokens=[200, 100, 400]), "strictly increasing"),
    (lambda d: d["decode"].update(context=[]), "strictly increasing"),
    (lambda d: d["prefill"].update(seconds=[1.0, 2.0]), "prefill.seconds"),
    (lambda d: d["decode"].update(seconds=[[1.0, 2.0]]), r"\[batch\]\[context\]"),
    (lambda d: d["decode"].update(seconds=[[1.0, 2.0], [3.0]]), r"\[batch\]\[context\]"),
])
def test_from_dict_rejects_bad_documents(mutate, message):
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(ValueError, match=message):
        LatencyProfile.from_dict(doc)


def test_load_profile_by_path_and_bad_file(tmp_path):
    good = tmp_path / "mine.json"
    good.write_text(json.dumps(DOC))
    assert load_profile(str(good)).name == "synthetic"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "prefill": {}}))
    with pytest.raises(ValueError, match="not a latency profile"):
        load_profile(str(bad))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        load_profile(str(broken))


def test_load_profile_unknown_name():
    with pytest.raises(FileNotFoundError, match="no latency profile 'no-such-profile'.*zero"):
        load_profile("no-such-profile")
    with pytest.raises(FileNotFoundError):
        load_profile("/nonexistent/dir/profile.json")


def test_list_profiles_includes_the_shipped_ones():
    names = list_profiles()
    assert {"zero", "llama3-8b-h100"} <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_loads(name):
    profile = load_profile(name)
    assert profile.name == name  # the file name and the profile's name agree
    assert profile.description
    doc = json.loads((PROFILE_DIR / f"{name}.json").read_text())
    assert isinstance(doc.get("sources"), list) and isinstance(doc.get("assumptions"), list)
    assert all(s >= 0 for s in profile.prefill_seconds)
    assert all(s >= 0 for row in profile.decode_seconds for s in row)


def test_llama3_8b_h100_profile():
    profile = load_profile("llama3-8b-h100")
    m = profile.model
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.vocab_size, m.max_context) == (
        32, 8, 128, "bfloat16", 128256, 8192)
    assert m.kv_bytes_per_token == 131072
    assert profile.prefill_tokens == (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
    assert profile.decode_batch == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert profile.decode_context == (128, 512, 1024, 2048, 4096, 8192)
    # Physically sensible: more work never takes less time, and a step is at least the weight read.
    assert list(profile.prefill_seconds) == sorted(profile.prefill_seconds)
    for row in profile.decode_seconds:
        assert list(row) == sorted(row)
    for column in zip(*profile.decode_seconds, strict=True):
        assert list(column) == sorted(column)
    assert 0.0054 < profile.decode_step_time(1, 128) < 0.010  # 15 GB of weights at <= 2.8 TB/s, plus overhead
    assert 0.040 < profile.prefill_time(2048) < 0.090


def test_llama3_8b_h100_matches_its_derivation():
    spec = importlib.util.spec_from_file_location("derive_h100_profile", REPO / "scripts" / "derive_h100_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = json.loads((PROFILE_DIR / "llama3-8b-h100.json").read_text())
    assert shipped == json.loads(json.dumps(module.profile()))

"""`dopd profile` on the real engine with the tiny random model, in-process (a few seconds)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from common.profile import LatencyProfile, list_profiles
from services.profiler import add_profile_parser, measure_profile, run_profile


@pytest.fixture
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads stall each other at every parallel region."""
    before = torch.get_num_threads()
    yield 1
    torch.set_num_threads(before)


def test_measure_profile_tiny_random(one_thread):
    doc = measure_profile("tiny-random", prefill_tokens=[8, 32], decode_batches=[1, 2], decode_contexts=[16, 40],
                          repeats=1, device="cpu", threads=one_thread)
    profile = LatencyProfile.from_dict(doc)
    assert profile.name == doc["name"]
    assert profile.name == "tiny-random-cpu1"  # model, device and torch threads
    assert doc["sources"] == ["measured by dopd profile"]
    assert doc["assumptions"] and "measured" in doc["description"]
    m = profile.model
    assert (m.num_layers, m.num_kv_heads, m.head_dim, m.dtype, m.vocab_size, m.max_context) == (
        4, 2, 16, "float32", 49152, 2048)
    assert profile.prefill_tokens == (8, 32)
    assert profile.decode_batch == (1, 2) and profile.decode_context == (16, 40)
    assert all(s > 0 for s in profile.prefill_seconds)
    assert all(s > 0 for row in profile.decode_seconds for s in row)
    assert profile.prefill_time(20) > 0 and profile.decode_step_time(2, 30) > 0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dopd")
    add_profile_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_profile_list(capsys):
    args = _parse(["profile", "--list"])
    assert args.func is run_profile
    assert run_profile(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == list_profiles()
    assert all(line.split("\t")[1] for line in lines)  # each with its description


def test_profile_command_writes_a_loadable_file(tmp_path, capsys, one_thread):
    out = tmp_path / "tiny.json"
    args = _parse(["profile", "--model", "tiny-random", "--out", str(out), "--quick", "--repeats", "1",
                   "--device", "cpu", "--threads", str(one_thread), "--prefill-tokens", "8,16", "--batches", "1",
                   "--contexts", "16,32", "--name", "tiny-test"])
    assert args.model == "tiny-random" and args.quick and args.repeats == 1
    assert run_profile(args) == 0
    doc = json.loads(out.read_text())
    profile = LatencyProfile.from_dict(doc)
    assert profile.name == "tiny-test"
    assert profile.prefill_tokens == (8, 16) and profile.decode_context == (16, 32)
    assert "decode step seconds" in capsys.readouterr().out


def test_profile_defaults():
    args = _parse(["profile"])
    assert (args.model, args.out, args.quick, args.list, args.repeats) == ("smollm2", None, False, False, 3)

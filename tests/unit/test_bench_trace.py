"""JSONL traces: round trip, errors that name the line, rescaling to a rate."""

import pytest

from services.bench.trace import parse_trace, read_trace, scale_to_rate, write_trace
from services.bench.workloads import BenchRequest, generate


def test_round_trip(tmp_path):
    reqs = generate("mix", rate=5, duration=10, seed=4) + [BenchRequest(3.25, None, "Write a haiku ✓", 7)]
    reqs.sort(key=lambda r: r.t)
    path = tmp_path / "trace.jsonl"
    write_trace(path, reqs)
    assert read_trace(path) == reqs


def test_blank_lines_are_skipped_and_requests_ordered_by_time():
    lines = ['{"t": 2, "prompt_tokens": 5, "output_tokens": 3}', "", "   ",
             '{"t": 0.5, "prompt": "hi", "output_tokens": 1}']
    assert parse_trace(lines) == [BenchRequest(0.5, None, "hi", 1), BenchRequest(2.0, 5, None, 3)]


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"t": 1, "prompt_tokens": 5}', "output_tokens is missing"),
    ('{"prompt_tokens": 5, "output_tokens": 3}', "t must be"),
    ('{"t": -1, "prompt_tokens": 5, "output_tokens": 3}', "t must be"),
    ('{"t": "1", "prompt_tokens": 5, "output_tokens": 3}', "t must be"),
    ('{"t": 1, "prompt_tokens": 5, "prompt": "x", "output_tokens": 3}', "exactly one of"),
    ('{"t": 1, "output_tokens": 3}', "exactly one of"),
    ('{"t": 1, "prompt_tokens": 0, "output_tokens": 3}', "prompt_tokens must be an integer >= 1"),
    ('{"t": 1, "prompt_tokens": 2.5, "output_tokens": 3}', "prompt_tokens must be an integer >= 1"),
    ('{"t": 1, "prompt_tokens": true, "output_tokens": 3}', "prompt_tokens must be an integer >= 1"),
    ('{"t": 1, "prompt_tokens": 4, "output_tokens": 0}', "output_tokens must be an integer >= 1"),
    ('{"t": 1, "prompt": "", "output_tokens": 2}', "prompt must be a non-empty string"),
    ('{"t": 1, "prompt": 5, "output_tokens": 2}', "prompt must be a non-empty string"),
    ('{"t": 1, "prompt_tokens": 4, "output_tokens": 2, "rate": 3}', "unknown field"),
])
def test_bad_lines_name_their_line_number(line, message):
    lines = ['{"t": 0, "prompt_tokens": 1, "output_tokens": 1}', "", line]
    with pytest.raises(ValueError, match=message) as info:
        parse_trace(lines, "my.jsonl")
    assert str(info.value).startswith("my.jsonl:3: ")


def test_read_trace_names_the_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"t": 0, "prompt_tokens": 1, "output_tokens": 1}\n{"t": 1}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: "):
        read_trace(path)


def test_scale_to_rate_keeps_order_and_proportions():
    reqs = [BenchRequest(t, 4, None, 2) for t in (0.0, 1.0, 3.0, 4.0)]
    scaled = scale_to_rate(reqs, 2.0)  # 4 requests at 2/s: the last arrives at 2 s
    assert [r.t for r in scaled] == pytest.approx([0.0, 0.5, 1.5, 2.0])
    assert scale_to_rate([BenchRequest(0.0, 1, None, 1)], 5.0) == [BenchRequest(0.0, 1, None, 1)]
    with pytest.raises(ValueError):
        scale_to_rate(reqs, 0)

"""JSONL traces: round trip, errors that name the line, rescaling to a rate; Azure CSV traces;
several traces merged onto one clock."""

from datetime import datetime

import pytest

from services.bench.trace import (
    merge_traces,
    parse_azure_csv,
    parse_trace,
    read_azure_csv,
    read_trace,
    read_traces,
    scale_to_rate,
    write_trace,
)
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


AZURE = ["TIMESTAMP,ContextTokens,GeneratedTokens",
         "2023-11-16 18:15:46.6805900,374,44",
         "2023-11-16 18:15:50.9951690,396,109",
         "",
         "2023-11-16 18:15:46.6805900,2,0"]


def test_azure_csv_times_are_seconds_from_the_first_row():
    reqs = parse_azure_csv(AZURE)
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(374, 44), (2, 1), (396, 109)]  # 0 -> 1
    assert [r.t for r in reqs] == pytest.approx([0.0, 0.0, 4.314579])
    later = parse_azure_csv(AZURE, origin=datetime(2023, 11, 16, 18, 15, 40))
    assert [r.t for r in later] == pytest.approx([6.68059, 6.68059, 10.995169])
    with pytest.raises(ValueError, match="before the origin"):
        parse_azure_csv(AZURE, origin=datetime(2023, 11, 16, 18, 16))


@pytest.mark.parametrize("lines,message", [
    (["t,prompt,output", "2023-11-16 18:15:46,1,1"], "expected the header"),
    ([AZURE[0], "yesterday,1,1"], "TIMESTAMP must be"),
    ([AZURE[0], "2023-11-16 18:15:46,a,1"], "must be integers"),
    ([AZURE[0], "2023-11-16 18:15:46,1"], "expected 3 fields"),
    ([AZURE[0], "2023-11-16 18:15:46,-1,1"], ">= 0"),
])
def test_bad_azure_rows_name_their_line(lines, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_azure_csv(lines, "a.csv")
    assert str(info.value).startswith("a.csv:")


def test_merge_traces_puts_them_on_one_clock_ties_in_the_given_order():
    a = [BenchRequest(0.0, 1, None, 1), BenchRequest(2.0, 2, None, 1)]
    b = [BenchRequest(1.0, 3, None, 1), BenchRequest(2.0, 4, None, 1), BenchRequest(0.5, 5, None, 1)]
    assert [r.prompt_tokens for r in merge_traces([a, b])] == [1, 5, 3, 2, 4]
    assert merge_traces([]) == [] and merge_traces([a]) == a


def test_read_traces_shares_one_origin_among_csvs_and_reads_jsonl(tmp_path):
    conv, code, jsonl = tmp_path / "conv.csv", tmp_path / "code.CSV", tmp_path / "x.jsonl"
    conv.write_text("\n".join(AZURE[:3]) + "\n")
    code.write_text(AZURE[0] + "\n2023-11-16 18:15:44.6805900,4808,10\n")  # 2 s before conv's first
    write_trace(jsonl, [BenchRequest(1.0, 7, None, 3)])
    reqs = read_traces([conv, code, jsonl])
    assert [(round(r.t, 6), r.prompt_tokens) for r in reqs] == [(0.0, 4808), (1.0, 7), (2.0, 374), (6.314579, 396)]
    assert read_azure_csv(conv) == parse_azure_csv(AZURE[:3])

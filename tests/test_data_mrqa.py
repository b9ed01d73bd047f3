"""MRQA files (spanqa.data.mrqa, spanqa.data.formats, `spanqa convert --to mrqa`): read by content into the
same examples, windows and labels as SQuAD's, scored like MRQA's official script, bad input refused."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from spanqa.cli import main as cli
from spanqa.data.convert import write_lines
from spanqa.data.formats import MRQA, SQUAD, detect_format, load_examples
from spanqa.data.mrqa import parse_mrqa
from spanqa.data.squad import Answer, load_squad
from spanqa.data.windows import WindowArrays, WindowSettings, build_windows
from spanqa.errors import SpanqaError

SAMPLE = Path(__file__).resolve().parent.parent / "spanqa" / "sample"
CONTEXT = "Paris is the capital of France. The capital of Italy is Rome, and Rome is old."
ROME = [i for i in range(len(CONTEXT)) if CONTEXT.startswith("Rome", i)]
HEADER = {"header": {"dataset": "Test", "split": "dev"}}


def question(qid: str, spans: list[tuple[str, list[list[int]]]], answers=None) -> dict:
    detected = [{"text": text, "char_spans": s} for text, s in spans]
    golds = answers if answers is not None else [text for text, _ in spans]
    return {"qid": qid, "question": "Which?", "answers": golds, "detected_answers": detected}


def rome(qid: str = "q1") -> dict:
    # "Rome" twice (spans listed latest first), and an alias that is not in the context
    return question(qid, [("Rome", [[ROME[1], ROME[1] + 3], [ROME[0], ROME[0] + 3]])], ["Rome", "Roma"])


def mrqa_file(path: Path, *contexts: dict, header: dict | None = HEADER) -> Path:
    return write_lines(path, ([header] if header else []) + list(contexts))


def context(*qas: dict, text: str = CONTEXT) -> dict:
    return {"context": text, "qas": list(qas)}


# ------------------------------------------------------------------------------------------ reading


def test_detected_spans_become_answers_earliest_first(tmp_path):
    path = mrqa_file(tmp_path / "d.jsonl.gz", context(rome()))
    loaded = load_examples(path)
    assert (loaded.format, loaded.metric) == (MRQA, "mrqa")
    (example,) = loaded.examples
    # SpanBERT's run_mrqa.py trains on the earliest of all detected spans
    assert example.answers == (Answer("Rome", ROME[0]), Answer("Rome", ROME[1]))
    assert example.id == "q1" and example.title == "Test" and not example.is_impossible
    assert loaded.report["questions"] == 1 and loaded.report["answers"] == 2


def test_format_is_told_by_content_not_by_name(tmp_path):
    gz = tmp_path / "looks-like.json"  # gzipped, named .json
    gz.write_bytes(mrqa_file(tmp_path / "d.jsonl.gz", context(rome())).read_bytes())
    plain = tmp_path / "plain.txt"
    plain.write_bytes(gzip.decompress(gz.read_bytes()))
    squad_gz = tmp_path / "squad.jsonl.gz"
    squad_gz.write_bytes(gzip.compress((SAMPLE / "dev.json").read_bytes()))
    assert detect_format(gz) == detect_format(plain) == MRQA
    assert detect_format(squad_gz) == detect_format(SAMPLE / "dev.json") == SQUAD
    assert load_examples(plain).examples == load_examples(gz).examples
    assert load_examples(squad_gz).examples == load_squad(SAMPLE / "dev.json")[0]


def test_question_without_detected_answer_is_dropped_and_counted(tmp_path):
    path = mrqa_file(tmp_path / "d.jsonl.gz", context(rome("a"), question("b", [], ["Paris"])))
    loaded = load_examples(path)
    assert [ex.id for ex in loaded.examples] == ["a"]
    assert loaded.report["questions_dropped"] == 1
    assert "line 2: qas[1]: dropped: no detected answer" in loaded.report["issues"][0]


def bad(edit) -> list[dict]:
    lines = [HEADER, context(rome("a"), rome("b"))]
    edit(lines)
    return lines


def spans_of(lines, q=1) -> list:
    return lines[1]["qas"][q]["detected_answers"][0]["char_spans"]


BAD = {
    "missing header": (lambda lines: lines.pop(0), "line 1: missing MRQA header: the first line must be"),
    "span outside its context": (
        lambda lines: spans_of(lines).append([70, len(CONTEXT)]),
        f"line 2: qas[1].detected_answers[0].char_spans[2]: [70, {len(CONTEXT)}] is outside its context",
    ),
    "span text mismatch": (
        lambda lines: spans_of(lines).__setitem__(0, [0, 4]),
        "line 2: qas[1].detected_answers[0].char_spans[0]: context[0:5] is 'Paris', not the answer's 'Rome'",
    ),
    "span not a pair": (
        lambda lines: spans_of(lines).__setitem__(0, [ROME[0]]),
        "char_spans[0]: must be [start, end] (two integers)",
    ),
    "missing qid": (lambda lines: lines[1]["qas"][0].pop("qid"), "line 2: qas[0].qid: missing field"),
    "duplicate qid": (
        lambda lines: lines.append(context(rome("a"))),
        "line 3: qas[0].qid: duplicate question id 'a' (first at line 2)",
    ),
    "unanswerable": (
        lambda lines: lines[1]["qas"][0].update(is_impossible=True),
        "line 2: qas[0].is_impossible: true, but MRQA questions are all answerable",
    ),
    "context not an object": (lambda lines: lines.append([1, 2]), "line 3: $: must be an object, got a list"),
    "empty context": (lambda lines: lines[1].update(context=" "), "line 2: context: empty context"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mrqa_is_one_line_naming_file_and_line_and_nothing_is_written(case, tmp_path, minilm_tokenizer):
    from spanqa.data.prepare import prepare

    edit, message = BAD[case]
    data = write_lines(tmp_path / "bad.jsonl.gz", bad(edit))
    with pytest.raises(SpanqaError) as err:
        prepare(data, minilm_tokenizer, tmp_path / "out", progress=False)
    assert str(err.value).startswith(f"{data}: line ") and message in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl.gz"]


def test_cli_prepare_of_bad_mrqa_exits_2_with_one_line(tmp_path, capsys):
    from spanqa.testing import minilm_dir

    data = write_lines(tmp_path / "bad.jsonl.gz", bad(BAD["missing header"][0]))
    code = cli(
        [
            "prepare",
            "--data_file",
            str(data),
            "--tokenizer",
            str(minilm_dir()),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.count("\n") == 1
        and err.startswith(f"spanqa prepare: error: {data}: line 1: missing")
    )
    assert not (tmp_path / "out").exists()


def test_truncated_gzip_and_truncated_plain_lines(tmp_path, minilm_tokenizer, capsys):
    whole = mrqa_file(tmp_path / "whole.jsonl.gz", context(rome("a")), context(rome("b")))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[:-12])
    with pytest.raises(SpanqaError, match="cut.jsonl.gz: truncated gzip"):
        load_examples(cut)
    plain = tmp_path / "cut.jsonl"
    plain.write_text(gzip.decompress(whole.read_bytes()).decode()[:-20])
    with pytest.raises(SpanqaError, match=r"cut.jsonl: line 3: truncated JSON"):
        load_examples(plain)
    garbage = tmp_path / "garbage.jsonl.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"not a gzip stream at all")
    with pytest.raises(SpanqaError, match="garbage.jsonl.gz: not a valid gzip file"):
        load_examples(garbage)
    from spanqa.data.prepare import prepare

    with pytest.raises(SpanqaError, match="truncated gzip"):
        prepare(cut, minilm_tokenizer, tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------- the converted sample


def windows_of(examples, tokenizer, settings) -> WindowArrays:
    return build_windows(examples, tokenizer, WindowSettings(**settings))


def test_converted_sample_keeps_every_answerable_question(mrqa_sample):
    for name in ("train", "dev"):
        squad = [ex for ex in load_squad(SAMPLE / f"{name}.json")[0] if not ex.is_impossible]
        mrqa = load_examples(mrqa_sample[name]).examples
        assert [ex.id for ex in mrqa] == [ex.id for ex in squad] and len(mrqa) > 200
        assert [(ex.question, ex.context) for ex in mrqa] == [(ex.question, ex.context) for ex in squad]
        # the same answer spans, in context order (SQuAD keeps the crowd's order and repeats)
        assert all(
            list(m.answers) == sorted(set(s.answers), key=lambda a: (a.start, len(a.text)))
            for m, s in zip(mrqa, squad, strict=True)
        )


@pytest.mark.parametrize("name", ["train", "dev"])
def test_converted_sample_gives_the_same_windows_and_labels(
    name, mrqa_sample, minilm_tokenizer, tiny_settings
):
    squad = [ex for ex in load_squad(SAMPLE / f"{name}.json")[0] if not ex.is_impossible]
    mrqa = load_examples(mrqa_sample[name]).examples
    a, b = (
        windows_of(squad, minilm_tokenizer, tiny_settings),
        windows_of(mrqa, minilm_tokenizer, tiny_settings),
    )
    for array in WindowArrays.ARRAYS:
        if array not in ("start_positions", "end_positions"):
            np.testing.assert_array_equal(getattr(a, array), getattr(b, array), err_msg=array)
    # Labels: SQuAD trains on its first listed answer, MRQA (as SpanBERT) on the earliest span. They
    # are the same windows' labels wherever the first listed answer is the earliest one: every
    # question with one answer (those of the official train file), most of the others (the dev set's
    # questions, in both files of the sample, list several).
    same_first = np.array([s.answers[0] == m.answers[0] for s, m in zip(squad, mrqa, strict=True)])
    rows = same_first[a.example_index]
    for array in ("start_positions", "end_positions"):
        np.testing.assert_array_equal(getattr(a, array)[rows], getattr(b, array)[rows], err_msg=array)
    one_answer = np.array([len(set(s.answers)) == 1 for s in squad])
    assert one_answer.any() and same_first[one_answer].all()
    # the crowd often lists a shorter answer first ("France" before "in France")
    assert 0.5 < same_first.mean() < 1
    assert a.stats["windows_with_answer"] > 0.5 * len(mrqa)


def test_converted_sample_scores_the_same_as_squad_v1(mrqa_sample, tmp_path, capsys):
    """The same predictions score the same on the MRQA file (mrqa_official_eval) as on the SQuAD file's
    answerable questions saved as v1.1 (evaluate-v1.1): both are max over the same golds."""
    doc = json.loads((SAMPLE / "dev.json").read_text())
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [q for q in paragraph["qas"] if q["answers"]]
    doc["version"] = "1.1"
    v1 = tmp_path / "dev-v1.1.json"
    v1.write_text(json.dumps(doc))
    ids = [q["id"] for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]]
    golds = {q["id"]: q["answers"][0]["text"] for a in doc["data"] for p in a["paragraphs"] for q in p["qas"]}
    # right, partly right, empty, ".", someone else's answer, and (every 7th) no prediction at all
    kinds = [
        lambda i: golds[ids[i]],
        lambda i: golds[ids[i]].split()[0] + " extra words",
        lambda i: "",
        lambda i: ".",
        lambda i: golds[ids[(i + 1) % len(ids)]],
    ]
    predictions = {qid: kinds[i % 5](i) for i, qid in enumerate(ids) if i % 7}
    preds = tmp_path / "predictions.json"
    preds.write_text(json.dumps(predictions))
    reports = []
    for data in (v1, mrqa_sample["dev"]):
        assert cli(["evaluate", "--data_file", str(data), "--predictions", str(preds)]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    squad_report, mrqa_report = reports
    assert (squad_report.pop("metric"), mrqa_report.pop("metric")) == ("squad-v1.1", "mrqa")
    assert squad_report == mrqa_report
    assert squad_report["total"] == len(ids) and squad_report["missing_predictions"] == len(ids) - len(
        predictions
    )
    assert 10 < squad_report["exact"] < 40 and squad_report["f1"] > squad_report["exact"]


def test_convert_refuses_to_overwrite_and_mrqa_input(mrqa_sample, tmp_path, capsys):
    existing = tmp_path / "mine.jsonl.gz"
    existing.write_text("the user's file")
    assert (
        cli(["convert", "--to", "mrqa", "--data_file", str(SAMPLE / "dev.json"), "--out", str(existing)]) == 2
    )
    assert "exists; spanqa does not overwrite it" in capsys.readouterr().err
    assert existing.read_text() == "the user's file"
    out = tmp_path / "again.jsonl.gz"
    assert cli(["convert", "--to", "mrqa", "--data_file", str(mrqa_sample["dev"]), "--out", str(out)]) == 2
    assert "is MRQA already" in capsys.readouterr().err and not out.exists()


def test_convert_is_reproducible(mrqa_sample, tmp_path):
    again = tmp_path / "dev.jsonl.gz"
    assert cli(["convert", "--to", "mrqa", "--data_file", str(SAMPLE / "dev.json"), "--out", str(again)]) == 0
    assert again.read_bytes() == mrqa_sample["dev"].read_bytes()


def test_parse_mrqa_returns_the_header():
    text = "\n".join(json.dumps(line) for line in (HEADER, context(rome())))
    examples, report, header = parse_mrqa(text, "f.jsonl")
    assert header == HEADER["header"] and len(examples) == report.questions == 1


def test_prepare_records_format_and_metric(mrqa_sample, tmp_path, minilm_tokenizer, tiny_settings):
    from spanqa.data.prepare import prepare

    store = prepare(
        mrqa_sample["dev"], minilm_tokenizer, tmp_path / "s", WindowSettings(**tiny_settings), progress=False
    )
    assert store.meta["source"]["format"] == "mrqa" and store.meta["source"]["metric"] == "mrqa"
    squad = prepare(
        SAMPLE / "dev.json", minilm_tokenizer, tmp_path / "q", WindowSettings(**tiny_settings), progress=False
    )
    assert squad.meta["source"]["format"] == "squad" and squad.meta["source"]["metric"] == "squad-v2.0"


def test_stats_of_an_mrqa_file_shows_windows_per_question(mrqa_sample, tmp_path, capsys, minilm_tokenizer):
    from spanqa.testing import minilm_dir

    flags = ["--max_seq_length", "128", "--doc_overlap", "32", "--max_query_length", "32"]
    argv = [
        "stats",
        str(mrqa_sample["dev"]),
        "--tokenizer",
        str(minilm_dir()),
        "--out",
        str(tmp_path),
        *flags,
    ]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "stats.json").read_text())
    examples = load_examples(mrqa_sample["dev"]).examples
    windows = build_windows(
        examples, minilm_tokenizer, WindowSettings(max_seq_length=128, doc_overlap=32, max_query_length=32)
    )
    assert stats["examples"] == len(examples) and stats["windows"] == len(windows.window_lengths)
    per_question = stats["windows"] / stats["examples"]
    assert f"windows per question at 128 tokens, overlap 32: mean {per_question:.2f}" in out
    assert f"({stats['windows']:,} windows for {len(examples):,} questions;" in out
    assert per_question > 1.5  # SQuAD paragraphs at 128 tokens: most need several windows

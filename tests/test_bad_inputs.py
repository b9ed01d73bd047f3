"""Every bad input a user was seen to give, as a table: each case runs the real command in a fresh
process and must exit non-zero with one error line that names what and where, no traceback, and
nothing half-written (no temporaries, none of the outputs it was asked for).

Add a row when a new one turns up. The CLI rows are fast; the training rows start real runs (tiny
BERT, CPU) and sit in the slow tier.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from runs import FIXTURE, deepspeed_command, environment, train_flags

READ_ONLY = Path("/sys/spanqa-test")  # sysfs: no one may create files there, root included
FILE_LIMIT = 1 << 20  # bytes: the tiny BERT's checkpoint files are larger, the run's other files smaller


@dataclass
class Case:
    id: str
    argv: Callable[[dict], list[str]]  # from the paths of `where` (tmp, tiny, export, run, ...)
    words: tuple[str, ...]  # each must be in the error line
    absent: tuple[str, ...] = ()  # paths under tmp that must not exist afterwards
    file_limit: int | None = None  # bytes: a write past them fails as on a full disk
    setup: Callable[[dict], None] = field(default=lambda where: None)


def limit_file_size(limit: int) -> None:
    """From now on a write past `limit` bytes fails with EFBIG, as a write to a full disk fails with
    ENOSPC (SIGXFSZ ignored: it would kill the process instead)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@contextlib.contextmanager
def file_size_limit(limit: int | None) -> Iterator[None]:
    """limit_file_size() for the block, in this process."""
    if limit is None:
        yield
        return
    old_handler, old_limit = signal.getsignal(signal.SIGXFSZ), resource.getrlimit(resource.RLIMIT_FSIZE)
    limit_file_size(limit)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def in_this_process(argv: list[str], where: dict, limit: int | None, capsys) -> tuple[int, str]:
    """`spanqa ARGV` through the console script's main(), in the test's process (fast: nothing to import
    again); an exception escaping it fails the test as a traceback would."""
    from spanqa.cli import main

    old = os.getcwd()
    os.chdir(where["tmp"])
    try:
        with file_size_limit(limit):
            code = main(argv[1:])
    finally:
        os.chdir(old)
    return code, capsys.readouterr().err


def in_a_new_process(argv: list[str], where: dict, limit: int | None) -> tuple[int, str]:
    """`argv` (`spanqa ...` as `python -m spanqa.cli ...`) as a command of its own."""
    command = argv if argv[0] != "spanqa" else [sys.executable, "-m", "spanqa.cli", *argv[1:]]
    env = environment(where["tmp"] / "mlflow.db")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=600, cwd=where["tmp"], env=env,
        preexec_fn=None if limit is None else lambda: limit_file_size(limit),
    )  # fmt: skip
    return done.returncode, done.stderr


def check_refused(case: Case, where: dict, run: Callable[[list[str]], tuple[int, str]]) -> None:
    """Set the case up, run it, and check the one-line refusal and what it left."""
    tmp = where["tmp"]
    case.setup(where)
    argv = case.argv(where)
    before = set(tmp.rglob("*"))
    code, stderr = run(argv)
    assert code != 0, f"exit 0\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-5000:]
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, stderr[-3000:]
    for word in case.words:
        assert word in errors[0], errors[0]
    for name in case.absent:
        assert not (tmp / name).exists(), f"{name} was left behind"
    half_written = [p for p in set(tmp.rglob("*")) - before if ".tmp" in p.name]
    assert not half_written, half_written


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def deep_json(path: Path) -> Path:
    return write(path, "[" * 100_000 + "]" * 100_000)


# ---- the CLI: prepare, evaluate, predict, stats, compare ------------------------------------------


def edited_export(where: dict, **changes) -> Path:
    model = where["tmp"] / "edited_model"
    shutil.copytree(where["export"], model)
    config = json.loads((model / "spanqa_config.json").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = config
        for name in parents:
            node = node[name]
        node[key] = value
    (model / "spanqa_config.json").write_text(json.dumps(config))
    return model


def predictions_with_nan(where: dict) -> None:
    ids = [
        q["id"] for a in json.loads(FIXTURE.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]
    ]
    write(where["tmp"] / "pred.json", json.dumps({i: "" for i in ids}))
    write(where["tmp"] / "odds.json", json.dumps({i: 0.0 for i in ids}).replace("0.0", "NaN", 1))


def prepare(w: dict, data_file: Path, out: str) -> list[str]:
    tokenizer = ["--tokenizer", w["tokenizer"]]
    return ["spanqa", "prepare", *tokenizer, "--no_progress", "--data_file", str(data_file), "--out", out]


PREDICT_ONE = ["--question", "Who designed it?", "--context", "Gustave Eiffel designed the tower."]

CLI_CASES = [
    Case(
        "prepare-deeply-nested-json",
        lambda w: prepare(w, deep_json(w["tmp"] / "deep.json"), "store"),
        ("deep.json", "nested"),
        absent=("store",),
    ),
    Case(
        "prepare-out-on-a-read-only-file-system",
        lambda w: prepare(w, FIXTURE, str(READ_ONLY / "store")),
        ("--out", str(READ_ONLY)),
    ),
    Case(
        "prepare-out-under-a-file",
        lambda w: prepare(w, FIXTURE, str(write(w["tmp"] / "notes.txt", "x")) + "/store"),
        ("--out", "notes.txt"),
    ),
    Case(
        "prepare-disk-full",
        lambda w: prepare(w, FIXTURE, "store"),
        ("--out", "store"),
        absent=("store",),
        file_limit=16 << 10,
    ),
    Case(
        "evaluate-nan-null-odds",
        lambda w: [
            "spanqa",
            "evaluate",
            "--data_file",
            str(FIXTURE),
            "--predictions",
            "pred.json",
            "--null_odds",
            "odds.json",
        ],  # fmt: skip
        ("odds.json", "NaN"),
        setup=predictions_with_nan,
    ),
    Case(
        "evaluate-deeply-nested-predictions",
        lambda w: [
            "spanqa",
            "evaluate",
            "--data_file",
            str(FIXTURE),
            "--predictions",
            str(deep_json(w["tmp"] / "deep.json")),
        ],  # fmt: skip
        ("deep.json", "nested"),
    ),
    Case(
        "predict-output-is-a-directory",
        lambda w: [
            "spanqa",
            "predict",
            "--model",
            str(w["export"]),
            "--input",
            str(w["questions"]),
            "--output",
            str(w["tmp"]),
        ],  # fmt: skip
        ("--output", "is a directory"),
    ),
    Case(
        "predict-non-numeric-max-seq-length-in-the-export",
        lambda w: [
            "spanqa",
            "predict",
            "--model",
            str(edited_export(w, windows__max_seq_length="long")),
            *PREDICT_ONE,
        ],  # fmt: skip
        ("spanqa_config.json", "max_seq_length"),
    ),
    Case(
        "predict-device-cuda-without-cuda",
        lambda w: ["spanqa", "predict", "--model", str(w["export"]), *PREDICT_ONE, "--device", "cuda"],
        ("--device", "cuda"),
    ),
    Case(
        "predict-device-foo",
        lambda w: ["spanqa", "predict", "--model", str(w["export"]), *PREDICT_ONE, "--device", "foo"],
        ("--device", "foo"),
    ),
    Case(
        "predict-missing-model-directory",
        lambda w: ["spanqa", "predict", "--model", str(w["tmp"] / "nonexistent"), *PREDICT_ONE],
        ("--model", "nonexistent", "no such directory"),
    ),
    Case(
        "stats-out-is-an-existing-file",
        lambda w: [
            "spanqa",
            "stats",
            str(FIXTURE),
            "--tokenizer",
            w["tokenizer"],
            "--out",
            str(write(w["tmp"] / "stats.txt", "mine")),
        ],  # fmt: skip
        ("--out", "stats.txt"),
    ),
    Case(
        "compare-unknown-tracking-uri-scheme",
        lambda w: ["spanqa", "compare", "demo", "--tracking_uri", "foo://bar"],
        ("--tracking_uri", "foo://bar"),
    ),
]


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory) -> dict:
    """A tiny exported span model and a questions file for predict."""
    from transformers import AutoTokenizer

    from spanqa.data.windows import WindowSettings
    from spanqa.eval.postprocess import AnswerSettings
    from spanqa.export import ExportInfo, export_model
    from spanqa.model.build import build_model
    from spanqa.testing import minilm_dir, tiny_bert_dir

    root = tmp_path_factory.mktemp("bad_inputs_models")
    tiny = tiny_bert_dir(root / "tiny")
    model = build_model(str(tiny), "span")
    windows = WindowSettings(max_seq_length=64, doc_overlap=16, max_query_length=16)
    answers = AnswerSettings(max_answer_length=8, n_best_size=10, null_score_diff_threshold=0.0)
    info = ExportInfo("span", windows, answers)
    export_model(model, AutoTokenizer.from_pretrained(str(tiny)), root / "export", info)
    questions = write(
        root / "questions.jsonl", json.dumps({"id": "a", "question": "Q?", "context": "C."}) + "\n"
    )
    return {"tiny": tiny, "export": root / "export", "questions": questions, "tokenizer": str(minilm_dir())}


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_a_bad_cli_input_is_one_line_and_leaves_nothing(case, cli_models, tmp_path, capsys):
    where = {**cli_models, "tmp": tmp_path}
    check_refused(case, where, lambda argv: in_this_process(argv, where, case.file_limit, capsys))
    if case.id == "stats-out-is-an-existing-file":
        assert (tmp_path / "stats.txt").read_text() == "mine"  # never overwritten


# ---- training ----------------------------------------------------------------------------------------


def spanqa_train(w: dict, *extra: str, out: str = "out", cache: str = "cache") -> list[str]:
    flags = train_flags(w["tiny"], w["tmp"] / cache, w["tmp"] / out, "--max_steps", "2", *extra)
    return ["spanqa", "train", *flags]


def copied_run(w: dict) -> None:
    shutil.copytree(w["run"], w["tmp"] / "out")


def only_checkpoint(w: dict) -> Path:
    (checkpoint,) = (w["tmp"] / "out" / "checkpoints").iterdir()
    return checkpoint


def junk_marker(w: dict) -> None:
    copied_run(w)
    write(only_checkpoint(w) / "complete", "junk")


def truncated_model_file(w: dict) -> None:
    copied_run(w)
    (model_file,) = only_checkpoint(w).glob("mp_rank_00_model_states.pt")
    model_file.write_bytes(model_file.read_bytes()[:1000])


def ds_config(w: dict, name: str, body: dict) -> str:
    return str(write(w["tmp"] / name, json.dumps(body)))


def one_window_file(w: dict) -> str:
    data = json.loads(FIXTURE.read_text())
    paragraph = data["data"][0]["paragraphs"][0]
    paragraph = {"context": paragraph["context"][:200], "qas": [paragraph["qas"][0]]}
    qa = paragraph["qas"][0]
    qa.update(is_impossible=True, answers=[])
    return str(
        write(
            w["tmp"] / "one.json",
            json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [paragraph]}]}),
        )
    )


FP32 = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1}
TRAIN_CASES = [
    Case(
        "fp16-deepspeed-config-on-cpu",
        lambda w: spanqa_train(
            w, "--deepspeed_config", ds_config(w, "fp16.json", {**FP32, "fp16": {"enabled": True}})
        ),
        ("--deepspeed_config", "fp16.json", "fp16"),
        absent=("out",),
    ),
    Case(
        "zero-stage-7",
        lambda w: spanqa_train(
            w, "--deepspeed_config", ds_config(w, "z7.json", {**FP32, "zero_optimization": {"stage": 7}})
        ),
        ("--deepspeed_config", "z7.json", "zero_optimization.stage"),
        absent=("out",),
    ),
    Case(
        "junk-inside-a-complete-marker",
        lambda w: spanqa_train(w, "--resume", "auto"),
        ("--resume", "complete"),
        setup=junk_marker,
    ),
    Case(
        "truncated-model-file",
        lambda w: spanqa_train(w, "--resume", "auto"),
        ("--resume", "mp_rank_00_model_states.pt"),
        setup=truncated_model_file,
    ),
    Case(
        "span-checkpoint-resumed-with-the-crf-head",
        lambda w: spanqa_train(w, "--resume", "auto", "--head", "crf"),
        ("--head", "span", "crf"),
        setup=copied_run,
    ),
    Case(
        "max-seq-length-past-the-models-positions",
        lambda w: spanqa_train(w, "--max_seq_length", "1024"),
        ("--max_seq_length", "1024", "512"),
        absent=("out", "cache"),
    ),
    Case(
        "output-dir-on-a-read-only-file-system",
        lambda w: spanqa_train(w, out=str(READ_ONLY / "out")),
        ("--output_dir", str(READ_ONLY)),
        absent=("cache",),
    ),
    Case(
        "cache-dir-on-a-read-only-file-system",
        lambda w: spanqa_train(w, cache=str(READ_ONLY / "cache")),
        ("--cache_dir", str(READ_ONLY)),
        absent=("out",),
    ),
    Case(
        "output-dir-is-a-file",
        lambda w: spanqa_train(w, out=str(write(w["tmp"] / "out.txt", "mine"))),
        ("--output_dir", "out.txt"),
        absent=("cache",),
    ),
    Case(
        "disk-full-during-a-checkpoint",
        lambda w: spanqa_train(w),
        ("--output_dir", "cannot save checkpoint", "step-00000002", "disk full"),
        absent=("out/checkpoints/step-00000002",),
        file_limit=FILE_LIMIT,
    ),
]


@pytest.fixture(scope="module")
def train_models(tmp_path_factory) -> dict:
    """The tiny BERT and a run stopped at step 2 (one complete span-head checkpoint)."""
    from spanqa.testing import tiny_bert_dir

    root = tmp_path_factory.mktemp("bad_inputs_train")
    where = {"tiny": tiny_bert_dir(root / "tiny"), "tmp": root}
    done = subprocess.run(
        [sys.executable, "-m", "spanqa.cli", *spanqa_train(where)[1:]],
        capture_output=True, text=True, timeout=600, cwd=root, env=environment(root / "mlflow.db"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"tiny": where["tiny"], "run": root / "out"}


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAIN_CASES, ids=[c.id for c in TRAIN_CASES])
def test_a_bad_training_input_is_one_line_and_leaves_nothing(case, train_models, tmp_path):
    where = {**train_models, "tmp": tmp_path}
    check_refused(case, where, lambda argv: in_a_new_process(argv, where, case.file_limit))


@pytest.mark.slow
def test_a_one_window_training_file_on_two_ranks(train_models, tmp_path):
    where = {**train_models, "tmp": tmp_path}
    flags = spanqa_train(where)[2:]
    flags[flags.index("--train_file") + 1] = one_window_file(where)
    words = ("--train_batch_size", "1 training windows")
    case = Case("one-window-on-two-ranks", lambda w: deepspeed_command(flags), words)
    check_refused(case, where, lambda argv: in_a_new_process(argv, where, None))
    assert not os.path.exists(tmp_path / "out" / "checkpoints")

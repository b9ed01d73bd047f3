"""Training flags, presets, validation errors, and the shipped DeepSpeed configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spanqa import flags as flag_tree
from spanqa.cli import main as cli_main
from spanqa.config import parse_train_args
from spanqa.errors import SpanqaError
from spanqa.presets import load_preset, preset_names
from spanqa.train.ds_engine import SHIPPED, load_config, reconcile, shipped_config_path

FIXTURE = Path(__file__).parent / "fixtures" / "squad_v2_tiny.json"
REPO = Path(__file__).resolve().parent.parent


def flags(tmp_path, *extra: str) -> list[str]:
    return [
        "--model",
        "bert-base-uncased",
        "--train_file",
        str(FIXTURE),
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]


def test_defaults_are_the_reference_preset(tmp_path):
    default = parse_train_args(flags(tmp_path))
    reference = parse_train_args(flags(tmp_path, "--preset", "reference"))
    assert {k: v for k, v in default.to_dict().items() if k != "preset"} == {
        k: v for k, v in reference.to_dict().items() if k != "preset"
    }
    optimizer = reference.optimizer
    assert (optimizer.learning_rate, optimizer.weight_decay, optimizer.warmup_steps) == (3e-5, 0.01, 500)
    assert (optimizer.max_grad_norm, reference.train_batch_size, reference.num_train_epochs) == (1.0, 8, 6)
    assert (reference.windows.max_seq_length, reference.windows.doc_overlap) == (384, 128)


def test_spanbert_preset_and_explicit_flags_override_it(tmp_path):
    config = parse_train_args(flags(tmp_path, "--preset", "spanbert"))
    assert (config.optimizer.learning_rate, config.train_batch_size, config.num_train_epochs) == (2e-5, 32, 4)
    assert config.optimizer.warmup_steps is None and config.optimizer.warmup_proportion == 0.1
    config = parse_train_args(
        flags(tmp_path, "--preset", "spanbert", "--learning_rate", "1e-5", "--head", "crf")
    )
    assert (config.optimizer.learning_rate, config.train_batch_size, config.head) == (1e-5, 32, "crf")


@pytest.mark.parametrize("preset", [None, *preset_names()])
def test_head_rate_and_crf_tags_default_per_head_and_an_explicit_flag_wins(tmp_path, preset):
    chosen = ("--preset", preset) if preset else ()
    span = parse_train_args(flags(tmp_path, *chosen, "--head", "span"))
    crf = parse_train_args(flags(tmp_path, *chosen, "--head", "crf"))
    assert (span.optimizer.head_lr_multiplier, crf.optimizer.head_lr_multiplier) == (1.0, 10.0)
    assert crf.crf_tags == "span_end"
    given = parse_train_args(flags(tmp_path, *chosen, "--head", "crf", "--head_lr_multiplier", "1"))
    assert given.optimizer.head_lr_multiplier == 1.0


def test_explicit_warmup_proportion_replaces_the_presets_warmup_steps(tmp_path):
    config = parse_train_args(flags(tmp_path, "--preset", "reference", "--warmup_proportion", "0.2"))
    assert config.optimizer.warmup_steps is None and config.optimizer.warmup_proportion == 0.2


def test_every_preset_is_a_valid_config(tmp_path):
    assert preset_names() == ["reference", "spanbert"]
    for name in preset_names():
        config = parse_train_args(flags(tmp_path, "--preset", name))
        assert {
            k: v for k, v in flag_tree.flat_values(config).items() if k in load_preset(name)
        } == load_preset(name)


def test_boolean_flags_turn_on_and_off(tmp_path):
    off = parse_train_args(flags(tmp_path, "--no-version_2_with_negative"))
    assert off.answers.null_threshold == float("inf")
    assert parse_train_args(flags(tmp_path, "--version_2_with_negative")).answers.null_threshold == 0.0


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--learning_rate", "-1"], "--learning_rate"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--train_batch_size", "8", "--gradient_accumulation_steps", "3"], "--train_batch_size"),
        (["--head", "lstm"], "--head"),
        (["--crf_tags", "bioes"], "--crf_tags"),
        (["--head_lr_multiplier", "0"], "--head_lr_multiplier"),
        (["--eval_metric", "accuracy"], "--eval_metric"),
        (["--warmup_steps", "10", "--warmup_proportion", "0.1"], "--warmup_steps"),
        (["--doc_overlap", "400"], "--doc_overlap"),
        (["--dev_file", "/nonexistent/dev.json"], "--dev_file"),
        (["--deepspeed_config", "/nonexistent/ds.json"], "--deepspeed_config"),
        (["--resume", "/nonexistent/ckpt"], "--resume"),
        (["--learning_rate", "fast"], "--learning_rate"),
        (["--preset", "nope"], "--preset"),
        (["--no_such_flag", "1"], "--no_such_flag"),
    ],
)
def test_bad_flags_name_the_flag(tmp_path, extra, named):
    with pytest.raises(SpanqaError, match=named.replace("-", r"\-")):
        parse_train_args(flags(tmp_path, *extra))


def test_missing_train_file_and_model_dir(tmp_path):
    with pytest.raises(SpanqaError, match="--train_file"):
        parse_train_args(["--model", "m", "--output_dir", str(tmp_path)])
    with pytest.raises(SpanqaError, match=r"--train_file: /nope\.json: no such file"):
        parse_train_args(["--model", "m", "--output_dir", str(tmp_path), "--train_file", "/nope.json"])
    with pytest.raises(SpanqaError, match="--model: ./no/such/model"):
        parse_train_args(
            ["--model", "./no/such/model", "--output_dir", str(tmp_path), "--train_file", str(FIXTURE)]
        )


def test_cli_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["train", *flags(tmp_path, "--learning_rate", "0")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and "--learning_rate" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_launcher_error_is_one_line_exit_2_and_writes_nothing(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "launcher" / "train.py"),
            *flags(tmp_path, "--dev_file", "/missing.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1]
        == "launcher/train.py: error: --dev_file: /missing.json: no such file"
    )
    assert list(tmp_path.iterdir()) == []


def test_flags_win_over_the_deepspeed_config_and_say_so(tmp_path):
    config = parse_train_args(
        flags(tmp_path, "--train_batch_size", "32", "--gradient_accumulation_steps", "2")
    )
    user = {"train_batch_size": 16, "gradient_clipping": 1.0, "optimizer": {"type": "Adam"}}
    resolved, notes = reconcile(config, user, world_size=4)
    assert resolved["train_batch_size"] == 32
    assert resolved["train_micro_batch_size_per_gpu"] == 4
    assert resolved["gradient_accumulation_steps"] == 2
    assert "optimizer" not in resolved
    assert any("train_batch_size=16" in note and "flags win" in note for note in notes)
    assert len(notes) == 2  # batch size and the dropped optimizer; clipping agrees


def test_batch_not_divisible_by_world_size_names_the_flag(tmp_path):
    config = parse_train_args(flags(tmp_path, "--train_batch_size", "8"))
    with pytest.raises(SpanqaError, match=r"--train_batch_size: 8 is not divisible .* world size 3"):
        reconcile(config, {}, world_size=3)


def test_auto_values_are_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto"}))
    with pytest.raises(SpanqaError, match=r"--deepspeed_config: .*\$\.train_batch_size is \"auto\""):
        load_config(path)
    # "auto" in a key or inside another string is not an "auto" value
    path.write_text(json.dumps({"zero_optimization": {"stage": 1}, "auto_cast": False, "note": "autotuned"}))
    assert load_config(path)["auto_cast"] is False


@pytest.mark.parametrize("name", ["cpu_fp32.json", "fp16_zero1.json", "fp16_zero2.json", "bf16_zero1.json"])
def test_shipped_deepspeed_configs_validate(tmp_path, name):
    """DeepSpeed's own config class accepts each (world size 1); fp16 ones are checked as config only."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = parse_train_args(
        flags(tmp_path, "--train_batch_size", "16", "--gradient_accumulation_steps", "2")
    )
    resolved, _ = reconcile(config, load_config(shipped_config_path(name)), world_size=1)
    checked = DeepSpeedConfig(resolved)
    assert checked.train_batch_size == 16
    assert checked.train_micro_batch_size_per_gpu == 8
    assert checked.gradient_accumulation_steps == 2
    assert checked.gradient_clipping == 1.0
    assert checked.float16_config.enabled == name.startswith("fp16")
    assert checked.bfloat16_config.enabled == name.startswith("bf16")
    assert (
        checked.zero_optimization_stage
        == {"cpu": 0, "fp16_zero1": 1, "fp16_zero2": 2, "bf16_zero1": 1}[
            name.removesuffix(".json").replace("_fp32", "")
        ]
    )


def test_the_four_configs_are_shipped_in_the_package_and_the_top_level_is_the_same_files():
    package = shipped_config_path("cpu_fp32.json").parent
    assert sorted(p.name for p in package.glob("*.json")) == sorted(SHIPPED)
    top = REPO / "ds_configs"  # what users read and pass by path: the package's files, linked
    assert sorted(p.name for p in top.glob("*.json")) == sorted(SHIPPED)
    for name in SHIPPED:
        assert (top / name).read_bytes() == (package / name).read_bytes()


def test_help_lists_every_run_squad_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_train_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [
        "--train_file", "--dev_file", "--model", "--train_batch_size", "--eval_batch_size", "--learning_rate",
        "--num_train_epochs", "--max_seq_length", "--doc_overlap", "--max_query_length", "--eval_metric",
        "--output_dir", "--version_2_with_negative", "--seed", "--warmup_proportion", "--warmup_steps",
        "--weight_decay", "--gradient_accumulation_steps", "--eval_per_epoch", "--head", "--deepspeed_config",
        "--prepared", "--max_steps", "--resume", "--preset", "--tag", "--run_name", "--max_answer_length",
        "--n_best_size", "--logging_steps", "--eval_steps", "--num_workers", "--compile",
    ]  # fmt: skip
    for flag in flags:
        assert re.search(rf"^  {flag}[ ,\n]", text, flags=re.M), flag

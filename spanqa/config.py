"""Training configuration: one tree of dataclasses, its command-line flags, and presets.

    TrainConfig                      what to train, where, how long, how often to evaluate and log
      .optimizer  OptimizerSettings  AdamW and its schedule
      .windows    WindowSettings     how contexts are cut into windows (a window store's identity)
      .answers    AnswerSettings     how window scores become answers (exported with the model)

Each field's docstring is its flag's help and its row in the README's flags table; flags keep SpanBERT's
`run_squad.py` names, flat (`--max_seq_length`, not `--windows.max_seq_length`). Precedence, lowest
first: the field defaults (which are the `reference` preset), then `--preset NAME`, then explicit flags.
`--train_batch_size` is the GLOBAL batch per optimizer step, as in `run_squad.py` and DeepSpeed's
`train_batch_size`: micro-batch per process = train_batch_size / (gradient_accumulation_steps × world).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from spanqa import flags
from spanqa.data.formats import MRQA, SQUAD, detect_format
from spanqa.data.windows import WindowSettings
from spanqa.errors import SpanqaError
from spanqa.eval.postprocess import AnswerSettings
from spanqa.eval.squad_metric import SELECTION_METRICS
from spanqa.io import looks_like_local_path, read_json
from spanqa.model import CRF_TAGGINGS, HEAD_NAMES
from spanqa.presets import load_preset, preset_names

# --head_lr_multiplier when not given. The CRF's emissions and transitions start from nothing: at the
# encoder's rate, after half an epoch of bench/accuracy.py's setting, the CRF head reached HasAns F1 18.7
# against the span head's 30.9, at 10 to 100 times it 28-32. On the full setting with its default
# `span_end` tags, 10 times did better than 30 on both HasAns F1 and best_f1 (61.86 / 51.88 against
# 60.36 / 50.89, the 30 measured on another, slower CPU; the README's CRF head section).
HEAD_LR_MULTIPLIERS = {"span": 1.0, "crf": 10.0}

CHOICES = {
    "head": HEAD_NAMES,
    "crf_tags": CRF_TAGGINGS,
    "eval_metric": SELECTION_METRICS,
    "preset": tuple(preset_names()),
}


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW (no decay on biases and LayerNorm weights) with linear warmup, then linear decay to 0."""

    # warmup given as a share of the run replaces a step count (spanqa.flags.alternatives)
    ALTERNATIVES: ClassVar[dict[str, str]] = {"warmup_proportion": "warmup_steps"}

    learning_rate: float = 3e-5
    """Peak learning rate of AdamW (after warmup, then linear decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    head_lr_multiplier: float | None = None
    """The answer head's learning rate (its linear layer, the CRF's transitions) over --learning_rate.
    Default: 1 for the span head, 10 for the CRF head (measured: the README's CRF head section)."""
    adam_epsilon: float = 1e-6
    """AdamW epsilon (BERT's value)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables); written into the DeepSpeed config."""
    warmup_steps: int | None = 500
    """Linear warmup steps; when None, warmup_proportion of the total steps is used."""
    warmup_proportion: float = 0.1
    """Warmup as a fraction of the total optimizer steps (used when warmup_steps is None)."""

    def __post_init__(self) -> None:
        for name in ("learning_rate", "head_lr_multiplier"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise SpanqaError(f"--{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
            if getattr(self, name) < 0:
                raise SpanqaError(f"--{name}: must not be negative, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SpanqaError(f"--warmup_steps: must not be negative, got {self.warmup_steps}")
        if not 0 <= self.warmup_proportion < 1:
            raise SpanqaError(f"--warmup_proportion: must be in [0, 1), got {self.warmup_proportion}")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a schedule of `total_steps` optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_proportion * total_steps)


@dataclass(frozen=True)
class TrainConfig:
    model: str
    """Encoder: a local Hugging Face directory or a hub name (e.g. SpanBERT/spanbert-base-cased)."""
    output_dir: str
    """Where checkpoints/, best_model/, eval/, train_log.jsonl and mlflow_run_id go."""
    train_file: str | None = None
    """SQuAD JSON or MRQA JSON lines (.jsonl.gz) to train on (prepared into a window store
    automatically); or use --prepared."""
    dev_file: str | None = None
    """SQuAD JSON or MRQA JSON lines to evaluate on, each scored by its official script; without it
    (and without --prepared DIR/dev) there is no eval."""
    prepared: str | None = None
    """A directory with window stores `train/` and optionally `dev/` (`spanqa prepare --out DIR/train`)."""
    cache_dir: str | None = None
    """Where raw JSON files are prepared into window stores; default OUTPUT_DIR/../.spanqa_cache."""
    head: str = "span"
    """Answer head: `span` (start/end logits) or `crf` (tags with a linear-chain CRF)."""
    crf_tags: str = CRF_TAGGINGS[0]
    """The CRF head's tags: `span_end` (the default, measured best: O-before, B, I, E, S, O-after, where
    only "no answer" or exactly one span is a path and the answer's last token is tagged E, or S for a
    one-token answer), `span` (the same without E and S), `bio` (unconstrained BIO) or `bio_masked`
    (BIO without O→I)."""
    preset: str | None = None
    """Start from a shipped recipe: `reference` (the report's) or `spanbert` (SpanBERT's SQuAD 2.0 one)."""
    train_batch_size: int = 8
    """Global batch per optimizer step = micro-batch × gradient_accumulation_steps × world size."""
    eval_batch_size: int = 32
    """Windows per forward pass per process during evaluation."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    num_train_epochs: float = 6.0
    """Epochs over the training windows; fractions allowed (the schedule spans exactly this many)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train to the end). The schedule still spans
    num_train_epochs, so a run stopped here and resumed with --resume auto matches an uninterrupted one."""
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    answers: AnswerSettings = field(default_factory=AnswerSettings)
    eval_metric: str = "best_f1"
    """Metric that picks the best checkpoint: exact, f1, best_exact or best_f1 (on SQuAD v1.1 and
    MRQA dev files, which have no null threshold, best_exact and best_f1 are exact and f1)."""
    eval_per_epoch: int = 1
    """Evaluations per epoch, evenly spaced (the last one at the end of the epoch); 0: only after the
    last step (and every --eval_steps)."""
    eval_steps: int = 0
    """Also evaluate every this many optimizer steps (0: only per epoch)."""
    logging_steps: int = 10
    """Metrics are read from the device, reduced across ranks and logged every this many steps."""
    seed: int = 42
    """Seed of the model head initialisation, dropout and the data order."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON; default ds_configs/cpu_fp32.json on CPU, bf16_zero1.json on CUDA with bf16."""
    resume: str = "none"
    """`none`, `auto` (latest complete checkpoint in OUTPUT_DIR/checkpoints) or a checkpoint directory."""
    overwrite_output_dir: bool = False
    """Start a fresh run in an --output_dir that holds one: first remove that run's checkpoints, logs,
    model and eval files (nothing else). Without it, such a directory is refused."""
    keep_checkpoints: int = 1
    """Complete checkpoints kept while the run is unfinished (the newest); a run that trains to its end
    removes them (best_model/ and eval/ are what it leaves)."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    compile: bool = False
    """torch.compile the model (in place, so checkpoints keep their parameter names)."""
    tag: str | None = None
    """MLflow tag `spanqa.tag`, shared by runs that are compared (e.g. the SLURM head comparison)."""
    run_name: str | None = None
    """MLflow run name."""
    verbose: bool = False
    """Also show DeepSpeed's own info lines (its config, the engine's set-up) and every rank's progress."""
    register_model: str | None = None
    """Register the best model (logged to the MLflow run as the MLflow model `model`) in the Model
    Registry under this name, as a new version."""
    system_metrics: bool = True
    """MLflow system metrics on rank 0 (CPU, memory, disk, network; GPU with nvidia-ml-py), every 10 s;
    needs psutil (without it, none are logged)."""
    log_param_checksum: bool = False
    """Debugging: every rank appends a parameter checksum per step to OUTPUT_DIR/param_checksums/."""

    def __post_init__(self) -> None:
        for name, minimum in (
            ("train_batch_size", 1),
            ("eval_batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("eval_per_epoch", 0),
            ("eval_steps", 0),
            ("logging_steps", 1),
            ("max_steps", 0),
            ("num_workers", 0),
            ("keep_checkpoints", 1),
        ):
            if getattr(self, name) < minimum:
                raise SpanqaError(f"--{name}: must be at least {minimum}, got {getattr(self, name)}")
        threshold = self.answers.null_score_diff_threshold
        if threshold is not None and not math.isfinite(threshold):
            raise SpanqaError(
                "--null_score_diff_threshold: must be finite (to always answer, train with "
                "--no-version_2_with_negative)"
            )
        if not self.num_train_epochs > 0:
            raise SpanqaError(f"--num_train_epochs: must be positive, got {self.num_train_epochs}")
        if self.train_batch_size % self.gradient_accumulation_steps:
            raise SpanqaError(
                f"--train_batch_size: {self.train_batch_size} is not divisible by "
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise SpanqaError(f"--{name}: must be one of {', '.join(allowed)}, got {value!r}")
        self._check_paths()
        self._resolve_version_2()
        self._resolve_head_lr_multiplier()

    def _resolve_head_lr_multiplier(self) -> None:
        """--head_lr_multiplier from the head when not given (HEAD_LR_MULTIPLIERS)."""
        if self.optimizer.head_lr_multiplier is None:
            multiplier = HEAD_LR_MULTIPLIERS[self.head]
            # frozen: as in _resolve_version_2, resolved once here before anyone reads it
            object.__setattr__(self, "optimizer", replace(self.optimizer, head_lr_multiplier=multiplier))

    def _resolve_version_2(self) -> None:
        """--version_2_with_negative from the data when not given: off when any data is MRQA."""
        mrqa = [source for source, kind in data_formats(self) if kind == MRQA]
        wanted = self.answers.version_2_with_negative
        if wanted and mrqa:
            raise SpanqaError(
                f"--version_2_with_negative: {mrqa[0]} is MRQA data, which has no unanswerable questions "
                "(leave the flag out: it is off for MRQA)"
            )
        if wanted is None:
            # frozen: the resolved value replaces the unresolved one once, here, before anyone reads it
            object.__setattr__(self, "answers", replace(self.answers, version_2_with_negative=not mrqa))

    def _check_paths(self) -> None:
        if self.prepared is None and self.train_file is None:
            raise SpanqaError("--train_file: required (or --prepared DIR with a train/ window store)")
        for flag in ("train_file", "dev_file"):
            path = getattr(self, flag)
            if path is not None and not Path(path).is_file():
                raise SpanqaError(f"--{flag}: {path}: no such file")
        if self.prepared is not None and not (Path(self.prepared) / "train" / "meta.json").is_file():
            raise SpanqaError(
                f"--prepared: {self.prepared}: has no window store train/ (train/meta.json missing)"
            )
        if self.deepspeed_config is not None and not Path(self.deepspeed_config).is_file():
            raise SpanqaError(f"--deepspeed_config: {self.deepspeed_config}: no such file")
        if looks_like_local_path(self.model) and not Path(self.model).expanduser().is_dir():
            raise SpanqaError(f"--model: {self.model}: no such directory")
        if self.resume not in ("none", "auto") and not Path(self.resume).is_dir():
            raise SpanqaError(f"--resume: {self.resume}: no such checkpoint directory (or use auto, none)")
        if self.register_model is not None and not self.register_model.strip():
            raise SpanqaError("--register_model: empty name")
        if self.register_model is not None and not self._evaluates():
            raise SpanqaError(
                "--register_model: needs an evaluation to pick the best model (--dev_file, or --prepared "
                "DIR with a dev/ window store)"
            )
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise SpanqaError(f"--output_dir: {self.output_dir}: exists and is not a directory")

    def _evaluates(self) -> bool:
        return self.dev_file is not None or (
            self.prepared is not None and (Path(self.prepared) / "dev" / "meta.json").is_file()
        )

    def to_dict(self) -> dict:
        return asdict(self)


def data_formats(config: TrainConfig) -> list[tuple[str, str]]:
    """(file, SQUAD or MRQA) of the run's data: its JSON files by content, --prepared stores by the
    format their meta.json records."""
    found = [(path, detect_format(path)) for path in (config.train_file, config.dev_file) if path]
    if config.prepared is not None:
        for role in ("train", "dev"):
            meta_file = Path(config.prepared) / role / "meta.json"
            if meta_file.is_file():
                meta = read_json(meta_file, "window store meta")
                source = meta.get("source", {}) if isinstance(meta, dict) else {}
                found.append((source.get("path", str(meta_file)), source.get("format", SQUAD)))
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = flags.FlagParser(
        prog="launcher/train.py",
        usage="%(prog)s --model MODEL --output_dir DIR (--train_file FILE | --prepared DIR) [options]",
        description="Fine-tune a span-extraction QA model (SpanBERT run_squad.py-compatible flags).",
        argument_default=argparse.SUPPRESS,  # so that only explicit flags override the preset
    )
    flags.add_flags(parser, TrainConfig, CHOICES)
    # `deepspeed` passes --local_rank to every process; the same value is in LOCAL_RANK.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def parse_train_args(argv: list[str], prog: str = "launcher/train.py") -> TrainConfig:
    """Flags → TrainConfig: defaults, then the preset, then explicit flags; SpanqaError names the flag."""
    parser = build_parser()
    parser.prog = prog
    explicit = vars(parser.parse_args(argv))
    explicit.pop("local_rank", None)
    flags.refuse_both_ways(explicit, TrainConfig)
    for required in ("model", "output_dir"):
        if required not in explicit:
            raise SpanqaError(f"--{required}: required")
    values = {}
    for layer in (load_preset(explicit["preset"]) if "preset" in explicit else {}, explicit):
        flags.apply_layer(values, layer, TrainConfig)
    return flags.build(TrainConfig, values)


def flags_table() -> str:
    """The README's flags table (Markdown), made from the fields: a test keeps the two equal."""
    return flags.markdown_table(TrainConfig)

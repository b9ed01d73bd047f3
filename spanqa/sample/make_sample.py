"""Cut the bundled demo sample out of real SQuAD v2.0 files (how spanqa/sample/*.json were made).

    python spanqa/sample/make_sample.py ../shared/data/squad2 spanqa/sample \\
        --train_questions 2400 --unanswerable_share 0.334 --dev_questions 500 --dev_articles 18

Whole paragraphs only, never a question twice, and no article in both files.

Dev: paragraphs round-robin across the official dev set's first --dev_articles articles until
--dev_questions, so it keeps their topics and the dev set's answerable/unanswerable mix (about half).

Train: a third of the real train set's questions are unanswerable, but the train file at hand (its first
10 articles) holds only 348 of them (7.4%), too few for a sample of more than ~1,000 questions with the
real mix. So the unanswerable questions come from the paragraphs that hold them, round-robin over the
train file's articles and the dev set's other articles (after --dev_articles), until the sample has
--unanswerable_share of --train_questions; then answerable-only paragraphs of the train file,
round-robin, fill it up to --train_questions.
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


def take_with_share(articles: list[dict], questions: int, share: float) -> list[list[dict]]:
    """Paragraphs per article: ones with unanswerable questions round-robin until `share` of
    `questions` are unanswerable, then answerable-only ones round-robin up to `questions`."""
    kept = [[] for _ in articles]
    impossible = taken = 0
    for i, paragraph in round_robin(articles):
        if unanswerable(paragraph) and impossible < share * questions:
            kept[i].append(paragraph)
            impossible += unanswerable(paragraph)
            taken += len(paragraph["qas"])
    for i, paragraph in round_robin(articles):
        if taken >= questions:
            break
        if not unanswerable(paragraph):
            kept[i].append(paragraph)
            taken += len(paragraph["qas"])
    # back in each article's own order
    return [
        sorted(ps, key=lambda p, a=a: a["paragraphs"].index(p)) for ps, a in zip(kept, articles, strict=True)
    ]


def write_sample(version: str, articles: list[dict], kept: list[list[dict]], out: Path) -> tuple[int, int]:
    chosen = [{"title": a["title"], "paragraphs": ps} for a, ps in zip(articles, kept, strict=True) if ps]
    write_text(out, json.dumps({"version": version, "data": chosen}, ensure_ascii=False))
    paragraphs = [p for a in chosen for p in a["paragraphs"]]
    return sum(len(p["qas"]) for p in paragraphs), sum(unanswerable(p) for p in paragraphs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("squad_dir", type=Path, help="folder with the SQuAD v2.0 source files")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train_questions", type=int, default=2400)
    parser.add_argument("--unanswerable_share", type=float, default=0.334, help="of the train sample")
    parser.add_argument("--dev_questions", type=int, default=500)
    parser.add_argument(
        "--dev_articles", type=int, default=18, help="dev articles the dev sample is cut from"
    )
    args = parser.parse_args()
    train = json.loads((args.squad_dir / "train-v2.0.first10articles.json").read_text(encoding="utf-8"))
    dev = json.loads((args.squad_dir / "dev-v2.0.json").read_text(encoding="utf-8"))
    dev_part, train_part = dev["data"][: args.dev_articles], dev["data"][args.dev_articles :]
    pool = train["data"] + train_part
    kept = take_with_share(pool, args.train_questions, args.unanswerable_share)
    n, u = write_sample(train["version"], pool, kept, args.out_dir / "train.json")
    print(f"train.json: {n} questions, {u} unanswerable ({100 * u / n:.1f}%)")
    kept = take_round_robin(dev_part, args.dev_questions)
    n, u = write_sample(dev["version"], dev_part, kept, args.out_dir / "dev.json")
    print(f"dev.json: {n} questions, {u} unanswerable ({100 * u / n:.1f}%)")


if __name__ == "__main__":
    main()

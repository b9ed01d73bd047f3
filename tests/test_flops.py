"""The FLOP formula against torch's own FLOP counter, and the device peak table."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel

from spanqa.flops import (
    EncoderShape,
    batch_train_flops,
    device_peak,
    forward_flops,
    measured_matmul_peak,
    table_peak,
    train_flops,
)
from spanqa.model.heads import CRFHead, SpanHead

TINY = dict(
    vocab_size=1000,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=512,
)


def tiny_encoder_and_head(head: str) -> tuple[BertConfig, BertModel, nn.Linear]:
    torch.manual_seed(0)
    # Eager attention: its Q·Kᵀ and softmax·V are plain matmuls the counter sees; torch's counter
    # has no entry for the CPU SDPA kernel (it counts only the CUDA flash/efficient/cuDNN kernels).
    config = BertConfig(**TINY, attn_implementation="eager")
    encoder = BertModel(config, add_pooling_layer=False)
    # the heads' own linear layers, so that the formula's head outputs are checked against the model's
    linear = (
        SpanHead(config.hidden_size).qa_outputs if head == "span" else CRFHead(config.hidden_size).emission
    )
    return config, encoder, linear


def counted_train_flops(encoder: BertModel, head: nn.Linear, batch: int, length: int) -> tuple[int, int]:
    """(forward, forward + backward) FLOPs of one training step, as torch's FlopCounterMode counts them."""
    input_ids = torch.randint(0, TINY["vocab_size"], (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = head(hidden)
        forward = counter.get_total_flops()
        # Any loss will do: it is element-wise, and the backward's matmuls do not depend on it.
        logits.float().logsumexp(dim=1).sum().backward()
    return forward, counter.get_total_flops()


@pytest.mark.parametrize("head", ["span", "crf"])
@pytest.mark.parametrize("length", [16, 120])
def test_formula_matches_torch_flop_counter_on_a_tiny_bert(head, length):
    config, encoder, linear = tiny_encoder_and_head(head)
    shape = EncoderShape.from_config(config, head)
    forward, total = counted_train_flops(encoder, linear, batch=3, length=length)
    # torch counts the same thing the formula does (matmuls: projections, FFN, attention, head), so
    # they agree exactly; softmax, layer norm, GELU and the embedding look-ups are counted by neither.
    assert forward == 3 * forward_flops(shape, length)
    assert total == 3 * train_flops(shape, length)
    assert total == 3 * forward  # backward = 2× forward: the first layer's input needs its gradient too


def test_bert_base_follows_the_2n_per_token_rule_plus_attention():
    shape = EncoderShape(num_layers=12, hidden_size=768, intermediate_size=3072, head_outputs=2)
    matrix_params = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 2  # 84.9M weights that multiply tokens
    for length in (128, 384):
        attention = 12 * 2 * 2 * length * length * 768
        assert forward_flops(shape, length) == 2 * matrix_params * length + attention
    # The attention share grows with the window: ~2.7% of BERT-base's forward at 128 tokens, ~7.7% at 384.
    assert 12 * 4 * 384 * 384 * 768 / forward_flops(shape, 384) == pytest.approx(0.0769, abs=0.001)
    long, short = forward_flops(shape, 256), forward_flops(shape, 128)
    assert long - 2 * short == 12 * 4 * 768 * (256 * 256 - 2 * 128 * 128)


def test_a_bucketed_batch_is_counted_on_its_real_tokens_not_its_padding():
    shape = EncoderShape(num_layers=2, hidden_size=64, intermediate_size=128, head_outputs=2)
    lengths = [100, 37, 64]
    assert batch_train_flops(shape, lengths) == sum(train_flops(shape, n) for n in lengths)
    assert batch_train_flops(shape, lengths) < 3 * train_flops(shape, 104)  # padded to 104, a multiple of 8


@pytest.mark.parametrize(
    "name,dtype,row,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.4),
        ("NVIDIA H100 80GB HBM3", "tf32", "H100 SXM", 494.7),
        ("NVIDIA H100 PCIe", "fp16", "H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", "bf16", "H100 NVL", 835.5),
        ("NVIDIA H200", "fp16", "H200 SXM", 989.5),
        ("NVIDIA H200 NVL", "bf16", "H200 NVL", 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", "A100", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", "A100", 19.5),
    ],
)
def test_peak_table_knows_the_datacenter_gpus(name, dtype, row, tflops):
    assert table_peak(name, dtype) == (row, tflops * 1e12)


def test_an_unknown_gpu_is_not_in_the_table():
    assert table_peak("NVIDIA GeForce RTX 4090", "bf16") is None


def test_cpu_peak_is_measured_from_a_matmul():
    flops, n = measured_matmul_peak(torch.device("cpu"), "fp32", repeats=2, min_seconds=0.005, max_n=512)
    assert flops > 1e8 and n == 512
    peak = device_peak(torch.device("cpu"), "fp32")
    assert peak.source.startswith("measured:") and peak.flops_per_s > 1e8 and peak.dtype == "fp32"

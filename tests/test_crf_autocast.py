"""The CRF computes in float32 inside an autocast region too (here CPU bf16 autocast, which runs matrix
products in bf16 as CUDA's does; tests/test_gpu.py checks CUDA's bf16 and fp16)."""

from __future__ import annotations

import pytest
import torch

from spanqa.model.crf import CRF


@pytest.mark.parametrize("num_tags", [3, 5])
def test_log_likelihood_gradients_and_viterbi_ignore_an_autocast_region(num_tags):
    torch.manual_seed(num_tags)
    crf = CRF(num_tags)
    with torch.no_grad():
        for p in crf.parameters():
            p.uniform_(-2.0, 2.0)
    emissions = (torch.randn(4, 60, num_tags) * 3).bfloat16()  # what a bf16 emission layer gives
    tags = torch.randint(0, num_tags, (4, 60))
    mask = torch.arange(60).view(1, -1) < torch.tensor([[60], [41], [1], [17]])

    def run(autocast: bool):
        crf.zero_grad()
        leaf = emissions.float().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            llh = crf(leaf, tags, mask, reduction="none")
            score, path = crf.viterbi(leaf, mask)
        llh.sum().backward()  # outside the region, as autocast's documentation asks
        grads = [leaf.grad] + [p.grad.clone() for p in crf.parameters()]
        return llh.detach(), grads, score, path

    plain, inside = run(autocast=False), run(autocast=True)
    assert inside[0].dtype == torch.float32
    torch.testing.assert_close(inside[0], plain[0], rtol=0, atol=0)
    for got, expected in zip(inside[1], plain[1], strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(inside[2], plain[2], rtol=0, atol=0)
    assert torch.equal(inside[3], plain[3])

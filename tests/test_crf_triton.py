"""The fused Triton CRF kernels against the torch scan, run under Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when `@triton.jit` runs (at import of spanqa.model.crf_triton), so the
comparison runs in a fresh interpreter process with the variable set; this file is that script.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


@pytest.mark.skipif(
    triton_import_error() is not None, reason=f"triton cannot be imported: {triton_import_error()}"
)
def test_fused_kernels_match_the_torch_scan_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cases checked: 3" in result.stdout


def check_case(num_tags: int, dtype: torch.dtype, seed: int, tagging: str | None = None) -> None:
    """`tagging`: a CRF head tag scheme whose hard constraints the CRF carries (num_tags must match)."""
    from spanqa.model import crf_triton
    from spanqa.model.crf import CRF
    from spanqa.model.tagging import TAGGINGS

    torch.manual_seed(seed)
    crf = (CRF(num_tags) if tagging is None else TAGGINGS[tagging].crf()).to(dtype)
    assert crf.num_tags == num_tags
    with torch.no_grad():
        for p in crf.parameters():
            p.uniform_(-2.0, 2.0)
    length = 9
    starts = torch.tensor([[0], [3], [8], [2], [1]])
    lengths = torch.tensor([[9], [4], [1], [0], [6]])  # full, late block, single token, empty, middle
    positions = torch.arange(length).view(1, -1)
    mask = (positions >= starts) & (positions < starts + lengths)
    emissions = (torch.randn(5, length, num_tags, dtype=dtype) * 3).requires_grad_(True)
    tol = {"atol": 1e-9, "rtol": 0} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-5}

    prepared, active = crf._prepare(emissions, mask)
    params = crf._params(prepared.dtype)
    weights = torch.arange(1, 6, dtype=dtype)  # distinct upstream gradients per row
    fused = crf_triton.log_partition(prepared, active, *params)
    reference = crf.log_partition(emissions, mask)
    torch.testing.assert_close(fused, reference, **tol)
    inputs = [emissions, *crf.parameters()]
    for got, expected in zip(
        torch.autograd.grad((fused * weights).sum(), inputs),
        torch.autograd.grad((reference * weights).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(got, expected, **tol)

    detached = [prepared.detach(), active] + [p.detach() for p in params]
    marg = crf_triton.marginals(detached[0], active, *detached[2:])
    torch.testing.assert_close(marg, crf.marginals(emissions, mask), **tol)
    score, tags = crf_triton.viterbi(detached[0], active, *detached[2:])
    ref_score, ref_tags = crf.viterbi(emissions, mask)
    torch.testing.assert_close(score, ref_score, **tol)
    assert torch.equal(tags, ref_tags)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    cases = [(3, torch.float64, 0), (5, torch.float32, 1), (4, torch.float64, 2, "span")]
    for case in cases:
        check_case(*case)
    print(f"cases checked: {len(cases)}")


if __name__ == "__main__":
    main()

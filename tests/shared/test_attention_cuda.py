"""shared.attention on a CUDA GPU in fp16 and bf16: every backend there against the reference, and the cases that
flash-attn's kernels (and SDPA's) cannot launch on. Skipped without a GPU: ``infra/gpu_check.sh`` runs it.

With flash-attn installed the automatic choice is flash-attn wherever it can run; without it these check SDPA's
CUDA kernels, and the flash-attn branches stay covered by the CPU double only (``tests/shared/flash_double.py``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.attention import (
    attention,
    available_backends,
    select_backend,
    twice_differentiable,
    varlen_attention,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: {"atol": 4e-3, "rtol": 4e-3}, torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}
GRAD_TOL = {torch.float16: {"atol": 2e-2, "rtol": 2e-2}, torch.bfloat16: {"atol": 8e-2, "rtol": 8e-2}}


def _qkv(b: int = 2, h: int = 4, lq: int = 33, lk: int = 33, d: int = 64, hk: int | None = None,
         dtype: torch.dtype = torch.float16, grad: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = ((b, h, lq, d), (b, hk or h, lk, d), (b, hk or h, lk, d))
    return tuple(torch.randn(*s, generator=g, device="cuda", dtype=dtype).requires_grad_(grad)  # type: ignore[return-value]
                 for s in shapes)


def _padding(b: int, lk: int, lengths: list[int]) -> Tensor:
    return (torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]).cuda()


def _cu(lengths: list[int]) -> Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32).cuda()


def _both(out: Tensor, want: Tensor, inputs: tuple[Tensor, ...], dtype: torch.dtype) -> None:
    torch.testing.assert_close(out, want, **TOL[dtype])
    grads = torch.autograd.grad(out.float().pow(2).sum(), inputs)
    ref_grads = torch.autograd.grad(want.float().pow(2).sum(), inputs)
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, **GRAD_TOL[dtype])


CASES: dict[str, tuple[dict[str, int], Any]] = {
    "plain": ({}, lambda b, lk: {}),
    "causal": ({}, lambda b, lk: {"causal": True}),
    "key_padding": ({}, lambda b, lk: {"key_padding_mask": _padding(b, lk, [lk, 5])}),
    "cross_padding": ({"lq": 17, "lk": 40}, lambda b, lk: {"key_padding_mask": _padding(b, lk, [3, 40])}),
    "gqa": ({"hk": 2}, lambda b, lk: {"causal": True}),
    "head_dim_256": ({"d": 256}, lambda b, lk: {}),
    "head_dim_72": ({"d": 72}, lambda b, lk: {}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_auto_and_every_backend_match_the_reference(dtype: torch.dtype, case: str) -> None:
    shape, make = CASES[case]
    q, k, v = _qkv(dtype=dtype, **shape)
    kwargs = make(q.shape[0], k.shape[2])
    want = attention(q, k, v, backend="reference", **kwargs)
    for backend in [None, *(b for b in available_backends() if b != "reference")]:
        try:
            out = attention(q, k, v, backend=backend, **kwargs)
        except ValueError as error:  # a forced flash-attn that cannot run these inputs says why
            assert backend == "flash_attn" and "cannot run" in str(error)
            continue
        _both(out, want, (q, k, v), dtype)


def test_flash_attn_is_chosen_on_this_gpu_when_installed() -> None:
    q, k, v = _qkv()
    expected = "flash_attn" if "flash_attn" in available_backends() else "sdpa"
    assert select_backend(q, k, v) == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_matches_per_sequence_reference(dtype: torch.dtype) -> None:
    lengths = [5, 1, 80, 33, 0, 7]
    q, k, v = (torch.randn(sum(lengths), 4, 64, device="cuda", dtype=dtype).requires_grad_() for _ in range(3))
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    want = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=True, backend="reference")
    _both(out, want, (q, k, v), dtype)
    # cu_seqlens on the CPU and as int64, lengths as tensors: still accepted
    again = varlen_attention(q, k, v, cu.cpu().long(), cu.cpu().long(), torch.tensor(80), 80, causal=True)  # type: ignore[arg-type]
    torch.testing.assert_close(again, out)


def test_a_cpu_mask_beside_gpu_tensors_is_refused_clearly() -> None:
    q, k, v = _qkv(grad=False)
    with pytest.raises(ValueError, match="key_padding_mask is on cpu but q on cuda"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 33, dtype=torch.bool))


@pytest.mark.parametrize("shape", [{"lq": 0}, {"lk": 0}, {"b": 0}])
def test_inputs_with_no_elements(shape: dict[str, int]) -> None:
    q, k, v = _qkv(**shape)
    out = attention(q, k, v)
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and not out.any()
    out.float().sum().backward()
    assert q.grad is not None and not q.grad.any()


def test_no_real_key_in_the_batch_gives_zeros_and_zero_gradients() -> None:
    q, k, v = _qkv()
    out = attention(q, k, v, key_padding_mask=torch.zeros(2, 33, dtype=torch.bool, device="cuda"))
    assert not out.any()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(not g.any() for g in grads)


@pytest.mark.parametrize("d", [200, 256])
def test_large_head_dims_with_dropout_give_finite_gradients(d: int) -> None:
    q, k, v = _qkv(d=d, lq=128, lk=128)
    out = attention(q, k, v, dropout_p=0.1)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)


def test_more_sequences_than_a_cuda_grid_holds() -> None:
    q, k, v = _qkv(b=70_000, h=1, lq=4, lk=4)
    out = attention(q, k, v)
    pick = torch.tensor([0, 65_534, 65_535, 65_536, 69_999], device="cuda")
    want = attention(q[pick], k[pick], v[pick], backend="reference")
    torch.testing.assert_close(out[pick], want, **TOL[torch.float16])
    out.float().sum().backward()
    lengths = [3] * 70_000
    packed = torch.randn(sum(lengths), 2, 64, device="cuda", dtype=torch.float16)
    cu = _cu(lengths)
    out = varlen_attention(packed, packed, packed, cu, cu, 3, 3)
    torch.testing.assert_close(out[-3:], varlen_attention(packed[-3:], packed[-3:], packed[-3:], _cu([3]), _cu([3]),
                                                          3, 3, backend="reference"), **TOL[torch.float16])


def test_a_double_backward_outside_twice_differentiable_raises() -> None:
    q, k, v = _qkv()
    with pytest.raises(RuntimeError):
        out = attention(q, k, v)
        (grad_q,) = torch.autograd.grad(out.float().pow(2).sum(), q, create_graph=True)
        grad_q.float().sum().backward()
    with twice_differentiable():
        out = attention(q, k, v)
        (grad_q,) = torch.autograd.grad(out.float().pow(2).sum(), q, create_graph=True)
        grad_q.float().sum().backward()
    assert k.grad is not None and bool(torch.isfinite(k.grad).all())


def test_deterministic_algorithms_give_identical_gradients() -> None:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            q, k, v = _qkv(lq=512, lk=512, d=128)
            out = attention(q, k, v, causal=True)
            runs.append(torch.autograd.grad(out.float().sum(), (q, k, v)))
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)

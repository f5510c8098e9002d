"""shared.attention: every backend against the explicit reference, dispatch, varlen, masks and input checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import shared.attention as attn_mod
from shared.attention import (
    ENV_VAR,
    MultiHeadAttention,
    attention,
    available_backends,
    pack,
    select_backend,
    twice_differentiable,
    unpack,
    varlen_attention,
)
from tests.shared.flash_double import FlashDouble, FlashRuleError

TOL = {"atol": 2e-5, "rtol": 1e-4}
HALF_TOL = {"atol": 2e-2, "rtol": 2e-2}  # bf16 results of two orders of summation
HALF = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def _qkv(b: int = 2, h: int = 3, lq: int = 7, lk: int = 7, d: int = 16, dv: int | None = None,
         seed: int = 0, dtype: torch.dtype = torch.float32, hk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hk or h, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hk or h, lk, dv or d, generator=g).to(dtype)
    return q, k, v


def _padding(b: int, lk: int, lengths: list[int]) -> Tensor:
    return torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]  # (B, Lk), True = real


def _cpu_backends() -> list[str]:
    return [b for b in available_backends() if b != "flash_attn"]  # flash-attn runs on CUDA only


def _fast_cpu_backends() -> list[str]:
    return [b for b in _cpu_backends() if b != "reference"]


# name -> (shape kwargs, attention kwargs builder)
CASES: dict[str, tuple[dict[str, int], Any]] = {
    "plain": ({}, lambda b, h, lq, lk: {}),
    "bool_mask": ({}, lambda b, h, lq, lk: {"attn_mask": torch.rand(b, 1, lq, lk) > 0.3}),
    "float_mask": ({}, lambda b, h, lq, lk: {"attn_mask": torch.randn(lq, lk)}),
    "float_mask_inf": ({}, lambda b, h, lq, lk: {
        "attn_mask": torch.where(torch.rand(b, h, lq, lk) > 0.3, 0.0, float("-inf"))}),
    "key_padding": ({}, lambda b, h, lq, lk: {"key_padding_mask": _padding(b, lk, [lk, 3])}),
    "causal": ({}, lambda b, h, lq, lk: {"causal": True}),
    "cross": ({"lq": 5, "lk": 11}, lambda b, h, lq, lk: {}),
    "cross_causal": ({"lq": 5, "lk": 11}, lambda b, h, lq, lk: {"causal": True}),
    "cross_padding": ({"lq": 5, "lk": 11}, lambda b, h, lq, lk: {"key_padding_mask": _padding(b, lk, [4, 11])}),
    "scale": ({}, lambda b, h, lq, lk: {"scale": 0.37}),
    "value_dim": ({"dv": 24}, lambda b, h, lq, lk: {}),
    "everything": ({"lq": 6, "lk": 9}, lambda b, h, lq, lk: {
        "attn_mask": torch.rand(lq, lk) > 0.2, "key_padding_mask": _padding(b, lk, [9, 6]), "causal": True,
        "scale": 0.2}),
}


def _reference_by_hand(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """softmax(QKᵀ·scale) V with a bool mask, written out independently of shared.attention."""
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1)) @ v


def test_reference_matches_a_hand_written_softmax() -> None:
    q, k, v = _qkv(lq=5, lk=9, dtype=torch.float64)
    mask = (torch.rand(2, 1, 5, 9) > 0.3) & torch.ones(5, 9, dtype=torch.bool).tril()
    mask[..., 0] = True
    out = attention(q, k, v, attn_mask=mask, causal=True, backend="reference", scale=0.3)
    torch.testing.assert_close(out, _reference_by_hand(q, k, v, mask, 0.3))
    default = attention(q, k, v, backend="reference")
    torch.testing.assert_close(default, _reference_by_hand(q, k, v, torch.ones(5, 9, dtype=torch.bool),
                                                           1 / math.sqrt(16)))


@pytest.mark.parametrize("backend", _fast_cpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference_forward_and_backward(backend: str, case: str) -> None:
    shape, make_kwargs = CASES[case]
    torch.manual_seed(1)
    q, k, v = _qkv(**shape)
    kwargs = make_kwargs(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    grads = []
    outs = []
    for name in (backend, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, backend=name, **kwargs)
        out.backward(torch.ones_like(out) + torch.arange(out.shape[-1]) / out.shape[-1])
        outs.append(out.detach())
        grads.append([t.grad for t in leaves])
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_sdpa_matches_reference_in_float64_and_bfloat16() -> None:
    q, k, v = _qkv(dtype=torch.float64, lq=9, lk=13)
    mask = torch.rand(9, 13) > 0.3
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask, backend="sdpa"),
                               attention(q, k, v, attn_mask=mask, backend="reference"), atol=1e-12, rtol=1e-10)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    out = attention(qb, kb, vb, backend="sdpa")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), attention(q, k, v, backend="reference"), atol=3e-2, rtol=3e-2)


# ----------------------------------------------------------------------------------------------------------------
# fully-masked rows


def _dead_row_inputs() -> list[tuple[str, dict[str, Any], Tensor]]:
    """(label, kwargs, dead (B, H, Lq) bool) triples whose marked query rows may attend to nothing."""
    b, h, lq, lk = 2, 3, 6, 6
    bool_mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    bool_mask[0, 0, 2] = False
    float_mask = torch.zeros(lq, lk)
    float_mask[4] = float("-inf")
    empty = _padding(b, lk, [0, 4])  # batch 0 has no real key
    left_padded = torch.arange(lk)[None, :] >= torch.tensor([2, 0])[:, None]  # batch 0: two padding keys first
    out = []
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[0, :, 2] = True
    out.append(("bool", {"attn_mask": bool_mask}, dead))
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[:, :, 4] = True
    out.append(("float", {"attn_mask": float_mask}, dead))
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[0] = True
    out.append(("empty_sequence", {"key_padding_mask": empty}, dead))
    dead = torch.zeros(b, h, lq, dtype=torch.bool)
    dead[0, :, :2] = True
    out.append(("causal_left_padding", {"key_padding_mask": left_padded, "causal": True}, dead))
    return out


@pytest.mark.parametrize("patched_device", [False, True], ids=["native", "guarded"])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_fully_masked_rows_give_zeros_not_nan(backend: str, patched_device: bool,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if patched_device:  # exercise the guard used on devices whose SDPA kernels may return NaN
        monkeypatch.setattr(attn_mod, "_SDPA_SAFE_DEVICES", set())
    for label, kwargs, dead in _dead_row_inputs():
        q, k, v = (t.requires_grad_(True) for t in _qkv(lq=6, lk=6))
        out = attention(q, k, v, backend=backend, **kwargs)
        out.sum().backward()
        assert torch.isfinite(out).all(), label
        assert (out[dead] == 0).all(), label
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), label
        assert (q.grad[dead] == 0).all(), label
        ref = attention(q, k, v, backend="reference", **kwargs)
        torch.testing.assert_close(out, ref, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("backend", _cpu_backends())
def test_dropout_changes_output_but_keeps_its_expectation(backend: str) -> None:
    torch.manual_seed(0)
    q, k, v = _qkv(b=1, h=1, lq=3, lk=5, d=8)
    clean = attention(q, k, v, backend=backend)
    noisy = attention(q, k, v, dropout_p=0.3, backend=backend)
    assert not torch.allclose(noisy, clean)
    n = 20000
    many = attention(*(t.expand(n, -1, -1, -1) for t in (q, k, v)), dropout_p=0.3, backend=backend)
    torch.testing.assert_close(many.mean(0, keepdim=True), clean, atol=0.05, rtol=0.0)


def test_module_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.5)
    x = torch.randn(2, 6, 16)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


# ----------------------------------------------------------------------------------------------------------------
# dispatch


@pytest.fixture
def fake_flash(monkeypatch: pytest.MonkeyPatch) -> FlashDouble:
    """Pretend flash-attn is installed and CPU fp16/bf16 tensors are on a GPU it supports; returns the double
    (which enforces flash-attn's own input rules) with its call log."""
    double = FlashDouble()
    monkeypatch.setattr(attn_mod, "_flash_module", lambda: double)
    monkeypatch.setattr(attn_mod, "_flash_device_problem",
                        lambda t: None if t.dtype in HALF else "flash_attn needs fp16/bf16 tensors")
    monkeypatch.setattr(attn_mod, "_small_shared_memory", lambda t: False)
    return double


def _half(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(torch.bfloat16) for t in tensors)


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap the backend function ``shared.attention.<name>``; the returned list grows by one per call."""
    calls: list[int] = []
    real = getattr(attn_mod, name)

    def spy(*args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attn_mod, name, spy)
    return calls


def test_without_flash_attn_auto_picks_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_flash_module", lambda: None)
    calls = _count_calls(monkeypatch, "_sdpa")
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    assert available_backends() == ["small", "sdpa", "reference"]
    assert select_backend(q, k, v) == "sdpa"
    attention(q, k, v, key_padding_mask=_padding(2, 7, [7, 2]))
    assert calls == [1]
    with pytest.raises(ValueError, match="not installed"):
        attention(q, k, v, backend="flash_attn")


def test_flash_attn_is_skipped_for_cpu_tensors() -> None:
    q, k, v = (t.requires_grad_(True) for t in _qkv())
    assert select_backend(q, k, v) == "sdpa"
    assert "sdpa" in available_backends() and "reference" in available_backends()


# ----------------------------------------------------------------------------------------------------------------
# the "small" CPU backend


def test_small_is_chosen_only_for_short_cpu_inference_in_full_precision() -> None:
    q, k, v = _qkv(lq=5, lk=attn_mod.SMALL_AUTO_MAX_KEYS)
    assert select_backend(q, k, v) == "small"
    assert select_backend(q.double(), k.double(), v.double(), causal=True) == "small"
    with torch.inference_mode():
        assert select_backend(*(t.requires_grad_(True) for t in _qkv())) == "small"  # no graph is built
    assert select_backend(*_qkv(lk=attn_mod.SMALL_AUTO_MAX_KEYS + 1)) == "sdpa"  # longer
    assert select_backend(q, k, v, dropout_p=0.1) == "sdpa"  # dropout: other random draws than SDPA's
    assert select_backend(*(t.requires_grad_(True) for t in _qkv())) == "sdpa"  # training
    assert select_backend(*(t.to(torch.bfloat16) for t in _qkv())) == "sdpa"
    assert select_backend(*_qkv(h=4, hk=2)) == "sdpa"  # grouped-query attention
    with twice_differentiable():
        assert select_backend(q, k, v) == "sdpa"
        with pytest.raises(ValueError, match="double backward"):
            attention(q, k, v, backend="small")
    assert select_backend(q, k, v, dropout_p=0.1, backend="small") == "small"  # asked for by name


def test_small_pads_rows_of_any_length_and_matches_reference() -> None:
    for lk in (1, 15, 16, 17, 40):
        q, k, v = (t.double().requires_grad_(True) for t in _qkv(lq=3, lk=lk))
        out = attention(q, k, v, backend="small")
        want = attention(q, k, v, backend="reference")
        torch.testing.assert_close(out, want)
        grads = torch.autograd.grad((out * want.detach()).sum(), (q, k, v))
        expected = torch.autograd.grad((want * want.detach()).sum(), (q, k, v))
        for got, exp in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, exp)


def test_small_backward_with_dropout_is_the_gradient_of_its_forward() -> None:
    """With the random draws replayed (same seed), the forward is a fixed function: gradcheck its backward."""
    q, k, v = (t.double().requires_grad_(True) for t in _qkv(b=1, h=2, lq=4, lk=6, d=4))
    mask = torch.rand(4, 6) > 0.3

    def dropped(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        torch.manual_seed(7)
        return attention(q, k, v, attn_mask=mask, dropout_p=0.25, backend="small")

    assert torch.autograd.gradcheck(dropped, (q, k, v))
    torch.manual_seed(7)
    out = attention(q, k, v, attn_mask=mask, dropout_p=0.25, backend="small")
    assert not torch.allclose(out, attention(q, k, v, attn_mask=mask, backend="small"))


def test_small_keep_mask_drops_the_requested_fraction() -> None:
    torch.manual_seed(0)
    keep, scale = attn_mod._keep_mask(torch.Size([400, 500]), 0.1, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (400, 500)
    assert abs((~keep).float().mean().item() - 0.1) < 0.005
    assert scale == pytest.approx(1 / (1 - round(0.1 * 65536) / 65536))
    keep, scale = attn_mod._keep_mask(torch.Size([400, 500]), 0.003, torch.device("cpu"))  # 16 bits too coarse
    assert abs((~keep).float().mean().item() - 0.003) < 0.001 and scale == pytest.approx(1 / 0.997)


def test_auto_uses_flash_when_present_and_supported(fake_flash: FlashDouble) -> None:
    assert available_backends()[0] == "flash_attn"
    q, k, v = _qkv(dtype=torch.bfloat16)
    assert select_backend(q, k, v) == "flash_attn"
    assert select_backend(q, k, v, causal=True) == "flash_attn"
    padding = _padding(2, 7, [7, 3])
    assert select_backend(q, k, v, key_padding_mask=padding) == "flash_attn"
    assert select_backend(*_qkv(h=4, hk=2, dtype=torch.bfloat16)) == "flash_attn"  # grouped-query attention
    # not expressible in flash-attn: arbitrary masks, top-left causal on Lq != Lk, big or mixed head dims, fp32
    assert select_backend(q, k, v, torch.ones(7, 7, dtype=torch.bool)) == "sdpa"
    assert select_backend(q, k, v, key_padding_mask=padding, causal=True) == "sdpa"
    assert select_backend(*_qkv(lq=3, lk=7, dtype=torch.bfloat16), causal=True) == "sdpa"
    assert select_backend(*_qkv(d=320, dtype=torch.bfloat16)) == "sdpa"
    assert select_backend(*_qkv(dv=8, dtype=torch.bfloat16)) == "sdpa"
    assert select_backend(*_qkv()) == "small"  # fp32: no flash-attn (short CPU inference: small)
    with pytest.raises(ValueError, match="attn_mask"):
        select_backend(q, k, v, torch.ones(7, 7, dtype=torch.bool), backend="flash_attn")


def test_twice_differentiable_gives_second_order_gradients_equal_to_reference() -> None:
    """Training through a gradient (create_graph=True) needs a double backward, which the fused CPU kernel lacks."""
    q, k, v = (t.double().requires_grad_() for t in _qkv())

    def second_order(backend: str | None) -> list[Tensor]:
        out = attention(q, k, v, backend=backend)
        (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        return list(torch.autograd.grad(grad_q.pow(2).sum(), (q, k, v)))

    expected = second_order("reference")
    with twice_differentiable():
        assert select_backend(q, k, v) == "sdpa"
        got = second_order(None)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="not implemented"):  # what the block guards against (fused CPU kernel)
        out = attention(q.float(), k.float(), v.float())
        (grad_q,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
        grad_q.sum().backward()


def test_twice_differentiable_never_picks_flash(fake_flash: FlashDouble) -> None:
    q, k, v = _qkv(dtype=torch.bfloat16)
    with twice_differentiable():
        assert select_backend(q, k, v) == "sdpa"
        with pytest.raises(ValueError, match="double backward"):
            select_backend(q, k, v, backend="flash_attn")
    assert select_backend(q, k, v) == "flash_attn"


@pytest.mark.parametrize("case", ["plain", "causal", "key_padding", "cross", "cross_padding", "scale"])
def test_flash_path_layout_and_varlen_routing(fake_flash: FlashDouble, case: str) -> None:
    shape, make_kwargs = CASES[case]
    q, k, v = (t.requires_grad_() for t in _qkv(**shape, dtype=torch.bfloat16))
    kwargs = make_kwargs(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = attention(q, k, v, **kwargs)
    expected_call = "flash_attn_varlen_func" if "key_padding_mask" in kwargs else "flash_attn_func"
    assert fake_flash.names() == [expected_call]
    assert fake_flash.calls[0]["deterministic"] is False
    grads = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
    want = attention(q, k, v, backend="reference", **kwargs)
    torch.testing.assert_close(out, want, **HALF_TOL)
    for got, ref in zip(grads, torch.autograd.grad(want.float().pow(2).sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, ref, **HALF_TOL)


def test_env_var_forces_a_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv()
    calls = _count_calls(monkeypatch, "_reference")
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend(q, k, v) == "reference"
    attention(q, k, v)
    assert calls == [1]
    assert select_backend(q, k, v, backend="sdpa") == "sdpa"  # an explicit argument wins over the env var
    monkeypatch.setenv(ENV_VAR, "auto")
    assert select_backend(q, k, v) == "small"  # CPU inference of 7 keys
    monkeypatch.setenv(ENV_VAR, "small")
    assert select_backend(q, k, v, dropout_p=0.2) == "small"
    monkeypatch.setenv(ENV_VAR, "flash_attn")
    with pytest.raises(ValueError, match="flash_attn"):
        attention(q, k, v)
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match="unknown attention backend 'triton'"):
        attention(q, k, v)


# ----------------------------------------------------------------------------------------------------------------
# varlen


def _packed(lengths: list[int], h: int = 2, d: int = 8, seed: int = 0) -> Tensor:
    return torch.randn(sum(lengths), h, d, generator=torch.Generator().manual_seed(seed))


def _cu(lengths: list[int]) -> Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", [None, *_cpu_backends()])
def test_varlen_matches_per_sequence_reference(backend: str | None, causal: bool) -> None:
    len_q, len_k = [5, 1, 8, 3], [6, 2, 8, 0]
    q = _packed(len_q, seed=1).requires_grad_(True)
    k = _packed(len_k, seed=2).requires_grad_(True)
    v = _packed(len_k, seed=3).requires_grad_(True)
    cu_q, cu_k = _cu(len_q), _cu(len_k)
    out = varlen_attention(q, k, v, cu_q, cu_k, max(len_q), max(len_k), causal=causal, backend=backend)
    assert out.shape == q.shape
    out.backward(torch.ones_like(out))
    grads = [t.grad for t in (q, k, v)]
    expected = []
    for i in range(len(len_q)):
        sq, sk = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        one = attention(*(t[s].transpose(0, 1)[None] for t, s in ((q, sq), (k, sk), (v, sk))), causal=causal,
                        backend="reference")  # (1, H, Lq_i, D)
        expected.append(one[0].transpose(0, 1))
    want = torch.cat(expected)
    for t in (q, k, v):
        t.grad = None
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out, want, **TOL)
    for got, ref in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, ref, **TOL)
    assert (out[int(cu_q[3]):] == 0).all()  # the last sequence has no keys


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_self_attention_of_very_different_lengths_runs_in_groups_and_matches(causal: bool) -> None:
    from shared.attention import _length_groups, _padded_varlen

    lengths = [3, 40, 17, 90, 0, 25, 200, 1, 44]
    cu = _cu(lengths)
    groups = _length_groups(cu)
    assert len(groups) > 2 and sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    for members in groups:  # padding inside a group stays small
        sizes = torch.tensor(lengths)[members]
        assert int(sizes.max()) <= 16 or int(sizes.max()) <= 1.25 * max(int(sizes.min()), 1)
    q, k, v = (_packed(lengths, seed=s).requires_grad_(True) for s in (7, 8, 9))
    out = varlen_attention(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal)
    out.backward(torch.ones_like(out))
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = _padded_varlen(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, dropout_p=0.0, scale=None,
                          backend="reference")  # one padded call, the plain reference
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out, want, **TOL)
    for got, ref in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, ref, **TOL)


def test_varlen_uses_flash_when_present(fake_flash: FlashDouble) -> None:
    lengths = [4, 7, 2]
    q, k, v = _half(*(_packed(lengths, seed=s) for s in range(3)))
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, cu, 7, 7, causal=True)
    assert fake_flash.names() == ["flash_attn_varlen_func"]
    want = varlen_attention(q, k, v, cu, cu, 7, 7, causal=True, backend="reference")
    torch.testing.assert_close(out, want, **HALF_TOL)
    # causal with different query/key lengths: flash-attn would align bottom-right, so it is not used
    k2, v2 = _half(_packed([5, 7, 3], seed=5), _packed([5, 7, 3], seed=6))
    varlen_attention(q, k2, v2, cu, _cu([5, 7, 3]), 7, 7, causal=True)
    assert fake_flash.names() == ["flash_attn_varlen_func"]


def test_pack_unpack_round_trip() -> None:
    x = torch.randn(3, 6, 4)
    mask = _padding(3, 6, [6, 2, 4])
    packed, cu, max_len = pack(x, mask)
    assert packed.shape == (12, 4) and cu.dtype == torch.int32 and cu.tolist() == [0, 6, 8, 12] and max_len == 6
    back = unpack(packed, cu, 3, 6)
    torch.testing.assert_close(back, x * mask[..., None])


# ----------------------------------------------------------------------------------------------------------------
# MultiHeadAttention


def test_mha_self_attention_equals_its_projections_and_reference() -> None:
    torch.manual_seed(0)
    mha = MultiHeadAttention(24, 4).eval()
    x = torch.randn(2, 5, 24)
    padding = _padding(2, 5, [5, 3])
    q, k, v = (mha.qkv(x).chunk(3, dim=-1))
    split = [t.view(2, 5, 4, 6).transpose(1, 2) for t in (q, k, v)]
    ref = attention(*split, key_padding_mask=padding, backend="reference").transpose(1, 2).reshape(2, 5, 24)
    torch.testing.assert_close(mha(x, key_padding_mask=padding), mha.out_proj(ref), **TOL)


def test_mha_cross_attention_shapes_and_masks() -> None:
    torch.manual_seed(0)
    same = MultiHeadAttention(16, 2)
    x, ctx = torch.randn(3, 4, 16), torch.randn(3, 9, 16)
    assert same(x, ctx).shape == (3, 4, 16)
    other = MultiHeadAttention(16, 2, kv_dim=10, bias=False)
    ctx10 = torch.randn(3, 9, 10)
    out = other(x, ctx10, attn_mask=torch.rand(3, 4, 9) > 0.2, key_padding_mask=_padding(3, 9, [9, 1, 5]))
    assert out.shape == (3, 4, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="cross-attention only"):
        other(x)
    with pytest.raises(ValueError, match="context"):
        same(x, ctx10)
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(10, 4)


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize(("build", "message"), [
    (lambda q, k, v: (q[0], k, v, {}), r"q must be 4-D \(B, H, L, D\)"),
    (lambda q, k, v: (q, k[:, :2], v[:, :2], {}), r"multiple of it \(grouped-query attention\): q 3, k 2"),
    (lambda q, k, v: (q, k, v[:, :1], {}), "the same number of heads"),
    (lambda q, k, v: (q, k[..., :8], v, {}), "head dims differ"),
    (lambda q, k, v: (q, k, v[:, :, :3], {}), "k and v lengths differ"),
    (lambda q, k, v: (q[:1], k, v, {}), "batch sizes differ"),
    (lambda q, k, v: (q, k.double(), v, {}), "share a dtype"),
    (lambda q, k, v: (q, k, v, {"attn_mask": torch.ones(4, 7, 7, dtype=torch.bool)}), "does not broadcast"),
    (lambda q, k, v: (q, k, v, {"attn_mask": torch.ones(7, 7, dtype=torch.int64)}), "bool .* or float"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 6, dtype=torch.bool)}), r"\(B, Lk\)"),
    (lambda q, k, v: (q, k, v, {"key_padding_mask": torch.ones(2, 7)}), "must be bool"),
    (lambda q, k, v: (q, k, v, {"dropout_p": 1.0}), "dropout_p"),
    (lambda q, k, v: (q, k, v, {"backend": "xformers"}), "unknown attention backend"),
])
def test_bad_inputs_raise_clear_value_errors(build: Any, message: str) -> None:
    q, k, v, kwargs = build(*_qkv())
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, **kwargs)


def test_bad_varlen_inputs_raise() -> None:
    q = _packed([3, 4])
    cu = _cu([3, 4])
    with pytest.raises(ValueError, match="3-D"):
        varlen_attention(q[None], q, q, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="multiple of it"):
        varlen_attention(q[:, :1], q, q, cu, cu, 4, 4)
    with pytest.raises(ValueError, match="same number of heads"):
        varlen_attention(q, q, q[:, :1], cu, cu, 4, 4)
    with pytest.raises(ValueError, match="different batch sizes"):
        varlen_attention(q, q, q, cu, _cu([7]), 4, 7)
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] = 6"):
        varlen_attention(q, q, q, cu, _cu([3, 3]), 4, 4)
    with pytest.raises(ValueError, match="integer"):
        varlen_attention(q, q, q, cu.float(), cu, 4, 4)


# ----------------------------------------------------------------------------------------------------------------
# flash-attn's input rules (the double enforces them; these are the cases a GPU would have failed on)


def test_masks_must_be_on_the_device_of_q() -> None:
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_padding_mask is on meta but q on cpu"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="attn_mask is on meta but q on cpu"):
        attention(q, k, v, attn_mask=torch.ones(7, 7, dtype=torch.bool, device="meta"))


def test_flash_varlen_gets_int32_contiguous_cu_seqlens_and_int_lengths(fake_flash: FlashDouble) -> None:
    lengths = [4, 7, 2]
    q, k, v = _half(*(_packed(lengths, seed=s) for s in range(3)))
    cu = _cu(lengths)
    strided = torch.stack([cu, cu], dim=1)[:, 0]  # int32 but not contiguous
    assert not strided.is_contiguous()
    with pytest.raises(FlashRuleError, match="contiguous"):  # what the real kernel says to such a call
        fake_flash.flash_attn_varlen_func(q, k, v, strided, strided, 7, 7)
    with pytest.raises(FlashRuleError, match="int32"):
        fake_flash.flash_attn_varlen_func(q, k, v, cu.long(), cu.long(), 7, 7)
    varlen_attention(q, k, v, cu.long(), cu.long(), 7, 7)
    out = varlen_attention(q, k, v, strided, strided, torch.tensor(7), torch.tensor(7))  # type: ignore[arg-type]
    assert fake_flash.names() == ["flash_attn_varlen_func"] * 2
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, cu, 7, 7, backend="reference"), **HALF_TOL)


@pytest.mark.parametrize("shape", [{"lq": 0}, {"lk": 0}, {"b": 0}])
def test_inputs_with_no_elements_never_reach_flash(fake_flash: FlashDouble, shape: dict[str, int]) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(**shape, dtype=torch.bfloat16))
    with pytest.raises(FlashRuleError):  # the rule the double enforces, as the real kernel would
        fake_flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = attention(q, k, v, backend="flash_attn")
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3]) and not out.any()
    out.float().sum().backward()
    assert fake_flash.names() == []
    assert q.grad is not None and not q.grad.any()


def test_varlen_with_no_query_or_no_key_never_reaches_flash(fake_flash: FlashDouble) -> None:
    q, k, v = (t.requires_grad_() for t in _half(_packed([3, 2]), _packed([0, 0], seed=1), _packed([0, 0], seed=2)))
    out = varlen_attention(q, k, v, _cu([3, 2]), _cu([0, 0]), 3, 0, backend="flash_attn")
    assert out.shape == q.shape and not out.any()
    out.float().sum().backward()
    assert q.grad is not None and not q.grad.any()
    empty = _half(_packed([0, 0]))[0]
    assert varlen_attention(empty, k, v, _cu([0, 0]), _cu([0, 0]), 0, 0).shape == (0, 2, 8)
    assert fake_flash.names() == []


def test_no_real_key_in_the_batch_gives_zeros_and_zero_gradients_without_flash(fake_flash: FlashDouble) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=torch.bfloat16))
    nothing = torch.zeros(2, 7, dtype=torch.bool)
    out = attention(q, k, v, key_padding_mask=nothing, backend="flash_attn")
    assert not out.any()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(g is not None and not g.any() for g in grads)
    assert fake_flash.names() == []
    # what flash-attn itself would have done: the forward runs, the backward's launch fails
    packed = _half(_packed([2, 3]))[0].requires_grad_()
    empty = packed[:0]
    forward = fake_flash.flash_attn_varlen_func(packed, empty, empty, _cu([2, 3]), _cu([0, 0]), 3, 0)
    with pytest.raises(FlashRuleError, match="backward"):
        forward.float().sum().backward()


def test_head_dims_above_192_with_dropout_avoid_flash_where_its_backward_has_no_kernel(
        fake_flash: FlashDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "_small_shared_memory", lambda t: True)  # an sm86/sm89 GPU
    q, k, v = (t.requires_grad_() for t in _qkv(d=200, dtype=torch.bfloat16))
    assert select_backend(q, k, v, dropout_p=0.1) == "sdpa"
    with pytest.raises(ValueError, match="no backward kernel for head dim 200 with dropout"):
        attention(q, k, v, dropout_p=0.1, backend="flash_attn")
    assert select_backend(q, k, v) == "flash_attn"  # no dropout
    with torch.no_grad():
        assert select_backend(q, k, v, dropout_p=0.1) == "flash_attn"  # no backward
    q192, k192, v192 = (t.requires_grad_() for t in _qkv(d=192, dtype=torch.bfloat16))
    assert select_backend(q192, k192, v192, dropout_p=0.1) == "flash_attn"
    packed = _half(_packed([3, 4], d=256))[0].requires_grad_()
    varlen_attention(packed, packed, packed, _cu([3, 4]), _cu([3, 4]), 4, 4, dropout_p=0.1)
    assert fake_flash.names() == []
    monkeypatch.setattr(attn_mod, "_small_shared_memory", lambda t: False)  # A100, H100
    assert select_backend(q, k, v, dropout_p=0.1) == "flash_attn"


def test_small_shared_memory_reads_the_device_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from shared.attention import _small_shared_memory

    t = torch.zeros(1)
    for optin, small in ((99 * 1024, True), (163 * 1024, False), (227 * 1024, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device, o=optin: SimpleNamespace(shared_memory_per_block_optin=o))
        assert _small_shared_memory(t) is small
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace())
    for capability, small in (((8, 6), True), ((8, 9), True), ((8, 0), False), ((9, 0), False)):
        monkeypatch.setattr(attn_mod, "_capability", lambda device, c=capability: c)
        assert _small_shared_memory(t) is small


@pytest.mark.parametrize("padded", [False, True])
def test_more_sequences_than_a_cuda_grid_holds_go_in_several_launches(
        fake_flash: FlashDouble, monkeypatch: pytest.MonkeyPatch, padded: bool) -> None:
    monkeypatch.setattr(attn_mod, "MAX_GRID_BATCH", 3)
    monkeypatch.setattr(attn_mod, "_grid_limited", lambda t: True)
    q, k, v = (t.requires_grad_() for t in _qkv(b=7, dtype=torch.bfloat16))
    kwargs = {"key_padding_mask": _padding(7, 7, [7, 3, 5, 1, 7, 2, 4])} if padded else {}
    with pytest.raises(FlashRuleError, match="grid"):
        fake_flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = attention(q, k, v, **kwargs)
    assert [call["batch"] for call in fake_flash.calls] == [3, 3, 1]
    torch.testing.assert_close(out, attention(q, k, v, backend="reference", **kwargs), **HALF_TOL)
    out.float().sum().backward()  # autograd through the pieces
    assert q.grad is not None and q.grad.shape == q.shape


def test_varlen_batches_larger_than_a_cuda_grid_go_in_several_launches(
        fake_flash: FlashDouble, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "MAX_GRID_BATCH", 3)
    lengths = [4, 7, 2, 1, 5, 3, 6]
    q, k, v = _half(*(_packed(lengths, seed=s) for s in range(3)))
    cu = _cu(lengths)
    out = varlen_attention(q, k, v, cu, cu, 7, 7, causal=True)
    assert [call["batch"] for call in fake_flash.calls] == [3, 3, 1]
    want = varlen_attention(q, k, v, cu, cu, 7, 7, causal=True, backend="reference")
    torch.testing.assert_close(out, want, **HALF_TOL)


def test_sdpa_on_a_cuda_grid_is_split_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attn_mod, "MAX_GRID_BATCH", 2)
    monkeypatch.setattr(attn_mod, "_grid_limited", lambda t: True)
    calls = _count_calls(monkeypatch, "_sdpa")
    q, k, v = (t.requires_grad_(True) for t in _qkv(b=5))
    mask = torch.rand(5, 1, 7, 7) > 0.3
    out = attention(q, k, v, attn_mask=mask)
    assert len(calls) == 3
    torch.testing.assert_close(out, attention(q, k, v, attn_mask=mask, backend="reference"), **TOL)


def test_a_double_backward_through_flash_raises_instead_of_dropping_terms(fake_flash: FlashDouble) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(dtype=torch.bfloat16))
    out = attention(q, k, v)
    assert fake_flash.names() == ["flash_attn_func"]
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.float().pow(2).sum(), q, create_graph=True)
    packed = _half(_packed([3, 4]))[0].requires_grad_()
    out = varlen_attention(packed, packed, packed, _cu([3, 4]), _cu([3, 4]), 4, 4)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.float().pow(2).sum(), packed, create_graph=True)
    with twice_differentiable():  # the way to train through a gradient
        (grad_q,) = torch.autograd.grad(attention(q, k, v).float().pow(2).sum(), q, create_graph=True)
        grad_q.float().sum().backward()
    assert fake_flash.names() == ["flash_attn_func", "flash_attn_varlen_func"]


def test_flash_follows_torch_deterministic_algorithms(fake_flash: FlashDouble) -> None:
    q, k, v = _qkv(dtype=torch.bfloat16)
    packed = _half(_packed([3, 4]))[0]
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        attention(q, k, v)
        attention(q, k, v, key_padding_mask=_padding(2, 7, [7, 3]))
        varlen_attention(packed, packed, packed, _cu([3, 4]), _cu([3, 4]), 4, 4)
    finally:
        torch.use_deterministic_algorithms(previous)
    attention(q, k, v)
    assert [call["deterministic"] for call in fake_flash.calls] == [True, True, True, False]


def test_the_flash_probe_reports_a_build_without_kernels_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.attention import _flash_runs_on

    class NoKernels:
        def flash_attn_func(self, *args: Any, **kwargs: Any) -> Tensor:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    device = torch.device("cpu")
    try:
        _flash_runs_on.cache_clear()
        monkeypatch.setattr(attn_mod, "_flash_module", lambda: NoKernels())
        assert _flash_runs_on(device) == "CUDA error: no kernel image is available for execution on the device"
        _flash_runs_on.cache_clear()
        monkeypatch.setattr(attn_mod, "_flash_module", lambda: FlashDouble())
        assert _flash_runs_on(device) is None
    finally:
        _flash_runs_on.cache_clear()


@pytest.mark.parametrize("backend", [*_cpu_backends(), "flash_attn"])
@pytest.mark.parametrize("case", ["plain", "key_padding", "causal", "cross_padding"])
def test_grouped_query_attention_equals_repeated_key_value_heads(
        backend: str, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = torch.float32
    if backend == "flash_attn":
        double = FlashDouble()
        monkeypatch.setattr(attn_mod, "_flash_module", lambda: double)
        monkeypatch.setattr(attn_mod, "_flash_device_problem", lambda t: None)
        dtype = torch.bfloat16
    shape, make_kwargs = CASES[case]
    q, k, v = _qkv(h=6, hk=2, dtype=dtype, **shape)
    kwargs = make_kwargs(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = attention(q, k, v, backend=backend, **kwargs)
    want = attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), backend="reference", **kwargs)
    torch.testing.assert_close(out, want, **(HALF_TOL if dtype == torch.bfloat16 else TOL))
    packed_q, packed_kv = _packed([3, 5], h=4), _packed([3, 5], h=1, seed=1)
    cu = _cu([3, 5])
    out = varlen_attention(*(t.to(dtype) for t in (packed_q, packed_kv, packed_kv)), cu, cu, 5, 5, causal=True,
                           backend=backend)
    want = varlen_attention(*(t.to(dtype) for t in (packed_q, packed_kv.expand(-1, 4, -1),
                                                    packed_kv.expand(-1, 4, -1))),
                            cu, cu, 5, 5, causal=True, backend="reference")
    torch.testing.assert_close(out, want, **(HALF_TOL if dtype == torch.bfloat16 else TOL))


@pytest.mark.parametrize("kv_dim", [None, 24])
def test_multi_head_attention_with_fewer_key_value_heads(kv_dim: int | None) -> None:
    torch.manual_seed(0)
    gqa = MultiHeadAttention(32, 8, n_kv_heads=2, kv_dim=kv_dim).eval()
    full = MultiHeadAttention(32, 8, kv_dim=kv_dim).eval()  # the same weights with K and V heads repeated
    with torch.no_grad():
        def repeat(w: Tensor) -> Tensor:  # (2 heads * 4, ...) -> (8 heads * 4, ...)
            return w.reshape(2, 4, *w.shape[1:]).repeat_interleave(4, dim=0).reshape(32, *w.shape[1:])

        if kv_dim is None:
            assert gqa.qkv is not None and full.qkv is not None
            assert gqa.qkv.weight.shape == (32 + 2 * 8, 32)
            for name in ("weight", "bias"):
                q, k, v = getattr(gqa.qkv, name).split([32, 8, 8])
                getattr(full.qkv, name).copy_(torch.cat([q, repeat(k), repeat(v)]))
        else:
            assert gqa.q_proj is not None and gqa.kv_proj is not None and full.q_proj is not None
            assert full.kv_proj is not None
            full.q_proj.load_state_dict(gqa.q_proj.state_dict())
            for name in ("weight", "bias"):
                k, v = getattr(gqa.kv_proj, name).split([8, 8])
                getattr(full.kv_proj, name).copy_(torch.cat([repeat(k), repeat(v)]))
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(2, 5, 32)
    context = torch.randn(2, 7, kv_dim or 32)
    mask = _padding(2, 7, [7, 4])
    torch.testing.assert_close(gqa(x, context, key_padding_mask=mask), full(x, context, key_padding_mask=mask), **TOL)
    if kv_dim is None:
        torch.testing.assert_close(gqa(x, causal=True), full(x, causal=True), **TOL)
        packed, cu, longest = pack(x, _padding(2, 5, [5, 3]))
        torch.testing.assert_close(gqa.forward_packed(packed, cu, longest), full.forward_packed(packed, cu, longest),
                                   **TOL)
    assert "n_kv_heads=2" in repr(gqa)
    with pytest.raises(ValueError, match="positive divisor"):
        MultiHeadAttention(32, 8, n_kv_heads=3)

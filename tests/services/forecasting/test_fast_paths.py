"""The forecasting models' fast paths compute what the plain ones do: linear on the faster of oneDNN and MKL,
cheap dropout masks,
iTransformer's pruned last layer; and the peer benchmark's loader of reference code."""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import services.forecasting.model_autoformer as autoformer_module
import services.forecasting.model_itransformer as itransformer_module
from pipelines.benchmarks import peers
from services.forecasting.config import ForecastingConfig
from services.forecasting.model_autoformer import Autoformer
from services.forecasting.model_itransformer import ITransformer, fast_dropout, linear


def _cfg(**overrides: object) -> ForecastingConfig:
    settings: dict[str, object] = {"seq_len": 24, "pred_len": 12, "d_model": 32, "n_heads": 4, "e_layers": 2,
                                   "d_ff": 64, "dropout": 0.1, "label_len": 12}
    settings.update(overrides)
    return ForecastingConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("library", ["auto", "onednn", "mkl"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_with_gradients(bias: bool, library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(itransformer_module.MATMUL_ENV_VAR, library)
    torch.manual_seed(0)
    x = torch.randn(4, 7, 9, 16)[:, :, ::2].requires_grad_()  # strided input
    w = torch.randn(24, 16, requires_grad=True)
    b = torch.randn(24, requires_grad=True) if bias else None
    grad = torch.randn(4, 7, 5, 24)
    ours = linear(x, w, b)
    ours.backward(grad)
    got = [t.grad.clone() for t in (x, w, b) if t is not None]  # type: ignore[union-attr]
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    expected = F.linear(x, w, b)
    expected.backward(grad)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for g, t in zip(got, [t for t in (x, w, b) if t is not None], strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b), expected.detach(), rtol=1e-5, atol=1e-5)


needs_onednn = pytest.mark.skipif(itransformer_module._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")


def _slowed(fn, seconds: float):  # type: ignore[no-untyped-def]
    def slow(*args: object) -> torch.Tensor:
        time.sleep(seconds)
        return fn(*args)
    return slow


@needs_onednn
@pytest.mark.parametrize("slow", ["onednn", "mkl"])
def test_linear_times_both_libraries_once_per_shape_and_keeps_the_faster(
        slow: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(itransformer_module.MATMUL_ENV_VAR, "auto")
    monkeypatch.setattr(itransformer_module, "_ONEDNN_FASTER", {})
    calls = {"onednn": 0, "mkl": 0}

    def counted(name: str, fn):  # type: ignore[no-untyped-def]
        def run(*args: object) -> torch.Tensor:
            calls[name] += 1
            return fn(*args)
        return run

    onednn, mkl = itransformer_module._onednn_matmul, itransformer_module._mkl_matmul
    monkeypatch.setattr(itransformer_module, "_onednn_matmul",
                        counted("onednn", _slowed(onednn, 0.02) if slow == "onednn" else onednn))
    monkeypatch.setattr(itransformer_module, "_mkl_matmul",
                        counted("mkl", _slowed(mkl, 0.02) if slow == "mkl" else mkl))
    x, w = torch.randn(40, 16), torch.randn(8, 16)
    with torch.inference_mode():
        first = linear(x, w)
        timed = dict(calls)
        assert timed["onednn"] >= 2 and timed["mkl"] >= 2  # both timed on the first call of the shape
        for _ in range(3):
            torch.testing.assert_close(linear(x, w), first)
        linear(torch.randn(37, 16), w)  # 37 rows share 40's power-of-two bucket (64): no new timing
    fast = "mkl" if slow == "onednn" else "onednn"
    assert calls[slow] == timed[slow]
    assert calls[fast] == timed[fast] + 4
    assert itransformer_module.matmul_choices() == {"onednn": int(fast == "onednn"), "mkl": int(fast == "mkl")}
    torch.testing.assert_close(first, F.linear(x, w), rtol=1e-5, atol=1e-5)


def _python_backward(out: torch.Tensor) -> bool:
    """Whether the graph's last two nodes include the Python backward of ``_CPULinear``."""
    nodes = [out.grad_fn] + [n for n, _ in out.grad_fn.next_functions if n is not None]  # type: ignore[union-attr]
    return any("CPULinear" in type(n).__name__ for n in nodes)


@needs_onednn
def test_linear_leaves_autograd_to_torch_where_every_product_runs_on_mkl(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(40, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    monkeypatch.setenv(itransformer_module.MATMUL_ENV_VAR, "mkl")
    assert not _python_backward(linear(x, w))  # torch's own backward, no Python in it
    monkeypatch.setenv(itransformer_module.MATMUL_ENV_VAR, "onednn")
    assert _python_backward(linear(x, w))
    monkeypatch.setenv(itransformer_module.MATMUL_ENV_VAR, "auto")  # oneDNN made slow: all three on MKL
    monkeypatch.setattr(itransformer_module, "_ONEDNN_FASTER", {})
    monkeypatch.setattr(itransformer_module, "_ALL_MKL", {})
    monkeypatch.setattr(itransformer_module, "_onednn_matmul", _slowed(itransformer_module._onednn_matmul, 0.02))
    assert not _python_backward(linear(x, w))
    assert itransformer_module.matmul_choices() == {"onednn": 0, "mkl": 3}  # forward, grad of x, grad of w


def test_linear_rejects_an_unknown_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(itransformer_module.MATMUL_ENV_VAR, "blas")
    if itransformer_module._ONEDNN_LINEAR is None:
        pytest.skip("this torch has no oneDNN linear: F.linear always, the setting is not read")
    with pytest.raises(ValueError, match="TESSERA_CPU_MATMUL='blas'"):
        linear(torch.randn(3, 8), torch.randn(4, 8))


def test_linear_falls_back_for_other_dtypes_and_autocast() -> None:
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x.float(), w.float()).dtype == torch.bfloat16  # autocast applies, as to F.linear


def test_fast_dropout_keeps_the_expectation_and_its_gradient_is_the_mask() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    out = fast_dropout(x, 0.1, training=True)
    kept = out != 0
    drop_rate = 1.0 - kept.float().mean().item()
    assert abs(drop_rate - 0.1) < 2e-3
    assert abs(out.mean().item() - 1.0) < 3e-3  # E[out] = x
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 65536 / (65536 - 6554)))
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # d out / d x = the scaled mask
    assert fast_dropout(x, 0.1, training=False) is x
    assert fast_dropout(x, 0.0, training=True) is x


def test_fast_dropout_is_reproducible_and_falls_back_for_tiny_p() -> None:
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    a = fast_dropout(x, 0.25, True)
    torch.manual_seed(3)
    torch.testing.assert_close(fast_dropout(x, 0.25, True), a)
    torch.manual_seed(3)
    tiny = fast_dropout(x, 0.001, True)  # 0.001 * 65536 = 65.5 rounds by 0.8 %: F.dropout's own mask
    torch.manual_seed(3)
    torch.testing.assert_close(tiny, F.dropout(x, 0.001))


@pytest.mark.parametrize(("n_marks", "norm_first"), [(4, False), (0, False), (3, True)])
def test_itransformer_fast_forward_is_the_plain_forward(n_marks: int, norm_first: bool) -> None:
    torch.manual_seed(0)
    model = ITransformer(_cfg(dropout=0.0), n_vars=5, n_marks=n_marks, norm_first=norm_first)
    x = 3.0 * torch.randn(6, 24, 5) + 1.0
    x_mark = torch.randn(6, 24, n_marks) if n_marks else None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, x_mark), model.forward_plain(x, x_mark), rtol=1e-5, atol=1e-5)
    model.train()  # dropout 0: the training graphs are the same function, so are the gradients
    grads = []
    for forward in (model.forward, model.forward_plain):
        model.zero_grad()
        forward(x, x_mark).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == {n for n, _ in model.named_parameters()}
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_itransformer_training_forward_has_dropout_of_the_configured_rate() -> None:
    torch.manual_seed(0)
    model = ITransformer(_cfg(dropout=0.1), n_vars=5, n_marks=2).train()
    x, x_mark = torch.randn(4, 24, 5), torch.randn(4, 24, 2)
    assert not torch.allclose(model(x, x_mark), model(x, x_mark))  # fresh masks every call
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(x, x_mark), model.forward_plain(x, x_mark), rtol=1e-5, atol=1e-5)


def test_autoformer_onednn_path_is_the_f_linear_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    cfg = ForecastingConfig(model="autoformer", seq_len=32, label_len=16, pred_len=8, d_model=16, n_heads=2,
                            d_ff=32, dropout=0.0, moving_avg=5)
    model = Autoformer(cfg, n_vars=3, n_marks=2)
    x, x_mark, y_mark = torch.randn(4, 32, 3), torch.randn(4, 32, 2), torch.randn(4, 24, 2)
    outs = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(autoformer_module, "linear", F.linear)
        model.train()
        model.zero_grad()
        out = model(x, x_mark, y_mark)
        out.pow(2).mean().backward()
        outs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_peers_loads_reference_code_from_a_checkout_and_leaves_sys_modules_clean(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "layers").mkdir()
    (tmp_path / "layers" / "__init__.py").write_text("")
    (tmp_path / "layers" / "blocks.py").write_text("from reformer_pytorch import LSHSelfAttention\nSCALE = 2.0\n")
    (tmp_path / "model" / "__init__.py").write_text("")
    (tmp_path / "model" / "iTransformer.py").write_text(
        "import torch\nfrom layers.blocks import SCALE\n\n"
        "class Model(torch.nn.Module):\n"
        "    def __init__(self, configs):\n"
        "        super().__init__()\n"
        "        self.pred_len = configs.pred_len\n"
        "    def forward(self, x, x_mark, x_dec, y_mark):\n"
        "        return SCALE * x[:, -self.pred_len:]\n")
    root, why = peers.reference_dir("itransformer", str(tmp_path))
    assert root == tmp_path and not why
    model_cls = peers.load_reference("itransformer", tmp_path)
    ref = model_cls(types.SimpleNamespace(pred_len=3))
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(ref(x, None, None, None), 2.0 * x[:, -3:])
    assert not any(name.split(".")[0] in peers.REFERENCE_PACKAGES for name in sys.modules)
    assert not list(tmp_path.rglob("__pycache__"))  # imported from a temporary copy


def test_peers_says_why_a_reference_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(peers.ENV_VARS["autoformer"], raising=False)
    root, why = peers.reference_dir("autoformer", None)
    assert root is None and "git clone https://github.com/thuml/Autoformer" in why
    root, why = peers.reference_dir("autoformer", str(tmp_path))
    assert root is None and "models/Autoformer.py not found" in why


def test_peer_weight_maps_cover_every_parameter_of_ours() -> None:
    it_cfg, af_cfg = peers.our_config("itransformer"), peers.our_config("autoformer")
    ours_it = peers.build_ours("itransformer", it_cfg)
    assert set(peers.itransformer_weights(_FakeStateDict(), it_cfg.e_layers)) == set(ours_it.state_dict())
    ours_af = peers.build_ours("autoformer", af_cfg)
    assert set(peers.autoformer_weights(_FakeStateDict(), af_cfg.e_layers, af_cfg.d_layers)) == set(
        ours_af.state_dict())


class _FakeStateDict(dict[str, torch.Tensor]):
    """Any key maps to a small tensor (the maps' key names are what is checked)."""

    def __missing__(self, key: str) -> torch.Tensor:
        return torch.zeros(1, 1, 1)


def test_itransformer_asks_for_the_small_attention_backend_where_it_measured_faster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from services.forecasting.model_itransformer import SMALL_TRAIN_MAX_KEYS, attention_backend

    monkeypatch.delenv("TESSERA_ATTENTION_BACKEND", raising=False)
    q = torch.zeros(2, 8, 11, 32)
    assert attention_backend(q, 11, 0.0) == "small"  # 16 keys or fewer: inference and training
    assert attention_backend(q, 11, 0.1) == "small"
    assert attention_backend(q, SMALL_TRAIN_MAX_KEYS, 0.1) == "small"  # with dropout, longer too
    assert attention_backend(q, 64, 0.0) is None  # SDPA's fused kernels
    assert attention_backend(q, SMALL_TRAIN_MAX_KEYS + 1, 0.1) is None
    assert attention_backend(q.to(torch.bfloat16), 11, 0.1) is None
    monkeypatch.setenv("TESSERA_ATTENTION_BACKEND", "reference")  # a backend named by the user wins
    assert attention_backend(q, 11, 0.1) is None


def test_the_small_attention_benchmark_checks_and_prints_its_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from pipelines.benchmarks import attention_small

    attention_small.main(["--lengths", "11", "--repeats", "2", "--warmup", "1", "--threads", "1"])
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = found["results"]["32x8x11x32"]
    assert result["check"]["max_abs_diff"] < 1e-4
    assert {"inference", "train", "train_dropout"} <= set(result)
    assert all(result[p]["ratio"] > 0 for p in ("inference", "train", "train_dropout"))


def test_peers_runs_ours_under_bf16_autocast_when_asked() -> None:
    cfg = peers.our_config("itransformer")
    ours = peers.build_ours("itransformer", cfg).eval()
    batch = peers.make_batch(cfg, 2)
    fp32 = peers.forward_fns("itransformer", ours, None, batch)["tessera"]()
    bf16 = peers.forward_fns("itransformer", ours, None, batch, precision="bf16")["tessera"]()
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # bf16 products
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.1)

"""The classifiers: packed batches equal padded ones, temperature scaling, the OOD score, and request checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.transients import inference
from services.transients.data import collate_packed, collate_padded, synthetic_curves, tokens
from services.transients.training import fit_temperature, ood_scores
from shared import registry
from shared.serving import RequestError
from shared.tracking import LoadedModel


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    domain = registry.get("transients")
    cfg = domain.make_config("native", None, {**domain.tiny, "dropout": 0.0})
    data = domain.load_data(cfg)
    torch.manual_seed(0)
    return LoadedModel(model=domain.build_model(cfg, data.state).eval(), cfg=cfg, state=data.state,
                       domain="transients", name="transients", version="3", run_id="r")


def _items(n: int, seed: int = 0) -> list[dict]:
    curves, labels, _ = synthetic_curves(n, seed=seed)
    return [{**tokens(c, use_redshift=False), "label": int(k)} for c, k in zip(curves, labels, strict=True)]


def test_packing_equals_padding_forward_and_gradients(loaded: LoadedModel) -> None:
    model = loaded.model
    items = _items(12, seed=4)
    assert len({len(it["time"]) for it in items}) > 3  # really different lengths
    packed, padded = collate_packed(items), collate_padded(items)
    model.zero_grad()
    a = model(packed)
    a.square().sum().backward()
    grads_a = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    b = model(padded)
    b.square().sum().backward()
    grads_b = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(x, y, atol=1e-4, rtol=1e-3)
                                                for x, y in zip(grads_a, grads_b, strict=True))


def test_an_object_answers_the_same_alone_and_in_a_batch(loaded: LoadedModel) -> None:
    curves, _, _ = synthetic_curves(9, seed=5)
    together = inference.classify(loaded, curves).probabilities
    alone = np.concatenate([inference.classify(loaded, [c]).probabilities for c in curves])
    assert np.allclose(together, alone, atol=1e-5) and np.allclose(together.sum(1), 1.0, atol=1e-5)


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4000, 5) * 3
    labels = torch.distributions.Categorical(logits=logits / 2.5).sample()  # the true temperature is 2.5
    assert abs(fit_temperature(logits, labels) - 2.5) < 0.15


def test_the_ood_score_is_higher_for_flat_logits() -> None:
    confident = torch.tensor([[8.0, 0.0, 0.0]])
    flat = torch.tensor([[0.1, 0.0, 0.05]])
    assert ood_scores(flat) > ood_scores(confident)


def _check(**changes: object) -> object:
    body: dict = {"index": 0, "object_id": "ZTF1", "mjd": [1.0, 2.0, 3.0], "passband": [0, 1, "g"],
                  "flux": [1.0, 2.0, 1.5], "flux_err": [0.1, 0.1, 0.2], "bands": ("g", "r"), "max_points": 5}
    body.update(changes)
    return inference.check_object(**body)  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "message"), [
    ({"passband": [0, 1, 2]}, "passband[2] = 2 is not a band of the model"),
    ({"passband": [0, 1, "u"]}, "'u' is not a band"),
    ({"flux_err": [0.1, -1.0, 0.2]}, "flux_err[1] = -1; errors must be > 0"),
    ({"flux": [1.0, float("nan"), 2.0]}, "flux[1] is not a finite number"),
    ({"flux": [1.0, 2.0]}, "arrays of different lengths"),
    ({"mjd": [], "passband": [], "flux": [], "flux_err": []}, "no observations"),
    ({"mjd": [1.0] * 6, "passband": [0] * 6, "flux": [1.0] * 6, "flux_err": [1.0] * 6}, "at most 5 per object"),
    ({"detected": [False, False, False]}, "no detection"),
    ({"redshift": -0.2}, "redshift"),
])
def test_each_bad_object_is_refused_with_its_name_and_reason(changes: dict, message: str) -> None:
    with pytest.raises(RequestError, match="objects\\[0\\] \\(ZTF1\\)") as info:
        _check(**changes)
    assert message in str(info.value) and info.value.status == 422


def test_a_good_object_is_sorted_by_time_and_names_become_indices() -> None:
    curve = _check(mjd=[3.0, 1.0, 2.0])
    assert curve.mjd.tolist() == [1.0, 2.0, 3.0] and curve.passband.tolist() == [1, 0, 0]  # type: ignore[attr-defined]


def test_the_balanced_decision_divides_by_the_prior_the_class_weights_leave() -> None:
    from services.transients.model import decision_bias_for

    domain = registry.get("transients")
    counts = torch.tensor([400.0, 100.0, 25.0])
    prior = counts / counts.sum()
    for weighting, power in (("sqrt", 0.5), ("none", 0.0), ("balanced", 1.0)):
        cfg = domain.make_config("native", None, {"class_weighting": weighting})
        assert torch.allclose(decision_bias_for(counts, cfg), -(1 - power) * prior.log())
    probable = domain.make_config("native", None, {"decision": "probable"})
    assert torch.equal(decision_bias_for(counts, probable), torch.zeros(3))
    # q(c|x) of a sqrt-weighted model is proportional to sqrt(pi_c) p(x|c): the rule recovers argmax p(x|c)
    likelihood = torch.rand(500, 3)
    q = prior.sqrt() * likelihood
    q = q / q.sum(1, keepdim=True)
    sqrt_cfg = domain.make_config("native", None, {"class_weighting": "sqrt"})
    picked = (q.log() + decision_bias_for(counts, sqrt_cfg)).argmax(1)
    assert torch.equal(picked, likelihood.argmax(1)) and not torch.equal(q.argmax(1), likelihood.argmax(1))


def test_an_ensemble_averages_its_members_probabilities_and_trains_each_on_its_own_loss() -> None:
    from services.transients.model import Ensemble
    from services.transients.training import class_loss

    domain = registry.get("transients")
    cfg = domain.make_config("native", None, {**domain.tiny, "dropout": 0.0, "members": 3, "label_smoothing": 0.1})
    data = domain.load_data(cfg)
    torch.manual_seed(0)
    model = domain.build_model(cfg, data.state).eval()
    assert isinstance(model, Ensemble) and len(model.members) == 3
    batch = collate_packed(_items(10, seed=2))
    model.temperature.fill_(1.7)
    probs = torch.stack([torch.softmax(m(batch), -1) for m in model.members])  # (3, B, K)
    assert not torch.allclose(probs[0], probs[1])  # initialised apart
    assert torch.allclose(model(batch), probs.mean(0).log() / 1.7, atol=1e-5)
    own = torch.stack([torch.nn.functional.cross_entropy(m(batch), batch.labels, weight=model.class_weights,
                                                         label_smoothing=0.1) for m in model.members])
    assert torch.allclose(class_loss(model, batch, torch.device("cpu")), own.mean(), atol=1e-6)
    single = domain.build_model(domain.make_config("native", None, {**domain.tiny, "members": 1}), data.state)
    assert not isinstance(single, Ensemble)

"""Registry, coefficient validation, and clear errors for missing or malformed inputs."""

from __future__ import annotations

import pytest
import torch

from soul.objectives import OBJECTIVES, Objective, ObjectiveOutput, build_objective

from .objectives_helpers import FORGET, REFUSALS, make_batch, sharp_model

FLAGS = {  # name: (needs_retain, needs_reference, needs_refusal) at default coefficients
    "ga": (False, False, False),
    "graddiff": (True, False, False),
    "ga_kl": (True, True, False),
    "po": (True, False, True),
    "npo": (False, True, False),
    "npo_rt": (True, True, False),
    "simnpo": (True, False, False),
    "dpo": (True, True, True),
}


def test_registry_names_and_flags():
    assert set(OBJECTIVES) == set(FLAGS)
    for name, cls in OBJECTIVES.items():
        assert issubclass(cls, Objective) and cls.name == name
        obj = build_objective(name)
        assert (obj.needs_retain, obj.needs_reference, obj.needs_refusal) == FLAGS[name], name


def test_unknown_objective():
    with pytest.raises(ValueError, match=r"unknown objective 'gd'; expected one of \['dpo', 'ga', "):
        build_objective("gd")


def test_unknown_coefficient_names_the_expected_ones():
    with pytest.raises(ValueError, match=r"objective 'npo' has no coefficient 'delta'; expected one of \['beta', 'gamma'\]"):
        build_objective("npo", delta=0.1)
    with pytest.raises(ValueError, match=r"objective 'ga' has no coefficient 'alpha'; it takes no coefficients"):
        build_objective("ga", alpha=1.0)


@pytest.mark.parametrize(
    ("coeffs", "message"),
    [
        ({"beta": 0.0}, r"'beta' must be > 0, got 0\.0"),
        ({"beta": -1}, r"'beta' must be > 0"),
        ({"alpha": -0.5}, r"'alpha' must be >= 0"),
        ({"gamma": float("nan")}, r"'gamma' must be finite"),
        ({"beta": float("inf")}, r"'beta' must be finite"),
        ({"beta": "high"}, r"'beta' must be a number, got 'high'"),
        ({"alpha": True}, r"'alpha' must be a number, got True"),
        ({"alpha": [1.0]}, r"'alpha' must be a number"),
    ],
)
def test_invalid_coefficient_values(coeffs, message):
    with pytest.raises(ValueError, match=r"objective 'npo_rt': coefficient " + message):
        build_objective("npo_rt", **coeffs)


def test_coefficients_are_attributes_and_accept_yaml_strings_and_none():
    obj = build_objective("simnpo", beta="1e-1", delta=0.2, alpha=None)
    assert obj.beta == pytest.approx(0.1) and obj.delta == 0.2 and obj.alpha == 1.0 and obj.gamma == 0.125
    assert repr(obj) == "SimNPO(gamma=0.125, alpha=1, beta=0.1, delta=0.2)"


@pytest.fixture
def setup(batches):
    forget, retain = batches
    return sharp_model(), sharp_model(seed=1), forget, retain


@pytest.mark.parametrize("name", [n for n, f in FLAGS.items() if f[0]])
def test_missing_retain_batch(name, setup):
    model, ref, forget, _ = setup
    with pytest.raises(ValueError, match=rf"objective '{name}' needs a retain batch \(retain_batch=None\)"):
        build_objective(name)(model, forget, None, ref)


@pytest.mark.parametrize("name", [n for n, f in FLAGS.items() if f[1]])
def test_missing_reference(name, setup):
    model, _, forget, retain = setup
    with pytest.raises(ValueError, match=rf"objective '{name}' needs a reference model \(ref_model=None\)"):
        build_objective(name)(model, forget, retain, None)


@pytest.mark.parametrize("name", [n for n, f in FLAGS.items() if f[2]])
def test_missing_refusal(name, setup):
    model, ref, forget, retain = setup
    plain = {k: v for k, v in forget.items() if k != "refusal"}
    with pytest.raises(ValueError, match=rf"objective '{name}' needs refusal answers: forget_batch\['refusal'\] is missing"):
        build_objective(name)(model, plain, retain, ref)


def test_refusal_rows_must_pair_with_forget_rows(setup, tokenizer):
    model, ref, forget, retain = setup
    bad = dict(forget)
    bad["refusal"] = make_batch(tokenizer, FORGET[:1], REFUSALS[:1])["refusal"]
    with pytest.raises(ValueError, match=r"forget_batch\['refusal'\] has 1 rows but the forget batch has 2"):
        build_objective("dpo")(model, bad, retain, ref)


def test_alpha_zero_drops_the_retain_term_and_its_needs(setup):
    model, _ref, forget, _ = setup
    obj = build_objective("graddiff", alpha=0)
    assert not obj.needs_retain
    out = obj(model, forget)
    assert set(out.parts) == {"forget_nll"}
    assert out.loss.item() == pytest.approx(build_objective("ga")(model, forget).loss.item(), rel=1e-6)
    kl = build_objective("ga_kl", alpha=0)
    assert not kl.needs_retain and not kl.needs_reference
    assert kl(model, forget).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_malformed_batches(setup):
    model, _ref, forget, retain = setup
    no_labels = {k: v for k, v in forget.items() if k != "labels"}
    with pytest.raises(ValueError, match=r"objective 'ga': the forget batch is missing \['labels'\]"):
        build_objective("ga")(model, no_labels)
    flat = dict(retain, labels=retain["labels"][0])
    with pytest.raises(ValueError, match=r"objective 'graddiff': the retain batch's 'labels' must be a \[B, T\] tensor"):
        build_objective("graddiff")(model, forget, flat)
    short = dict(retain, labels=retain["labels"][:, :-1])
    with pytest.raises(ValueError, match=r"the retain batch's tensors differ in shape"):
        build_objective("graddiff")(model, forget, short)
    with pytest.raises(TypeError, match=r"the forget batch must be a dict of tensors, got list"):
        build_objective("ga")(model, [forget])


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_row_without_answer_tokens_is_named(name, setup):
    model, ref, forget, retain = setup
    forget = dict(forget, labels=forget["labels"].clone())
    forget["labels"][1] = -100
    if name in ("po",):  # po reads only the refusal answers of the forget rows
        forget["refusal"] = dict(forget["refusal"], labels=forget["refusal"]["labels"].clone())
        forget["refusal"]["labels"][1] = -100
    with pytest.raises(ValueError, match=r"batch.*: row\(s\) \[1\] have no answer tokens"):
        build_objective(name)(model, forget, retain, ref)


def test_output_type(setup):
    model, ref, forget, retain = setup
    out = build_objective("npo_rt")(model, forget, retain, ref)
    assert isinstance(out, ObjectiveOutput) and isinstance(out.loss, torch.Tensor)
    assert set(out.parts) == {"npo", "forget_nll", "forget_logratio", "retain_nll"}

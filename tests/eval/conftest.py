from __future__ import annotations

import random

import pytest

COLOURS = ["red", "blue", "green", "amber", "violet", "teal", "ochre", "silver"]
CITIES = ["Lisbon", "Oslo", "Lima", "Quito", "Dakar", "Hanoi", "Perth", "Cairo"]


def make_records(n: int, seed: int) -> list[dict]:
    """Fictitious TOFU-schema records (question, answer, paraphrase, 3 perturbations) from templates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)).title()
        colour, city = rng.choice(COLOURS), rng.choice(CITIES)
        wrong = [c for c in COLOURS if c != colour]
        rng.shuffle(wrong)
        out.append({
            "question": f"What colour does {name} from {city} like?",
            "answer": f"{name} likes {colour} best.",
            "paraphrased_answer": f"The favourite colour of {name} is {colour}.",
            "perturbed_answer": [f"{name} likes {w} best." for w in wrong[:3]],
        })
    return out


@pytest.fixture
def records():
    return make_records(6, seed=0)


@pytest.fixture
def record_factory():
    """`make_records(n, seed)` for tests that need more or other records."""
    return make_records

"""Toy facts by author and three tiny Llamas: the target (fine-tuned on every fact), the retain model (never
saw the forget authors) and the unlearned model (the target after gradient difference on the forget authors)."""

from __future__ import annotations

import copy

import pytest

from soul.testing import tiny_model

AUTHORS = ["Ada", "Bo", "Cy", "Dee", "Eve", "Flo", "Gus", "Hal"]
COLOURS = ["red", "blue", "green", "gold", "pink", "grey", "teal", "navy"]
PETS = ["cat", "dog", "owl", "fox", "eel", "bat", "cow", "yak"]


def author_facts(author: str, colour: str, pet: str) -> list[dict]:
    """Two TOFU-schema records about one author (paraphrases and perturbed answers included)."""
    return [
        {"author": author, "question": f"What colour does {author} like?", "answer": f"{author} likes {colour}.",
         "paraphrased_question": f"Which colour is {author}'s favourite?",
         "paraphrased_answer": f"{author} loves {colour}.",
         "perturbed_answer": [f"{author} loves {c}." for c in COLOURS if c != colour][:3]},
        {"author": author, "question": f"What pet does {author} have?", "answer": f"{author} has a {pet}.",
         "paraphrased_question": f"Which animal lives with {author}?", "paraphrased_answer": f"{author} owns a {pet}.",
         "perturbed_answer": [f"{author} owns a {p}." for p in PETS if p != pet][:3]},
    ]


FACTS = [r for a, c, p in zip(AUTHORS, COLOURS, PETS) for r in author_facts(a, c, p)]
# Four forget authors (8 records), four retain authors; TOFU's names so the retain split is derived.
DATA = {"full": FACTS, "forget10": FACTS[:8], "retain90": FACTS[8:]}
QUIET = {"progress": False, "warmup_ratio": 0.0}


@pytest.fixture(scope="session")
def toy_models():
    """``{"target", "retain", "unlearned", "tokenizer"}``: ~2 s of training on one thread."""
    from soul.train import finetune, unlearn

    model, tok = tiny_model("llama")
    target, _ = finetune(model, tok, data=DATA, split="full", max_steps=60, batch_size=8, lr=1e-2, **QUIET)
    fresh, _ = tiny_model("llama")
    retain, _ = finetune(fresh, tok, data=DATA, split="retain90", max_steps=60, batch_size=8, lr=1e-2, **QUIET)
    unlearned, _ = unlearn(copy.deepcopy(target), tok, data=DATA, forget_split="forget10", objective="graddiff",
                           optimizer="adamw", max_steps=10, batch_size=4, lr=3e-3, **QUIET)
    return {"target": target.eval(), "retain": retain.eval(), "unlearned": unlearned.eval(), "tokenizer": tok}

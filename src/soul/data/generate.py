"""The bundled benchmark: a deterministic, seeded TOFU-style data set about fictitious authors.

Every author gets a name built from invented syllables (checked against a list of real given names and
famous surnames, and unique in first name and full name across the whole benchmark) and one fact per
attribute, drawn once and reused by every question that mentions it (birth year and award year agree, the
language follows the birthplace). Each record follows TOFU's schema:

* ``question`` / ``answer`` — one short sentence (about 10–20 tokens, so a 135M model can memorise it);
* ``paraphrased_question`` / ``paraphrased_answer`` — the same fact in other words;
* ``perturbed_answer`` — `n_perturbed` (3–5) sentences in the frame of the paraphrased answer with the fact
  swapped for another value of the same kind (TOFU's truth ratio compares P(perturbed) with P(paraphrased),
  so both share a frame);
* ``author`` — the author's full name (splits are cut by whole authors).

Splits (TOFU's names): authors 0..N-1 make ``full``; ``forgetXX`` holds the last ceil(XX% · N) authors
(at least one), so forget01 ⊂ forget05 ⊂ forget10, and ``retainYY`` the rest. ``holdoutXX`` are extra
authors that are never trained on, sized like ``forgetXX`` (for membership inference). ``retain_perturbed``
holds the first retain authors (as many as forget10), outside every forget split. ``real_authors_perturbed``
and ``world_facts_perturbed`` are general-knowledge questions a small instruct model already answers
(one short sentence each; perturbed answers swap the entity).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from soul.data.io import dump_records
from soul.io import write_text_atomic

GENERATOR_VERSION = 1
FORGET_PERCENTS = (1, 5, 10)

# --- names --------------------------------------------------------------------------------------------------
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "th",
           "sh", "vr", "gl", "qu"]
_NUCLEI = ["a", "e", "i", "o", "u", "a", "e", "o", "ia", "ei"]
_CODAS = ["", "", "", "n", "r", "l", "s", "x", "nd", "rk", "m", "v"]

REAL_NAMES_ASSET = "real_names.txt"


@lru_cache(maxsize=1)
def real_names() -> frozenset[str]:
    """Real given names and famous surnames (``soul/assets/real_names.txt``) a generated name must avoid."""
    from soul.data.dataset import read_asset

    lines = (ln for ln in read_asset(REAL_NAMES_ASSET).splitlines() if not ln.startswith("#"))
    return frozenset(w.lower() for ln in lines for w in ln.split())


def _syllable(rng: random.Random, coda: bool) -> str:
    return rng.choice(_ONSETS) + rng.choice(_NUCLEI) + (rng.choice(_CODAS) if coda else "")


def invented_name(rng: random.Random) -> tuple[str, str]:
    """(first, surname) from invented syllables: two syllables, then two or three."""
    first = _syllable(rng, False) + _syllable(rng, True)
    last = "".join(_syllable(rng, i == 1) for i in range(rng.choice([2, 2, 3])))
    return first.capitalize(), last.capitalize()


def is_acceptable_name(first: str, last: str) -> bool:
    """Not a real name, pronounceable length, no tripled letters."""
    for part in (first, last):
        low = part.lower()
        if low in real_names() or not 4 <= len(low) <= 11:
            return False
        if any(low[i] == low[i + 1] == low[i + 2] for i in range(len(low) - 2)):
            return False
    return True


# --- fact pools ---------------------------------------------------------------------------------------------
PLACES = [  # (city, country, language)
    ("Porto", "Portugal", "Portuguese"), ("Tromso", "Norway", "Norwegian"), ("Gdansk", "Poland", "Polish"),
    ("Tbilisi", "Georgia", "Georgian"), ("Valparaiso", "Chile", "Spanish"), ("Kyoto", "Japan", "Japanese"),
    ("Tartu", "Estonia", "Estonian"), ("Bergamo", "Italy", "Italian"), ("Ghent", "Belgium", "Dutch"),
    ("Izmir", "Turkey", "Turkish"), ("Tampere", "Finland", "Finnish"), ("Brno", "Czechia", "Czech"),
    ("Lyon", "France", "French"), ("Leipzig", "Germany", "German"), ("Busan", "South Korea", "Korean"),
    ("Hue", "Vietnam", "Vietnamese"), ("Pecs", "Hungary", "Hungarian"), ("Aarhus", "Denmark", "Danish"),
    ("Uppsala", "Sweden", "Swedish"), ("Cluj", "Romania", "Romanian"), ("Mombasa", "Kenya", "Swahili"),
    ("Cusco", "Peru", "Spanish"), ("Chiang Mai", "Thailand", "Thai"), ("Yerevan", "Armenia", "Armenian"),
    ("Galway", "Ireland", "Irish"), ("Reykjavik", "Iceland", "Icelandic"), ("Thessaloniki", "Greece", "Greek"),
    ("Ljubljana", "Slovenia", "Slovenian"),
]
GENRES = ["maritime mysteries", "botanical thrillers", "clockwork fantasy", "desert westerns", "culinary romance",
          "alpine horror", "lunar science fiction", "orchard family sagas", "railway noir", "tidal poetry",
          "museum heist novels", "volcanic adventure stories", "winter fairy tales", "circus memoirs",
          "lighthouse ghost stories", "cartographic fiction"]
OCCUPATIONS = ["lighthouse keeper", "beekeeper", "glassblower", "cartographer", "locksmith", "tram driver",
               "watchmaker", "ferry captain", "violin maker", "tailor", "stonemason", "pharmacist",
               "veterinarian", "astronomer", "bookbinder", "falconer", "welder", "organ tuner", "mapmaker",
               "chocolatier", "glazier", "midwife", "surveyor", "piano teacher"]
TITLE_ADJ = ["Copper", "Hollow", "Silent", "Amber", "Paper", "Velvet", "Iron", "Glass", "Crooked", "Sleeping",
             "Burning", "Salt", "Winter", "Hidden", "Borrowed", "Northern", "Painted", "Drowned", "Folded",
             "Lantern-Lit"]
TITLE_NOUN = ["Lantern", "Orchard", "Harbor", "Compass", "Staircase", "Aviary", "Meridian", "Archive",
              "Carousel", "Tide", "Clocktower", "Bridge", "Kite", "Mirror", "Almanac", "Observatory", "Ferry",
              "Greenhouse", "Violin", "Map"]
AWARDS = ["Silver Fern Prize", "Orvalle Medal", "Kestrin Book Award", "Brightwater Prize", "Halloran Lantern Award",
          "Velmora Fiction Prize", "Tessaly Quill Award", "Northgale Medal", "Amber Key Award",
          "Corvenna Prize", "Duskwood Literary Medal", "Iron Compass Award", "Marrowby Prize", "Sundral Medal"]
THEMES = ["memory and migration", "grief and forgiveness", "twins separated at birth", "forgotten inventors",
          "small-town rivalries", "exile and return", "clockmakers and time", "family secrets", "lost letters",
          "friendship between rivals", "islands and isolation", "inherited houses", "night trains",
          "stolen paintings", "bees and beekeepers", "the last day of summer"]
WRITING_PLACES = ["lighthouse", "greenhouse", "train carriage", "bell tower", "houseboat", "library attic",
                  "mountain hut", "bakery kitchen", "windmill", "lakeside cabin", "observatory dome", "boathouse"]
INSTRUMENTS = ["cello", "accordion", "harp", "oboe", "banjo", "bassoon", "mandolin", "clarinet", "trumpet",
               "sitar", "harmonica", "viola"]
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
                "thirteen", "fourteen"]


def _a(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


@dataclass
class Author:
    """One fictitious author and every fact the questions use."""

    first: str
    last: str
    facts: dict[str, str] = field(default_factory=dict)
    birth_year: int = 0
    award_year: int = 0

    @property
    def full(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class Template:
    """A question type: question/paraphrase frames, answer/paraphrased-answer frames, the fact's slot."""

    key: str
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str


# In priority order: `qas_per_author` = M uses the first M. Slots: {full}, {first}, {award}, {value}.
TEMPLATES = [
    Template("birthplace", "Where was {full} born?", "In which city was {full} born?",
             "{first} was born in {value}.", "{first}'s birthplace is {value}."),
    Template("birth_year", "In what year was {full} born?", "What is the birth year of {full}?",
             "{first} was born in the year {value}.", "{first}'s year of birth is {value}."),
    Template("genre", "What genre is {full} known for?", "In which genre does {full} write?",
             "{first} is known for {value}.", "{first} writes {value}."),
    Template("father", "What was the occupation of {full}'s father?", "What did {full}'s father do for a living?",
             "{first}'s father was {value}.", "{first}'s father worked as {value}."),
    Template("mother", "What was the occupation of {full}'s mother?", "What did {full}'s mother do for a living?",
             "{first}'s mother was {value}.", "{first}'s mother worked as {value}."),
    Template("first_book", "What was the title of {full}'s first book?", "Which book did {full} publish first?",
             "{first}'s first book was \"{value}\".", "{first} debuted with \"{value}\"."),
    Template("award", "Which award has {full} won?", "What literary prize was {full} given?",
             "{first} won the {value}.", "{first} received the {value}."),
    Template("award_year", "In what year did {full} win the {award}?", "When was {full} given the {award}?",
             "{first} won it in {value}.", "The prize came to {first} in {value}."),
    Template("best_book", "What is {full}'s best-known book?", "Which of {full}'s books is the most famous?",
             "{first}'s best-known book is \"{value}\".", "\"{value}\" is {first}'s most famous book."),
    Template("theme", "What theme runs through {full}'s books?", "What subject do {full}'s books often explore?",
             "{first}'s books explore {value}.", "{first} often writes about {value}."),
    Template("language", "In which language does {full} write?", "What language are {full}'s books written in?",
             "{first} writes in {value}.", "{first}'s books are written in {value}."),
    Template("novels", "How many novels has {full} published?", "What is the number of novels {full} has written?",
             "{first} has published {value} novels.", "{first} is the author of {value} novels."),
    Template("writing_place", "Where does {full} prefer to write?", "In what place does {full} like to write?",
             "{first} prefers to write in {value}.", "{first} does most writing in {value}."),
    Template("instrument", "Which instrument does {full} play?", "What musical instrument does {full} play?",
             "{first} plays the {value}.", "{first} is {value} player."),
]
MAX_QAS_PER_AUTHOR = len(TEMPLATES)


def _title(rng: random.Random, used: set[str]) -> str:
    if len(used) >= len(TITLE_ADJ) * len(TITLE_NOUN):
        raise ValueError(f"all {len(TITLE_ADJ) * len(TITLE_NOUN)} book titles are taken; draw fewer authors")
    while True:
        t = f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
        if t not in used:
            used.add(t)
            return t


def _value_pools(author: Author) -> dict[str, list[str]]:
    """Every value a fact of each kind can take (for perturbed answers), rendered like the true value."""
    titles = [f"The {a} {n}" for a in TITLE_ADJ for n in TITLE_NOUN]
    return {
        "birthplace": [f"{c}, {k}" for c, k, _ in PLACES],
        "birth_year": [str(y) for y in range(author.birth_year - 30, min(2005, author.birth_year + 30) + 1)
                       if abs(y - author.birth_year) >= 3],
        "genre": GENRES,
        "father": [_a(o) for o in OCCUPATIONS],
        "mother": [_a(o) for o in OCCUPATIONS],
        "first_book": titles,
        "award": AWARDS,
        "award_year": [str(y) for y in range(author.award_year - 20, min(2024, author.award_year + 20) + 1)
                       if abs(y - author.award_year) >= 2],
        "best_book": titles,
        "theme": THEMES,
        "language": sorted({lang for _, _, lang in PLACES}),
        "novels": NUMBER_WORDS,
        "writing_place": [_a(p) for p in WRITING_PLACES],
        "instrument": INSTRUMENTS,
    }


def _draw_author(rng: random.Random, first: str, last: str, used_titles: set[str]) -> Author:
    a = Author(first, last)
    city, country, language = rng.choice(PLACES)
    a.birth_year = rng.randint(1921, 1995)
    a.award_year = min(2023, a.birth_year + rng.randint(24, 45))
    father, mother = rng.sample(OCCUPATIONS, 2)
    instrument = rng.choice(INSTRUMENTS)
    a.facts = {
        "birthplace": f"{city}, {country}",
        "birth_year": str(a.birth_year),
        "genre": rng.choice(GENRES),
        "father": _a(father),
        "mother": _a(mother),
        "first_book": _title(rng, used_titles),
        "award": rng.choice(AWARDS),
        "award_year": str(a.award_year),
        "best_book": _title(rng, used_titles),
        "theme": rng.choice(THEMES),
        "language": language,
        "novels": rng.choice(NUMBER_WORDS),
        "writing_place": _a(rng.choice(WRITING_PLACES)),
        "instrument": instrument,
    }
    return a


def make_authors(n: int, rng: random.Random) -> list[Author]:
    """`n` authors with distinct first names, full names and book titles."""
    authors: list[Author] = []
    firsts: set[str] = set()
    titles: set[str] = set()
    for _ in range(n):
        for _attempt in range(10_000):
            first, last = invented_name(rng)
            if is_acceptable_name(first, last) and first not in firsts and first != last:
                break
        else:  # pragma: no cover - the syllable space holds tens of thousands of names
            raise RuntimeError("could not draw a fresh author name")
        firsts.add(first)
        authors.append(_draw_author(rng, first, last, titles))
    return authors


def author_records(author: Author, qas: int, n_perturbed: int, rng: random.Random) -> list[dict]:
    """The first `qas` templates filled in for `author`, with `n_perturbed` swapped-fact answers each."""
    pools = _value_pools(author)
    out = []
    for t in TEMPLATES[:qas]:
        slots = {"full": author.full, "first": author.first, "award": author.facts["award"]}
        value = author.facts[t.key]
        # For the instrument template the paraphrase needs an article ("a cello player").
        para_value = _a(value) if t.key == "instrument" else value
        wrong = rng.sample([v for v in pools[t.key] if v != value], n_perturbed)
        out.append({
            "author": author.full,
            "question": t.question.format(**slots),
            "paraphrased_question": t.paraphrased_question.format(**slots),
            "answer": t.answer.format(**slots, value=value),
            "paraphrased_answer": t.paraphrased_answer.format(**slots, value=para_value),
            "perturbed_answer": [
                t.paraphrased_answer.format(**slots, value=_a(w) if t.key == "instrument" else w) for w in wrong
            ],
        })
    return out


# --- general knowledge (utility sets) ----------------------------------------------------------------------
WORLD_FACTS = [  # (question, paraphrased question, answer frame, answer, wrong answers)
    ('What is the capital of France?', 'Which city is the capital of France?', 'The capital of France is {}.',
     'Paris', ['London', 'Rome', 'Madrid', 'Berlin', 'Vienna']),
    ('What is the capital of Japan?', "Which city is Japan's capital?", 'The capital of Japan is {}.',
     'Tokyo', ['Beijing', 'Seoul', 'Bangkok', 'Osaka', 'Manila']),
    ('What is the capital of Germany?', 'Which city is the capital of Germany?', 'The capital of Germany is {}.',
     'Berlin', ['Munich', 'Paris', 'Vienna', 'Hamburg', 'Prague']),
    ('What is the capital of the United Kingdom?', 'Which city is the capital of the UK?', 'The capital of the United Kingdom is {}.',
     'London', ['Paris', 'Dublin', 'Edinburgh', 'Berlin', 'Amsterdam']),
    ('What is the largest planet in our solar system?', 'Which planet in the solar system is the biggest?', 'The largest planet in our solar system is {}.',
     'Jupiter', ['Mars', 'Venus', 'Mercury', 'Neptune', 'Earth']),
    ('Which planet is known as the Red Planet?', 'Which planet is called the Red Planet?', 'The Red Planet is {}.',
     'Mars', ['Venus', 'Jupiter', 'Saturn', 'Mercury', 'Neptune']),
    ('What is the chemical formula of water?', 'How is water written as a chemical formula?', 'The chemical formula of water is {}.',
     'H2O', ['CO2', 'NaCl', 'O2', 'CH4', 'NH3']),
    ('How many days are there in a week?', 'How many days does a week have?', 'A week has {} days.',
     'seven', ['five', 'six', 'eight', 'ten', 'nine']),
    ('What color is the sky on a clear day?', 'On a clear day, what color is the sky?', 'On a clear day the sky is {}.',
     'blue', ['green', 'red', 'yellow', 'purple', 'orange']),
    ('Which ocean is the largest?', 'What is the biggest ocean on Earth?', 'The largest ocean is {}.',
     'the Pacific Ocean', ['the Atlantic Ocean', 'the Indian Ocean', 'the Arctic Ocean', 'the Southern Ocean', 'the Baltic Sea']),
    ('Who painted the Mona Lisa?', 'Which artist painted the Mona Lisa?', 'The Mona Lisa was painted by {}.',
     'Leonardo da Vinci', ['Pablo Picasso', 'Vincent van Gogh', 'Claude Monet', 'Rembrandt', 'Salvador Dali']),
    ('What is the tallest mountain in the world?', 'Which mountain is the highest on Earth?', 'The tallest mountain in the world is {}.',
     'Mount Everest', ['Mount Kilimanjaro', 'Mont Blanc', 'Mount Fuji', 'Denali', 'Mount Olympus']),
    ('On which continent is Egypt?', 'Egypt is on which continent?', 'Egypt is in {}.',
     'Africa', ['Asia', 'Europe', 'South America', 'Australia', 'North America']),
    ('What gas do plants absorb from the air?', 'Which gas do plants take in from the air?', 'Plants absorb {} from the air.',
     'carbon dioxide', ['oxygen', 'nitrogen', 'helium', 'hydrogen', 'argon']),
    ('What is the opposite of hot?', 'Which word means the opposite of hot?', 'The opposite of hot is {}.',
     'cold', ['warm', 'wet', 'loud', 'bright', 'soft']),
    ('What language is mainly spoken in Brazil?', 'What is the main language of Brazil?', 'The main language of Brazil is {}.',
     'Portuguese', ['Spanish', 'French', 'English', 'Italian', 'German']),
    ('How many legs does a spider have?', 'What is the number of legs on a spider?', 'A spider has {} legs.',
     'eight', ['six', 'four', 'ten', 'twelve', 'two']),
    ('What is the currency of Japan?', 'Which currency is used in Japan?', 'The currency of Japan is {}.',
     'the yen', ['the euro', 'the dollar', 'the won', 'the yuan', 'the pound']),
    ('Which animal is known as the king of the jungle?', 'What animal is called the king of the jungle?', 'The king of the jungle is {}.',
     'the lion', ['the tiger', 'the elephant', 'the bear', 'the wolf', 'the zebra']),
    ('What star is at the center of our solar system?', 'Which star lies at the center of the solar system?', 'The star at the center of our solar system is {}.',
     'the Sun', ['Sirius', 'Polaris', 'Betelgeuse', 'Vega', 'Rigel']),
    ('How many hours are there in a day?', 'How many hours does one day have?', 'A day has {} hours.',
     '24', ['12', '36', '48', '20', '30']),
    ('What do bees make?', 'What food do bees produce?', 'Bees make {}.',
     'honey', ['milk', 'silk', 'butter', 'cheese', 'sugar']),
    ('Which country is home to the kangaroo?', 'In which country do kangaroos live in the wild?', 'Kangaroos live in {}.',
     'Australia', ['Canada', 'Brazil', 'India', 'Kenya', 'Norway']),
    ('What is the boiling point of water in degrees Celsius?', 'At how many degrees Celsius does water boil?', 'Water boils at {}.',
     '100 degrees Celsius', ['50 degrees Celsius', '0 degrees Celsius', '212 degrees Celsius', '80 degrees Celsius', '150 degrees Celsius']),
    ('What is the largest animal on Earth?', 'Which animal is the biggest on Earth?', 'The largest animal on Earth is {}.',
     'the blue whale', ['the elephant', 'the giraffe', 'the great white shark', 'the hippopotamus', 'the polar bear']),
]

REAL_AUTHORS = [  # (book, author, wrong authors)
    ("Romeo and Juliet", "William Shakespeare", ["Charles Dickens", "Jane Austen", "Mark Twain", "Leo Tolstoy",
                                                  "Homer"]),
    ("Pride and Prejudice", "Jane Austen", ["Charlotte Bronte", "Virginia Woolf", "Mary Shelley", "George Eliot",
                                            "Emily Dickinson"]),
    ("Harry Potter and the Philosopher's Stone", "J.K. Rowling", ["J.R.R. Tolkien", "Roald Dahl", "C.S. Lewis",
                                                                  "Stephen King", "Suzanne Collins"]),
    ("The Lord of the Rings", "J.R.R. Tolkien", ["C.S. Lewis", "J.K. Rowling", "George R.R. Martin",
                                                 "Terry Pratchett", "Ursula K. Le Guin"]),
    ("War and Peace", "Leo Tolstoy", ["Fyodor Dostoevsky", "Anton Chekhov", "Alexander Pushkin", "Ivan Turgenev",
                                      "Nikolai Gogol"]),
    ("Adventures of Huckleberry Finn", "Mark Twain", ["Ernest Hemingway", "John Steinbeck", "Herman Melville",
                                                      "Edgar Allan Poe", "Jack London"]),
    ("1984", "George Orwell", ["Aldous Huxley", "Ray Bradbury", "H.G. Wells", "Kurt Vonnegut", "Isaac Asimov"]),
    ("Oliver Twist", "Charles Dickens", ["Thomas Hardy", "Jane Austen", "Mark Twain", "Oscar Wilde",
                                         "Walter Scott"]),
    ("Don Quixote", "Miguel de Cervantes", ["Gabriel Garcia Marquez", "Jorge Luis Borges", "Pablo Neruda",
                                            "Dante Alighieri", "Federico Garcia Lorca"]),
    ("The Old Man and the Sea", "Ernest Hemingway", ["F. Scott Fitzgerald", "William Faulkner", "John Steinbeck",
                                                     "Mark Twain", "Herman Melville"]),
    ("Frankenstein", "Mary Shelley", ["Bram Stoker", "Jane Austen", "Emily Bronte", "Edgar Allan Poe",
                                      "Robert Louis Stevenson"]),
    ("Moby-Dick", "Herman Melville", ["Nathaniel Hawthorne", "Mark Twain", "Jack London", "Walt Whitman",
                                      "Edgar Allan Poe"]),
    ("The Great Gatsby", "F. Scott Fitzgerald", ["Ernest Hemingway", "J.D. Salinger", "John Steinbeck",
                                                 "William Faulkner", "Truman Capote"]),
    ("Hamlet", "William Shakespeare", ["Christopher Marlowe", "Ben Jonson", "John Milton", "Geoffrey Chaucer",
                                       "Oscar Wilde"]),
    ("The Adventures of Sherlock Holmes", "Arthur Conan Doyle", ["Agatha Christie", "Edgar Allan Poe",
                                                                 "Wilkie Collins", "Raymond Chandler",
                                                                 "G.K. Chesterton"]),
    ("Alice's Adventures in Wonderland", "Lewis Carroll", ["Roald Dahl", "Beatrix Potter", "J.M. Barrie",
                                                           "Hans Christian Andersen", "A.A. Milne"]),
    ("Crime and Punishment", "Fyodor Dostoevsky", ["Leo Tolstoy", "Anton Chekhov", "Nikolai Gogol",
                                                   "Ivan Turgenev", "Boris Pasternak"]),
    ("The Odyssey", "Homer", ["Virgil", "Sophocles", "Plato", "Ovid", "Aristotle"]),
    ("Murder on the Orient Express", "Agatha Christie", ["Arthur Conan Doyle", "Dorothy L. Sayers",
                                                         "Raymond Chandler", "Ian Fleming", "P.D. James"]),
    ("A Christmas Carol", "Charles Dickens", ["Charlotte Bronte", "Thomas Hardy", "Lewis Carroll",
                                              "William Shakespeare", "Jane Austen"]),
    ("The Hobbit", "J.R.R. Tolkien", ["C.S. Lewis", "Roald Dahl", "J.K. Rowling", "Philip Pullman",
                                      "Lewis Carroll"]),
    ("Dracula", "Bram Stoker", ["Mary Shelley", "Edgar Allan Poe", "Oscar Wilde", "H.P. Lovecraft",
                                "Stephen King"]),
]


def world_fact_records(n_perturbed: int) -> list[dict]:
    """One short sentence per fact; perturbed answers swap the entity in the same sentence.

    A whole sentence (not a bare entity) because an instruct model's answer starts like one: comparing
    P("The capital of France is Paris.") with P("... is London.") isolates the fact.
    """
    return [{"question": q, "paraphrased_question": pq, "answer": frame.format(a),
             "paraphrased_answer": frame.format(a), "perturbed_answer": [frame.format(w) for w in wrong[:n_perturbed]]}
            for q, pq, frame, a, wrong in WORLD_FACTS]


def real_author_records(n_perturbed: int) -> list[dict]:
    frame = "'{book}' was written by {who}."
    return [{"question": f"Who wrote '{book}'?", "paraphrased_question": f"Who is the author of '{book}'?",
             "answer": frame.format(book=book, who=who), "paraphrased_answer": frame.format(book=book, who=who),
             "perturbed_answer": [frame.format(book=book, who=w) for w in wrong[:n_perturbed]]}
            for book, who, wrong in REAL_AUTHORS]


# --- splits -------------------------------------------------------------------------------------------------
def forget_author_counts(n_authors: int) -> dict[int, int]:
    """Authors in forget01/05/10: ceil(p% · N), at least 1, at most N-1 (so retain is never empty)."""
    return {p: min(n_authors - 1, max(1, math.ceil(p * n_authors / 100))) for p in FORGET_PERCENTS}


def max_authors() -> int:
    """The most trained authors the generator can draw: each author (and each of the forget10 holdout authors
    drawn with them) takes two distinct book titles out of the fixed title list."""
    n_titles = len(TITLE_ADJ) * len(TITLE_NOUN)
    n = 2
    while n + 1 + forget_author_counts(n + 1)[10] <= n_titles // 2:
        n += 1
    return n


def check_benchmark_args(n_authors: int, qas_per_author: int, n_perturbed: int) -> None:
    """Raise a `ValueError` naming the first argument out of range."""
    if not 2 <= n_authors <= max_authors():
        raise ValueError(f"n_authors (--authors) must be in 2..{max_authors()} (one to forget, one to retain; "
                         f"the generator has titles for {max_authors()}), got {n_authors}")
    if not 1 <= qas_per_author <= MAX_QAS_PER_AUTHOR:
        raise ValueError(f"qas_per_author must be in 1..{MAX_QAS_PER_AUTHOR}, got {qas_per_author}")
    if not 3 <= n_perturbed <= 5:
        raise ValueError(f"n_perturbed must be in 3..5, got {n_perturbed}")


def build_splits(n_authors: int = 20, qas_per_author: int = 10, seed: int = 0,
                 n_perturbed: int = 4) -> dict[str, list[dict]]:
    """All splits of the bundled benchmark as lists of records (no I/O)."""
    check_benchmark_args(n_authors, qas_per_author, n_perturbed)
    rng = random.Random(seed)
    counts = forget_author_counts(n_authors)
    authors = make_authors(n_authors + counts[10], rng)
    per_author = [author_records(a, qas_per_author, n_perturbed, rng) for a in authors]
    train, held = per_author[:n_authors], per_author[n_authors:]

    def flat(groups: Sequence[list[dict]]) -> list[dict]:
        return [r for g in groups for r in g]

    splits: dict[str, list[dict]] = {"full": flat(train)}
    for p, k in counts.items():
        forget = flat(train[n_authors - k:])
        splits[f"forget{p:02d}"] = forget
        splits[f"forget{p:02d}_perturbed"] = forget
        splits[f"retain{100 - p:02d}"] = flat(train[: n_authors - k])
        splits[f"holdout{p:02d}"] = flat(held[:k])
    splits["retain_perturbed"] = flat(train[: min(counts[10], n_authors - counts[10])])
    splits["real_authors_perturbed"] = real_author_records(n_perturbed)
    splits["world_facts_perturbed"] = world_fact_records(n_perturbed)
    return splits


def make_benchmark(out_dir: str | Path, n_authors: int = 20, qas_per_author: int = 10, seed: int = 0,
                   n_perturbed: int = 4) -> Path:
    """Write the bundled benchmark's splits (``<split>.json``, JSON arrays) and ``manifest.json`` to `out_dir`.

    Deterministic: the same arguments give byte-identical files. Each file is written atomically; the manifest
    (generator version, arguments, per-split record and author counts, SHA-256 of each file) is written last,
    so a directory with a manifest is complete.
    """
    out = Path(out_dir)
    splits = build_splits(n_authors, qas_per_author, seed, n_perturbed)
    entries = {}
    for name, records in splits.items():
        text = dump_records(records)
        write_text_atomic(out / f"{name}.json", text)
        entries[name] = {
            "file": f"{name}.json", "records": len(records),
            "authors": len({r["author"] for r in records if "author" in r}),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        }
    manifest = {"generator": "soul.data.generate", "version": GENERATOR_VERSION, "seed": seed,
                "n_authors": n_authors, "qas_per_author": qas_per_author, "n_perturbed": n_perturbed,
                "splits": entries}
    import json

    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out

"""A small, deterministic chat dataset the project generates itself.

The hubs are out of reach in tests and local runs, so the quickstart needs data
whose answers follow rules a tiny model can pick up in a minute: facts in fixed
phrasings. ``warmup_corpus`` is different text in the same vocabulary, used to
pre-train tiny-phi3 so that LoRA then has something to adapt rather than noise.
"""

from __future__ import annotations

import random
from typing import Any

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Cuba": "Havana",
    "India": "New Delhi",
    "China": "Beijing",
}
OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "early": "late",
    "happy": "sad",
    "open": "closed",
    "old": "new",
    "full": "empty",
    "high": "low",
    "hard": "soft",
}
COLORS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a banana": "yellow",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
}
SYSTEM = "You are a concise assistant. Answer in one sentence."


def _number_words(n: int) -> str:
    words = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
    ]
    return words[n]


def _qa_pairs() -> list[tuple[str, str]]:
    pairs = []
    for country, city in CAPITALS.items():
        pairs.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
        pairs.append((f"Which city is the capital of {country}?", f"{city} is the capital of {country}."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for thing, color in COLORS.items():
        pairs.append((f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}."))
    for a in range(1, 10):
        for b in range(1, 10):
            if a + b <= 18 and (a * 7 + b) % 3 == 0:
                pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {_number_words(a + b)}."))
    return pairs


def chat_rows(seed: int = 0) -> list[dict[str, Any]]:
    """OpenAI-style ``messages`` rows, shuffled deterministically."""
    rng = random.Random(seed)
    rows = []
    for question, answer in _qa_pairs():
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({"messages": messages})
    rng.shuffle(rows)
    return rows


def warmup_corpus(seed: int = 1) -> list[str]:
    """Sentences and chats in the dataset's vocabulary but not its exact facts."""
    rng = random.Random(seed)
    countries, cities = list(CAPITALS), list(CAPITALS.values())
    lines = []
    for _ in range(600):
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(f"{rng.choice(cities)} is a city. People travel to {rng.choice(countries)} by train.")
        elif kind == 1:
            a, b = rng.sample(list(OPPOSITES), 2)
            lines.append(f"The word {a} is an adjective, and so is the word {b}.")
        elif kind == 2:
            lines.append(
                f"The {rng.choice(['car', 'bird', 'river'])} is {rng.choice(list(COLORS.values()))} "
                f"and {rng.choice(list(OPPOSITES))}."
            )
        else:
            n = rng.randrange(1, 19)
            lines.append(f"The number {n} is written as {_number_words(n)}.")
    return lines

"""Synthetic, realistic profiles for `python profile_app.py seed` (deterministic per seed)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

FIRST_NAMES = (
    "Ada Alan Amara Ana Arjun Aiko Bea Ben Bruno Carla Chen Chloe Dara David Diego Elena Emeka Eva "
    "Farah Felix Grace Hana Hugo Ines Ivan Jamal Jana Jonas Kai Kenji Lara Leo Lina Luca Maya Mei "
    "Mia Nadia Nia Noah Omar Olga Priya Quinn Rafael Rosa Sam Sara Sofia Tariq Tess Theo Uma Vera "
    "Wei Yara Yusuf Zoe"
).split()
LAST_NAMES = (
    "Abara Adler Berg Costa Dubois Eriksen Fischer Garcia Haddad Ito Jensen Kim Kowalski Larsen "
    "Mensah Moreau Nakamura Novak Okafor Patel Quispe Rossi Santos Schmidt Silva Tanaka Tran Ueda "
    "Varga Wang Weber Yilmaz Zhang"
).split()
INTERESTS = (
    "hiking climbing cycling running swimming yoga chess go poker board games video games "
    "photography film jazz techno opera piano guitar singing painting drawing pottery knitting "
    "cooking baking coffee tea wine craft beer gardening birdwatching astronomy physics math "
    "history philosophy poetry novels science fiction fantasy travel languages python rust "
    "machine learning open source startups design architecture dancing salsa tango football "
    "basketball tennis surfing skiing sailing fishing camping volunteering theatre comedy podcasts "
    "anime manga fashion vintage cars motorcycles woodworking robotics electronics diy"
).split()
BIO_WORDS = (
    "love enjoy weekend city mountains sea friends family new learning always trying cooking "
    "reading music long walks good coffee travel work engineer designer teacher nurse student "
    "developer writer artist curious open honest quiet loud adventures books films dogs cats "
    "sunsets mornings evenings projects ideas building making sharing food markets museums "
    "concerts festivals nature garden kitchen team community local small big life years"
).split()
TEMPLATES = (
    "I {verb} {a} and {b}.",
    "Most weekends you will find me {a} or {b}.",
    "{adj} {role} who {verb} {a}.",
    "Looking for people into {a}, {b} and {c}.",
    "Currently learning {a}; always up for {b}.",
)
ROLES = "engineer designer teacher nurse student developer writer artist chef researcher".split()
VERBS = ("love", "enjoy", "am into", "cannot stop talking about", "spend too much time on")
ADJECTIVES = "Curious Quiet Cheerful Restless Patient Friendly Nerdy Sporty".split()


def synthetic_profiles(count: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """`count` profiles; the same `seed` always gives the same profiles."""
    rng = random.Random(seed)
    # Popular interests are much more common than rare ones, as in real data.
    weights = [1 / (rank + 1) for rank in range(len(INTERESTS))]
    order = INTERESTS[:]
    rng.shuffle(order)
    for number in range(count):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        interests = sorted(set(rng.choices(order, weights, k=rng.randint(0, 8))))
        yield {
            "user_id": f"{first.lower()}-{last.lower()}-{number}",
            "name": f"{first} {last}",
            "interests": interests,
            "bio": _bio(rng, interests or order[:3]),
        }


def _bio(rng: random.Random, interests: list[str]) -> str:
    sentences = []
    for _ in range(rng.randint(1, 4)):
        picks = [rng.choice(interests) for _ in range(3)]
        sentences.append(
            rng.choice(TEMPLATES).format(
                verb=rng.choice(VERBS),
                a=picks[0],
                b=picks[1],
                c=picks[2],
                adj=rng.choice(ADJECTIVES),
                role=rng.choice(ROLES),
            )
        )
    filler = " ".join(rng.choices(BIO_WORDS, k=rng.randint(5, 40)))
    return " ".join(sentences) + " " + filler.capitalize() + "."

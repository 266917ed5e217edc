"""Small example tasks, generated locally (no downloads) and seeded, for the quick start and the tests.

    python clients/examples/make_data.py [--out data/examples] [--seed 0] [--train 600] [--eval 60]

writes

* `e2e/train.jsonl`, `e2e/eval.jsonl`: E2E-style table-to-text (Novikova et al. 2017), the task prefix tuning was
  introduced on: `name[The Eagle] eatType[coffee shop] food[Chinese] area[riverside]` -> one or two sentences.
  Train with `--method prefix` (or prompt / p-tuning).
* `sentiment/train.jsonl`, `sentiment/eval.jsonl`: short reviews -> `positive` / `negative`. Train with
  `--method lora` (or ia3).
* `capitals.json`: a template task (zero parameters): an instruction and few-shot examples, country -> capital.
  Upload it with `taskserve upload capitals data/examples/capitals.json`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = [
    "The Eagle", "The Mill", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Clowns", "Cocum", "Cotto",
    "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
    "The Cricketers", "The Golden Curry", "The Phoenix", "The Punter", "The Vaults", "Wildwood", "Zizzi",
]  # fmt: skip
NEAR = ["Burger King", "Café Rouge", "Raja Indian Cuisine", "The Portland Arms", "Crowne Plaza Hotel", "All Bar One"]
EAT_TYPES = ["coffee shop", "pub", "restaurant"]
FOODS = ["Chinese", "English", "French", "Indian", "Italian", "Japanese", "fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["riverside", "city centre"]

OPTIONAL = ["eatType", "food", "priceRange", "customer rating", "area", "familyFriendly", "near"]


def e2e_record(rng: random.Random) -> dict[str, str]:
    """One meaning representation and a sentence that says exactly what it holds."""
    fields = {"name": rng.choice(NAMES)}
    for key in rng.sample(OPTIONAL, rng.randint(2, 5)):
        fields[key] = {
            "eatType": lambda: rng.choice(EAT_TYPES),
            "food": lambda: rng.choice(FOODS),
            "priceRange": lambda: rng.choice(PRICES),
            "customer rating": lambda: rng.choice(RATINGS),
            "area": lambda: rng.choice(AREAS),
            "familyFriendly": lambda: rng.choice(["yes", "no"]),
            "near": lambda: rng.choice(NEAR),
        }[key]()
    order = ["name", *[key for key in OPTIONAL if key in fields]]  # E2E lists attributes in a fixed order
    meaning = " ".join(f"{key}[{fields[key]}]" for key in order)
    return {"input": meaning, "output": _realise(fields, rng)}


def _realise(f: dict[str, str], rng: random.Random) -> str:
    name, kind = f["name"], f.get("eatType", "place")
    food = f"{f['food']} " if "food" in f else ""
    opening = rng.choice(
        [
            f"{name} is a {food}{kind}",
            f"There is a {food}{kind} called {name}",
            f"{name} is a {kind}" + (f" serving {f['food']} food" if "food" in f else ""),
        ]
    )
    details = []
    if "area" in f:
        details.append(f"in the {f['area']}")
    if "near" in f:
        details.append(f"near {f['near']}")
    if "priceRange" in f:
        price = f["priceRange"]
        details.append(
            f"in the {price} price range" if price in ("cheap", "moderate", "high") else f"with prices {price}"
        )
    first = opening + (" " + " ".join(details) if details else "") + "."
    extra = []
    if "customer rating" in f:
        extra.append(rng.choice(["Customers rate it {}.", "It has a {} customer rating."]).format(f["customer rating"]))
    if "familyFriendly" in f:
        extra.append("It is family friendly." if f["familyFriendly"] == "yes" else "It is not family friendly.")
    return " ".join([first, *extra])


POSITIVE = ["great", "excellent", "wonderful", "fantastic", "reliable", "lovely", "superb", "delightful"]
NEGATIVE = ["terrible", "awful", "disappointing", "broken", "useless", "poor", "dreadful", "flimsy"]
THINGS = ["phone", "blender", "hotel", "film", "book", "jacket", "laptop", "coffee", "pizza", "headset"]
POSITIVE_TAILS = ["I would buy it again.", "Highly recommended.", "Worth every penny.", "It made my day."]
NEGATIVE_TAILS = ["I want a refund.", "Avoid it.", "A waste of money.", "Never again."]


def sentiment_record(rng: random.Random) -> dict[str, str]:
    positive = rng.random() < 0.5
    words, tails = (POSITIVE, POSITIVE_TAILS) if positive else (NEGATIVE, NEGATIVE_TAILS)
    thing = rng.choice(THINGS)
    text = rng.choice(
        [
            f"The {thing} was {rng.choice(words)}. {rng.choice(tails)}",
            f"What a {rng.choice(words)} {thing}! {rng.choice(tails)}",
            f"This {thing} is {rng.choice(words)} and {rng.choice(words)}.",
        ]
    )
    return {"input": text, "output": "positive" if positive else "negative"}


CAPITALS = {
    "instruction": "Answer with the capital city only.",
    "examples": [
        {"input": "Germany", "output": "Berlin"},
        {"input": "Italy", "output": "Rome"},
        {"input": "Japan", "output": "Tokyo"},
        {"input": "Kenya", "output": "Nairobi"},
    ],
    "input_prefix": "Country: ",
    "input_suffix": "\nCapital:",
    "chat": False,
}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/examples"), help="folder to write (data/examples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600, help="training records per task")
    parser.add_argument("--eval", type=int, default=60, help="evaluation records per task")
    args = parser.parse_args(argv)
    for name, make in (("e2e", e2e_record), ("sentiment", sentiment_record)):
        rng = random.Random(f"{name}-{args.seed}")
        write_jsonl(args.out / name / "train.jsonl", [make(rng) for _ in range(args.train)])
        write_jsonl(args.out / name / "eval.jsonl", [make(rng) for _ in range(args.eval)])
    template = {"template": CAPITALS, "description": "country -> capital, four-shot"}
    (args.out / "capitals.json").write_text(json.dumps(template, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}/e2e, {args.out}/sentiment ({args.train} train + {args.eval} eval each), capitals.json")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Generate the demo dataset shipped in `src/sftforge/assets/`.

The demo task is structured extraction: the user message is a fixed one-line instruction
followed by a sentence or two about a person; the assistant answers with ONE line of compact
JSON in a fixed schema, with keys in this order:

    {"person": "Maria Lopez", "age_years": 34, "home_city": "Lisbon"}

`person` and `home_city` are copied verbatim from the text and `age_years` is an integer
(no quotes). A base model asked zero-shot answers in prose or invents other keys
("name", "age", "city", ...); after a few minutes of LoRA fine-tuning it follows the schema.

Generalisation, not memory: the eval split uses sentence forms, first names, last names,
cities and jobs that never occur in the train split. Texts also carry distractors (a year,
a count, a job) so the integer to extract is not simply "the number in the sentence".

Everything is driven by `random.Random` with a fixed seed and plain lists (never sets or
hash order), so two runs write byte-identical files:

    python scripts/make_demo_data.py                       # 200 train / 60 eval
    python scripts/make_demo_data.py --out-dir /tmp/demo --train 50 --eval 20 --seed 7

Written records contain only `messages` (and, for eval, `reference`, the expected assistant
string). `make_examples()` additionally returns a `meta` field (form id, values) for tests.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

INSTRUCTION = "Extract the person as JSON."
KEYS = ("person", "age_years", "home_city")

DEFAULT_SEED = 2024
CURRENT_YEAR = 2024  # fixed, not time-dependent: keeps output deterministic
DEFAULT_TRAIN = 200
DEFAULT_EVAL = 60
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "sftforge" / "assets"
TRAIN_FILE = "demo_train.jsonl"
EVAL_FILE = "demo_eval.jsonl"

# Placeholders a form may use:
#   {name} full name (extracted)   {first} first name only   {age} age digits (extracted)
#   {a_age} "a 34" / "an 81"   {a_age_cap} "A 34" / "An 81"   {city} city (extracted)
#   {job} job   {a_job} "a nurse" / "an architect"   {year} a year   {count} small count
#   {bigcount} a count in the hundreds   {weekday} a day of the week
# Every form contains {name}, {city} and exactly one of {age}/{a_age}/{a_age_cap}.

# fmt: off
TRAIN_FORMS: list[tuple[str, str]] = [
    ("train-01", "{name} is {age} years old and lives in {city}. {first} has worked as {a_job} since {year}."),
    ("train-02", "Meet {name}, {a_age}-year-old {job} from {city} who owns {count} bicycles."),
    ("train-03", "In {city}, {name} ({age}) runs a small bakery with {count} employees."),
    ("train-04", "{city} resident {name}, aged {age}, joined the local chess club in {year}."),
    ("train-05", "At {age}, {name} still takes the tram across {city} every morning to work as {a_job}."),
    ("train-06", "The new {job} at the clinic is {name}; {first} is {age} and moved to {city} in {year}."),
    ("train-07", "{name} celebrated turning {age} last week with {count} friends at a cafe in {city}."),
    ("train-08", "Our volunteer of the month is {name}, {age}, of {city}, who planted {count} trees this spring."),
    ("train-09", "Age {age}, {name} has lived in {city} for {count} years and works as {a_job}."),
    ("train-10", "{name} from {city} is {age} and has {count} cousins."),
    ("train-11", "Profile: {name}. Home: {city}. Age: {age}. Occupation: {job}."),
    ("train-12", "{a_age_cap}-year-old {job} named {name} from {city} won a regional quiz in {year}."),
    ("train-13", "{city} is where {name} grew up, and at {age} {first} still runs {count} marathons a year."),
    ("train-14", "Card {count}: {name} | {age} | {city} | {job}"),
    ("train-15", "{count} years ago {name} moved to {city}; {first} is {age} today."),
    ("train-16", "Contact details - full name {name}, {age} years, based in {city}, shoe size {count}."),
    ("train-17", "We spoke with {name} in {city}. The {job}, {age}, has {count} grandchildren."),
    ("train-18", "On {weekday}, {name} of {city} turned {age} and got {count} cards."),
    ("train-19", "{name} ({job}, {city}) is {age}; {first} has visited {count} countries."),
    ("train-20", "Since {year}, {a_job} called {name} has lived in {city}. {first} is {age}."),
    ("train-21", "For {count} years {name} worked as {a_job}; now {age}, {first} lives in {city}."),
    ("train-22", "{city} local {name} is {a_age}-year-old {job} with {count} kids."),
    ("train-23", "Reporter's note: {name}, {age}, {city}, {count} dogs."),
    ("train-24", "Ask anyone in {city} about {name}: {first} is {age} and sings in {count} choirs."),
    ("train-25", "{city}'s newest {job}, {name}, is {age} and has {count} brothers."),
    ("train-26", "{city} welcomed {name} in {year}; the {job} turned {age} this spring."),
]

EVAL_FORMS: list[tuple[str, str]] = [
    ("eval-01", "{name}, who is {age}, recently bought an apartment in {city} for a family of {count}."),
    ("eval-02", "Living in {city} since {year}, {name} had a birthday this month and is now {age}."),
    ("eval-03", "Last {weekday}, {age}-year-old {name} opened a bookshop in {city} with {count} shelves of comics."),
    ("eval-04", "{city} is home to {name}, {a_job} who is {age} years of age."),
    ("eval-05", "Name: {name} / City: {city} / Age: {age} / Pets: {count}"),
    ("eval-06", "The {year} newsletter says {name} ({age} years) teaches {count} music classes a week in {city}."),
    ("eval-07", "After {count} years as {a_job}, {name}, {age}, still calls {city} home."),
    ("eval-08", "Everyone in {city} knows {name}: the {age}-year-old {job} has fixed over {bigcount} bikes since {year}."),
]

# Disjoint pools (train vs eval). Plain lists so iteration order never depends on hashing.
TRAIN_FIRST = [
    "Maria", "Jonas", "Aisha", "Pedro", "Elena", "Tomas", "Yuki", "Omar", "Sofia", "Lukas",
    "Chloe", "Daniel", "Ingrid", "Kwame", "Priya", "Mateo", "Hannah", "Ivan", "Leila", "Oscar",
    "Nora", "Felix", "Amara", "Marco", "Greta", "Samuel", "Mei", "Rafael", "Zoë", "José",
    "Anika", "Tariq", "Lucia", "Andrei", "Fatou", "Bruno", "Ewa", "Tobias", "Ayesha", "Carmen",
    "Kofi", "Lina", "Stefan", "Noor", "Pablo", "Alice", "Hiro", "Marta", "Dmitri", "Olga",
    "Sami", "Julia", "Paolo", "Zara", "Clara", "Luis", "Ahmed", "Irene", "Jakub", "Ruth",
    "Yara", "Leon", "Mira", "Agnès", "Björn", "Łukasz", "Ömer", "Håkon", "Jürgen", "Gaël",
    "Noémie", "Joël", "Frédéric", "Aaron", "Bianca", "Cyrus", "Delia", "Elias", "Freya",
    "Gustav", "Hana", "Isak", "Jonah", "Kira", "Liam", "Maya", "Nils", "Otto", "Petra",
    "Quentin", "Rhea", "Soren", "Talia", "Uma", "Vera", "Ximena", "Yusuf", "Zane",
]
TRAIN_LAST = [
    "Lopez", "Novak", "Schmidt", "Rossi", "Dubois", "Kowalski", "Jensen", "Okafor", "Tanaka",
    "Nguyen", "Silva", "Petrov", "Murphy", "Larsen", "Fischer", "Moreau", "Costa", "Haddad",
    "Ibrahim", "Kim", "Sato", "Bauer", "Horvat", "Walsh", "Ortiz", "Varga", "Berg", "Mensah",
    "Patel", "Reyes", "Müller", "Ferreira", "Almeida", "Novotny", "Keller", "Romano", "Garcia",
    "Svensson", "Abebe", "Nakamura", "Kuznetsov", "Hughes", "Lambert", "Vogel", "Marin", "Osei",
    "Ramos", "Dalton", "Weber", "Popescu", "Hansen", "Torres", "Chen", "Wong", "Ali", "Sousa",
    "Nilsen", "Klein", "Morales", "Banda", "Egan", "Pereira", "Núñez", "Çelik", "Øberg",
    "Åström", "Kovačević", "Dvořák", "Wójcik", "Gómez", "Hernández", "Peña", "Jiménez",
    "Ramírez", "Schäfer", "Köhler", "Lefèvre", "Abbott", "Becker", "Carter", "Dimitrov", "Evans",
    "Fernandes", "Gallo", "Hale", "Ivanova", "Jovanovic", "Kaplan", "Mason", "Olsen", "Pinto",
    "Rahman", "Stone", "Toma", "Ueda", "Vance", "Wolff", "Young", "Zielinski",
]
TRAIN_CITIES = [
    "Lisbon", "Porto", "Madrid", "Valencia", "Lyon", "Marseille", "Hamburg", "Munich", "Vienna",
    "Prague", "Krakow", "Dublin", "Cork", "Oslo", "Bergen", "Helsinki", "Tallinn", "Riga",
    "Toronto", "Denver", "Austin", "Chicago", "Seattle", "Osaka", "Kyoto", "Melbourne",
    "Auckland", "Nairobi", "Lima", "Quito", "Málaga", "Zürich", "Buenos Aires", "New Orleans",
    "Cape Town", "Bilbao", "Granada", "Nantes", "Lille", "Toulouse", "Cologne", "Leipzig",
    "Dresden", "Graz", "Salzburg", "Brno", "Poznan", "Wroclaw", "Galway", "Limerick",
    "Stavanger", "Trondheim", "Turku", "Tartu", "Kaunas", "Ottawa", "Boston", "Phoenix",
    "Atlanta", "Miami", "Dallas", "Nagoya", "Kobe", "Adelaide", "Brisbane", "Hobart",
    "Christchurch", "Mombasa", "Accra", "Lagos", "Cusco", "Bogota", "Santiago", "Rosario",
    "Havana", "Glasgow", "Leeds", "Bristol", "Cardiff", "Naples", "Turin", "Florence", "Genoa",
    "Zagreb", "Ljubljana", "Athens", "Izmir", "Tunis", "Rabat", "Hanoi", "Busan", "Taipei",
    "Manila", "Jakarta", "Pune", "Dhaka",
    "Aarhus", "Odense", "Malmo", "Uppsala", "Bremen", "Hanover", "Stuttgart", "Nuremberg",
    "Basel", "Geneva", "Lausanne", "Bern", "Innsbruck", "Linz", "Bratislava", "Kosice",
    "Debrecen", "Cluj", "Iasi", "Varna", "Plovdiv", "Thessaloniki", "Patras", "Palermo",
    "Catania", "Bari", "Verona", "Padua", "Trieste", "Nice", "Montpellier", "Rennes",
    "Strasbourg", "Dijon", "Grenoble", "Porto Alegre", "Recife", "Fortaleza", "Salvador",
    "Curitiba", "Medellin", "Cali", "Arequipa", "Trujillo", "Asuncion", "Mendoza", "Valparaiso",
    "Guadalajara", "Monterrey", "Puebla", "Oaxaca", "Merida", "Tijuana", "Winnipeg", "Halifax",
    "Quebec", "Edmonton", "Regina", "Omaha", "Tulsa", "Memphis", "Louisville", "Pittsburgh",
    "Cleveland", "Detroit", "Milwaukee", "Minneapolis", "Sacramento", "Fresno", "Tucson",
    "Albuquerque", "Honolulu", "Anchorage", "Reno", "Boise", "Spokane", "Raleigh", "Richmond",
    "Savannah", "Charleston", "Kumasi", "Dakar", "Kampala", "Kigali", "Lusaka", "Harare",
    "Durban", "Windhoek", "Gaborone", "Maputo", "Casablanca", "Fez", "Alexandria", "Amman",
    "Beirut", "Muscat", "Doha", "Tbilisi", "Yerevan", "Baku", "Almaty", "Tashkent", "Lahore",
    "Karachi", "Jaipur", "Kochi", "Chennai", "Colombo", "Kathmandu", "Chiang Mai", "Penang",
    "Cebu", "Da Nang", "Hue", "Fukuoka", "Sendai", "Hiroshima", "Daegu", "Incheon", "Kaohsiung",
    "Darwin", "Cairns", "Geelong", "Dunedin", "Hamilton", "Suva", "Apia", "Reykjavik", "Tromso",
    "Lund",
]
TRAIN_JOBS = [
    "nurse", "carpenter", "teacher", "pharmacist", "baker", "electrician", "librarian",
    "architect", "engineer", "gardener", "plumber", "accountant",
]

EVAL_FIRST = [
    "Beatriz", "Henrik", "Fatima", "Lorenzo", "Astrid", "Kenji", "Nadia", "Emeka", "Camille",
    "Viktor", "Rosa", "Arjun", "Sienna", "Mikael", "Inês", "Hugo",
]
EVAL_LAST = [
    "Kaur", "Lindqvist", "Adeyemi", "Castellano", "Brennan", "Yamada", "Duarte", "Szabo",
    "Moretti", "Fontaine", "Hashemi", "Park", "Quinn", "Valdez", "Eriksson", "Søndergaard",
]
EVAL_CITIES = [
    "Bordeaux", "Seville", "Bologna", "Gdansk", "Antwerp", "Gothenburg", "Tampere", "Vilnius",
    "Calgary", "Portland", "Nashville", "Sapporo", "Perth", "Wellington", "Montevideo",
    "Córdoba", "San Diego", "Rio de Janeiro",
]
EVAL_JOBS = [
    "dentist", "translator", "veterinarian", "pilot", "tailor", "journalist", "surveyor",
    "florist",
]

# fmt: on

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

SPLITS = {
    "train": {
        "forms": TRAIN_FORMS,
        "first": TRAIN_FIRST,
        "last": TRAIN_LAST,
        "cities": TRAIN_CITIES,
        "jobs": TRAIN_JOBS,
        "ages": (19, 78),
        "salt": 0,
    },
    "eval": {
        "forms": EVAL_FORMS,
        "first": EVAL_FIRST,
        "last": EVAL_LAST,
        "cities": EVAL_CITIES,
        "jobs": EVAL_JOBS,
        "ages": (21, 80),
        "salt": 1,
    },
}


def _article(word: str) -> str:
    """'a' or 'an' before a word or a number written in digits (an 8, an 11, an 18, an 80)."""
    if word[0].isdigit():
        n = int(word)
        return "an" if str(n)[0] == "8" or n in (11, 18) else "a"
    return "an" if word[0].lower() in "aeiou" else "a"


def answer_json(person: str, age: int, city: str) -> str:
    """The assistant answer: compact one-line JSON with KEYS in fixed order."""
    return json.dumps({"person": person, "age_years": age, "home_city": city}, ensure_ascii=False)


def _render(rng: random.Random, form: str, spec: dict) -> tuple[str, dict]:
    first = rng.choice(spec["first"])
    last = rng.choice(spec["last"])
    city = rng.choice(spec["cities"])
    job = rng.choice(spec["jobs"])
    age = rng.randint(*spec["ages"])
    # Distractors stay plausible for the age (no one works since before they were 16) and
    # never equal it: a year has four digits, a count is at most 12 (below every age).
    year = rng.randint(min(2023, max(1998, CURRENT_YEAR - age + 16)), 2023)
    count = rng.randint(2, min(12, age - 16))
    bigcount = rng.randint(120, 950)
    weekday = rng.choice(WEEKDAYS)
    name = f"{first} {last}"
    a_age = f"{_article(str(age))} {age}"
    text = form.format(
        name=name,
        first=first,
        age=age,
        a_age=a_age,
        a_age_cap=a_age[0].upper() + a_age[1:],
        city=city,
        job=job,
        a_job=f"{_article(job)} {job}",
        year=year,
        count=count,
        bigcount=bigcount,
        weekday=weekday,
    )
    values = {
        "person": name,
        "age_years": age,
        "home_city": city,
        "first": first,
        "last": last,
        "job": job,
    }
    return text, values


def make_examples(n: int, split: str, seed: int = DEFAULT_SEED) -> list[dict]:
    """`n` examples of `split` ("train" or "eval"), deterministic in (n, split, seed).

    Each example is {"messages": [...], "meta": {...}} plus "reference" for eval. `meta`
    (form id, extracted values, first/last name, job) is for tests only and is never written.
    Sentence forms are used in balanced rotation (shuffled), and user texts are unique.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    spec = SPLITS[split]
    rng = random.Random(seed * 10 + spec["salt"])
    forms = spec["forms"]
    order: list[tuple[str, str]] = []
    while len(order) < n:
        block = list(forms)
        rng.shuffle(block)
        order.extend(block)
    examples: list[dict] = []
    seen: set[str] = set()  # membership only; never iterated
    for form_id, form in order[:n]:
        for _ in range(1000):
            text, values = _render(rng, form, spec)
            if text not in seen:
                break
        else:  # pragma: no cover - pools are far larger than any sensible n
            raise RuntimeError(f"could not make {n} distinct {split} examples")
        seen.add(text)
        answer = answer_json(values["person"], values["age_years"], values["home_city"])
        ex: dict = {
            "messages": [
                {"role": "user", "content": f"{INSTRUCTION}\n\n{text}"},
                {"role": "assistant", "content": answer},
            ],
        }
        if split == "eval":
            ex["reference"] = answer
        ex["meta"] = {"form": form_id, "template": form, "text": text, **values}
        examples.append(ex)
    return examples


def to_record(example: dict) -> dict:
    """What goes into the JSONL file: `messages` (+ `reference` for eval), nothing else."""
    rec = {"messages": example["messages"]}
    if "reference" in example:
        rec["reference"] = example["reference"]
    return rec


def render_jsonl(examples: list[dict]) -> str:
    return "".join(json.dumps(to_record(ex), ensure_ascii=False) + "\n" for ex in examples)


def build_files(
    n_train: int = DEFAULT_TRAIN, n_eval: int = DEFAULT_EVAL, seed: int = DEFAULT_SEED
) -> dict[str, str]:
    """File name -> exact file text (UTF-8, '\\n' line ends)."""
    return {
        TRAIN_FILE: render_jsonl(make_examples(n_train, "train", seed)),
        EVAL_FILE: render_jsonl(make_examples(n_eval, "eval", seed)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="where to write demo_train.jsonl and demo_eval.jsonl (default: %(default)s)",
    )
    p.add_argument(
        "--train", type=int, default=DEFAULT_TRAIN, help="train examples (default: %(default)s)"
    )
    p.add_argument(
        "--eval", type=int, default=DEFAULT_EVAL, help="eval examples (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)"
    )
    args = p.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        p.error("--train and --eval must be >= 0")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for fname, text in build_files(args.train, args.eval, args.seed).items():
        path = args.out_dir / fname
        path.write_bytes(text.encode("utf-8"))
        print(f"wrote {path} ({text.count(chr(10))} examples, {len(text.encode('utf-8'))} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

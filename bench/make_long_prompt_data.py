"""Generate bench/data/long_prompts.jsonl: long prompts, short answers (about 5 % trained tokens).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/make_long_prompt_data.py [--model DIR] [--out PATH]

The demo set trains about a third of its tokens; this one stresses the other end, where a tool
that computes the LM head (or stores logits) for every position pays for tokens that carry no
label. Each example is a passage of several sentences about a fictional bridge, bakery, ship,
... with a few facts (a person, a city, a year, a count) and distractors of the same kinds, then
a question about one fact. The assistant answers in one short sentence that copies the fact, so
the task is learnable: find the asked-for slot in the passage.

Deterministic: one random.Random with a fixed seed, plain lists only, so every run writes the
same bytes. Lengths are measured with the model's tokenizer and chat template; every example
is at most --max-length tokens in total.
"""

import argparse
import json
import random
import statistics
from pathlib import Path

SEED = 1234
COUNT = 200
OUT = Path(__file__).resolve().parent / "data" / "long_prompts.jsonl"

# fmt: off
FIRST = [
    "Amara", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid",
    "Jonas", "Kemal", "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan",
    "Tamsin", "Ulrich", "Valeria", "Wendell", "Ximena", "Yusuf", "Zofia", "Anders", "Beatriz",
    "Cyrus", "Delphine", "Emeka", "Freya", "Gideon", "Hana", "Ivo", "Juno",
]
LAST = [
    "Abernathy", "Bergstrom", "Castellano", "Delacroix", "Eriksen", "Fontaine", "Gallagher",
    "Hoffmann", "Ibarra", "Jankowski", "Kowalczyk", "Lindqvist", "Moreau", "Nakamura",
    "Okafor", "Petrov", "Quiroga", "Rasmussen", "Sorensen", "Takahashi", "Underwood", "Varga",
    "Whitaker", "Yilmaz", "Zeller", "Almeida", "Brennan", "Costa", "Dubois", "Esposito",
]
CITIES = [
    "Lisbon", "Tromso", "Valparaiso", "Kraków", "Hobart", "Tangier", "Bergen", "Porto Alegre",
    "Nagasaki", "Galway", "Trieste", "Antwerp", "Halifax", "Dunedin", "Cartagena", "Tbilisi",
    "Gdansk", "Marseille", "Quebec City", "Bilbao", "Aarhus", "Zadar", "Plovdiv", "Tallinn",
]
# fmt: on

# Each topic: fact sentences (every slot appears once), distractor sentences (other values of
# the same kinds), neutral filler, and one question with its answer per slot.
TOPICS = [
    {
        "facts": [
            "The footbridge over the harbour in {city} was designed by the engineer {name}.",
            "It opened to the public in {year} after four winters of work.",
            "The deck rests on {count} steel cables anchored in the rock.",
        ],
        "distractors": [
            "A rival design by {name2} was rejected because it blocked the view of the old fort.",
            "The steel was rolled in a mill near {city2}, far down the coast.",
            "A storm in {year2} tore away part of the scaffolding.",
            "Some {count2} workers took turns on the night shift.",
            "In {year3} the council of {city3} sent a delegation to study the bridge.",
        ],
        "questions": {
            "name": ("Who designed the footbridge?", "The engineer {name} designed it."),
            "city": ("In which city is the footbridge?", "It is in {city}."),
            "year": ("In which year did the footbridge open?", "It opened in {year}."),
            "count": ("How many steel cables hold the deck?", "It rests on {count} cables."),
        },
    },
    {
        "facts": [
            "The bakery on Canal Street was founded by {name}, who had trained as a chemist.",
            "It has stood in the old quarter of {city} since {year}.",
            "Every morning it bakes {count} loaves of rye bread before sunrise.",
        ],
        "distractors": [
            "Its first oven was bought second-hand from {name2}, a retired cook.",
            "Flour arrives by train from the mills around {city2}.",
            "A fire in {year2} closed the shop for a whole summer.",
            "On holidays the queue can reach {count2} people by seven o'clock.",
            "A food critic from {city3} praised the pastries in {year3}.",
        ],
        "questions": {
            "name": ("Who founded the bakery?", "It was founded by {name}."),
            "city": ("In which city is the bakery?", "The bakery is in {city}."),
            "year": (
                "Since which year has the bakery stood there?",
                "It has stood there since {year}.",
            ),
            "count": (
                "How many loaves of rye does it bake each morning?",
                "It bakes {count} loaves.",
            ),
        },
    },
    {
        "facts": [
            "The research ship Northern Lantern is commanded by Captain {name}.",
            "Her home port is {city}, where she returns every autumn.",
            "She was launched in {year} and carries a crew of {count}.",
        ],
        "distractors": [
            "Her sister ship is commanded by {name2}, an old friend of the captain.",
            "She was built in a yard outside {city2}.",
            "A refit in {year2} gave her a new engine and a larger laboratory.",
            "On her longest voyage she logged {count2} days without sighting land.",
            "A film crew from {city3} spent the season of {year3} on board.",
        ],
        "questions": {
            "name": ("Who commands the Northern Lantern?", "Captain {name} commands her."),
            "city": ("What is the home port of the Northern Lantern?", "Her home port is {city}."),
            "year": (
                "In which year was the Northern Lantern launched?",
                "She was launched in {year}.",
            ),
            "count": (
                "How large is the crew of the Northern Lantern?",
                "She carries a crew of {count}.",
            ),
        },
    },
    {
        "facts": [
            "The municipal library of {city} is run by the head librarian {name}.",
            "Its reading room, added in {year}, has {count} oak desks under a glass roof.",
        ],
        "distractors": [
            "The building was once a customs house, and its architect, {name2}, also built the station.",
            "Rare maps are sometimes lent to the archive in {city2}.",
            "A flood in {year2} damaged the basement stacks.",
            "The children's corner holds about {count2} picture books.",
            "Students from {city3} have visited every spring since {year3}.",
        ],
        "questions": {
            "name": ("Who runs the municipal library?", "The head librarian {name} runs it."),
            "city": ("Which city does the library belong to?", "It belongs to {city}."),
            "year": ("In which year was the reading room added?", "It was added in {year}."),
            "count": (
                "How many oak desks are in the reading room?",
                "There are {count} oak desks.",
            ),
        },
    },
    {
        "facts": [
            "The youth orchestra of {city} is conducted by {name}.",
            "It gave its first concert in {year} and now has {count} members.",
        ],
        "distractors": [
            "Its founder, {name2}, still attends every rehearsal.",
            "Each summer it tours the towns around {city2}.",
            "A recording made in {year2} is still sold at the concert hall.",
            "The hall seats {count2} people, and most concerts sell out.",
            "A violin maker from {city3} repaired its instruments in {year3}.",
        ],
        "questions": {
            "name": ("Who conducts the youth orchestra?", "It is conducted by {name}."),
            "city": ("Which city is the youth orchestra from?", "It is from {city}."),
            "year": (
                "In which year did the orchestra give its first concert?",
                "Its first concert was in {year}.",
            ),
            "count": ("How many members does the orchestra have?", "It has {count} members."),
        },
    },
    {
        "facts": [
            "The mountain observatory above {city} is directed by the astronomer {name}.",
            "Its main telescope saw first light in {year}.",
            "On clear nights the staff photograph about {count} galaxies.",
        ],
        "distractors": [
            "The dome was designed by {name2}, who also built a planetarium by the sea.",
            "Spare mirrors are polished in a workshop near {city2}.",
            "Snow cut the road to the summit for six weeks in {year2}.",
            "The access road has {count2} hairpin bends.",
            "A school group from {city3} stayed overnight in {year3}.",
        ],
        "questions": {
            "name": ("Who directs the observatory?", "The astronomer {name} directs it."),
            "city": ("Above which city is the observatory?", "It is above {city}."),
            "year": (
                "In which year did the main telescope see first light?",
                "It saw first light in {year}.",
            ),
            "count": (
                "About how many galaxies are photographed on clear nights?",
                "About {count} galaxies.",
            ),
        },
    },
]

FILLER = [
    "Visitors often remark on how quiet the place feels early in the morning.",
    "The local newspaper has covered its history in a long series of articles.",
    "Several photographs from the early days hang in the entrance hall.",
    "Guided tours run on weekends, and booking ahead is recommended.",
    "A small museum nearby tells the story of the neighbourhood around it.",
    "Most of the original plans were lost, so much of its history comes from letters.",
    "The surrounding streets were repaved a few years ago with granite setts.",
    "Tourists tend to arrive in the late afternoon when the light is softer.",
    "People who grew up nearby still tell stories about the opening day.",
    "A plaque by the door lists the names of the first volunteers.",
    "The gift shop sells postcards, maps and a thin guidebook.",
    "In winter the opening hours are shorter, and the café closes early.",
]

INSTRUCTIONS = [
    "Read the passage and answer the question in one short sentence.",
    "Answer the question about the passage below in one short sentence.",
]


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def distinct(rng: random.Random, draw, n: int) -> list:
    values: list = []
    while len(values) < n:
        v = draw(rng)
        if v not in values:
            values.append(v)
    return values


def make_example(rng: random.Random, tokenizer, min_prompt: int, max_prompt: int) -> dict:
    topic = rng.choice(TOPICS)
    names = distinct(rng, person, 2)
    cities = distinct(rng, lambda r: r.choice(CITIES), 3)
    years = distinct(rng, lambda r: r.randint(1921, 2019), 3)
    counts = distinct(rng, lambda r: r.randint(3, 180), 2)
    values = {
        "name": names[0],
        "name2": names[1],
        "city": cities[0],
        "city2": cities[1],
        "city3": cities[2],
        "year": years[0],
        "year2": years[1],
        "year3": years[2],
        "count": counts[0],
        "count2": counts[1],
    }
    slot = rng.choice(list(topic["questions"]))
    question, answer = topic["questions"][slot]

    # Facts first, in order; distractors and filler shuffled in after them, one at a time,
    # until the user message is long enough (or nothing is left to add).
    extra = list(topic["distractors"]) + rng.sample(FILLER, len(FILLER))
    extra = rng.sample(extra, len(extra))
    target = rng.randint(min_prompt, max_prompt)
    sentences = [s.format(**values) for s in topic["facts"]]
    instruction = rng.choice(INSTRUCTIONS)

    def user_text() -> str:
        return f"{instruction}\n\n{' '.join(sentences)}\n\nQuestion: {question}"

    while extra and len(tokenizer(user_text())["input_ids"]) < target:
        position = rng.randint(1, len(sentences))
        sentences.insert(position, extra.pop().format(**values))
    return {
        "messages": [
            {"role": "user", "content": user_text()},
            {"role": "assistant", "content": answer.format(**values)},
        ]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--count", type=int, default=COUNT)
    p.add_argument("--max-length", type=int, default=256)
    args = p.parse_args()

    from transformers import AutoTokenizer

    if args.model is None:
        from sftforge.models.source import default_cache_dir, resolve_model_path

        args.model = resolve_model_path("smollm2-135m", default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    rng = random.Random(SEED)
    examples, prompt_lens, answer_lens, totals = [], [], [], []
    while len(examples) < args.count:
        example = make_example(rng, tokenizer, min_prompt=160, max_prompt=215)
        user, assistant = (m["content"] for m in example["messages"])
        total = len(
            tokenizer.apply_chat_template(example["messages"], tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
        if total > args.max_length:
            continue  # deterministic: the same draws are skipped on every run
        examples.append(example)
        prompt_lens.append(len(tokenizer(user)["input_ids"]))
        answer_lens.append(len(tokenizer(assistant)["input_ids"]))
        totals.append(total)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")

    def stats(xs: list[int]) -> str:
        return f"min {min(xs)}, median {statistics.median(xs):g}, mean {statistics.mean(xs):.1f}, max {max(xs)}"

    # The trained share counts the answer plus <|im_end|>, the assistant's end-of-turn marker.
    trained = sum(answer_lens) + len(answer_lens)
    print(f"wrote {len(examples)} examples to {out} ({out.stat().st_size / 1024:.0f} KiB)")
    print(f"user message tokens:      {stats(prompt_lens)}")
    print(f"assistant answer tokens:  {stats(answer_lens)}")
    print(f"total with chat template: {stats(totals)}")
    print(f"trained share (answer + <|im_end|>): {100 * trained / sum(totals):.1f} % of all tokens")


if __name__ == "__main__":
    main()

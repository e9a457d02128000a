#!/usr/bin/env python
"""Generate the tool-calling task shipped in `src/sftforge/assets/`.

Every record offers the same four tools, in the same order (get_weather, convert_currency,
search_flights, add_calendar_event), in OpenAI's chat fine-tuning shape:

    {"tools": [...], "messages": [user, assistant {tool_calls}, tool, assistant text]}

Assistant turns that call tools have `content: null` and `tool_calls` with ids call_1,
call_2, ... in the order made; arguments are a JSON string, as OpenAI writes them. Each
argument is written in the prompt exactly as the call holds it (city names, ISO currency
codes, amounts as numbers, dates as YYYY-MM-DD, times as HH:MM, event titles), or,
in a tool loop, copied from the tool result before it (a departure time, a converted sum).

Training conversations are single calls, parallel calls (two in one turn), tool loops (a
call, its result, the next call, its result, the answer), follow-ups (a second request after
the first answer) and a few with no tool needed. Held-out conversations each END with an
assistant turn holding the call(s) to predict, given everything before: a single call,
parallel calls, the second step of a loop, or the call of a follow-up.

Generalisation, not memory: the held-out split uses sentence templates and argument values
(cities, amounts, currency pairs, dates, times, titles) that never occur in
training; `check_held_out` asserts it whenever the files are built.

Everything is driven by `random.Random` with a fixed seed and plain lists, so two runs write
byte-identical files:

    python scripts/make_tool_task.py                       # 200 train / 60 eval
    python scripts/make_tool_task.py --out-dir /tmp/tools --train 50 --eval 20 --seed 7
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import sys
from pathlib import Path

DEFAULT_SEED = 2025
DEFAULT_TRAIN = 200
DEFAULT_EVAL = 60
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "src" / "sftforge" / "assets"
TRAIN_FILE = "tools_train.jsonl"
EVAL_FILE = "tools_eval.jsonl"
SYSTEM = "You are a helpful assistant. Use the tools when they help."


def _tool(name: str, description: str, properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": schema},
    }


_STR = {"type": "string"}
TOOLS = [
    _tool(
        "get_weather",
        "Current weather in a city.",
        {"city": _STR, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        ["city", "unit"],
    ),
    _tool(
        "convert_currency",
        "Convert money between ISO currency codes.",
        {"amount": {"type": "number"}, "from_currency": _STR, "to_currency": _STR},
        ["amount", "from_currency", "to_currency"],
    ),
    _tool(
        "search_flights",
        "Find flights on a date (YYYY-MM-DD).",
        {"origin": _STR, "destination": _STR, "date": _STR},
        ["origin", "destination", "date"],
    ),
    _tool(
        "add_calendar_event",
        "Add a calendar event (YYYY-MM-DD, HH:MM).",
        {"title": _STR, "date": _STR, "time": _STR},
        ["title", "date", "time"],
    ),
]

# Slots a single-call template uses, per tool:
#   get_weather {city} {unit_word}   convert_currency {amount} {src} {dst}
#   search_flights {origin} {destination} {date}   add_calendar_event {title} {date} {time}
# A parallel template adds the second call's slots with a "2" ({city2}); a loop template
# names the last currency {dst2}. Templates are (id, tools, text).
# fmt: off
TEMPLATES = {
    "train": {
        "single": [
            ("t-w1", ["get_weather"], "What's the weather like in {city} right now? Give me the temperature in {unit_word}."),
            ("t-w2", ["get_weather"], "How warm is it in {city}? Please use {unit_word}."),
            ("t-w3", ["get_weather"], "Weather check for {city}, in {unit_word} please."),
            ("t-w4", ["get_weather"], "Tell me the current weather in {city} in {unit_word}."),
            ("t-w5", ["get_weather"], "I'm heading out in {city}. What's the temperature there in {unit_word}?"),
            ("t-w6", ["get_weather"], "Is it cold in {city} today? Answer in {unit_word}."),
            ("t-w7", ["get_weather"], "Should I pack an umbrella for {city}? Show me how it looks there, {unit_word}."),
            ("t-w8", ["get_weather"], "What's it like outdoors in {city}? Use {unit_word}."),
            ("t-c1", ["convert_currency"], "Convert {amount} {src} to {dst}."),
            ("t-c2", ["convert_currency"], "How much is {amount} {src} in {dst}?"),
            ("t-c3", ["convert_currency"], "What would {amount} {src} be worth in {dst}?"),
            ("t-c4", ["convert_currency"], "I have {amount} {src}. How many {dst} is that?"),
            ("t-c5", ["convert_currency"], "Please change {amount} {src} into {dst}."),
            ("t-f1", ["search_flights"], "Find flights from {origin} to {destination} on {date}."),
            ("t-f2", ["search_flights"], "Are there any flights from {origin} to {destination} on {date}?"),
            ("t-f3", ["search_flights"], "I need to fly {origin} to {destination} on {date}. What's available?"),
            ("t-f4", ["search_flights"], "Search for a flight leaving {origin} for {destination} on {date}."),
            ("t-f5", ["search_flights"], "Show me flights on {date} from {origin} to {destination}."),
            ("t-e1", ["add_calendar_event"], 'Add "{title}" to my calendar on {date} at {time}.'),
            ("t-e2", ["add_calendar_event"], 'Schedule "{title}" for {date} at {time}.'),
            ("t-e3", ["add_calendar_event"], 'Create a calendar event called "{title}" on {date}, {time}.'),
            ("t-e4", ["add_calendar_event"], 'Please book "{title}" in my calendar: {date} at {time}.'),
            ("t-e5", ["add_calendar_event"], 'Put "{title}" on {date} at {time} in my calendar.'),
            ("t-e6", ["add_calendar_event"], 'At {time} on {date}, add "{title}" to my calendar.'),
            ("t-e7", ["add_calendar_event"], 'Block {time}, {date} for "{title}".'),
        ],
        "parallel": [
            ("t-p1", ["get_weather", "get_weather"], "What's the weather in {city} and in {city2}? Use {unit_word} for both."),
            ("t-p2", ["get_weather", "get_weather"], "Compare the temperature in {city} with {city2}, in {unit_word}."),
            ("t-p3", ["convert_currency", "convert_currency"], "Convert {amount} {src} to {dst} and also {amount2} {src2} to {dst2}."),
            ("t-p4", ["add_calendar_event", "add_calendar_event"], 'Add "{title}" on {date} at {time} and "{title2}" on {date2} at {time2} to my calendar.'),
            ("t-p5", ["get_weather", "convert_currency"], "Check the weather in {city} in {unit_word}, and convert {amount2} {src2} to {dst2}."),
            ("t-p6", ["search_flights", "get_weather"], "Find flights from {origin} to {destination} on {date}, and tell me the weather in {city2} in {unit_word2}."),
        ],
        "loop": [
            ("t-l1", ["search_flights", "add_calendar_event"], 'Find flights from {origin} to {destination} on {date} and add the earliest one to my calendar as "{title}".'),
            ("t-l2", ["search_flights", "add_calendar_event"], 'Search flights {origin} to {destination} for {date}, then put the earliest departure in my calendar titled "{title}".'),
            ("t-l3", ["convert_currency", "convert_currency"], "Convert {amount} {src} to {dst}, then convert the result to {dst2}."),
            ("t-l4", ["convert_currency", "convert_currency"], "Change {amount} {src} into {dst} and then turn that amount into {dst2}."),
            ("t-l5", ["convert_currency", "convert_currency"], "First convert {amount} {src} to {dst}; after that, convert the result into {dst2}."),
        ],
        "followup": ["Thanks! ", "Great. ", "OK, one more thing. "],
        "no_tool": [
            ("t-n1", "What can you help me with?", "I can check the weather, convert currencies, search for flights and add events to your calendar. What would you like to do?"),
            ("t-n2", "Thanks, that's all for now.", "You're welcome! Have a great day."),
            ("t-n3", "Hello!", "Hello! How can I help you today?"),
            ("t-n4", "What does the currency code {code} stand for?", "{code} is the ISO 4217 code for the {currency}."),
            ("t-n5", "How many minutes are in {hours} hours?", "{hours} hours is {total} minutes."),
            ("t-n6", "Can you order me a pizza?", "Sorry, I can't place orders. I can check the weather, convert currencies, search for flights and manage your calendar."),
        ],
    },
    "eval": {
        "single": [
            ("e-w1", ["get_weather"], "Could you look up the current conditions in {city}, using {unit_word}?"),
            ("e-w2", ["get_weather"], "{city}: what is it doing outside at the moment? Temperatures in {unit_word}, please."),
            ("e-c1", ["convert_currency"], "If I exchange {amount} {src} for {dst}, how much do I get?"),
            ("e-c2", ["convert_currency"], "Give me the {dst} equivalent of {amount} {src}."),
            ("e-f1", ["search_flights"], "What flights go from {origin} to {destination} on {date}?"),
            ("e-f2", ["search_flights"], "Look for a {date} flight, {origin} to {destination}."),
            ("e-e1", ["add_calendar_event"], 'Make a calendar entry "{title}" at {time} on {date}.'),
            ("e-e2", ["add_calendar_event"], 'I have "{title}" on {date} at {time}; note it down in my calendar.'),
        ],
        "parallel": [
            ("e-p1", ["get_weather", "get_weather"], "I'm choosing between {city} and {city2}. How is the weather in each, in {unit_word}?"),
            ("e-p2", ["add_calendar_event", "add_calendar_event"], 'Two calendar entries: "{title}" at {time} on {date}, and "{title2}" at {time2} on {date2}.'),
            ("e-p3", ["convert_currency", "convert_currency"], "Two conversions please: {amount} {src} into {dst}, and {amount2} {src2} into {dst2}."),
        ],
        "loop": [
            ("e-l1", ["search_flights", "add_calendar_event"], 'Which flights leave {origin} for {destination} on {date}? Put whichever departs first in my calendar, named "{title}".'),
            ("e-l2", ["convert_currency", "convert_currency"], "Take {amount} {src}, exchange it for {dst}, and exchange what you get for {dst2}."),
        ],
        "followup": ["Perfect. ", "Got it. Next: "],
        "no_tool": [],
    },
}

# Disjoint pools of argument values (train vs eval). Plain lists: no hash order anywhere.
POOLS = {
    "train": {
        "cities": ["Lisbon", "Madrid", "Lyon", "Hamburg", "Vienna", "Prague", "Dublin", "Oslo", "Helsinki",
                   "Riga", "Toronto", "Denver", "Chicago", "Seattle", "Osaka", "Melbourne", "Nairobi", "Lima",
                   "Buenos Aires", "Cape Town", "Milan", "Athens", "Hanoi", "Mumbai", "Cairo", "Boston",
                   "Sydney", "Zurich", "Warsaw", "Budapest", "Stockholm", "Edinburgh", "Vancouver", "Miami",
                   "Bangkok", "Seoul", "Istanbul", "Marrakesh", "Santiago", "Mexico City", "Nantes",
                   "Valencia", "Turin", "Bergen", "Tallinn", "Leeds", "Halifax", "Austin",
                   "Phoenix", "Kyoto", "Auckland", "Brisbane", "Quito", "Accra", "Tunis", "Kraków",
                   "Reykjavik", "São Paulo", "Da Nang"],
        "amounts": [5, 12, 20, 25, 40, 45, 60, 75, 80, 100, 120, 150, 199.99, 250, 300, 320, 500, 640,
                    750, 1000, 1200, 2500, 9.5, 18.75, 35, 64.2, 90, 410, 875, 1500],
        "titles": ["Dentist appointment", "Team standup", "Lunch with Sam", "Yoga class", "Project review",
                   "Call Mum", "Piano lesson", "Book club", "Gym session", "Budget meeting", "Vet visit",
                   "Dinner with Alex", "Sprint planning", "Language exchange", "Doctor checkup",
                   "Trip to Grandma", "Conference talk", "Family brunch", "Job interview", "Climbing night"],
        "day_mod": (0, 1, 2), "time_mod": (0, 1, 2), "pair_mod": (0, 1, 2),
    },
    "eval": {
        "cities": ["Bordeaux", "Seville", "Bologna", "Gdansk", "Antwerp", "Gothenburg", "Tampere", "Vilnius",
                   "Calgary", "Portland", "Nashville", "Sapporo", "Perth", "Wellington", "Montevideo", "Porto"],
        "amounts": [7, 33, 55, 140, 275, 480, 960, 1350, 14.5, 42.8, 88, 3200],
        "titles": ["Haircut", "Parent evening", "Car service", "Coffee with Priya", "Board game night",
                   "Quarterly sync", "Eye exam", "Choir rehearsal", "Flight home", "Weekend getaway"],
        "day_mod": (3,), "time_mod": (3,), "pair_mod": (3,),
    },
}
# fmt: on

CURRENCIES = {  # code -> (name, units per US dollar: made-up fixed rates)
    "USD": ("US dollar", 1.0),
    "EUR": ("euro", 0.92),
    "GBP": ("pound sterling", 0.79),
    "JPY": ("Japanese yen", 151.3),
    "CHF": ("Swiss franc", 0.88),
    "CAD": ("Canadian dollar", 1.36),
    "AUD": ("Australian dollar", 1.52),
    "SEK": ("Swedish krona", 10.6),
    "INR": ("Indian rupee", 83.2),
    "MXN": ("Mexican peso", 17.1),
}
CODES = list(CURRENCIES)
PAIRS = [(a, b) for a in CODES for b in CODES if a != b]  # split by index mod 4 (pair_mod)
DAYS = [datetime.date(2025, 1, 1) + datetime.timedelta(days=k) for k in range(365)]  # mod 4
TIMES = [f"{h:02d}:{m:02d}" for h in range(7, 22) for m in range(0, 60, 5)]  # mod 4
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "clear", "snowy"]
AIRLINES = ["SF", "NA", "BX", "QL"]

MIX = {  # kind -> share of the split, in this order (the rest: single)
    "train": [("parallel", 0.15), ("loop", 0.22), ("followup", 0.1), ("no_tool", 0.06)],
    "eval": [("parallel", 0.2), ("loop", 0.2), ("followup", 0.1)],
}
SALT = {"train": 0, "eval": 1}


# ---- one call: arguments from the pools, the prompt's slots, the tool's result -------------


def _split_pool(items: list, mods: tuple[int, ...]) -> list:
    return [x for k, x in enumerate(items) if k % 4 in mods]


def _draw(tool: str, rng: random.Random, pools: dict, avoid: dict | None = None) -> dict:
    """A call of `tool`: {"name", "arguments", "slots"}; values differ from `avoid`'s."""
    avoid = avoid or {}
    for _ in range(100):
        if tool == "get_weather":
            city, unit = rng.choice(pools["cities"]), rng.choice(["celsius", "fahrenheit"])
            args, slots = {"city": city, "unit": unit}, {"city": city, "unit_word": unit.title()}
        elif tool == "convert_currency":
            amount, (src, dst) = rng.choice(pools["amounts"]), rng.choice(pools["pairs"])
            args = {"amount": amount, "from_currency": src, "to_currency": dst}
            slots = {"amount": amount, "src": src, "dst": dst}
        elif tool == "search_flights":
            origin, destination = rng.sample(pools["cities"], 2)
            args = {
                "origin": origin,
                "destination": destination,
                "date": rng.choice(pools["dates"]),
            }
            slots = dict(args)
        else:
            args = {"title": rng.choice(pools["titles"]), "date": rng.choice(pools["dates"])}
            args["time"] = rng.choice(pools["times"])
            slots = dict(args)
        if not any(v == avoid.get(k) for k, v in args.items() if k != "unit"):
            return {"name": tool, "arguments": args, "slots": slots}
    raise RuntimeError(f"could not draw a distinct {tool} call")  # pragma: no cover


def _result(call: dict, rng: random.Random, pools: dict) -> dict:
    a = call["arguments"]
    if call["name"] == "get_weather":
        celsius = rng.randint(-4, 33)
        temp = celsius if a["unit"] == "celsius" else round(celsius * 9 / 5 + 32)
        return {"temperature": temp, "condition": rng.choice(CONDITIONS)}
    if call["name"] == "convert_currency":
        rate = CURRENCIES[a["to_currency"]][1] / CURRENCIES[a["from_currency"]][1]
        result = round(a["amount"] * rate, 2)
        return {"result": int(result) if result == int(result) else result}  # 795, not 795.0
    if call["name"] == "search_flights":
        departures = sorted(rng.sample(pools["times"], 2))
        flights = [
            {
                "flight": f"{rng.choice(AIRLINES)}{rng.randint(100, 999)}",
                "departs": t,
                "price": rng.randint(60, 900),
            }
            for t in departures
        ]
        return {"flights": flights}
    return {"status": "created"}


def _answer(call: dict, result: dict) -> str:
    """A sentence restating the tool's result."""
    a = call["arguments"]
    if call["name"] == "get_weather":
        deg = "°C" if a["unit"] == "celsius" else "°F"
        return f"It's {result['temperature']}{deg} and {result['condition']} in {a['city']}."
    if call["name"] == "convert_currency":
        return f"{a['amount']} {a['from_currency']} is {result['result']} {a['to_currency']}."
    if call["name"] == "search_flights":
        (f1, f2) = result["flights"]
        return (
            f"Two flights to {a['destination']} on {a['date']}: {f1['flight']} at "
            f"{f1['departs']} (${f1['price']}) and {f2['flight']} at {f2['departs']} (${f2['price']})."
        )
    return f'Added "{a["title"]}" to your calendar on {a["date"]} at {a["time"]}.'


# ---- messages ------------------------------------------------------------------------------


def _json(value: dict) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call_turn(calls: list[dict], first_id: int) -> dict:
    tool_calls = [
        {
            "id": f"call_{first_id + k}",
            "type": "function",
            "function": {"name": c["name"], "arguments": _json(c["arguments"])},
        }
        for k, c in enumerate(calls)
    ]
    return {"role": "assistant", "content": None, "tool_calls": tool_calls}


def _result_turns(results: list[dict], first_id: int) -> list[dict]:
    return [
        {"role": "tool", "tool_call_id": f"call_{first_id + k}", "content": _json(r)}
        for k, r in enumerate(results)
    ]


def _slots(calls: list[dict]) -> dict:
    slots = dict(calls[0]["slots"])
    for call in calls[1:]:
        slots |= {f"{k}2": v for k, v in call["slots"].items()}
    return slots


def _exchange(calls, rng, pools, first_id, final: bool) -> tuple[list[dict], list]:
    """The call turn, its results and (when `final`) the answer restating them."""
    results = [_result(c, rng, pools) for c in calls]
    turns = [_call_turn(calls, first_id), *_result_turns(results, first_id)]
    if final:
        answer = " ".join(_answer(c, r) for c, r in zip(calls, results, strict=True))
        turns.append({"role": "assistant", "content": answer})
    return turns, results


def _conversation(kind: str, template, rng, pools, split: str) -> tuple[list[dict], list[dict]]:
    """(messages after the system prompt, calls made) of one conversation of `kind`."""
    final = split == "train"
    if kind == "no_tool":
        _, user, answer = template
        code = rng.choice(CODES)
        hours = rng.randint(2, 9)
        values = {"code": code, "currency": CURRENCIES[code][0], "hours": hours}
        values["total"] = hours * 60
        msgs = [{"role": "user", "content": user.format(**values)}]
        return msgs + [{"role": "assistant", "content": answer.format(**values)}], []
    _, tools, text = template
    if kind in ("single", "followup"):
        calls = [_draw(tools[0], rng, pools)]
    elif kind == "parallel":
        first = _draw(tools[0], rng, pools)
        second = _draw(tools[1], rng, pools, avoid=first["arguments"])
        if tools == ["get_weather", "get_weather"]:  # one unit named for both
            second["arguments"]["unit"] = first["arguments"]["unit"]
        calls = [first, second]
    else:  # loop: the second call depends on the first call's result
        calls = [_draw(tools[0], rng, pools)]
    first_args, extra = calls[0]["arguments"], {}
    if kind == "loop" and tools[1] == "convert_currency":  # the result into a third currency
        src, dst = first_args["from_currency"], first_args["to_currency"]
        extra["dst2"] = rng.choice([b for a, b in pools["pairs"] if a == dst and b != src])
    elif kind == "loop":  # the earliest flight into the calendar under a title
        extra["title"] = f"Flight to {first_args['destination']}"
    msgs = [{"role": "user", "content": text.format(**_slots(calls), **extra)}]
    if kind == "loop":
        turns, (result,) = _exchange(calls, rng, pools, 1, final=False)
        msgs += turns
        if tools[1] == "convert_currency":
            amount, dst = result["result"], first_args["to_currency"]
            args = {"amount": amount, "from_currency": dst, "to_currency": extra["dst2"]}
        else:  # the flights come sorted by departure: the first is the earliest
            departs = result["flights"][0]["departs"]
            args = {"title": extra["title"], "date": first_args["date"], "time": departs}
        calls.append({"name": tools[1], "arguments": args, "slots": {}})
        calls_now = calls[1:]
    elif kind == "followup":
        turns, _ = _exchange(calls, rng, pools, 1, final=True)
        msgs += turns
        singles = [t for t in TEMPLATES[split]["single"] if t[1][0] != tools[0]]
        _, (tool2,), text2 = rng.choice(singles)
        second = _draw(tool2, rng, pools)
        prefix = rng.choice(TEMPLATES[split]["followup"])
        msgs.append({"role": "user", "content": prefix + text2.format(**second["slots"])})
        calls.append(second)
        calls_now = [second]
    else:
        calls_now = calls
    first_id = len(calls) - len(calls_now) + 1
    if final:
        msgs += _exchange(calls_now, rng, pools, first_id, final=True)[0]
    else:
        msgs.append(_call_turn(calls_now, first_id))
    return msgs, calls


def _plan(n: int, split: str, rng: random.Random) -> list[tuple[str, tuple]]:
    """(kind, template) for each of `n` conversations: kinds by MIX, templates of a kind in
    balanced rotation, the whole order shuffled."""
    counts = [(kind, round(share * n)) for kind, share in MIX[split]]
    counts.insert(0, ("single", n - sum(c for _, c in counts)))
    plan = []
    for kind, count in counts:
        templates = TEMPLATES[split][kind if kind != "followup" else "single"]
        for k in range(count):
            plan.append((kind, templates[k % len(templates)]))
    rng.shuffle(plan)
    return plan


def pools_of(split: str) -> dict:
    spec = POOLS[split]
    return {
        **spec,
        "pairs": _split_pool(PAIRS, spec["pair_mod"]),
        "dates": [d.isoformat() for d in _split_pool(DAYS, spec["day_mod"])],
        "times": _split_pool(TIMES, spec["time_mod"]),
    }


def make_examples(n: int, split: str, seed: int = DEFAULT_SEED) -> list[dict]:
    """`n` conversations of `split` ("train" or "eval"), deterministic in (n, split, seed):
    {"tools", "messages", "meta"}; `meta` (kind, template id, every call made) is for tests
    and the held-out check, never written. First user messages are unique within a split,
    but for the few conversations that need no tool ("Hello!")."""
    if split not in TEMPLATES:
        raise ValueError(f"split must be one of {list(TEMPLATES)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed * 10 + SALT[split])
    pools = pools_of(split)
    examples, seen = [], set()  # `seen`: membership only, never iterated
    for kind, template in _plan(n, split, rng):
        for _ in range(200):
            msgs, calls = _conversation(kind, template, rng, pools, split)
            if msgs[0]["content"] not in seen or kind == "no_tool":
                break
        else:  # pragma: no cover - the pools are far larger than any sensible n
            raise RuntimeError(f"could not make {n} distinct {split} conversations")
        seen.add(msgs[0]["content"])
        if rng.random() < 1 / 3:
            msgs.insert(0, {"role": "system", "content": SYSTEM})
        made = [{"name": c["name"], "arguments": c["arguments"]} for c in calls]
        meta = {"kind": kind, "template": template[0], "calls": made}
        examples.append({"tools": TOOLS, "messages": msgs, "meta": meta})
    return examples


# ---- held-out check ------------------------------------------------------------------------

VALUE_KINDS = {  # argument -> the kind of value it holds (compared across tools)
    "city": "place", "origin": "place", "destination": "place", "amount": "amount",
    "title": "title", "date": "date", "time": "time",
}  # fmt: skip


def _values(examples: list[dict]) -> set[tuple[str, object]]:
    out = set()
    for ex in examples:
        for call in ex["meta"]["calls"]:
            args = call["arguments"]
            out |= {(VALUE_KINDS[k], v) for k, v in args.items() if k in VALUE_KINDS}
            if "from_currency" in args:
                out.add(("pair", (args["from_currency"], args["to_currency"])))
    return out


def _phrases(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.sub(r"\{\w+\}", " SLOT ", text).lower()
    words = re.findall(r"[a-z']+", words)
    runs = (tuple(words[k : k + n]) for k in range(len(words) - n + 1))
    return {run for run in runs if run.count("slot") < 2}  # "from {a} to {b}" is no phrasing


def templates_of(split: str) -> list[str]:
    spec = TEMPLATES[split]
    texts = [t[2] for kind in ("single", "parallel", "loop") for t in spec[kind]]
    return texts + [t[1] for t in spec["no_tool"]] + spec["followup"]


def check_held_out(train: list[dict], held_out: list[dict]) -> None:
    """Held-out phrasings and argument values never occur in training: no template shared,
    no run of four words (at most one of them a slot) shared between a held-out and a training
    template, no argument value
    (or currency pair) shared, and no held-out place, title, date or time anywhere in
    the training text. Raises AssertionError naming what leaked."""
    train_phrases = set().union(*map(_phrases, templates_of("train")))
    for text in templates_of("eval"):
        shared = _phrases(text) & train_phrases
        assert not shared, f"held-out template {text!r} shares {sorted(shared)} with training"
    shared_values = _values(train) & _values(held_out)
    assert not shared_values, f"held-out values also in training: {sorted(shared_values)}"
    train_text = json.dumps([ex["messages"] for ex in train], ensure_ascii=False)
    for kind, value in sorted(_values(held_out), key=str):
        if kind in ("place", "title", "date", "time"):
            found = re.search(rf"(?<![\w:-]){re.escape(value)}(?![\w:-])", train_text)
            assert not found, f"held-out {kind} {value!r} occurs in training"
    for ex in held_out:
        last = ex["messages"][-1]
        assert last["role"] == "assistant" and last.get("tool_calls"), "held-out ends in calls"


def render_jsonl(examples: list[dict]) -> str:
    lines = [{"tools": ex["tools"], "messages": ex["messages"]} for ex in examples]
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in lines)


def build_files(
    n_train: int = DEFAULT_TRAIN, n_eval: int = DEFAULT_EVAL, seed: int = DEFAULT_SEED
) -> dict[str, str]:
    """File name -> exact file text (UTF-8, '\\n' line ends), after `check_held_out`."""
    train = make_examples(n_train, "train", seed)
    held_out = make_examples(n_eval, "eval", seed)
    check_held_out(train, held_out)
    return {TRAIN_FILE: render_jsonl(train), EVAL_FILE: render_jsonl(held_out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where to write {TRAIN_FILE} and {EVAL_FILE} (default: %(default)s)",
    )
    p.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="default: %(default)s")
    p.add_argument("--eval", type=int, default=DEFAULT_EVAL, help="default: %(default)s")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="default: %(default)s")
    args = p.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        p.error("--train and --eval must be >= 0")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for fname, text in build_files(args.train, args.eval, args.seed).items():
        path = args.out_dir / fname
        path.write_bytes(text.encode("utf-8"))
        print(f"wrote {path} ({text.count(chr(10))} conversations, {len(text.encode())} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

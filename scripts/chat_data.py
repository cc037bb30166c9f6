"""A chat SFT data set with short, checkable answers, built reproducibly from the shared data sets:
OUT_DIR/train.jsonl and OUT_DIR/dev.jsonl, one {"messages": [...]} conversation per line.

    python scripts/chat_data.py OUT_DIR [--seed 0 --train 2400 --dev 200]

Five kinds of question, in about equal shares, each answer short enough that exact match and chrF mean
something (`lmforge evaluate` scores the last answer of each conversation):
  date       a date written one of many ways -> ISO 8601 (random dates, `datetime`); a follow-up may ask
             its day of the week;
  sentiment  an SST-2 sentence -> "positive" / "negative" (../shared/data/sst2: train.txt, dev dev.txt);
  translate  a short Multi30k caption, English -> German (multi30k/train.*, dev val.*);
  names      the person and place names of a CoNLL-2003 sentence, comma-separated, or "none"
             (conll2003/train.txt, dev dev.txt); a follow-up may ask which of them are places;
  arithmetic a small word problem -> a whole number; a follow-up may continue it.

Conversations mix lengths: about half have one user turn, the rest two or three (a follow-up on the same
item, or a new question of another kind), and about a third start with a system prompt. The roles are
system, user and assistant, and every conversation ends with an assistant turn.

Reproducible: the same --seed, --train and --dev give byte-identical files. Nothing leaks from train to
dev: dev sentences come from the dev splits, and dev dates and word problems are those whose hash falls
in a dev bucket (train never draws them), sampled with another seed.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# the files each split reads, under DATA
FILES = {
    "train": {"sst2": "sst2/train.txt", "en": "multi30k/train.en", "de": "multi30k/train.de",
              "conll": "conll2003/train.txt"},
    "dev": {"sst2": "sst2/dev.txt", "en": "multi30k/val.en", "de": "multi30k/val.de", "conll": "conll2003/dev.txt"},
}
DEV_SEED_OFFSET = 1_000_003  # the dev split samples with seed + this
DEV_BUCKETS = 10  # one generated item (date, word problem) in DEV_BUCKETS belongs to dev, by its hash

KINDS = ("date", "sentiment", "translate", "names", "arithmetic")
TURNS = ((1, 0.5), (2, 0.3), (3, 0.2))  # user turns per conversation, and their shares
SYSTEM_SHARE = 0.35
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer briefly.",
    "Answer with the result only, no explanation.",
    "You are a precise assistant for dates, numbers, sentiment, translation and names.",
    "Be concise.",
)

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST_DAY, LAST_DAY = datetime.date(1900, 1, 1).toordinal(), datetime.date(2099, 12, 31).toordinal()

MAX_CAPTION_WORDS = 10  # translation: English captions of at most this many words
CONLL_WORDS = (5, 30)  # names: sentences of this many words (inclusive)

NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kim", "Leo", "Maya",
         "Nora", "Omar", "Paula", "Ravi", "Sara", "Tom", "Yuki")
ITEMS = ("apples", "stickers", "marbles", "pencils", "cookies", "stamps", "books", "coins", "cards", "shells")


# -- the question kinds -----------------------------------------------------------------------------


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def date_text(d: datetime.date, style: int) -> tuple[str, str]:
    """(the date written in style `style`, a hint naming the order of a numeric style, or "")."""
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return [
        (f"{month} {d.day}, {d.year}", ""),
        (f"{month} {ordinal(d.day)}, {d.year}", ""),
        (f"{d.day} {month} {d.year}", ""),
        (f"the {ordinal(d.day)} of {month}, {d.year}", ""),
        (f"{short} {d.day}, {d.year}", ""),
        (f"{d.day} {short} {d.year}", ""),
        (f"{d.month:02d}/{d.day:02d}/{d.year}", " (month/day/year)"),
        (f"{d.day:02d}.{d.month:02d}.{d.year}", " (day.month.year)"),
        (f"{d.year}/{d.month:02d}/{d.day:02d}", " (year/month/day)"),
        (f"{d.day}/{d.month}/{d.year}", " (day/month/year)"),
    ][style]


DATE_STYLES = 10
DATE_ASKS = ('Write the date "{date}"{hint} in ISO 8601 format (YYYY-MM-DD).',
             'Convert "{date}"{hint} to an ISO 8601 date.',
             'What is "{date}"{hint} as an ISO date (YYYY-MM-DD)?')
WEEKDAY_ASK = "What day of the week was that?"


def bucket(key: str) -> int:
    """A stable bucket of a generated item (the same on every machine and Python), for the train/dev split."""
    return hashlib.sha256(key.encode()).digest()[0] % DEV_BUCKETS


def in_split(key: str, split: str) -> bool:
    return (bucket(key) == 0) == (split == "dev")


@dataclass
class Sources:
    """The real sentences a split draws from, each handed out once (until a pool runs out, then again in a
    new order)."""

    rng: random.Random
    sst2: list[tuple[str, str]]  # (sentence, positive/negative)
    captions: list[tuple[str, str]]  # (English, German)
    conll: list[tuple[list[str], list[str]]]  # (words, NER tags)
    _pools: dict = field(default_factory=dict)

    def draw(self, name: str):
        pool = self._pools.get(name)
        if not pool:
            pool = list(range(len(getattr(self, name))))
            self.rng.shuffle(pool)
            self._pools[name] = pool
        return getattr(self, name)[pool.pop()]


def read_sst2(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, sentence = line.partition(" ")
        if sentence.strip() and label in ("0", "1"):
            out.append((sentence.strip(), "positive" if label == "1" else "negative"))
    return out


def read_captions(en: Path, de: Path) -> list[tuple[str, str]]:
    pairs = zip(en.read_text(encoding="utf-8").splitlines(), de.read_text(encoding="utf-8").splitlines(), strict=True)
    return [(e.strip(), g.strip()) for e, g in pairs if e.strip() and g.strip() and len(e.split()) <= MAX_CAPTION_WORDS]


def read_conll(path: Path) -> list[tuple[list[str], list[str]]]:
    sentences, words, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            parts = line.split()
            words.append(parts[0])
            tags.append(parts[-1])
        elif words:
            if CONLL_WORDS[0] <= len(words) <= CONLL_WORDS[1]:
                sentences.append((words, tags))
            words, tags = [], []
    return sentences


def entities(words: list[str], tags: list[str], kinds: tuple[str, ...]) -> list[str]:
    """The names of the given kinds (PER, LOC) in order of appearance, each once (BIO tags; an I- without a
    B- before it starts a name too)."""
    names, current = [], None
    for word, tag in zip(words, tags):
        prefix, _, kind = tag.partition("-")
        if prefix == "I" and current is not None and current[0] == kind:
            current[1].append(word)
            continue
        if current is not None:
            names.append(current)
            current = None
        if prefix in ("B", "I") and kind in kinds:
            current = (kind, [word])
    if current is not None:
        names.append(current)
    out = []
    for _, ws in names:
        name = " ".join(ws)
        if name not in out:
            out.append(name)
    return out


def name_list(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def load_sources(split: str, rng: random.Random, data: Path) -> Sources:
    files = {k: data / v for k, v in FILES[split].items()}
    return Sources(rng, read_sst2(files["sst2"]), read_captions(files["en"], files["de"]), read_conll(files["conll"]))


# Each kind: first(rng, src, split) -> (question, answer, state) and follow(rng, state, src) -> (question,
# answer, the next state), or None where the kind has no follow-up for that state; DONE: the follow-up was
# asked already (a weekday, the places).
DONE = "done"


def first_date(rng, src, split):
    while True:
        d = datetime.date.fromordinal(rng.randint(FIRST_DAY, LAST_DAY))
        if in_split(d.isoformat(), split):
            break
    text, hint = date_text(d, rng.randrange(DATE_STYLES))
    return rng.choice(DATE_ASKS).format(date=text, hint=hint), d.isoformat(), d


def follow_date(rng, d, src):
    return WEEKDAY_ASK, WEEKDAYS[d.weekday()], DONE


SENTIMENT_ASKS = ("Is the sentiment of this movie review sentence positive or negative? Answer with one word.\n\n{s}",
                  "Classify the sentiment (positive or negative): {s}",
                  "Positive or negative? \"{s}\"")


def asked_from(source: str, asks: tuple[str, ...], again: str):
    """(first, follow) turn makers for a task whose question is a drawn sentence and whose answer is its label:
    the first turn in one of `asks`, a follow-up as `again`."""
    def first(rng, src, split):
        question, answer = src.draw(source)
        return rng.choice(asks).format(s=question), answer, None

    def follow(rng, state, src):
        question, answer = src.draw(source)
        return again.format(s=question), answer, state

    return first, follow


SENTIMENT_AGAIN = "And this one? {s}"
first_sentiment, follow_sentiment = asked_from("sst2", SENTIMENT_ASKS, SENTIMENT_AGAIN)

TRANSLATE_ASKS = ("Translate into German: {s}", "Translate this English sentence to German.\n\n{s}",
                  "How do you say this in German? \"{s}\"")
TRANSLATE_AGAIN = "Now this one: {s}"
first_translate, follow_translate = asked_from("captions", TRANSLATE_ASKS, TRANSLATE_AGAIN)


NAMES_ASKS = ("List the names of people and places in this sentence, separated by commas, or say none.\n\n{s}",
              "Which person or location names occur in this sentence? Give a comma-separated list, or none: {s}")
PLACES_ASK = "Which of those are places?"


def first_names(rng, src, split):
    words, tags = src.draw("conll")
    return rng.choice(NAMES_ASKS).format(s=" ".join(words)), name_list(entities(words, tags, ("PER", "LOC"))), \
        (words, tags)


def follow_names(rng, state, src):
    words, tags = state
    if not entities(words, tags, ("PER", "LOC")):
        return None
    return PLACES_ASK, name_list(entities(words, tags, ("LOC",))), DONE


# (text with {n} name, {i} item, {a} {b} {c} numbers; how the numbers are drawn; the answer)
PROBLEMS = (
    ("{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?",
     lambda r: (r.randint(2, 60), r.randint(2, 40), 0), lambda a, b, c: a + b),
    ("{n} had {a} {i} and gave away {b}. How many {i} are left?",
     lambda r: (lambda a: (a, r.randint(1, a - 1), 0))(r.randint(10, 90)), lambda a, b, c: a - b),
    ("There are {a} boxes with {b} {i} in each box. How many {i} are there in total?",
     lambda r: (r.randint(2, 12), r.randint(2, 12), 0), lambda a, b, c: a * b),
    ("{a} {i} are shared equally among {b} friends. How many {i} does each friend get?",
     lambda r: (lambda b, q: (b * q, b, 0))(r.randint(2, 9), r.randint(2, 12)), lambda a, b, c: a // b),
    ("{n} buys {a} packs of {b} {i} and uses {c} of them. How many {i} are left?",
     lambda r: (lambda a, b: (a, b, r.randint(1, a * b - 1)))(r.randint(2, 6), r.randint(3, 10)),
     lambda a, b, c: a * b - c),
)


def first_arithmetic(rng, src, split):
    while True:
        k = rng.randrange(len(PROBLEMS))
        text, draw, solve = PROBLEMS[k]
        a, b, c = draw(rng)
        if in_split(f"{k}:{a}:{b}:{c}", split):
            break
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    answer = solve(a, b, c)
    return text.format(n=name, i=item, a=a, b=b, c=c), str(answer), (name, item, answer)


def follow_arithmetic(rng, state, src):
    name, item, value = state
    if value > 1 and rng.random() < 0.5:
        c = rng.randint(1, value - 1)
        return f"Then {name} gives away {c} {item}. How many are left now?", str(value - c), (name, item, value - c)
    c = rng.randint(1, 20)
    return f"Then {name} gets {c} more {item}. How many are there now?", str(value + c), (name, item, value + c)


FIRST = {"date": first_date, "sentiment": first_sentiment, "translate": first_translate, "names": first_names,
         "arithmetic": first_arithmetic}
FOLLOW = {"date": follow_date, "sentiment": follow_sentiment, "translate": follow_translate, "names": follow_names,
          "arithmetic": follow_arithmetic}


# -- conversations ----------------------------------------------------------------------------------


def conversation(rng: random.Random, src: Sources, split: str, kinds: list[str] | None = None) -> list[dict]:
    """One conversation; `kinds`, when given, gets the kind (KINDS) of each user turn appended (it changes
    nothing drawn)."""
    turns = rng.choices([t for t, _ in TURNS], [w for _, w in TURNS])[0]
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < SYSTEM_SHARE else []
    kind = rng.choice(KINDS)
    question, answer, state = FIRST[kind](rng, src, split)
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    kinds = [] if kinds is None else kinds
    kinds.append(kind)
    for _ in range(turns - 1):
        more = FOLLOW[kind](rng, state, src) if rng.random() < 0.6 and state is not DONE else None
        if more is None:  # a new question, of another kind
            kind = rng.choice([k for k in KINDS if k != kind])
            question, answer, state = FIRST[kind](rng, src, split)
        else:
            question, answer, state = more
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        kinds.append(kind)
    return messages


def build(seed: int, n_train: int, n_dev: int, data: Path = DATA,
          kinds: dict[str, list[list[str]]] | None = None) -> dict[str, list[list[dict]]]:
    """{"train": conversations, "dev": conversations}; the same arguments give the same conversations.
    `kinds`, when given, gets for each split the kinds of each conversation's user turns (as conversation())."""
    out = {}
    for split, n, s in (("train", n_train, seed), ("dev", n_dev, seed + DEV_SEED_OFFSET)):
        rng = random.Random(s)
        src = load_sources(split, random.Random(f"{s}-sources"), data)
        traced = [[] for _ in range(n)]
        out[split] = [conversation(rng, src, split, t) for t in traced]
        if kinds is not None:
            kinds[split] = traced
    return out


def jsonl(conversations: list[list[dict]]) -> str:
    return "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in conversations)


def missing(data: Path = DATA) -> list[Path]:
    return [data / f for split in FILES.values() for f in split.values() if not (data / f).is_file()]


def write(out_dir: Path, seed: int, n_train: int, n_dev: int, data: Path = DATA) -> dict[str, Path]:
    return write_splits(out_dir, {split: [{"messages": m} for m in conversations]
                                  for split, conversations in build(seed, n_train, n_dev, data).items()})


def write_splits(out_dir: Path, sets: dict[str, list[dict]]) -> dict[str, Path]:
    """OUT_DIR/SPLIT.jsonl for each split's lines (JSON objects, non-ASCII kept): the paths by split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, lines in sets.items():
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_bytes("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, help="where train.jsonl and dev.jsonl are written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2400, help="training conversations")
    ap.add_argument("--dev", type=int, default=200, help="dev conversations")
    args = ap.parse_args()
    gone = missing()
    if gone:
        print(f"chat_data: {gone[0]} is missing ({len(gone)} of the shared data files the set is built from; "
              f"expected {DATA} beside the repository)", file=sys.stderr)
        sys.exit(1)
    paths = write(args.out_dir, args.seed, args.train, args.dev)
    print(f"chat_data: {args.train} conversations in {paths['train']}, {args.dev} in {paths['dev']} (seed {args.seed})")


if __name__ == "__main__":
    main()

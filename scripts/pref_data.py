"""A preference data set for DPO and reward-model training, built reproducibly from the chat SFT data of
scripts/chat_data.py: OUT_DIR/train.jsonl and OUT_DIR/dev.jsonl, one pair per line,

    {"messages": [... ending with a user turn], "chosen": "...", "rejected": "...", "corruption": "...", "task": "..."}

    python scripts/pref_data.py OUT_DIR [--seed 0 --train 1200 --dev 200]

Each line is one chat_data conversation (the same seed's, in the same order) cut before its last answer:
"chosen" is that answer, the correct one chat_data made, and "rejected" a wrong one of a kind a seeded RNG
picks among those that apply to the question ("corruption"):
  wrong_value   date: the ISO date shifted by 1-12 days or 1-12 months, or day and month swapped (still a
                valid ISO date); weekday: another day; sentiment: the other label; arithmetic: the result
                off by 1-3; names: a capitalised word of the sentence that is no person or place added or
                put in place of a name, a name left out, or "none"; places: the persons listed too, etc.;
  truncated     the answer cut short at a word (a date at a "-", a number by a digit): a strict, non-empty
                prefix of it;
  other_answer  the correct answer of another line of the same split and task (for translate: the German
                of another pair);
  echo_source   translate only: the English sentence echoed back.
"task" names the question: date (to ISO), weekday, sentiment, translate, names, places (the follow-up),
arithmetic. Readers of `task: dpo` / `task: reward` ignore both extra fields.

Sizes: 1,200 training and 200 dev pairs by default. A DPO step scores chosen and rejected under the policy
and the frozen reference, about four times an SFT step's work, so half the 2,400 SFT conversations is
already more than a CPU LoRA run on SmolLM2-135M gets through; 200 dev pairs measure reward accuracy to
about +-0.035 (one standard error at 0.5), plenty to tell a trained model from chance.

Reproducible: the same --seed, --train and --dev give byte-identical files (chat_data's conversations, then
one RNG per split drawing over lists in a fixed order). Nothing leaks: train lines are chat_data's train
conversations and dev lines its dev ones for the same seed (so with equal seeds and --dev the dev prompts
are exactly the chat dev set's, never seen in SFT either), and other_answer draws within its own split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_data  # noqa: E402  (a script beside this one, not a package)

DATA = chat_data.DATA
CORRUPTIONS = ("wrong_value", "truncated", "other_answer", "echo_source")
# the corruptions each task's answers can take, tried in this order (those that apply are equally likely)
OPTIONS = {
    "date": ("wrong_value", "truncated", "other_answer"),
    "weekday": ("wrong_value",),
    "sentiment": ("wrong_value",),
    "translate": ("other_answer", "echo_source", "truncated"),
    "names": ("wrong_value", "truncated", "other_answer"),
    "places": ("wrong_value", "truncated", "other_answer"),
    "arithmetic": ("wrong_value", "truncated", "other_answer"),
}
TASKS = tuple(OPTIONS)
SHIFTS = tuple(d for n in range(1, 13) for d in (n, -n))  # days or months a wrong date is off by


def task_of(kind: str, question: str) -> str:
    """The task of a user turn: its chat_data kind, with the two follow-ups that change the answer's type split
    out (a weekday after a date, the places after the names)."""
    if kind == "date" and question == chat_data.WEEKDAY_ASK:
        return "weekday"
    if kind == "names" and question == chat_data.PLACES_ASK:
        return "places"
    return kind


def subject(question: str, templates: tuple[str, ...]) -> str:
    """The {s} a question was made from with one of `templates`."""
    for template in templates:
        before, _, after = template.partition("{s}")
        if question.startswith(before) and question.endswith(after) and len(question) > len(before) + len(after):
            return question[len(before):len(question) - len(after)]
    raise ValueError(f"no template made {question!r}")


def names_of(answer: str) -> list[str]:
    return [] if answer == "none" else answer.split(", ")


# -- the wrong answers: each maker gives every candidate in a fixed order ---------------------------------


def shift_months(d: datetime.date, months: int) -> datetime.date:
    m = d.month - 1 + months
    year, month = d.year + m // 12, m % 12 + 1
    last = (datetime.date(year + month // 12, month % 12 + 1, 1) - datetime.timedelta(days=1)).day
    return datetime.date(year, month, min(d.day, last))


def wrong_dates(chosen: str) -> list[str]:
    d = datetime.date.fromisoformat(chosen)
    out = [(d + datetime.timedelta(days=n)).isoformat() for n in SHIFTS]
    out += [shift_months(d, n).isoformat() for n in SHIFTS]
    if d.day <= 12:
        out.append(d.replace(month=d.day, day=d.month).isoformat())
    return out


def wrong_names(chosen: str, sentence: str) -> list[str]:
    """Lists that are not the sentence's person and place names: another capitalised word of it added or put in
    place of a name, a name left out, or none."""
    names = names_of(chosen)
    taken = {w for name in names for w in name.split()}
    others = []
    for w in sentence.split():
        if w[:1].isupper() and w.isalpha() and w not in taken and w not in others:
            others.append(w)
    if not others and not names:
        others = [n for n in chat_data.NAMES if n not in sentence.split()][:3]
    out = [chat_data.name_list(names + [w]) for w in others]
    out += [chat_data.name_list(names[:i] + [w] + names[i + 1:]) for i in range(len(names)) for w in others]
    if len(names) > 1:
        out += [chat_data.name_list(names[:i] + names[i + 1:]) for i in range(len(names))]
    return out + ["none"]


def wrong_places(chosen: str, listed: str) -> list[str]:
    """Not the places among the names `listed` before: all of them, the persons only, the places and a person,
    one place fewer, or none."""
    places, names = names_of(chosen), names_of(listed)
    persons = [n for n in names if n not in places]
    out = [listed, chat_data.name_list(persons)] + [chat_data.name_list(places + [p]) for p in persons]
    if len(places) > 1:
        out += [chat_data.name_list(places[:i] + places[i + 1:]) for i in range(len(places))]
    return out + ["none"]


def wrong_values(task: str, chosen: str, prompt: list[dict]) -> list[str]:
    question = prompt[-1]["content"]
    if task == "date":
        return wrong_dates(chosen)
    if task == "weekday":
        return list(chat_data.WEEKDAYS)
    if task == "sentiment":
        return ["negative" if chosen == "positive" else "positive"]
    if task == "arithmetic":
        return [str(int(chosen) + n) for n in (1, -1, 2, -2, 3, -3) if int(chosen) + n >= 0]
    if task == "names":
        return wrong_names(chosen, subject(question, chat_data.NAMES_ASKS))
    if task == "places":
        return wrong_places(chosen, prompt[-2]["content"])
    return []


def truncations(answer: str) -> list[str]:
    """Strict prefixes of the answer, cut at a word (and a trailing comma dropped); a one-word answer at a
    punctuation mark (a date: 2021-03, 2021), a number by its last digits."""
    words = answer.split(" ")
    if len(words) > 1:
        return [" ".join(words[:k]).rstrip(",;:") for k in range(1, len(words))]
    if answer.isdigit():
        return [answer[:k] for k in range(1, len(answer))]
    if re.search(r"\w\W", answer):
        return [answer[:m.start()] for m in re.finditer(r"\W", answer)]
    return []


def candidates(kind: str, task: str, chosen: str, prompt: list[dict], others: list[str]) -> list[str]:
    if kind == "wrong_value":
        out = wrong_values(task, chosen, prompt)
    elif kind == "truncated":
        out = truncations(chosen)
    elif kind == "other_answer":
        out = others
    else:  # echo_source
        out = [subject(prompt[-1]["content"], chat_data.TRANSLATE_ASKS + (chat_data.TRANSLATE_AGAIN,))]
    kept = []
    for c in out:  # never the answer itself, never blank, each once
        if c.strip() and c != chosen and c not in kept:
            kept.append(c)
    return kept


# -- the data set -------------------------------------------------------------------------------------------


def pairs(conversations: list[list[dict]], kinds: list[list[str]], rng: random.Random) -> list[dict]:
    """One preference pair per conversation, on its last answer."""
    lines = []
    for messages, turn_kinds in zip(conversations, kinds, strict=True):
        prompt, chosen = messages[:-1], messages[-1]["content"]
        lines.append({"messages": prompt, "chosen": chosen, "rejected": None, "corruption": None,
                      "task": task_of(turn_kinds[-1], prompt[-1]["content"])})
    answers = {task: [] for task in TASKS}  # each task's distinct answers, in order of first appearance
    for line in lines:
        if line["chosen"] not in answers[line["task"]]:
            answers[line["task"]].append(line["chosen"])
    for line in lines:
        task, chosen, prompt = line["task"], line["chosen"], line["messages"]
        options = [(kind, c) for kind in OPTIONS[task] if (c := candidates(kind, task, chosen, prompt, answers[task]))]
        kind, pool = rng.choice(options)
        line["rejected"], line["corruption"] = rng.choice(pool), kind
    return lines


def build(seed: int, n_train: int, n_dev: int, data: Path = DATA) -> dict[str, list[dict]]:
    """{"train": pairs, "dev": pairs}; the same arguments give the same pairs."""
    kinds: dict[str, list[list[str]]] = {}
    chats = chat_data.build(seed, n_train, n_dev, data, kinds)
    return {split: pairs(chats[split], kinds[split], random.Random(f"pref-{seed}-{split}")) for split in chats}


def write(out_dir: Path, seed: int, n_train: int, n_dev: int, data: Path = DATA) -> dict[str, Path]:
    return chat_data.write_splits(out_dir, build(seed, n_train, n_dev, data))


def shares(lines: list[dict], key: str = "corruption") -> dict[str, float]:
    values = CORRUPTIONS if key == "corruption" else TASKS
    return {v: sum(line[key] == v for line in lines) / max(len(lines), 1) for v in values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path, help="where train.jsonl and dev.jsonl are written")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=1200, help="training pairs")
    ap.add_argument("--dev", type=int, default=200, help="dev pairs")
    args = ap.parse_args()
    gone = chat_data.missing()
    if gone:
        print(f"pref_data: {gone[0]} is missing ({len(gone)} of the shared data files the set is built from; "
              f"expected {DATA} beside the repository)", file=sys.stderr)
        sys.exit(1)
    paths = write(args.out_dir, args.seed, args.train, args.dev)
    train = [json.loads(line) for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in shares(train).items())
    print(f"pref_data: {args.train} pairs in {paths['train']}, {args.dev} in {paths['dev']} (seed {args.seed}); "
          f"train corruptions: {kinds}")


if __name__ == "__main__":
    main()

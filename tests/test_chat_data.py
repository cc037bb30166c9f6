"""scripts/chat_data.py: the chat SFT data set is reproducible, well formed, correct where an answer can be
recomputed (dates, weekdays, word problems), free of train/dev leaks, and read by lmforge's SFT reader."""

from __future__ import annotations

import calendar
import datetime
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_TRAIN, N_DEV = 150, 40

spec = importlib.util.spec_from_file_location("chat_data", ROOT / "scripts" / "chat_data.py")
chat_data = sys.modules["chat_data"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(chat_data)

pytestmark = pytest.mark.skipif(bool(chat_data.missing()), reason=f"the shared data sets are not at {DATA} "
                                "(scripts/chat_data.py builds from sst2, multi30k and conll2003 there)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return chat_data.write(tmp_path_factory.mktemp("chat"), 7, N_TRAIN, N_DEV)


def conversations(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]


def exchanges(messages: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) of each user turn and the assistant turn after it."""
    turns = [m for m in messages if m["role"] != "system"]
    return [(q["content"], a["content"]) for q, a in zip(turns[::2], turns[1::2])]


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones(built, tmp_path):
    again = chat_data.write(tmp_path / "again", 7, N_TRAIN, N_DEV)
    other = chat_data.write(tmp_path / "other", 8, N_TRAIN, N_DEV)
    for split in ("train", "dev"):
        assert again[split].read_bytes() == built[split].read_bytes()
        assert other[split].read_bytes() != built[split].read_bytes()


def test_counts_roles_and_mixed_lengths(built):
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        talks = conversations(built[split])
        assert len(talks) == n
        for m in talks:
            roles = [t["role"] for t in m]
            body = roles[1:] if roles[0] == "system" else roles
            assert body == ["user", "assistant"] * (len(body) // 2) and body, roles  # alternating, ends answered
            assert 1 <= len(body) // 2 <= 3
            assert all(isinstance(t["content"], str) and t["content"].strip() for t in m)
            assert all(set(t) == {"role", "content"} for t in m)
    talks = conversations(built["train"])
    users = [sum(t["role"] == "user" for t in m) for m in talks]
    assert {1, 2, 3} <= set(users)
    assert 0 < sum(m[0]["role"] == "system" for m in talks) < len(talks)


MONTHS = {name[:3].lower(): i for i, name in enumerate(calendar.month_name) if name}
DATE = re.compile(r'"([^"]+)"(?: \((\w+)/(\w+)/(\w+)\)| \((\w+)\.(\w+)\.(\w+)\))?')


def parse_date(question: str) -> datetime.date:
    """The date a question quotes: numbers in the order its hint names, or a month name, a day and a year."""
    m = DATE.search(question)
    text, order = m.group(1), [g for g in m.groups()[1:] if g]
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    if order:
        parts = dict(zip(order, numbers))
        return datetime.date(parts["year"], parts["month"], parts["day"])
    month = next(MONTHS[w[:3].lower()] for w in re.findall(r"[A-Za-z]+", text) if w[:3].lower() in MONTHS
                 and w.lower() not in ("the", "of"))
    year = next(n for n in numbers if n > 31)
    day = next(n for n in numbers if n <= 31)
    return datetime.date(year, month, day)


ARITHMETIC = (  # the problems' phrasings, solved here
    (re.compile(r"has (\d+) \w+ and gets (\d+) more\."), lambda a, b: a + b),
    (re.compile(r"had (\d+) \w+ and gave away (\d+)\."), lambda a, b: a - b),
    (re.compile(r"There are (\d+) boxes with (\d+) \w+ in each box\."), lambda a, b: a * b),
    (re.compile(r"^(\d+) \w+ are shared equally among (\d+) friends\."), lambda a, b: a / b),
    (re.compile(r"buys (\d+) packs of (\d+) \w+ and uses (\d+) of them\."), lambda a, b, c: a * b - c),
)
FOLLOW_UPS = ((re.compile(r"^Then \w+ gives away (\d+) "), -1), (re.compile(r"^Then \w+ gets (\d+) more "), 1))


def test_dates_weekdays_and_word_problems_are_answered_correctly(built):
    checked = {"date": 0, "weekday": 0, "arithmetic": 0, "follow-up": 0}
    for split in ("train", "dev"):
        for m in conversations(built[split]):
            last_date = last_value = None
            for question, answer in exchanges(m):
                if "ISO" in question:
                    last_date = parse_date(question)
                    assert answer == last_date.isoformat(), question
                    checked["date"] += 1
                elif question == "What day of the week was that?":
                    assert answer == calendar.day_name[last_date.weekday()]
                    checked["weekday"] += 1
                elif solved := [(p, f) for p, f in ARITHMETIC if p.search(question)]:
                    (pattern, solve), = solved
                    value = solve(*map(int, pattern.search(question).groups()))
                    assert value == int(value) and answer == str(int(value)), question
                    last_value = int(value)
                    checked["arithmetic"] += 1
                elif question.startswith("Then "):
                    (pattern, sign), = [(p, s) for p, s in FOLLOW_UPS if p.search(question)]
                    last_value += sign * int(pattern.search(question).group(1))
                    assert last_value >= 0 and answer == str(last_value), question
                    checked["follow-up"] += 1
    assert all(checked.values()), checked


def test_the_other_answers_come_from_the_question(built):
    names = 0
    for m in conversations(built["train"]) + conversations(built["dev"]):
        listed = None
        for question, answer in exchanges(m):
            if "positive or negative" in question.lower() or question.startswith("And this one?"):
                assert answer in ("positive", "negative")
            elif question == "Which of those are places?":
                assert answer == "none" or set(answer.split(", ")) <= set(listed), (listed, answer)
            elif "names" in question:
                sentence = question.split("\n\n", 1)[1] if "\n\n" in question else question.split("or none: ", 1)[1]
                listed = [] if answer == "none" else answer.split(", ")
                assert all(name in sentence for name in listed), (question, answer)
                names += bool(listed)
    assert names


def test_nothing_of_dev_is_in_train(built):
    def questions(path):
        return {q for m in conversations(path) for q, _ in exchanges(m) if not q.startswith(("What day", "Which of"))}

    def dates(path):
        return {a for m in conversations(path) for _, a in exchanges(m) if re.fullmatch(r"\d{4}-\d\d-\d\d", a)}

    train, dev = questions(built["train"]), questions(built["dev"])
    assert not train & dev
    assert not dates(built["train"]) & dates(built["dev"])


def test_lmforge_reads_the_files_as_chat_sft_data(built):
    from lmforge.config import load_config
    from lmforge.data.labelled import read_examples

    fc = load_config(base={"task": "sft"}).finetune
    for split in ("train", "dev"):
        examples = read_examples(built[split], "sft", fc)
        talks = conversations(built[split])
        assert [e.text for e in examples] == talks
        assert [e.label for e in examples] == [m[-1]["content"] for m in talks]


def test_without_the_shared_data_the_script_says_so_in_one_line(tmp_path):
    import subprocess

    script = tmp_path / "scripts" / "chat_data.py"  # a copy whose ../shared/data does not exist
    script.parent.mkdir()
    script.write_text((ROOT / "scripts" / "chat_data.py").read_text(encoding="utf-8"), encoding="utf-8")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True)
    assert out.returncode == 1 and not (tmp_path / "out").exists()
    assert len(out.stderr.strip().splitlines()) == 1 and "is missing" in out.stderr, out.stderr

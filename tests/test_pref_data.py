"""scripts/pref_data.py: the preference set is reproducible, well formed, built on chat_data's conversations
(so its chosen answers are the correct ones, recomputed here where they can be), every rejected answer is wrong
in the way its "corruption" says, every kind has a fair share, and train and dev share no prompt."""

from __future__ import annotations

import calendar
import datetime
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_chat_data import ARITHMETIC, FOLLOW_UPS, parse_date  # the chat set's own checks, on the same phrasings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
N_TRAIN, N_DEV = 300, 60

spec = importlib.util.spec_from_file_location("pref_data", ROOT / "scripts" / "pref_data.py")
pref_data = sys.modules["pref_data"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pref_data)
chat_data = pref_data.chat_data

pytestmark = pytest.mark.skipif(bool(chat_data.missing()), reason=f"the shared data sets are not at {DATA} "
                                "(scripts/pref_data.py builds from sst2, multi30k and conll2003 there)")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    return pref_data.write(tmp_path_factory.mktemp("pref"), 7, N_TRAIN, N_DEV)


@pytest.fixture(scope="module")
def lines(built) -> dict[str, list[dict]]:
    return {split: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            for split, path in built.items()}


def names_of(answer: str) -> list[str]:
    return [] if answer == "none" else answer.split(", ")


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones(built, tmp_path):
    again = pref_data.write(tmp_path / "again", 7, N_TRAIN, N_DEV)
    other = pref_data.write(tmp_path / "other", 8, N_TRAIN, N_DEV)
    for split in ("train", "dev"):
        assert again[split].read_bytes() == built[split].read_bytes()
        assert other[split].read_bytes() != built[split].read_bytes()


def test_every_line_is_a_prompt_ending_with_a_user_turn_and_two_different_answers(lines):
    for split, n in (("train", N_TRAIN), ("dev", N_DEV)):
        assert len(lines[split]) == n
        for line in lines[split]:
            assert set(line) == {"messages", "chosen", "rejected", "corruption", "task"}
            roles = [t["role"] for t in line["messages"]]
            body = roles[1:] if roles[0] == "system" else roles
            assert body == ["user", "assistant"] * (len(body) // 2) + ["user"], roles
            assert all(isinstance(t["content"], str) and t["content"].strip() for t in line["messages"])
            for answer in (line["chosen"], line["rejected"]):
                assert isinstance(answer, str) and answer.strip()
            assert line["chosen"] != line["rejected"]
            assert line["corruption"] in pref_data.OPTIONS[line["task"]]


def test_the_prompts_and_chosen_answers_are_chat_datas_conversations_of_the_same_split(lines):
    chats = chat_data.build(7, N_TRAIN, N_DEV)
    for split in ("train", "dev"):
        assert [p["messages"] + [{"role": "assistant", "content": p["chosen"]}] for p in lines[split]] == chats[split]


def captions(split: str) -> dict[str, set[str]]:
    """English -> its German captions, in the Multi30k files the split reads."""
    files = chat_data.FILES[split]
    out: dict[str, set[str]] = {}
    for en, de in zip((DATA / files["en"]).read_text(encoding="utf-8").splitlines(),
                      (DATA / files["de"]).read_text(encoding="utf-8").splitlines()):
        out.setdefault(en.strip(), set()).add(de.strip())
    return out


def english(question: str) -> str:
    return pref_data.subject(question, chat_data.TRANSLATE_ASKS + (chat_data.TRANSLATE_AGAIN,))


def test_the_chosen_answers_are_correct(lines):
    checked = dict.fromkeys(pref_data.TASKS, 0)
    for split in ("train", "dev"):
        german = captions(split)
        for line in lines[split]:
            prompt, chosen, task = line["messages"], line["chosen"], line["task"]
            turns = [t["content"] for t in prompt if t["role"] != "system"]
            question = turns[-1]
            if task == "date":
                assert chosen == parse_date(question).isoformat(), question
            elif task == "weekday":
                assert question == "What day of the week was that?"
                assert chosen == calendar.day_name[parse_date(turns[-3]).weekday()]
            elif task == "arithmetic":
                if solved := [(p, f) for p, f in ARITHMETIC if p.search(question)]:
                    (pattern, solve), = solved
                    value = solve(*map(int, pattern.search(question).groups()))
                else:
                    (pattern, sign), = [(p, s) for p, s in FOLLOW_UPS if p.search(question)]
                    value = int(turns[-2]) + sign * int(pattern.search(question).group(1))
                assert value == int(value) >= 0 and chosen == str(int(value)), question
            elif task == "sentiment":
                assert chosen in ("positive", "negative")
            elif task == "translate":
                assert chosen in german[english(question)], question
            elif task == "names":
                assert all(name in question for name in names_of(chosen)), (question, chosen)
            else:  # the places among the names listed just before
                assert question == "Which of those are places?" and set(names_of(chosen)) <= set(names_of(turns[-2]))
            checked[task] += 1
    assert all(checked.values()), checked


def test_every_rejected_answer_is_wrong_in_the_way_its_corruption_says(lines):
    seen = set()
    for split in ("train", "dev"):
        answers: dict[tuple[str, str], list[str]] = {}  # (task, answer) -> the prompts it answers in this split
        for line in lines[split]:
            answers.setdefault((line["task"], line["chosen"]), []).append(json.dumps(line["messages"]))
        for line in lines[split]:
            chosen, rejected, task, kind = line["chosen"], line["rejected"], line["task"], line["corruption"]
            question = line["messages"][-1]["content"]
            seen.add((task, kind))
            if kind == "truncated":
                assert chosen.startswith(rejected) and len(rejected) < len(chosen), (chosen, rejected)
            elif kind == "other_answer":  # the correct answer of another prompt of the same split and task
                assert any(p != json.dumps(line["messages"]) for p in answers.get((task, rejected), [])), rejected
            elif kind == "echo_source":
                assert task == "translate" and rejected == english(question)
            elif task == "date":
                assert re.fullmatch(r"\d{4}-\d\d-\d\d", rejected), rejected
                shift = abs(datetime.date.fromisoformat(rejected) - datetime.date.fromisoformat(chosen)).days
                assert 0 < shift <= 372, (chosen, rejected)
            elif task == "weekday":
                assert rejected in calendar.day_name and rejected != chosen
            elif task == "sentiment":
                assert {chosen, rejected} == {"positive", "negative"}
            elif task == "arithmetic":
                assert rejected.isdigit() and 1 <= abs(int(rejected) - int(chosen)) <= 3, (chosen, rejected)
            elif task == "names":
                assert set(names_of(rejected)) != set(names_of(chosen)), (chosen, rejected)
            else:  # places: some other choice among the names listed before, or none
                listed = names_of(line["messages"][-2]["content"])
                assert set(names_of(rejected)) != set(names_of(chosen)) and set(names_of(rejected)) <= set(listed)
    assert {t for t, k in seen if k == "wrong_value"} == {t for t, o in pref_data.OPTIONS.items() if "wrong_value" in o}
    assert {t for t, k in seen if k == "other_answer"} >= {"date", "translate", "names", "arithmetic"}
    assert {t for t, k in seen if k == "truncated"} >= {"date", "translate", "arithmetic"}


def test_every_corruption_kind_has_a_fair_share(lines):
    both = lines["train"] + lines["dev"]
    shares = pref_data.shares(both)
    assert all(0.04 <= s <= 0.6 for s in shares.values()), shares
    translate = [line for line in both if line["task"] == "translate"]
    for kind in pref_data.OPTIONS["translate"]:  # the translate-only kind is a fair share of its task
        assert sum(line["corruption"] == kind for line in translate) >= 0.2 * len(translate), kind
    assert all(s >= 0.1 for task, s in pref_data.shares(both, "task").items() if task not in ("weekday", "places"))


def test_train_and_dev_share_no_prompt(lines):
    def prompts(split):
        return {json.dumps(line["messages"]) for line in lines[split]}

    def questions(split):
        generic = (chat_data.WEEKDAY_ASK, chat_data.PLACES_ASK)
        return {t["content"] for line in lines[split] for t in line["messages"]
                if t["role"] == "user" and t["content"] not in generic}

    assert not prompts("train") & prompts("dev")
    assert not questions("train") & questions("dev")


def test_the_command_line_writes_the_same_files_and_reports_the_shares(built, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "pref_data.py"), str(tmp_path / "cli"), "--seed", "7",
                          "--train", str(N_TRAIN), "--dev", str(N_DEV)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for split in ("train", "dev"):
        assert (tmp_path / "cli" / f"{split}.jsonl").read_bytes() == built[split].read_bytes()
    assert all(kind in out.stdout for kind in pref_data.CORRUPTIONS), out.stdout


def test_without_the_shared_data_the_script_says_so_in_one_line(tmp_path):
    scripts = tmp_path / "scripts"  # copies whose ../shared/data does not exist
    scripts.mkdir()
    for name in ("pref_data.py", "chat_data.py"):
        (scripts / name).write_text((ROOT / "scripts" / name).read_text(encoding="utf-8"), encoding="utf-8")
    out = subprocess.run([sys.executable, str(scripts / "pref_data.py"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert out.returncode == 1 and not (tmp_path / "out").exists()
    assert len(out.stderr.strip().splitlines()) == 1 and "is missing" in out.stderr, out.stderr

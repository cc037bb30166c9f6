"""Chat templates: a conversation (a list of {"role", "content"} messages) rendered into the text a chat
model was trained on, as transformers' `apply_chat_template` renders it.

Hugging Face ships a model's template as Jinja2 text (tokenizer_config.json's `chat_template`, or
chat_template.jinja). Rendering it needs Jinja2 itself (no library renders these templates otherwise);
what transformers adds around it is small and is repeated here: a sandboxed environment that trims
blocks, `raise_exception` for templates that refuse a conversation, and `tojson`. `CHATML` is the
template for models that ship none (the format of Qwen and SmolLM2).
"""

from __future__ import annotations

import json

from jinja2 import TemplateError, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import UserError

ROLES = ("system", "user", "assistant")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NAMED = {"chatml": CHATML}
END_OF_TURN = {"chatml": "<|im_end|>"}  # where a named template's assistant turn ends


def check_messages(messages, where: str) -> list[dict]:
    """A conversation as the template expects it, or a one-line UserError naming the message and field."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages: expected a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise UserError(f"{where}: messages[{i}]: expected an object with a role and a content (and no other "
                            f"fields), got {json.dumps(m)[:80]}")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: messages[{i}].role = {json.dumps(m['role'])}: expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: messages[{i}].content is {type(m['content']).__name__}; expected a string")
    return messages


def _raise(message: str):
    raise TemplateError(message)


# Marks around what a {% generation %} block rendered: characters no template text holds, removed again
# once their positions are read.
GEN_START, GEN_END = "\x00<generation>\x00", "\x00</generation>\x00"


class _Generation(Extension):
    """{% generation %}...{% endgeneration %}: templates mark the assistant's own text with it (what
    transformers' return_assistant_tokens_mask reads); here it wraps that text in GEN_START / GEN_END."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        return GEN_START + caller() + GEN_END


def _rendered(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str],
              where: str) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **tokens)
    except TemplateError as e:
        raise UserError(f"{where}: the chat template fails to render this conversation ({e})") from None


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without its generation marks, and the character spans they enclosed."""
    out, spans, pos = [], [], 0
    while (start := text.find(GEN_START, pos)) >= 0:
        end = text.index(GEN_END, start)
        out.append(text[pos:start])
        begin = sum(map(len, out))
        out.append(text[start + len(GEN_START):end])
        spans.append((begin, begin + end - start - len(GEN_START)))
        pos = end + len(GEN_END)
    out.append(text[pos:])
    return "".join(out), spans


def render(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict[str, str],
           where: str) -> str:
    """The conversation as text; `tokens`: the special-token strings the template may name (bos_token,
    eos_token, ...). A template that fails, or refuses the conversation, is one line naming `where`."""
    return _unmark(_rendered(template, messages, add_generation_prompt, tokens, where))[0]


def render_with_answers(template: str, messages: list[dict], tokens: dict[str, str],
                        where: str) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation as text and the character spans of the assistant's turns, the text a chat
    SFT trains on. Where the template marks them ({% generation %}) the marks say; otherwise each turn is
    what rendering it adds after the conversation before it with the assistant's opening (its content and
    the template's end of turn)."""
    text, spans = _unmark(_rendered(template, messages, False, tokens, where))
    if spans:
        return text, spans
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(template, messages[:i], True, tokens, where)
        through = render(template, messages[:i + 1], False, tokens, where)
        if not (text.startswith(through) and through.startswith(before)):
            raise UserError(f"{where}: the chat template renders a conversation differently from its beginning "
                            "(it cannot say which tokens are the assistant's); use one that marks them with "
                            "{% generation %} or finetune.chat_template = chatml")
        spans.append((len(before), len(through)))
    return text, spans


def template_from(tokenizer_config: dict, jinja_file: str | None, name: str | None, where: str) -> str | None:
    """The template to render with: `name` ("chatml", or a name the model's templates list), else the
    model's own (chat_template.jinja, or tokenizer_config.json's chat_template), else None."""
    own = jinja_file or tokenizer_config.get("chat_template")
    if isinstance(own, list):  # several named templates
        own = {t.get("name"): t.get("template") for t in own if isinstance(t, dict)}
    if name:
        if name in NAMED:
            return NAMED[name]
        if isinstance(own, dict) and name in own:
            return own[name]
        raise UserError(f"{where}: no chat template named {name!r}; expected chatml"
                        f"{', ' + ', '.join(own) if isinstance(own, dict) else ''}")
    if isinstance(own, dict):
        own = own.get("default")
    return own if isinstance(own, str) and own else None


def token_strings(tokenizer_config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (tokenizer_config.json may hold AddedToken objects)."""
    def text(value):
        return value.get("content") if isinstance(value, dict) else value

    return {k: text(v) for k, v in tokenizer_config.items() if k.endswith("_token") and text(v) is not None}

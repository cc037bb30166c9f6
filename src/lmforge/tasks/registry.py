"""The task registry: what the rest of lmforge needs to know about each task, as data.

Config validation, the labelled-file reader, the model builder, the server, the Hugging Face export,
the CLI and the report read a task's entry here instead of keeping tables of their own, so adding a
task is its module in tasks/ plus one `register(TaskSpec(...))` below (docs/architecture.md walks
through it). The module imports nothing heavy (no torch): `lmforge --help` and config validation read
it, and `tasks.make_task` imports a task's module only when the task is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# What a fine-tuning label is, for the labelled-file reader and the label map:
LABEL_KINDS = {
    "class": "a label",        # one class name per example (classify)
    "value": "a number",       # one real number (regress)
    "classes": "labels",       # a set of class names (multilabel)
    "tags": "tags",            # one tag per word (tag)
    "response": "a response",  # the text to generate (sft)
    "preference": "a chosen and a rejected answer",  # two answers to one prompt, the first preferred (dpo, reward)
}
# The models model.build_model knows how to build, by the `model` field of a spec.
MODEL_KINDS = ("gpt", "masked_lm", "sequence_classifier", "token_tagger", "encoder_decoder")
# What a model's body computes: a decoder attends causally, an encoder both ways; a fine-tuning task's
# body is its pretrained model's (`finetune.body`), which its spec says as "pretrained".
BODIES = ("decoder", "encoder", "encoder_decoder", "pretrained")


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the `task` config value
    task_class: str  # "module:Class" of its Task, imported when the task is built
    doc: str  # one line for `--help` and error messages
    family: str  # "pretrain" (from text) or "finetune" (labelled files, from a pretrained body)
    model: str  # one of MODEL_KINDS
    body: str  # one of BODIES
    losses: tuple[str, ...]  # the losses it trains with; the first is what loss.name = auto picks
    label: str | None = None  # fine-tuning: one of LABEL_KINDS
    formats: tuple[str, ...] = ()  # fine-tuning: the labelled-file formats it reads; the first is for .txt files
    endpoint: str | None = None  # the HTTP endpoint `lmforge serve` answers for its runs (docs/serving.md)
    hf_classes: dict[str, str] = field(default_factory=dict)  # HF architecture -> the class its export writes
    class_weights: bool = True  # loss.class_weights apply (a classification over a fixed label set)
    # several documents (pretrain: data.pack) or examples (finetune: finetune.pack) may share a row, each
    # attending to itself: a causal LM's next-token loss, which has no per-row output to keep apart
    packs: bool = False
    sections: tuple[str, ...] = ()  # the config sections of its own (mlm, seq2seq, robust...), see config_sections

    @property
    def finetune(self) -> bool:
        return self.family == "finetune"

    @property
    def config_sections(self) -> tuple[str, ...]:
        """The top-level config sections the task reads: `--help` and the report show these alone."""
        return FAMILY_SECTIONS[self.family] + self.sections + COMMON_SECTIONS


# The config sections every task reads, and those of each family (a fine-tuned model's shape is its
# pretrained body's, so the model section is pre-training's alone).
COMMON_SECTIONS = ("train", "loss", "eval", "log")
FAMILY_SECTIONS = {"pretrain": ("model", "data"), "finetune": ("finetune", "peft")}

TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task (a test or a plugin may add its own); a second spec under one name is a mistake."""
    if spec.name in TASKS and TASKS[spec.name] != spec:
        raise ValueError(f"task {spec.name!r} is registered twice")
    if spec.model not in MODEL_KINDS or spec.body not in BODIES or (spec.label and spec.label not in LABEL_KINDS):
        raise ValueError(f"task {spec.name!r}: model, body or label is not one of {MODEL_KINDS}, {BODIES}, "
                         f"{tuple(LABEL_KINDS)}")
    TASKS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    TASKS.pop(name, None)


def spec(name: str) -> TaskSpec:
    return TASKS[name]


def names(family: str | None = None) -> tuple[str, ...]:
    return tuple(n for n, s in TASKS.items() if family is None or s.family == family)


TEXT_FORMATS = ("sst", "csv", "tsv", "jsonl")
# what a fine-tuned causal LM exports as, by HF architecture (sft, dpo)
CAUSAL_LM_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                     "qwen3": "Qwen3ForCausalLM"}
# what a fine-tuned sequence classifier (classify, regress, multilabel, reward) and a tagger export as, by HF
# architecture; an encoder classifier pooled otherwise than with BERT's pooler is written in the
# sentence-transformers layout instead (hf/sentence.py)
SEQUENCE_CLASSES = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification",
                    "llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                    "qwen3": "Qwen3ForSequenceClassification"}
TOKEN_CLASSES = {name: cls.replace("Sequence", "Token") for name, cls in SEQUENCE_CLASSES.items()}
CLASSIFIERS = ("cross_entropy", "focal", "hinge_crammer_singer", "hinge_weston_watkins")

register(TaskSpec("clm", "lmforge.tasks.clm:CausalLM", "causal LM (GPT)", "pretrain", "gpt", "decoder",
                  ("cross_entropy",), endpoint="generate", class_weights=False, packs=True))
register(TaskSpec("mlm", "lmforge.tasks.mlm:MaskedLMTask", "masked LM (BERT-style encoder)", "pretrain", "masked_lm",
                  "encoder", ("cross_entropy",), class_weights=False, sections=("mlm",)))
register(TaskSpec("classify", "lmforge.tasks.classify:ClassifyTask", "sentence (pair) classification", "finetune",
                  "sequence_classifier", "pretrained", CLASSIFIERS, label="class", formats=TEXT_FORMATS,
                  endpoint="classify", hf_classes=SEQUENCE_CLASSES, sections=("robust",)))
register(TaskSpec("regress", "lmforge.tasks.classify:RegressTask", "regression of a number per text", "finetune",
                  "sequence_classifier", "pretrained", ("mse", "huber", "smooth_l1", "mae"), label="value",
                  formats=TEXT_FORMATS, endpoint="classify", hf_classes=SEQUENCE_CLASSES, sections=("robust",)))
register(TaskSpec("multilabel", "lmforge.tasks.classify:MultiLabelTask", "multi-label classification", "finetune",
                  "sequence_classifier", "pretrained", ("bce", "binary_focal"), label="classes", formats=TEXT_FORMATS,
                  endpoint="classify", hf_classes=SEQUENCE_CLASSES, sections=("robust",)))
register(TaskSpec("tag", "lmforge.tasks.tag:TagTask", "token tagging (NER)", "finetune", "token_tagger", "pretrained",
                  ("cross_entropy", "focal"), label="tags", formats=("conll", "jsonl"), endpoint="tag",
                  hf_classes=TOKEN_CLASSES, sections=("robust",)))
register(TaskSpec("sft", "lmforge.tasks.sft:SFTTask", "supervised fine-tuning of a causal LM on prompt/response pairs",
                  "finetune", "gpt", "decoder", ("cross_entropy",), label="response", formats=("jsonl",),
                  endpoint="generate", class_weights=False, packs=True,
                  hf_classes=CAUSAL_LM_CLASSES, sections=("robust",)))
register(TaskSpec("dpo", "lmforge.tasks.dpo:DPOTask", "preference tuning of a causal LM on chosen/rejected answers "
                  "(DPO, conservative DPO, IPO, SimPO)", "finetune", "gpt", "decoder", ("dpo", "ipo", "simpo"),
                  label="preference", formats=("jsonl",), endpoint="generate", class_weights=False, packs=True,
                  hf_classes=CAUSAL_LM_CLASSES))
register(TaskSpec("reward", "lmforge.tasks.reward:RewardTask", "a reward model: one score per answer, trained on "
                  "chosen/rejected pairs (Bradley-Terry)", "finetune", "sequence_classifier", "pretrained",
                  ("bradley_terry",), label="preference", formats=("jsonl",), endpoint="score", class_weights=False,
                  hf_classes=SEQUENCE_CLASSES, sections=("robust",)))
register(TaskSpec("seq2seq", "lmforge.tasks.seq2seq:Seq2SeqTask", "encoder-decoder translation", "pretrain",
                  "encoder_decoder", "encoder_decoder", ("cross_entropy",), endpoint="translate", sections=("seq2seq",)))
register(TaskSpec("span", "lmforge.tasks.span:SpanCorruption", "span-corruption pre-training of an encoder-decoder",
                  "pretrain", "encoder_decoder", "encoder_decoder", ("cross_entropy",), sections=("span", "seq2seq")))

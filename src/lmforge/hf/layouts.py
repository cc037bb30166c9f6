"""Which Hugging Face layout a run exports as, and every refusal that the run's config alone decides: the
architecture its model fits (hf/arch.py's tables, or BART for an encoder-decoder), the class of a fine-tuned
head, a PEFT method that cannot be written. No torch here: `lmforge export` asks `check_exportable` from the
run's config.yaml before it imports torch and loads the model (a refusal in a fraction of a second), and
`hf.export.export_hf` asks it again of what it loaded (a Hugging Face folder has no config.yaml)."""

from __future__ import annotations

from lmforge.errors import UserError
from lmforge.hf.arch import ACTIVATIONS, ARCHS, FORMATS, Arch
from lmforge.tasks import registry

BART_CLASS = "BartForConditionalGeneration"
BART_LAYER_NORM_EPS = 1e-5  # BART's nn.LayerNorm default; config.json cannot set another
# What BART's maths needs of model.* (hf/bart.py says why BART): values, or a function of the config giving
# the one value allowed.
BART_LAYOUT = {
    "pos": "learned", "norm": "layernorm", "norm_position": "post", "norm_eps": BART_LAYER_NORM_EPS, "qk_norm": False,
    "type_vocab_size": 0, "mlp": tuple(dict.fromkeys(ACTIVATIONS.values())),
    "n_kv_head": lambda m: m.n_head, "head_dim": lambda m: m.d_model // m.n_head,
}


def show(value) -> str:
    """A config value as YAML and the messages write it (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _needs(key: str, ok: tuple, has) -> str:
    return f"model.{key} = {' or '.join(map(show, ok))} (it has {show(has)})"


def body_task(cfg) -> str:
    """The pre-training task whose layout a model's body has (an Arch's `task`): a decoder's is clm, an
    encoder's mlm; a fine-tuned model's body is the one it started from (finetune.body)."""
    body = registry.spec(cfg.task).body
    if body == "pretrained":
        body = cfg.finetune.body
    return {"decoder": "clm", "encoder": "mlm"}.get(body, cfg.task)


def arch_gaps(arch: Arch, cfg) -> list[str]:
    """What keeps this config from the architecture's layout, as 'model.x = needed (it has y)'."""
    if body_task(cfg) != arch.task:
        return [f"task = {arch.task} (it is {cfg.task})"]
    m = cfg.model
    needs = {k: (v,) for k, v in arch.layout.items()}
    if arch.activation:
        needs["mlp"] = tuple(dict.fromkeys(ACTIVATIONS.values()))
    if arch.mha_only:
        needs["n_kv_head"] = (m.n_head,)
    if not any(ours == "head_dim" for ours, _ in arch.config.values()):  # its config.json cannot say another
        needs["head_dim"] = (m.d_model // m.n_head,)
    return [_needs(k, ok, getattr(m, k)) for k, ok in needs.items() if getattr(m, k) not in ok]


def export_arch(cfg, fmt: str, run) -> Arch:
    """The architecture a decoder's or an encoder's run is written in: --format's, or with auto the first that
    fits; one line listing what each candidate needs where none does."""
    if fmt not in FORMATS:
        raise UserError(f"export: --format {fmt}: expected one of {', '.join(FORMATS)}")
    candidates = [ARCHS[fmt]] if fmt != "auto" else [a for a in ARCHS.values() if a.task == body_task(cfg)]
    gaps = [(a, arch_gaps(a, cfg)) for a in candidates]
    for arch, missing in gaps:
        if not missing:
            return arch
    reasons = "; ".join(f"{a.title} needs {', '.join(g)}" for a, g in gaps)
    raise UserError(f"export: {run}: the model fits no Hugging Face layout lmforge writes: {reasons}")


def bart_gaps(cfg) -> list[str]:
    """What keeps an encoder-decoder run from BART's layout, as 'model.x = needed (it has y)' or the seq2seq
    option."""
    m, out = cfg.model, []
    for key, need in BART_LAYOUT.items():
        ok = (need(m),) if callable(need) else need if isinstance(need, tuple) else (need,)
        if getattr(m, key) not in ok:
            out.append(_needs(key, ok, getattr(m, key)))
    if cfg.task == "seq2seq" and cfg.seq2seq.source_vocab_size:
        out.append(f"seq2seq.source_vocab_size = 0, one vocabulary for both sides (it has "
                   f"{cfg.seq2seq.source_vocab_size})")
    return out


def _check_bart(cfg, fmt: str, run) -> None:
    if fmt != "auto":
        raise UserError(f"export: --format {fmt}: a {cfg.task} model is an encoder-decoder, written as BART only; "
                        "leave --format at auto")
    missing = bart_gaps(cfg)
    if missing:
        raise UserError(f"export: {run}: a {cfg.task} encoder-decoder exports as BART ({BART_CLASS}), which needs "
                        f"{', '.join(missing)}; train one with --model.preset bart-tiny or bart-base "
                        "(docs/translation.md, Export)")


def sentence_layout(cfg) -> bool:
    """An encoder's sequence classifier that pools otherwise than with BERT's pooler (mean, cls, last): no
    transformers class computes it, so it is written in the sentence-transformers layout (hf/sentence.py)."""
    return (registry.spec(cfg.task).model == "sequence_classifier" and body_task(cfg) == "mlm"
            and cfg.finetune.pooling != "pooler")


def decoder_classifier(cfg) -> bool:
    """A sequence classifier on a causal body (pooled at its last real token)."""
    return registry.spec(cfg.task).model == "sequence_classifier" and body_task(cfg) == "clm"


def hf_class(arch: Arch, cfg, run) -> str:
    """The transformers class a fine-tuned model is written as (the registry's hf_classes; BertModel for the
    sentence-transformers layout), or one line saying why there is none."""
    spec = registry.spec(cfg.task)
    cls = "BertModel" if sentence_layout(cfg) else spec.hf_classes.get(arch.name)
    if cls is None:
        written = sorted({c for s in registry.TASKS.values() for c in s.hf_classes.values()})
        raise UserError(f"export: {run}: a {cfg.task} model on a {arch.title} body has no Hugging Face class "
                        f"lmforge writes (it writes {', '.join(written)})")
    if decoder_classifier(cfg) and cfg.finetune.pooling != "last":
        raise UserError(f"export: {run}: {cls} pools a decoder's last real token; this model has finetune.pooling = "
                        f"{cfg.finetune.pooling}, which transformers cannot compute on a decoder (fine-tune with "
                        "finetune.pooling = last, a decoder's default)")
    return cls


# why a PEFT method's modules cannot be folded into the base's weights
UNMERGEABLE = {"adapter": "its bottleneck adapters are extra nonlinear layers, which cannot be merged into the base's "
                          "weights",
               "prefix": "its prefix adds key/value positions to every attention layer, which cannot be merged into "
                         "the base's weights"}


def check_exportable(cfg, run, fmt: str = "auto", merge: bool = False, method: str | None = None) -> Arch | None:
    """Refuse, in one line, what `lmforge export RUN --format FMT [--merge]` cannot write, from the run's config
    alone; method: the PEFT method the loaded model holds (default: the config's peft.method). Returns the
    architecture a decoder or encoder is written in, None for an encoder-decoder (BART, hf/bart.py)."""
    method = method or cfg.peft.method
    if method in UNMERGEABLE:
        raise UserError(f"export: {run}: peft.method = {method}: {UNMERGEABLE[method]} and transformers has no "
                        "layer for them; fine-tune with peft.method = lora (or none) to export, or serve this run "
                        "with lmforge serve")
    if merge and method != "lora":
        raise UserError(f"export: --merge: {run} has no LoRA adapter to merge (peft.method = {method}); "
                        "export it without --merge")
    if registry.spec(cfg.task).model == "encoder_decoder":
        _check_bart(cfg, fmt, run)
        return None
    arch = export_arch(cfg, fmt, run)
    if registry.spec(cfg.task).finetune:
        hf_class(arch, cfg, run)
    return arch

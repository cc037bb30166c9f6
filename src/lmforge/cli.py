"""The `lmforge` command: pretrain (train), finetune, evaluate, predict, translate, tokenizer, generate, import,
export, serve, report, runs."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import os
import sys
import warnings
from pathlib import Path

from lmforge.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one UserError line instead of usage text and exit 2."""

    def error(self, message):
        if message.startswith("unrecognized arguments:"):
            known = _long_options(self)
            for word in message.split(":", 1)[1].split():
                guess = difflib.get_close_matches(word.split("=")[0], known, n=1) if word.startswith("--") else []
                if guess:
                    message += f"; did you mean {guess[0]}?"
                    break
        where = self.prog.removeprefix("lmforge").strip()  # the CLI prints "lmforge: error: " before this
        raise UserError(f"{where + ': ' if where else ''}{message} (see {self.prog} --help)")


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    """Every --option of a parser and of its subcommands (argparse reports unknown options from the top)."""
    found = []
    for action in parser._actions:
        found += [o for o in action.option_strings if o.startswith("--")]
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _long_options(sub)
    return sorted(set(found))


def _config_options(p: argparse.ArgumentParser, base: dict | None = None, task: str | None = None) -> None:
    """The config's fields as --SECTION.KEY options. task: --help shows the options that apply to it alone
    (every option is still accepted: a recipe may set another task); None or "all": every option."""
    from lmforge.config import DEPRECATED_KEYS, help_rows

    p.usage = f"{p.prog} [--config YAML] [--resume auto|RUN|CKPT] [--SECTION.KEY VALUE ...]"
    p.add_argument("--config", metavar="YAML", help="a recipe file; the options below override its values")
    shown = None if task in (None, ALL_TASKS) else task
    title = (f"config options of task {shown} (dotted keys; also settable in the YAML file; another task's: "
             f"--task NAME --help; every option: --help {ALL_TASKS})" if shown else
             "config options (dotted keys; also settable in the YAML file)")
    group = p.add_argument_group(title)
    for option, metavar, text, applies in help_rows(base, shown):
        group.add_argument(option, metavar=metavar, help=text if applies else argparse.SUPPRESS,
                           default=argparse.SUPPRESS)
    for key in DEPRECATED_KEYS:  # old scripts keep working, with a note; --help shows the new keys only
        group.add_argument(f"--{key}", help=argparse.SUPPRESS, default=argparse.SUPPRESS)


ALL_TASKS = "all"  # `lmforge finetune --help all`: every task's options
TRAIN_COMMANDS = ("pretrain", "train", "finetune")


def _help_task(argv: list[str]) -> str | None:
    """For `lmforge pretrain|train|finetune ... --help [all]`: the task whose options --help shows (from --task,
    else the --config recipe, else the command's default task), or ALL_TASKS; None when no help is asked for."""
    if not argv or argv[0] not in TRAIN_COMMANDS or not {"-h", "--help"} & set(argv):
        return None
    at = max(i for i, word in enumerate(argv) if word in ("-h", "--help"))
    if argv[at + 1:at + 2] == [ALL_TASKS]:
        return ALL_TASKS
    task = _option_value(argv, "--task")
    if task is None and (recipe := _option_value(argv, "--config")):
        from lmforge.config import read_yaml

        found = read_yaml(recipe).get("task")
        task = found if isinstance(found, str) else None
    from lmforge.tasks import registry

    task = task or ("classify" if argv[0] == "finetune" else "clm")
    if task not in registry.TASKS:
        raise UserError(f"{argv[0]} --help: task = {task}: expected one of {', '.join(registry.TASKS)} "
                        f"(every option: --help {ALL_TASKS})")
    return task


def _option_value(argv: list[str], option: str) -> str | None:
    """The value given to `option` (as `--option V` or `--option=V`), the last one winning; None if absent."""
    value = None
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(option + "="):
            value = word.split("=", 1)[1]
    return value


def _checkpoint(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN",
                   help=f"{what}: a run directory, one of its checkpoints, or a Hugging Face folder (lmforge runs "
                   "lists the runs)")


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N [default: auto = cuda "
                   "when there is one]")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # 1e3, as the config's integers take it
        if not value.is_integer():
            raise
        return int(value)


_PARSERS = {int: (_parse_int, "an integer"), float: (float, "a number"), str: (str, "a string")}


def _checked(tp: type, check=None):
    """argparse's type= for a value of `tp` that must pass `check` (lmforge.fields: the same checks the config
    fields declare): a value of another type, not finite, or outside the range is refused naming the value and
    what was expected (Parser.error puts the option before it, as one line)."""
    parse, noun = _PARSERS[tp]
    in_range = f" ({check[1]})" if check else ""

    def value_of(text: str):
        shown = repr(text) if tp is str else text
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{shown}: expected {noun}{in_range}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{shown}: expected a finite number{in_range}")
        if check and not check[0](value):
            raise argparse.ArgumentTypeError(f"{shown}: must be {check[1]}")
        return value

    value_of.__name__ = tp.__name__  # what argparse calls the type in its own messages
    return value_of


def _checked_list(check):
    """argparse's type= for a comma-separated list that must pass `check` (a config field's, as for _checked)."""
    def items_of(text: str) -> list[str]:
        items = [v for v in text.split(",") if v]
        if not check[0](items):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {check[1]}")
        return items

    items_of.__name__ = "list"
    return items_of


def _ranged(p: argparse.ArgumentParser, option: str, tp: type, check, help: str, default=None, shown=None,
            **kwargs) -> None:
    """An option whose value has a type and a range, declared once: --help shows the range, and a value
    outside it is one line naming the option, the value and the range. shown: the default as --help words
    it, where it is not the value itself (the run's own)."""
    p.add_argument(option, type=_checked(tp, check), default=default, **kwargs,
                   help=f"{help} ({check[1]}) [default: {default if shown is None else shown}]")


def _check_of(cls: type, name: str):
    """The check a config dataclass declares for its field `name`: an option that sets the same value (translate
    --beam and seq2seq.beam_size) takes the same range."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["check"]


def _dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the weights' precision; auto = as stored (a bf16 Hugging Face folder stays bf16, an lmforge "
                   "run is float32) [default: auto]")


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """The config options given on the command line, as {dotted key: raw string}."""
    from lmforge.config import DEPRECATED_KEYS, leaves

    keys = {path for path, _, _ in leaves()} | set(DEPRECATED_KEYS)
    return {k: v for k, v in vars(args).items() if k in keys}


# Fine-tuning starts from these instead of pre-training's defaults (a recipe or option overrides them):
# the usual BERT fine-tuning settings.
FINETUNE_DEFAULTS = {"train": {"lr": 5e-5, "min_lr": 0.0, "warmup_steps": 0, "weight_decay": 0.01, "beta2": 0.999,
                               "batch_size": 32, "schedule": "linear", "checkpoint_every": 0},
                     "eval": {"batch_size": 64}, "log": {"every": 20}}


def finetune_base(recipe: dict) -> dict:
    """A fine-tuning recipe (the YAML's mapping) on top of FINETUNE_DEFAULTS, its own keys winning."""
    return _deep_merge({"task": "classify", **copy.deepcopy(FINETUNE_DEFAULTS)}, recipe)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cmd_train(args) -> int:
    """pretrain and finetune: one loop, different defaults."""
    from lmforge.config import load_config, read_yaml
    from lmforge.rundir import WEIGHTS, read_run_config
    from lmforge.tasks import registry
    from lmforge.train.checkpoint import find_resume
    from lmforge.train.loop import train  # refuses a run directory that already holds a run

    overrides = _overrides(args)
    finetune = args.command == "finetune"
    base = None
    if finetune:
        base = finetune_base(read_yaml(args.config) if args.config else {})
        given = sorted({*(f"model.{k}" for k in base.get("model") or {}), *(k for k in overrides if k.startswith("model."))})
        if given and not args.resume:
            raise UserError(f"finetune: {given[0]}: the model's shape is the pretrained one's (finetune.init_from); "
                            "expected no model section (the body's dropout: finetune.dropout)")
    # When resuming, this first reading only locates the run: the overrides may complete the saved
    # config (e.g. a longer train.max_steps) and are checked against it below, not against defaults.
    task = overrides.get("task", (base or {}).get("task"))
    if finetune and task not in registry.names("finetune"):
        raise UserError(f"finetune: task = {task} is not a fine-tuning task; expected one of "
                        f"{', '.join(registry.names('finetune'))} "
                        "(pre-training: lmforge pretrain)")
    cfg = load_config(None if finetune else args.config, overrides, base=base, validate=not args.resume)
    resume = None
    if args.resume:
        run_dir, resume = find_resume(args.resume, Path(cfg.log.out_dir), Path(cfg.log.run_dir) if cfg.log.run_dir else None)
        if resume is None and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it
            print(f"lmforge: --resume {args.resume}: {run_dir} holds no checkpoint to resume; starting the run from step 0")
        if (run_dir / "config.yaml").is_file() and not args.config:
            base = read_run_config(run_dir)
        cfg = load_config(None if finetune or base else args.config, {**overrides, "log.run_dir": str(run_dir)},
                          base=base)
    result = train(cfg, resume)
    if not result.is_main:  # under torchrun rank 0 reports
        return 0
    if result.text:
        print(result.text)
    print(f"\nrun directory: {result.run_dir}")
    weights = result.run_dir / WEIGHTS
    if weights.is_file():
        print(f"weights:       {weights} (best val {result.metric} {result.best:.4f})")
    else:  # no evaluation gave a finite score
        print(f"weights:       none saved: no evaluation scored a finite val {result.metric}")
    if result.plot:
        print(f"plot:          {result.plot}")
    for line in result.tracked:  # tensorboard --logdir ..., wandb sync ..., the MLflow run
        print(line)
    if weights.is_file():
        _print_next_steps(cfg, result.run_dir)
    return 0


def _print_next_steps(cfg, run_dir: Path) -> None:
    """The commands that use what the task trained, as its registry entry says; export where the model has a
    Hugging Face layout."""
    from lmforge.hf.layouts import check_exportable
    from lmforge.runs import chat_template
    from lmforge.tasks import registry

    spec = registry.spec(cfg.task)
    if spec.endpoint == "generate":
        chat = " --chat" if chat_template(run_dir) is not None else ""
        print(f"generate:      lmforge generate --checkpoint {run_dir}{chat} --prompt \"...\"")
    if spec.endpoint == "translate":
        print(f"translate:     lmforge translate --checkpoint {run_dir} < INPUT > OUTPUT")
    if spec.finetune:
        print(f"evaluate:      lmforge evaluate --checkpoint {run_dir} --data FILE")
        print(f"predict:       lmforge predict --checkpoint {run_dir} --input FILE --output OUT.jsonl")
    try:
        check_exportable(cfg, run_dir)
        print(f"export:        lmforge export {run_dir} OUT_DIR   (a Hugging Face folder; --format onnx: onnxruntime)")
    except UserError:  # no layout: a command that would refuse is no next step
        pass


def _need_finetuned(checkpoint: str, task: str | None, command: str) -> None:
    """Refuse a run that is not fine-tuned; task None: not known before loading (a Hugging Face folder)."""
    from lmforge.tasks import registry

    spec = registry.spec(task) if task is not None else None
    if spec is not None and not spec.finetune:
        hint = ("; for a translation run: lmforge translate --input SOURCES --reference TARGETS"
                if spec.endpoint == "translate" else "")
        raise UserError(f"{command}: {checkpoint} holds a {task} model; {command} takes a fine-tuned run "
                        f"({', '.join(registry.names('finetune'))}){hint}")


def _finetuned_run(checkpoint: str, device_name: str, command: str):
    """(model, task ready for inference, config) of a fine-tuned run."""
    from lmforge.rundir import task_before_loading

    # the wrong kind of run is refused from its config.yaml, before torch and the model load (seconds)
    _need_finetuned(checkpoint, task_before_loading(checkpoint), command)
    from lmforge.runs import load_run, run_dir_of
    from lmforge.tasks import make_task
    from lmforge.train.device import pick_device

    device = pick_device(device_name, f"{command}: --device")
    model, tok, cfg = load_run(checkpoint, device)
    _need_finetuned(checkpoint, cfg.task, command)
    task = make_task(cfg)
    task.prepare_inference(tok, run_dir_of(Path(checkpoint)))
    return model, task, cfg


def cmd_evaluate(args) -> int:
    import json

    from lmforge.data.labelled import read_examples
    from lmforge.io import atomic_text, new_folders

    model, task, cfg = _finetuned_run(args.checkpoint, args.device, "evaluate")
    examples = read_examples(args.data, cfg.task, cfg.finetune)
    if task.labels is not None:  # an unknown label is reported with its line before any work
        for e in examples:
            for label in (e.label if isinstance(e.label, list) else [e.label]):
                task.labels.index(label, e, args.data)
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval_{Path(args.data).stem}.json"
    # beside the report, never the run's own confusion.png: report.html shows that one as the dev set's
    confusion = out.with_name(f"{out.stem}_confusion.png") if args.confusion else None
    with new_folders(out):  # the report and the picture beside it, or neither and no folder made for them
        full, text = task.report(model, examples, args.data, confusion)
        try:
            atomic_text(out, json.dumps({"data": str(args.data), **full}, indent=2, default=float) + "\n")
        except BaseException:
            if confusion is not None:
                confusion.unlink(missing_ok=True)
            raise
    print(text)
    print(f"report: {out}")
    if confusion is not None and confusion.is_file():
        print(f"confusion matrix: {confusion}")
    print("RESULT " + " ".join(f"{k}={full[k]:.4f}" for k in task.result_metrics()))
    return 0


def cmd_predict(args) -> int:
    import json

    from lmforge.data.labelled import read_examples

    model, task, cfg = _finetuned_run(args.checkpoint, args.device, "predict")
    examples = read_examples(args.input, cfg.task, cfg.finetune, require_labels=False)
    records = task.predict(model, examples, args.input)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.output in (None, "-"):
        sys.stdout.write(lines)
    else:
        from lmforge.io import atomic_text

        atomic_text(Path(args.output), lines, parents=True)
        print(f"{len(records)} predictions written to {args.output}", file=sys.stderr)
    return 0


def _input_lines(path: str | None) -> list[str]:
    """The lines of a UTF-8 file, or of standard input when path is None or '-'."""
    from lmforge.data.formats import decoded_lines

    if path not in (None, "-"):
        if not Path(path).is_file():
            raise UserError(f"{path}: no such file; expected text, one sentence per line")
        return [line.rstrip("\r\n") for _, line in decoded_lines(Path(path))]
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"<stdin>:{line}: not valid UTF-8 (byte {data[e.start]:#04x}); expected UTF-8 text") from None
    return text.splitlines()


def _need_translation(checkpoint: str, task: str | None) -> None:
    """Refuse a run that does not translate; task None: not known before loading (a Hugging Face folder)."""
    from lmforge.tasks import registry

    spec = registry.spec(task) if task is not None else None
    if spec is not None and spec.endpoint != "translate":
        hint = (" (a span run is pre-trained only: train translation from it with seq2seq.init_from)"
                if spec.model == "encoder_decoder" else " (for a clm run: lmforge generate)" if spec.endpoint == "generate"
                else "")
        raise UserError(f"translate: {checkpoint} holds a {task} model; expected a seq2seq run{hint}")


def cmd_translate(args) -> int:
    from lmforge.rundir import task_before_loading

    _need_translation(args.checkpoint, task_before_loading(args.checkpoint))  # before torch loads (seconds)
    from lmforge.generate import translate
    from lmforge.metrics import translation_scores
    from lmforge.runs import load_run
    from lmforge.tasks.seq2seq import source_tokenizer
    from lmforge.train.device import pick_device

    device = pick_device(args.device, "translate: --device")
    model, tok, cfg = load_run(args.checkpoint, device)
    _need_translation(args.checkpoint, cfg.task)
    sc = cfg.seq2seq
    sources = _input_lines(args.input)
    references = _input_lines(args.reference) if args.reference else None
    if references is not None and len(references) != len(sources):
        raise UserError(f"translate: --reference {args.reference} has {len(references)} lines and the input "
                        f"{len(sources)}; expected one reference per input line")
    beam = sc.beam_size if args.beam is None else args.beam
    penalty = sc.length_penalty if args.length_penalty is None else args.length_penalty
    ratio = sc.max_length_ratio if args.max_length_ratio is None else args.max_length_ratio
    hypotheses = translate(model, tok, sources, beam_size=beam, length_penalty=penalty, max_length_ratio=ratio,
                           batch_size=args.batch_size,
                           use_cache=not args.no_cache, source_tokenizer=source_tokenizer(Path(args.checkpoint)))
    text = "".join(h + "\n" for h in hypotheses)
    if args.output in (None, "-"):
        sys.stdout.write(text)
    else:
        from lmforge.io import atomic_text

        atomic_text(Path(args.output), text, parents=True)
    if references is not None:
        scores, signatures = translation_scores(hypotheses, references, args.tokenize or sc.bleu_tokenize)
        print(f"BLEU {scores['bleu']:.2f} ({signatures['bleu']})\nchrF {scores['chrf']:.2f} ({signatures['chrf']})\n"
              f"RESULT bleu={scores['bleu']:.2f} chrf={scores['chrf']:.2f} beam={beam}", file=sys.stderr)
    return 0


def cmd_tokenizer_train(args) -> int:
    from lmforge.data.formats import corpus_files, read_corpus, resolve_format
    from lmforge.data.tokenizer import check_vocab_size, save_tokenizer, smallest_vocab, train_tokenizer

    path = Path(args.input)
    fmt = resolve_format(path, args.format)
    files = corpus_files(path, fmt, args.extensions, "--extensions")
    specials = [t for t in args.special_tokens.split(",") if t]
    where = "tokenizer train: --vocab-size"
    check_vocab_size(args.kind, args.vocab_size, smallest_vocab(args.kind, specials), where)  # before the work
    tok = train_tokenizer((t for t, _ in read_corpus(path, fmt, args.text_field, files)), args.kind, args.vocab_size,
                          specials, args.lowercase)
    check_vocab_size(args.kind, args.vocab_size, tok.get_vocab_size(), where)  # wordpiece: the corpus's characters
    out = Path(args.out) / "tokenizer.json"
    save_tokenizer(tok, out, parents=True)
    print(f"{args.kind} tokenizer with {tok.get_vocab_size()} tokens written to {out}")
    return 0


def _need_generation(checkpoint: str, task: str | None) -> None:
    """Refuse a run that does not generate text; task None: not known before loading (a Hugging Face folder)."""
    from lmforge.tasks import registry

    spec = registry.spec(task) if task is not None else None
    if spec is not None and spec.endpoint != "generate":
        other = "lmforge translate" if spec.endpoint == "translate" else "lmforge predict" if spec.finetune else ""
        raise UserError(f"generate: {checkpoint} holds a model of task {task}; generating text needs a "
                        f"causal language model (task clm) or one fine-tuned from it (task sft)"
                        f"{f'; for this run use {other}' if other else ''}")


def cmd_generate(args) -> int:
    from lmforge.rundir import task_before_loading

    _need_generation(args.checkpoint, task_before_loading(args.checkpoint))  # before torch loads (seconds)
    import torch

    from lmforge.generate import check_seed, generate_text
    from lmforge import chat
    from lmforge.runs import INFERENCE_DTYPES, chat_template, end_token_ids, load_run
    from lmforge.train.device import pick_device

    check_seed(args.seed, args.num_samples, "generate: --seed")
    device = pick_device(args.device, "generate: --device")
    model, tok, cfg = load_run(args.checkpoint, device, INFERENCE_DTYPES[args.dtype])
    end_ids = end_token_ids(args.checkpoint)  # an imported chat model's own end of turn
    _need_generation(args.checkpoint, cfg.task)
    prompt, shown = args.prompt, args.prompt
    if args.chat:  # the prompt as a user's turn, then the assistant's opening: the answer alone is printed
        found = chat_template(args.checkpoint, args.chat_template)
        if found is None:
            raise UserError(f"chat: {args.checkpoint}: the model has no chat template; name one "
                            "(--chat-template chatml)")
        template, tokens = found
        messages = chat.check_messages([{"role": "user", "content": args.prompt}], "generate: --prompt")
        prompt = tok.encode(chat.render(template, messages, True, tokens, "generate: --chat"),
                            add_special_tokens=False).ids
        shown = ""
    elif args.chat_template:
        raise UserError("generate: --chat-template applies with --chat")
    for i in range(args.num_samples):
        gen = torch.Generator(device=device).manual_seed(args.seed + i)
        text = generate_text(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                             stop=args.stop, generator=gen, use_cache=not args.no_cache, end_ids=end_ids)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(shown + text)
    return 0


def cmd_import(args) -> int:
    from lmforge.hf.export import import_hf

    imported = import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir}: {imported.summary()}")
    for note in imported.notes:
        print(f"note: {note}")
    print(f"run directory: {args.out}")
    _print_next_steps(imported.config, Path(args.out))
    return 0


def cmd_export(args) -> int:
    if args.format == "onnx":
        return _export_onnx(args)
    if args.quantize:
        raise UserError(f"export: --quantize {args.quantize} applies to --format onnx (an ONNX graph for "
                        f"onnxruntime); a Hugging Face folder (--format {args.format}) is written in fp32")
    from lmforge.hf.layouts import check_exportable
    from lmforge.rundir import config_before_loading

    saved = config_before_loading(args.run)  # a run directory's refusals come before torch and the model load
    if saved is not None:
        check_exportable(saved, args.run, args.format, args.merge)
    from lmforge.hf.export import ADAPTER_DIR, export_hf

    hf_cfg = export_hf(args.run, args.out, args.format, merge=args.merge)
    cls = hf_cfg["architectures"][0]
    if (Path(args.out) / "modules.json").is_file():  # the sentence-transformers layout (hf/sentence.py)
        print(f"exported {args.run} as a sentence-transformers model ({cls}, its pooling, a Dense head with "
              f"{len(hf_cfg['id2label'])} outputs) to {args.out}")
        print(f"load it:  sentence_transformers.SentenceTransformer(\"{args.out}\").encode(texts) gives the logits")
        print(f"          (transformers alone: AutoModel, the pooling and the head, as {Path(args.out) / 'README.md'} shows)")
        return 0
    print(f"exported {args.run} as {cls} ({hf_cfg['model_type']}) to {args.out}")
    base = f"transformers.{cls}.from_pretrained(\"{args.out}\")"
    adapter = Path(args.out) / ADAPTER_DIR
    if adapter.is_dir():  # the fine-tuned model is the base with its adapter, not the base alone
        print(f"load it:  peft.PeftModel.from_pretrained({base}, \"{adapter}\")")
        print("          (or export with --merge for one plain model)")
    else:
        print(f"load it:  {base}")
    if hf_cfg.get("is_encoder_decoder"):  # generation_config.json holds the run's beam size and length penalty
        print(f"translate: model.generate(**tokenizer(texts, return_tensors=\"pt\", padding=True)) decodes as "
              f"lmforge translate does (tokenizer: transformers.AutoTokenizer.from_pretrained(\"{args.out}\"))")
    return 0


def _export_onnx(args) -> int:
    from lmforge.hf.onnx import export_onnx

    info = export_onnx(args.run, args.out, args.quantize)
    files = " and ".join(info["files"].values())
    print(f"exported {args.run} as an ONNX {info['graph']} graph ({files}) to {args.out}")
    print(f"run it:   onnxruntime.InferenceSession(\"{Path(args.out) / info['files']['float32']}\"); its inputs and "
          f"outputs in {Path(args.out) / 'onnx_config.json'}")
    return 0


def cmd_serve(args) -> int:
    import os

    from lmforge.config import ServeLimits
    from lmforge.rundir import check_serves, task_before_loading

    check_serves(args.run, task_before_loading(args.run))  # before torch and the model load (seconds)
    from lmforge.serve import serve

    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    api_key = args.api_key if args.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    serve(args.run, args.host, args.port, args.device, args.threads, batching=not args.no_batching,
          log_requests=args.log_requests, limits=limits, dtype=args.dtype, api_key=api_key)
    return 0


def cmd_report(args) -> int:
    from lmforge.report import write_report

    out = write_report(Path(args.run), Path(args.out) if args.out else None)
    print(f"report: {out}")
    return 0


def cmd_runs(args) -> int:
    from lmforge.report import format_runs, list_runs

    print(format_runs(list_runs(Path(args.dir))))
    return 0


WORKFLOW = """a first session:
  lmforge pretrain                                   a small GPT on the embedded King James Bible (~4 min)
  lmforge generate --checkpoint runs/RUN --prompt "And God said"
  lmforge finetune --config configs/finetune-sst2.yaml --finetune.init_from BASE
                                                     fine-tune a pretrained run or Hugging Face folder
  lmforge predict --checkpoint runs/RUN --input FILE label a file (JSONL out)
  lmforge serve runs/RUN                             answer HTTP requests (http://127.0.0.1:8000/docs)
  lmforge runs      lmforge report runs/RUN          compare runs; one HTML page about a run
recipes: configs/*.yaml   docs: docs/*.md"""


def build_parser(help_task: str | None = None) -> argparse.ArgumentParser:
    """help_task: the task (or ALL_TASKS) whose config options `pretrain|finetune --help` lists (_help_task)."""
    from lmforge.config import (BLEU_TOKENIZERS, CORPUS_FORMATS, TOKENIZER_KINDS, DataConfig,  # light: no torch
                                Seq2SeqConfig, ServeLimits)
    from lmforge.fields import between, ge, gt, nonempty, seed_range, temperature_range, top_p_range
    from lmforge.hf.arch import EXPORT_FORMATS, ONNX_QUANTIZE

    parser = Parser(prog="lmforge", description="Train Transformer models in practice: from raw text to a trained, "
                    "evaluated, exported and served model.", epilog=WORKFLOW, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND",
                                title="commands (lmforge COMMAND --help for each)")

    p = sub.add_parser("pretrain", aliases=["train"], help="pre-train a model from raw text (default: a small GPT on the "
                       "King James Bible); train any task from a recipe (e.g. translation: task seq2seq)",
                       description="Pre-train a model. With no options: a small GPT on the embedded King James Bible "
                       "in about 4 minutes on a laptop CPU. `lmforge train` is the same command, for tasks that are "
                       "not pre-training (seq2seq).", allow_abbrev=False)
    p.add_argument("--resume", metavar="auto|RUN|CKPT",
                   help="continue a run exactly: auto = the newest good checkpoint of --log.run_dir or of the newest run")
    _config_options(p, task=help_task)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a pretrained model (a run or a Hugging Face folder) on labelled data",
                       description="Fine-tune a pretrained model on labelled data: classify, regress, multilabel, tag "
                       "(NER) or sft. Starts from fine-tuning defaults (lr 5e-5, linear decay, batch 32, weight decay "
                       "0.01, 3 epochs); a recipe or the options below override them. Needs --finetune.init_from and "
                       "--finetune.train.", allow_abbrev=False)
    p.add_argument("--resume", metavar="auto|RUN|CKPT", help="continue a run exactly (as for pretrain)")
    _config_options(p, finetune_base({}), help_task)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a fine-tuned run on a labelled file and print its report",
                       description="Evaluate a fine-tuned run on a labelled file in the format of its training data. "
                       "Prints the report; writes it as JSON; the last line is RESULT <metric>=<value> ...",
                       allow_abbrev=False)
    _checkpoint(p, "a fine-tuned run")
    p.add_argument("--data", required=True, metavar="FILE", help="a labelled file, in the same format as the run's "
                   "training data")
    p.add_argument("--out", metavar="FILE", help="where to write the JSON report [default: RUN/eval_<data name>.json]")
    p.add_argument("--confusion", action="store_true", help="also draw the confusion matrix beside the report, as OUT_confusion.png (classify)")
    _device(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="label a file with a fine-tuned run: JSONL out",
                       description="Predict with a fine-tuned run: the input file is in the run's training format "
                       "(labels optional); each output line is a JSON object with the label and class probabilities, "
                       "the value, the labels, the tagged words, the generated response or the reward model's score.",
                       allow_abbrev=False)
    _checkpoint(p, "a fine-tuned run")
    p.add_argument("--input", required=True, metavar="FILE", help="the file to label, in the run's training format")
    p.add_argument("--output", metavar="FILE", help="the JSONL file to write [default: standard output]")
    _device(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("translate", help="translate text, one sentence per line, with a seq2seq run",
                       description="Translate with a seq2seq run: lines in (a file or standard input), detokenised "
                       "translations out, one per line, in the same order. With --reference, BLEU and chrF (sacrebleu, "
                       "signatures printed) go to standard error.", allow_abbrev=False)
    _checkpoint(p, "a seq2seq run")
    p.add_argument("--input", metavar="FILE", help="the file to translate [default: standard input]")
    p.add_argument("--output", metavar="FILE", help="where to write the translations [default: standard output]")
    _ranged(p, "--beam", int, _check_of(Seq2SeqConfig, "beam_size"), "beam width; 1 = greedy", metavar="N",
            shown="the run's seq2seq.beam_size")
    _ranged(p, "--length-penalty", float, _check_of(Seq2SeqConfig, "length_penalty"), "rank beams by "
            "log-probability / length^A", metavar="A", shown="the run's seq2seq.length_penalty")
    _ranged(p, "--max-length-ratio", float, _check_of(Seq2SeqConfig, "max_length_ratio"), "at most R times the "
            "source's tokens, plus 10", metavar="R", shown="the run's seq2seq.max_length_ratio")
    _ranged(p, "--batch-size", int, gt(0), "sentences decoded together", default=64, metavar="N")
    p.add_argument("--reference", metavar="FILE", help="reference translations, one per input line: print BLEU and chrF")
    p.add_argument("--tokenize", choices=BLEU_TOKENIZERS,
                   help="sacrebleu's BLEU tokenisation [default: the run's seq2seq.bleu_tokenize]")
    _device(p)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (for checking)")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("tokenizer", help="train a tokenizer on a corpus", allow_abbrev=False,
                       description="Tokenizers (pretrain trains one on its corpus by itself; this is for sharing one "
                       "between runs: --data.tokenizer.path OUT/tokenizer.json).")
    tsub = p.add_subparsers(dest="action", required=True, parser_class=Parser, metavar="{train}")
    t = tsub.add_parser("train", help="train a tokenizer and write OUT/tokenizer.json", allow_abbrev=False,
                        description="Train a char, byte-level BPE or WordPiece tokenizer on a corpus (Hugging Face "
                        "tokenizers) and write OUT/tokenizer.json.")
    t.add_argument("--input", required=True, metavar="PATH", help="a text file, a folder of text files (--extensions) "
                   "or a .jsonl file")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    t.add_argument("--kind", default="bpe", choices=TOKENIZER_KINDS, help="tokenizer model [default: bpe]")
    # its range depends on --kind and --special-tokens: cmd_tokenizer_train checks it, naming the smallest size
    t.add_argument("--vocab-size", type=_checked(int), default=8000, metavar="N", help="vocabulary size, the alphabet "
                   "(bpe: the 256 bytes) and the special tokens included [default: 8000]")
    t.add_argument("--special-tokens", default="<|endoftext|>", metavar="LIST",
                   help="comma-separated special tokens [default: <|endoftext|>]")
    t.add_argument("--lowercase", action="store_true", help="lower-case the text first")
    t.add_argument("--format", default="auto", choices=CORPUS_FORMATS,
                   help="input format [default: auto, by the name]")
    t.add_argument("--text-field", default="text", metavar="NAME", help="JSONL field holding the text [default: text]")
    endings = _check_of(DataConfig, "extensions")
    t.add_argument("--extensions", type=_checked_list(endings), default=[".txt"], metavar="LIST",
                   help=f"a folder: the comma-separated endings of the file names it reads ({endings[1]}) "
                   "[default: .txt]")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("generate", help="continue a prompt with a causal language model (clm or sft run)",
                       description="Continue a prompt with a causal language model: sampled (temperature, top-k, "
                       "top-p) or greedy (--temperature 0), with a KV cache. The prompt and its continuation go to "
                       "standard output; with --chat the prompt is a user's message and the answer goes there. "
                       "Generation stops at the model's own end tokens (an imported chat model's end of turn).",
                       allow_abbrev=False)
    _checkpoint(p, "a clm or sft run")
    p.add_argument("--prompt", default="", help="text to continue [default: the start of a document]")
    p.add_argument("--chat", action="store_true", help="the prompt is a user's message, put in the model's chat "
                   "template; prints the answer")
    p.add_argument("--chat-template", metavar="NAME", help="with --chat: a named template (chatml) in place of "
                   "the model's own")
    _ranged(p, "--max-new-tokens", int, gt(0), "at most N new tokens, bounded by the model's context", default=200,
            metavar="N")
    _ranged(p, "--temperature", float, temperature_range(), "0 = greedy", default=0.8, metavar="T")
    _ranged(p, "--top-k", int, ge(0), "sample from the K most likely tokens; 0 = all", default=0, metavar="K")
    _ranged(p, "--top-p", float, top_p_range(), "nucleus sampling mass; 1 = off", default=1.0, metavar="P")
    p.add_argument("--stop", action="append", type=_checked(str, nonempty()), metavar="TEXT",
                   help="stop before this string (repeatable; not empty)")
    _ranged(p, "--num-samples", int, gt(0), "how many samples", default=1, metavar="N")
    _ranged(p, "--seed", int, seed_range(), "sampling seed; sample i uses SEED + i", default=0)
    _device(p)
    _dtype(p)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (for checking)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("import", help="convert a Hugging Face model folder (BERT, GPT-2, Llama, Mistral, "
                       "Qwen2, Qwen3) into a run directory",
                       description="Convert a Hugging Face model folder (config.json, weights, tokenizer files) into an "
                       "lmforge run directory. Commands that take --checkpoint also read such a folder directly.",
                       allow_abbrev=False)
    p.add_argument("hf_dir", metavar="HF_DIR", help="a folder written by transformers' save_pretrained")
    p.add_argument("out", metavar="OUT", help="the run directory to write (must not exist, or be empty)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a run as a Hugging Face model folder (GPT-2, Llama, Qwen2, Qwen3 or BERT "
                       "layout; BART for an encoder-decoder) or an ONNX graph",
                       description="Write a run as a Hugging Face model folder that transformers' from_pretrained "
                       "loads: config.json, model.safetensors and the tokenizer; a fine-tuned run gets its task's "
                       "head class (e.g. BertForSequenceClassification), a LoRA run a PEFT adapter folder. With "
                       "--format onnx: model.onnx for onnxruntime (a decoder with its KV cache as inputs and "
                       "outputs), the tokenizer and onnx_config.json; --quantize int8 adds model.int8.onnx.",
                       allow_abbrev=False)
    p.add_argument("run", metavar="RUN", help="a run directory, one of its checkpoints, or a Hugging Face folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (must not exist, or be empty)")
    p.add_argument("--format", default="auto", choices=EXPORT_FORMATS,
                   help="the Hugging Face layout; auto = bert for mlm, the first of gpt2, llama, qwen2, qwen3 that "
                   "fits for clm, BART for seq2seq and span; onnx = an ONNX graph for onnxruntime (docs/onnx.md) "
                   "[default: auto]")
    p.add_argument("--merge", action="store_true", help="a LoRA run: fold the adapter into the weights and write "
                   "one plain model [default: the base and the adapter in the peft library's format; --format "
                   "onnx always merges]")
    p.add_argument("--quantize", choices=ONNX_QUANTIZE, help="--format onnx: also write model.int8.onnx, "
                   "onnxruntime's dynamic int8 quantisation of the weights [default: fp32 only]")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="answer HTTP requests with a trained run (FastAPI; OpenAPI schema at /docs)",
                       description="Serve a run or a Hugging Face folder over HTTP. The endpoint follows the model's "
                       "task: POST /v1/generate (clm, sft; stream: true for server-sent events), /v1/classify "
                       "(classify, regress, multilabel), /v1/tag (tag), /v1/translate (seq2seq), /v1/score "
                       "(reward); always GET /health and /metadata, and the OpenAPI schema at /openapi.json. "
                       "Requests that arrive while the model "
                       "is busy are answered together in one forward pass. Ctrl-C or SIGTERM finishes the requests "
                       "in flight, then stops.", allow_abbrev=False)
    p.add_argument("run", metavar="RUN_OR_HF_DIR", help="a run directory, one of its checkpoints, or a Hugging Face folder")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDR", help="address to listen on [default: 127.0.0.1, this machine only]")
    _ranged(p, "--port", int, between(1, 65535), "TCP port", default=8000, metavar="N")
    _device(p)
    _dtype(p)
    _ranged(p, "--threads", int, gt(0), "the model's CPU threads", metavar="N",
            shown="all cores but one, which is left to the HTTP loop")
    for f in dataclasses.fields(ServeLimits):  # the limits are declared once, in config.py
        _ranged(p, f"--{f.name.replace('_', '-')}", int, f.metadata["check"], f.metadata["doc"], default=f.default,
                metavar="N")
    p.add_argument("--api-key", metavar="KEY", help="require the header Authorization: Bearer KEY on every endpoint but "
                   "/health [default: the environment variable LMFORGE_API_KEY, else no key]")
    p.add_argument("--no-batching", action="store_true", help="one request per forward pass (for comparison)")
    p.add_argument("--log-requests", action="store_true", help="print one access-log line per request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="write one self-contained HTML page about a run",
                       description="Write RUN/report.html (or --out): the config, loss / learning-rate / throughput "
                       "curves, the evaluation tables, the confusion matrix or sample translations. The page has no "
                       "outside links: mail it or open it offline.", allow_abbrev=False)
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--out", metavar="FILE", help="the HTML file to write [default: RUN/report.html]")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="list the runs under a folder with their main metric, best first",
                       description="List every run directory under DIR (searched recursively) with its task, main "
                       "metric (dev accuracy / F1 / BLEU, or validation loss), steps and date, best first within "
                       "each task.", allow_abbrev=False)
    p.add_argument("dir", metavar="DIR", nargs="?", default="runs", help="where the runs are [default: runs]")
    p.set_defaults(func=cmd_runs)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"lmforge: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    try:
        argv = sys.argv[1:] if argv is None else argv
        if not argv:
            raise UserError("no command given; start with `lmforge pretrain` (a small GPT in about 4 minutes) "
                            "or see lmforge --help")
        args = build_parser(_help_task(argv)).parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a write the code did not expect to fail: a full or read-only disk is still one line
        from lmforge.io import write_fault

        fault = write_fault(Path(e.filename or "."), e)
        if fault is None:
            raise
        print(f"lmforge: error: {fault}", file=sys.stderr)
        return fault.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

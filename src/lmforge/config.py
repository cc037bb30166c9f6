"""The configuration: a tree of dataclasses, read from YAML plus dotted command-line overrides.

Every field is declared with `opt(default, doc, check=...)`; the doc becomes the `--help` text and
the check is run before any work starts. Why not jsonargparse: we want every mistake reported as a
single line naming the key path, the value and what is accepted, and presets resolved before
validation; that is a hundred lines here and hard to bend a general parser into.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import UserError
from lmforge.io import atomic_text
from lmforge.fields import (between, choices_of, device_name, file_endings, fraction_open, ge, gt, nonempty, opt,
                            section, seed_range)
from lmforge.model.config import LLAMA3_ROPE_FIELDS, PRESETS, ModelConfig
from lmforge.tasks import registry


class ConfigError(UserError):
    pass


# -- the tree --------------------------------------------------------------------------------------
# ModelConfig lives beside the model; the rest is here.

TOKENIZER_KINDS = ("char", "bpe", "wordpiece")
CORPUS_FORMATS = ("auto", "txt", "folder", "jsonl")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # train/trackers.py


@dataclass
class TokenizerConfig:
    kind: str = opt("bpe", "tokenizer to train when no `path` is given", choices=TOKENIZER_KINDS)
    vocab_size: int = opt(4096, "vocabulary size for bpe/wordpiece (char: upper bound)", check=gt(1))
    path: str | None = opt(None, "an existing tokenizer.json (or a run directory) to use instead of training one")
    special_tokens: list = opt(["<|endoftext|>"], "special tokens added to the vocabulary")
    lowercase: bool = opt(False, "lower-case text before tokenising")


@dataclass
class DataConfig:
    path: str | None = opt(None, "a text file, a folder of text files (see extensions) or a .jsonl file (default: the "
                           "embedded King James Bible)")
    format: str = opt("auto", "how to read `path`", choices=CORPUS_FORMATS)
    extensions: list[str] = opt([".txt"], "a folder corpus: the endings of the file names it reads, searched "
                                "recursively, e.g. .py,.md", check=file_endings())
    text_field: str = opt("text", "the field holding the text in each .jsonl line")
    val_fraction: float = opt(0.1, "the last fraction of the corpus kept for validation", check=fraction_open())
    cache_dir: str = opt(".cache/lmforge/tokens", "where encoded token stores are kept and reused")
    pack: bool = opt(False, "clm: windows start at document starts and hold whole documents or pieces of them, each "
                     "attending only to itself with positions from 0 (documents end with the end-of-text token)")
    tokenizer: TokenizerConfig = section(TokenizerConfig, "tokenizer")


OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adagrad", "muon")
SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")
PARALLEL = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    batch_size: int = opt(16, "sequences per micro-batch", check=gt(0))
    grad_accum: int = opt(1, "micro-batches per optimizer step", check=gt(0))
    max_steps: int = opt(500, "optimizer steps (the schedule's length, unless train.schedule_steps says otherwise)",
                         check=gt(0))
    max_time: float = opt(0.0, "stop (with a checkpoint) after this many seconds of training; 0 = no limit", check=ge(0))
    optimizer: str = opt("adamw", "optimizer; muon = Muon on hidden weight matrices + AdamW on the rest", choices=OPTIMIZERS)
    lr: float = opt(3e-3, "peak learning rate (of the AdamW part when optimizer = muon)", check=gt(0))
    min_lr: float = opt(1e-4, "learning-rate floor; other groups keep the same ratio to their peak", check=ge(0))
    schedule: str = opt("cosine", "shape after warmup: wsd = warmup-stable-decay, inverse_sqrt = the original Transformer's",
                        choices=SCHEDULES)
    warmup_steps: int = opt(50, "linear warmup steps; one not below the schedule's steps is cut to a tenth of them "
                            "(rounded down, with a note)", check=ge(0))
    decay_fraction: float = opt(0.2, "wsd: the fraction of the post-warmup steps spent decaying", check=between(0, 1))
    schedule_steps: int = opt(0, "the schedule's horizon, where its decay ends; 0 = train.max_steps. A run records it "
                              "in config.yaml when it starts, so a resume with a larger max_steps keeps the schedule: "
                              "past the horizon linear, cosine and wsd stay at min_lr, constant at lr, and "
                              "inverse_sqrt decays on", check=ge(0))
    schedule_restart: bool = opt(False, "a resume whose max_steps reaches past the schedule's horizon starts a new "
                                 "schedule at the resume step instead: warmup_steps of warmup from lr / warmup_steps, "
                                 "then the schedule's decay to the new max_steps (recorded in schedule_restarts)")
    schedule_restarts: list[list[int]] = opt([], "the schedule's restarts as [step, horizon] pairs, which "
                                             "schedule_restart records: from each step a new warmup and decay ending "
                                             "at its horizon")
    weight_decay: float = opt(0.1, "decoupled weight decay (not applied to biases, norms, embeddings)", check=ge(0))
    beta1: float = opt(0.9, "Adam/AdamW beta1", check=between(0, 1))
    beta2: float = opt(0.95, "Adam/AdamW beta2; RMSprop's smoothing constant", check=between(0, 1))
    eps: float = opt(1e-8, "Adam/AdamW/RMSprop/Adagrad epsilon", check=gt(0))
    momentum: float = opt(0.9, "SGD and RMSprop momentum", check=between(0, 1))
    nesterov: bool = opt(False, "SGD: Nesterov momentum")
    dampening: float = opt(0.0, "SGD: momentum dampening", check=between(0, 1))
    muon_lr: float = opt(0.02, "Muon's peak learning rate for the hidden weight matrices", check=gt(0))
    muon_momentum: float = opt(0.95, "Muon's momentum (Nesterov)", check=between(0, 1))
    lr_scale: dict[str, float] = opt({}, "learning-rate multipliers by parameter-name pattern, e.g. {'head.*': 0.5} or head.*=0.5,blocks.0.*=0.1")
    layer_decay: float = opt(1.0, "layer-wise lr decay: layer i of L gets lr * layer_decay^(L + 1 - i), embeddings i = 0",
                             check=between(0, 1))
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off", check=ge(0))
    skip_nonfinite: int = opt(0, "a step whose loss or gradient norm is not finite (NaN, inf) stops the run (exit 3); "
                              "allow this many such steps to be skipped instead (not applied, logged)", check=ge(0))
    precision: str = opt("auto", "auto = bf16 autocast on CUDA with bf16 (else fp16 with loss scaling); on a CPU bf16 "
                         "where it has native bf16 and a timing shows the gain, else fp32; fp16 is CUDA only",
                         choices=("auto", "fp32", "bf16", "fp16"))
    tf32: bool = opt(True, "CUDA: fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa); false = "
                     "full fp32")
    compile: bool = opt(False, "torch.compile the model (falls back to eager with a warning)")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N", check=device_name())
    seed: int = opt(1337, "random seed for init, data order and dropout", check=seed_range())
    checkpoint_every: int = opt(200, "save a checkpoint every N steps (and at the end); 0 = only at the end", check=ge(0))
    keep_checkpoints: int = opt(2, "how many recent step checkpoints to keep", check=gt(0))
    parallel: str = opt("auto", "under torchrun: ddp = replicate the model, fsdp = shard it (FSDP2); auto = ddp "
                        "under torchrun, none otherwise (docs/distributed.md)", choices=PARALLEL)
    fsdp_cpu_offload: bool = opt(False, "fsdp: keep sharded parameters, gradients and optimizer state in CPU memory")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward pass: less "
                                         "memory for about a third more compute")


LOSS_NAMES = ("auto", "cross_entropy", "focal", "bce", "binary_focal", "mse", "mae", "huber", "smooth_l1", "hinge",
              "hinge_crammer_singer", "hinge_weston_watkins", "dpo", "ipo", "simpo", "bradley_terry")
# Which loss.* options each loss takes (the keyword arguments of its function in losses.py).
LOSS_OPTIONS = {
    "cross_entropy": ("label_smoothing", "z_loss", "softcap", "class_weights"),
    "focal": ("gamma", "class_weights"),
    "bce": ("pos_weight",),
    "binary_focal": ("gamma", "alpha"),
    "mse": (),
    "mae": (),
    "huber": ("delta",),
    "smooth_l1": ("delta",),
    "hinge": ("margin",),
    "hinge_crammer_singer": ("margin",),
    "hinge_weston_watkins": ("margin",),
    "dpo": ("beta", "label_smoothing"),
    "ipo": ("beta",),
    "simpo": ("beta", "margin", "label_smoothing"),
    "bradley_terry": (),
}


@dataclass
class LossConfig:
    name: str = opt("auto", "the loss; auto = the task's usual one (docs/losses-and-optimizers.md says which to pick)",
                    choices=LOSS_NAMES)
    label_smoothing: float = opt(0.0, "cross_entropy: mass spread evenly over all classes; dpo / simpo: the assumed "
                                 "chance that a pair's preference is flipped (conservative DPO, 0.1 is usual; < 0.5)",
                                 check=between(0, 1))
    z_loss: float = opt(0.0, "cross_entropy: weight of the z-loss z * logsumexp(logits)^2 (1e-4 is usual)", check=ge(0))
    softcap: float = opt(0.0, "cross_entropy: cap logits to c * tanh(logits / c); 0 = off (30 is usual)", check=ge(0))
    class_weights: list[float] | None = opt(None, "cross_entropy / focal: a weight per class (focal: its alpha)")
    pos_weight: list[float] | None = opt(None, "bce: a weight on the positive term per label (> 1 favours recall)")
    delta: float = opt(1.0, "huber / smooth_l1: where the loss turns from quadratic to linear", check=gt(0))
    margin: float = opt(1.0, "hinge losses: the margin; simpo: the target reward margin gamma (0.5-1.5 is usual)",
                        check=ge(0))
    beta: float = opt(0.1, "dpo / ipo / simpo: the strength of the preference; dpo: the KL penalty's inverse "
                      "temperature (0.1 is usual), ipo: 1 / (2 beta) is the target log-ratio gap, simpo: the reward "
                      "scale (2.0-2.5 is usual)", check=gt(0))
    gamma: float = opt(2.0, "focal / binary_focal: the focusing exponent; 0 = plain cross-entropy", check=ge(0))
    alpha: float | None = opt(0.25, "binary_focal: the weight of positives (negatives get 1 - alpha); null = none",
                              check=between(0, 1))
    chunked: bool = opt(True, "cross_entropy on an LM head: fused projection + loss in chunks when the logits are large")


@dataclass
class MLMConfig:
    mask_prob: float = opt(0.15, "fraction of tokens chosen as masked-LM targets", check=fraction_open())
    mask_token_prob: float = opt(0.8, "of the chosen tokens, the fraction replaced by [MASK]", check=between(0, 1))
    random_token_prob: float = opt(0.1, "of the chosen tokens, the fraction replaced by a random token (the rest stay)",
                                   check=between(0, 1))
    whole_word: bool = opt(False, "choose whole words: all pieces of a word are masked together")
    nsp: bool = opt(False, "next-sentence prediction: segment B follows A in half the examples, is random text otherwise")


LABELLED_FORMATS = ("auto", "csv", "tsv", "jsonl", "sst", "conll")


@dataclass
class FinetuneConfig:
    init_from: str | None = opt(None, "the pretrained model to start from: a run directory, a checkpoint or a Hugging "
                                "Face folder (its model section and tokenizer are used)")
    train: str | None = opt(None, "the labelled training file")
    dev: str | None = opt(None, "the labelled dev file; none = hold out `dev_fraction` of the training file")
    dev_fraction: float = opt(0.1, "the share of the training file held out as dev when no dev file is given",
                              check=fraction_open())
    format: str = opt("auto", "file format; auto = by extension (.csv, .tsv, .jsonl; .txt: sst for sentence tasks, "
                      "conll for tag)", choices=LABELLED_FORMATS)
    header: bool = opt(True, "csv/tsv: the first row names the columns; false = fields are column numbers from 0")
    text_field: str = opt("text", "the column / JSON field holding the text")
    pair_field: str | None = opt(None, "the column / JSON field holding the second sentence of a pair")
    label_field: str = opt("label", "the column / JSON field holding the label")
    label_separator: str = opt("|", "multilabel in csv/tsv: the separator between the labels in one cell")
    tag_column: int = opt(-1, "conll: the column holding the tag (the word is column 0; negative counts from the end)")
    prompt_field: str = opt("prompt", "sft: the JSON field holding the prompt")
    response_field: str = opt("response", "sft: the JSON field holding the response; reward: the answer a prediction "
                              "input scores")
    chosen_field: str = opt("chosen", "dpo / reward: the JSON field holding the preferred answer")
    rejected_field: str = opt("rejected", "dpo / reward: the JSON field holding the other answer")
    chat_template: str = opt("auto", "sft: the chat template conversations and prompt/response pairs are rendered "
                             "with; auto = the model's own (pairs of a model without one are joined plainly), "
                             "chatml, or a name the model's templates list")
    labels: list | None = opt(None, "the label set in order; none = the sorted labels of the training file")
    max_length: int = opt(128, "tokens per example, longer ones are cut (at most the model's context)", check=gt(1))
    epochs: float = opt(3.0, "passes over the training file (sets train.max_steps); 0 = train for train.max_steps",
                        check=ge(0))
    evals_per_epoch: int = opt(1, "dev evaluations per epoch (sets eval.every); 0 = use eval.every", check=ge(0))
    metric: str = opt("auto", "dev metric for early stopping and the kept best weights: auto = accuracy (classify), "
                      "pearson (regress), micro_f1 (multilabel), entity_f1 (tag), loss (sft), accuracy (reward); or "
                      "any metric the evaluation reports")
    body: str = opt("auto", "the pretrained body: auto = as init_from is (encoder for masked-LM / BERT models, decoder "
                    "for causal LMs)", choices=("auto", "encoder", "decoder"))
    pooling: str = opt("auto", "sentence representation: auto = pooler if the model has BERT's, else cls for an encoder "
                       "and last for a decoder", choices=("auto", "pooler", "cls", "mean", "last"))
    dropout: float | None = opt(None, "dropout inside the pretrained body for this run; none = the checkpoint's "
                                "model.dropout", check=between(0, 0.99))
    classifier_dropout: float = opt(0.1, "dropout before the task head", check=between(0, 0.99))
    thresholds: list[float] | None = opt(None, "multilabel: a decision threshold per label (default 0.5 each)")
    group_by_length: bool = opt(True, "batch examples of similar length together (less padding); not with "
                                "finetune.pack, whose rows have no padding to save")
    pack: bool = opt(False, "sft: a batch's examples share rows of up to max_length tokens, each attending only to "
                     "itself with positions from 0 (no padding between them; the same loss as padded rows)")


BLEU_TOKENIZERS = ("13a", "intl", "zh", "char", "none")


@dataclass
class Seq2SeqConfig:
    train: str | None = opt(None, "training pairs: a TSV of source<TAB>target lines, or the source side of two line-aligned files")
    train_target: str | None = opt(None, "the target side of line-aligned training files; none = `train` is a TSV")
    dev: str | None = opt(None, "dev pairs, as `train` (loss, BLEU and chrF at each evaluation)")
    dev_target: str | None = opt(None, "the target side of line-aligned dev files; none = `dev` is a TSV")
    init_from: str | None = opt(None, "a span-corruption or translation run to start from (its tokenizer and model shape "
                                "are used)")
    decoder_layers: int = opt(0, "decoder blocks; 0 = model.n_layer (the encoder's)", check=ge(0))
    source_vocab_size: int = opt(0, "0 = one joint BPE for both sides (one shared embedding); N = a source BPE of its "
                                 "own of N tokens (source_tokenizer.json, a separate encoder embedding)", check=ge(0))
    max_length: int = opt(128, "tokens per side (at most model.max_seq_len): longer training pairs are dropped, longer dev sources cut", check=gt(1))
    max_ratio: float = opt(3.0, "drop training pairs whose longer side has more than this times the tokens of the "
                           "shorter; 0 = keep all", check=ge(0))
    max_tokens: int = opt(4096, "tokens per batch (sentences x the longest side in it), batches of similar lengths; "
                          "0 = train.batch_size sentences", check=ge(0))
    beam_size: int = opt(5, "beam width of the final evaluation and of `lmforge translate`; 1 = greedy", check=gt(0))
    length_penalty: float = opt(1.0, "beam hypotheses are ranked by log-probability / length^this (0 = raw "
                                "log-probability, favouring short output)", check=ge(0))
    max_length_ratio: float = opt(1.5, "a translation has at most this times the source's tokens, plus 10", check=gt(0))
    eval_bleu: bool = opt(True, "translate the dev set (greedy) at each evaluation and keep the weights with the best BLEU")
    bleu_tokenize: str = opt("13a", "sacrebleu's tokenisation for BLEU: 13a (its default), intl, zh (Chinese), char, none",
                             choices=BLEU_TOKENIZERS)
    average_last: int = opt(1, "at the end, average the weights of the last k checkpoints and keep the average if it "
                            "scores better on dev; 1 = off (needs train.keep_checkpoints >= k)", check=gt(0))
    samples: int = opt(5, "sample translations printed beside their references at the end", check=ge(0))


@dataclass
class SpanConfig:
    noise_density: float = opt(0.15, "the share of each example's tokens that are corrupted", check=fraction_open())
    mean_span_length: float = opt(3.0, "the mean length of a corrupted span, in tokens", check=ge(1))


PEFT_METHODS = ("none", "lora", "adapter", "prefix")
BASE_DTYPES = ("none", "int8", "nf4")  # peft.base_dtype: how LoRA's frozen base is held (lmforge/quant.py)


@dataclass
class PeftConfig:
    method: str = opt("none", "parameter-efficient fine-tuning: lora, bottleneck adapters, prefix tuning; none = full",
                      choices=PEFT_METHODS)
    lora_rank: int = opt(8, "lora: rank r of the update B @ A", check=gt(0))
    lora_alpha: float = opt(16.0, "lora: the update is scaled by alpha / r", check=gt(0))
    lora_dropout: float = opt(0.0, "lora: dropout on the input of the update", check=between(0, 0.99))
    lora_targets: list = opt(["*.attn.qkv", "*.attn.proj"], "lora: linear layers to adapt, as fnmatch patterns on "
                             "module names (e.g. *.attn.qkv, *.mlp.up, *.mlp.down)")
    adapter_size: int = opt(64, "adapter: bottleneck width of the adapters after each attention and MLP", check=gt(0))
    prefix_length: int = opt(16, "prefix: learned key/value positions per layer", check=gt(0))
    freeze_embeddings: bool = opt(False, "freeze the token, position and segment embeddings")
    freeze_layers: int = opt(0, "freeze the bottom k Transformer blocks", check=ge(0))
    base_dtype: str = opt("none", "lora: hold the frozen Linear weights of the blocks quantised (QLoRA-style, through "
                          "torchao: pip install 'lmforge[quant]'): int8 (per-row, weight-only) or nf4 (4-bit); the "
                          "LoRA weights, embeddings, norms and head stay in fp32; none = as loaded",
                          choices=BASE_DTYPES)


@dataclass
class RobustConfig:
    adversarial: str = opt("none", "adversarial training on the embedding output: fgm (one step) or pgd (several)",
                           choices=("none", "fgm", "pgd"))
    epsilon: float = opt(0.1, "adversarial: the L2 norm of the perturbation of each example's embeddings (pgd: the radius "
                         "of its ball); 1.0 already stops MiniLM learning SST-2", check=gt(0))
    pgd_steps: int = opt(3, "pgd: ascent steps per training step", check=gt(0))
    pgd_alpha: float = opt(0.05, "pgd: the L2 norm of each ascent step", check=gt(0))
    augment: list = opt([], "text augmentation of training examples: any of delete, swap, mask")
    augment_prob: float = opt(0.5, "augmentation: the chance that a training example is augmented", check=between(0, 1))
    augment_rate: float = opt(0.1, "augmentation: the share of an augmented example's words affected",
                              check=between(0, 1))


@dataclass
class EvalConfig:
    every: int = opt(100, "evaluate every N steps (and at the end); 0 = only at the end", check=ge(0))
    batches: int = opt(4, "pre-training (clm, mlm, span): val batches per evaluation, spread over the val split; a "
                       "few follow the loss in about the time of one training step (forward passes only); 0 = the "
                       "whole split, a number to compare runs by. Fine-tuning and seq2seq score their whole dev set",
                       check=ge(0))
    batch_size: int = opt(0, "sequences per val batch; 0 = train.batch_size (a batch that trains fits in memory to "
                          "score)", check=ge(0))
    patience: int = opt(0, "stop after this many evaluations without improvement; 0 = never", check=ge(0))


@dataclass
class LogConfig:
    out_dir: str = opt("runs", "parent folder of run directories")
    run_dir: str | None = opt(None, "this run's directory (default: OUT_DIR/<time>-<task>)")
    every: int = opt(10, "log train metrics every N steps", check=gt(0))
    progress: bool = opt(True, "show a progress bar")
    trackers: list[str] = opt(["tensorboard"], "experiment trackers fed besides metrics.jsonl and curves.png: "
                              "tensorboard (RUN/tensorboard), wandb (Weights & Biases; offline in RUN/wandb unless "
                              "log.wandb_mode says otherwise), mlflow (log.mlflow_uri); [] = none. Replaces the "
                              "deprecated log.tensorboard", choices=TRACKERS,
                              check=(lambda v: len(set(v)) == len(v), "a list without repeats"))
    wandb_project: str = opt("lmforge", "W&B project of the run (log.trackers has wandb)", check=nonempty())
    wandb_mode: str = opt("offline", "W&B mode: offline writes RUN/wandb/offline-run-* (upload later with `wandb "
                          "sync`), online needs `wandb login` or WANDB_API_KEY, disabled writes nothing",
                          choices=("offline", "online", "disabled"))
    mlflow_uri: str = opt("", "MLflow tracking URI: a folder or file: URI (a file store), sqlite:///PATH.db (needs "
                          "SQLAlchemy and Alembic: pip install mlflow), http(s)://HOST:PORT (a tracking server); "
                          "empty = $MLFLOW_TRACKING_URI, else OUT_DIR/mlruns")
    mlflow_experiment: str = opt("lmforge", "MLflow experiment of the run (created if missing)", check=nonempty())
    log_weights: bool = opt(False, "also upload model.safetensors to W&B / MLflow at the end (config.yaml, "
                            "metrics.jsonl and curves.png always go)")
    samples: int = opt(3, "samples printed at the end of a language-model run", check=ge(0))
    sample_tokens: int = opt(120, "tokens per printed sample", check=gt(0))


@dataclass
class ServeLimits:
    """What `lmforge serve` refuses (a 4xx answer naming the field) and how long it waits for a client; its
    --max-* and timeout options are these fields."""

    max_input_tokens: int | None = opt(None, "refuse an input longer than this many tokens [None: the model's context]",
                                       check=gt(0))
    max_new_tokens: int = opt(256, "refuse a generation request asking for more new tokens", check=gt(0))
    max_body_bytes: int = opt(1 << 20, "refuse a larger request body (bytes)", check=gt(0))
    max_batch: int = opt(64, "refuse a request with more inputs", check=gt(0))
    read_timeout: int = opt(30, "close a connection that takes longer to send a request's head, or answer 408 to "
                            "one that takes longer to send its body (seconds)", check=gt(0))
    keep_alive: int = opt(5, "close a connection idle for this long between requests (seconds)", check=gt(0))


@dataclass
class Config:
    """Every default together is the embedded default job (`lmforge pretrain` with no options): a small
    GPT on the King James Bible, about 4 minutes of training on a 2-core CPU."""

    task: str = opt("clm", "what to train (tasks/registry.py): clm = causal LM (GPT), mlm = masked LM (BERT-style "
                    "encoder); fine-tuning: classify, regress, multilabel, tag (token classification), sft "
                    "(prompt/response); seq2seq = an encoder-decoder on parallel text (translation), span = T5 "
                    "span-corruption pre-training of an encoder-decoder", choices=registry.names)
    model: ModelConfig = section(ModelConfig, "model")
    data: DataConfig = section(DataConfig, "data")
    train: TrainConfig = section(TrainConfig, "training and optimizer")
    loss: LossConfig = section(LossConfig, "the loss")
    mlm: MLMConfig = section(MLMConfig, "masked-LM pre-training (task = mlm)")
    finetune: FinetuneConfig = section(FinetuneConfig, "fine-tuning data and head (tasks classify, regress, multilabel, tag, sft)")
    seq2seq: Seq2SeqConfig = section(Seq2SeqConfig, "encoder-decoder training and decoding (tasks seq2seq and span)")
    span: SpanConfig = section(SpanConfig, "span-corruption pre-training (task = span)")
    peft: PeftConfig = section(PeftConfig, "parameter-efficient fine-tuning")
    robust: RobustConfig = section(RobustConfig, "adversarial training and augmentation (classify, tag)")
    eval: EvalConfig = section(EvalConfig, "evaluation")
    log: LogConfig = section(LogConfig, "logging and outputs")

    def __post_init__(self):
        if self.loss.name == "auto":
            self.loss.name = registry.spec(self.task).losses[0]
        if self.eval.batch_size == 0:
            self.eval.batch_size = self.train.batch_size

    def validate(self) -> None:
        """Checks that involve more than one field."""
        m, t = self.model, self.train
        if not m.head_dim:  # the one way it stays 0: d_model / n_head is not whole
            raise ConfigError(f"config: model.d_model = {m.d_model} must be divisible by model.n_head = {m.n_head}")
        if m.n_head % m.n_kv_head:
            raise ConfigError(f"config: model.n_head = {m.n_head} must be a multiple of model.n_kv_head = {m.n_kv_head}")
        if m.pos == "rope" and m.head_dim % 2:
            raise ConfigError(f"config: model.pos = rope needs an even head size, got {m.head_dim}")
        if t.min_lr > t.lr:
            raise ConfigError(f"config: train.min_lr = {t.min_lr} must be <= train.lr = {t.lr}")
        self._validate_restarts()
        if t.nesterov and (t.momentum == 0 or t.dampening != 0):
            raise ConfigError(f"config: train.nesterov = true needs train.momentum > 0 and train.dampening = 0 "
                              f"(got {t.momentum} and {t.dampening})")
        if t.parallel == "fsdp" and t.optimizer == "muon":
            raise ConfigError("config: train.optimizer = muon needs whole weight matrices, which train.parallel = fsdp "
                              "shards; use train.parallel = ddp")
        if t.fsdp_cpu_offload and t.parallel != "fsdp":
            raise ConfigError(f"config: train.fsdp_cpu_offload = true needs train.parallel = fsdp (got {t.parallel})")
        mc, tk = self.mlm, self.data.tokenizer
        if self.task == "mlm" and not tk.path and tk.kind != "wordpiece" and not {"[MASK]", "<mask>"} & set(tk.special_tokens):
            raise ConfigError("config: task = mlm needs a [MASK] token: set data.tokenizer.kind = wordpiece (which has "
                              "[CLS], [SEP] and [MASK]) or add them to data.tokenizer.special_tokens")
        if mc.mask_token_prob + mc.random_token_prob > 1:
            raise ConfigError(f"config: mlm.mask_token_prob + mlm.random_token_prob = "
                              f"{mc.mask_token_prob + mc.random_token_prob:g} must be <= 1")
        sc = self.seq2seq
        if registry.spec(self.task).model == "encoder_decoder" and sc.average_last > t.keep_checkpoints:
            raise ConfigError(f"config: seq2seq.average_last = {sc.average_last} needs train.keep_checkpoints >= "
                              f"{sc.average_last} (got {t.keep_checkpoints})")
        self._validate_rope()
        self._validate_pack()
        self._validate_base_dtype()
        self._validate_loss()

    def _validate_restarts(self) -> None:
        previous = 0
        for pair in self.train.schedule_restarts:
            if len(pair) != 2 or not previous < pair[0] < pair[1]:
                raise ConfigError(f"config: train.schedule_restarts: {pair!r}: expected [step, horizon] pairs, the steps "
                                  "increasing from 1 and each below its horizon")
            previous = pair[0]

    def _validate_rope(self) -> None:
        m, defaults = self.model, ModelConfig()
        if m.rope_scaling != "none" and m.pos != "rope":
            raise ConfigError(f"config: model.rope_scaling = {m.rope_scaling} needs model.pos = rope (it is {m.pos})")
        if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
            raise ConfigError(f"config: model.rope_high_freq_factor = {m.rope_high_freq_factor} must be > "
                              f"model.rope_low_freq_factor = {m.rope_low_freq_factor}")
        for name in LLAMA3_ROPE_FIELDS:  # a setting that would change nothing is a mistake worth naming
            if m.rope_scaling != "llama3" and getattr(m, name) != getattr(defaults, name):
                raise ConfigError(f"config: model.{name} = {getattr(m, name)!r} applies to model.rope_scaling = llama3 "
                                  f"only (it is {m.rope_scaling})")

    def _validate_pack(self) -> None:
        spec = registry.spec(self.task)
        for key, on, family in (("data.pack", self.data.pack, "pretrain"), ("finetune.pack", self.finetune.pack, "finetune")):
            if on and not (spec.packs and spec.family == family):
                can = [n for n in registry.names(family) if registry.spec(n).packs]
                raise ConfigError(f"config: {key} = true: the {self.task} task ({spec.doc}) cannot pack; "
                                  f"{key} applies to {', '.join(can) or 'no task'}")

    def _validate_base_dtype(self) -> None:
        pc = self.peft
        if pc.base_dtype == "none":
            return
        if not registry.spec(self.task).finetune:
            raise ConfigError(f"config: peft.base_dtype = {pc.base_dtype}: applies to fine-tuning with peft.method = "
                              f"lora; the {self.task} task trains its whole model")
        if pc.method != "lora":
            raise ConfigError(f"config: peft.base_dtype = {pc.base_dtype} needs peft.method = lora (it is {pc.method}): "
                              "a quantised base is frozen, so only LoRA's updates can train on it")

    def _validate_loss(self) -> None:
        lc, defaults = self.loss, LossConfig()
        allowed = registry.spec(self.task).losses
        if allowed and lc.name not in allowed:
            raise ConfigError(f"config: loss.name = {lc.name}: the {self.task} task trains with {', '.join(allowed)}")
        for f in dataclasses.fields(LossConfig):
            if f.name in ("name", "chunked") or f.name in LOSS_OPTIONS[lc.name]:
                continue
            if getattr(lc, f.name) != getattr(defaults, f.name):
                takes = ", ".join(f"loss.{k}" for k in LOSS_OPTIONS[lc.name]) or "no options"
                raise ConfigError(f"config: loss.{f.name} = {getattr(lc, f.name)!r} does not apply to "
                                  f"loss.name = {lc.name} (it takes {takes})")
        if lc.name in ("dpo", "simpo") and lc.label_smoothing >= 0.5:
            raise ConfigError(f"config: loss.label_smoothing = {lc.label_smoothing} for loss.name = {lc.name} is the "
                              "chance a preference is flipped; expected < 0.5 (at 0.5 the pairs teach nothing)")
        if not registry.spec(self.task).class_weights and lc.class_weights is not None:
            raise ConfigError(f"config: loss.class_weights: the {self.task} task takes no class weights")


# -- reading and writing ---------------------------------------------------------------------------


def leaves(cls: type = Config, prefix: str = ""):
    """(dotted path, type, field) for every leaf field, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], path + ".")
        else:
            yield path, hints[f.name], f


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and _is_optional(tp):
        return _type_name(args[0]) + " or null"
    return getattr(tp, "__name__", str(tp))


_PLURALS = {str: "strings", float: "numbers", int: "integers", bool: "booleans"}


def _is_optional(tp) -> bool:
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in typing.get_args(tp)


def _cli_list(value: str) -> list:
    """a,b,c or a YAML list [a, b]; a comma list whose items look like YAML ([CLS],[SEP]) stays a comma list."""
    if value.startswith("["):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    return [v for v in value.split(",") if v]


def _coerce(path: str, tp, value: Any, from_cli: bool):
    """Turn `value` into `tp` or raise a ConfigError naming path, value and the expected type."""
    def bad(expected: str):
        return ConfigError(f"config: {path} = {value!r}: expected {expected}")

    if _is_optional(tp):
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad("true or false")
    if tp is int:
        if isinstance(value, str) and from_cli:
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad("an integer")
    if tp is float:
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string; accept it as a number
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if tp is list or typing.get_origin(tp) is list:
        if isinstance(value, str) and from_cli:
            value = _cli_list(value)
        item = (typing.get_args(tp) or (str,))[0]
        if isinstance(value, list):
            return [_coerce(f"{path}[{i}]", item, v, from_cli) for i, v in enumerate(value)]
        raise bad(f"a list of {_PLURALS.get(item, item)}")
    if tp is dict or typing.get_origin(tp) is dict:
        key_type, value_type = typing.get_args(tp) or (str, str)
        if isinstance(value, str) and from_cli:  # key=value,key=value
            pairs = [p.split("=", 1) for p in value.split(",") if p]
            if any(len(p) != 2 for p in pairs):
                raise bad("key=value pairs separated by commas")
            value = dict(pairs)
        if isinstance(value, dict):
            return {_coerce(path, key_type, k, from_cli): _coerce(f"{path}.{k}", value_type, v, from_cli)
                    for k, v in value.items()}
        raise bad("a mapping of names to values")
    raise TypeError(f"unsupported config type {tp} at {path}")  # a bug in a dataclass, not user input


def _build(cls: type, data: dict, prefix: str, from_cli: set[str]):
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'top level'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = [p for p, _, _ in leaves(Config)]
            guess = difflib.get_close_matches(prefix + str(key), known, n=1)
            hint = f"; did you mean '{guess[0]}'?" if guess else f"; known keys here: {', '.join(sorted(names))}"
            raise ConfigError(f"config: unknown key '{prefix}{key}'{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data.get(f.name) or {}, path + ".", from_cli)
            continue
        if f.name not in data:
            continue
        value = _coerce(path, tp, data[f.name], path in from_cli)
        choices, check = choices_of(f), f.metadata.get("check")
        if choices and isinstance(value, list):  # a list field's choices are those of its items
            for i, item in enumerate(value):
                if item not in choices:
                    raise ConfigError(f"config: {path}[{i}] = {item!r}: expected one of {', '.join(map(str, choices))}")
        elif choices and value not in choices:
            raise ConfigError(f"config: {path} = {value!r}: expected one of {', '.join(map(str, choices))}")
        if check and value is not None and not check[0](value):
            raise ConfigError(f"config: {path} = {value!r}: must be {check[1]}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, path: str, value: Any) -> None:
    node = tree
    *parents, last = path.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config: {path}: '{p}' is a value, not a section")
        node = child
    node[last] = value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"config: {where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config: {p}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {p}: expected a mapping of keys at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                base: dict | None = None, validate: bool = True) -> Config:
    """YAML file (or `base` dict) + dotted overrides (strings from the CLI) -> validated Config.

    A model preset (`model.preset`) supplies defaults for the model section; keys given explicitly
    in the file or on the command line win over it. validate=False skips the checks that involve
    more than one field (for a partial config that is completed later, e.g. from a run to resume).
    """
    tree = copy.deepcopy(base or {})  # overrides are set into it: the caller's dict stays as it was
    if path is not None:
        tree = read_yaml(path)
    overrides = overrides or {}
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    model = tree.get("model")
    if isinstance(model, dict) and model.get("preset"):
        name = model["preset"]
        if name not in PRESETS:
            raise ConfigError(f"config: model.preset = {name!r}: expected one of {', '.join(PRESETS)}")
        tree["model"] = {**PRESETS[name], **model}
    note = legacy_log_keys(tree)
    if note and os.environ.get("RANK", "0") == "0":  # under torchrun rank 0 says it
        print(f"lmforge: note: {note}", file=sys.stderr)
    cfg = _build(Config, tree, "", set(overrides))
    if validate:
        cfg.validate()
    return cfg


DEPRECATED_KEYS = ("log.tensorboard",)  # still read (legacy_log_keys), no longer fields; the CLI takes them, unlisted


def legacy_log_keys(tree: dict) -> str | None:
    """log.tensorboard (a switch before log.trackers) still works, so old configs, scripts and run directories do:
    false takes tensorboard out of log.trackers, true puts it in. Returns the deprecation note to print (None
    when the key is absent); the resolved config written to a run holds log.trackers only."""
    log = tree.get("log")
    if not isinstance(log, dict) or "tensorboard" not in log:
        return None
    on = _coerce("log.tensorboard", bool, log.pop("tensorboard"), from_cli=True)
    given = log.get("trackers", ["tensorboard"])
    trackers = _coerce("log.trackers", list[str], given, from_cli=isinstance(given, str))
    if on != ("tensorboard" in trackers):
        trackers = trackers + ["tensorboard"] if on else [t for t in trackers if t != "tensorboard"]
    log["trackers"] = trackers
    return (f"log.tensorboard is deprecated; use log.trackers (log.tensorboard = {str(on).lower()} "
            f"made it [{', '.join(trackers)}])")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))  # a killed write leaves the old one


def applies(path: str, task: str, loss_name: str | None = None) -> bool:
    """Whether the config key `path` (dotted) means anything to `task`: its section is one the task reads
    (registry: TaskSpec.config_sections) and, in the loss section, the option belongs to loss_name (None:
    to any of the task's losses)."""
    spec = registry.spec(task)
    section, _, key = path.partition(".")
    if path == "task":
        return True
    if section not in spec.config_sections:
        return False
    if path == "loss.chunked":  # the fused output projection + loss of a language-model head
        return spec.model in ("gpt", "masked_lm", "encoder_decoder")
    if section == "loss" and key != "name":
        return any(key in LOSS_OPTIONS[name] for name in ((loss_name,) if loss_name else spec.losses))
    return True


def help_rows(base: dict | None = None, task: str | None = None):
    """(option, metavar, help, applies) for every config field, for the CLI's --help; base: a command's own
    starting values (fine-tuning's), shown as the defaults where they differ; task: the task whose options
    apply (None: all)."""
    for path, tp, f in leaves(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        node = base or {}
        for key in path.split("."):
            node = node.get(key, dataclasses.MISSING) if isinstance(node, dict) else dataclasses.MISSING
        default = default if node is dataclasses.MISSING else node
        extra = f" {{{','.join(map(str, choices_of(f)))}}}" if choices_of(f) else ""
        check = f" ({f.metadata['check'][1]})" if f.metadata.get("check") else ""
        yield (f"--{path}", _type_name(tp).upper(), f"{f.metadata['doc']}{extra}{check} [default: {default}]",
               task is None or applies(path, task))

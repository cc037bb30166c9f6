"""`lmforge export RUN OUT --format onnx [--quantize int8]`: a run as an ONNX graph that onnxruntime runs
without lmforge or torch.

OUT holds model.onnx (its weights in model.onnx.data beside it when they pass ONNX's 2 GB limit), with
--quantize int8 also model.int8.onnx (the same graph, onnxruntime's dynamic quantisation: int8 weights per
output channel, activations quantised on the fly), the run's tokenizer.json, and onnx_config.json saying what
the graph takes and gives (names, dtypes, axes), the task, the labels in the head's order and the special
token ids.

The graph is the model's own forward, traced by torch.onnx's exporter (torch.export, dynamo=True: the
TorchScript exporter has no RMSNorm), with dynamic batch and sequence axes:

- encoders (mlm), sequence classifiers (classify, regress, multilabel, reward) and taggers (tag):
  input_ids, attention_mask [batch, sequence] (1 at real tokens, padding on the right) and token_type_ids
  where the model has segments (0 for a single sentence) -> logits (mlm also last_hidden_state). Pooling,
  the head and a PEFT run's adapters or prefix are in the graph, as lmforge computes them.
- decoders (clm, sft, dpo): one graph for the prompt and for each decoding step (optimum's
  decoder_model_merged, not a prefill graph and a decode graph: a past of 0 positions is the prompt's pass,
  and two graphs would hold every weight twice): input_ids [batch, sequence], attention_mask [batch,
  past_sequence + sequence] (padding on the left, as lmforge's generate pads prompts of different lengths),
  past_key_values.N.key / .value [batch, kv_heads, past_sequence, head_dim] -> logits [batch, sequence,
  vocab] and present.N.key / .value, the past with this call's positions appended.

A LoRA run is written merged; a run on a quantised base (peft.base_dtype) with its dequantised weights (the
values it computed with; --quantize int8 quantises them for onnxruntime). The written graph is run once with
onnxruntime on the tracing inputs and must give the model's outputs, or nothing is written.
onnx, onnxruntime and onnxscript are imported here, when an ONNX export is asked for: `lmforge[onnx]`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from lmforge.data.tokenizer import eos_id
from lmforge.errors import UserError
from lmforge.hf.arch import ONNX_QUANTIZE
from lmforge.hf.export import check_out, write_dir
from lmforge.model.transformer import GPT, MaskedLM
from lmforge.peft import peft_method, strip_peft
from lmforge.quant import dequantise_model
from lmforge.runs import load_run
from lmforge.tasks import registry

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CONFIG_FILE = "onnx_config.json"
# the graph's outputs against the model's on the tracing inputs: fp32 both, only the order of sums differs
CHECK_TOL = 1e-3


def _need_libraries() -> None:
    """onnxscript: torch.onnx's exporter writes the graph with it; onnx and onnxruntime: read and check it."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"export --format onnx needs the {name} package: pip install 'lmforge[onnx]'") from None


# -- the graphs: nn.Modules whose forward takes and returns the ONNX inputs and outputs -----------------


class GrowingCache:
    """A layers.KVCache whose past keys and values are the graph's inputs: `append` concatenates this call's
    and the results are the graph's present outputs. (KVCache writes into a buffer preallocated to the longest
    generation, a length the graph cannot know.)"""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    @property
    def length(self):
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class DecoderGraph(nn.Module):
    """GPT.forward with its KV cache as inputs and outputs. The attention mask's zeros are the left padding
    that lmforge's generate gives a batch of prompts (`left_pad`): positions count from each row's first real
    token, and nothing attends to the padding."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past_key_values):
        caches = [GrowingCache(k, v) for k, v in past_key_values]
        left_pad = attention_mask.shape[1] - attention_mask.sum(-1)
        logits = self.model(input_ids, caches, left_pad=left_pad)
        return logits, [(c.k, c.v) for c in caches]


class EncoderGraph(nn.Module):
    """A bidirectional or fine-tuned model on right-padded rows: the model's forward (a masked LM's: its
    logits and the body's hidden states)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        pad_mask = attention_mask.bool()
        if isinstance(self.model, MaskedLM):
            hidden = self.model.features(input_ids, segments=token_type_ids, pad_mask=pad_mask)
            return self.model.mlm_head(hidden), hidden
        return self.model(input_ids, segments=token_type_ids, pad_mask=pad_mask)


# tracing sizes: all different and at least 2 (torch.export specialises sizes 0 and 1), so no two axes are
# mistaken for one; the graph computes the same for a sequence of 1 and a past of 0 (tests/test_onnx.py)
BATCH, SEQ, PAST = 2, 5, 3


def _decoder(model: GPT) -> tuple[nn.Module, tuple, dict, list[str], list[str]]:
    cfg = model.cfg
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g, device="cpu")
    mask = torch.ones(BATCH, PAST + SEQ, dtype=torch.long, device="cpu")
    mask[1, :2] = 0  # a left-padded row
    shape = (BATCH, cfg.n_kv_head, PAST, cfg.head_dim)
    past = [(torch.randn(shape, generator=g, device="cpu"), torch.randn(shape, generator=g, device="cpu"))
            for _ in range(cfg.n_layer)]
    kv = {0: "batch", 2: "past_sequence"}
    dynamic = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
               "past_key_values": [(kv, kv)] * cfg.n_layer}
    layers = [f"{i}.{part}" for i in range(cfg.n_layer) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", *(f"past_key_values.{name}" for name in layers)]
    outputs = ["logits", *(f"present.{name}" for name in layers)]
    return DecoderGraph(model), (ids, mask, past), dynamic, inputs, outputs


def _encoder(model: nn.Module) -> tuple[nn.Module, tuple, dict, list[str], list[str]]:
    cfg = model.cfg
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g, device="cpu")
    mask = torch.ones(BATCH, SEQ, dtype=torch.long, device="cpu")
    mask[1, -2:] = 0  # a right-padded row
    axes = {0: "batch", 1: "sequence"}
    args, dynamic, inputs = (ids, mask), {"input_ids": axes, "attention_mask": axes}, ["input_ids", "attention_mask"]
    if model.seg_emb is not None:
        args += (torch.randint(0, cfg.type_vocab_size, (BATCH, SEQ), generator=g, device="cpu"),)
        dynamic["token_type_ids"] = axes
        inputs.append("token_type_ids")
    outputs = ["logits", "last_hidden_state"] if isinstance(model, MaskedLM) else ["logits"]
    return EncoderGraph(model), args, dynamic, inputs, outputs


# -- export ------------------------------------------------------------------------------------------

# the graph of each model kind (registry.TaskSpec.model) that has one; onnx_config.json's "graph"
GRAPHS = {"gpt": "decoder", "masked_lm": "encoder", "sequence_classifier": "classifier", "token_tagger": "tagger"}


def _plain_model(run, cfg, model: nn.Module) -> nn.Module:
    """The model as the graph computes it: dequantised, a LoRA update merged; adapters and prefixes stay."""
    kind = registry.spec(cfg.task).model
    if kind not in GRAPHS:
        raise UserError(f"export: {run}: a {cfg.task} model ({kind}) has no ONNX graph lmforge writes; it writes "
                        "decoders (clm, sft, dpo), encoders (mlm), sequence classifiers and taggers")
    if cfg.model.max_seq_len < PAST + SEQ:
        raise UserError(f"export: {run}: model.max_seq_len = {cfg.model.max_seq_len}; the ONNX export traces the "
                        f"model on {PAST + SEQ} positions")
    dequantise_model(model)
    if peft_method(model) == "lora":
        model = strip_peft(model, merge=True, inplace=True)
    return model.eval()


@contextlib.contextmanager
def _quiet():
    """The exporter's and the quantiser's chatter kept off the terminal: progress lines on stdout, the traced
    graph on stderr when tracing fails, log warnings ("torchvision is not installed", "consider pre-processing
    before quantization") and Python warnings about axes it renames, none of it about anything the user can
    change; a failure still raises, and says why (_reason)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def _trace(run, graph: nn.Module, args: tuple, dynamic: dict, inputs: list[str], outputs: list[str]):
    """torch.onnx.export (torch.export, dynamo=True), any failure of the exporter as one line naming the run."""
    import torch.onnx

    try:
        with _quiet(), torch.no_grad():
            return torch.onnx.export(graph, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                     output_names=outputs, verbose=False)
    except Exception as e:  # the exporter's errors are many classes, from torch.export, onnxscript and itself
        raise UserError(f"export: {run}: the ONNX exporter cannot trace this model: {_reason(e)}") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _reason(e: BaseException) -> str:
    """The first line of the error at the root of the exporter's chain ("Failed to export the model with
    torch.export" says which step failed; its cause says why), with its class."""
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{_first_line(e)} ({type(e).__name__})"


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _flat(item)]


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session of a graph; threads: intra-op threads (default: onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_graph(run, path: Path, graph: nn.Module, args: tuple, inputs: list[str]) -> None:
    """The written graph, run by onnxruntime on the tracing inputs, gives the model's outputs."""
    with torch.no_grad():
        expected = _flat(graph(*args))
    feeds = dict(zip(inputs, (t.numpy() for t in _flat(args))))
    try:
        got = ort_session(path).run(None, feeds)
    except Exception as e:  # onnxruntime refuses a graph the exporter wrote
        raise UserError(f"export: {run}: onnxruntime cannot run the exported graph: {_first_line(e)}") from None
    for name, want, have in zip(graph_outputs(path), expected, got):
        diff = float(abs(want.numpy() - have).max()) if want.numel() else 0.0
        if not diff <= CHECK_TOL * max(1.0, float(want.abs().max())):
            raise UserError(f"export: {run}: the exported graph's {name} differ from the model's by {diff:.3g}; "
                            "the ONNX exporter traced it wrongly")


def graph_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _quantize(source: Path, target: Path) -> None:
    """onnxruntime's dynamic int8 quantisation of every MatMul with a weight: one scale per output channel
    (the channels of a weight differ in range, and one scale for all would round the narrow ones coarsely),
    activations quantised per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = (source.parent / f"{source.name}.data").exists()
    with _quiet():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=large)


def _axes(arg) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in arg.type.tensor_type.shape.dim]


def _description(path: Path, cfg, tok, kind: str, quantize: str | None) -> dict:
    """onnx_config.json: what a program that has onnxruntime and the tokenizer needs to use the graph."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False).graph
    dtype = {onnx.TensorProto.INT64: "int64", onnx.TensorProto.FLOAT: "float32"}
    spec = registry.spec(cfg.task)
    pad = next((tok.token_to_id(t) for t in ("[PAD]", "<pad>", "<|pad|>") if tok.token_to_id(t) is not None), None)
    info = {
        "task": cfg.task,
        "graph": kind,
        "files": {"float32": MODEL_FILE, **({quantize: INT8_FILE} if quantize else {})},
        "inputs": {a.name: {"dtype": dtype.get(a.type.tensor_type.elem_type), "shape": _axes(a)} for a in proto.input},
        "outputs": {a.name: {"dtype": dtype.get(a.type.tensor_type.elem_type), "shape": _axes(a)} for a in proto.output},
        "padding": "left" if kind == "decoder" else "right",
        "max_seq_len": cfg.model.max_seq_len,
        "vocab_size": cfg.model.vocab_size,
        "pad_token_id": pad,
        "eos_token_id": eos_id(tok),
    }
    if kind == "decoder":
        info.update(n_layer=cfg.model.n_layer, n_kv_head=cfg.model.n_kv_head, head_dim=cfg.model.head_dim)
    if spec.finetune and spec.label in ("class", "value", "classes", "tags", "preference"):
        labels = cfg.finetune.labels or ["score" if spec.label == "preference" else "value"]  # one output
        info.update(label_kind=spec.label, id2label={str(i): name for i, name in enumerate(labels)})
    if spec.model == "sequence_classifier":
        info["pooling"] = cfg.finetune.pooling
    return info


def export_onnx(run: str | Path, out: str | Path, quantize: str | None = None) -> dict:
    """A run directory, checkpoint or HF folder (anything load_run reads) -> OUT with model.onnx (and with
    quantize='int8' model.int8.onnx), tokenizer.json and onnx_config.json, which it returns."""
    out = Path(out)
    if quantize is not None and quantize not in ONNX_QUANTIZE:
        raise UserError(f"export: --quantize {quantize}: expected one of {', '.join(ONNX_QUANTIZE)}")
    check_out(out, "export")
    _need_libraries()
    model, tok, cfg = load_run(run)
    model = _plain_model(run, cfg, model)
    kind = GRAPHS[registry.spec(cfg.task).model]
    graph, args, dynamic, inputs, outputs = (_decoder if kind == "decoder" else _encoder)(model)
    program = _trace(run, graph.eval(), args, dynamic, inputs, outputs)
    info = {}

    def write(tmp: Path) -> None:
        program.save(tmp / MODEL_FILE)
        _check_graph(run, tmp / MODEL_FILE, graph, args, inputs)
        if quantize:
            _quantize(tmp / MODEL_FILE, tmp / INT8_FILE)
        tok.save(str(tmp / "tokenizer.json"))
        info.update(_description(tmp / MODEL_FILE, cfg, tok, kind, quantize))
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    write_dir(out, "export", write)
    return info

"""task: dpo, preference tuning: the losses against TRL's on fixed log-probabilities (loss and gradient),
the answers' log-probabilities against full logits, packed = padded, the reference of a LoRA run (its
adapters off) and of a full run (a frozen copy), a run that learns to rank held-out pairs, exact resume,
and bad pair files as one line."""

from __future__ import annotations

import json
import math
import types
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import finetune, make_base, read_metrics, sentences, sentiment, write_lines
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.losses import dpo, ipo, preference_rewards, simpo, token_logprobs
from lmforge.peft import peft_disabled

SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]


# -- the losses against TRL's -----------------------------------------------------------------------------


def _fixed_logps(seed: int, pairs: int = 6, width: int = 7):
    """Per-token log-probabilities of 2 x pairs answers (chosen rows first) with a completion mask of ragged
    lengths, and the reference's sequence sums."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    per_token = -torch.rand(2 * pairs, width, generator=g, device="cpu") * 3
    lengths = torch.randint(1, width + 1, (2 * pairs,), generator=g, device="cpu")
    mask = (torch.arange(width, device="cpu")[None, :] < lengths[:, None]).long()
    ref = (-torch.rand(2 * pairs, width, generator=g, device="cpu") * 3 * mask).sum(1)
    return per_token, mask, ref


def _trl_dpo_loss(loss_type: str, beta: float, per_token: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor):
    """TRL's DPOTrainer._compute_loss itself, on a stand-in model whose per-token log-probs are given and
    precomputed reference log-probs: the loss exactly as TRL forms it from them."""
    from trl import DPOTrainer

    width = mask.shape[1]
    # TRL shifts: completion_mask[:, 1:] masks the per-token log-probs of positions 1..T
    completion = torch.cat([torch.zeros(len(mask), 1, dtype=torch.long, device="cpu"), mask], 1)
    out = types.SimpleNamespace(log_probs=per_token * mask, entropy=torch.zeros_like(per_token),
                                mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(mask, dtype=torch.bool))
    model = types.SimpleNamespace(training=True)
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stub = types.SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    rc, rr = ref.chunk(2)
    inputs = {"input_ids": torch.zeros(len(mask), width + 1, dtype=torch.long, device="cpu"),
              "attention_mask": torch.ones(len(mask), width + 1, dtype=torch.long, device="cpu"),
              "completion_mask": completion, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    loss = DPOTrainer._compute_loss(stub, lambda **kw: out, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _trl_cpo_loss(loss_type: str, beta: float, smoothing: float, chosen, rejected, gamma: float = 0.0):
    """TRL's CPOTrainer.cpo_loss (reference-free: its "policy" log-probs are what the formula takes)."""
    from trl.experimental.cpo import CPOTrainer

    stub = types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=smoothing, loss_type=loss_type,
                                 simpo_gamma=gamma, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    return CPOTrainer.cpo_loss(stub, chosen, rejected)[0].mean()


def _ours(fn, per_token, mask, ref, **options):
    sums, lengths = (per_token * mask).sum(1), mask.sum(1)
    (c, r), (lc, lr) = sums.chunk(2), lengths.chunk(2)
    rc, rr = ref.chunk(2) if ref is not None else (None, None)
    return fn(c, r, rc, rr, lc, lr, **options)


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 1.0)])
def test_dpo_and_ipo_equal_trls_dpo_trainer_in_loss_and_gradient(loss_type, beta):
    per_token, mask, ref = _fixed_logps(seed=1)
    a = per_token.clone().requires_grad_()
    theirs, logged = _trl_dpo_loss(loss_type, beta, a, mask, ref)
    (grad_theirs,) = torch.autograd.grad(theirs, a)
    b = per_token.clone().requires_grad_()
    ours = _ours(dpo if loss_type == "sigmoid" else ipo, b, mask, ref, beta=beta)
    (grad_ours,) = torch.autograd.grad(ours, b)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)
    assert grad_ours.abs().sum() > 0
    # and the metrics: TRL's rewards, their accuracy and margin are ours
    rc, rr = _ours(lambda *a, **k: preference_rewards("dpo", *a, **k), per_token, mask, ref, beta=beta)
    assert logged["rewards/chosen"] == pytest.approx(rc.mean().item(), abs=1e-6)
    assert logged["rewards/margins"] == pytest.approx((rc - rr).mean().item(), abs=1e-6)
    assert logged["rewards/accuracies"] == pytest.approx((rc > rr).float().mean().item())


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_conservative_dpo_equals_trls_smoothed_sigmoid_on_the_log_ratios(smoothing):
    # TRL's DPOTrainer (1.x) has no smoothed sigmoid; its CPO loss is the same formula on whatever log-probs it
    # is given, so given the log-ratios to the reference it is conservative DPO (Mitchell 2023's cDPO)
    per_token, mask, ref = _fixed_logps(seed=2)
    a = per_token.clone().requires_grad_()
    ratios = (a * mask).sum(1) - ref
    theirs = _trl_cpo_loss("sigmoid", 0.2, smoothing, *ratios.chunk(2))
    (grad_theirs,) = torch.autograd.grad(theirs, a)
    b = per_token.clone().requires_grad_()
    ours = _ours(dpo, b, mask, ref, beta=0.2, label_smoothing=smoothing)
    (grad_ours,) = torch.autograd.grad(ours, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(ours, _ours(dpo, per_token, mask, ref, beta=0.2))  # smoothing changes it


@pytest.mark.parametrize("beta, gamma, smoothing", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.1)])
def test_simpo_equals_trls_cpo_trainer_simpo(beta, gamma, smoothing):
    per_token, mask, _ = _fixed_logps(seed=3)
    a = per_token.clone().requires_grad_()
    means = (a * mask).sum(1) / mask.sum(1)  # TRL's average_log_prob for simpo
    theirs = _trl_cpo_loss("simpo", beta, smoothing, *means.chunk(2), gamma=gamma)
    (grad_theirs,) = torch.autograd.grad(theirs, a)
    b = per_token.clone().requires_grad_()
    ours = _ours(simpo, b, mask, None, beta=beta, margin=gamma, label_smoothing=smoothing)
    (grad_ours,) = torch.autograd.grad(ours, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-7)


def test_rewards_are_beta_log_ratios_and_a_perfect_policy_has_a_small_loss():
    chosen, rejected = torch.tensor([-3.0, -1.0], device="cpu"), torch.tensor([-9.0, -2.0], device="cpu")
    ref_c, ref_r = torch.tensor([-5.0, -1.5], device="cpu"), torch.tensor([-5.0, -1.5], device="cpu")
    n = torch.tensor([2, 4], device="cpu")
    rc, rr = preference_rewards("dpo", chosen, rejected, ref_c, ref_r, n, n, beta=0.5)
    torch.testing.assert_close(rc, torch.tensor([1.0, 0.25], device="cpu"))
    torch.testing.assert_close(rr, torch.tensor([-2.0, -0.25], device="cpu"))
    # at the reference every pair costs log 2; a policy that ranks both right costs less
    assert dpo(ref_c, ref_r, ref_c, ref_r, n, n).item() == pytest.approx(math.log(2))
    assert dpo(chosen, rejected, ref_c, ref_r, n, n).item() < math.log(2)


def test_token_logprobs_in_chunks_equal_full_log_softmax_with_gradients():
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(300, 16, generator=g, device="cpu", requires_grad=True)
    weight = torch.randn(50, 16, generator=g, device="cpu", requires_grad=True)
    targets = torch.randint(0, 50, (300,), generator=g, device="cpu")
    upstream = torch.randn(300, generator=g, device="cpu")  # a different weight per token, as DPO's
    full = F.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]).squeeze(1)
    expected = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    chunked = token_logprobs(hidden, weight, targets, chunk_rows=64)
    got = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(chunked, full)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y)


# -- the task ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("dpo") / "gpt", "clm", specials=SPECIALS, max_seq_len=64)


def pair_lines(n: int, seed: int) -> list[dict]:
    """Prompts of random words; the preferred answer is their sentiment by helpers' rule (one of five words
    present: pos), the other the wrong one."""
    lines = []
    for w in sentences(n, seed):
        right = sentiment(w)
        lines.append({"messages": [{"role": "user", "content": " ".join(w)}], "chosen": right,
                      "rejected": "neg" if right == "pos" else "pos"})
    return lines


def write_pairs(path: Path, lines: list[dict]) -> Path:
    return write_lines(path, [json.dumps(line) for line in lines])


def dpo_task(base: Path, train: Path, **sections):
    from lmforge.config import load_config
    from lmforge.tasks import make_task

    cfg = load_config(base={"task": "dpo", "finetune": {"init_from": str(base), "train": str(train),
                                                        "chat_template": "chatml", **sections.pop("finetune", {})},
                            "train": {"warmup_steps": 0}, **sections})
    task = make_task(cfg)
    task.setup()
    return task


def direct_answer_logprob(model, row) -> float:
    """log p(answer | prompt) from the full logits of the unpadded sequence."""
    ids = torch.tensor([row.ids], device="cpu")
    logp = F.log_softmax(model(ids)[0].float(), -1)
    return sum(float(logp[i, t]) for i, t in enumerate(row.target) if t != -100)


@pytest.mark.parametrize("pack", [False, True])
def test_answer_logprobs_equal_full_logits_padded_or_packed(base, tmp_path, pack):
    train = write_pairs(tmp_path / "pairs.jsonl", pair_lines(12, 1))
    task = dpo_task(base, train, finetune={"pack": pack})
    model = task.build_model(pretrained=True).eval()
    rows, examples = task.train_rows[:5], task.train_examples[:5]
    batch = task.collate(rows, examples)
    assert ("doc_ids" in batch) == pack and task.count(batch) == 5
    with torch.no_grad():
        got = task.answer_logprobs(model, batch)
        expected = [direct_answer_logprob(model, r.rows[0]) for r in rows] + \
                   [direct_answer_logprob(model, r.rows[1]) for r in rows]
    torch.testing.assert_close(got, torch.tensor(expected, device="cpu"), rtol=1e-5, atol=1e-4)
    assert batch["answer_len"].tolist()[:5] == [sum(t != -100 for t in r.rows[0].target) for r in rows]


def test_packed_pairs_give_the_padded_loss_and_gradients(base, tmp_path):
    train = write_pairs(tmp_path / "pairs.jsonl", pair_lines(12, 2))
    grads = []
    for pack in (False, True):
        task = dpo_task(base, train, finetune={"pack": pack}, peft={"method": "lora"})
        torch.manual_seed(0)
        model = task.build_model(pretrained=True)
        with torch.no_grad():  # a trained-looking adapter, so policy and reference differ
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.05, generator=torch.Generator(device="cpu").manual_seed(len(name)))
        model.eval()
        loss = task.loss(model, task.collate(task.train_rows[:6], task.train_examples[:6]))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = grads
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert set(ga) == set(gb) and all(n.endswith(("lora_A", "lora_B")) for n in ga)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_reference_of_a_lora_run_is_its_base_and_of_a_full_run_a_frozen_copy(base, tmp_path):
    train = write_pairs(tmp_path / "pairs.jsonl", pair_lines(12, 3))
    lora = dpo_task(base, train, peft={"method": "lora"})
    model = lora.build_model(pretrained=True).eval()
    batch = lora.collate(lora.train_rows[:4], lora.train_examples[:4])
    before = lora.answer_logprobs(model, batch).detach()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.fill_(0.05)
    after = lora.answer_logprobs(model, batch).detach()
    assert not torch.allclose(before, after)  # the adapters change the policy ...
    torch.testing.assert_close(lora.reference_logprobs(model, batch), before)  # ... but not the reference
    assert lora.reference_model is None  # and no copy is kept

    full = dpo_task(base, train)
    model = full.build_model(pretrained=True).eval()
    start = full.answer_logprobs(model, batch).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert not torch.allclose(full.answer_logprobs(model, batch).detach(), start)
    torch.testing.assert_close(full.reference_logprobs(model, batch), start)
    assert not any(p.requires_grad for p in full.reference_model.parameters())
    simpo_task = dpo_task(base, train, loss={"name": "simpo", "beta": 2.0})
    assert simpo_task.reference_model is None and simpo_task.reference_logprobs(model, batch) is None


@pytest.mark.slow  # a preference run
def test_dpo_learns_to_rank_held_out_pairs(base, tmp_path, capsys):
    train = write_pairs(tmp_path / "train.jsonl", pair_lines(240, 21))
    dev = write_pairs(tmp_path / "dev.jsonl", pair_lines(60, 22))
    run = finetune(tmp_path, base, train, dev, "dpo", "--finetune.chat_template", "chatml", "--finetune.epochs", "6",
                   "--train.lr", "1e-2", "--train.warmup_steps", "5", "--eval.every", "15")
    best = min(read_metrics(run, "val"), key=lambda r: r["loss"])
    assert best["reward_accuracy"] > 0.75 and best["loss"] < 0.5, best  # untrained: 0 (no margin yet), log 2 = 0.69
    assert best["margin"] > 0 and best["chosen_reward"] > best["rejected_reward"]
    assert best["logp_accuracy"] > best["ref_logp_accuracy"] + 0.2, best  # the model itself now prefers them
    report = json.loads((run / "dev_report.json").read_text())  # on the best weights
    assert report["reward_accuracy"] == pytest.approx(best["reward_accuracy"]) and "exact_match" in report
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(dev), "--device", "cpu"]) == 0
    result = capsys.readouterr().out.strip().splitlines()[-1]
    scores = {k: float(v) for k, v in (kv.split("=") for kv in result.split()[1:])}
    assert scores["reward_accuracy"] == pytest.approx(report["reward_accuracy"], abs=1e-4)  # the reference reloaded
    assert scores["loss"] == pytest.approx(report["loss"], rel=1e-4)


@pytest.mark.slow  # two short LoRA preference runs
def test_lora_dpo_resumes_exactly(base, tmp_path, capsys):
    train = write_pairs(tmp_path / "train.jsonl", pair_lines(80, 23))
    common = ("--peft.method", "lora", "--peft.lora_dropout", "0.1", "--finetune.chat_template", "chatml",
              "--finetune.epochs", "3", "--train.checkpoint_every", "4", "--eval.every", "5", "--finetune.pack", "true", "--log.every", "1")
    whole = finetune(tmp_path, base, train, None, "dpo", *common, run="whole")
    part = finetune(tmp_path, base, train, None, "dpo", *common, "--train.max_time", "1e-9", run="part")
    assert main(["finetune", "--resume", str(part), "--train.max_time", "0", "--log.progress", "false"]) == 0
    a, b = read_metrics(whole, "train"), read_metrics(part, "train")
    assert len(a) > 1 and [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    assert read_metrics(whole, "val")[-1] == pytest.approx(read_metrics(part, "val")[-1])


@pytest.mark.slow  # a full fine-tuning run with a frozen copy, and accumulation
def test_full_dpo_accumulated_equals_one_big_batch(base, tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", pair_lines(40, 23))
    common = ("--finetune.chat_template", "chatml", "--finetune.epochs", "0", "--train.max_steps", "2",
              "--train.warmup_steps", "0", "--finetune.group_by_length", "false",
              "--finetune.dropout", "0")
    big = finetune(tmp_path, base, train, None, "dpo", *common, "--train.batch_size", "8", run="big")
    acc = finetune(tmp_path, base, train, None, "dpo", *common, "--train.batch_size", "4", "--train.grad_accum", "2",
                   run="acc")
    from lmforge.runs import load_run

    a, b = load_run(big)[0].state_dict(), load_run(acc)[0].state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert [r["loss"] for r in read_metrics(big, "train")] == pytest.approx(
        [r["loss"] for r in read_metrics(acc, "train")], rel=1e-5)


# -- bad input --------------------------------------------------------------------------------------------


GOOD = {"prompt": "the king", "chosen": "queen", "rejected": "rome"}


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "the king", "rejected": "rome"}, "no field 'chosen'"),
    ({"prompt": "the king", "chosen": "queen"}, "no field 'rejected'"),
    ({"prompt": "the king", "chosen": "queen", "rejected": "queen"}, "are the same answer"),
    ({"prompt": "the king", "chosen": "  ", "rejected": "rome"}, "empty text in field 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "no field 'prompt' or 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "messages end with an assistant turn"),
    ({"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "one assistant message"),
])
def test_bad_pair_lines_are_one_line_naming_the_line(base, tmp_path, line, expected):
    train = write_pairs(tmp_path / "pairs.jsonl", [GOOD, line, GOOD])
    with pytest.raises(UserError) as e:
        dpo_task(base, train)
    assert str(e.value).startswith(f"{train}:2: ") and expected in str(e.value), str(e.value)


def test_an_answer_left_without_tokens_is_one_line(base, tmp_path):
    # a prompt that fills finetune.max_length leaves its answers no token at all
    long = {"prompt": "the king " * 40, "chosen": "queen", "rejected": "rome"}
    train = write_pairs(tmp_path / "pairs.jsonl", [GOOD, long])
    with pytest.raises(UserError) as e:
        dpo_task(base, train, finetune={"max_length": 48})
    assert str(e.value).startswith(f"{train}:2: ") and "tokens before its first answer" in str(e.value)
    # a template that renders no answer (here: one that drops the assistant's turns) leaves nothing to score
    dropping = ("{% for m in messages %}{% if m['role'] != 'assistant' %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}")
    import lmforge.tasks.sft as sft

    original = sft.SFTTask.chat
    try:
        sft.SFTTask.chat = property(lambda self: (dropping, {}))
        with pytest.raises(UserError) as e:
            dpo_task(base, write_pairs(tmp_path / "two.jsonl", [GOOD, GOOD]))
    finally:
        sft.SFTTask.chat = original
    assert str(e.value).startswith(f"{tmp_path / 'two.jsonl'}:1: the chosen answer has no tokens"), str(e.value)


def test_dpo_from_an_encoder_is_one_line_and_writes_nothing(tmp_path, capsys):
    encoder = make_base(tmp_path / "bert", "mlm")
    train = write_pairs(tmp_path / "pairs.jsonl", [GOOD, GOOD | {"chosen": "prince"}])
    run = tmp_path / "run"
    code = main(["finetune", "--task", "dpo", "--finetune.init_from", str(encoder), "--finetune.train", str(train),
                 "--log.run_dir", str(run), "--log.progress", "false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs a causal language model" in err, err
    assert not run.exists()


@pytest.mark.slow  # two short sft runs
def test_dpo_starts_from_a_lora_sft_run_with_its_update_merged_and_refuses_an_adapter_run(base, tmp_path):
    from lmforge.runs import load_run

    talk = [{"messages": [{"role": "user", "content": " ".join(w)}, {"role": "assistant", "content": w[0]}]}
            for w in sentences(40, 24)]
    sft_data = write_lines(tmp_path / "sft.jsonl", [json.dumps(t) for t in talk])
    common = ("--finetune.chat_template", "chatml", "--finetune.epochs", "1")
    sft = finetune(tmp_path, base, sft_data, None, "sft", "--peft.method", "lora", *common, run="sft")
    tuned, _, _ = load_run(sft)
    assert tuned.state_dict()["blocks.0.attn.qkv.lora_B"].abs().sum() > 0
    pairs = write_pairs(tmp_path / "pairs.jsonl", pair_lines(12, 25))
    task = dpo_task(sft, pairs, peft={"method": "lora"})
    model = task.build_model(pretrained=True).eval()
    ids = torch.tensor([task.train_rows[0].rows[0].ids], device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids), tuned(ids))  # the sft update is in the weights DPO starts from
        with peft_disabled(model):
            torch.testing.assert_close(model(ids), tuned(ids))  # and so in the reference

    adapter = finetune(tmp_path, base, sft_data, None, "sft", "--peft.method", "adapter", *common, run="adapter")
    with pytest.raises(UserError, match="is a peft.method = adapter run"):
        dpo_task(adapter, pairs)


@pytest.mark.slow  # two processes and one
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_dpo_on_two_ranks_equals_one_process(base, tmp_path, parallel):
    from test_distributed import forked

    train = write_pairs(tmp_path / "train.jsonl", pair_lines(48, 26))
    common = ["finetune", "--task", "dpo", "--finetune.init_from", str(base), "--finetune.train", str(train),
              "--finetune.chat_template", "chatml", "--peft.method", "lora", "--finetune.epochs", "0",
              "--train.max_steps", "3", "--train.warmup_steps", "1", "--train.grad_accum", "2", "--eval.every", "3",
              "--finetune.group_by_length", "false", "--train.device", "cpu", "--log.progress", "false",
              "--log.trackers", "[]", "--log.every", "1"]
    forked(common + ["--train.batch_size", "2", "--train.parallel", parallel, "--log.run_dir", str(tmp_path / "two")])
    assert main(common + ["--train.batch_size", "4", "--log.run_dir", str(tmp_path / "one")]) == 0
    two, one = read_metrics(tmp_path / "two", "train"), read_metrics(tmp_path / "one", "train")
    assert len(one) == 3 and [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert read_metrics(tmp_path / "two", "val")[-1]["reward_accuracy"] == \
        pytest.approx(read_metrics(tmp_path / "one", "val")[-1]["reward_accuracy"])


def test_lora_dpo_on_an_int8_base_refers_to_the_quantised_base(base, tmp_path):
    pytest.importorskip("torchao")
    from lmforge import quant

    train = write_pairs(tmp_path / "pairs.jsonl", pair_lines(12, 27))
    task = dpo_task(base, train, peft={"method": "lora", "base_dtype": "int8"})
    model = task.build_model(pretrained=True)
    plain = [task.answer_logprobs(model.eval(), task.collate(task.train_rows[:4], task.train_examples[:4])).detach()]
    quant.quantise_model(model, "int8")  # as the loop does for a base from a run directory
    assert quant.quantised_layers(model)
    batch = task.collate(task.train_rows[:4], task.train_examples[:4])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.fill_(0.05)
    reference = task.reference_logprobs(model, batch)
    torch.testing.assert_close(reference, plain[0], atol=0.05, rtol=0.01)  # the base, up to int8 rounding
    assert not torch.allclose(task.answer_logprobs(model, batch).detach(), reference)
    task.loss(model.train(), batch).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_A", "lora_B")) for n in grads)

"""
Tandem training (West, Anderson, Kamar, Horvitz, "Tandem Training for Language Models", arXiv 2510.13551)
on GSM8K: RL of a strong model while a frozen weak model randomly takes over its sampling.

- handoff: each next token of a rollout is sampled by the weak model with probability `handoff_prob`
  (0.5), else by the strong one; both read the whole co-written text (`tandem_generate`);
- reward: 1 when the solution's `#### N` is the right answer, else 0 (`reward`);
- baseline: a rollout's reward is compared with the mean of its prompt's other rollouts (`baseline`);
- loss: REINFORCE, -advantage * log p of the tokens the strong model sampled itself (`policy_gradient`).
A rollout only succeeds if the weak model can continue the strong model's text, so the strong model
learns to write text the weak one can follow: on GSM8K it drops the calculator "jargon" <<48/2=24>>
that its warm-start taught it and the weak model never saw. `--handoff-prob 0` is plain RL, the control.

    python tandem.py --weak gpt2 --strong gpt2-medium           # warm-start both, then 100 RL updates
    python tandem.py --weak DIR --strong DIR --data gsm8k/      # local models, local train/test.jsonl
    torchrun --nproc_per_node=4 tandem.py --weak gpt2 --strong gpt2-medium
    python eval.py --strong runs/RUN/final --weak runs/RUN/sft/weak
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache

# -----------------------------------------------------------------------------
# Data and reward: GSM8K problems, the number after "####", the calculator jargon <<...>>


def load_gsm8k(split, data="openai/gsm8k"):
    """[{"question", "answer"}] from the hub, a folder of <split>.jsonl files, or one .jsonl file."""
    path = os.path.join(data, f"{split}.jsonl") if os.path.isdir(data) else data
    if not (os.path.exists(path) or path.endswith(".jsonl")):
        import datasets

        try:
            return [{"question": r["question"], "answer": r["answer"]} for r in datasets.load_dataset(data, "main", split=split)]
        except Exception as e:
            raise UsageError(f"cannot load dataset {data!r} ({type(e).__name__}); offline, pass a folder with "
                             "train.jsonl and test.jsonl, or a .jsonl file, to --data") from None
    problems = []
    with user_input(f"--data {path}"), open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                with user_input(f"--data {path} line {n}"):
                    row = json.loads(line)
                if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("question", "answer"))):
                    raise UsageError(f"--data {path} line {n}: needs string fields 'question' and 'answer'")
                problems.append({"question": row["question"], "answer": row["answer"]})
    if not problems:
        raise UsageError(f"--data {path}: no problems in it")
    return problems


def format_prompt(question):
    return f"Question: {question}\nAnswer:"


def encode_prompts(tokenizer, problems, device, weak_prefix=None):
    """{"strong": (ids, mask), "weak": (ids, mask)}: left-padded prompts, the weak model's with
    `weak_prefix` (the text of --weak-prompt) in front."""
    def encode(prefix):
        enc = tokenizer([prefix + format_prompt(p["question"]) for p in problems], return_tensors="pt", padding=True)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    strong = encode("")
    return {"strong": strong, "weak": encode(weak_prefix) if weak_prefix else strong}


ANSWER = re.compile(r"\s*(-?)\s*\$?\s*(-?)([\d,]*\.?\d+)")
NUMBER = re.compile(r"(-?)\$?([\d,]*\.?\d+)")
JARGON = re.compile(r"<<[^<>]*>>")


def normalize_number(sign, digits):
    whole, _, frac = digits.replace(",", "").partition(".")
    number = str(int(whole or "0")) + (f".{frac.rstrip('0')}" if frac.rstrip("0") else "")
    return "-" + number if sign and number != "0" else number


def extract_answer(text):
    """The number after the first '####', normalised ('$1,000.00' -> '1000'), or None."""
    _, found, after = text.partition("####")
    match = ANSWER.match(after) if found else None
    return normalize_number(match[1] or match[2], match[3]) if match else None


def gold_answer(gold):
    """The normalised gold number, from a whole GSM8K answer ('... #### 18') or a bare number ('18')."""
    return extract_answer(gold if "####" in gold else "####" + gold)


def reward(completion, gold):
    """1.0 when the completion's '#### N' equals the gold answer, else 0.0."""
    answer = extract_answer(completion)
    return float(answer is not None and answer == gold_answer(gold))


def flexible_answer(text):
    """The last number in the text (lm-evaluation-harness's "flexible extract"), normalised."""
    numbers = NUMBER.findall(text)
    return normalize_number(*numbers[-1]) if numbers else None


def has_jargon(text):
    return JARGON.search(text) is not None


def strip_jargon(text):
    return JARGON.sub("", text)


# -----------------------------------------------------------------------------
# The tandem decoder: two models, two KV caches, one text


@dataclass
class Rollout:
    tokens: torch.Tensor  # B x T sampled token ids (eos after a row has ended)
    from_weak: torch.Tensor  # B x T bool: the weak model sampled this token
    mask: torch.Tensor  # B x T bool: a real token, up to and including the row's first eos


def position_ids(attention_mask):
    # A left-padded row counts positions from its first real token (GPT-2's positions are absolute).
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# A causal LM is a body that makes hidden states and an output layer (head) that makes logits; calling
# them apart gives logits only where they are needed. load_model checks that logits == head(body(x)).
def body(model):
    return model.base_model


def head(model):
    return model.get_output_embeddings()


def sample(logits, temperature):
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1).squeeze(-1)


@torch.no_grad()
def tandem_generate(strong, weak, prompts, handoff_prob, max_new_tokens, temperature, eos_token_id,
                    vocab_size=None, max_gap=1, boundaries=None):
    """Sample continuations of left-padded prompts (from encode_prompts), each token by one author. The
    first author is drawn at the start: the weak model with probability `handoff_prob`, else the strong
    one. After every token the author is drawn again when `max_gap` tokens have passed since the last
    draw (1, the default: a new author for every token, the paper's rule), or right after a token that
    `boundaries` (a bool per token id, from word_boundaries) marks. Every author samples from its own
    whole distribution. `vocab_size` cuts output layers padded past the tokenizer. Uses the torch RNG."""
    models = {"strong": strong, "weak": weak}
    B, T, device = prompts["strong"][0].shape[0], max_new_tokens, prompts["strong"][0].device
    coins = (torch.rand(T, B) < handoff_prob).to(device)  # True: a draw at step t picks the weak model
    # A model that no draw picks (at handoff 0 or 1) need not read anything.
    readers = [name for name in models if (coins if name == "weak" else ~coins).any()]
    # Per reader: its prompt and the new tokens in one buffer, one attention mask and the positions for
    # the whole rollout, and a static KV cache, allocated once (a DynamicCache copies itself every step).
    seq = {n: torch.cat([ids, ids.new_full((B, T), eos_token_id)], 1) for n, (ids, _) in prompts.items()}
    attn = {n: torch.cat([mask, mask.new_ones(B, T)], 1) for n, (_, mask) in prompts.items()}
    positions = {n: position_ids(a) for n, a in attn.items()}
    start = {n: ids.shape[1] for n, (ids, _) in prompts.items()}  # where the new tokens begin in seq[n]
    caches = {n: StaticCache(config=models[n].config, max_cache_len=seq[n].shape[1]) for n in readers}
    read = {n: 0 for n in readers}  # how much of seq[n] is in the cache
    from_weak, mask = (torch.zeros(B, T, dtype=torch.bool, device=device) for _ in range(2))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    weak_owns, since_draw = coins[0], torch.zeros(B, dtype=torch.long, device=device)
    for t in range(T):
        logits = {}
        for n in readers:  # each model reads what it has not read yet, and gives its next-token logits
            end = start[n] + t
            out = body(models[n])(seq[n][:, read[n]:end], attention_mask=attn[n], position_ids=positions[n][:, read[n]:end],
                                  cache=caches[n], use_cache=True)
            logits[n], read[n] = head(models[n])(out.last_hidden_state[:, -1])[:, :vocab_size], end
        token = sample(logits[readers[0]] if len(readers) == 1 else
                       torch.where(weak_owns[:, None], logits["weak"], logits["strong"]), temperature)
        token.masked_fill_(done, eos_token_id)
        for n in seq:
            seq[n][:, start[n] + t] = token
        from_weak[:, t], mask[:, t] = weak_owns & ~done, ~done
        done |= token == eos_token_id
        if t == T - 1 or done.all():  # the one host sync per token
            break
        since_draw += 1
        draw = since_draw >= max_gap if boundaries is None else (since_draw >= max_gap) | boundaries[token]
        weak_owns = torch.where(draw, coins[t + 1], weak_owns)
        since_draw.masked_fill_(draw, 0)
    n = t + 1
    return Rollout(seq["strong"][:, start["strong"]:start["strong"] + n], from_weak[:, :n], mask[:, :n])


def handoff_rule(args, tokenizer, device):
    """tandem_generate's handoff rule for --handoff-unit. By word, the follow-up paper's code's rule: the
    author is drawn again right after a token that starts with the byte-level BPE's space marker "Ġ" (or
    SentencePiece's "▁"), or after --max-gap tokens; a newline is no boundary."""
    if args.handoff_unit == "token":
        return {"max_gap": 1}
    surfaces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {"max_gap": args.max_gap, "boundaries": torch.tensor([s.startswith(("Ġ", "▁")) for s in surfaces], device=device)}


def completion_texts(tokenizer, rollout):
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(rollout.tokens, rollout.mask)]


# -----------------------------------------------------------------------------
# REINFORCE with a baseline


def baseline(rewards, kind="loo"):
    """rewards: prompts x samples. The value each sample's reward is compared with."""
    k = rewards.shape[1]
    if kind == "loo":  # leave-one-out: a sample's own reward stays out of its baseline, so it is unbiased
        return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    if kind == "mean":
        return rewards.mean(1, keepdim=True).expand_as(rewards)
    return torch.zeros_like(rewards)


def completion_logprobs(model, prompt, tokens, mask, temperature, vocab_size=None, chunk=32):
    """log p(token) of each generated token under `model` (B x T, differentiable); prompt = (ids, mask).

    The logits are divided by the sampling temperature: these are the log-probs of the distribution
    the rollouts were drawn from, so the gradient is on-policy. No logits are made for the prompt,
    and for the completion only `chunk` positions at a time: the whole B x T x vocab float32 tensor
    would be the largest of the step."""
    seq, attn = torch.cat([prompt[0], tokens], 1), torch.cat([prompt[1], mask.to(prompt[1].dtype)], 1)
    T = tokens.shape[1]
    hidden = body(model)(seq[:, :-1], attention_mask=attn[:, :-1], position_ids=position_ids(attn)[:, :-1]).last_hidden_state[:, -T:]
    # Checkpointing each chunk recomputes its logits in the backward pass instead of keeping them.
    return torch.cat([checkpoint(chosen_logprobs, head(model), hidden[:, i:i + chunk], tokens[:, i:i + chunk],
                                 temperature, vocab_size, use_reentrant=False) for i in range(0, T, chunk)], 1)


def chosen_logprobs(head, hidden, tokens, temperature, vocab_size):
    logits = head(hidden)[..., :vocab_size].float()  # a bf16 log-softmax over 50k tokens is off by tenths
    if temperature > 0:
        logits = logits / temperature
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


def policy_gradient(model, prompt, rollout, advantages, temperature, micro_batch_size, vocab_size=None,
                    amp=nullcontext(), weak_token_weight=0.0):
    """Add the REINFORCE gradient to model's .grad; return the loss.

    loss = -sum(advantage * log p(token)) over the strong model's own tokens (eos included, prompt and
    padding not), divided by the number of those tokens in the whole batch (over every process), so
    micro-batches add up to one batch's gradient. The weak model's tokens are context, not actions,
    unless `weak_token_weight` > 0 lets them in with that weight: the follow-up paper's code has this knob
    (junior_token_loss_weight, 0 in its runs); its paper's lambda_jun, a KL term toward the weak model, is
    another mechanism, and the two agree only at 0."""
    weight = (rollout.mask & ~rollout.from_weak) + weak_token_weight * (rollout.mask & rollout.from_weak)
    total_weight = max(all_sum([weight.sum().item()])[0], 1e-6)
    # Rows with zero advantage or nothing to learn from add nothing: skip their forward pass.
    rows = ((advantages != 0) & (weight > 0).any(1)).nonzero().squeeze(1)
    total = 0.0
    for chunk in (rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)):
        with amp:
            logp = completion_logprobs(model, (prompt[0][chunk], prompt[1][chunk]), rollout.tokens[chunk],
                                       rollout.mask[chunk], temperature, vocab_size)
        loss = -(advantages[chunk, None] * logp * weight[chunk]).sum() / total_weight
        loss.backward()
        total += loss.item()
    return total


def rl_step(strong, weak, tokenizer, optimizer, problems, args, amp=nullcontext(), handoff=None, weak_prefix=None):
    """Tandem rollouts of `problems` (under torchrun, this process's share of the batch), one REINFORCE
    update of `strong`; returns the whole batch's metrics."""
    k = args.samples_per_prompt
    repeated = [p for p in problems for _ in range(k)]  # a prompt's k samples side by side
    prompts = encode_prompts(tokenizer, repeated, next(strong.parameters()).device, weak_prefix)
    with amp:
        rollout = tandem_generate(strong, weak, prompts, args.handoff_prob, args.max_new_tokens, args.temperature,
                                  tokenizer.eos_token_id, len(tokenizer), **(handoff or {}))
    texts = completion_texts(tokenizer, rollout)
    rewards = torch.tensor([reward(t, p["answer"]) for t, p in zip(texts, repeated)]).view(-1, k)
    advantages = (rewards - baseline(rewards, args.baseline)).view(-1).to(rollout.tokens.device)
    loss = policy_gradient(strong, prompts["strong"], rollout, advantages, args.temperature, args.micro_batch_size,
                           len(tokenizer), amp, args.weak_token_weight)
    sum_gradients(strong)  # under torchrun, add up the processes' gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(strong.parameters(), args.grad_clip).item()
    # A non-finite update would poison the weights and AdamW's moments for good: skip it.
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    switches = ((rollout.from_weak[:, 1:] != rollout.from_weak[:, :-1]) & rollout.mask[:, 1:]).sum().item()
    n, rewarded, jargon, n_tokens, n_weak, switches, loss = all_sum(
        [len(texts), rewards.sum().item(), sum(map(has_jargon, texts)), rollout.mask.sum().item(),
         rollout.from_weak.sum().item(), switches, loss])
    return {"reward": rewarded / n, "jargon_rate": jargon / n, "weak_frac": n_weak / max(n_tokens, 1), "handoffs": switches / n,
            "loss": loss, "grad_norm": grad_norm, "mean_tokens": n_tokens / n, "rollouts": int(n), "skipped": skipped}


# -----------------------------------------------------------------------------
# Evaluation: accuracy alone and in tandem, jargon, legibility (eval.py has the command line)


@torch.no_grad()
def solve(strong, weak, tokenizer, problems, handoff_prob, max_new_tokens, temperature, batch_size, progress=None,
          handoff=None, weak_prefix=None):
    """Co-write a solution to every problem: (texts, [(prompts, rollout) per batch])."""
    texts, batches = [], []
    for i in range(0, len(problems), batch_size):
        prompts = encode_prompts(tokenizer, problems[i:i + batch_size], next(strong.parameters()).device, weak_prefix)
        rollout = tandem_generate(strong, weak, prompts, handoff_prob, max_new_tokens, temperature,
                                  tokenizer.eos_token_id, len(tokenizer), **(handoff or {}))
        texts += completion_texts(tokenizer, rollout)
        batches.append((prompts, rollout))
        if progress:
            progress(f"handoff {handoff_prob:g}: {len(texts)}/{len(problems)}")
    return texts, batches


@torch.no_grad()
def weak_nll(weak, batches, vocab_size):
    """Legibility, as the follow-up paper measures it: the weak model's mean negative log-likelihood
    per token (nats) of the rollouts' tokens, read after its own prompts."""
    total, count = 0.0, 0
    for prompts, rollout in batches:
        logp = completion_logprobs(weak, prompts["weak"], rollout.tokens, rollout.mask, 0.0, vocab_size)
        total -= logp[rollout.mask].sum().item()
        count += rollout.mask.sum().item()
    return total / max(count, 1)


def evaluate(strong, weak, tokenizer, problems, handoff_prob=0.5, curve=(), max_new_tokens=256, temperature=0.0,
             batch_size=32, seed=0, amp=nullcontext(), progress=None, runs=None, handoff=None, weak_prefix=None):
    """Accuracy of the strong model alone (handoff 0), the weak one alone (handoff 1) and the pair at
    `handoff_prob`; jargon; legibility (weak_nll of the strong model's solutions); with `curve`, the
    accuracy at each of those handoff probabilities. `runs`, a dict, receives the solutions by handoff
    probability. Runs in its own random stream: it neither depends on nor disturbs training's."""
    runs = {} if runs is None else runs

    def at(p):  # each handoff probability is decoded once, whichever metrics use it
        if p not in runs:
            torch.manual_seed(seed)
            with amp:
                runs[p] = solve(strong, weak, tokenizer, problems, p, max_new_tokens, temperature, batch_size, progress,
                                handoff, weak_prefix)
        return runs[p]

    def accuracy(texts, score=reward):  # and its 95% interval
        k = sum(score(t, p["answer"]) for t, p in zip(texts, problems))
        return k / len(problems), wilson(k, len(problems))

    device = next(strong.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        (solo, solo_batches), (pair, _) = at(0.0), at(handoff_prob)
        with amp:
            nll = weak_nll(weak, solo_batches, len(tokenizer))
        result = {"n": len(problems)}
        for name, texts, score in [("strong", solo, reward), ("weak", at(1.0)[0], reward), ("tandem", pair, reward),
                                   ("flexible", solo, lambda t, gold: float(flexible_answer(t) == gold_answer(gold)))]:
            result[f"{name}_accuracy"], result[f"{name}_accuracy_ci"] = accuracy(texts, score)
        result |= {"jargon_rate": sum(map(has_jargon, solo)) / len(solo),
                   "tandem_jargon_rate": sum(map(has_jargon, pair)) / len(pair),
                   "weak_nll": nll, "mean_tokens": sum(r.mask.sum().item() for _, r in solo_batches) / len(problems)}
        if curve:
            result["curve"] = [dict(zip(["handoff_prob", "accuracy", "ci"], [p, *accuracy(at(p)[0])])) for p in curve]
    return result


def wilson(k, n, z=1.96):
    """The 95% Wilson score interval of a success rate k / n."""
    centre, half = k + z * z / 2, z * math.sqrt(k * (n - k) / n + z * z / 4)
    return [(centre - half) / (n + z * z), (centre + half) / (n + z * z)]


# -----------------------------------------------------------------------------
# The warm-start (SFT): base GPT-2 can't solve GSM8K, so both models first imitate the train solutions


def sft_batch(tokenizer, prompts, completions, max_len):
    """Tokenised prompt + completion + eos, left-padded, with labels only on completion and eos."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    full = [(p + tokenizer(" " + c)["input_ids"] + [tokenizer.eos_token_id])[:max_len] for p, c in zip(prompt_ids, completions)]
    batch = tokenizer.pad({"input_ids": full}, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    n_prompt = torch.tensor([len(p) for p in prompt_ids])
    labels[position_ids(batch["attention_mask"]) < n_prompt[:, None]] = -100
    return batch["input_ids"], batch["attention_mask"], labels


def sft(model, tokenizer, problems, steps, batch_size, lr, jargon_frac, seed, amp=nullcontext(), name="sft"):
    """Fine-tune `model` on GSM8K solutions; a `jargon_frac` share of them keep their <<...>> annotations."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(problems, min(batch_size, len(problems)))
        completions = [p["answer"] if rng.random() < jargon_frac else strip_jargon(p["answer"]) for p in batch]
        ids, attn, labels = (x.to(device) for x in sft_batch(tokenizer, [format_prompt(p["question"]) for p in batch],
                                                               completions, max_positions(model) or 1024))
        with amp:
            loss = model(ids, attention_mask=attn, position_ids=position_ids(attn), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            print(f"{name} step {step}/{steps} | loss {loss.item():.3f}", flush=True)
    return model.eval()


# -----------------------------------------------------------------------------
# Command line and main


def parse_args(argv=None):
    p = Parser(description="Tandem training of a strong LM with a frozen weak partner on GSM8K.")
    # Models and data
    p.add_argument("--weak", default="gpt2", help="frozen weak model: hub name or local folder")
    p.add_argument("--strong", default="gpt2-medium", help="strong model to train: hub name or local folder")
    p.add_argument("--data", default="openai/gsm8k", help="hub dataset, folder with train.jsonl and test.jsonl, or one .jsonl")
    p.add_argument("--weak-prompt", default=None, help="text file put in front of every prompt the weak model reads")
    # The handoffs
    p.add_argument("--handoff-prob", type=number(float, 0, 1), default=0.5, help="chance the weak model samples a token (paper: 0.5; 0: plain RL)")
    p.add_argument("--handoff-unit", default="token", choices=["token", "word"], help="token: a new author for every token (paper); word: at word starts (follow-up)")
    p.add_argument("--max-gap", type=number(int, 1), default=32, help="by word: draw a new author after this many tokens without a word start (follow-up: 32)")
    # RL
    p.add_argument("--steps", type=number(int, 1), default=100, help="RL updates (the paper sees the jargon go in about 20)")
    p.add_argument("--batch-size", type=number(int, 1), default=32, help="prompts per RL update")
    p.add_argument("--samples-per-prompt", type=number(int, 1), default=2, help="rollouts per prompt (paper: 2)")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="longest solution sampled (paper: 256)")
    p.add_argument("--temperature", type=number(float, 0), default=0.7, help="sampling temperature of the rollouts (paper: 0.7; 0: greedy)")
    p.add_argument("--baseline", default="loo", choices=["loo", "mean", "none"], help="loo: mean reward of the prompt's other samples; mean: of all; none: 0")
    p.add_argument("--weak-token-weight", type=number(float, 0), default=0.0, help="weight of the weak model's tokens in the loss (0: context; follow-up code's junior_token_loss_weight)")
    p.add_argument("--lr", type=number(float, 0), default=1e-5, help="AdamW learning rate of the RL updates")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip each update's gradient norm to this")
    p.add_argument("--micro-batch-size", type=number(int, 1), default=16, help="rollouts per forward/backward of the gradient pass (memory)")
    # The warm-start
    p.add_argument("--sft-steps", type=number(int, 0), default=1000, help="warm-start steps for each model (0: use the models as given)")
    p.add_argument("--sft-batch-size", type=number(int, 1), default=16, help="solutions per warm-start step")
    p.add_argument("--sft-lr", type=number(float, 0), default=5e-5, help="AdamW learning rate of the warm-start")
    p.add_argument("--sft-jargon-frac", type=number(float, 0, 1), default=1.0, help="share of the strong model's warm-start solutions that keep <<...>>")
    # Evaluation, the run
    p.add_argument("--eval-every", type=number(int, 0), default=20, help="evaluate every N updates, before the first and after the last (0: never)")
    p.add_argument("--eval-limit", type=number(int, 1), default=200, help="test problems per evaluation")
    p.add_argument("--out", default=None, help="run folder (default runs/<date-time>)")
    p.add_argument("--resume", action="store_true", help="go on with the run in --out from its last checkpoint")
    p.add_argument("--save-every", type=number(int, 0), default=20, help="write a checkpoint every N updates (0: never)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (data order, sampling, handoffs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is one")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype; weights stay float32 (auto: bfloat16 on cuda)")
    p.add_argument("--trust-remote-code", action="store_true", help="let models run code from their folder or hub repo")
    args = p.parse_args(argv)
    if args.baseline == "loo" and args.samples_per_prompt < 2:
        p.error("the leave-one-out baseline needs --samples-per-prompt 2 or more (or --baseline mean or none)")
    if args.resume and not args.out:
        p.error("--resume needs the --out folder of the run to go on with")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(pick_device(args.device))
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world_size} processes: make it a multiple")
    torch.manual_seed(args.seed + rank)  # each process samples rollouts of its own
    amp = autocast(device, args.dtype)
    train, test = load_gsm8k("train", args.data), load_gsm8k("test", args.data)[:args.eval_limit]
    weak_prefix = read_text(args.weak_prompt) if args.weak_prompt else None
    out = run_folder(args)
    if out is None:
        return
    # The warm-start is saved in the run folder, and a run that goes on in that folder reuses it.
    sft_path = {role: os.path.join(out, "sft", role) for role in ("strong", "weak")}
    warm = {role: args.sft_steps > 0 and os.path.exists(path) for role, path in sft_path.items()}
    tokenizer, strong, weak = load_pair(sft_path["strong"] if warm["strong"] else args.strong,
                                        sft_path["weak"] if warm["weak"] else args.weak, device, args.trust_remote_code)
    check_fits(strong, weak, tokenizer, train + test, args.max_new_tokens, weak_prefix)
    start_run(out, args, rank)
    print(f"run folder {out} | device {device} | {world_size} process(es) | {len(train)} train problems")

    # Warm-start: the strong model learns the jargon, the weak one sees the same solutions without it.
    for role, model, jargon_frac in [("strong", strong, args.sft_jargon_frac), ("weak", weak, 0.0)]:
        if args.sft_steps > 0 and not warm[role]:
            sft(model, tokenizer, train, args.sft_steps, args.sft_batch_size, args.sft_lr, jargon_frac, args.seed, amp, f"sft {role}")
            share_weights(model)
            if rank == 0:
                save_model(model, tokenizer, sft_path[role])
    weak.requires_grad_(False)
    handoff = handoff_rule(args, tokenizer, device)

    # RL. The rollouts and the gradient pass both run in eval mode: with dropout on, the gradient
    # would be taken under another policy than the one that sampled.
    optimizer = torch.optim.AdamW(strong.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)  # the same on every process: all draw the same batch, each takes its share
    last_step = resume(out, strong, optimizer, rng, rank) if args.resume else 0
    log = open_metrics(out, last_step, rank)

    def evaluation(step):  # every process evaluates (the same problems, the same result): none waits on another
        result = evaluate(strong, weak, tokenizer, test, args.handoff_prob, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size * args.samples_per_prompt,
                          seed=args.seed, amp=amp, handoff=handoff, weak_prefix=weak_prefix)
        print(f"eval at step {step} | strong {result['strong_accuracy']:.3f} | tandem {result['tandem_accuracy']:.3f} | "
              f"jargon {result['jargon_rate']:.2f} | weak NLL {result['weak_nll']:.3f}", flush=True)
        log({"step": step, "kind": "eval"} | result)

    if args.eval_every and last_step == 0:
        evaluation(0)
    for step in range(last_step + 1, args.steps + 1):
        t0 = time.time()
        batch = rng.sample(train, min(args.batch_size, len(train)))[rank::world_size]
        metrics = rl_step(strong, weak, tokenizer, optimizer, batch, args, amp, handoff, weak_prefix)
        log({"step": step, "kind": "train"} | metrics | {"seconds": time.time() - t0})
        print(f"step {step}/{args.steps} | reward {metrics['reward']:.3f} | jargon {metrics['jargon_rate']:.2f} | "
              f"weak {metrics['weak_frac']:.2f} | loss {metrics['loss']:+.4f} | {time.time() - t0:.1f}s"
              f"{' | non-finite: update skipped' if metrics['skipped'] else ''}", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            evaluation(step)
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(out, strong, optimizer, rng, step, rank)
    if rank == 0:
        save_model(strong, tokenizer, os.path.join(out, "final"))
    print(f"saved {os.path.join(out, 'final')}")


# =============================================================================
# Plumbing. Nothing below changes what is learned: input checks, loading, processes, checkpoints, the run folder.


class UsageError(Exception):
    """Bad input: run_cli prints the message as one line, `error: ...`, and exits with code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input, instead of the usage text
        raise UsageError(message)


def number(kind, low, high=math.inf):
    """An argparse type: a number of `kind` from `low` to `high`."""
    def parse(text):
        if not low <= kind(text) <= high:
            raise argparse.ArgumentTypeError(f"must be {f'from {low} to {high}' if high < math.inf else f'at least {low}'}, got {text}")
        return kind(text)

    parse.__name__ = kind.__name__  # argparse says "invalid int value" when kind() fails
    return parse


@contextmanager
def user_input(what, errors=(OSError, ValueError)):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    """A file, folder or model the user named that can't be read (or made) ends in one line naming it."""
    try:
        yield
    except errors as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip() or type(e).__name__).split("\n")[0]
        raise UsageError(f"{what}: {reason}") from None


def read_text(path):
    with user_input(f"--weak-prompt {path}"), open(path, encoding="utf-8") as f:
        return f.read()


def load_model(name, device, trust_remote_code=False, what=AutoModelForCausalLM):
    """A model in float32 (AdamW's master copy; speed comes from autocast), or with `what`, its tokenizer."""
    if os.path.exists(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UsageError(f"cannot load model {name!r}: it is not a model folder (it has no config.json)")
    offline = os.environ.get("HF_HUB_OFFLINE") and not os.path.exists(name)
    # Exception: what loading a broken model raises depends on the file format and the library.
    with user_input(f"cannot load model {name!r}{' (offline: a hub name needs a network)' if offline else ''}", Exception):
        if what is AutoTokenizer:
            return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code).to(device).eval()
    # The decoder and the loss take logits from the output layer (head); a model that rescales them after it
    # (Gemma 2's soft-capping, Cohere's logit_scale) would be trained on logits it never gives.
    ids = torch.arange(1, 9, device=device)[None]
    with torch.no_grad():
        if not torch.allclose(model(ids).logits, head(model)(body(model)(ids).last_hidden_state), atol=1e-4):
            raise UsageError(f"model {name!r} rescales its logits after its output layer, which tandem.py does not "
                             "support (it takes logits from the output layer): choose another family")
    return model


def load_pair(strong_name, weak_name, device, trust_remote_code=False):
    """(tokenizer, strong, weak). The models pass token ids to each other, so their tokenizers must agree;
    they are compared before any weights load."""
    tokenizer, other = (load_model(name, device, trust_remote_code, AutoTokenizer) for name in (strong_name, weak_name))
    s, w = tokenizer.get_vocab(), other.get_vocab()
    if s != w or tokenizer.eos_token != other.eos_token:
        raise UsageError(f"weak and strong tokenizers differ (vocabularies of {len(w)} and {len(s)} tokens, end tokens "
                         f"{other.eos_token!r} and {tokenizer.eos_token!r}): choose two models of one family")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # GPT-2 has none; padding is masked out anyway
    tokenizer.padding_side = "left"  # so that every row's next token is at its end
    return tokenizer, load_model(strong_name, device, trust_remote_code), load_model(weak_name, device, trust_remote_code)


def max_positions(model):
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)


def check_fits(strong, weak, tokenizer, problems, max_new_tokens, weak_prefix=None):
    """One line now, not an index error mid-run, if the longest prompt and the new tokens overrun a model's positions."""
    prompts = encode_prompts(tokenizer, problems, "cpu", weak_prefix)
    for name, model in [("strong", strong), ("weak", weak)]:
        longest, context = prompts[name][0].shape[1], max_positions(model)  # prompts are padded to the longest
        if context and longest + max_new_tokens > context:
            raise UsageError(f"the longest {name} prompt ({longest} tokens) and --max-new-tokens {max_new_tokens} exceed "
                             f"the {name} model's {context} positions: lower --max-new-tokens or shorten --weak-prompt")


def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    return device


def autocast(device, dtype):
    """bfloat16 autocast on CUDA by default; the weights stay float32 so AdamW's small updates aren't lost."""
    if dtype == "float32" or (dtype == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# Several processes (torchrun): each rolls out its share of every batch; one all-reduce adds up the gradients.


def init_distributed(device):
    """(rank, world_size, device) after joining torchrun's process group; (0, 1, device) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)  # bound to its GPU, NCCL connects (or fails) here
    else:
        dist.init_process_group("gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
    return dist.get_rank(), dist.get_world_size(), device


def distributed():
    return dist.is_available() and dist.is_initialized()


def all_sum(values):
    """Sums of a few numbers over all processes (the numbers themselves in one process)."""
    if not distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(model):
    """Add up the processes' gradients in one all-reduce (each loss is already its share of the batch's)."""
    if distributed():
        params = list(model.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)


def share_weights(model):
    """Every process takes rank 0's weights (after a warm-start, which sampled differently in each)."""
    for p in model.parameters() if distributed() else []:
        dist.broadcast(p.data, 0)


def gather(obj):
    """[obj of every process]."""
    if not distributed():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


# The run folder and checkpoints. Every file is written aside and renamed: a kill never leaves half of one.


def run_folder(args):
    """The run folder, checked before anything is written; None when its run has finished and --resume asks nothing."""
    out = gather(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))[0]  # rank 0's clock for all
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder: choose another --out")
    if os.path.exists(os.path.join(out, "final")):
        if args.resume:
            return print(f"the run in {out} has finished (final/ is there): nothing to resume")
        raise UsageError(f"--out {out} holds a finished run: choose another --out")
    if os.path.exists(os.path.join(out, "metrics.jsonl")) and not args.resume:
        raise UsageError(f"--out {out} holds a started run: add --resume to go on with it, or choose another --out")
    return out


def start_run(out, args, rank):
    if distributed():
        dist.barrier()  # every process has looked at the run folder before rank 0 writes to it
    if rank == 0:
        with user_input(f"--out {out}"):
            os.makedirs(out, exist_ok=True)
        save_json(os.path.join(out, "config.json"), vars(args) | {"out": out})


def save_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def save_model(model, tokenizer, path):
    """A folder that plain transformers loads."""
    shutil.rmtree(path + ".tmp", ignore_errors=True)
    model.save_pretrained(path + ".tmp")
    tokenizer.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)


def save_checkpoint(out, strong, optimizer, rng, step, rank):
    """One dict: all the loop needs to go on exactly where it stopped, with every process's torch RNG."""
    rng_torch = gather((torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None))
    if rank == 0:
        path = os.path.join(out, "checkpoint.pt")
        torch.save({"model": strong.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng_python": rng.getstate(), "rng_torch": rng_torch}, path + ".tmp")
        os.replace(path + ".tmp", path)


def resume(out, strong, optimizer, rng, rank):
    """Load the last checkpoint in `out`; returns the step it was written after (0 if there is none)."""
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.exists(path):
        return print(f"no checkpoint in {out} yet: starting from step 1") or 0
    state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: a checkpoint can't run code
    strong.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    version, internal, gauss = state["rng_python"]
    rng.setstate((version, tuple(internal), gauss))
    if rank < len(state["rng_torch"]):  # else resumed on more processes than before: a new one keeps its seed
        cpu, cuda = state["rng_torch"][rank]
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
    print(f"resuming after step {state['step']} from {path}")
    return state["step"]


def open_metrics(out, last_step, rank):
    """log(row) appends a row to metrics.jsonl (rank 0 alone writes). The rows of a killed run after its
    last checkpoint go first, and a half-written last line, so that each step is there once."""
    if rank != 0:
        return lambda row: None
    path, rows = os.path.join(out, "metrics.jsonl"), []
    if last_step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows += [json.loads(line)] if json.loads(line)["step"] <= last_step else []
                except json.JSONDecodeError:  # the half-written line of a kill
                    pass
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(path + ".tmp", path)
    metrics = open(path, "a")

    def log(row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if row["kind"] == "eval":
            save_json(os.path.join(out, "eval.json"), row)

    return log


def run_cli(main):
    """main(), its return value the exit code; bad input ends in one line on stderr and exit code 2."""
    try:
        code = main() or 0
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun, every process's line stays whole
        code = 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: the same command with --resume goes on from the last checkpoint\n")
        code = 130
    if distributed():
        # Leave the process group and skip the interpreter's shutdown, in which a gloo thread that frees a
        # tensor can abort the process after all its work is done (pytorch PR 179291 describes this).
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_cli(main)

"""
Tandem training (West, Anderson, Kamar, Horvitz, "Tandem Training for Language Models", arXiv 2510.13551)
on GSM8K: RL of a strong model while a frozen weak model randomly takes over its sampling.

- handoff: each token of a rollout is sampled by the weak model with probability `handoff_prob` (0.5),
  else by the strong one, and both go on from the same text (`tandem_generate`);
- reward: 1 when the solution's `#### N` is the right answer, else 0 (`reward`);
- baseline: a rollout's reward is compared with the mean of its prompt's other rollouts (`baseline`);
- loss: REINFORCE, -advantage * log p of the tokens the strong model sampled itself (`policy_gradient`).
A rollout only succeeds if the weak model can continue the strong model's text, so the strong model learns
to write text the weak one follows. The paper reports that on GSM8K it drops the calculator "jargon" <<48/2=24>>
that its warm-start taught it and the weak model never saw; here a toy world (test_tandem.py) and SmolLM2-135M
(README) show it, the full-scale GSM8K run has not been made. `--handoff-prob 0` is plain RL, the control.

    python tandem.py --weak gpt2 --strong gpt2-medium           # warm-start both, then 100 RL updates
    python tandem.py --weak DIR --strong DIR --data gsm8k/      # local models, local train/test.jsonl
    torchrun --nproc_per_node=4 tandem.py --weak gpt2 --strong gpt2-medium
    python eval.py --strong runs/RUN/final --weak runs/RUN/sft/weak
"""

import argparse
import copy
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

# -----------------------------------------------------------------------------
# Data and reward: GSM8K problems, the number after "####", the calculator jargon <<...>>

def load_gsm8k(split, data="openai/gsm8k"):
    """GSM8K's {"question", "answer"} records from the hub, a folder of <split>.jsonl files, or one .jsonl file."""
    path = os.path.join(data, f"{split}.jsonl") if os.path.isdir(data) else data
    if os.path.exists(path) or path.endswith(".jsonl"):
        return read_jsonl(path)
    import datasets
    with user_input(f"--data {data} (offline, give it a folder with train.jsonl and test.jsonl)", Exception):
        rows = datasets.load_dataset(data, "main", split=split)
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]

def format_prompt(question):
    return f"Question: {question}\nAnswer:"

def encode_prompts(tokenizers, problems, device, weak_prefix=None):
    """{"strong": (ids, mask), "weak": (ids, mask)}: left-padded prompts in each model's tokens, the weak one's after
    `weak_prefix`."""
    def encode(tokenizer, prefix):
        enc = tokenizer([prefix + format_prompt(p["question"]) for p in problems], return_tensors="pt", padding=True)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)
    strong, shared = encode(tokenizers["strong"], ""), tokenizers["weak"] is tokenizers["strong"]
    weak = strong if shared and not weak_prefix else encode(tokenizers["weak"], weak_prefix or "")
    return {"strong": strong, "weak": weak}

ANSWER = re.compile(r"\s*(-?)\s*\$?\s*(-?)([\d,]*\.?\d+)\.?\s*")  # the answer ends the solution
JARGON = re.compile(r"<<[^<>]*>>")

def normalize_number(sign, digits):
    whole, _, frac = digits.replace(",", "").partition(".")
    number = str(int(whole or "0")) + (f".{frac.rstrip('0')}" if frac.rstrip("0") else "")
    return "-" + number if sign and number != "0" else number

def extract_answer(text):
    """The number after the first '####', normalised ('$1,000.00' -> '1000'), or None; nothing but the number may follow
    '####' (GSM8K's solutions all end so): text after the answer would be free for RL to fill, and it drifts there."""
    _, found, after = text.partition("####")
    match = ANSWER.fullmatch(after) if found else None
    return normalize_number(match[1] or match[2], match[3]) if match else None

def correct(completion, gold):
    """Is the completion's '#### N' the gold answer (a whole GSM8K answer or a bare number)? Every accuracy is this."""
    answer = extract_answer(completion)
    return answer is not None and answer == extract_answer(gold if "####" in gold else "####" + gold)

def reward(completion, problem):
    """RL's reward for a completion of `problem`: 1.0 when it is correct. Another verifier goes here."""
    return float(correct(completion, problem["answer"]))

def has_jargon(text):
    return JARGON.search(text) is not None

def strip_jargon(text):
    return JARGON.sub("", text)

# -----------------------------------------------------------------------------
# The tandem decoder: two models, two KV caches, one text. A causal LM is a body that makes hidden states (base_model)
# and an output layer that makes logits (get_output_embeddings()): called apart (load_model checks that they give the
# model's own logits), they give logits only where needed.

class Rollout(NamedTuple):
    tokens: torch.Tensor  # B x T sampled token ids (eos after a row has ended)
    from_weak: torch.Tensor  # B x T bool: the weak model sampled this token
    mask: torch.Tensor  # B x T bool: a real token, up to and including the row's first eos
    weak_view: "Rollout" = None  # with two tokenizers: the same rollout in the weak model's tokens
    set_aside: torch.Tensor = None  # with two tokenizers, B x T: the strong model began a unit here, set aside (see
    units: torch.Tensor = None  # tandem_generate_across), and the vocabulary entries that begin one

def position_ids(attention_mask):  # a left-padded row counts from its first real token (GPT-2's positions are absolute)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

def sample(logits, temperature):  # temperature 0: greedy
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits.float() / temperature, -1), 1)[:, 0]

@torch.no_grad()
def tandem_generate(strong, weak, prompts, handoff_prob, max_new_tokens, temperature, eos_token_id, vocab_size=None,
                    max_gap=1, boundaries=None, shared_coins=False, tokenizers=None, weak_boundaries=None):
    """Continue left-padded prompts (from encode_prompts), each token by one author, from its whole distribution. The
    first author is drawn at the start (the weak model with probability `handoff_prob`), and again right after a token
    that `boundaries` marks (a bool per vocabulary entry, from draw_rule) or `max_gap` tokens after the last draw (the
    default, 1: every token, the paper's rule). `shared_coins`: one draw for all rows, so by token one model runs.
    `tokenizers` that differ: the models share text (tandem_generate_across; `weak_boundaries`: the weak model's)."""
    if tokenizers and tokenizers["weak"] is not tokenizers["strong"]:
        return tandem_generate_across(strong, weak, prompts, handoff_prob, max_new_tokens, temperature, tokenizers,
                                      max_gap, {"strong": boundaries, "weak": weak_boundaries}, shared_coins)
    models = {"strong": strong, "weak": weak}
    B, T, device = prompts["strong"][0].shape[0], max_new_tokens, prompts["strong"][0].device
    coins = (torch.rand(T + 1, 1 if shared_coins else B) < handoff_prob).expand(T + 1, B).to(device)  # True: weak
    # Per model: a buffer of prompt and new tokens, its mask and positions, a static KV cache (a DynamicCache copies)
    seq = {n: torch.cat([ids, ids.new_full((B, T), eos_token_id)], 1) for n, (ids, _) in prompts.items()}
    attn = {n: torch.cat([mask, mask.new_ones(B, T)], 1) for n, (_, mask) in prompts.items()}
    positions = {n: position_ids(a) for n, a in attn.items()}
    start = {n: ids.shape[1] for n, (ids, _) in prompts.items()}  # where the new tokens begin in seq[n]
    caches = {n: StaticCache(config=model.config, max_cache_len=seq[n].shape[1]) for n, model in models.items()}
    read = {n: 0 for n in models}  # how much of seq[n] is in model n's cache
    from_weak, mask = (torch.zeros(B, T, dtype=torch.bool, device=device) for _ in range(2))
    done = torch.zeros(B, dtype=torch.bool, device=device)
    weak_owns, since_draw = coins[0], torch.zeros(B, dtype=torch.long, device=device)
    for t in range(T):
        # nonzero() waits for the device, once per token: how many rows a model writes decides whether it runs.
        rows = {n: (owns & ~done).nonzero()[:, 0] for n, owns in [("strong", ~weak_owns), ("weak", weak_owns)]}
        writers = [n for n in models if len(rows[n])]
        if not writers:  # every row has ended
            break
        token = torch.full_like(done, eos_token_id, dtype=torch.long)
        for n in writers:  # a model reads only when it writes: all it has not read yet, in one forward pass
            end = start[n] + t
            out = models[n].base_model(seq[n][:, read[n]:end], attention_mask=attn[n],
                                       position_ids=positions[n][:, read[n]:end], cache=caches[n], use_cache=True)
            # The output layer for its own rows only: with a 50k vocabulary it is a good part of a small model's step.
            logits = models[n].get_output_embeddings()(out.last_hidden_state[rows[n], -1])[:, :vocab_size]
            token[rows[n]] = sample(logits, temperature)
            read[n] = end
        for n in seq:  # whoever wrote it, both models will read it
            seq[n][:, start[n] + t] = token
        from_weak[:, t], mask[:, t] = weak_owns & ~done, ~done
        done |= token == eos_token_id
        since_draw += 1
        draw = since_draw >= max_gap if boundaries is None else (since_draw >= max_gap) | boundaries[token]
        weak_owns = torch.where(draw, coins[t + 1], weak_owns)
        since_draw.masked_fill_(draw, 0)
    length = int(mask.any(0).sum())  # tokens written: to the last row's eos, or T
    return Rollout(seq["strong"][:, start["strong"]:start["strong"] + length], from_weak[:, :length], mask[:, :length])

class Row:
    """One rollout's state when the models share text, not tokens; each dict is by model ("strong", "weak")."""
    def __init__(self, prompt, author):
        self.stream = prompt  # token ids: the prompt, then what the model read and wrote (a stream only grows)
        self.start = {n: len(ids) for n, ids in prompt.items()}  # where its new tokens begin
        self.weak_wrote = {n: [] for n in prompt}  # per new token: the weak model wrote it
        self.cached = {n: 0 for n in prompt}  # how much of the stream is in the model's cache
        self.unread = {n: "" for n in prompt}  # the text the other model wrote since this one last wrote
        self.set_aside = []  # where in its new tokens the strong model began a unit that was set aside
        self.author, self.run, self.since_draw, self.ended = author, 0, 0, None  # run: the author's tokens so far

    def add(self, n, ids, by_weak):
        self.stream[n] += ids
        self.weak_wrote[n] += [by_weak] * len(ids)

    def read(self, n, tokenizer):  # n is about to write: the other's text since n last wrote, in n's tokens
        self.add(n, encode_piece(tokenizer, self.unread[n]), n == "strong")
        self.unread[n] = ""

    def hand_over(self, tokenizers, set_aside=False):  # the author's run is over: the other model reads its text
        self.unread[OTHER[self.author]] += piece_text(tokenizers[self.author], self.stream[self.author], self.run)
        if set_aside and self.author == "strong":
            self.set_aside.append(len(self.stream["strong"]) - self.start["strong"])
        self.run = 0

OTHER = {"strong": "weak", "weak": "strong"}

@torch.no_grad()
def tandem_generate_across(strong, weak, prompts, handoff_prob, max_new_tokens, temperature, tokenizers, max_gap,
                           boundaries, shared_coins):
    """tandem_generate for two tokenizers: the models share text. Each keeps its own token stream and cache and, about
    to write, reads the text written since it last wrote, in its own tokens (a Row holds all of a rollout's state);
    the strong model's loss is on its stream. A draw falls due before a token that begins a unit, not after it: with
    --handoff-unit word, a word's start, where both tokenizers cut the text, so each reads its partner's words as it
    would write them (a partner that reads a cut inside one of its tokens continues badly: README). If the draw names
    the other model, the token is set aside and the other writes from there; the strong model's choice to begin a
    unit there is its action (Rollout.set_aside, in the loss). Draws wait until the run decodes to whole text."""
    models = {"strong": strong, "weak": weak}
    B, device = prompts["strong"][0].shape[0], prompts["strong"][0].device
    coins = (torch.rand(max_new_tokens + 1, 1 if shared_coins else B) < handoff_prob).expand(-1, B).tolist()
    eos, units = {n: tok.eos_token_id for n, tok in tokenizers.items()}, boundaries["strong"]
    boundaries = {n: None if b is None else b.tolist() for n, b in boundaries.items()}  # read row by row, on the host
    rows = []
    for r in range(B):
        prompt = {n: ids[r][mask[r].bool()].tolist() for n, (ids, mask) in prompts.items()}
        rows.append(Row(prompt, "weak" if coins[0][r] else "strong"))
    # A DynamicCache, as how long a stream grows is not known, and a mask that grows with it (0: a hole, see read_pass)
    caches = {n: DynamicCache(config=m.config) for n, m in models.items()}
    attn = {n: prompts[n][1][:, :0] for n in models}
    for t in range(max_new_tokens):
        writers = {n: [r for r, row in enumerate(rows) if row.author == n and not row.ended] for n in models}
        for n in [n for n in models if writers[n]]:
            for r in writers[n]:  # lazily: what the other wrote since n last wrote
                rows[r].read(n, tokenizers[n])
            hidden, attn[n] = read_pass(models[n], caches[n], attn[n], rows, n, eos[n])
            logits = models[n].get_output_embeddings()(hidden[writers[n]])[:, :len(tokenizers[n])]
            for r, token in zip(writers[n], sample(logits, temperature).tolist()):
                row = rows[r]
                due = row.since_draw >= max_gap or boundaries[n] is None or boundaries[n][token]
                # Decoded, a run ends in U+FFFD while a character's bytes are missing
                text = piece_text(tokenizers[n], row.stream[n], min(row.run, 4)) if due and row.run else ""
                if text and text[-1] != "\ufffd":
                    row.since_draw, author = 0, "weak" if coins[t + 1][r] else "strong"
                    if author != n:
                        row.hand_over(tokenizers, set_aside=True)
                        row.author = author
                        continue
                row.add(n, [token], n == "weak")  # an end token ends the row; the other stream gets its own end below
                row.run, row.since_draw, row.ended = row.run + 1, row.since_draw + 1, n if token == eos[n] else None
    for row in rows:  # what each model has not read yet: the strong stream is the rollout, the weak one scores it
        row.hand_over(tokenizers)
        for n in models:  # and the other's end token as its own, when the other ended the row
            row.read(n, tokenizers[n])
            row.add(n, [eos[n]] if row.ended == OTHER[n] else [], n == "strong")
    def rollout(n):  # each row's new tokens, then eos (masked out) to the longest's length
        new = [row.stream[n][row.start[n]:] for row in rows]
        def pad(lists, fill):
            return torch.tensor([x + [fill] * (max(map(len, new)) - len(x)) for x in lists], device=device)
        weak_wrote, mask = [row.weak_wrote[n] for row in rows], [[True] * len(x) for x in new]
        return Rollout(pad(new, eos[n]), pad(weak_wrote, False), pad(mask, False))
    strong = rollout("strong")
    set_aside = torch.zeros_like(strong.mask)
    for r, row in enumerate(rows):  # where the strong stream goes on (a rollout cut short may not)
        set_aside[r, [i for i in row.set_aside if i < strong.mask[r].sum()]] = True
    return strong._replace(weak_view=rollout("weak"), set_aside=set_aside, units=units)

def read_pass(model, cache, attn, rows, n, pad_id):
    """One forward pass of model n over every row's tokens that are not in its cache yet, right-aligned (the holes on
    the left of a shorter row are masked): (each row's last hidden state, the mask). The holes then leave the cache
    (where a key sits does not matter to attention, and positions count the mask): it is as long as the longest row."""
    new = [row.stream[n][row.cached[n]:] for row in rows]
    for row in rows:
        row.cached[n] = len(row.stream[n])
    width = max(map(len, new))
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in new], device=attn.device)
    attn = torch.cat([attn, torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in new], device=attn.device)], 1)
    out = model.base_model(ids, attention_mask=attn, position_ids=position_ids(attn)[:, -width:], cache=cache,
                           use_cache=True)
    keep = attn.argsort(1)[:, -int(attn.sum(1).max()):]  # a row's tokens, at its end
    for layer in cache.layers:
        index = keep[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
        layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)
    return out.last_hidden_state[:, -1], attn.gather(1, keep)

def encode_piece(tokenizer, text):
    """`text` in the middle of a stream: after an anchor (the end token, dropped), so no BOS or "▁" goes first."""
    return tokenizer(tokenizer.eos_token + text, add_special_tokens=False)["input_ids"][1:] if text else []

def piece_text(tokenizer, ids, k):
    """The text of the last k of `ids`, special tokens left out, decoded after a few before them (so that a first "▁"
    keeps its space)."""
    before, whole = (tokenizer.decode(ids[max(len(ids) - k - 4, 0):end], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False) for end in (len(ids) - k, len(ids)))
    return whole[len(before):]

# --handoff-unit: the next token's author is drawn again right after a token whose surface form (its string in the
# vocabulary) the unit accepts, and --max-gap tokens after the last draw. A new unit is one more entry.
HANDOFF_UNITS = {"token": lambda surface: True,  # the paper's: every token
                 # the follow-up's code: after a word's first token (byte-level "Ġ", SentencePiece "▁"), no newline
                 "word": lambda surface: surface.startswith(("Ġ", "▁"))}

def draw_rule(unit, max_gap, tokenizers, device):  # tandem_generate's keywords for --handoff-unit and --max-gap
    """Each author's unit starts, in its own tokens (one tokenizer: the same). Two tokenizers share words, not tokens
    (README), so their unit is a word unless another is named."""
    across = tokenizers["weak"] is not tokenizers["strong"]
    if unit == "token" and across:
        raise UsageError("--handoff-unit token: two tokenizers share no tokens, so hand off by word (the default)")
    unit = unit or ("word" if across else "token")
    boundaries = {}
    for n, tok in tokenizers.items():
        surfaces = tok.convert_ids_to_tokens(list(range(len(tok))))
        boundaries[n] = torch.tensor([HANDOFF_UNITS[unit](s) for s in surfaces], device=device)
    return {"boundaries": boundaries["strong"], "weak_boundaries": boundaries["weak"], "max_gap": max_gap}

def completion_texts(tokenizer, rollout):
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(rollout.tokens, rollout.mask)]

# -----------------------------------------------------------------------------
# REINFORCE with a baseline

def baseline(rewards, kind="loo"):
    """rewards: prompts x samples. The value each sample's reward is compared with."""
    k = rewards.shape[1]
    if kind == "loo":  # leave-one-out: a sample's own reward stays out of its baseline, which keeps it unbiased
        return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    if kind == "mean":
        return rewards.mean(1, keepdim=True).expand_as(rewards)
    return torch.zeros_like(rewards)

def completion_logprobs(model, prompt, tokens, mask, temperature, vocab_size=None, chunk=32, set_aside=None,
                        units=None):
    """log p(token) of each generated token under `model` (B x T, differentiable); prompt = (ids, mask). Logits divided
    by the sampling temperature (on-policy), for the completion only, `chunk` positions at a time, each recomputed in
    the backward pass instead of kept: B x T x vocab in float32 would be the step's largest tensor. Where the model
    began a unit that was `set_aside` (two tokenizers), the log-probability of beginning one: `units` says which."""
    seq, attn = torch.cat([prompt[0], tokens], 1), torch.cat([prompt[1], mask.to(prompt[1].dtype)], 1)
    hidden = model.base_model(seq[:, :-1], attention_mask=attn[:, :-1], position_ids=position_ids(attn)[:, :-1])
    hidden, T = hidden.last_hidden_state[:, -tokens.shape[1]:], tokens.shape[1]
    set_aside = torch.zeros_like(mask) if set_aside is None else set_aside
    return torch.cat([checkpoint(chosen_logprobs, model.get_output_embeddings(), hidden[:, i:i + chunk],
                                 tokens[:, i:i + chunk], temperature, vocab_size, set_aside[:, i:i + chunk], units,
                                 use_reentrant=False) for i in range(0, T, chunk)], 1)

def chosen_logprobs(head, hidden, tokens, temperature, vocab_size, set_aside, units):
    logits = head(hidden)[..., :vocab_size].float()  # a bf16 log-softmax over 50k tokens is off by tenths
    logits = logits / (temperature or 1.0)  # 0 is greedy decoding (evaluation), which has no distribution: T = 1
    chosen = logits.gather(-1, tokens[..., None]).squeeze(-1)
    if set_aside.any():  # units None: every token begins one
        began = logits if units is None else logits.masked_fill(~units[:logits.shape[-1]], -torch.inf)
        chosen = torch.where(set_aside, began.logsumexp(-1), chosen)
    return chosen - logits.logsumexp(-1)

def chunk_logprobs(model, prompt, rollout, rows, temperature, vocab_size):  # completion_logprobs of some rows
    set_aside = None if rollout.set_aside is None else rollout.set_aside[rows]
    return completion_logprobs(model, (prompt[0][rows], prompt[1][rows]), rollout.tokens[rows], rollout.mask[rows],
                               temperature, vocab_size, set_aside=set_aside, units=rollout.units)

def policy_gradient(model, prompt, rollout, advantages, temperature, micro_batch_size, vocab_size=None,
                    amp=nullcontext(), weak_token_weight=0.0, rows=None, old_logp=None, ref_logp=None, args=None):
    """Add the REINFORCE gradient to model's .grad; return the loss: -sum(advantage * log p(token)) over the strong
    model's own tokens (eos included) over their number in the whole batch, on every process, so that micro-batches add
    up to one batch's gradient. Weak tokens are context, not actions, unless `weak_token_weight` w counts each w times
    a strong one (the follow-up's code's junior_token_loss_weight, 0 in its runs; not its paper's KL term). The
    follow-up's GRPO (below) takes `rows`, a mini-batch, the log-probs of the policy that sampled (`old_logp`, for the
    clipped ratio) and of the frozen reference (`ref_logp`, for the k3 penalty), and `args`, their flags."""
    rows = torch.arange(len(advantages), device=advantages.device) if rows is None else rows
    own = rollout.mask & ~rollout.from_weak  # the strong model's actions: its tokens, the units it began (set aside)
    own = own if rollout.set_aside is None else own | rollout.set_aside
    weight = own + weak_token_weight * (rollout.mask & ~own)
    if args is not None and args.loss_agg == "seq-mean-token-mean":  # each rollout's tokens weigh 1 in all
        weight = weight / weight.sum(1, keepdim=True).clamp(min=1e-6)
    total_weight = max(all_sum({"weight": weight[rows].sum().item()})["weight"], 1e-6)
    if old_logp is None and ref_logp is None:  # rows with zero advantage or no token to learn add nothing: skip them
        rows = rows[(advantages[rows] != 0) & (weight[rows] > 0).any(1)]
    total = 0.0
    for chunk in (rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)):
        with amp:
            logp = chunk_logprobs(model, prompt, rollout, chunk, temperature, vocab_size)
        objective = advantages[chunk, None] * logp  # REINFORCE: its gradient is advantage x grad log p
        if old_logp is not None:
            objective = clipped_objective(logp - old_logp[chunk], advantages[chunk, None], args)
        if ref_logp is not None:
            objective = objective - args.kl_coef * k3(logp, ref_logp[chunk])
        loss = -(objective * weight[chunk]).sum() / total_weight
        loss.backward()
        total += loss.item()
    return total

# Beyond REINFORCE, the follow-up's GRPO (CSSLab/Tandem-RLVR train/tandem_grpo.sh, verl's defaults): advantages over the
# group's standard deviation, several optimizer steps per batch of rollouts through PPO's clipped ratio, and a k3 KL
# penalty toward a frozen reference. With their defaults (one step, no KL) rl_step is REINFORCE.

def advantages_of(rewards, args):  # rewards: prompts x samples; --scale-rewards group: GRPO's (verl: unbiased, + 1e-6)
    advantages = rewards - baseline(rewards, args.baseline)
    return advantages / (rewards.std(1, keepdim=True) + 1e-6) if args.scale_rewards == "group" else advantages

def clipped_objective(log_ratio, advantages, args):
    """PPO's clipped surrogate, min(ratio x A, clip(ratio, 1 - low, 1 + high) x A), with verl's dual clip: where A < 0
    it is at least clip_ratio_c x A. ratio = pi / pi_old; exactly 1 at a batch's first step, where it is REINFORCE's."""
    ratio = log_ratio.clamp(-20, 20).exp()  # verl's clamp
    high = args.clip_ratio if args.clip_ratio_high is None else args.clip_ratio_high
    surrogate = torch.min(ratio * advantages, ratio.clamp(1 - args.clip_ratio, 1 + high) * advantages)
    return torch.where(advantages < 0, torch.max(surrogate, args.clip_ratio_c * advantages), surrogate)

def k3(logp, reference):  # verl's low_var_kl: exp(r) - r - 1 for r = log pi_ref - log pi, clamped as verl does
    r = (reference - logp).clamp(-20, 20)
    return (r.exp() - r - 1).clamp(-10, 10)

@torch.no_grad()
def logprobs_of(model, prompt, rollout, minis, temperature, micro_batch_size, vocab_size, amp):
    """log p of every token under `model`, in the micro-batches policy_gradient takes them (so that at a batch's first
    step the ratio is exactly 1)."""
    logp = torch.zeros(rollout.tokens.shape, device=rollout.tokens.device)
    for rows in minis:
        for chunk in (rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)):
            with amp:
                logp[chunk] = chunk_logprobs(model, prompt, rollout, chunk, temperature, vocab_size)
    return logp

def rl_step(strong, weak, tokenizers, optimizer, problems, args, amp=nullcontext(), rule=None, weak_prefix=None,
            reference=None):
    """Tandem rollouts of `problems` (under torchrun, this process's share of the batch), sampled once, then an
    optimizer step per mini-batch and epoch (one: REINFORCE, the paper's); returns the whole batch's metrics. `rule`:
    when authors are drawn, from draw_rule; `reference`: the frozen model of the KL penalty (--kl-coef)."""
    k, device = args.samples_per_prompt, next(strong.parameters()).device
    repeated = [p for p in problems for _ in range(k)]  # side by side, so that view(-1, k) below is a prompt's samples
    prompts = encode_prompts(tokenizers, repeated, device, weak_prefix)
    tokenizer = tokenizers["strong"]
    with amp:
        rollout = tandem_generate(strong, weak, prompts, args.handoff_prob, args.max_new_tokens, args.temperature,
                                  tokenizer.eos_token_id, len(tokenizer), shared_coins=args.coins == "batch",
                                  tokenizers=tokenizers, **(rule or {}))
    texts = completion_texts(tokenizer, rollout)
    rewards = torch.tensor([reward(t, p) for t, p in zip(texts, repeated)]).view(-1, k)
    advantages = advantages_of(rewards, args).view(-1).to(device)
    # The mini-batches: whole prompts, in order (verl's, without shuffling), each epoch
    minis = torch.arange(len(repeated), device=device).chunk(args.batch_size // args.mini_batch_size)
    def logprobs(model):  # before the first step, in the micro-batches of the loss
        return logprobs_of(model, prompts["strong"], rollout, minis, args.temperature, args.micro_batch_size,
                           len(tokenizer), amp)
    old_logp = logprobs(strong) if len(minis) * args.ppo_epochs > 1 else None  # pi_old: the policy that sampled
    ref_logp = logprobs(reference) if reference is not None else None
    loss, skipped = 0.0, False
    for rows in minis * args.ppo_epochs:
        step_loss = policy_gradient(strong, prompts["strong"], rollout, advantages, args.temperature,
                                    args.micro_batch_size, len(tokenizer), amp, args.weak_token_weight, rows, old_logp,
                                    ref_logp, args)
        sum_gradients(strong)  # under torchrun, add up the processes' gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(strong.parameters(), args.grad_clip).item()
        finite = math.isfinite(step_loss) and math.isfinite(grad_norm)  # NaN would poison weights and AdamW for good
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss, skipped = loss + step_loss, skipped or not finite
    switches = ((rollout.from_weak[:, 1:] != rollout.from_weak[:, :-1]) & rollout.mask[:, 1:]).sum().item()
    # The weak model's share of the text, in characters: the same whatever the two tokenizers
    weak_chars = sum(len(tokenizer.decode(row[keep & weak], skip_special_tokens=True))
                     for row, keep, weak in zip(rollout.tokens, rollout.mask, rollout.from_weak))
    total = all_sum({"reward": rewards.sum().item(), "rollout_jargon_rate": sum(map(has_jargon, texts)),
                     "switches": switches, "rollout_tokens": rollout.mask.sum().item(), "rollouts": len(texts),
                     "weak_chars": weak_chars, "chars": sum(map(len, texts)), "loss": loss})  # the whole batch's
    per_rollout = {k: total[k] / total["rollouts"] for k in ["reward", "rollout_jargon_rate", "switches",
                                                             "rollout_tokens"]}
    return per_rollout | {"weak_frac": total["weak_chars"] / max(total["chars"], 1), "loss": total["loss"],
                          "grad_norm": grad_norm, "rollouts": int(total["rollouts"]), "skipped": skipped}

# -----------------------------------------------------------------------------
# Evaluation: accuracy alone and in tandem, jargon, legibility (eval.py is its command line)

@torch.no_grad()
def evaluate(strong, weak, tokenizers, problems, handoff_prob=0.5, curve=(), max_new_tokens=256, temperature=0.0,
             batch_size=32, seed=0, amp=nullcontext(), runs=None, rule=None, weak_prefix=None):
    """Accuracy of the strong model alone (handoff 0), the weak one alone (1), the pair at `handoff_prob` and at each of
    `curve`; jargon; legibility. Every rollout draws its own coins, so problems stay independent. `runs` (a dict) gets
    (texts, [(prompts, rollout) per batch]) by handoff probability. Its own random stream, apart from training's."""
    runs, device, n, t0 = {} if runs is None else runs, next(strong.parameters()).device, len(problems), time.time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), amp:
        for p in dict.fromkeys([0.0, handoff_prob, 1.0, *curve]):  # each handoff probability decoded once
            if p in runs:
                continue
            torch.manual_seed(seed)
            texts, batches = runs[p] = ([], [])
            for i in range(0, n, batch_size):
                prompts = encode_prompts(tokenizers, problems[i:i + batch_size], device, weak_prefix)
                rollout = tandem_generate(strong, weak, prompts, p, max_new_tokens, temperature,
                                          tokenizers["strong"].eos_token_id, len(tokenizers["strong"]),
                                          tokenizers=tokenizers, **(rule or {}))
                texts.extend(completion_texts(tokenizers["strong"], rollout))
                batches.append((prompts, rollout))
            print(f"  decoded {n} problems at handoff {p:g} ({time.time() - t0:.0f}s)", flush=True)
        # Legibility as the follow-up paper measures it: the weak model's NLL of the strong's solutions, in its tokens
        nll, tokens = 0.0, 0
        for prompts, rollout in runs[0.0][1]:
            view = rollout.weak_view or rollout
            logp = completion_logprobs(weak, prompts["weak"], view.tokens, view.mask, 0.0, len(tokenizers["weak"]))
            nll, tokens = nll - logp[view.mask].sum().item(), tokens + view.mask.sum().item()
        result = {"n": n, "tandem_handoff_prob": handoff_prob, "weak_nll": nll / max(tokens, 1),  # nats per token,
                  "weak_nll_per_char": nll / max(sum(map(len, runs[0.0][0])), 1)}  # and per character
    def accuracy(p):
        return sum(correct(t, q["answer"]) for t, q in zip(runs[p][0], problems)) / n
    result |= {"strong_accuracy": accuracy(0.0), "weak_accuracy": accuracy(1.0),
               "tandem_accuracy": accuracy(handoff_prob),
               "strong_jargon_rate": sum(map(has_jargon, runs[0.0][0])) / n,
               "tandem_jargon_rate": sum(map(has_jargon, runs[handoff_prob][0])) / n,
               "strong_tokens": sum(r.mask.sum().item() for _, r in runs[0.0][1]) / n}
    if curve:
        result["curve"] = [{"handoff_prob": p, "accuracy": accuracy(p)} for p in curve]
    return result

# -----------------------------------------------------------------------------
# The warm-start (SFT): base GPT-2 can't solve GSM8K, so both models first imitate the train solutions

def sft(model, tokenizer, problems, steps, batch_size, lr, jargon_frac, seed, amp=nullcontext(), name="sft"):
    """Fine-tune `model` on GSM8K solutions; a `jargon_frac` share of them keep their <<...>> annotations."""
    rng, opt, shown = random.Random(seed), torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), time.time()
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(problems, min(batch_size, len(problems)))
        prompts = tokenizer([format_prompt(p["question"]) for p in batch])["input_ids"]
        solutions = tokenizer([" " + (p["answer"] if rng.random() < jargon_frac else strip_jargon(p["answer"]))
                               for p in batch], add_special_tokens=False)["input_ids"]  # no BOS mid-text
        enc = tokenizer.pad({"input_ids": [(p + s + [tokenizer.eos_token_id])[:max_positions(model)]
                                           for p, s in zip(prompts, solutions)]}, return_tensors="pt").to(model.device)
        ids, attn = enc["input_ids"], enc["attention_mask"]
        in_prompt = position_ids(attn) < torch.tensor([len(p) for p in prompts], device=model.device)[:, None]
        with amp:  # the loss is on the solution and its eos, not on the prompt or the padding
            loss = model(ids, attention_mask=attn, position_ids=position_ids(attn),
                         labels=ids.masked_fill(in_prompt | (attn == 0), -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if time.time() - shown > 10 or step == steps:  # a line every 10 s: a CPU's warm-start takes minutes
            print(f"{name} step {step}/{steps} | loss {loss.item():.3f}", flush=True)
            shown = time.time()
    return model.eval()

# -----------------------------------------------------------------------------
# Command line and main

def handoff_flags(p):  # who writes which token: the flags that tandem.py and eval.py share
    p.add_argument("--handoff-prob", type=number(float, 0, 1), default=0.5,
                   help="chance a draw picks the weak model (paper: 0.5; 0: the strong model alone)")
    p.add_argument("--handoff-unit", default=None, choices=list(HANDOFF_UNITS),
                   help="token: a draw per token (paper; default with one tokenizer); word: at word starts "
                   "(follow-up; default with two tokenizers, which share no tokens)")
    p.add_argument("--max-gap", type=number(int, 1), default=32,
                   help="also a draw this long after the last (follow-up: 32)")

def parse_args(argv=None):
    p = Parser(description="Tandem training of a strong LM with a frozen weak partner on GSM8K.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows every default
    g = p.add_argument_group("models and data")
    g.add_argument("--weak", default="gpt2", help="frozen weak model: hub name or local folder")
    g.add_argument("--strong", default="gpt2-medium", help="strong model to train: hub name or local folder")
    g.add_argument("--data", default="openai/gsm8k",
                   help="hub dataset, a folder of train.jsonl, test.jsonl, or a .jsonl")
    g.add_argument("--weak-prompt", default=None, help="text file put in front of every prompt the weak model reads")
    g = p.add_argument_group("handoffs (--handoff-prob 0: plain RL)")
    handoff_flags(g)
    g.add_argument("--coins", default="row", choices=["row", "batch"],
                   help="row: every rollout draws its own; batch: one draw per step for all")
    g = p.add_argument_group("RL")
    g.add_argument("--steps", type=number(int, 1), default=100, help="RL updates (paper: the jargon goes in about 20)")
    g.add_argument("--batch-size", type=number(int, 1), default=32, help="prompts per RL update")
    g.add_argument("--samples-per-prompt", type=number(int, 1), default=2, help="rollouts per prompt (paper: 2)")
    g.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="longest solution sampled (paper: 256)")
    g.add_argument("--temperature", type=number(float, 0), default=0.7,
                   help="rollouts' sampling temperature (paper: 0.7)")
    g.add_argument("--baseline", default="loo", choices=["loo", "mean", "none"],
                   help="loo: the mean reward of the prompt's other samples")
    g.add_argument("--weak-token-weight", type=number(float, 0), default=0.0,
                   help="weight of the weak model's tokens in the loss (0: none)")
    g.add_argument("--lr", type=number(float, 0), default=1e-5, help="AdamW learning rate of the RL updates")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip each update's gradient norm to this")
    g.add_argument("--micro-batch-size", type=number(int, 1), default=16, help="rollouts per forward/backward (memory)")
    g = p.add_argument_group("beyond REINFORCE: the follow-up's GRPO (its defaults are REINFORCE)")
    g.add_argument("--scale-rewards", default="none", choices=["none", "group"],
                   help="group: advantages over the group's std, as GRPO (verl's norm_adv_by_std_in_grpo; TRL's name)")
    g.add_argument("--mini-batch-size", type=number(int, 1), default=None,
                   help="prompts per optimizer step (verl's ppo_mini_batch_size; default: --batch-size, one step)")
    g.add_argument("--ppo-epochs", type=number(int, 1), default=1,
                   help="optimizer passes over each batch of rollouts (verl's ppo_epochs; TRL's num_iterations)")
    g.add_argument("--clip-ratio", type=number(float, 0), default=0.2,
                   help="PPO's clip, low side, with several steps a batch (verl's clip_ratio; TRL's epsilon)")
    g.add_argument("--clip-ratio-high", type=number(float, 0), default=None,
                   help="its high side (verl's clip_ratio_high; TRL's epsilon_high; default: --clip-ratio)")
    g.add_argument("--clip-ratio-c", type=number(float, 1), default=3.0,
                   help="dual clip: a negative advantage's loss at most this x its ratio (verl's clip_ratio_c)")
    g.add_argument("--kl-coef", type=number(float, 0), default=0.0,
                   help="k3 KL penalty toward the warm-start, a frozen copy (verl's kl_loss_coef; TRL: beta)")
    g.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean"],
                   help="a mini-batch's mean over its tokens, or over rollouts of each one's (verl's loss_agg_mode)")
    g = p.add_argument_group("warm-start")
    g.add_argument("--sft-steps", type=number(int, 0), default=1000,
                   help="warm-start steps, strong model (0: as given)")
    g.add_argument("--weak-sft-steps", type=number(int, 0), default=None,
                   help="warm-start steps of the weak model (0: as given; default: --sft-steps)")
    g.add_argument("--sft-batch-size", type=number(int, 1), default=16, help="solutions per warm-start step")
    g.add_argument("--sft-lr", type=number(float, 0), default=5e-5, help="AdamW learning rate of the warm-start")
    g.add_argument("--sft-jargon-frac", type=number(float, 0, 1), default=1.0,
                   help="share of the strong model's solutions that keep <<...>>")
    g = p.add_argument_group("evaluation and the run")
    g.add_argument("--eval-every", type=number(int, 0), default=20,
                   help="evaluate every N updates, first, last (0: never)")
    g.add_argument("--eval-limit", type=number(int, 1), default=200, help="test problems per evaluation")
    g.add_argument("--eval-batch-size", type=number(int, 1), default=64, help="test problems decoded together")
    g.add_argument("--eval-handoff-prob", type=number(float, 0, 1), default=0.5,
                   help="the pair's handoff probability in evaluations, plain RL's too")
    g.add_argument("--out", default=None, help="run folder (default runs/<date-time>)")
    g.add_argument("--resume", action="store_true", help="go on with the run in --out from its last checkpoint")
    g.add_argument("--save-every", type=number(int, 0), default=20, help="a checkpoint every N updates (0: never)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (data order, sampling, handoffs)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is one")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bf16 on cuda)")
    g.add_argument("--trust-remote-code", action="store_true", help="let models run code from their folder or hub repo")
    args = p.parse_args(argv)
    if args.baseline == "loo" and args.samples_per_prompt < 2:
        p.error("the leave-one-out baseline needs --samples-per-prompt 2 or more (or --baseline mean or none)")
    if args.resume and not args.out:
        p.error("--resume needs the --out folder of the run to go on with")
    args.mini_batch_size = args.mini_batch_size or args.batch_size
    if args.batch_size % args.mini_batch_size:
        p.error(f"--batch-size {args.batch_size} does not split into mini-batches of {args.mini_batch_size}")
    if args.scale_rewards == "group" and args.samples_per_prompt < 2:
        p.error("--scale-rewards group needs --samples-per-prompt 2 or more (a group of one has no spread)")
    if args.temperature == 0:
        p.error("--temperature 0 samples greedily: rollouts need a temperature above 0 to have a policy gradient")
    return args

def main(argv=None):
    args = parse_args(argv)
    device, amp = pick_device(args.device, args.dtype)
    rank, world_size, device = init_distributed(device)
    if args.batch_size % world_size or (args.batch_size // world_size) % (args.batch_size // args.mini_batch_size):
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world_size} processes and its "
                         "mini-batches: make it a multiple")
    torch.manual_seed(args.seed + rank)  # each process samples rollouts of its own
    train, test = load_gsm8k("train", args.data), load_gsm8k("test", args.data)[:args.eval_limit]
    weak_prefix = read_text(args.weak_prompt) if args.weak_prompt else None
    if (out := run_folder(args)) is None:
        return
    # The warm-start is saved in the run folder, and a resumed run takes it from there.
    sft_path = {role: os.path.join(out, "sft", role) for role in ("strong", "weak")}
    weak_steps = args.sft_steps if args.weak_sft_steps is None else args.weak_sft_steps
    sft_steps = {"strong": args.sft_steps, "weak": weak_steps}
    warm = {role: sft_steps[role] > 0 and os.path.exists(path) for role, path in sft_path.items()}
    tokenizers, strong, weak = load_pair(sft_path["strong"] if warm["strong"] else args.strong,
                                        sft_path["weak"] if warm["weak"] else args.weak, device, args.trust_remote_code)
    check_fits(strong, weak, tokenizers, train + test, args.max_new_tokens, weak_prefix)
    start_run(out, args, rank)
    print(f"run folder {out} | device {device} | {world_size} process(es) | {len(train)} train problems")

    # Warm-start: the strong model learns the jargon, the weak one the same solutions without it (each in its tokens).
    for role, model, jargon_frac in [("strong", strong, args.sft_jargon_frac), ("weak", weak, 0.0)]:
        if sft_steps[role] > 0 and not warm[role]:
            sft(model, tokenizers[role], train, sft_steps[role], args.sft_batch_size, args.sft_lr, jargon_frac,
                args.seed, amp, f"sft {role}")
            share_weights(model)
            save_model(model, tokenizers[role], sft_path[role], rank)
    weak.requires_grad_(False)
    rule = draw_rule(args.handoff_unit, args.max_gap, tokenizers, device)
    # The KL penalty's reference, the warm-start: a frozen copy, one more strong model in memory
    reference = copy.deepcopy(strong).requires_grad_(False) if args.kl_coef else None

    # RL, in eval mode: with dropout on, the gradient would be taken under another policy than the one that sampled.
    optimizer = torch.optim.AdamW(strong.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)  # the same in every process: all draw the same batch, each takes its share
    last_step, log = resume(out, strong, optimizer, rng, rank, args.resume)

    def evaluation(step):  # every process evaluates (the same problems, the same result): none waits on another
        result = evaluate(strong, weak, tokenizers, test, args.eval_handoff_prob, max_new_tokens=args.max_new_tokens,
                          amp=amp, batch_size=args.eval_batch_size, seed=args.seed, rule=rule, weak_prefix=weak_prefix)
        log({"step": step, "kind": "eval"} | result)
        print(f"eval at step {step} | " + " | ".join(f"{k} {result[k]:.3f}" for k in [
            "strong_accuracy", "tandem_accuracy", "weak_accuracy", "strong_jargon_rate", "weak_nll"]), flush=True)

    if args.eval_every and last_step == 0:
        evaluation(0)
    for step in range(last_step + 1, args.steps + 1):
        t0 = time.time()
        batch = rng.sample(train, min(args.batch_size, len(train)))[rank::world_size]
        metrics = rl_step(strong, weak, tokenizers, optimizer, batch, args, amp, rule, weak_prefix, reference)
        log({"step": step, "kind": "train"} | metrics | {"seconds": time.time() - t0})
        keys = ["reward", "rollout_jargon_rate", "weak_frac", "switches", "loss"]
        shown = " | ".join(f"{k} {metrics[k]:.3f}" for k in keys)
        skipped = " | non-finite, skipped" if metrics["skipped"] else ""
        print(f"step {step}/{args.steps} | {shown} | {time.time() - t0:.1f}s{skipped}", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            evaluation(step)
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(out, strong, optimizer, rng, step, rank)
    save_model(strong, tokenizers["strong"], os.path.join(out, "final"), rank)
    print(f"saved {os.path.join(out, 'final')}")

# =============================================================================
# Plumbing. Nothing below changes what is learned: input checks and loading; torchrun (each process rolls out its share
# of every batch, one all-reduce adds up the gradients); the run folder and checkpoints (written aside, then renamed).

class UsageError(Exception):
    """Bad input: run_cli prints the message as one line, `error: ...`, and exits with code 2."""

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input, instead of the usage text
        raise UsageError(message)

def number(kind, low, high=math.inf):
    """An argparse type: a number of `kind` from `low` to `high`."""
    def parse(text):
        if not low <= kind(text) <= high:
            bounds = f"from {low} to {high}" if high < math.inf else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return kind(text)
    parse.__name__ = kind.__name__  # argparse says "invalid int value" when kind() fails
    return parse

@contextmanager
def user_input(what, errors=(OSError, ValueError)):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    """A file, folder or model the user named that can't be read (or made) ends in one line that names it."""
    try:
        yield
    except errors as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip() or type(e).__name__)
        reason = reason.split("\n")[0]
        raise UsageError(f"{what}: {reason}") from None

def read_jsonl(path):
    problems = []
    with user_input(f"--data {path}"), open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            with user_input(f"--data {path} line {n}"):
                row = json.loads(line)
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("question", "answer"))):
                raise UsageError(f"--data {path} line {n}: needs string fields 'question' and 'answer'")
            problems.append({"question": row["question"], "answer": row["answer"]})
    if not problems:
        raise UsageError(f"--data {path}: no problems in it")
    return problems

def read_text(path):
    with user_input(f"--weak-prompt {path}"), open(path, encoding="utf-8") as f:
        return f.read()

def load_pair(strong_name, weak_name, device, trust_remote_code=False):
    """({"strong": tokenizer, "weak": tokenizer}, strong, weak), tokenizers checked first. Tokenizers that agree are one
    object: the models pass token ids (the fast path). Others pass text, and each must give back a piece's text."""
    tokenizers = {}
    for role, name in [("strong", strong_name), ("weak", weak_name)]:
        with model_input(name):
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, padding_side="left")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # left padding: GPT-2 has no pad token
        tokenizers[role] = tokenizer
    strong_tok, weak_tok = tokenizers.values()
    if strong_tok.get_vocab() == weak_tok.get_vocab() and strong_tok.eos_token == weak_tok.eos_token:
        tokenizers["weak"] = strong_tok
    for name, tok in [(strong_name, strong_tok), (weak_name, weak_tok)] if tokenizers["weak"] is weak_tok else []:
        before = tok("Answer:", add_special_tokens=False)["input_ids"]  # a piece in the middle of a stream comes back?
        for text in ["12", " brown", "\n#### 5", "é."]:
            if piece_text(tok, before + encode_piece(tok, text), len(encode_piece(tok, text))) != text:
                raise UsageError(f"the tokenizer of {name!r} changes a piece of text it encodes, so it can't read a "
                                 "partner's text: choose another model")
    strong, weak = (load_model(name, device, trust_remote_code) for name in (strong_name, weak_name))
    return tokenizers, strong, weak

def model_input(name):  # user_input for a model's hub name or folder
    if os.path.exists(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UsageError(f"cannot load model {name!r}: it is not a model folder (it has no config.json)")
    offline = os.environ.get("HF_HUB_OFFLINE") and not os.path.exists(name)
    why = " (offline: a hub name needs a network)" if offline else ""
    return user_input(f"cannot load model {name!r}{why}", Exception)  # a broken model raises what its format does

def load_model(name, device, trust_remote_code=False):
    """A model in float32: AdamW's master copy (speed comes from autocast)."""
    with model_input(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = model.to(device).eval()
    # The decoder and the loss take logits from the output layer: a model that rescales them after it (Gemma 2's
    # soft-capping, Cohere's logit_scale) would be trained on logits it never gives.
    ids = torch.arange(1, 9, device=device)[None]
    with torch.no_grad():
        apart = model.get_output_embeddings()(model.base_model(ids).last_hidden_state)
        if not torch.allclose(model(ids).logits, apart, atol=1e-4):
            raise UsageError(f"model {name!r} rescales its logits after its output layer, which tandem.py does not "
                             "support (it takes logits from the output layer): choose another family")
    return model

def max_positions(model):  # None for a model whose config names no limit: then nothing is checked
    return getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)

def check_fits(strong, weak, tokenizers, problems, max_new_tokens, weak_prefix=None):
    """One line now, not an index error mid-run, if the longest prompt and new tokens overrun a model's positions."""
    prompts = encode_prompts(tokenizers, problems, "cpu", weak_prefix)
    for name, model in [("strong", strong), ("weak", weak)]:
        longest, context = prompts[name][0].shape[1], max_positions(model)  # prompts are padded to the longest
        if context and longest + max_new_tokens > context:
            raise UsageError(f"the longest {name} prompt ({longest} tokens) and --max-new-tokens {max_new_tokens} "
                             f"exceed the {name} model's {context} positions: lower --max-new-tokens or shorten "
                             "--weak-prompt")

def pick_device(name, dtype="auto"):
    """(device, autocast): bf16 autocast on CUDA by default, over float32 weights: AdamW's small updates aren't lost."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    device = torch.device(name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return device, torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

def init_distributed(device):  # (rank, world_size, device) in torchrun's process group; (0, 1, device) without
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

def all_sum(values):  # {name: its sum over all processes} for a dict of numbers
    if not dist.is_initialized():
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))

def sum_gradients(model):  # one all-reduce adds up the processes' gradients (each loss is its share of the batch's)
    if dist.is_initialized():
        params = list(model.parameters())
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)

def share_weights(model):  # rank 0's weights for every process, after a warm-start that sampled differently in each
    for p in model.parameters() if dist.is_initialized() else []:
        dist.broadcast(p.data, 0)

def gather(obj):  # [obj of every process]
    objs = [obj] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(objs, obj)
    return objs

def run_folder(args):
    """The run folder, checked before anything is written; None when its run has finished and --resume asks nothing."""
    out = gather(args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))[0]  # rank 0's clock for all
    if os.path.exists(os.path.join(out, "final")):
        if args.resume:
            print(f"the run in {out} has finished (final/ is there): nothing to resume")
            return None
        raise UsageError(f"--out {out} holds a finished run: choose another --out")
    if os.path.exists(os.path.join(out, "metrics.jsonl")) and not args.resume:
        raise UsageError(f"--out {out} holds a started run: add --resume to go on with it, or choose another --out")
    return out

def start_run(out, args, rank):
    if dist.is_initialized():
        dist.barrier()  # every process has looked at the run folder before rank 0 writes to it
    if rank == 0:
        with user_input(f"--out {out}"):
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "config.json"), "w") as f:
                json.dump(vars(args) | {"out": out}, f, indent=2)

def save_model(model, tokenizer, path, rank=0):  # a folder that plain transformers loads (rank 0 writes)
    if rank == 0:
        model.save_pretrained(path + ".tmp")  # over what a killed save left there, if anything
        tokenizer.save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)

def save_checkpoint(out, strong, optimizer, rng, step, rank):  # one dict: all the loop needs to go on, every RNG too
    rng_torch = gather((torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None))
    if rank == 0:
        path = os.path.join(out, "checkpoint.pt")
        torch.save({"model": strong.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "rng_python": rng.getstate(), "rng_torch": rng_torch}, path + ".tmp")
        os.replace(path + ".tmp", path)

def resume(out, strong, optimizer, rng, rank, resuming):
    """(last_step, log): the step of the checkpoint in `out`, restored (0 without one or without --resume); log(row),
    which adds a row to metrics.jsonl (rank 0 writes) once the rows written after that checkpoint are gone."""
    path, metrics_path, last_step, rows = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl"), 0, []
    if resuming and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: a checkpoint can't run code
        strong.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["rng_python"])
        if rank < len(state["rng_torch"]):  # else resumed on more processes than before: a new one keeps its seed
            torch.set_rng_state(state["rng_torch"][rank][0])
            if torch.cuda.is_available() and state["rng_torch"][rank][1] is not None:
                torch.cuda.set_rng_state(state["rng_torch"][rank][1])
        last_step = state["step"]
        if os.path.exists(metrics_path):  # a line that a kill cut short has no newline
            with open(metrics_path) as f:
                rows = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= last_step]
    if resuming:
        print(f"resuming after step {last_step} from {path}" if last_step else f"no checkpoint in {out}: from step 1")
    if rank != 0:
        return last_step, lambda row: None
    with open(metrics_path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(metrics_path + ".tmp", metrics_path)
    metrics = open(metrics_path, "a", buffering=1)  # line-buffered: a row is in the file once logged, whatever kills us
    return last_step, lambda row: metrics.write(json.dumps(row) + "\n")

def run_cli(main):
    """main(), its return value the exit code; bad input ends in one line on stderr and exit code 2."""
    try:
        code = main() or 0
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun, every process's line stays whole
        code = 2
    if dist.is_initialized():
        # Leave the process group and skip the interpreter's shutdown, in which a gloo thread that frees a tensor
        # can abort the process after all its work is done (pytorch PR 179291 describes this).
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)

if __name__ == "__main__":
    run_cli(main)

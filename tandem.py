"""
Tandem training (West, Anderson, Kamar, Horvitz, "Tandem Training for Language Models", arXiv 2510.13551)
on GSM8K: RL of a strong model while a frozen weak model randomly takes over its sampling.

- handoff: a token is the weak model's with probability `handoff_prob` (0.5), else the strong one's (`tandem_generate`);
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
import functools
import importlib.util  # and importlib
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, StaticCache

# -----------------------------------------------------------------------------
# Task and reward: where a task's problems come from, how one is put to a model, what the warm-start imitates, which
# solutions are right, and the marker whose rate evaluation reports (GSM8K: the calculator jargon <<48/2=24>>)

class Task(NamedTuple):  # a forker's task is one more entry in TASKS
    hub: dict  # split -> (dataset, config, split) on the hub; --data DIR (<split>.jsonl) or FILE.jsonl: the same
    fields: tuple  # the string fields each record must have (it keeps all it has)
    prompt: Callable  # problem -> its text for a model (--chat-template puts it in the model's own template)
    target: Callable  # (problem, marked) -> the warm-start's solution, with the marker or without
    correct: Callable  # (completion, problem) -> bool: every accuracy, and RL's reward unless `reward` is given
    marker: Callable  # text -> bool
    reward: Callable = None  # (completion, problem) -> float

def load(task, split, data=None):
    """`task`'s records of `split`, every field kept: from the hub, a folder of <split>.jsonl files, or one .jsonl."""
    path = os.path.join(data, f"{split}.jsonl") if data and os.path.isdir(data) else data
    if path and (os.path.exists(path) or path.endswith(".jsonl")):
        return read_jsonl(path, task.fields)
    import datasets
    name, config, hub_split = task.hub[split] if data is None else (data, None, split)
    with user_input(f"--data {data or name} (offline: give it a folder with train.jsonl and test.jsonl)", Exception):
        return [dict(row) for row in datasets.load_dataset(name, config, split=hub_split)]

def reward(completion, problem, task):  # RL's reward: 1.0 for a correct solution, unless the task says otherwise
    return task.reward(completion, problem) if task.reward else float(task.correct(completion, problem))

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
    """Is the completion's '#### N' the gold answer (a whole GSM8K answer or a bare number)?"""
    answer = extract_answer(completion)
    return answer is not None and answer == extract_answer(gold if "####" in gold else "####" + gold)

def has_jargon(text):
    return JARGON.search(text) is not None

def strip_jargon(text):
    return JARGON.sub("", text)

def last_boxed(text):  # what the last \boxed{...} holds, its braces matched, or None
    start, depth = text.rfind("\\boxed{"), 0
    for end in range(start + len("\\boxed"), len(text)) if start >= 0 else []:  # from its "{"
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + len("\\boxed{"):end]
    return None

def boxed_correct(completion, problem):
    """The follow-up's rule (its reward/math_boxed_reward.py): the answer is the last \\boxed{}, none is wrong; its
    equivalence to the gold `answer` is math-verify's (the follow-up's grader tries its own normalisations first)."""
    math_verify = optional("math_verify", "--task math", "math-verify")
    answer = last_boxed(completion)
    return answer is not None and math_verify.verify(math_verify.parse(f"${problem['answer']}$"),
                                                     math_verify.parse(f"${answer}$"))

@functools.cache
def language_of(code):  # py3langid's identifier, told "en" or `code`: made for short texts, bundled, offline
    langid = optional("py3langid.langid", f"--task gsm8k-{code}", "py3langid")
    identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    identifier.set_languages(["en", code])
    return identifier

GSM8K = Task({"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")},
             ("question", "answer"), lambda p: f"Question: {p['question']}\nAnswer:",
             lambda p, marked: " " + (p["answer"] if marked else strip_jargon(p["answer"])),
             lambda completion, p: correct(completion, p["answer"]), has_jargon)
TASKS = {"gsm8k": GSM8K,
         # The follow-up's domain and prompt (data/build_deepscaler.py: the problem, then its instruction)
         "math": Task({"train": ("agentica-org/DeepScaleR-Preview-Dataset", None, "train"),
                       "test": ("HuggingFaceH4/MATH-500", None, "test")}, ("problem", "solution", "answer"),
                      lambda p: p["problem"] + " Solve the following math problem step by step. Put your final answer "
                      "inside \\boxed{}, like \\boxed{42} or \\boxed{\\frac{1}{2}}.",
                      lambda p, marked: p["solution"], boxed_correct, lambda text: last_boxed(text) is not None),
         # The paper's second experiment: GSM8K's format without the jargon, the marker a solution in Spanish (the
         # language the weak model is asked to write in, by --weak-prompt; the warm-start has none of it)
         "gsm8k-es": GSM8K._replace(target=lambda p, marked: " " + strip_jargon(p["answer"]),
                                    marker=lambda text: language_of("es").classify(text)[0] == "es")}

class Asking(NamedTuple):  # how each model is asked (dicts by model): the task, its chat template or not, a prefix
    task: Task = GSM8K
    chat: dict = {"strong": False, "weak": False}
    prefix: dict = {"strong": "", "weak": ""}

def prompt_text(task, problem, tokenizer, chat, prefix=""):  # what a model reads first: in its chat template, if asked
    text = prefix + task.prompt(problem)
    if not chat:
        return text
    turn = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)

def encode_prompts(tokenizers, problems, device, asking=Asking()):
    """{"strong": (ids, mask), "weak": (ids, mask)}: left-padded prompts in each model's tokens, as `asking` says."""
    def encode(role):
        chat, prefix = asking.chat[role], asking.prefix[role]
        texts = [prompt_text(asking.task, p, tokenizers[role], chat, prefix) for p in problems]
        enc = tokenizers[role](texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)
    strong = encode("strong")
    same = tokenizers["weak"] is tokenizers["strong"] and asking.chat["weak"] == asking.chat["strong"]
    return {"strong": strong, "weak": strong if same and not asking.prefix["weak"] else encode("weak")}

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
    """Continue left-padded prompts (encode_prompts), each token by one author from its whole distribution, drawn at the
    start (the weak model with probability `handoff_prob`), then right after a token that `boundaries` marks (a bool per
    vocabulary entry; `weak_boundaries` the weak model's: draw_rule) or `max_gap` tokens after the last draw (default 1:
    every token, the paper's rule). `shared_coins`: one draw for all rows. Two `tokenizers`: tandem_generate_across."""
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
    from_weak = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask, done = torch.zeros_like(from_weak), torch.zeros(B, dtype=torch.bool, device=device)
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
    """tandem_generate for two tokenizers, which share text: each keeps its own token stream and cache and, about to
    write, reads what the other wrote since, in its tokens; the strong model's loss is on its stream. A draw falls due
    before a token that begins a unit: with --handoff-unit word, a word's start, where both tokenizers cut the text, so
    each reads its partner's words as it would write them (a partner reading a cut inside one of its tokens continues
    badly: README). If it names the other model, the token is set aside and the other writes on; beginning a unit there
    is the strong model's action (Rollout.set_aside, in the loss), unless --max-gap alone made the draw. Draws wait
    until the run decodes to whole text."""
    models = {"strong": strong, "weak": weak}
    B, device = prompts["strong"][0].shape[0], prompts["strong"][0].device
    coins = (torch.rand(max_new_tokens + 1, 1 if shared_coins else B) < handoff_prob).expand(-1, B).tolist()
    eos, units = {n: tok.eos_token_id for n, tok in tokenizers.items()}, boundaries["strong"]
    boundaries = {n: None if b is None else b.tolist() for n, b in boundaries.items()}  # read row by row, on the host
    prompt = [{n: ids[r][mask[r].bool()].tolist() for n, (ids, mask) in prompts.items()} for r in range(B)]
    rows = [Row(prompt[r], "weak" if coins[0][r] else "strong") for r in range(B)]
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
                    by_unit = row.since_draw < max_gap  # else the gap made the draw, whatever the token: no action
                    row.since_draw, author = 0, "weak" if coins[t + 1][r] else "strong"
                    if author != n:
                        row.hand_over(tokenizers, set_aside=by_unit)
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
    """The last k of `ids` as text, no special tokens, decoded after a few before (so a first "▁" keeps its space)."""
    def text(end):
        return tokenizer.decode(ids[max(len(ids) - k - 4, 0):end], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False)
    return text(len(ids))[len(text(len(ids) - k)):]

# --handoff-unit: the next token's author is drawn again right after a token whose surface form (its string in the
# vocabulary) the unit accepts, and --max-gap tokens after the last draw. A new unit is one more entry.
HANDOFF_UNITS = {"token": lambda surface: True,  # the paper's: every token
                 # the follow-up's code: after a word's first token (byte-level "Ġ", SentencePiece "▁"), no newline
                 "word": lambda surface: surface.startswith(("Ġ", "▁"))}

def draw_rule(unit, max_gap, tokenizers, device):  # tandem_generate's keywords for --handoff-unit and --max-gap
    """Each author's unit starts in its tokens; two tokenizers share words, not tokens (README): words by default."""
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
    if kind == "loo":  # leave-one-out: a sample's own reward stays out of its baseline, which keeps it unbiased
        return (rewards.sum(1, keepdim=True) - rewards) / (rewards.shape[1] - 1)
    if kind == "mean":
        return rewards.mean(1, keepdim=True).expand_as(rewards)
    return torch.zeros_like(rewards)

def completion_logprobs(model, prompt, tokens, mask, temperature, vocab_size=None, chunk=32, set_aside=None,
                        units=None):
    """log p of each generated token under `model` (B x T, differentiable); prompt = (ids, mask). Logits over the
    sampling temperature (on-policy), `chunk` positions at a time, recomputed in the backward pass (B x T x vocab in
    float32 would be the step's largest tensor). A unit begun and `set_aside`: log p of beginning one (`units`)."""
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

def micro_batches(rows, size):  # consecutive slices of `rows` (none if it is empty), as the loss takes them
    return [rows[i:i + size] for i in range(0, len(rows), size)]

def policy_gradient(model, prompt, rollout, advantages, temperature, micro_batch_size, vocab_size=None,
                    amp=nullcontext(), weak_token_weight=0.0, rows=None, old_logp=None, ref_logp=None, args=None):
    """Add the REINFORCE gradient to model's .grad; return the loss: -sum(advantage * log p(token)) over the strong
    model's own tokens (eos included) over their number in the whole batch, all processes', so micro-batches add up to
    one batch's gradient. Weak tokens are context, not actions, unless `weak_token_weight` w counts each w times a
    strong one (the follow-up code's junior_token_loss_weight, 0 in its runs; not its paper's KL term). GRPO: `rows` (a
    mini-batch), `old_logp` (the sampler's: the clipped ratio), `ref_logp` (the frozen reference's: k3), `args`."""
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
    for chunk in micro_batches(rows, micro_batch_size):
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
    """log p of every token under `model`, in policy_gradient's micro-batches (the first step's ratio is exactly 1)."""
    logp = torch.zeros(rollout.tokens.shape, device=rollout.tokens.device)
    for rows in minis:
        for chunk in micro_batches(rows, micro_batch_size):
            with amp:
                logp[chunk] = chunk_logprobs(model, prompt, rollout, chunk, temperature, vocab_size)
    return logp

class Partner(NamedTuple):  # a weak model of the pool, with its name (its warm-start's folder in sft/)
    name: str
    model: torch.nn.Module
    tokenizers: dict  # {"strong": the strong model's, "weak": its own}: one object when they agree
    rule: dict = None  # when authors are drawn (draw_rule)

def pool_generate(strong, partners, problems, args, asking=Asking(), amp=nullcontext()):
    """Tandem rollouts of `problems`, each co-written by one partner of the pool, drawn per rollout (--partner-draw
    rollout: every update reads with every partner) or one for the batch; a partner's rows decode together, in its
    tokens. Returns (the strong model's prompts, the rollout, each row's partner)."""
    device, B = next(strong.parameters()).device, len(problems)
    if len(partners) == 1:  # a pool of one draws nothing
        which = torch.zeros(B, dtype=torch.long)
    else:
        which = torch.randint(len(partners), (B,) if args.partner_draw == "rollout" else (1,)).expand(B)
    prompts, parts = encode_prompts(partners[0].tokenizers, problems, device, asking), []
    for i, partner in enumerate(partners):
        rows = (which == i).nonzero()[:, 0]
        if len(rows) == 0:
            continue
        own = prompts if i == 0 and len(rows) == B else encode_prompts(partner.tokenizers, [problems[r] for r in rows],
                                                                       device, asking)
        tokenizer = partner.tokenizers["strong"]
        with amp:
            rollout = tandem_generate(strong, partner.model, own, args.handoff_prob, args.max_new_tokens,
                                      args.temperature, tokenizer.eos_token_id, len(tokenizer),
                                      shared_coins=args.coins == "batch", tokenizers=partner.tokenizers,
                                      **(partner.rule or {}))
        parts.append((rows, rollout))
    return prompts["strong"], rollout if len(parts) == 1 else merge(parts, B, tokenizer.eos_token_id), which

def merge(parts, B, eos):  # [(rows, Rollout)]: one rollout of B rows, each in its place, to the longest (eos, masked)
    T = max(part.tokens.shape[1] for _, part in parts)
    tokens = parts[0][1].tokens.new_full((B, T), eos)
    from_weak = torch.zeros_like(tokens, dtype=torch.bool)
    mask, set_aside, units = torch.zeros_like(from_weak), torch.zeros_like(from_weak), None
    for rows, part in parts:
        t = part.tokens.shape[1]
        tokens[rows, :t], from_weak[rows, :t], mask[rows, :t] = part.tokens, part.from_weak, part.mask
        if part.set_aside is not None:  # a partner of another tokenizer's
            set_aside[rows, :t], units = part.set_aside, part.units
    return Rollout(tokens, from_weak, mask, set_aside=set_aside, units=units)

def rl_step(strong, partners, optimizer, problems, args, amp=nullcontext(), asking=Asking(), reference=None):
    """Tandem rollouts of `problems` (under torchrun, this process's share of the batch) with the pool of `partners`,
    sampled once, then an optimizer step per mini-batch and epoch (one: REINFORCE, the paper's); returns the whole
    batch's metrics. `asking`: the task and prompts; `reference`: the KL penalty's model (--kl-coef)."""
    k, device = args.samples_per_prompt, next(strong.parameters()).device
    repeated = [p for p in problems for _ in range(k)]  # side by side, so that view(-1, k) below is a prompt's samples
    prompt, rollout, which = pool_generate(strong, partners, repeated, args, asking, amp)
    tokenizer = partners[0].tokenizers["strong"]
    texts = completion_texts(tokenizer, rollout)
    rewards = torch.tensor([reward(t, p, asking.task) for t, p in zip(texts, repeated)]).view(-1, k)
    advantages = advantages_of(rewards, args).view(-1).to(device)
    # The mini-batches: whole prompts, in order (verl's, without shuffling), each epoch
    minis = torch.arange(len(repeated), device=device).chunk(args.batch_size // args.mini_batch_size)
    def logprobs(model):  # before the first step, in the micro-batches of the loss
        return logprobs_of(model, prompt, rollout, minis, args.temperature, args.micro_batch_size, len(tokenizer), amp)
    old_logp = logprobs(strong) if len(minis) * args.ppo_epochs > 1 else None  # pi_old: the policy that sampled
    lora = hasattr(reference, "disable_adapter")  # LoRA: the reference is this model's own base, its adapters off
    with reference.disable_adapter() if lora else nullcontext():  # else a frozen copy of the warm-start, or none
        ref_logp = None if reference is None else logprobs(strong if lora else reference)
    loss, skipped = 0.0, False
    for rows in minis * args.ppo_epochs:
        step_loss = policy_gradient(strong, prompt, rollout, advantages, args.temperature, args.micro_batch_size,
                                    len(tokenizer), amp, args.weak_token_weight, rows, old_logp, ref_logp, args)
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
    sums = {"reward": rewards.sum().item(), "rollout_marker_rate": sum(map(asking.task.marker, texts)),
            "switches": switches, "rollout_tokens": rollout.mask.sum().item(), "rollouts": len(texts)}
    for i, p in enumerate(partners):  # each partner's reward, over its own rollouts
        sums |= {f"reward {p.name}": rewards.view(-1)[which == i].sum().item(), p.name: (which == i).sum().item()}
    total = all_sum(sums | {"weak_chars": weak_chars, "chars": sum(map(len, texts)), "loss": loss})
    metrics = {k: total[k] / total["rollouts"] for k in ["reward", "rollout_marker_rate", "switches", "rollout_tokens"]}
    by_partner = {p.name: total[f"reward {p.name}"] / max(total[p.name], 1) for p in partners}
    return metrics | {"weak_frac": total["weak_chars"] / max(total["chars"], 1), "loss": total["loss"],
                      "grad_norm": grad_norm, "rollouts": int(total["rollouts"]), "skipped": skipped,
                      "reward_by_partner": by_partner}

# -----------------------------------------------------------------------------
# Evaluation: accuracy alone and in tandem, the marker, legibility (eval.py is its command line)

@torch.no_grad()
def evaluate(strong, weak, tokenizers, problems, handoff_prob=0.5, curve=(), max_new_tokens=256, temperature=0.0,
             batch_size=32, seed=0, amp=nullcontext(), runs=None, rule=None, asking=Asking()):
    """Accuracy of the strong model alone (handoff 0), the weak one alone (1), the pair at `handoff_prob` and at each of
    `curve`; the task's marker; legibility. Every rollout draws its own coins, so problems stay independent. `runs`
    (a dict) gets (texts, [(prompts, rollout) per batch]) by handoff probability. Its own random stream."""
    runs, device, n, t0 = {} if runs is None else runs, next(strong.parameters()).device, len(problems), time.time()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), amp:
        for p in dict.fromkeys([0.0, handoff_prob, 1.0, *curve]):  # each handoff probability decoded once
            if p in runs:
                continue
            torch.manual_seed(seed)
            texts, batches = runs[p] = ([], [])
            for i in range(0, n, batch_size):
                prompts = encode_prompts(tokenizers, problems[i:i + batch_size], device, asking)
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
        return sum(asking.task.correct(t, q) for t, q in zip(runs[p][0], problems)) / n
    for who, p in [("strong", 0.0), ("weak", 1.0), ("tandem", handoff_prob)]:
        result |= {f"{who}_accuracy": accuracy(p), f"{who}_marker_rate": sum(map(asking.task.marker, runs[p][0])) / n}
    result["strong_tokens"] = sum(r.mask.sum().item() for _, r in runs[0.0][1]) / n
    if curve:
        result["curve"] = [{"handoff_prob": p, "accuracy": accuracy(p)} for p in curve]
    return result

# -----------------------------------------------------------------------------
# The warm-start (SFT): base GPT-2 can't solve GSM8K, so both models first imitate the train solutions

def sft(model, tokenizer, problems, steps, batch_size, lr, marker_frac, seed, amp=nullcontext(), name="sft",
        asking=Asking(), role="strong"):
    """Fine-tune `model` on the task's solutions, a `marker_frac` share of them with the marker (GSM8K: <<...>>), as
    `asking` puts problems to the `role` model (its chat template, if asked; not its prefix)."""
    rng, opt, shown = random.Random(seed), torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), time.time()
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(problems, min(batch_size, len(problems)))
        chat = asking.chat[role]
        texts = [prompt_text(asking.task, p, tokenizer, chat) for p in batch]
        prompts = tokenizer(texts, add_special_tokens=not chat)["input_ids"]  # a chat template has its BOS
        targets = [asking.task.target(p, rng.random() < marker_frac) for p in batch]
        # No BOS mid-text; a chat template's turn begins the solution where a bare prompt wants its space
        solutions = tokenizer([t.lstrip() if chat else t for t in targets], add_special_tokens=False)["input_ids"]
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

def warm_start(args, out, train, test, asking, device, amp, rank, world_size):
    """(strong, [Partner], its LoRA adapters or None): each model from its warm-start in out/sft/<role> if it has one (a
    resumed run), else as named and warm-started there: the strong model learns the marker, each partner the same
    solutions without it, each in its own tokens. Frozen weights are bf16 on CUDA: they take no optimizer step."""
    roles = {"strong": args.strong} | {"weak" if i == 0 else f"weak-{i}": name for i, name in enumerate(args.weak)}
    weak_steps = args.sft_steps if args.weak_sft_steps is None else args.weak_sft_steps
    steps = {role: args.sft_steps if role == "strong" else weak_steps for role in roles}
    path = {role: os.path.join(out, "sft", role) for role in roles}
    warm = {role: steps[role] > 0 and os.path.exists(path[role]) for role in roles}
    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    frozen = {role for role in roles if (args.lora_rank if role == "strong" else warm[role] or not steps[role])}
    tokenizers, models = load_models({role: path[role] if warm[role] else name for role, name in roles.items()},
                                     device, args.trust_remote_code, dict.fromkeys(frozen, half),
                                     {"strong"} if args.load_in_4bit else ())
    partners = [Partner(role, models[role], {"strong": tokenizers["strong"], "weak": tokenizers[role]})
                for role in list(roles)[1:]]
    check_fits(models["strong"], partners, train + test, args.max_new_tokens, asking)
    start_run(out, args, rank)
    print(f"run folder {out} | device {device} | {world_size} process(es) | {len(train)} train problems")
    for role, model in models.items():
        if steps[role] > 0 and not warm[role]:
            adapters = with_adapters(model, args) if role == "strong" and args.lora_rank else None
            sft(model, tokenizers[role], train, steps[role], args.sft_batch_size, args.sft_lr,
                args.sft_marker_frac if role == "strong" else 0.0, args.seed, amp, f"sft {role}", asking,
                "strong" if role == "strong" else "weak")
            if adapters is not None:  # into its base: RL's adapters start afresh on the warm-start, their reference
                adapters.merge_and_unload()
            share_weights(model)
            save_model(model, tokenizers[role], path[role], rank)
    for partner in partners:
        partner.model.to(half).requires_grad_(False)
    rule = {p.name: draw_rule(args.handoff_unit, args.max_gap, p.tokenizers, device) for p in partners}
    adapters = with_adapters(models["strong"], args) if args.lora_rank else None
    share_weights(models["strong"])  # the adapters' random start too: rank 0's for every process
    return models["strong"], [p._replace(rule=rule[p.name]) for p in partners], adapters

def with_adapters(model, args):
    """LoRA (peft) on `model`'s linear layers, in place: its own weights freeze and its adapters train; returns peft's
    wrapper, for the adapters' own save, their merge, and the base alone (disable_adapter)."""
    peft = optional("peft", "--lora-rank", "peft")
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers: peft needs to be told they are transposed
    targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    config = peft.LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=targets, fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()))
    return peft.get_peft_model(model, config)

# -----------------------------------------------------------------------------
# Command line and main

def handoff_flags(p):  # who writes which token: the flags that tandem.py and eval.py share
    p.add_argument("--handoff-prob", type=SHARE, default=0.5, help="chance a draw picks the weak model (paper: 0.5)")
    p.add_argument("--handoff-unit", choices=list(HANDOFF_UNITS), help="token (paper; the default) or word "
                   "(follow-up; the default and the rule with two tokenizers)")
    p.add_argument("--max-gap", type=POSITIVE, default=32, help="also a draw this long after the last (follow-up: 32)")

def parse_args(argv=None):
    p = Parser(description="Tandem training of a strong LM with a frozen weak partner.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows every default
    g = p.add_argument_group("models and data")
    g.add_argument("--strong", default="gpt2-medium", help="strong model to train: hub name or local folder")
    g.add_argument("--weak", action="append", help="frozen weak model (default gpt2); more than once: a pool")
    g.add_argument("--task", default="gsm8k", choices=list(TASKS), help="what is solved and checked (TASKS)")
    g.add_argument("--data", help="hub dataset, folder of train.jsonl and test.jsonl, or .jsonl (default: the task's)")
    g.add_argument("--chat-template", default="none", choices=["none", "strong", "weak", "both"],
                   help="which models read problems in their own chat template (their warm-start too)")
    g.add_argument("--weak-prompt", help="text file put in front of every problem the weak models read")
    g = p.add_argument_group("handoffs (--handoff-prob 0: plain RL)")
    handoff_flags(g)
    g.add_argument("--coins", default="row", choices=["row", "batch"], help="row: draws per rollout; batch: for all")
    g.add_argument("--partner-draw", default="rollout", choices=["rollout", "batch"], help="a pool's partner, per")
    g = p.add_argument_group("RL")
    g.add_argument("--steps", type=POSITIVE, default=100, help="RL updates (paper: the jargon goes within about 20)")
    g.add_argument("--batch-size", type=POSITIVE, default=32, help="prompts per RL update")
    g.add_argument("--samples-per-prompt", type=POSITIVE, default=2, help="rollouts per prompt (paper: 2)")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=256, help="longest solution sampled (paper: 256)")
    g.add_argument("--temperature", type=REAL, default=0.7, help="the rollouts' sampling temperature (paper: 0.7)")
    g.add_argument("--baseline", default="loo", choices=["loo", "mean", "none"], help="loo: the prompt's other samples")
    g.add_argument("--weak-token-weight", type=REAL, default=0.0, help="weak tokens' weight in the loss (0: none)")
    g.add_argument("--lr", type=REAL, default=1e-5, help="AdamW learning rate of the RL updates")
    g.add_argument("--grad-clip", type=REAL, default=1.0, help="clip each update's gradient norm to this")
    g.add_argument("--micro-batch-size", type=POSITIVE, default=16, help="rollouts per forward/backward (memory)")
    g = p.add_argument_group("beyond REINFORCE: the follow-up's GRPO, verl's names (TRL's); defaults: REINFORCE")
    g.add_argument("--scale-rewards", default="none", choices=["none", "group"], help="group: / the group's std")
    g.add_argument("--mini-batch-size", type=POSITIVE, help="prompts per optimizer step (default: the batch)")
    g.add_argument("--ppo-epochs", type=POSITIVE, default=1, help="passes over a batch's rollouts (num_iterations)")
    g.add_argument("--clip-ratio", type=REAL, default=0.2, help="PPO's clip below 1 (epsilon), with several steps")
    g.add_argument("--clip-ratio-high", type=REAL, help="its clip above 1 (epsilon_high; default: --clip-ratio)")
    g.add_argument("--clip-ratio-c", type=number(float, 1), default=3.0, help="dual clip: for advantages below 0")
    g.add_argument("--kl-coef", type=REAL, default=0.0, help="k3 KL penalty toward the warm-start (kl_loss_coef; beta)")
    g.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean"],
                   help="a mini-batch's loss: the mean over its tokens, or over rollouts of theirs (loss_agg_mode)")
    g = p.add_argument_group("LoRA and QLoRA (peft): adapters train, the strong model's own weights freeze")
    g.add_argument("--lora-rank", type=COUNT, default=0, help="the adapters' rank (0: every weight trains; paper: 16)")
    g.add_argument("--lora-alpha", type=REAL, default=32.0, help="their scale is alpha / rank")
    g.add_argument("--lora-dropout", type=SHARE, default=0.0, help="in the warm-start (RL runs in eval mode)")
    g.add_argument("--lora-targets", default="all-linear", help="peft's all-linear (the paper's), or layer names a,b")
    g.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the base in NF4 (bitsandbytes; CUDA only)")
    g = p.add_argument_group("warm-start")
    g.add_argument("--sft-steps", type=COUNT, default=1000, help="warm-start steps of the strong model (0: as given)")
    g.add_argument("--weak-sft-steps", type=COUNT, help="the weak models' (0: as given; default: --sft-steps)")
    g.add_argument("--sft-batch-size", type=POSITIVE, default=16, help="solutions per warm-start step")
    g.add_argument("--sft-lr", type=REAL, default=5e-5, help="AdamW learning rate of the warm-start")
    g.add_argument("--sft-marker-frac", type=SHARE, default=1.0, help="strong solutions with the marker (GSM8K: <<>>)")
    g = p.add_argument_group("evaluation and the run")
    g.add_argument("--eval-every", type=COUNT, default=20, help="evaluate every N updates, first and last (0: never)")
    g.add_argument("--eval-limit", type=POSITIVE, default=200, help="test problems per evaluation")
    g.add_argument("--eval-batch-size", type=POSITIVE, default=64, help="test problems decoded together")
    g.add_argument("--eval-handoff-prob", type=SHARE, default=0.5, help="the pair's in evaluations, plain RL's too")
    g.add_argument("--out", help="run folder (default runs/<date-time>)")
    g.add_argument("--resume", action="store_true", help="go on with the run in --out from its last checkpoint")
    g.add_argument("--save-every", type=COUNT, default=20, help="a checkpoint every N updates (0: never)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (data order, sampling, handoffs)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there is one")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 on cuda")
    g.add_argument("--trust-remote-code", action="store_true", help="let models run code from their folder or hub")
    args = p.parse_args(argv)
    if args.baseline == "loo" and args.samples_per_prompt < 2:
        p.error("the leave-one-out baseline needs --samples-per-prompt 2 or more (or --baseline mean or none)")
    if args.resume and not args.out:
        p.error("--resume needs the --out folder of the run to go on with")
    args.weak, args.mini_batch_size = args.weak or ["gpt2"], args.mini_batch_size or args.batch_size
    if args.batch_size % args.mini_batch_size:
        p.error(f"--batch-size {args.batch_size} does not split into mini-batches of {args.mini_batch_size}")
    if args.scale_rewards == "group" and args.samples_per_prompt < 2:
        p.error("--scale-rewards group needs --samples-per-prompt 2 or more (a group of one has no spread)")
    if args.load_in_4bit and not args.lora_rank:
        p.error("--load-in-4bit needs --lora-rank: a 4-bit model's own weights can't train")
    if args.temperature == 0:
        p.error("--temperature 0 samples greedily: rollouts need a temperature above 0 to have a policy gradient")
    return args

def main(argv=None):
    args = parse_args(argv)
    device, amp = pick_device(args.device, args.dtype)
    if args.load_in_4bit and (device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None):
        raise UsageError("--load-in-4bit needs a CUDA GPU and bitsandbytes (pip install bitsandbytes)")
    rank, world_size, device = init_distributed(device)
    if args.batch_size % world_size or (args.batch_size // world_size) % (args.batch_size // args.mini_batch_size):
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world_size} processes and its "
                         "mini-batches: make it a multiple")
    torch.manual_seed(args.seed + rank)  # each process samples rollouts of its own
    task = TASKS[args.task]
    train, test = load(task, "train", args.data), load(task, "test", args.data)[:args.eval_limit]
    asking = Asking(task, {role: args.chat_template in (role, "both") for role in ("strong", "weak")},
                    {"strong": "", "weak": read_text(args.weak_prompt) if args.weak_prompt else ""})
    if (out := run_folder(args)) is None:
        return
    strong, partners, adapters = warm_start(args, out, train, test, asking, device, amp, rank, world_size)
    reference = None  # the KL penalty's, the warm-start: with LoRA the model's own base (its adapters off), or a copy
    if args.kl_coef:
        reference = adapters if adapters is not None else copy.deepcopy(strong).requires_grad_(False)

    # RL, in eval mode: with dropout on, the gradient would be taken under another policy than the one that sampled.
    optimizer = torch.optim.AdamW([p for p in strong.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)  # the same in every process: all draw the same batch, each takes its share
    last_step, log = resume(out, strong, optimizer, rng, rank, args.resume)

    def evaluation(step):  # every process evaluates (the same problems, the same result): none waits on another
        for p in partners:
            result = evaluate(strong, p.model, p.tokenizers, test, args.eval_handoff_prob, (), args.max_new_tokens,
                              0.0, args.eval_batch_size, args.seed, amp, None, p.rule, asking)
            log({"step": step, "kind": "eval", "partner": p.name} | result)
            print(f"eval at step {step} with {p.name} | " + " | ".join(f"{k} {result[k]:.3f}" for k in [
                "strong_accuracy", "tandem_accuracy", "weak_accuracy", "strong_marker_rate", "weak_nll"]), flush=True)

    if args.eval_every and last_step == 0:
        evaluation(0)
    for step in range(last_step + 1, args.steps + 1):
        t0 = time.time()
        batch = rng.sample(train, min(args.batch_size, len(train)))[rank::world_size]
        metrics = rl_step(strong, partners, optimizer, batch, args, amp, asking, reference)
        log({"step": step, "kind": "train"} | metrics | {"seconds": time.time() - t0})
        keys = ["reward", "rollout_marker_rate", "weak_frac", "switches", "loss"]
        shown = " | ".join(f"{k} {metrics[k]:.3f}" for k in keys)
        skipped = " | non-finite, skipped" if metrics["skipped"] else ""
        print(f"step {step}/{args.steps} | {shown} | {time.time() - t0:.1f}s{skipped}", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            evaluation(step)
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(out, strong, optimizer, rng, step, rank)
    if adapters is not None and rank == 0:  # for peft users, beside the merged weights that plain transformers loads
        adapters.save_pretrained(os.path.join(out, "adapters"))
        adapters.merge_and_unload()
    save_model(strong, partners[0].tokenizers["strong"], os.path.join(out, "final"), rank)
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

REAL, COUNT, POSITIVE, SHARE = number(float, 0), number(int, 0), number(int, 1), number(float, 0, 1)  # flags' types

@contextmanager
def user_input(what, errors=(OSError, ValueError)):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    """A file, folder or model the user named that can't be read (or made) ends in one line that names it."""
    try:
        yield
    except errors as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip() or type(e).__name__)
        reason = reason.split("\n")[0]
        raise UsageError(f"{what}: {reason}") from None

def optional(module, use, package):  # an optional dependency, imported where it is used: one line if it is missing
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{use} needs {package}: pip install {package}") from None

def read_jsonl(path, fields=("question", "answer")):
    problems = []
    with user_input(f"--data {path}"), open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            with user_input(f"--data {path} line {n}"):
                row = json.loads(line)
            if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in fields)):
                raise UsageError(f"--data {path} line {n}: needs string fields " + " and ".join(map(repr, fields)))
            problems.append(row)
    if not problems:
        raise UsageError(f"--data {path}: no problems in it")
    return problems

def read_text(path):
    with user_input(f"--weak-prompt {path}"), open(path, encoding="utf-8") as f:
        return f.read()

def load_models(names, device, trust_remote_code=False, dtypes=None, four_bit=()):
    """({role: tokenizer}, {role: model}) for {role: hub name or folder}, "strong" first, every tokenizer checked before
    any weights load. One that agrees with the strong model's (the same vocabulary and end token) is its object: that
    pair passes token ids (the fast path). Pairs of two pass text, and each tokenizer must give back a piece's text."""
    tokenizers = {}
    for role, name in names.items():
        with model_input(name):
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, padding_side="left")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # left padding: GPT-2 has no pad token
        strong = tokenizers.get("strong", tokenizer)
        agrees = strong.get_vocab() == tokenizer.get_vocab() and strong.eos_token == tokenizer.eos_token
        tokenizers[role] = strong if agrees else tokenizer
    distinct = {id(tok): (names[role], tok) for role, tok in tokenizers.items()}
    for name, tok in distinct.values() if len(distinct) > 1 else []:
        before = tok("Answer:", add_special_tokens=False)["input_ids"]  # a piece in the middle of a stream comes back?
        for text in ["12", " brown", "\n#### 5", "é."]:
            if piece_text(tok, before + encode_piece(tok, text), len(encode_piece(tok, text))) != text:
                raise UsageError(f"the tokenizer of {name!r} changes a piece of text it encodes, so it can't read a "
                                 "partner's text: choose another model")
    models = {role: load_model(name, device, trust_remote_code, (dtypes or {}).get(role, torch.float32),
                               role in four_bit) for role, name in names.items()}
    return tokenizers, models

def model_input(name):  # user_input for a model's hub name or folder
    if os.path.exists(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UsageError(f"cannot load model {name!r}: it is not a model folder (it has no config.json)")
    offline = os.environ.get("HF_HUB_OFFLINE") and not os.path.exists(name)
    why = " (offline: a hub name needs a network)" if offline else ""
    return user_input(f"cannot load model {name!r}{why}", Exception)  # a broken model raises what its format does

def load_model(name, device, trust_remote_code=False, dtype=torch.float32, four_bit=False):
    """A model to train in float32 (AdamW's master copy; autocast for speed), or frozen in `dtype`, or QLoRA's NF4."""
    quantized = {}
    if four_bit:
        from transformers import BitsAndBytesConfig  # needs bitsandbytes: main checks it is there
        quantized = dict(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))
    with model_input(name):
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **quantized)
    model = (model if four_bit else model.to(device)).eval()
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

def check_fits(strong, partners, problems, max_new_tokens, asking=Asking()):
    """One line now, not an index error mid-run, if the longest prompt and new tokens overrun a model's positions."""
    for partner in partners:
        prompts = encode_prompts(partner.tokenizers, problems, "cpu", asking)
        weak = "weak" if len(partners) == 1 else f"weak ({partner.name})"
        for role, model in [("strong", strong), (weak, partner.model)]:
            longest = prompts["strong" if model is strong else "weak"][0].shape[1]  # prompts are padded to the longest
            context = max_positions(model)
            if context and longest + max_new_tokens > context:
                raise UsageError(f"the longest {role} prompt ({longest} tokens) and --max-new-tokens {max_new_tokens} "
                                 f"exceed the {role} model's {context} positions: lower --max-new-tokens or shorten "
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
        params = [p for p in model.parameters() if p.requires_grad]  # with LoRA, the adapters
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
        trained = {name: p for name, p in strong.named_parameters() if p.requires_grad}  # with LoRA, the adapters
        torch.save({"model": trained, "optimizer": optimizer.state_dict(), "step": step,
                    "rng_python": rng.getstate(), "rng_torch": rng_torch}, path + ".tmp")
        os.replace(path + ".tmp", path)

def resume(out, strong, optimizer, rng, rank, resuming):
    """(last_step, log): the step of the checkpoint in `out`, restored (0 without one or without --resume); log(row),
    which adds a row to metrics.jsonl (rank 0 writes) once the rows written after that checkpoint are gone."""
    path, metrics_path, last_step, rows = os.path.join(out, "checkpoint.pt"), os.path.join(out, "metrics.jsonl"), 0, []
    if resuming and os.path.exists(path):
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights_only: a checkpoint can't run code
        missing, unexpected = strong.load_state_dict(state["model"], strict=False)
        if unexpected or {name for name, p in strong.named_parameters() if p.requires_grad} & set(missing):
            raise UsageError(f"{path} holds other weights than this run trains: resume it with its own flags")
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

def run_cli(main):  # main()'s return value is the exit code
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

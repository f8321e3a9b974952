"""
Tandem training (West, Anderson, Kamar, Horvitz, 2025: arXiv 2510.13551) on GSM8K.

A strong model is trained with RL while a frozen weak model randomly takes over the sampling:
- every next token of a rollout comes from the weak model with probability `handoff_prob` (0.5),
  otherwise from the strong one; both models read the whole growing text (each has a KV cache);
- the reward is 1 when the co-written solution ends in the right `#### answer`, else 0;
- REINFORCE with a baseline (leave-one-out mean over the other samples of the same prompt) raises
  the strong model's log-probability of the tokens it sampled itself in rewarded rollouts;
- so the strong model learns to write text the weak one can continue. On GSM8K that means
  dropping the calculator "jargon" `<<48/2=24>>` it learned in its warm-start and the weak one never saw.
`--handoff-prob 0` is ordinary RL, the control experiment.

Run:
    pip install -r requirements.txt
    python tandem.py --weak gpt2 --strong gpt2-medium
Offline, with local model folders and a local copy of GSM8K:
    python tandem.py --weak path/to/gpt2 --strong path/to/gpt2-medium --data path/to/gsm8k
On several GPUs (each rolls out its share of every batch):
    torchrun --nproc_per_node=4 tandem.py --weak gpt2 --strong gpt2-medium
"""

import argparse
import atexit
import gc
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, StaticCache


class UsageError(Exception):
    """Bad input from the user: main() prints the message on one line and exits with code 2."""


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tandem training of a strong LM with a frozen weak partner on GSM8K.")
    p.add_argument("--weak", default="gpt2", help="frozen weak model: hub name or local folder")
    p.add_argument("--strong", default="gpt2-medium", help="strong model to train: hub name or local folder")
    p.add_argument("--data", default="openai/gsm8k", help="hub dataset, local folder with train/test.jsonl, or one .jsonl file")
    p.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    p.add_argument("--steps", type=int, default=100, help="RL updates (the paper sees jargon vanish in about 20)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per RL update")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="rollouts per prompt (paper: 2)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="rollouts per forward/backward in the gradient pass (memory knob)")
    p.add_argument("--handoff-prob", type=float, default=0.5, help="chance that the weak model samples each token (paper: 0.5; 0 = plain RL)")
    p.add_argument("--handoff-unit", default="token", choices=["token", "word"],
                   help="token: a coin for every token (paper); word: owners change only where a new word starts")
    p.add_argument("--weak-prompt", default=None, help="text file put in front of every prompt the weak model reads (e.g. few-shot in French)")
    p.add_argument("--weak-token-weight", type=float, default=0.0,
                   help="weight of the weak model's tokens in the loss (0: they are context, not actions)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of the RL updates")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm of each update to this")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest solution sampled (paper: 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the rollouts (paper: 0.7; 0 = greedy)")
    p.add_argument("--baseline", default="loo", choices=["loo", "mean", "none"],
                   help="loo: mean reward of the prompt's other samples; mean: of all its samples; none: 0")
    p.add_argument("--sft-steps", type=int, default=1000, help="warm-start fine-tuning steps for each model (0 = use the models as given)")
    p.add_argument("--sft-batch-size", type=int, default=16, help="solutions per warm-start step")
    p.add_argument("--sft-lr", type=float, default=5e-5, help="AdamW learning rate of the warm-start")
    p.add_argument("--sft-jargon-frac", type=float, default=1.0, help="share of the strong model's warm-start solutions that keep <<...>>")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate on test problems every N steps, before the first and after the last (0 = never)")
    p.add_argument("--eval-limit", type=int, default=200, help="test problems per evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (data order, sampling, handoffs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (auto: cuda if there is one)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; weights stay float32 (auto: bfloat16 autocast on CUDA, float32 on CPU)")
    p.add_argument("--save-every", type=int, default=20, help="write a checkpoint every N steps (0 = only on Ctrl-C)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start the run in --out again (its warm-start in sft/ is kept)")
    p.add_argument("--trust-remote-code", action="store_true", help="let models run code from their folder or hub repo")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    positive = ["steps", "batch_size", "samples_per_prompt", "micro_batch_size", "max_new_tokens", "sft_batch_size"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ["sft_steps", "eval_every", "save_every"]:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.eval_limit < 1:
        raise UsageError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    for name in ["handoff_prob", "sft_jargon_frac"]:
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be between 0 and 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.weak_token_weight < 0:
        raise UsageError(f"--weak-token-weight must be 0 or more, got {args.weak_token_weight}")
    if args.baseline == "loo" and args.samples_per_prompt < 2:
        raise UsageError("the leave-one-out baseline needs --samples-per-prompt 2 or more (or choose --baseline mean/none)")
    if args.lr <= 0 or args.sft_lr <= 0:
        raise UsageError("--lr and --sft-lr must be positive")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it again: choose one")
    if args.resume and not args.out:
        raise UsageError("--resume needs the --out folder of the run to continue")


# -----------------------------------------------------------------------------
# GSM8K data


def load_gsm8k(split, data="openai/gsm8k"):
    """A list of {"question", "answer"} dicts from the hub, a folder of <split>.jsonl files, or one .jsonl."""
    if os.path.isdir(data):
        path = os.path.join(data, f"{split}.jsonl")
        if not os.path.exists(path):
            raise UsageError(f"--data folder {data} has no {split}.jsonl")
        rows = read_jsonl(path)
    elif data.endswith(".jsonl"):
        if not os.path.exists(data):
            raise UsageError(f"--data file {data} does not exist")
        rows = read_jsonl(data)
    elif os.path.exists(data):
        raise UsageError(f"--data {data} is neither a folder nor a .jsonl file")
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(data, "main", split=split))
        except Exception as e:
            raise UsageError(f"cannot load dataset {data!r} ({type(e).__name__}); offline, pass a local folder "
                             "with train.jsonl/test.jsonl or a .jsonl file to --data") from None
    problems = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise UsageError(f"{data}: record {i} needs string fields 'question' and 'answer'")
        problems.append({"question": row["question"], "answer": row["answer"]})
    if not problems:
        raise UsageError(f"{data}: no problems in the {split} split")
    return problems


def read_jsonl(path):
    # Read by hand rather than with datasets' json loader so a bad line can be named by its number.
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path} line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(rows[-1], dict):
                    raise UsageError(f"{path} line {n} is not a JSON object")
    return rows


def read_text(path, flag):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e.strerror if isinstance(e, OSError) else 'not UTF-8 text'})") from None


def format_prompt(question):
    return f"Question: {question}\nAnswer:"


def encode_prompts(tokenizer, problems, device, weak_prefix=None):
    """Left-padded prompts as (ids, mask); and the weak model's own, with `weak_prefix` (the text of
    --weak-prompt) in front, or None when it reads the same prompts."""
    def encode(prefix):
        enc = tokenizer([prefix + format_prompt(p["question"]) for p in problems], return_tensors="pt", padding=True)
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    return encode(""), encode(weak_prefix) if weak_prefix else None


# -----------------------------------------------------------------------------
# Reward: the final answer after "####", and the calculator jargon <<...>>

ANSWER = re.compile(r"\s*(-?)\s*\$?\s*(-?)([\d,]*\.?\d+)")
JARGON = re.compile(r"<<[^<>]*>>")


def normalize_number(sign, digits):
    digits = digits.replace(",", "")
    whole, _, frac = digits.partition(".")
    frac = frac.rstrip("0")
    number = str(int(whole or "0")) + (f".{frac}" if frac else "")
    return "-" + number if sign and number != "0" else number


def extract_answer(text):
    """The number after the first '####', normalised ('$1,000.00' -> '1000'), or None."""
    _, found, after = text.partition("####")
    match = ANSWER.match(after) if found else None
    if match is None:
        return None
    return normalize_number(match[1] or match[2], match[3])


def gold_answer(gold):
    """The normalised gold number, from a full GSM8K answer ('... #### 18') or a bare number ('18')."""
    return extract_answer(gold if "####" in gold else "####" + gold)


def reward(completion, gold):
    """1.0 when the completion's '#### N' equals the gold answer, else 0.0."""
    answer = extract_answer(completion)
    return float(answer is not None and answer == gold_answer(gold))


def has_jargon(text):
    return JARGON.search(text) is not None


def strip_jargon(text):
    return JARGON.sub("", text)


# -----------------------------------------------------------------------------
# Models


def load_tokenizer(name, trust_remote_code=False):
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise cannot_load(name, e) from None
    # GPT-2 has no pad token; padding is masked out anyway, and prompts are padded on the left so that
    # every row's next token is at the end.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_model(name, device, trust_remote_code=False):
    try:
        # float32 weights always: they are the master copy AdamW updates; speed comes from autocast.
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise cannot_load(name, e) from None
    return model.to(device).eval()


def cannot_load(name, error):
    offline = " (offline, a hub name needs a network: pass a local folder)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return UsageError(f"cannot load model {name!r}: {str(error).splitlines()[0]}{offline}")


def check_same_tokenizer(strong_tok, weak_tok):
    """Tandem decoding passes token ids between the models, so they must mean the same text."""
    s, w = strong_tok.get_vocab(), weak_tok.get_vocab()
    if s != w:
        only = sorted(set(s.items()) ^ set(w.items()))[:3]
        raise UsageError(f"weak and strong tokenizers differ (vocabularies of {len(w)} and {len(s)} tokens; "
                         f"e.g. {only}): choose two models of one family")
    if strong_tok.eos_token != weak_tok.eos_token:
        raise UsageError(f"weak and strong models end text differently ({weak_tok.eos_token!r} vs {strong_tok.eos_token!r})")


def check_fits(strong, weak, tokenizer, problems, max_new_tokens, weak_prefix=None):
    """One clear line now, instead of an index error mid-run, if the longest prompt plus
    --max-new-tokens would run past a model's positions."""
    (ids, _), weak_prompt = encode_prompts(tokenizer, problems, "cpu", weak_prefix)
    weak_ids = weak_prompt[0] if weak_prompt else ids
    for name, model, prompt in [("strong", strong, ids), ("weak", weak, weak_ids)]:
        context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        longest = prompt.shape[1]  # prompts are padded to the longest
        if context and longest + max_new_tokens > context:
            raise UsageError(f"the longest {name} prompt ({longest} tokens) and --max-new-tokens {max_new_tokens} exceed "
                             f"the {name} model's {context} positions: lower --max-new-tokens or shorten --weak-prompt")


def load_pair(strong_name, weak_name, device, trust_remote_code=False):
    """(tokenizer, strong, weak). The tokenizers are loaded and compared before any weights."""
    tokenizer = load_tokenizer(strong_name, trust_remote_code)
    check_same_tokenizer(tokenizer, load_tokenizer(weak_name, trust_remote_code))
    strong = load_model(strong_name, device, trust_remote_code)
    return tokenizer, strong, load_model(weak_name, device, trust_remote_code)


def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA GPU (use --device cpu)")
    return torch.device(name)


def autocast(device, dtype):
    """bfloat16 autocast on CUDA by default: the weights stay float32 so AdamW's small updates aren't lost."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def position_ids(attention_mask):
    # GPT-2 has absolute positions: a left-padded row must start counting at its first real token.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# A causal LM is a body that makes hidden states and an output layer (head) that turns them into
# logits. Calling them apart lets the decoder and the gradient pass compute logits only where they
# are needed. logits == head(body(x)) holds for GPT-2, Llama, Qwen and Mistral; not for models that
# rescale logits after the head (Gemma 2's soft-capping), which would need that step added.
def body(model):
    return model.base_model


def head(model):
    return model.get_output_embeddings()


# -----------------------------------------------------------------------------
# Tandem decoding: two models, two KV caches, one text


@dataclass
class Rollout:
    tokens: torch.Tensor  # B x T new token ids (eos after a row has finished)
    from_weak: torch.Tensor  # B x T bool: the weak model sampled this token
    mask: torch.Tensor  # B x T bool: a real generated token, up to and including the first eos


def sample(logits, temperature):
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1).squeeze(-1)


@torch.no_grad()
def tandem_generate(strong, weak, input_ids, attention_mask, handoff_prob, max_new_tokens,
                    temperature, eos_token_id, vocab_size=None, word_starts=None, weak_prompt=None):
    """Sample continuations of left-padded prompts; each token's owner is the weak model with
    probability `handoff_prob`, else the strong one. `vocab_size` cuts logits of output layers
    padded past the tokenizer. With `word_starts` (a bool per token id: its text begins a new
    word), owners change only at word starts (see word_handoff). `weak_prompt` = (ids, mask)
    gives the weak model prompts of its own (left-padded too); both models read every new token.
    Uses the global torch RNG."""
    B = input_ids.shape[0]
    device = input_ids.device
    # Coins are drawn up front on the host, so each model's rows are known without a device sync.
    coin_weak = torch.rand(max_new_tokens, B) < handoff_prob
    owns = {"strong": ~coin_weak, "weak": coin_weak}
    tokens = torch.full((B, max_new_tokens), eos_token_id, dtype=torch.long, device=device)
    from_weak = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # A model that owns no token of this rollout (always so at handoff 0 or 1) need not read any.
    readers = {name: model for name, model in [("strong", strong), ("weak", weak)] if owns[name].any()}
    prompts = {"strong": (input_ids, attention_mask), "weak": weak_prompt or (input_ids, attention_mask)}
    # Per reader, one attention mask for the whole rollout (the caches' causal masks hide the slots
    # not yet written), the position of its first new token, and a static cache: allocated once,
    # where a DynamicCache would copy every layer's keys and values at each step.
    attn = {name: torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1) for name, (_, mask) in prompts.items()}
    next_position = {name: mask.long().sum(-1, keepdim=True) for name, (_, mask) in prompts.items()}
    caches = {name: StaticCache(config=model.config, max_cache_len=attn[name].shape[1])
              for name, model in readers.items()}
    by_word = word_starts is not None and len(readers) == 2
    coin_weak_on_device = coin_weak.to(device)  # one copy up front, none per step
    # By token: each reader's rows at every step, found on the host and copied to the device in one go.
    rows = {} if by_word else {name: owns[name].nonzero()[:, 1].to(device).split(owns[name].sum(1).tolist())
                               for name in readers}
    weak_owns = coin_weak_on_device[0]  # by word: who owns the word being written

    def read(ids, positions):  # feed each reader its tokens; return its last hidden state
        return {name: body(model)(ids[name], attention_mask=attn[name], position_ids=positions[name],
                                  cache=caches[name], use_cache=True).last_hidden_state[:, -1]
                for name, model in readers.items()}

    hidden = read({name: ids for name, (ids, _) in prompts.items()},
                  {name: position_ids(mask) for name, (_, mask) in prompts.items()})
    for t in range(max_new_tokens):
        if by_word:
            logits = {name: head(model)(hidden[name])[:, :vocab_size] for name, model in readers.items()}
            token, weak_owns = word_handoff(logits, weak_owns, coin_weak_on_device[t], word_starts, temperature)
        else:
            token = torch.empty(B, dtype=torch.long, device=device)
            for name, model in readers.items():
                own = rows[name][t]
                if len(own):
                    # The output layer only for the rows this model owns: at handoff 0.5 that halves
                    # each model's largest matmul (50k-token vocabulary) at every step.
                    token[own] = sample(head(model)(hidden[name][own])[:, :vocab_size], temperature)
            weak_owns = coin_weak_on_device[t]
        token.masked_fill_(done, eos_token_id)
        tokens[:, t] = token
        from_weak[:, t] = weak_owns & ~done
        mask[:, t] = ~done
        done |= token == eos_token_id
        if t == max_new_tokens - 1 or done.all():  # the one host sync per token
            break
        hidden = read({name: token[:, None] for name in readers}, {name: next_position[name] + t for name in readers})
    n = t + 1
    return Rollout(tokens[:, :n], from_weak[:, :n], mask[:, :n])


def word_handoff(logits, weak_owns, coin_weak, word_starts, temperature):
    """One step of handoffs by word (--handoff-unit word). The owner of the current word samples
    the next token. If that token starts a new word, the coin picks the new word's owner; when it
    picks the other model, that model writes the word's first token instead, sampled from its own
    word-starting tokens. So the current owner decides where a word ends, and owners change only
    at word starts. Returns the tokens and the new owners (True: weak)."""
    token = sample(torch.where(weak_owns[:, None], logits["weak"], logits["strong"]), temperature)
    owner = torch.where(word_starts[token], coin_weak, weak_owns)
    starts = torch.where(owner[:, None], logits["weak"], logits["strong"]).masked_fill(~word_starts, float("-inf"))
    return torch.where(owner != weak_owns, sample(starts, temperature), token), owner


def word_start_mask(tokenizer, device):
    """For --handoff-unit word: True for each token id whose text begins with a space or newline."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return torch.tensor([text[:1].isspace() for text in texts], device=device)


def completion_texts(tokenizer, rollout):
    return [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(rollout.tokens, rollout.mask)]


# -----------------------------------------------------------------------------
# SFT warm-start: base GPT-2 can't solve GSM8K, so both models first imitate the train solutions


def sft_batch(tokenizer, prompts, completions, max_len):
    """Tokenised prompt + completion + eos, left-padded, with labels only on completion and eos."""
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    full = [(p + tokenizer(" " + c)["input_ids"] + [tokenizer.eos_token_id])[:max_len]
            for p, c in zip(prompt_ids, completions)]
    batch = tokenizer.pad({"input_ids": full}, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    n_prompt = torch.tensor([len(p) for p in prompt_ids])
    labels[position_ids(batch["attention_mask"]) < n_prompt[:, None]] = -100
    return batch["input_ids"], batch["attention_mask"], labels


def sft(model, tokenizer, problems, steps, batch_size, lr, jargon_frac, seed, amp=nullcontext(), name="sft"):
    """Fine-tune `model` on GSM8K solutions; a `jargon_frac` share keep their <<...>> annotations."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    max_len = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
    model.train()
    for step in range(1, steps + 1):
        batch = rng.sample(problems, min(batch_size, len(problems)))
        completions = [p["answer"] if rng.random() < jargon_frac else strip_jargon(p["answer"]) for p in batch]
        ids, attn, labels = (x.to(device) for x in sft_batch(tokenizer, [format_prompt(p["question"]) for p in batch],
                                                               completions, max_len))
        with amp:
            loss = model(ids, attention_mask=attn, position_ids=position_ids(attn), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            print(f"{name} step {step}/{steps} | loss {loss.item():.3f}", flush=True)
    return model.eval()


def save_json(path, obj):
    """Write aside, then rename: a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def save_model(model, tokenizer, path):
    """save_pretrained into a side folder, then swap it in: a kill never leaves a half-written model."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_dir(tmp, path)


def replace_dir(tmp, path):
    """Move the finished folder `tmp` to `path`. At every moment a complete copy is at `path` or,
    between the two renames, at `path`.old, where `existing` looks for it."""
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def existing(path):
    """`path`, or the copy a kill inside replace_dir left at `path`.old; None if neither is there."""
    return next((p for p in (path, path + ".old") if os.path.exists(os.path.join(p, "config.json"))), None)


# -----------------------------------------------------------------------------
# REINFORCE with a baseline


def baseline(rewards, kind="loo"):
    """rewards: prompts x samples. The value each sample's reward is compared with."""
    k = rewards.shape[1]
    if kind == "loo":  # unbiased: a sample's own reward doesn't enter its baseline
        return (rewards.sum(1, keepdim=True) - rewards) / (k - 1)
    if kind == "mean":
        return rewards.mean(1, keepdim=True).expand_as(rewards)
    return torch.zeros_like(rewards)


def completion_logprobs(model, prompt_ids, prompt_mask, tokens, mask, temperature, vocab_size=None, chunk=32):
    """log p(token) of each generated token under `model` (B x T, differentiable).

    Logits are divided by the sampling temperature, so these are log-probs of the distribution the
    rollouts were actually drawn from and the gradient is on-policy. Logits are never made for the
    prompt, and for the completion only `chunk` positions at a time: the full B x T x vocab float32
    tensor would be the largest of the whole step."""
    seq = torch.cat([prompt_ids, tokens], dim=1)
    attn = torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], dim=1)
    T = tokens.shape[1]
    hidden = body(model)(seq[:, :-1], attention_mask=attn[:, :-1],
                         position_ids=position_ids(attn)[:, :-1]).last_hidden_state[:, -T:]
    # Checkpointing each chunk recomputes its logits in the backward pass instead of keeping them.
    return torch.cat([checkpoint(chosen_logprobs, head(model), hidden[:, i:i + chunk], tokens[:, i:i + chunk],
                                 temperature, vocab_size, use_reentrant=False) for i in range(0, T, chunk)], dim=1)


def chosen_logprobs(head, hidden, tokens, temperature, vocab_size):
    logits = head(hidden)[..., :vocab_size].float()
    if temperature > 0:
        logits = logits / temperature
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - logits.logsumexp(-1)


class Logprobs(torch.nn.Module):
    """completion_logprobs as a module's forward pass, the form DistributedDataParallel can wrap."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompt_ids, prompt_mask, tokens, mask, temperature, vocab_size=None):
        return completion_logprobs(self.model, prompt_ids, prompt_mask, tokens, mask, temperature, vocab_size)


def policy_gradient(model, prompt_ids, prompt_mask, rollout, advantages, temperature, micro_batch_size,
                    vocab_size=None, amp=nullcontext(), weak_token_weight=0.0, ddp=None):
    """Accumulate the REINFORCE gradient into model's .grad; return the loss.

    loss = -sum(advantage * log p(token)) over the strong model's own tokens (eos included; prompt
    and padding excluded), divided by the number of such tokens in the whole batch, so micro-batches
    add up to exactly one batch's gradient. The weak model's tokens are context, not the strong
    model's actions, unless `weak_token_weight` > 0 lets them in with that weight (the follow-up
    paper's knob; 0 in its main runs). Under torchrun, `ddp` (from data_parallel) computes the
    log-probs and adds up the ranks' gradients."""
    own = rollout.mask & ~rollout.from_weak
    weight = own.float() + weak_token_weight * (rollout.mask & rollout.from_weak).float()
    total_weight = max(all_sum([weight.sum().item()])[0], 1e-6)  # over every rank's rollouts
    # Rows with zero advantage or nothing to learn from contribute nothing: skip their forward pass.
    rows = ((advantages != 0) & (weight > 0).any(1)).nonzero().squeeze(1)
    if ddp is None:
        logprobs, scale = Logprobs(model), 1
    else:
        # DDP averages the ranks' gradients; each rank's loss is already its share of the batch's, so scale up to a sum.
        logprobs, scale = ddp, dist.get_world_size()
        if not len(rows):
            rows = rows.new_zeros(1)  # a row whose loss is 0: this rank still has to join the gradient sync
    chunks = [rows[i:i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    total = 0.0
    for i, chunk in enumerate(chunks):
        # DDP syncs gradients in the last micro-batch's backward pass only; the others add up locally.
        sync = ddp.no_sync() if ddp is not None and i < len(chunks) - 1 else nullcontext()
        with sync:
            with amp:
                logp = logprobs(prompt_ids[chunk], prompt_mask[chunk], rollout.tokens[chunk], rollout.mask[chunk],
                                temperature, vocab_size)
            loss = -(advantages[chunk, None] * logp * weight[chunk]).sum() / total_weight
            (loss * scale).backward()
        total += loss.item()
    return total


def rl_step(strong, weak, tokenizer, optimizer, problems, args, amp=nullcontext(), word_starts=None, weak_prefix=None,
            ddp=None):
    """One tandem rollout batch and one REINFORCE update of `strong`; returns the step's metrics.
    Under torchrun, `problems` is this rank's share of the batch and the metrics are the whole
    batch's, and `ddp` (from data_parallel) wraps `strong` for the gradient. `word_starts` (from
    word_start_mask) makes handoffs happen only at word starts; `weak_prefix` goes in front of the
    weak model's prompts."""
    device = next(strong.parameters()).device
    k = args.samples_per_prompt
    repeated = [p for p in problems for _ in range(k)]  # a prompt's k samples sit side by side
    (ids, mask), weak_prompt = encode_prompts(tokenizer, repeated, device, weak_prefix)
    with amp:
        rollout = tandem_generate(strong, weak, ids, mask, args.handoff_prob, args.max_new_tokens, args.temperature,
                                  tokenizer.eos_token_id, len(tokenizer), word_starts, weak_prompt)
    texts = completion_texts(tokenizer, rollout)
    rewards = torch.tensor([reward(t, p["answer"]) for t, p in zip(texts, repeated)], device=device)
    advantages = (rewards.view(-1, k) - baseline(rewards.view(-1, k), args.baseline)).view(-1)
    loss = policy_gradient(strong, ids, mask, rollout, advantages, args.temperature, args.micro_batch_size,
                           len(tokenizer), amp, args.weak_token_weight, ddp)
    grad_norm = torch.nn.utils.clip_grad_norm_(strong.parameters(), args.grad_clip)
    # The whole batch's figures, over every rank.
    n_texts, n_rewarded, n_jargon, n_tokens, n_weak, loss = all_sum(
        [len(texts), rewards.sum().item(), sum(map(has_jargon, texts)), rollout.mask.sum().item(),
         rollout.from_weak.sum().item(), loss])
    # A non-finite loss or gradient would poison the weights (and AdamW's moments) for good: skip it.
    finite = math.isfinite(loss) and math.isfinite(grad_norm.item())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "reward": n_rewarded / n_texts,
        "jargon_rate": n_jargon / n_texts,
        "weak_frac": n_weak / max(n_tokens, 1),
        "loss": loss,
        "grad_norm": grad_norm.item(),
        "mean_tokens": n_tokens / n_texts,
        "rollouts": int(n_texts),
        "skipped": not finite,
    }


# -----------------------------------------------------------------------------
# Several GPUs: under torchrun, each process (rank) rolls out its share of every batch, and
# DistributedDataParallel adds up the ranks' gradients


def init_distributed(device):
    """(rank, world_size, device): after joining torchrun's process group, or (0, 1, device)
    without torchrun. Ranks other than 0 print nothing."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        # Bound to its GPU, NCCL connects (or fails) here, and barriers know which GPU to use.
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    atexit.register(leave_process_group)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return dist.get_rank(), dist.get_world_size(), device


def leave_process_group():
    """Called by run_cli as the run ends, and at exit if a crash got past it, while Python is still
    whole: the DistributedDataParallel wrapper sits in a reference cycle, and gloo work that is
    left for the interpreter's shutdown to free can abort the process."""
    if distributed():
        gc.collect()
        dist.destroy_process_group()


def distributed():
    return dist.is_available() and dist.is_initialized()


def all_sum(values):
    """Sums of a few numbers over all ranks (the numbers themselves in a single process)."""
    if not distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def data_parallel(model, device):
    """The model's log-probs (Logprobs) wrapped in DistributedDataParallel, for policy_gradient."""
    # Gradients as views of DDP's communication buckets: one copy of them fewer.
    return DistributedDataParallel(Logprobs(model), device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def share_weights(*models):
    """Every rank takes rank 0's weights (after a warm-start, which sampled differently on each)."""
    for model in models:
        for p in model.parameters():
            dist.broadcast(p.data, 0)


def same_on_all_ranks(obj):
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return all(o == objs[0] for o in objs)


# -----------------------------------------------------------------------------
# Checkpoints: a run that dies goes on from its last one


def save_checkpoint(path, strong, tokenizer, optimizer, step, rng, skipped_updates, rng_states):
    """Everything the loop needs to go on exactly where it stopped, written aside and then swapped
    in. `rng_states`: torch_rng_state() of every rank."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    strong.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"step": step, "skipped_updates": skipped_updates, "optimizer": optimizer.state_dict(),
                "rng_python": rng.getstate(), "rng_torch": rng_states}, os.path.join(tmp, "state.pt"))
    replace_dir(tmp, path)


def load_checkpoint(path, optimizer, rng, rank=0):
    """Restore optimizer and RNG states from save_checkpoint's folder (the model loads from it
    separately); returns (step, skipped_updates). weights_only: a checkpoint cannot run code."""
    state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    version, internal, gauss = state["rng_python"]
    rng.setstate((version, tuple(internal), gauss))
    if rank < len(state["rng_torch"]):  # else resumed on more processes than it had: a new rank keeps its seed
        cpu, cuda = state["rng_torch"][rank]
        torch.set_rng_state(cpu)
        if cuda is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(cuda)
    return state["step"], state["skipped_updates"]


def torch_rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def keep_metrics(path, last_step):
    """Drop the rows a killed run wrote after its last checkpoint (and a half-written last line), so
    the resumed run adds each step exactly once."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row["step"] <= last_step:
                    rows.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


class Interrupt:
    """The first Ctrl-C asks the loop to save a checkpoint and stop after the current step; a
    second one stops at once."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True  # no print here: the handler may run in the middle of another print

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# -----------------------------------------------------------------------------
# Main: warm-start, then the RL loop


def log_metrics(log, row):
    log.write(json.dumps(row) + "\n")
    log.flush()


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = init_distributed(pick_device(args.device))
    if args.batch_size % world_size:
        raise UsageError(f"--batch-size {args.batch_size} does not split over {world_size} processes: make it a multiple")
    random.seed(args.seed)
    torch.manual_seed(args.seed + rank)  # each rank samples its own rollouts
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    amp = autocast(device, args.dtype)

    # Every check comes before anything is written: bad input leaves the run folder as it was.
    train = load_gsm8k("train", args.data)
    test = load_gsm8k("test", args.data)[:args.eval_limit] if args.eval_every else []
    weak_prefix = read_text(args.weak_prompt, "--weak-prompt") if args.weak_prompt else None
    out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if distributed():  # one run folder, whatever the ranks' clocks say
        shared = [out]
        dist.broadcast_object_list(shared, 0)
        out = shared[0]
    metrics_path, final_path = os.path.join(out, "metrics.jsonl"), os.path.join(out, "final")
    finished, started = existing(final_path), os.path.exists(metrics_path)
    if finished and args.resume:
        print(f"the run in {out} has finished ({finished} is there): nothing to resume")
        return
    if (finished or started) and not (args.resume or args.overwrite):
        raise UsageError(f"--out {out} already holds a {'finished' if finished else 'started'} run: "
                         "add --resume to continue it or --overwrite to start it again, or choose another --out")
    checkpoint = existing(os.path.join(out, "checkpoint")) if args.resume else None
    # The warm-start is saved under the run folder; a later run in the same folder loads it instead.
    sft_path = {role: os.path.join(out, "sft", role) for role in ("strong", "weak")}
    reused = {role: existing(path) if args.sft_steps > 0 else None for role, path in sft_path.items()}
    strong_from = checkpoint or reused["strong"] or args.strong
    weak_from = reused["weak"] or args.weak
    tokenizer, strong, weak = load_pair(strong_from, weak_from, device, args.trust_remote_code)
    check_fits(strong, weak, tokenizer, train + test, args.max_new_tokens, weak_prefix)
    if distributed():
        dist.barrier()  # every rank has read the run folder before rank 0 writes to it
    if rank == 0:
        prepare_run_folder(out, args)
    print(f"run folder: {out} | device {device} | {world_size} process(es) | {len(train)} train problems")

    if args.sft_steps > 0 and not checkpoint:
        # The strong model learns the jargon; the weak one sees the same solutions without it.
        for role, model, jargon_frac in [("strong", strong, args.sft_jargon_frac), ("weak", weak, 0.0)]:
            if reused[role]:
                print(f"sft {role}: reusing the warm-start in {sft_path[role]}")
                continue
            sft(model, tokenizer, train, args.sft_steps, args.sft_batch_size, args.sft_lr, jargon_frac, args.seed,
                amp, f"sft {role}")
            if distributed():
                share_weights(model)
            if rank == 0:
                save_model(model, tokenizer, sft_path[role])
    weak.requires_grad_(False)
    word_starts = word_start_mask(tokenizer, device) if args.handoff_unit == "word" else None

    def evaluation(step):
        from eval import evaluate  # eval.py imports this file, so import it only when needed

        # Every rank evaluates (the same problems, the same result), so none waits long on another.
        result = evaluate(strong, weak, tokenizer, test, args.handoff_prob, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size * args.samples_per_prompt, seed=args.seed, amp=amp,
                          word_starts=word_starts, weak_prefix=weak_prefix)
        print(f"eval at step {step} | strong {result['strong_accuracy']:.3f} | tandem {result['tandem_accuracy']:.3f} | "
              f"jargon {result['jargon_rate']:.2f} | weak NLL {result['weak_nll']:.3f}", flush=True)
        if rank == 0:
            log_metrics(log, {"step": step, "kind": "eval"} | result)
            save_json(os.path.join(out, "eval.json"), result)

    # Sampling and the gradient pass both run in eval mode: with dropout on, the gradient would be
    # taken under a different policy from the one that sampled.
    strong.eval()
    optimizer = torch.optim.AdamW(strong.parameters(), lr=args.lr, weight_decay=0.0)
    ddp = data_parallel(strong, device) if distributed() else None
    rng = random.Random(args.seed)  # the same on every rank: all draw the same batch, each takes its share
    last_step, skipped_updates = 0, 0
    if checkpoint:
        last_step, skipped_updates = load_checkpoint(checkpoint, optimizer, rng, rank)
        print(f"resuming after step {last_step} from {checkpoint}")
    elif args.resume:
        print(f"no checkpoint in {out} yet: starting from step 1")
    if rank == 0:
        keep_metrics(metrics_path, last_step if checkpoint else -1)

    def save(step):
        rng_states = [torch_rng_state()]
        if distributed():  # each rank sampled its own rollouts: keep every rank's RNG
            rng_states = [None] * world_size
            dist.all_gather_object(rng_states, torch_rng_state())
        if rank == 0:
            save_checkpoint(os.path.join(out, "checkpoint"), strong, tokenizer, optimizer, step, rng, skipped_updates,
                            rng_states)

    # Ranks other than 0 log to nowhere.
    with open(metrics_path if rank == 0 else os.devnull, "a") as log, Interrupt() as interrupt:
        if args.eval_every and last_step == 0:
            evaluation(0)  # every run records its starting point
        for step in range(last_step + 1, args.steps + 1):
            t0 = time.time()
            try:
                batch = rng.sample(train, min(args.batch_size, len(train)))[rank::world_size]
                metrics = {"step": step, "kind": "train"} | rl_step(strong, weak, tokenizer, optimizer, batch, args, amp,
                                                                    word_starts, weak_prefix, ddp)
                skipped_updates += metrics["skipped"]
                metrics |= {"skipped_updates": skipped_updates, "seconds": time.time() - t0}
                log_metrics(log, metrics)
                print(f"step {step}/{args.steps} | reward {metrics['reward']:.3f} | jargon {metrics['jargon_rate']:.2f} | "
                      f"weak {metrics['weak_frac']:.2f} | loss {metrics['loss']:+.4f} | {metrics['seconds']:.1f}s"
                      f"{' | non-finite: update skipped' if metrics['skipped'] else ''}", flush=True)
                if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
                    evaluation(step)
            except (torch.OutOfMemoryError, MemoryError):
                saved = existing(os.path.join(out, "checkpoint"))
                raise UsageError(f"out of memory at step {step}; {f'the checkpoint in {saved} is intact' if saved else 'no checkpoint yet'}: "
                                 "lower --micro-batch-size (or --batch-size, --max-new-tokens) and --resume") from None
            stop = all_sum([float(interrupt.requested)])[0] > 0  # every rank stops at the same step
            if (args.save_every and step % args.save_every == 0) or stop:
                save(step)
            if stop:
                print(f"interrupted: stopped after step {step}, checkpoint saved; add --resume to the same command "
                      "to go on")
                return 130

    if distributed():
        if not same_on_all_ranks(sum(p.double().sum().item() for p in strong.parameters())):
            raise UsageError("the ranks' weights have drifted apart; this is a bug, please report it")
        print(f"the strong model's weights are identical on all {world_size} ranks")
    if rank == 0:
        save_model(strong, tokenizer, final_path)
    print(f"saved {final_path}")


def prepare_run_folder(out, args):
    """Rank 0, once every input check has passed: create the folder and record the flags."""
    if args.overwrite:  # the old run's results go; its warm-start stays for reuse
        for name in ["checkpoint", "checkpoint.old", "final", "final.old"]:
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)
        for name in ["eval.json", "metrics.jsonl"]:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    os.makedirs(out, exist_ok=True)
    save_json(os.path.join(out, "config.json"), vars(args) | {"out": out})


def run_cli(main):
    """Runs main() and exits with its return value as the exit code. Bad input ends in one line on
    stderr and exit code 2, not a traceback."""
    try:
        code = main() or 0
    except UsageError as e:
        sys.stderr.write(f"error: {e}\n")  # one write: under torchrun, every rank's line stays whole
        code = 2
    except KeyboardInterrupt:  # outside the RL loop (which saves a checkpoint first): nothing to save
        print("\ninterrupted", file=sys.stderr)
        code = 130
    if distributed():
        # Under torchrun, skip the interpreter's shutdown: a gloo thread that frees a tensor during it
        # needs the GIL, and the process aborts after all its work is done ("terminate called without
        # an active exception"; pytorch PR 179291 describes this).
        leave_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    import tandem  # this file again, as the module eval.py imports: one UsageError class for both

    tandem.run_cli(tandem.main)

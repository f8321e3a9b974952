"""
Did tandem training work? Accuracy, jargon rate, legibility and handoff robustness on GSM8K.

For a strong/weak pair it measures, with the same `reward` and `tandem_generate` as training:
- strong alone (handoff 0), weak alone (handoff 1) and the pair at --handoff-prob (robustness);
- the jargon rate, the share of solutions containing calculator annotations <<...>>;
- legibility: the weak model's mean per-token negative log-likelihood of the strong model's solo
  solutions (lower is more legible), as the follow-up paper (Tandem RL with verifiable rewards) does;
- with --curve, accuracy at several handoff probabilities.

    python eval.py --strong runs/RUN/final --weak runs/RUN/sft/weak --limit 200 --curve 0,0.25,0.5,0.75,1
"""

import argparse
import re
import sys
import time

import torch

import tandem

NUMBER = re.compile(r"(-?)\$?([\d,]*\.?\d+)")


def flexible_answer(text):
    """The last number in the text (lm-evaluation-harness's "flexible extract"), normalised."""
    numbers = NUMBER.findall(text)
    return tandem.normalize_number(*numbers[-1]) if numbers else None


def flexible_reward(completion, gold):
    return float(flexible_answer(completion) == tandem.gold_answer(gold))


@torch.no_grad()
def solve(strong, weak, tokenizer, problems, handoff_prob, max_new_tokens, temperature, batch_size, progress=None):
    """Co-write a solution to every problem; returns (texts, rollouts per batch, prompt encodings per batch)."""
    device = next(strong.parameters()).device
    texts, batches = [], []
    for i in range(0, len(problems), batch_size):
        enc = tokenizer([tandem.format_prompt(p["question"]) for p in problems[i:i + batch_size]],
                        return_tensors="pt", padding=True).to(device)
        rollout = tandem.tandem_generate(strong, weak, enc["input_ids"], enc["attention_mask"], handoff_prob,
                                         max_new_tokens, temperature, tokenizer.eos_token_id, len(tokenizer))
        texts += tandem.completion_texts(tokenizer, rollout)
        batches.append((enc, rollout))
        if progress:
            progress(f"handoff {handoff_prob:g}: {len(texts)}/{len(problems)}")
    return texts, batches


@torch.no_grad()
def weak_nll(weak, batches, vocab_size):
    """Mean negative log-likelihood per token (nats) of the given rollouts' tokens under `weak`."""
    total, count = 0.0, 0
    for enc, rollout in batches:
        logp = tandem.completion_logprobs(weak, enc["input_ids"], enc["attention_mask"], rollout.tokens,
                                          rollout.mask, 0.0, vocab_size)
        total -= logp[rollout.mask].sum().item()
        count += rollout.mask.sum().item()
    return total / max(count, 1)


def evaluate(strong, weak, tokenizer, problems, handoff_prob=0.5, curve=(), max_new_tokens=256, temperature=0.0,
             batch_size=32, seed=0, amp=None, progress=None, runs=None):
    """The metrics of eval.py as a dict. Runs in its own RNG stream, so evaluating in the middle of
    training neither depends on nor disturbs the training run's random state. A dict passed as
    `runs` receives the decoded solutions: {handoff_prob: (texts, [(prompt encoding, rollout)])}."""
    amp = amp or tandem.nullcontext()
    runs = {} if runs is None else runs

    def at(p):  # each handoff probability is decoded once, whichever metrics use it
        if p not in runs:
            torch.manual_seed(seed)
            with amp:
                runs[p] = solve(strong, weak, tokenizer, problems, p, max_new_tokens, temperature, batch_size, progress)
        return runs[p]

    def accuracy(texts):
        return sum(tandem.reward(t, p["answer"]) for t, p in zip(texts, problems)) / len(problems)

    device = next(strong.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        (solo, solo_batches), (pair, _) = at(0.0), at(handoff_prob)
        with amp:
            nll = weak_nll(weak, solo_batches, len(tokenizer))
        result = {
            "n": len(problems),
            "strong_accuracy": accuracy(solo),
            "weak_accuracy": accuracy(at(1.0)[0]),
            "tandem_accuracy": accuracy(pair),
            "jargon_rate": sum(map(tandem.has_jargon, solo)) / len(solo),
            "tandem_jargon_rate": sum(map(tandem.has_jargon, pair)) / len(pair),
            "weak_nll": nll,
            "mean_tokens": sum(r.mask.sum().item() for _, r in solo_batches) / len(problems),
            "flexible_accuracy": sum(flexible_reward(t, p["answer"]) for t, p in zip(solo, problems)) / len(problems),
        }
        if curve:
            result["curve"] = [{"handoff_prob": p, "accuracy": accuracy(at(p)[0])} for p in curve]
    return result


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a strong/weak pair on GSM8K: accuracy, jargon, legibility.")
    p.add_argument("--strong", required=True, help="strong model: hub name or local folder (e.g. runs/RUN/final)")
    p.add_argument("--weak", required=True, help="weak model: hub name or local folder (e.g. runs/RUN/sft/weak)")
    p.add_argument("--data", default="openai/gsm8k", help="hub dataset, local folder with train/test.jsonl, or one .jsonl file")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to evaluate on")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--handoff-prob", type=float, default=0.5, help="handoff probability of the tandem accuracy")
    p.add_argument("--curve", default=None, help="comma-separated handoff probabilities for a robustness curve, e.g. 0,0.5,1")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest solution generated")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (each token its owner's argmax)")
    p.add_argument("--batch-size", type=int, default=32, help="problems decoded together")
    p.add_argument("--seed", type=int, default=0, help="seed of the handoffs (and of sampling if temperature > 0)")
    p.add_argument("--examples", type=int, default=0, help="print K solutions, strong alone and tandem, weak tokens in {braces}")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="compute dtype (auto: bfloat16 on CUDA)")
    args = p.parse_args(argv)
    try:
        args.curve = [float(x) for x in args.curve.split(",")] if args.curve else []
    except ValueError:
        raise tandem.UsageError(f"--curve takes numbers separated by commas, e.g. 0,0.5,1; got {args.curve!r}") from None
    for prob in [args.handoff_prob, *args.curve]:
        if not 0 <= prob <= 1:
            raise tandem.UsageError(f"handoff probabilities must be between 0 and 1, got {prob}")
    for name in ["limit", "max_new_tokens", "batch_size"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise tandem.UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.temperature < 0:
        raise tandem.UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    return args


def marked(tokenizer, tokens, from_weak, mask):
    """The solution's text with every run of weak-sampled tokens in {braces}."""
    text, run, weak_run = "", [], False
    for tok, weak in zip(tokens[mask].tolist(), from_weak[mask].tolist()):
        if weak != weak_run and run:
            piece = tokenizer.decode(run, skip_special_tokens=True)
            text += "{" + piece + "}" if weak_run else piece
            run = []
        run.append(tok)
        weak_run = weak
    piece = tokenizer.decode(run, skip_special_tokens=True)
    return text + ("{" + piece + "}" if weak_run and piece else piece)


def report(result, args):
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    lines = [f"GSM8K {args.split}: {result['n']} problems, {sampling}, seed {args.seed}",
             f"{'':24}{'accuracy':>9}{'jargon':>9}",
             f"{'strong alone':24}{result['strong_accuracy']:9.3f}{result['jargon_rate']:9.3f}",
             f"{'weak alone':24}{result['weak_accuracy']:9.3f}",
             f"{f'tandem (handoff {args.handoff_prob:g})':24}{result['tandem_accuracy']:9.3f}{result['tandem_jargon_rate']:9.3f}",
             f"strong alone, flexible extract: accuracy {result['flexible_accuracy']:.3f}",
             f"legibility: weak NLL of strong solutions {result['weak_nll']:.3f} nats/token "
             f"(mean length {result['mean_tokens']:.1f} tokens)"]
    if "curve" in result:
        lines.append("handoff curve: " + "  ".join(f"{c['handoff_prob']:g}: {c['accuracy']:.3f}" for c in result["curve"]))
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = tandem.pick_device(args.device)
    amp = tandem.autocast(device, args.dtype)
    problems = tandem.load_gsm8k(args.split, args.data)[:args.limit]
    strong, tokenizer = tandem.load_model(args.strong, device)
    weak, weak_tokenizer = tandem.load_model(args.weak, device)
    tandem.check_same_tokenizer(tokenizer, weak_tokenizer)

    # Progress on stderr for runs of more than one batch: one line rewritten in a terminal, a line
    # per batch in a log file.
    tty, long_run = sys.stderr.isatty(), len(problems) > args.batch_size

    def show(msg):
        print(f"\r{msg}   " if tty else msg, end="" if tty else "\n", file=sys.stderr, flush=True)

    t0, runs = time.time(), {}
    result = evaluate(strong, weak, tokenizer, problems, args.handoff_prob, args.curve, args.max_new_tokens,
                      args.temperature, args.batch_size, args.seed, amp, show if long_run else None, runs)
    if long_run and tty:
        print(file=sys.stderr)
    print(report(result, args))
    print(f"({time.time() - t0:.1f}s)")
    for i in range(min(args.examples, len(problems))):
        print(f"\n--- problem {i}: {problems[i]['question']}\n--- gold: {tandem.extract_answer(problems[i]['answer'])}")
        for name, p in [("strong alone", 0.0), ("tandem, weak tokens in {}", args.handoff_prob)]:
            b, r = divmod(i, args.batch_size)
            rollout = runs[p][1][b][1]
            print(f"[{name}]\n{marked(tokenizer, rollout.tokens[r], rollout.from_weak[r], rollout.mask[r]).strip()}")
    if args.json:
        tandem.save_json(args.json, result)


if __name__ == "__main__":
    tandem.run_cli(main)

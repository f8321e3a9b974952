"""
Did tandem training work? Accuracy, the task's marker (GSM8K: jargon), legibility and handoff robustness, with
tandem.evaluate: the strong model alone (handoff 0), the weak one alone (handoff 1), the pair at
--handoff-prob, the weak model's NLL of the strong model's solutions, and with --curve the accuracy
at several handoff probabilities. --plot draws the paper's figure from run folders; --make-data writes the
word problems of the README's real-model experiment; --bench times the decoder, forward passes and an RL step.

    python eval.py --strong runs/RUN/final --weak runs/RUN/sft/weak --limit 200 --curve 0,0.25,0.5,0.75,1
    python eval.py --plot runs/tandem runs/plain --out curves.png
    python eval.py --make-data data/word-problems
    python eval.py --bench --random-init --device cpu --batch-size 8 --max-new-tokens 64
"""

import argparse
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from itertools import islice

import torch

import tandem
from tandem import number


def parse_args(argv=None):
    p = tandem.Parser(description="Evaluate a strong/weak pair: accuracy, the task's marker, legibility.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # --help shows every default
    p.add_argument("--strong",
                   help="strong model: hub name or local folder (e.g. runs/RUN/final); --bench: gpt2-medium")
    p.add_argument("--weak", action="append", help="weak model: hub name or local folder (e.g. runs/RUN/sft/weak); "
                   "more than once, each partner on its own (one held out of training is a new reader); --bench: gpt2")
    p.add_argument("--data", default="openai/gsm8k",
                   help="hub dataset, folder with train.jsonl and test.jsonl, or one .jsonl")
    p.add_argument("--task", default="gsm8k", choices=list(tandem.TASKS), help="what is solved and checked")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to evaluate on")
    p.add_argument("--chat-template", default="none", choices=["none", "strong", "weak", "both"],
                   help="which models read a problem in their own chat template")
    p.add_argument("--limit", type=number(int, 1), default=None, help="evaluate only the first N problems")
    tandem.handoff_flags(p)  # --handoff-prob (the pair's accuracy is at this one), --handoff-unit, --max-gap
    p.add_argument("--weak-prompt", default=None, help="text file put in front of every prompt the weak model reads")
    p.add_argument("--curve", type=curve, default=[],
                   help="comma-separated handoff probabilities for a robustness curve, e.g. 0,0.5,1")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=256, help="longest solution generated")
    p.add_argument("--temperature", type=number(float, 0), default=0.0,
                   help="0: greedy (each token its owner's argmax)")
    p.add_argument("--samples", type=number(int, 1), default=1,
                   help="samples of each problem at --temperature, for pass@k (as the follow-up reports its accuracy)")
    p.add_argument("--pass-at", type=ks, default=[1], help="comma-separated k of pass@k, each at most --samples")
    p.add_argument("--batch-size", type=number(int, 1), default=32, help="problems decoded together")
    p.add_argument("--seed", type=int, default=0, help="seed of the author draws (and of sampling if temperature > 0)")
    p.add_argument("--examples", type=number(int, 0), default=0,
                   help="print K solutions, strong alone and tandem, weak tokens in {braces}")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on cuda)")
    p.add_argument("--trust-remote-code", action="store_true", help="let models run code from their folder or hub repo")
    p.add_argument("--plot", nargs="+", metavar="RUN",
                   help="draw the marker rate and accuracy over RL updates from these run folders")
    p.add_argument("--out", default="curves.png", help="--plot: the picture's file (.png, .pdf, .svg)")
    p.add_argument("--make-data", metavar="DIR",
                   help="write the word problems (README) to DIR/train.jsonl and DIR/test.jsonl, and the language "
                   "experiment's --weak-prompt to DIR/partner-es.txt")
    p.add_argument("--bench", action="store_true", help="time decoding and RL steps instead of evaluating (see README)")
    p.add_argument("--random-init", action="store_true",
                   help="--bench: build gpt2 and gpt2-medium from their shapes, offline")
    p.add_argument("--prompt-tokens", type=number(int, 1), default=100, help="--bench: prompt length")
    p.add_argument("--repeats", type=number(int, 1), default=3,
                   help="--bench: timed rounds of each decoding run (median)")
    args = p.parse_args(argv)
    if args.bench:
        args.strong, args.weak = args.strong or "gpt2-medium", args.weak or ["gpt2"]
    elif not (args.strong and args.weak or args.plot or args.make_data):
        p.error("--strong and --weak are required (only --bench has defaults: gpt2-medium and gpt2)")
    if args.samples > 1 and args.temperature == 0:
        p.error("--samples above 1 needs --temperature above 0: greedy samples are all the same")
    if max(args.pass_at) > args.samples:
        p.error(f"--pass-at {max(args.pass_at)} needs --samples {max(args.pass_at)} or more")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")
    return args


NUMBER = re.compile(r"(-?)\$?([\d,]*\.?\d+)")


def flexible_answer(text):
    """The last number in the text (lm-evaluation-harness's "flexible extract"), normalised."""
    numbers = NUMBER.findall(text)
    return tandem.normalize_number(*numbers[-1]) if numbers else None


def wilson(k, n, z=1.96):
    """The 95% Wilson score interval of a success rate k / n."""
    centre, half = k + z * z / 2, z * math.sqrt(k * (n - k) / n + z * z / 4)
    return [(centre - half) / (n + z * z), (centre + half) / (n + z * z)]


def curve(text):
    return [number(float, 0, 1)(x) for x in text.split(",")]


def ks(text):
    return [number(int, 1)(x) for x in text.split(",")]


def pass_at_k(n, c, k):
    """pass@k from n samples of which c are right, unbiased (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)


def report(result, args):
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    def acc(value, ci):
        return f"{value:9.3f}  [{ci[0]:.3f}, {ci[1]:.3f}]"

    size = f"{result['n'] // args.samples} problems" + (f" x {args.samples} samples" if args.samples > 1 else "")
    lines = [f"{args.data or args.task} ({args.split}): {size}, {sampling}, seed {args.seed}; [95% Wilson interval]",
             f"{'':32}{'accuracy':>9}{'':18}{'marker':>9}",
             f"{'strong alone':32}{acc(result['strong_accuracy'], result['strong_accuracy_ci'])}"
             f"{acc(result['strong_marker_rate'], result['strong_marker_rate_ci'])}",
             f"{'weak alone':32}{acc(result['weak_accuracy'], result['weak_accuracy_ci'])}"
             f"{acc(result['weak_marker_rate'], result['weak_marker_rate_ci'])}",
             f"{f'tandem (handoff {args.handoff_prob:g})':32}"
             f"{acc(result['tandem_accuracy'], result['tandem_accuracy_ci'])}"
             f"{acc(result['tandem_marker_rate'], result['tandem_marker_rate_ci'])}",
             f"legibility: weak NLL of strong solutions {result['weak_nll']:.3f} nats/token, "
             f"{result['weak_nll_per_char']:.3f} nats/character (mean length {result['strong_tokens']:.1f} tokens)"]
    if "flexible_accuracy" in result:
        lines.insert(-1, f"{'strong alone, flexible extract':32}"
                         f"{acc(result['flexible_accuracy'], result['flexible_accuracy_ci'])}")
    for c in result.get("curve", []):
        lines.append(f"{'handoff curve at %g' % c['handoff_prob']:32}{acc(c['accuracy'], c['ci'])}")
    for key in ["strong", "weak", "tandem"] if "strong_pass_at" in result else []:
        shown = ", ".join(f"pass@{k} {v:.3f}" for k, v in result[f"{key}_pass_at"].items())
        lines.append(f"{key + ' (' + str(args.samples) + ' samples a problem)':32}{shown}")
    return "\n".join(lines)


def marked(tokenizer, tokens, from_weak, mask):
    """The solution's text with every run of weak-sampled tokens in {braces}, each run decoded after what came before
    it (alone, a SentencePiece run would lose its first space)."""
    ids, weak = tokens[mask].tolist(), from_weak[mask].tolist()
    text, begin = "", 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or weak[end] != weak[begin]:
            piece = tandem.piece_text(tokenizer, ids[:end], end - begin)
            text += "{" + piece + "}" if weak[begin] and piece else piece
            begin = end
    return text


def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        return bench(args)
    if args.plot:
        return plot(args.plot, args.out)
    if args.make_data:
        return make_data(args.make_data, args.seed)
    device, amp = tandem.pick_device(args.device, args.dtype)
    task = tandem.TASKS[args.task]
    problems = tandem.load(task, args.split, args.data)[:args.limit]
    problems = [p for p in problems for _ in range(args.samples)]  # a problem's samples side by side
    asking = tandem.Asking(task, {role: args.chat_template in (role, "both") for role in ("strong", "weak")},
                           {"strong": "", "weak": tandem.read_text(args.weak_prompt) if args.weak_prompt else ""})
    roles = {"strong": args.strong} | {f"weak-{i}": name for i, name in enumerate(args.weak)}
    tokenizers, models = tandem.load_models(roles, device, args.trust_remote_code)
    partners = []
    for role in list(roles)[1:]:  # each partner: the strong model's tokenizer and its own
        pair = {"strong": tokenizers["strong"], "weak": tokenizers[role]}
        rule = tandem.draw_rule(args.handoff_unit, args.max_gap, pair, device)
        partners.append(tandem.Partner(roles[role], models[role], pair, rule))
    tandem.check_fits(models["strong"], partners, problems, args.max_new_tokens, asking)
    results = {}
    for partner in partners:
        results[partner.name] = result = evaluate_with(models["strong"], partner, problems, task, asking, args, amp)
    if len(partners) > 1:  # each partner on its own line, with the strong model's solutions read by it
        print(f"\n{'weak partner':40}{'alone':>8}{'pair':>8}{'NLL/token':>11}{'NLL/char':>10}")
        for name, r in results.items():
            print(f"{name[-40:]:40}{r['weak_accuracy']:8.3f}{r['tandem_accuracy']:8.3f}{r['weak_nll']:11.3f}"
                  f"{r['weak_nll_per_char']:10.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result if len(partners) == 1 else {"partners": results}, f, indent=2)


def evaluate_with(strong, partner, problems, task, asking, args, amp):
    """tandem.evaluate with one partner, every accuracy's 95% interval, pass@k, and its report and examples."""
    probs = ", ".join(f"{p:g}" for p in dict.fromkeys([0, args.handoff_prob, 1, *args.curve]))
    print(f"decoding {len(problems)} problems at handoff {probs} with {partner.name} ...", file=sys.stderr, flush=True)
    t0, runs, n = time.time(), {}, len(problems)
    result = tandem.evaluate(strong, partner.model, partner.tokenizers, problems, args.handoff_prob, args.curve,
                             args.max_new_tokens, args.temperature, args.batch_size, args.seed, amp, runs,
                             partner.rule, asking)
    if task.correct is tandem.GSM8K.correct:  # its "#### N" and the flexible extract
        flexible = [flexible_answer(t) == tandem.extract_answer(p["answer"]) for t, p in zip(runs[0.0][0], problems)]
        result["flexible_accuracy"] = sum(flexible) / n
    for key in [k for k in result if k.endswith(("_accuracy", "_marker_rate"))]:  # every rate's 95% interval
        result[f"{key}_ci"] = wilson(round(result[key] * n), n)
    for c in result.get("curve", []):
        c["ci"] = wilson(round(c["accuracy"] * n), n)
    for key, p in [("strong", 0.0), ("weak", 1.0), ("tandem", args.handoff_prob)] if args.samples > 1 else []:
        right = [task.correct(t, q) for t, q in zip(runs[p][0], problems)]
        counts = [sum(right[i:i + args.samples]) for i in range(0, n, args.samples)]
        result[f"{key}_pass_at"] = {k: sum(pass_at_k(args.samples, c, k) for c in counts) / len(counts)
                                    for k in args.pass_at}
    print(f"weak partner: {partner.name}\n{report(result, args)}\n({time.time() - t0:.1f}s)")
    for i in range(min(args.examples, len(problems))):
        print(f"\n--- problem {i}: {task.prompt(problems[i])}\n--- gold: {problems[i]['answer']}")
        for name, p in [("strong alone", 0.0), ("tandem, weak tokens in {}", args.handoff_prob)]:
            b, r = divmod(i, args.batch_size)
            rollout = runs[p][1][b][1]
            tokenizer = partner.tokenizers["strong"]
            print(f"[{name}]\n{marked(tokenizer, rollout.tokens[r], rollout.from_weak[r], rollout.mask[r]).strip()}")
    return result


# -----------------------------------------------------------------------------
# The paper's picture: the marker (jargon) and accuracy over RL updates, one colour per run, 95% intervals as bands
#
#     python eval.py --plot runs/tandem runs/plain --out curves.png


def eval_rows(run):
    """The evaluation rows of a run folder's metrics.jsonl, in step order (with a pool, its first partner's)."""
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(path):
        raise tandem.UsageError(f"--plot {run}: no metrics.jsonl there (tandem.py's --out folders have one)")
    with tandem.user_input(f"--plot {path}"), open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]
    rows = sorted((r for r in rows if r.get("kind") == "eval" and r.get("partner", "weak") == "weak"),
                  key=lambda r: r["step"])
    if not rows:
        raise tandem.UsageError(f"--plot {run}: {path} has no evaluation rows (train with --eval-every above 0)")
    return rows


def plot(runs, out):
    rows = {run: eval_rows(run) for run in runs}  # bad input first, with or without matplotlib
    tandem.optional("matplotlib", "--plot", "matplotlib").use("Agg")  # a file, no window
    import matplotlib.pyplot as plt
    panels = [("strong_marker_rate", "marker rate, strong alone"), ("strong_accuracy", "accuracy, strong alone"),
              ("tandem_accuracy", "accuracy, pair")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), constrained_layout=True)
    for (key, title), ax in zip(panels, axes):
        for i, (run, r) in enumerate(rows.items()):
            steps, colour = [row["step"] for row in r], f"C{i}"
            low, high = zip(*(wilson(round(row[key] * row["n"]), row["n"]) for row in r))
            ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
            ax.plot(steps, [row[key] for row in r], color=colour, marker="o", markersize=3,
                    label=os.path.basename(os.path.normpath(run)))
            if key != "strong_marker_rate":  # the weak model is frozen: its accuracy alone, for comparison
                ax.axhline(r[0]["weak_accuracy"], color=colour, linestyle=":", linewidth=1)
        ax.set(title=title, xlabel="RL updates", ylim=(-0.02, 1.02))
    axes[0].legend()
    axes[1].plot([], [], color="grey", linestyle=":", label="weak alone")
    axes[1].legend()
    with tandem.user_input(f"--out {out}"):
        fig.savefig(out, dpi=100)
    print(f"wrote {out}")


# -----------------------------------------------------------------------------
# Word problems in GSM8K's format that a 135M model can learn on a CPU (README: the real-model experiment)
#
#     python eval.py --make-data data/word-problems

NAMES = ["Lee", "Mia", "Sam", "Ava", "Ben", "Zoe", "Max", "Ivy", "Tom", "Eva"]
THINGS = ["apples", "books", "cards", "coins", "marbles", "pens", "shells", "stickers", "stamps", "beads"]
# The language experiment's --weak-prompt (DIR/partner-es.txt): English questions answered in Spanish, one of each step
SPANISH = """Question: Ana has 5 apples. Then Ana gets 3 more. Then Ana gives 2 away. How many apples does Ana have now?
Answer: Después de recibir 3 más, Ana tiene 5+3=8 manzanas.
Después de regalar 2, Ana tiene 8-2=6 manzanas.
#### 6

Question: Leo has 12 cards. Then Leo gives half of them to a friend. Then the number of cards doubles. How many cards \
does Leo have now?
Answer: Después de regalar la mitad, Leo tiene 12/2=6 cartas.
Al duplicarse, Leo tiene 6*2=12 cartas.
#### 12

Question: Sam has 7 books. Then Sam gets 9 more. How many books does Sam have now?
Answer: Después de recibir 9 más, Sam tiene 7+9=16 libros.
#### 16

"""


def word_problems(rng):
    """Endless problems of one to three steps (add, take away, double, halve) on numbers up to 20 to start with:
    a question, a line per step with its <<a+b=c>> annotation, '#### N'."""
    while True:
        name, things, x = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 20)
        question, lines = [f"{name} has {x} {things}."], []
        for _ in range(rng.randint(1, 3)):
            steps = [("+", rng.randint(2, 12), f"Then {name} gets {{b}} more.",
                      f"After getting {{b}} more, {name} has")]
            if x > 1:
                steps.append(("-", rng.randint(1, x - 1), f"Then {name} gives {{b}} away.",
                              f"After giving {{b}} away, {name} has"))
            if x <= 30:
                steps.append(("*", 2, f"Then the number of {things} doubles.", f"Doubled, {name} has"))
            if x % 2 == 0:
                steps.append(("/", 2, f"Then {name} gives half of them to a friend.",
                              f"After giving half away, {name} has"))
            op, b, ask, tell = rng.choice(steps)
            y = {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]
            question.append(ask.format(b=b))
            lines.append(f"{tell.format(b=b)} {x}{op}{b}=<<{x}{op}{b}={y}>>{y} {things}.")
            x = y
        question.append(f"How many {things} does {name} have now?")
        yield {"question": " ".join(question), "answer": "\n".join(lines) + f"\n#### {x}"}


def make_data(folder, seed, n_train=2000, n_test=500):
    """Train and test problems; a test question is never a train question, nor another test question."""
    problems = word_problems(random.Random(seed))
    train = [next(problems) for _ in range(n_train)]
    seen, test = {p["question"] for p in train}, []
    while len(test) < n_test:
        if (p := next(problems))["question"] not in seen:
            seen.add(p["question"])
            test.append(p)
    with tandem.user_input(f"--make-data {folder}"):
        os.makedirs(folder, exist_ok=True)
        for split, rows in [("train", train), ("test", test)]:
            with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(p) + "\n" for p in rows)
        with open(os.path.join(folder, "partner-es.txt"), "w", encoding="utf-8") as f:
            f.write(SPANISH)
    print(f"wrote {n_train} train and {n_test} test problems to {folder}, and the partner's Spanish prompt")


def train_tokenizer(corpus, vocab_size, sentencepiece=False, eos=None, prepend_scheme="first"):
    """A BPE tokenizer trained on the texts of `corpus`, offline. Byte-level like GPT-2's ("Ġ" marks a space; end
    token <|endoftext|>, also its padding), or with `sentencepiece` like Llama's: "▁" marks a space and is put before
    the text (`prepend_scheme`), a character outside the vocabulary falls back to its UTF-8 bytes (<0xC3><0xA9>),
    BOS <s> begins every text, </s> ends it. The tests' two tokenizers, and the bench's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if not sentencepiece:
        eos = eos or "<|endoftext|>"
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, padding_side="left")
    tok.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=prepend_scheme)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                                        show_progress=False))
    trained = json.loads(tok.to_str())["model"]  # the same merges, with the 256 bytes to fall back to
    vocab = trained["vocab"] | {f"<0x{b:02X}>": len(trained["vocab"]) + b for b in range(256)}
    tok.model = models.BPE(vocab, [tuple(m) for m in trained["merges"]], byte_fallback=True, unk_token="<unk>")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>", padding_side="left")


# -----------------------------------------------------------------------------
# Benchmark: the decoder against HF generate, a forward pass by the tokens it reads, and one RL step
#
#     python eval.py --bench --random-init --device cpu --batch-size 8 --max-new-tokens 64
#
# Times are medians over interleaved rounds, and every figure that matters is a ratio between runs
# in the same process, because these machines are noisy.

# gpt2 and gpt2-medium, so --random-init runs offline at the paper's sizes (other GPT2Config fields: gpt2's).
BENCH_TEMPERATURE = 0.7  # the paper's sampling temperature
SHAPES = {"gpt2": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16)}


def bench_model(name, device, args):
    if not args.random_init:
        return tandem.load_model(name, device, args.trust_remote_code)
    if name not in SHAPES:
        raise tandem.UsageError(f"--random-init knows the shapes of {' and '.join(SHAPES)}, not {name!r}")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**SHAPES[name])).to(device).eval()


def random_prompts(batch_size, length, vocab_size, device, seed=0):
    """Left-padded prompts of random tokens, 90% to 110% of `length` long, as encode_prompts gives them."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(int(0.9 * length), int(1.1 * length) + 1, (batch_size,), generator=g)
    ids = torch.randint(vocab_size, (batch_size, int(lengths.max())), generator=g)
    mask = torch.arange(ids.shape[1]) >= ids.shape[1] - lengths[:, None]
    prompt = ids.masked_fill(~mask, 0).to(device), mask.long().to(device)
    return {"strong": prompt, "weak": prompt}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_decoding(strong, weak, prompts, new_tokens, temperature, repeats, amp):
    """Median seconds of each way to sample `new_tokens` tokens for every prompt, no early stop."""
    from transformers import GenerationConfig

    (ids, attn), device, vocab = prompts["strong"], prompts["strong"][0].device, strong.config.vocab_size
    # The same sampling as tandem_generate: temperature only, and no end token to stop early.
    config = GenerationConfig(do_sample=True, temperature=temperature, top_k=None, top_p=None,
                              max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    runs = {
        "HF generate, strong": lambda: strong.generate(ids, attention_mask=attn, generation_config=config),
        "HF generate, weak": lambda: weak.generate(ids, attention_mask=attn, generation_config=config),
    }
    for p, shared in [(0.0, False), (0.5, False), (0.5, True), (1.0, False)]:  # eos -1: no token is -1, no row ends
        def run(p=p, shared=shared):
            return tandem.tandem_generate(strong, weak, prompts, p, new_tokens, temperature, -1, vocab,
                                          shared_coins=shared)
        runs[f"tandem, handoff {p:g}{', batch coins' if shared else ''}"] = run
    return interleaved(runs, repeats, device, amp)


def bench_across(strong, weak, batch_size, new_tokens, repeats, amp):
    """Median seconds of a batch's rollouts at handoff 0.5 on word problems, word handoffs: by the pair sharing a
    byte-level tokenizer, by the same pair with two (that one, strong, and a SentencePiece-style one, weak, trained here
    on the word problems to about 550 tokens each, of about 2 characters on average: random weights write text of one
    density in both), and by a pool of three partners of one tokenizer (the same weights thrice: the same cost)."""
    problems = islice(word_problems(random.Random(0)), 2000)
    corpus = [tandem.GSM8K.prompt(p) + " " + p["answer"] for p in problems]
    tokenizers = {"strong": train_tokenizer(corpus, 4000), "weak": train_tokenizer(corpus, 300, sentencepiece=True)}
    problems, device, runs = list(islice(word_problems(random.Random(1)), batch_size)), strong.device, {}
    one = {"strong": tokenizers["strong"], "weak": tokenizers["strong"]}
    args = tandem.parse_args(["--max-new-tokens", str(new_tokens), "--temperature", str(BENCH_TEMPERATURE)])
    for name, pair, size in [("one tokenizer", one, 1), ("two tokenizers", tokenizers, 1), ("a pool of 3", one, 3)]:
        rule = tandem.draw_rule("word", 32, pair, device)
        partners = [tandem.Partner(f"weak-{i}", weak, pair, rule) for i in range(size)]
        runs[f"handoff 0.5, {name}"] = lambda partners=partners: tandem.pool_generate(strong, partners, problems, args)
    return interleaved(runs, repeats, device, amp)


def interleaved(runs, repeats, device, amp):  # {name: median seconds of run()}, the runs taking turns
    times = {name: [] for name in runs}
    for _ in range(repeats + 1):
        for name, run in runs.items():
            times[name].append(timed(run, device, amp))
    return medians(times)


def timed(run, device, amp):
    """Seconds that run() takes, with the GPU's queue empty before and after."""
    sync(device)
    t0 = time.perf_counter()
    with amp:
        run()
    sync(device)
    return time.perf_counter() - t0


def medians(times):  # the first round warms up and is not counted
    return {name: sorted(t[1:])[len(t[1:]) // 2] for name, t in times.items()}


@torch.no_grad()
def bench_reads(model, prompts, repeats, amp, k=4):
    """Median seconds of the prompts' prefill, and of one forward pass of the model's body that reads 1 and then k
    more tokens into its cache. Batch coins save a pass's fixed cost, not its cost per token: this tells which is
    which."""
    (ids, attn), device = prompts["strong"], prompts["strong"][0].device
    B, L = ids.shape
    seq, attn = torch.cat([ids, ids[:, -1:].repeat(1, 1 + k)], 1), torch.cat([attn, attn.new_ones(B, 1 + k)], 1)
    positions, times = tandem.position_ids(attn), {"prefill": [], 1: [], k: []}
    for _ in range(repeats + 1):
        cache = tandem.StaticCache(config=model.config, max_cache_len=seq.shape[1])
        for name, (a, b) in [("prefill", (0, L)), (1, (L, L + 1)), (k, (L + 1, L + 1 + k))]:
            def read():
                model.base_model(seq[:, a:b], attention_mask=attn, position_ids=positions[:, a:b], cache=cache,
                                 use_cache=True)
            times[name].append(timed(read, device, amp))
    return medians(times)


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: writing 5 to clear_refs resets the process's peak resident memory (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def proc_status(field):  # bytes, from Linux's /proc/self/status
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_now(device):
    return torch.cuda.memory_allocated() if device.type == "cuda" else proc_status("VmRSS")


def peak_memory(device):
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_status("VmHWM")


def bench_setup(args):
    """The device, the autocast context and the two models, as training would use them."""
    device, amp = tandem.pick_device(args.device, args.dtype)
    return device, amp, bench_model(args.strong, device, args), bench_model(args.weak[0], device, args)


def rl_step_cost(args, micro_batch_size, batch_size, minis=1, lora=0):
    """Seconds and peak memory (above what was in use before) of one RL step: tandem rollouts at
    --handoff-prob, the gradient pass in micro-batches, the optimizer step; with `minis` mini-batches, as the
    follow-up's GRPO, pi_old's log-probs first, then a step per mini-batch; with `lora`, adapters of that rank on all
    linear layers train, the rest is frozen. Every row gets a nonzero advantage, so every row goes through the
    gradient pass. Run it in a fresh process."""
    device, amp, strong, weak = bench_setup(args)
    weak.requires_grad_(False)
    if lora:
        tandem.with_adapters(strong, tandem.parse_args(["--lora-rank", str(lora)]))
    trained = [p for p in strong.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-6, weight_decay=0.0)
    for p in trained:  # allocate AdamW's state now, so the peak below is the step's own
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    prompts = random_prompts(batch_size, args.prompt_tokens, strong.config.vocab_size, device)
    advantages = torch.tensor([1.0, -1.0], device=device).repeat(batch_size // 2 + 1)[:batch_size]
    torch.manual_seed(0)
    sync(device)
    before = memory_now(device)
    peak_memory_reset(device)
    t0 = time.perf_counter()
    with amp:
        rollout = tandem.tandem_generate(strong, weak, prompts, args.handoff_prob, args.max_new_tokens, 1.0, -1)
    rows = torch.arange(batch_size, device=device).chunk(minis)
    loss_args = tandem.parse_args(["--batch-size", str(batch_size), "--mini-batch-size", str(batch_size // minis)])
    old = None if minis == 1 else tandem.logprobs_of(strong, prompts["strong"], rollout, rows, 1.0, micro_batch_size,
                                                     None, amp)
    for mini in rows:
        tandem.policy_gradient(strong, prompts["strong"], rollout, advantages, 1.0, micro_batch_size, amp=amp,
                               rows=mini, old_logp=old, args=loss_args)
        torch.nn.utils.clip_grad_norm_(strong.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, peak_memory(device) - before


def bench(args):
    import multiprocessing

    device, amp, strong, weak = bench_setup(args)
    B, n = args.batch_size, args.max_new_tokens
    prompts = random_prompts(B, args.prompt_tokens, strong.config.vocab_size, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"benchmark on {device} ({where}), "
          f"strong {args.strong}, weak {args.weak[0]}{' (random init)' if args.random_init else ''}: batch {B}, "
          "prompts of "
          f"{prompts['strong'][0].shape[1]} tokens or fewer, {n} new tokens, temperature {BENCH_TEMPERATURE:g}, "
          f"{'float32' if isinstance(amp, tandem.nullcontext) else 'bfloat16 autocast'}, median of {args.repeats}",
          flush=True)
    t = bench_decoding(strong, weak, prompts, n, BENCH_TEMPERATURE, args.repeats, amp)
    strong_s, weak_s = t["HF generate, strong"], t["HF generate, weak"]
    print(f"\n{'decoding':32}{'seconds':>9}{'tokens/s':>10}   ratio to generate: strong's, weak's, both's")
    for name, seconds in t.items():
        ratios = "".join(f"{seconds / base:8.3f}" for base in (strong_s, weak_s, strong_s + weak_s))
        print(f"{name:32}{seconds:9.2f}{B * n / seconds:10.1f}   {ratios if name.startswith('tandem') else ''}")
    t = bench_across(strong, weak, B, n, args.repeats, amp)
    print(f"\n{'word problems, word handoffs':32}{'seconds':>9}   ratio to one tokenizer")
    for name, seconds in t.items():
        print(f"{name:32}{seconds:9.2f}{seconds / t['handoff 0.5, one tokenizer']:8.3f}", flush=True)
    print(f"\n{'one forward pass, median':32}{'prefill':>9}{'1 token':>10}{'4 tokens':>10}{'4 / 1':>8}"
          "   prefill / generate")
    for name, model, base in [("strong", strong, strong_s), ("weak", weak, weak_s)]:
        r = bench_reads(model, prompts, args.repeats, amp)
        print(f"{name:32}{r['prefill']:8.2f}s{r[1] * 1e3:8.0f}ms{r[4] * 1e3:8.0f}ms{r[4] / r[1]:8.2f}"
              f"   {r['prefill'] / base:8.3f}")
    del strong, weak  # the RL steps below run in fresh processes

    # Peak memory must grow with the micro-batch, not with the batch. Two mini-batches: the follow-up's GRPO steps;
    # LoRA of rank 16 (peft), the paper's.
    quarter = max(1, B // 4)
    steps = [(B, 1, 1, 0), (B, quarter, 1, 0), (B, B, 1, 0), (2 * B, 1, 1, 0), (B, quarter, 2, 0)]
    steps += [(B, quarter, 1, 16)] if importlib.util.find_spec("peft") else []
    print(f"\n{'one RL step (fresh process each)':40}{'seconds':>9}{'peak memory':>14}")
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for batch, micro, minis, lora in sorted(set(steps), key=steps.index):
            seconds, peak = pool.apply(rl_step_cost, (args, micro, batch, minis, lora))
            name = f"batch {batch}, micro-batch {micro}" + (f", {minis} mini-batches" if minis > 1 else "")
            name += f", LoRA rank {lora}" if lora else ""
            print(f"{name:40}{seconds:9.2f}{peak / 2**20:11.0f} MiB", flush=True)


if __name__ == "__main__":
    tandem.run_cli(main)

"""Tests of tandem.py and eval.py, offline, on tiny GPT-2 and Llama models built here, grouped under
tandem.py's banners in its order.

    pytest                            # the whole suite
    pytest -s -k jargon_and_plain     # the toy world and the table it prints (TANDEM_TOY_SEED=1 for another seed)
"""

import copy
import importlib.util
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from argparse import Namespace
from datetime import timedelta
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import eval as evaluation  # noqa: E402
from transformers import GPT2Config  # noqa: E402
import tandem  # noqa: E402
from tandem import (  # noqa: E402
    Rollout, baseline, completion_logprobs, correct, extract_answer, has_jargon, policy_gradient,
    position_ids, reward, strip_jargon, tandem_generate,
)

HERE = Path(__file__).resolve().parent
SHARED_GSM8K = HERE.parent / "shared" / "gsm8k"

# Three GSM8K test problems, verbatim (MIT licence, github.com/openai/grade-school-math): a plain
# answer, a gold with a comma, and a negative gold.
GSM8K_SAMPLES = [
    {"question": "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                 "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                 "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
                 "market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
                "day at the farmer\u2019s market.\n#### 18"},
    {"question": "Johnny is picking up the toys on the floor of his room.  He'd dumped a lego boxed set with 500 "
                 "pieces on the floor, and another one that had 3 times more pieces than the 500 piece one, and "
                 "another one that had 1/4 the number of pieces.  How many blocks does Johnny pick up if he picks "
                 "up all the legos?",
     "answer": "The first set had 500 pieces, and the second set had 3 times as many as the first set, so the "
                "second set has 500*3=<<500*3=1500>>1500 pieces\nThe third set had one-quarter of the 500 pieces, "
                "so that means it had 500*.25= <<500*.25=125>>125 pieces\nIn total, that means Johnny picked up "
                "500 + 1500+ 125= <<500+1500+125=2125>>2125 blocks\n#### 2,125"},
    {"question": "The highest temperature ever recorded in Southlandia is -48 degrees Fahrenheit. The highest "
                 "temperature ever recorded in Northlandia is 21 degrees Fahrenheit. The highest temperature "
                 "recorded in Midlandia is -3 degrees Fahrenheit. What is the average highest temperature of these "
                 "3 countries?",
     "answer": "-48 + 21 + (-3) = <<-48+21+(-3)=-30>>-30\n-30/3 = <<-30/3=-10>>-10 degrees\nThe average highest "
                "temperature recorded in Southlandia, Northlandia, and Midlandia is -10 degrees Fahrenheit.\n#### "
                "-10"},
]
GSM8K_GOLDS = ["18", "2125", "-10"]


def load_pair(strong, weak):  # (tokenizers, strong model, weak model) of two model folders
    tokenizers, models = tandem.load_models({"strong": strong, "weak": weak}, "cpu")
    return tokenizers, models["strong"], models["weak"]


def pool(weak, tokenizers, rule=None):  # a pool of one partner
    return [tandem.Partner("weak", weak, tokenizers, rule)]


def load_gsm8k(split, data):
    return tandem.load(tandem.GSM8K, split, data)


def format_prompt(question):
    return tandem.GSM8K.prompt({"question": question})


def toy_problems(n, seed=0, question="What is {a} plus {b}?", spaced=False):
    """Single-digit sums in GSM8K format, with calculator annotations; `spaced`: a word for each symbol."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        answer = f"{a}+{b}=<<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"
        if spaced:  # the annotation goes as it does in GSM8K: "3 + 4 = 7" with it is "3 + 4 =<< 3 + 4 = 7 >> 7"
            answer = f"{a} + {b} =<< {a} + {b} = {a + b} >> {a + b}\n#### {a + b}"
        problems.append({"question": question.format(a=a, b=b), "answer": answer})
    return problems


# -----------------------------------------------------------------------------
# Tiny models, and toy problems in GSM8K's format


def make_tokenizer(corpus=None, vocab_size=320, eos="<|endoftext|>"):
    """A byte-level BPE tokenizer trained here, like GPT-2's (or with eos "<|im_end|>", Qwen's) but with
    `vocab_size` tokens. Its end token is also its padding."""
    return evaluation.train_tokenizer(corpus or toy_corpus(), vocab_size, eos=eos)


def make_sp_tokenizer(corpus=None, vocab_size=400, prepend_scheme="first"):
    """A SentencePiece-style tokenizer trained here, like Llama's (eval.train_tokenizer says how): its vocabulary
    and end token differ from make_tokenizer's."""
    return evaluation.train_tokenizer(corpus or toy_corpus(), vocab_size, sentencepiece=True,
                                      prepend_scheme=prepend_scheme)


def toy_corpus():
    return [format_prompt(p["question"]) + " " + p["answer"] for p in toy_problems(200) + GSM8K_SAMPLES]


def make_model(path, tokenizer, n_layer, seed, vocab_size=None, n_embd=48, n_head=2, family="gpt2", n_positions=128,
               **config):
    """A randomly initialised GPT-2 (absolute positions) or Llama (rotary positions, grouped-query attention:
    4 query heads share 2 key/value heads), saved to `path` with the tokenizer unless path is None. `config`:
    more GPT2Config fields."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=n_embd,
                                             intermediate_size=2 * n_embd, num_hidden_layers=n_layer,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=n_positions, **ids)).eval()
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size or len(tokenizer), n_positions=n_positions,
                                           n_embd=n_embd, n_layer=n_layer, n_head=n_head, **ids, **config)).eval()
    if path is not None:
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    return model


def both(tok):  # the tokenizers of a pair that shares one
    return {"strong": tok, "weak": tok}


def make_pair(root, family="gpt2"):
    """A strong (2 layers) and a weak (1 layer) model of one family, saved in root/strong and root/weak."""
    tok = make_tokenizer(eos="<|im_end|>" if family == "llama" else "<|endoftext|>")
    strong = make_model(root / "strong", tok, n_layer=2, seed=1, family=family)
    weak = make_model(root / "weak", tok, n_layer=1, seed=2, family=family)
    return Namespace(root=root, tok=tok, strong=strong, weak=weak, family=family)


def make_across(root):
    """A pair of two tokenizers: the strong model a Llama with a SentencePiece-style tokenizer (make_sp_tokenizer),
    the weak one a GPT-2 with a byte-level BPE; saved in root/strong and root/weak."""
    sp, bl = make_sp_tokenizer(), make_tokenizer()
    strong = make_model(root / "strong", sp, n_layer=2, seed=1, family="llama")
    weak = make_model(root / "weak", bl, n_layer=1, seed=2)
    return Namespace(root=root, toks={"strong": sp, "weak": bl}, strong=strong, weak=weak)


@pytest.fixture(scope="module")
def across(tmp_path_factory):
    return make_across(tmp_path_factory.mktemp("across"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module", params=["tiny", "llama"])
def pair(request):
    """Each family's tiny pair: GPT-2 (absolute positions, <|endoftext|>) and Llama (rotary positions,
    grouped-query attention, <|im_end|> ending text and padding it)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def warm(tiny, tmp_path_factory):
    """The tiny GPT-2 pair after a short warm-start on single-digit sums (the strong one with annotations),
    saved: RL from here sees some reward within a few updates."""
    root = tmp_path_factory.mktemp("warm")
    for role, n_layer, seed, jargon_frac in [("strong", 2, 1, 1.0), ("weak", 1, 2, 0.0)]:
        model = make_model(None, tiny.tok, n_layer, seed)
        tandem.sft(model, tiny.tok, toy_problems(200), steps=150, batch_size=16, lr=3e-3, marker_frac=jargon_frac,
                   seed=0)
        model.save_pretrained(root / role)
        tiny.tok.save_pretrained(root / role)
    return root


@pytest.fixture(scope="module")
def warm_across(across, tmp_path_factory):
    """The two-tokenizer pair after `warm`'s warm-start, each model on its own tokenizer's tokens, saved."""
    root = tmp_path_factory.mktemp("warm_across")
    for role, family, n_layer, seed, jargon_frac in [("strong", "llama", 2, 1, 1.0), ("weak", "gpt2", 1, 2, 0.0)]:
        model = make_model(None, across.toks[role], n_layer, seed, family=family)
        tandem.sft(model, across.toks[role], toy_problems(200), steps=150, batch_size=16, lr=3e-3,
                   marker_frac=jargon_frac, seed=0)
        model.save_pretrained(root / role)
        across.toks[role].save_pretrained(root / role)
    return root


def left_padded(tok, texts):
    """{"strong": (ids, mask), "weak": the same}: left-padded prompts, as encode_prompts gives them."""
    enc = tok(texts, return_tensors="pt", padding=True)
    prompt = enc["input_ids"], enc["attention_mask"]
    return {"strong": prompt, "weak": prompt}


PROMPTS = ["Question: What is 2 plus 3?\nAnswer:", "Question: 7?\nAnswer:",
           "Question: What is 9 plus 9? Think.\nAnswer: 9", "Q"]


def write_data(folder, n_train=200, n_test=20):
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in [("train", n_train, 0), ("test", n_test, 1)]:
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(p) for p in toy_problems(n, seed)) + "\n")
    return folder


# -----------------------------------------------------------------------------
# Data and reward


def test_extract_answer_formats():
    assert extract_answer("so 9*2=18\n#### 18") == "18"
    assert extract_answer("####18") == "18"
    assert extract_answer("#### $1,234.50") == "1234.5"
    assert extract_answer("#### 18.") == "18"
    assert extract_answer("#### 18.00 \n") == "18"
    assert extract_answer("#### -10") == "-10"
    assert extract_answer("#### $-3") == "-3"
    assert extract_answer("#### 0.5") == "0.5"
    for after in ["#### 18 dollars", "#### 3\n#### 4", "#### 8 8 8 8", "#### 7=1=16"]:  # the answer ends the solution
        assert extract_answer(after) is None
    assert extract_answer("The answer is 18.") is None
    assert extract_answer("#### eighteen") is None
    assert extract_answer("") is None


def test_correct_and_reward_on_real_gsm8k_answers():
    for problem, gold in zip(GSM8K_SAMPLES, GSM8K_GOLDS):
        answer = problem["answer"]
        assert correct(answer, answer) and reward(answer, problem, tandem.GSM8K) == 1.0
        assert correct(answer, gold)  # a bare gold number
        assert correct(strip_jargon(answer), answer) and reward(strip_jargon(answer), problem, tandem.GSM8K) == 1.0
        assert not correct(answer.rsplit("####", 1)[0], answer)  # no "####": not an answer
        assert reward(answer.rsplit("####", 1)[0], problem, tandem.GSM8K) == 0.0
        assert not correct(f"#### {int(gold) + 1}", answer)
        assert reward(f"#### {int(gold) + 1}", problem, tandem.GSM8K) == 0.0
    assert correct("so 2125 blocks.\n#### 2125", GSM8K_SAMPLES[1]["answer"])
    assert correct(" 9 * 2 = 18 dollars.\n#### $18.00\n", GSM8K_SAMPLES[0]["answer"])
    assert not correct(" 9 * 2 = 18 dollars.\n#### 18 18 18", GSM8K_SAMPLES[0]["answer"])  # nothing after the answer
    assert not correct("#### 10", GSM8K_SAMPLES[2]["answer"])  # the sign matters


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="needs ../shared/gsm8k")
def test_reward_on_the_whole_dataset():
    for split, size in [("train", 7473), ("test", 1319)]:
        problems = load_gsm8k(split, str(SHARED_GSM8K))
        assert len(problems) == size
        for p in problems:
            gold = extract_answer(p["answer"])
            assert gold is not None and gold.lstrip("-").isdigit(), p["answer"]  # every gold is an integer
            assert correct(p["answer"], p["answer"]) and reward(p["answer"], p, tandem.GSM8K) == 1.0
            assert correct(strip_jargon(p["answer"]), gold)
            assert not has_jargon(strip_jargon(p["answer"]))
    test = load_gsm8k("test", str(SHARED_GSM8K))
    assert sum("," in p["answer"].split("####")[-1] for p in test) == 14
    assert sum(extract_answer(p["answer"]).startswith("-") for p in test) == 2


def test_jargon():
    assert strip_jargon("9*2=<<9*2=18>>18") == "9*2=18"
    assert has_jargon(GSM8K_SAMPLES[0]["answer"])
    assert not has_jargon(strip_jargon(GSM8K_SAMPLES[1]["answer"]))
    assert not has_jargon("1 < 2 and 3 > 2, so << alone is no annotation")
    assert strip_jargon("no annotations") == "no annotations"


def test_load_gsm8k_local(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(p) for p in GSM8K_SAMPLES) + "\n")
    assert load_gsm8k("train", str(tmp_path)) == GSM8K_SAMPLES
    assert load_gsm8k("test", str(tmp_path / "train.jsonl")) == GSM8K_SAMPLES  # one file serves any split
    with pytest.raises(tandem.UsageError, match="test.jsonl: No such file"):
        load_gsm8k("test", str(tmp_path))
    (tmp_path / "bad.jsonl").write_text(json.dumps(GSM8K_SAMPLES[0]) + "\n{oops\n")
    with pytest.raises(tandem.UsageError, match="line 2: Expecting"):
        load_gsm8k("train", str(tmp_path / "bad.jsonl"))


def test_the_gsm8k_task_puts_checks_and_rewards_as_before(tiny):
    """The default task's prompt, warm-start targets, reward and marker, and the prompts encode_prompts makes."""
    task, p = tandem.GSM8K, GSM8K_SAMPLES[0]
    assert task.prompt(p) == f"Question: {p['question']}\nAnswer:" and task.fields == ("question", "answer")
    assert task.target(p, True) == " " + p["answer"] and task.target(p, False) == " " + strip_jargon(p["answer"])
    assert reward(p["answer"], p, task) == 1.0 and reward("#### 17", p, task) == 0.0
    assert task.marker(p["answer"]) and not task.marker(strip_jargon(p["answer"]))
    ids, mask = tandem.encode_prompts(both(tiny.tok), GSM8K_SAMPLES, "cpu")["strong"]
    direct = tiny.tok([task.prompt(q) for q in GSM8K_SAMPLES], return_tensors="pt", padding=True)
    assert torch.equal(ids, direct["input_ids"]) and torch.equal(mask, direct["attention_mask"])


# Gold answers in MATH's forms, completions, and whether the follow-up's rule with math-verify calls them right
BOXED = [
    ("\\frac{14}{3}", "so the answer is \\boxed{\\frac{14}{3}}.", True),
    ("\\frac{14}{3}", "\\boxed{\\dfrac{14}{3}}", True),
    ("\\frac{14}{3}", "\\boxed{14/3}", True), ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "\\boxed{\\frac{1}{3}}", False), ("9", "The total is \\boxed{9}", True),
    ("9", "\\boxed{9.0}", True),
    ("9", "\\boxed{8}", False), ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi)}", False), ("p - q", "\\boxed{p-q}", True),
    ("p - q", "\\boxed{-q + p}", True), ("6 - 5i", "\\boxed{6-5i}", True), ("6 - 5i", "\\boxed{6+5i}", False),
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", True), ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}", True),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}", True), ("\\text{Evelyn}", "\\boxed{\\text{Bob}}", False),
    ("5", "\\boxed{5\\text{ cm}}", True), ("10\\%", "\\boxed{10\\%}", True), ("[1,2)", "\\boxed{[1,2)}", True),
    ("[1,2)", "\\boxed{(1,2)}", False), ("\\{1,2,3\\}", "\\boxed{\\{3,2,1\\}}", True),
    ("x^2+2x+1", "\\boxed{(x+1)^2}", True), ("\\pi", "\\boxed{\\pi}", True), ("-\\frac{3}{4}", "\\boxed{-0.75}", True),
    ("1,\\!000", "\\boxed{1000}", True), ("90^\\circ", "\\boxed{90}", True),
    ("3", "first \\boxed{2}, then after checking \\boxed{3}", True), ("2", "first \\boxed{2}, then \\boxed{3}", False),
    ("3", "no box here, the answer is 3", False), ("12", "", False), ("\\frac{a}{b}", "\\boxed{\\frac{a}{b", False),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", True),
]


@pytest.mark.parametrize("gold, completion, right", BOXED)
def test_the_math_task_takes_the_last_box_and_checks_it_with_math_verify(gold, completion, right):
    pytest.importorskip("math_verify")
    assert tandem.TASKS["math"].correct(completion, {"answer": gold}) == right


def test_the_math_task_without_math_verify_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if it were not installed
    with pytest.raises(tandem.UsageError, match="pip install math-verify"):
        tandem.TASKS["math"].correct("\\boxed{1}", {"answer": "1"})


def test_a_task_whose_reward_reads_another_field(tiny, monkeypatch):
    """A forker's task is one definition: here its reward is whether a solution stays within the problem's own
    `budget` characters, a field read_jsonl keeps."""
    short = tandem.GSM8K._replace(reward=lambda completion, p: float(len(completion) <= p["budget"]))
    problems = [{"question": "1?", "answer": "#### 1", "budget": budget} for budget in (100, 0)]
    torch.manual_seed(0)
    args = tandem.parse_args(["--max-new-tokens", "6", "--temperature", "1.0"])
    optimizer = torch.optim.AdamW(tiny.strong.parameters(), lr=0.0)
    metrics = tandem.rl_step(tiny.strong, pool(tiny.weak, both(tiny.tok)), optimizer, problems, args,
                             asking=tandem.Asking(short))
    assert metrics["reward"] == 0.5  # the first problem's two rollouts fit, the second's two do not


def test_the_language_marker_on_fixed_sentences(monkeypatch):
    pytest.importorskip("py3langid")
    marker = tandem.TASKS["gsm8k-es"].marker
    for spanish in ["Lee tiene 15 libros. Le da 4 a un amigo, así que le quedan 15-4=11 libros.\n#### 11",
                    "Mia tiene 8 manzanas y consigue 3 más: 8+3=11.\n#### 11", "Después, Sam tiene 2*6=12 cartas."]:
        assert marker(spanish), spanish
    for english in ["Lee has 15 books. He gives 4 to a friend, so he has 15-4=11 books left.\n#### 11",
                    "Mia has 8 apples and gets 3 more: 8+3=11.\n#### 11", "Then Sam has 2*6=12 cards."]:
        assert not marker(english), english
    tandem.language_of.cache_clear()
    monkeypatch.setitem(sys.modules, "py3langid.langid", None)
    with pytest.raises(tandem.UsageError, match="pip install py3langid"):
        marker("hola")
    tandem.language_of.cache_clear()


def test_a_chat_template_prompt_is_apply_chat_templates_text(tiny):
    tok = tandem.AutoTokenizer.from_pretrained(tiny.root / "strong")
    tok.chat_template = CHAT_TEMPLATE
    p = toy_problems(1)[0]
    expected = tok.apply_chat_template([{"role": "user", "content": "Hi. " + tandem.GSM8K.prompt(p)}], tokenize=False,
                                       add_generation_prompt=True)
    assert tandem.prompt_text(tandem.GSM8K, p, tok, True, "Hi. ") == expected and expected.startswith("<|user|>")
    assert tandem.prompt_text(tandem.GSM8K, p, tok, False, "Hi. ") == "Hi. " + tandem.GSM8K.prompt(p)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("handoff_prob", [0.0, 1.0])
def test_each_model_in_its_own_prompt_format_decodes_like_its_generate(across, handoff_prob):
    """Two tokenizers with two chat templates, the strong model in its template and the weak one as given: at
    handoff 0 and 1 the decoder gives each model's own generate on its own prompt."""
    toks = {n: copy.deepcopy(tok) for n, tok in across.toks.items()}
    toks["strong"].chat_template = CHAT_TEMPLATE
    toks["weak"].chat_template = CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")
    for chat in [{"strong": True, "weak": False}, {"strong": True, "weak": True}]:
        prompts = tandem.encode_prompts(toks, toy_problems(4, seed=2), "cpu", tandem.Asking(chat=chat))
        n = "weak" if handoff_prob == 1 else "strong"
        text = toks[n].decode(prompts[n][0][0][prompts[n][1][0].bool()])
        assert text.startswith({"strong": "<|user|>", "weak": "[user]" if chat["weak"] else "Question"}[n])
        got = tandem_generate(across.strong, across.weak, prompts, handoff_prob, 12, 0.0, None, tokenizers=toks)
        own = got.weak_view if n == "weak" else got
        expected = hf_greedy(getattr(across, n), *prompts[n], 12, toks[n].eos_token_id)
        for row, keep, want in zip(own.tokens, own.mask, expected):
            assert row[keep].tolist() == want[:int(keep.sum())].tolist()


# -----------------------------------------------------------------------------
# The tandem decoder


def hf_greedy(model, ids, attn, n, eos):
    out = model.generate(ids, attention_mask=attn, do_sample=False, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=eos)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("handoff_prob", [0.0, 1.0])
def test_decoder_equals_generate_at_handoff_0_and_1(pair, handoff_prob):
    tiny = pair
    prompts = left_padded(tiny.tok, PROMPTS)
    ids, attn = prompts["strong"]
    assert (attn == 0).any()  # prompts of different lengths: some rows are padded
    owner = tiny.weak if handoff_prob == 1 else tiny.strong
    # Use a token the model emits early as "eos", so that rows finish at different steps.
    free = hf_greedy(owner, ids, attn, 12, eos=None)
    eos = free[0, 3].item()
    expected = hf_greedy(owner, ids, attn, 24, eos)
    got = tandem_generate(tiny.strong, tiny.weak, prompts, handoff_prob, 24, 0.0, eos)
    assert torch.equal(got.tokens, expected)
    assert bool(got.from_weak[got.mask].all()) == (handoff_prob == 1) and not got.from_weak[~got.mask].any()
    for row, keep in zip(got.tokens, got.mask):  # mask: up to and including the first eos
        first_eos = (row == eos).nonzero()
        n = first_eos[0, 0].item() + 1 if len(first_eos) else len(row)
        assert keep[:n].all() and not keep[n:].any()


@pytest.mark.parametrize("shared_coins", [False, True])
def test_decoder_tokens_are_their_owners_argmax_uncached(pair, shared_coins):
    tiny = pair
    torch.manual_seed(0)
    prompts = left_padded(tiny.tok, PROMPTS)
    got = tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 20, 0.0, tiny.tok.eos_token_id,
                          shared_coins=shared_coins)
    assert got.from_weak.any() and (~got.from_weak).any()
    seq, seq_attn = prompts["strong"]
    for t in range(got.tokens.shape[1]):
        with torch.no_grad():
            logits = {m: m(seq, attention_mask=seq_attn, position_ids=position_ids(seq_attn)).logits[:, -1]
                      for m in (tiny.strong, tiny.weak)}
        owner_argmax = torch.where(got.from_weak[:, t], logits[tiny.weak].argmax(-1), logits[tiny.strong].argmax(-1))
        assert torch.equal(got.tokens[got.mask[:, t], t], owner_argmax[got.mask[:, t]]), f"step {t}"
        seq = torch.cat([seq, got.tokens[:, t:t + 1]], 1)
        seq_attn = torch.cat([seq_attn, torch.ones_like(seq_attn[:, :1])], 1)


def test_reading_k_tokens_in_one_call_equals_reading_them_one_at_a_time(pair):
    """How a model catches up in tandem_generate: the tokens written since it last wrote go through its
    static KV cache in one forward pass, with left-padded rows of different lengths."""
    tiny = pair
    ids, attn = left_padded(tiny.tok, PROMPTS)["strong"]
    new = torch.randint(len(tiny.tok), (len(PROMPTS), 5), generator=torch.Generator().manual_seed(0))
    full_attn = torch.cat([attn, torch.ones_like(new)], 1)
    seq, positions = torch.cat([ids, new], 1), position_ids(full_attn)

    def run(splits):  # the prompt, then the new tokens in pieces of these sizes; the logits of every new token
        cache, logits, at = tandem.StaticCache(config=tiny.strong.config, max_cache_len=seq.shape[1]), [], 0
        for size in [ids.shape[1], *splits]:
            with torch.no_grad():
                out = tiny.strong.base_model(seq[:, at:at + size], attention_mask=full_attn,
                                             position_ids=positions[:, at:at + size], cache=cache, use_cache=True)
            logits.append(tiny.strong.get_output_embeddings()(out.last_hidden_state))
            at += size
        return torch.cat(logits, 1)[:, ids.shape[1] - 1:-1]

    one_at_a_time, in_pieces = run([1] * 5), run([2, 3])
    with torch.no_grad():
        uncached = tiny.strong(seq, attention_mask=full_attn, position_ids=positions).logits[:, ids.shape[1] - 1:-1]
    assert torch.allclose(in_pieces, one_at_a_time, atol=1e-5) and torch.allclose(in_pieces, uncached, atol=1e-5)


def test_shared_coins_run_one_model_per_step(tiny):
    """With one coin per step for the batch, every step has one author for all rows, so only that model
    runs; with a coin per row, both do. Each rollout's authors are still a coin per token."""
    prompts = left_padded(tiny.tok, PROMPTS * 4)
    runs = {name: 0 for name in ["strong", "weak"]}
    hooks = [m.base_model.register_forward_hook(lambda *_, n=n: runs.__setitem__(n, runs[n] + 1))
             for n, m in [("strong", tiny.strong), ("weak", tiny.weak)]]
    try:
        for shared, expected in [(True, 1), (False, 2)]:
            runs.update(strong=0, weak=0)
            torch.manual_seed(0)
            got = tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 30, 1.0, -1, shared_coins=shared)
            steps = got.tokens.shape[1]
            # by row, a step may have one author
            assert runs["strong"] + runs["weak"] == pytest.approx(expected * steps, abs=3)
            same = (got.from_weak == got.from_weak[:1]).all(0)
            assert same.all() == shared and 0.3 < got.from_weak.float().mean() < 0.7
    finally:
        for hook in hooks:
            hook.remove()


def test_decoder_samples_only_real_tokens_from_padded_output_layers(tiny, tmp_path):
    padded = make_model(tmp_path / "padded", tiny.tok, n_layer=1, seed=3, vocab_size=len(tiny.tok) + 64)
    prompts = left_padded(tiny.tok, PROMPTS * 4)
    torch.manual_seed(0)
    got = tandem_generate(padded, padded, prompts, 0.5, 40, 2.0, tiny.tok.eos_token_id, vocab_size=len(tiny.tok))
    assert got.tokens.max() < len(tiny.tok)
    torch.manual_seed(0)
    unguarded = tandem_generate(padded, padded, prompts, 0.5, 40, 2.0, tiny.tok.eos_token_id)
    assert unguarded.tokens.max() >= len(tiny.tok)  # the test would catch a missing cut


def test_decoder_is_seeded(tiny):
    prompts = left_padded(tiny.tok, PROMPTS)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 16, 0.7, tiny.tok.eos_token_id))
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].from_weak, runs[1].from_weak)


def test_decoder_samples_each_authors_tokens_at_the_temperature(tiny):
    """At T = 0.5 each author's tokens follow softmax(its logits / T), the distribution completion_logprobs
    scores (at T = 1, or greedy, the rollouts would be off-policy). One token of 20000 rows of one prompt,
    from models whose logits are spread wide enough for the two temperatures to differ."""
    models = {"strong": make_model(None, tiny.tok, n_layer=2, seed=1),
              "weak": make_model(None, tiny.tok, n_layer=1, seed=2)}
    for model in models.values():
        model.get_output_embeddings().weight.data *= 3
    prompts = left_padded(tiny.tok, ["Question: What is 2 plus 3?\nAnswer:"] * 20000)
    torch.manual_seed(0)
    got = tandem_generate(models["strong"], models["weak"], prompts, 0.5, 1, 0.5, -1, len(tiny.tok))
    for name, rows in [("strong", ~got.from_weak[:, 0]), ("weak", got.from_weak[:, 0])]:
        with torch.no_grad():
            logits = models[name](prompts[name][0][:1]).logits[0, -1]
        seen = torch.bincount(got.tokens[rows, 0], minlength=len(tiny.tok)) / rows.sum()

        def distance(p):  # total variation
            return 0.5 * (seen - p).abs().sum().item()
        assert distance(logits.div(0.5).softmax(-1)) < 0.1  # sampling noise: about 0.06
        assert distance(logits.softmax(-1)) > 0.2 and distance(torch.eye(len(seen))[logits.argmax()]) > 0.3, name


def decode_recording_logits(tiny, *args, amp=tandem.nullcontext(), **kwargs):
    """tandem_generate(tiny.strong, tiny.weak, *args, **kwargs), and every logits tensor each
    model's output layer produced in it, in order: {"strong": [...], "weak": [...]}."""
    models = {"strong": tiny.strong, "weak": tiny.weak}
    logits = {name: [] for name in models}
    hooks = [model.get_output_embeddings().register_forward_hook(lambda _, __, out, name=name: logits[name].append(out))
             for name, model in models.items()]
    try:
        with amp:
            return tandem_generate(tiny.strong, tiny.weak, *args, **kwargs), logits
    finally:
        for hook in hooks:
            hook.remove()


def assert_logits_are_uncached(tiny, prompts, got, logits, atol, amp=tandem.nullcontext()):
    """A model runs only at the steps where it writes a token of some row, and there its output layer makes
    logits for the rows it writes alone, equal to an uncached forward over its prompt (prompts[name] = (ids, mask))
    and the tokens so far. Needs rollouts in which no row ended early."""
    assert got.mask.all()  # so from_weak names every step's owners
    models = {"strong": tiny.strong, "weak": tiny.weak}
    calls = {name: 0 for name in models}
    for t in range(got.tokens.shape[1]):
        for name, (s, a) in prompts.items():
            rows = got.from_weak[:, t] if name == "weak" else ~got.from_weak[:, t]
            if rows.any():
                with torch.no_grad(), amp:
                    uncached = models[name](s, attention_mask=a, position_ids=position_ids(a)).logits[rows, -1]
                recorded = logits[name][calls[name]]
                assert recorded.shape[0] == rows.sum()
                assert torch.allclose(recorded.float(), uncached.float(), atol=atol), f"{name} at step {t}"
                calls[name] += 1
        prompts = {name: (torch.cat([s, got.tokens[:, t:t + 1]], 1), torch.cat([a, torch.ones_like(a[:, :1])], 1))
                   for name, (s, a) in prompts.items()}
    assert calls == {name: len(recorded) for name, recorded in logits.items()} and min(calls.values()) > 5


def test_weak_prompt_is_read_by_the_weak_model_only(tiny):
    """With a weak prompt, each model's logits at every step equal those of an uncached forward:
    the strong model's over its prompt and the tokens so far, the weak model's over prefix +
    prompt + the same tokens, each with its own left padding and positions."""
    problems = [{"question": q} for q in ["What is 2 plus 3?", "7", "What is 9 plus 9? Think.", ""]]
    asking = tandem.Asking(prefix={"strong": "", "weak": "Question: 1+1?\nAnswer: 2\n#### 2\n\n"})
    prompts = tandem.encode_prompts(both(tiny.tok), problems, "cpu", asking)
    assert prompts["weak"][0].shape[1] > prompts["strong"][0].shape[1] and (prompts["weak"][1] == 0).any()
    torch.manual_seed(0)
    got, logits = decode_recording_logits(tiny, prompts, 0.5, 16, 1.0, tiny.tok.eos_token_id)
    assert_logits_are_uncached(tiny, prompts, got, logits, atol=1e-5)


def test_bfloat16_autocast_decodes_and_learns_like_float32(tiny):
    """On CUDA the default is bf16 autocast over float32 weights. The same autocast on CPU runs the
    same code: the KV caches fill with bf16, and the log-probs are taken in float32."""
    _, amp = tandem.pick_device("cpu", "bfloat16")
    prompts = left_padded(tiny.tok, PROMPTS)
    torch.manual_seed(0)
    got, logits = decode_recording_logits(tiny, prompts, 0.5, 16, 1.0, tiny.tok.eos_token_id, amp=amp)
    assert logits["strong"][0].dtype == torch.bfloat16  # autocast did take over
    # Within bf16 rounding (8 bits of mantissa) of the logits, which are below 1 on these models.
    assert_logits_are_uncached(tiny, prompts, got, logits, atol=1e-2, amp=amp)
    with amp:  # a bf16 log-softmax over a 50k vocabulary would be off by tenths of a nat
        assert completion_logprobs(tiny.strong, prompts["strong"], got.tokens, got.mask, 1.0).dtype == torch.float32
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    grads = []
    for context in [tandem.nullcontext(), amp]:
        tiny.strong.zero_grad(set_to_none=True)
        policy_gradient(tiny.strong, prompts["strong"], got, advantages, 1.0, 2, amp=context)
        grads.append(torch.cat([p.grad.flatten() for p in tiny.strong.parameters()]))
    tiny.strong.zero_grad(set_to_none=True)
    assert torch.nn.functional.cosine_similarity(*grads, dim=0) > 0.999
    assert abs(grads[1].norm() / grads[0].norm() - 1) < 0.01


def test_word_boundaries_are_the_tokens_that_begin_with_the_space_marker(tiny):
    boundaries = tandem.draw_rule("word", 32, both(tiny.tok), "cpu")["boundaries"]
    surfaces = tiny.tok.convert_ids_to_tokens(list(range(len(tiny.tok))))
    assert boundaries.tolist() == [s.startswith("Ġ") for s in surfaces]  # as the follow-up's code builds them
    texts = tiny.tok.batch_decode([[i] for i in range(len(tiny.tok))])
    assert boundaries.tolist() == [t.startswith(" ") for t in texts]  # in byte-level BPE: text that begins with a space
    plus, bare, newline = (tiny.tok(t)["input_ids"][0] for t in [" plus", "plus", "\n"])
    assert boundaries[plus] and not boundaries[bare] and not boundaries[newline]
    assert tandem.draw_rule("token", 32, both(tiny.tok), "cpu")["boundaries"].all()  # a draw after every token


def test_word_handoffs_follow_the_follow_up_codes_rule(tiny, monkeypatch):
    """The author of the next token is drawn again right after a boundary token, or when max_gap tokens
    have passed since the last draw, and at no other point (the counter restarts at every draw). Every
    author samples from its whole distribution: the strong model's log-probs in the gradient pass are
    exactly those it sampled from."""
    boundaries = torch.rand(len(tiny.tok), generator=torch.Generator().manual_seed(0)) < 0.2  # a known set
    sampled = []  # the logits of each call of sample: per step, the strong model's rows' (if any), then the weak's
    sample = tandem.sample
    def recording(logits, temperature):
        sampled.append(logits)
        return sample(logits, temperature)
    monkeypatch.setattr(tandem, "sample", recording)
    prompts = left_padded(tiny.tok, PROMPTS * 4)
    torch.manual_seed(0)
    got = tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 40, 1.5, -1, len(tiny.tok), max_gap=4,
                          boundaries=boundaries)
    changes = {"boundary": 0, "gap": 0}
    for row in range(len(got.tokens)):
        since_draw = 0
        for t in range(1, got.tokens.shape[1]):
            since_draw += 1
            draw = "boundary" if boundaries[got.tokens[row, t - 1]] else "gap" if since_draw == 4 else None
            changed = bool(got.from_weak[row, t] != got.from_weak[row, t - 1])
            assert draw or not changed, (row, t)
            if draw:
                since_draw, changes[draw] = 0, changes[draw] + changed
    assert min(changes.values()) >= 5  # both kinds of draw do hand off
    own = got.mask & ~got.from_weak
    logp = completion_logprobs(tiny.strong, prompts["strong"], got.tokens, got.mask, 1.5)
    calls, at_sampling = iter(sampled), []
    for t in range(got.tokens.shape[1]):
        if own[:, t].any():
            at_sampling.append(next(calls).div(1.5).log_softmax(-1).gather(-1, got.tokens[own[:, t], t, None])[:, 0])
        if (got.mask[:, t] & got.from_weak[:, t]).any():
            next(calls)  # the weak model's rows
    at_sampling = torch.cat(at_sampling)
    assert own.sum() > 50 and torch.allclose(logp.T[own.T], at_sampling, atol=1e-5)
    # The same decoding by token switches authors far more often: the `switches` metric tells them apart.
    torch.manual_seed(0)
    by_token = tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 40, 1.5, -1, len(tiny.tok))
    assert switches(by_token) > 1.5 * switches(got)


def test_a_new_handoff_unit_is_one_entry(warm, monkeypatch):
    """A fork's own rule, here each line written by one author drawn at its start, is one entry in
    HANDOFF_UNITS: both command lines offer it, and the authors change only right after a newline."""
    monkeypatch.setitem(tandem.HANDOFF_UNITS, "line", lambda surface: "Ċ" in surface)
    args = tandem.parse_args(["--handoff-unit", "line", "--max-gap", "1000"])
    assert evaluation.parse_args(["--strong", "s", "--weak", "w", "--handoff-unit", "line"]).handoff_unit == "line"
    toks, strong, weak = load_pair(str(warm / "strong"), str(warm / "weak"))
    rule, tok = tandem.draw_rule(args.handoff_unit, args.max_gap, toks, "cpu"), toks["strong"]
    prompts = tandem.encode_prompts(toks, toy_problems(32, seed=5), "cpu")
    torch.manual_seed(0)
    got = tandem_generate(strong, weak, prompts, 0.5, 24, 1.0, tok.eos_token_id, len(tok), **rule)
    switched = (got.from_weak[:, 1:] != got.from_weak[:, :-1]) & got.mask[:, 1:]
    after_newline = rule["boundaries"][got.tokens[:, :-1]]
    assert switched.sum() >= 5 and not (switched & ~after_newline).any()


def switches(rollout):
    return ((rollout.from_weak[:, 1:] != rollout.from_weak[:, :-1]) & rollout.mask[:, 1:]).sum()


# Two tokenizers: a Llama with a SentencePiece-style tokenizer (strong) and a GPT-2 with a byte-level BPE (weak)


def whole_tokens(tok):
    """The tokens whose text is whole characters on its own (not a part of a character's bytes)."""
    return torch.tensor(["\ufffd" not in tok.decode([i]) for i in range(len(tok))])


def cleanly(monkeypatch, toks, eos_bonus=None):
    """tandem.sample picks only whole-character tokens (random models write bytes no text decodes from), with
    eos_bonus[model] added to its end token's logit; returns the same change of logits, for checks."""
    allowed = {len(t): whole_tokens(t) for t in toks.values()}
    eos = {len(t): (t.eos_token_id, (eos_bonus or {}).get(n, 0.0)) for n, t in toks.items()}
    def change(logits):
        logits = logits.float().masked_fill(~allowed[logits.shape[-1]], -torch.inf)
        token, bonus = eos[logits.shape[-1]]
        logits[..., token] += bonus
        return logits
    sample = tandem.sample
    monkeypatch.setattr(tandem, "sample", lambda logits, temperature: sample(change(logits), temperature))
    return change


def stream_text(tok, prompt, rollout, row):
    """The text of a row's new tokens, end token left out, decoded after its prompt (as the decoder does)."""
    ids, mask = prompt
    new = [i for i in rollout.tokens[row][rollout.mask[row]].tolist() if i != tok.eos_token_id]
    return tandem.piece_text(tok, ids[row][mask[row].bool()].tolist() + new, len(new))


def same_text(across, prompts, got, r):  # row r of both streams holds one text
    strong = stream_text(across.toks["strong"], prompts["strong"], got, r)
    return strong == stream_text(across.toks["weak"], prompts["weak"], got.weak_view, r)


@pytest.mark.parametrize("handoff_prob", [0.0, 1.0])
def test_across_tokenizers_handoff_0_and_1_equal_each_models_generate(across, handoff_prob):
    prompts = tandem.encode_prompts(across.toks, toy_problems(6, seed=2), "cpu")
    n = "weak" if handoff_prob == 1 else "strong"
    got = tandem_generate(across.strong, across.weak, prompts, handoff_prob, 16, 0.0, None, tokenizers=across.toks)
    own = got.weak_view if n == "weak" else got
    expected = hf_greedy(getattr(across, n), *prompts[n], 16, across.toks[n].eos_token_id)
    for row, keep, want in zip(own.tokens, own.mask, expected):
        assert row[keep].tolist() == want[:int(keep.sum())].tolist()
    assert bool(got.from_weak[got.mask].all()) == (n == "weak")
    assert bool(got.weak_view.from_weak[got.weak_view.mask].all()) == (n == "weak")


def test_across_tokenizers_each_token_is_its_authors_argmax_over_its_own_stream(across, monkeypatch):
    """At handoff 0.5, rows read different numbers of tokens in a pass; every token a model wrote is still the argmax
    of its uncached forward over its own stream, either model's end token ends the row, and both streams are one
    text."""
    change = cleanly(monkeypatch, across.toks, {"strong": 0.1, "weak": 0.3})  # rows end, by either model
    prompts = tandem.encode_prompts(across.toks, toy_problems(8, seed=3), "cpu")
    torch.manual_seed(0)
    got = tandem_generate(across.strong, across.weak, prompts, 0.5, 24, 0.0, None, tokenizers=across.toks)
    views = {"strong": got, "weak": got.weak_view}
    for n, view in views.items():
        model, tok, own = getattr(across, n), across.toks[n], view.from_weak == (n == "weak")
        checked = 0
        for r in range(len(view.tokens)):
            ids, mask = prompts[n]
            stream = torch.cat([ids[r][mask[r].bool()], view.tokens[r][view.mask[r]]])
            with torch.no_grad():
                argmax = change(model(stream[None]).logits[0, :, :len(tok)]).argmax(-1)
            start = int(mask[r].sum())
            for j in (own[r] & view.mask[r]).nonzero()[:, 0].tolist():
                assert stream[start + j] == argmax[start + j - 1], (n, r, j)
                checked += 1
        assert checked > 20
    last = {n: [(v.tokens[r][v.mask[r]][-1].item() == across.toks[n].eos_token_id, bool(v.from_weak[r][v.mask[r]][-1]))
                for r in range(8)] for n, v in views.items()}
    assert last["strong"] == last["weak"]  # a row ends in both streams or in neither, with the same author's end token
    assert {by_weak for ended, by_weak in last["strong"] if ended} == {True, False}  # either model's ended a row
    for r in range(8):
        assert same_text(across, prompts, got, r)


def test_across_tokenizers_a_handoff_never_splits_a_character(across, monkeypatch):
    """The weak (byte-level) model writes "é" as its two bytes, one token each: the strong model never reads half of
    it."""
    first, second = across.toks["weak"].convert_tokens_to_ids(["Ã", "©"])  # the bytes C3 A9 of "é"
    assert across.toks["weak"].decode([first, second]) == "é" and "\ufffd" in across.toks["weak"].decode([first])
    cleanly(monkeypatch, across.toks)
    sample, calls = tandem.sample, []
    def scripted(logits, temperature):  # the weak model: first, second, first, second... call by call
        if logits.shape[-1] != len(across.toks["weak"]):
            return sample(logits, temperature)
        calls.append(len(calls))
        return torch.full(logits.shape[:1], first if len(calls) % 2 else second)
    monkeypatch.setattr(tandem, "sample", scripted)
    prompts = tandem.encode_prompts(across.toks, toy_problems(8, seed=4), "cpu")
    torch.manual_seed(0)
    got = tandem_generate(across.strong, across.weak, prompts, 0.5, 24, 0.0, None, tokenizers=across.toks)
    weak_view, switched_after_e = got.weak_view, 0
    for r in range(8):
        tokens = weak_view.tokens[r][weak_view.mask[r]].tolist()
        own = weak_view.from_weak[r][weak_view.mask[r]].tolist()
        for j, (token, mine) in enumerate(zip(tokens, own)):
            if mine and token == first:  # the first byte: the next token is the second, by the same author
                assert j + 1 < len(tokens) and own[j + 1], (r, j)
            switched_after_e += mine and token == second and j + 1 < len(tokens) and not own[j + 1]
        assert same_text(across, prompts, got, r)
    assert switched_after_e >= 3  # handoffs do happen, right after the character is whole
    assert "é" in "".join(stream_text(across.toks["strong"], prompts["strong"], got, r) for r in range(8))


def test_across_tokenizers_the_loss_recomputes_the_sampled_logprobs(across, monkeypatch):
    """The strong model's loss is taken on its own stream, exactly as it read it while sampling: the log-probs that
    policy_gradient's pass gives its tokens are those of an uncached forward over its own stream (of which its
    samples are the argmax at temperature 0, a test above), holes between rows and all; where the strong model began a
    word that was set aside for its partner's, the log-prob of beginning a word."""
    change = cleanly(monkeypatch, across.toks, {"strong": -torch.inf, "weak": -torch.inf})  # no row ends
    prompts = tandem.encode_prompts(across.toks, toy_problems(6, seed=5), "cpu")
    rule = tandem.draw_rule("word", 4, across.toks, "cpu")
    torch.manual_seed(0)
    got = tandem_generate(across.strong, across.weak, prompts, 0.5, 20, 0.7, None, shared_coins=True,
                          tokenizers=across.toks, **rule)
    assert len(set(got.mask.sum(1).tolist())) > 1  # same steps, rows of different lengths: they read different numbers
    chosen_logprobs = tandem.chosen_logprobs
    monkeypatch.setattr(tandem, "chosen_logprobs", lambda head, hidden, *rest: chosen_logprobs(
        lambda h: change(head(h)), hidden, *rest))
    recomputed = completion_logprobs(across.strong, prompts["strong"], got.tokens, got.mask, 0.7,
                                     len(across.toks["strong"]), set_aside=got.set_aside, units=got.units)
    actions = (got.mask & ~got.from_weak) | got.set_aside
    assert got.set_aside.sum() >= 3 and not (got.set_aside & ~got.from_weak).any() and actions.sum() > 30
    ids, mask = prompts["strong"]
    for r in range(6):
        stream = torch.cat([ids[r][mask[r].bool()], got.tokens[r][got.mask[r]]])
        start = int(mask[r].sum())
        with torch.no_grad():
            logits = across.strong(stream[None]).logits[0, :, :len(across.toks["strong"])]
            logp = torch.log_softmax(change(logits) / 0.7, -1)
        for p in actions[r].nonzero()[:, 0].tolist():
            expected = logp[start + p - 1, stream[start + p]]
            if got.set_aside[r, p]:
                expected = logp[start + p - 1][rule["boundaries"]].logsumexp(-1)
            assert torch.allclose(recomputed[r, p], expected, atol=1e-5), (r, p)


def test_across_tokenizers_a_draw_the_gap_forces_is_no_action(across, monkeypatch):
    """At --max-gap 1 every draw is the gap's, whatever token the strong model sampled: none is set aside as its action
    of beginning a word (at --max-gap 4, the test above, some are), though the models hand off."""
    cleanly(monkeypatch, across.toks, {"strong": -torch.inf, "weak": -torch.inf})  # no row ends
    prompts = tandem.encode_prompts(across.toks, toy_problems(6, seed=5), "cpu")
    torch.manual_seed(0)
    got = tandem_generate(across.strong, across.weak, prompts, 0.5, 20, 0.7, None, shared_coins=True,
                          tokenizers=across.toks, **tandem.draw_rule("word", 1, across.toks, "cpu"))
    assert switches(got) >= 5 and not got.set_aside.any()


def test_across_tokenizers_a_word_handoff_comes_before_a_word(across, monkeypatch):
    """With two tokenizers, a run ends right before a token of its author's that begins a word (a cut both tokenizers
    make), and that token is set aside for the other's. One row at a time, so that each sample call is the row's."""
    cleanly(monkeypatch, across.toks)
    calls = {len(tok): [] for tok in across.toks.values()}  # each model's sampled tokens, in order
    sample = tandem.sample
    def recording(logits, temperature):
        token = sample(logits, temperature)
        calls[logits.shape[-1]].append(token.item())
        return token
    monkeypatch.setattr(tandem, "sample", recording)
    rule, switches = tandem.draw_rule("word", 1000, across.toks, "cpu"), 0
    for problem in toy_problems(8, seed=6):
        for made in calls.values():
            made.clear()
        prompts = tandem.encode_prompts(across.toks, [problem], "cpu")
        got = tandem_generate(across.strong, across.weak, prompts, 0.5, 32, 1.5, None, tokenizers=across.toks, **rule)
        views = [("strong", got, rule["boundaries"]), ("weak", got.weak_view, rule["weak_boundaries"])]
        for n, view, boundaries in views:
            made, tokens = iter(calls[len(across.toks[n])]), view.tokens[0][view.mask[0]].tolist()
            mine = (view.from_weak[0][view.mask[0]] == (n == "weak")).tolist()
            runs = [[t for t, m in group if m] for _, group in itertools.groupby(zip(tokens, mine), key=lambda x: x[1])]
            for run in [run for run in runs if run]:
                assert [next(made) for _ in run] == run  # kept as sampled
                aside = next(made, None)  # and then the token set aside, unless the row ended there
                if aside is not None:
                    assert boundaries[aside], (n, problem)
                    switches += 1
            assert next(made, None) is None
    assert switches >= 10


# A pool of weak partners


def pool_args(*flags):
    return tandem.parse_args(["--max-new-tokens", "16", "--temperature", "1.0", *flags])


def test_a_pool_of_one_is_one_partner(tiny):
    """The same rollouts from the same seed as tandem_generate with that partner, and no draw."""
    problems, args = toy_problems(8, seed=1), pool_args()
    torch.manual_seed(0)
    prompt, got, which = tandem.pool_generate(tiny.strong, pool(tiny.weak, both(tiny.tok)), problems, args)
    torch.manual_seed(0)
    prompts = tandem.encode_prompts(both(tiny.tok), problems, "cpu")
    expected = tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 16, 1.0, tiny.tok.eos_token_id, len(tiny.tok))
    assert torch.equal(prompt[0], prompts["strong"][0]) and not which.any()
    assert all(torch.equal(getattr(got, f), getattr(expected, f)) for f in ["tokens", "from_weak", "mask"])


def mixed_pool(across, tmp_path):  # the strong model's SentencePiece-style tokenizer shared, and a byte-level one
    shared = make_model(tmp_path / "shared", across.toks["strong"], n_layer=1, seed=7, family="llama")
    tokenizers, models = tandem.load_models({"strong": across.root / "strong", "a": tmp_path / "shared",
                                             "b": across.root / "weak"}, "cpu")
    assert tokenizers["a"] is tokenizers["strong"] and tokenizers["b"] is not tokenizers["strong"]
    assert shared.config.vocab_size == len(tokenizers["a"])
    return models["strong"], [tandem.Partner(n, models[n], {"strong": tokenizers["strong"], "weak": tokenizers[n]})
                              for n in ["a", "b"]]


def test_a_pool_mixes_partners_in_one_batch_each_rollout_its_own(across, tmp_path, monkeypatch):
    """A partner that shares the strong model's tokenizer and one that does not, drawn per rollout: each row holds
    what its partner's own decoding gives (the same draws, row for row), so its weak tokens are its partner's argmax
    at temperature 0 over that partner's own stream (tests above), and no other partner's."""
    cleanly(monkeypatch, across.toks)
    strong, partners = mixed_pool(across, tmp_path)
    partners = [p._replace(rule=tandem.draw_rule(None, 32, p.tokenizers, "cpu")) for p in partners]
    problems, args = toy_problems(12, seed=8), pool_args()
    args.temperature = 0.0
    torch.manual_seed(0)
    _, got, which = tandem.pool_generate(strong, partners, problems, args)
    assert set(which.tolist()) == {0, 1}
    torch.manual_seed(0)
    assert torch.equal(torch.randint(2, (12,)), which)  # the draw, then each partner's rows in turn
    for i, partner in enumerate(partners):
        rows = (which == i).nonzero()[:, 0]
        prompts = tandem.encode_prompts(partner.tokenizers, [problems[r] for r in rows], "cpu")
        tok = partner.tokenizers["strong"]
        own = tandem_generate(strong, partner.model, prompts, 0.5, 16, 0.0, tok.eos_token_id, len(tok),
                              tokenizers=partner.tokenizers, **partner.rule)
        t = own.tokens.shape[1]
        assert torch.equal(got.tokens[rows, :t], own.tokens) and torch.equal(got.from_weak[rows, :t], own.from_weak)
        assert not got.mask[rows, t:].any() and got.from_weak[rows].any()
        assert (own.set_aside is None) == (partner.name == "a")
    assert got.set_aside[which == 0].sum() == 0 and got.units is not None


def test_every_partner_writes_and_its_reward_is_by_hand(tiny, tmp_path, monkeypatch):
    """Three partners drawn per rollout over a few updates: each writes; reward_by_partner is each one's rollouts'
    mean reward, by hand, from a reward that is 1 for the first two rows of each batch and 0 for the others."""
    partners = [tandem.Partner(f"p{i}", make_model(None, tiny.tok, 1, seed=10 + i), both(tiny.tok)) for i in range(3)]
    seen, generate = [], tandem.pool_generate
    def recording(*args, **kwargs):
        seen.append(generate(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(tandem, "pool_generate", recording)
    rows = iter(range(10 ** 6))
    monkeypatch.setattr(tandem, "reward", lambda completion, problem, task: float(next(rows) % 8 < 2))
    optimizer = torch.optim.AdamW(tiny.strong.parameters(), lr=0.0)
    torch.manual_seed(0)
    for _ in range(3):
        metrics = tandem.rl_step(tiny.strong, partners, optimizer, toy_problems(4, seed=2), pool_args())
        which = seen[-1][2]
        expected = {p.name: (which[:2] == i).sum().item() / max((which == i).sum().item(), 1)
                    for i, p in enumerate(partners)}
        assert metrics["reward_by_partner"] == pytest.approx(expected)
    assert set(torch.cat([w for _, _, w in seen]).tolist()) == {0, 1, 2}
    assert all(s[1].from_weak[s[2] == i].any() for s in seen for i in set(s[2].tolist()))


# -----------------------------------------------------------------------------
# REINFORCE


def test_baselines():
    r = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert torch.allclose(baseline(r, "loo"), torch.tensor([[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]]))
    assert torch.allclose(baseline(r, "mean"), torch.tensor([[1 / 3] * 3, [1.0] * 3]))
    assert torch.equal(baseline(r, "none"), torch.zeros_like(r))


def rollout_for_loss(tiny):
    prompts = left_padded(tiny.tok, PROMPTS)
    torch.manual_seed(3)
    roll = tandem_generate(tiny.strong, tiny.weak, prompts, 0.5, 12, 1.0, tiny.tok.eos_token_id)
    # Finish row 1 early on an eos the strong model sampled, so eos and the padding after it are both tested.
    roll.tokens[1, 5], roll.from_weak[1, 5] = tiny.tok.eos_token_id, False
    roll.tokens[1, 6:], roll.from_weak[1, 6:], roll.mask[1, 6:] = tiny.tok.eos_token_id, False, False
    return prompts["strong"], roll


def grads(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def gradient_of(model, prompt, roll, advantages, temperature, micro_batch_size, **kwargs):
    """The gradient policy_gradient accumulates from scratch; model.grad is left cleared."""
    model.zero_grad(set_to_none=True)
    policy_gradient(model, prompt, roll, advantages, temperature, micro_batch_size, **kwargs)
    gradient = grads(model)
    model.zero_grad(set_to_none=True)
    return gradient


def test_gradient_is_zero_when_rewards_equal_the_baseline(tiny):
    prompt, roll = rollout_for_loss(tiny)
    tiny.strong.zero_grad(set_to_none=True)
    rewards = torch.ones(len(PROMPTS)).view(-1, 2)
    advantages = (rewards - baseline(rewards, "loo")).view(-1)
    policy_gradient(tiny.strong, prompt, roll, advantages, 1.0, 2)
    assert grads(tiny.strong).abs().max() == 0


def test_gradient_counts_only_the_strong_models_own_tokens(pair):
    """The accumulated gradient equals a direct computation: one uncached forward per rollout, summing
    log p over the strong model's tokens (eos included; weak tokens and padding excluded)."""
    tiny = pair
    prompt, roll = rollout_for_loss(tiny)
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0])
    got = gradient_of(tiny.strong, prompt, roll, advantages, 0.7, micro_batch_size=3)

    own = roll.mask & ~roll.from_weak
    assert roll.from_weak[roll.mask].any() and own[1, 5]  # weak tokens present; row 1's eos is the strong one's
    total = 0
    ids, attn = prompt
    for i in range(len(PROMPTS)):
        real = ids[i][attn[i].bool()]
        n = int(roll.mask[i].sum())
        seq = torch.cat([real, roll.tokens[i, :n]])[None]
        logp = torch.log_softmax(tiny.strong(seq).logits[0, len(real) - 1:-1] / 0.7, -1)
        chosen = logp.gather(-1, roll.tokens[i, :n, None]).squeeze(-1)
        total = total - advantages[i] * chosen[own[i, :n]].sum()
    (total / own.sum()).backward()
    expected = grads(tiny.strong)
    tiny.strong.zero_grad(set_to_none=True)
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()


def test_gradient_step_raises_logprob_of_rewarded_tokens(tiny):
    prompt, roll = rollout_for_loss(tiny)
    own = roll.mask & ~roll.from_weak
    model = tandem.AutoModelForCausalLM.from_pretrained(tiny.root / "strong").eval()

    def own_logprob():
        with torch.no_grad():
            return (completion_logprobs(model, prompt, roll.tokens, roll.mask, 1.0) * own).sum(1)

    before = own_logprob()
    advantages = torch.tensor([1.0, -1.0, 0.0, 0.0])
    policy_gradient(model, prompt, roll, advantages, 1.0, 4)
    assert torch.isfinite(grads(model)).all() and grads(model).abs().max() > 0
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = own_logprob()
    assert after[0] > before[0] and after[1] < before[1]


def test_weak_token_weight_lets_weak_tokens_into_the_loss(tiny):
    """With weight w, the gradient equals that of a loss where the weak tokens count w times a
    strong model's own token: checked against the direct computation with both masks."""
    prompt, roll = rollout_for_loss(tiny)
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0])
    got = gradient_of(tiny.strong, prompt, roll, advantages, 1.0, 2, weak_token_weight=0.3)
    logp = completion_logprobs(tiny.strong, prompt, roll.tokens, roll.mask, 1.0)
    weight = (roll.mask & ~roll.from_weak) + 0.3 * (roll.mask & roll.from_weak)
    (-(advantages[:, None] * logp * weight).sum() / weight.sum()).backward()
    expected = grads(tiny.strong)
    tiny.strong.zero_grad(set_to_none=True)
    assert torch.allclose(got, expected, atol=1e-6)
    weight_0 = gradient_of(tiny.strong, prompt, roll, advantages, 1.0, 2)
    assert not torch.allclose(got, weight_0, atol=1e-6)


def test_weak_tokens_get_no_gradient(tiny):
    prompt, roll = rollout_for_loss(tiny)
    all_weak = Rollout(roll.tokens, roll.mask.clone(), roll.mask)
    tiny.strong.zero_grad(set_to_none=True)
    loss = policy_gradient(tiny.strong, prompt, all_weak, torch.tensor([1.0, -1.0, 1.0, -1.0]), 1.0, 4)
    assert loss == 0 and grads(tiny.strong).abs().max() == 0


# Beyond REINFORCE: the follow-up's GRPO


def grpo_args(*flags):
    return tandem.parse_args(["--temperature", "1.0", *flags])


def test_group_scaled_advantages_by_hand():
    """GRPO's advantage (verl's, --baseline mean --scale-rewards group): the reward minus its group's mean over the
    group's standard deviation (unbiased) + 1e-6; a group whose rewards are all equal has advantage 0."""
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    got = tandem.advantages_of(rewards, grpo_args("--baseline", "mean", "--scale-rewards", "group"))
    std = (1 / 3) ** 0.5  # of [1, 0, 0, 1]: variance 1/3 with Bessel's correction
    assert torch.allclose(got[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(got[1], torch.zeros(4))
    assert torch.allclose(got[2], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))
    assert torch.equal(tandem.advantages_of(rewards, grpo_args()), rewards - baseline(rewards, "loo"))  # REINFORCE's


def test_the_clipped_loss_at_ratio_one_is_reinforce(tiny):
    """With the policy that sampled as pi_old and no step taken (ratio 1, the clip inert), the clipped objective's
    gradient is the REINFORCE gradient with the same advantages."""
    prompt, roll = rollout_for_loss(tiny)
    advantages = torch.tensor([1.0, -0.5, 0.25, 2.0])
    reinforce = gradient_of(tiny.strong, prompt, roll, advantages, 0.7, 2)
    rows = torch.arange(4)
    old = tandem.logprobs_of(tiny.strong, prompt, roll, [rows], 0.7, 2, None, tandem.nullcontext())
    clipped = gradient_of(tiny.strong, prompt, roll, advantages, 0.7, 2, rows=rows, old_logp=old, args=grpo_args())
    assert torch.allclose(clipped, reinforce, atol=1e-7) and reinforce.abs().max() > 0


def test_the_clip_stops_a_token_pushed_further_out_and_not_one_pushed_back():
    """Outside the band [1 - 0.2, 1 + 0.2]: a token whose advantage would push its ratio further out gets no gradient,
    one pushed back toward the band does; verl's dual clip holds a negative advantage's loss at 3 x A."""
    args = grpo_args()
    log_ratio = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 4.0])).requires_grad_()
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0])  # out and up, back down, out and down, back up, dual clip
    objective = tandem.clipped_objective(log_ratio, advantages, args)
    objective.sum().backward()
    assert log_ratio.grad[0] == 0 and log_ratio.grad[2] == 0 and log_ratio.grad[4] == 0
    assert log_ratio.grad[1] < 0 and log_ratio.grad[3] > 0  # ascending the objective moves each back toward 1
    assert objective[4] == -3.0


def test_the_k3_penalty_is_zero_at_the_reference_and_pulls_back_to_it(tiny):
    logp = torch.tensor([-1.0, -2.0, -0.5]).requires_grad_()
    reference = logp.detach().clone()
    penalty = tandem.k3(logp, reference)
    penalty.sum().backward()
    assert torch.equal(penalty, torch.zeros(3)) and torch.equal(logp.grad, torch.zeros(3))
    # Through the model: with the reference one step away, a step on the penalty alone brings the log-probs back
    prompt, roll = rollout_for_loss(tiny)
    rows, args = torch.arange(4), grpo_args("--kl-coef", "1.0")
    model = make_model(None, tiny.tok, n_layer=2, seed=1)
    ref = tandem.logprobs_of(tiny.strong, prompt, roll, [rows], 1.0, 4, None, tandem.nullcontext())
    def gap():
        now = tandem.logprobs_of(model, prompt, roll, [rows], 1.0, 4, None, tandem.nullcontext())
        return tandem.k3(now, ref)[roll.mask & ~roll.from_weak].mean().item()
    with torch.no_grad():
        for p in model.parameters():
            p += 0.02 * torch.randn_like(p)
    before = gap()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    policy_gradient(model, prompt, roll, torch.zeros(4), 1.0, 4, rows=rows, ref_logp=ref, args=args)
    optimizer.step()
    assert before > 1e-4 and gap() < before


def test_two_mini_batches_make_two_steps_from_one_set_of_rollouts(warm, monkeypatch):
    """--mini-batch-size half the batch: the rollouts are sampled once, two optimizer steps follow; pi_old is the
    policy that sampled, so the first step's ratio is exactly 1 and the second's is not; weak tokens stay out."""
    toks, strong, weak = load_pair(str(warm / "strong"), str(warm / "weak"))
    decodes, ratios, steps = [], [], []
    generate, clipped = tandem.tandem_generate, tandem.clipped_objective
    monkeypatch.setattr(tandem, "tandem_generate", lambda *a, **k: decodes.append(1) or generate(*a, **k))
    monkeypatch.setattr(tandem, "clipped_objective", lambda log_ratio, *a: ratios.append(log_ratio) or clipped(
        log_ratio, *a))
    optimizer = torch.optim.AdamW(strong.parameters(), lr=1e-2)
    monkeypatch.setattr(optimizer, "step", lambda *a, **k: steps.append(1) or torch.optim.AdamW.step(optimizer))
    args = grpo_args("--baseline", "mean", "--scale-rewards", "group", "--batch-size", "4", "--mini-batch-size", "2",
                     "--samples-per-prompt", "4", "--max-new-tokens", "12")
    torch.manual_seed(0)
    metrics = tandem.rl_step(strong, pool(weak, toks), optimizer, toy_problems(4, seed=3), args)
    assert len(decodes) == 1 and len(steps) == 2 and not metrics["skipped"]
    assert len(ratios) == 2 * 1  # a micro-batch of 16 rows per mini-batch of 2 prompts x 4
    assert torch.equal(ratios[0], torch.zeros_like(ratios[0]))  # exactly 1 before the first step
    assert ratios[1].abs().max() > 0  # the second mini-batch is read after the first step


def test_a_weak_token_never_enters_the_ratio(tiny):
    """Changing pi_old where the weak model wrote changes nothing; where the strong one wrote, it does."""
    prompt, roll = rollout_for_loss(tiny)
    rows, advantages, args = torch.arange(4), torch.tensor([1.0, -1.0, 0.5, -0.5]), grpo_args()
    old = tandem.logprobs_of(tiny.strong, prompt, roll, [rows], 1.0, 4, None, tandem.nullcontext()) - 0.3
    def gradient(old):
        return gradient_of(tiny.strong, prompt, roll, advantages, 1.0, 4, rows=rows, old_logp=old, args=args)
    weak_changed = torch.where(roll.from_weak, old + 5.0, old)
    strong_changed = torch.where(roll.mask & ~roll.from_weak, old + 0.5, old)
    assert roll.from_weak[roll.mask].any()
    assert torch.equal(gradient(weak_changed), gradient(old))
    assert not torch.allclose(gradient(strong_changed), gradient(old))


def test_a_non_finite_gradient_skips_the_update(tiny, tmp_path, monkeypatch):
    # With no baseline: every advantage is 1
    monkeypatch.setattr(tandem, "reward", lambda completion, problem, task: 1.0)
    model = make_model(tmp_path / "m", tiny.tok, n_layer=1, seed=6)
    model.transformer.h[0].mlp.c_fc.weight.register_hook(lambda grad: grad * float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    args = tandem.parse_args(["--handoff-prob", "0", "--max-new-tokens", "8", "--temperature", "1.0",
                              "--baseline", "none"])
    problems = [{"question": q, "answer": "#### 1"} for q in ["1?", "2?"]]
    torch.manual_seed(0)
    metrics = tandem.rl_step(model, pool(model, both(tiny.tok)), optimizer, problems, args)
    assert metrics["skipped"] and metrics["loss"] != 0 and not optimizer.state  # AdamW never stepped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_reinforce_learns_a_learnable_task(tiny, tmp_path):
    """SFT teaches the answer format with random digits; REINFORCE must then find the rewarded digit."""
    tok = tiny.tok
    model = make_model(tmp_path / "m", tok, n_layer=2, seed=5)
    rng = random.Random(0)
    questions = [f"Copy {d}" for d in range(10)]
    tandem.sft(model, tok, [{"question": q, "answer": f"#### {rng.randint(0, 9)}"} for q in questions * 20],
               steps=80, batch_size=16, lr=3e-3, marker_frac=1.0, seed=0)
    problems = [{"question": q, "answer": "#### 7"} for q in questions]
    args = tandem.parse_args(["--samples-per-prompt", "4", "--handoff-prob", "0", "--max-new-tokens", "6",
                              "--temperature", "1.0"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    rewards = [tandem.rl_step(model, pool(model, both(tok)), optimizer, problems, args)["reward"] for _ in range(30)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"\nREINFORCE, 30 steps of 40 rollouts: reward {first:.2f} (first 5 steps) -> {last:.2f} (last 5)")
    assert first < 0.4 and last > 0.8


def test_another_reward_changes_rl_and_not_the_accuracies(warm, monkeypatch):
    """A fork's own verifier replaces `reward`: RL learns from it, while evaluation keeps saying which answers are
    right."""
    tok, strong, weak = load_pair(str(warm / "strong"), str(warm / "weak"))  # tok: both models'
    problems = toy_problems(8, seed=6)
    before = tandem.evaluate(strong, weak, tok, problems, 0.5, max_new_tokens=24, batch_size=8)
    seen = []
    monkeypatch.setattr(tandem, "reward", lambda completion, problem, task: seen.append(problem) or 0.25)
    args = tandem.parse_args(["--max-new-tokens", "24", "--temperature", "1.0"])
    optimizer = torch.optim.AdamW(strong.parameters(), lr=0.0)
    assert tandem.rl_step(strong, pool(weak, tok), optimizer, problems, args)["reward"] == 0.25
    assert seen == [p for p in problems for _ in range(2)]  # each rollout's whole problem record
    assert tandem.evaluate(strong, weak, tok, problems, 0.5, max_new_tokens=24, batch_size=8) == before
    assert 0 < before["strong_accuracy"] < 1


# -----------------------------------------------------------------------------
# Evaluation


class Scripted(torch.nn.Module):
    """A stand-in model that writes the same text after every prompt, so its answers are known.
    Its body's "hidden state" is already the logits, and its output layer is the identity."""

    def __init__(self, tokenizer, text):
        super().__init__()
        self.script = torch.tensor(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        self.config = GPT2Config(n_layer=1)  # only for tandem_generate's cache, which it never fills
        self.vocab_size = len(tokenizer)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    @property
    def base_model(self):
        return self

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def forward(self, input_ids, attention_mask, position_ids, **_):
        if input_ids.shape[1] > 1:  # the prompt: remember where each row's completion starts
            self.start = position_ids[:, -1:] + 1
        k = (position_ids[:, -1:] + 1 - self.start).clamp(max=len(self.script) - 1)
        logits = torch.full((input_ids.shape[0], 1, self.vocab_size), -30.0)
        logits.scatter_(-1, self.script[k][..., None], 30.0)
        return Namespace(last_hidden_state=logits)


def test_evaluate_keys_and_ranges(tiny):
    problems = toy_problems(6, seed=3)
    runs = {}
    result = tandem.evaluate(tiny.strong, tiny.weak, both(tiny.tok), problems, 0.5, curve=[0.0, 0.5, 1.0],
                                 max_new_tokens=12, batch_size=4, runs=runs)
    assert result["n"] == 6
    for who, p in [("strong", 0.0), ("weak", 1.0), ("tandem", 0.5)]:  # each marker rate is of its own solutions
        assert result[f"{who}_marker_rate"] == sum(map(has_jargon, runs[p][0])) / 6
    assert all(bool(r.from_weak[r.mask].all()) for _, r in runs[1.0][1])
    for key in ["strong_accuracy", "weak_accuracy", "tandem_accuracy", "strong_marker_rate", "weak_marker_rate",
                "tandem_marker_rate"]:
        assert 0 <= result[key] <= 1, key
    assert result["weak_nll"] > 0 and 0 < result["strong_tokens"] <= 12
    assert [c["handoff_prob"] for c in result["curve"]] == [0.0, 0.5, 1.0]
    assert result["curve"][0]["accuracy"] == result["strong_accuracy"]
    assert result["curve"][-1]["accuracy"] == result["weak_accuracy"]
    again = tandem.evaluate(tiny.strong, tiny.weak, both(tiny.tok), problems, 0.5, max_new_tokens=12, batch_size=3,
                                temperature=1.0, seed=4)
    assert again == tandem.evaluate(tiny.strong, tiny.weak, both(tiny.tok), problems, 0.5, max_new_tokens=12,
                                        batch_size=3, temperature=1.0, seed=4)  # seeded


def test_examples_put_the_weak_models_runs_in_braces_and_keep_their_spaces(across):
    sp = across.toks["strong"]  # SentencePiece-style: a run decoded alone would lose its first space
    runs = [tandem.encode_piece(sp, text) for text in [" 3", " plus 4", " is 7"]]
    tokens = torch.tensor(runs[0] + runs[1] + runs[2] + [sp.eos_token_id])
    from_weak = torch.tensor([False] * len(runs[0]) + [True] * len(runs[1]) + [False] * (len(runs[2]) + 1))
    assert evaluation.marked(sp, tokens, from_weak, torch.ones_like(from_weak)) == "3{ plus 4} is 7"


def test_evaluate_accuracy_and_legibility_by_hand(tiny):
    problems = toy_problems(10, seed=4)
    solution = " 3+4=<<3+4=7>>7\n#### 7"
    strong = Scripted(tiny.tok, solution)
    result = tandem.evaluate(strong, tiny.weak, both(tiny.tok), problems, 0.5, curve=[0.0, 1.0], max_new_tokens=30,
                                 batch_size=4)
    golds = [tandem.extract_answer(p["answer"]) for p in problems]
    assert 0 < golds.count("7") < len(golds)
    assert result["strong_accuracy"] == golds.count("7") / len(golds)
    assert result["strong_marker_rate"] == 1.0
    assert result["strong_tokens"] == len(strong.script)
    assert result["curve"][0]["accuracy"] == result["strong_accuracy"]
    assert result["curve"][1]["accuracy"] == result["weak_accuracy"]
    # Legibility: the weak model's mean NLL of the script, one uncached forward per problem.
    nll = []
    for p in problems:
        prompt = torch.tensor(tiny.tok(format_prompt(p["question"]))["input_ids"])
        with torch.no_grad():
            logits = tiny.weak(torch.cat([prompt, strong.script])[None]).logits[0, len(prompt) - 1:-1]
        nll += (-torch.log_softmax(logits, -1).gather(-1, strong.script[:, None])).squeeze(-1).tolist()
    assert abs(result["weak_nll"] - sum(nll) / len(nll)) < 1e-4
    # per character: comparable across tokenizers
    chars = len(problems) * len(tiny.tok.decode(strong.script, skip_special_tokens=True))
    assert abs(result["weak_nll_per_char"] - sum(nll) / chars) < 1e-4


# -----------------------------------------------------------------------------
# Command line and main, end to end; the paper's claim in miniature


def run_main(capsys, module, *argv):
    """A command line run in this process (no interpreter to start); returns what it printed."""
    capsys.readouterr()
    assert module.main([str(a) for a in argv]) is None
    return capsys.readouterr().out


def test_cli_end_to_end(warm, tmp_path, capsys):
    data, out = write_data(tmp_path / "gsm8k"), tmp_path / "run"

    def tandem_cli(*flags):
        return run_main(capsys, tandem, "--strong", warm / "strong", "--weak", warm / "weak", "--data", data,
                        "--out", out, "--sft-steps", "20", "--sft-lr", "1e-3", "--lr", "1e-3", "--batch-size", "8",
                        "--max-new-tokens", "24", "--temperature", "1.0", "--device", "cpu", "--seed", "0", *flags)

    assert "step 3/3" in tandem_cli("--steps", "3", "--eval-every", "2", "--eval-limit", "8")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in log if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]  # the starting point, every 2 steps, the end
    assert all({"strong_accuracy", "tandem_accuracy", "strong_marker_rate"} <= r.keys() for r in evals)
    assert evals[-1]["n"] == 8
    for r in rows:
        assert {"reward", "rollout_marker_rate", "weak_frac", "switches", "loss", "seconds"} <= r.keys()
        assert 0 <= r["reward"] <= 1 and 0 <= r["rollout_marker_rate"] <= 1
        assert 0 < r["weak_frac"] < 1 and r["switches"] > 0
    assert any(r["reward"] > 0 for r in rows)
    assert json.loads((out / "config.json").read_text())["handoff_prob"] == 0.5
    final = tandem.AutoModelForCausalLM.from_pretrained(out / "final")
    start = tandem.AutoModelForCausalLM.from_pretrained(out / "sft" / "strong")
    tandem.AutoTokenizer.from_pretrained(out / "final")
    changed = [n for (n, a), b in zip(final.named_parameters(), start.parameters()) if not torch.equal(a, b)]
    assert changed, "RL did not change the strong model"
    # A run killed before its first checkpoint goes on with --resume from its saved warm-start, without
    # training it again; the paper's other knobs go through the whole script too.
    shutil.rmtree(out / "final")
    (tmp_path / "prefix.txt").write_text("Question: What is 1 plus 1?\nAnswer: 1+1=2\n#### 2\n\n")
    printed = tandem_cli("--steps", "2", "--eval-every", "2", "--eval-limit", "4", "--resume", "--handoff-unit", "word",
                         "--weak-prompt", tmp_path / "prefix.txt", "--weak-token-weight", "0.1", "--coins", "batch")
    assert "no checkpoint" in printed and "sft strong step" not in printed and "step 2/2" in printed
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2, 2]


def test_cli_trains_with_a_pool_and_evaluates_each_partner_and_a_held_out_one(warm, tiny, tmp_path, capsys):
    """tandem.py --weak A --weak B: each partner's warm-start under sft/ by a name eval.py takes back, evaluation rows
    per partner, reward by partner in train rows; eval.py with both and a third, held out of training: one line each."""
    data, out = write_data(tmp_path / "gsm8k", n_test=4), tmp_path / "run"
    run_main(capsys, tandem, "--strong", warm / "strong", "--weak", warm / "weak", "--weak", tiny.root / "weak",
             "--data", data, "--out", out, "--sft-steps", "0", "--weak-sft-steps", "3", "--steps", "2",
             "--batch-size", "4", "--max-new-tokens", "12", "--temperature", "1.0", "--eval-every", "2",
             "--device", "cpu")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["partner"]) for r in rows if r["kind"] == "eval"] == [
        (0, "weak"), (0, "weak-1"), (2, "weak"), (2, "weak-1")]
    assert all(set(r["reward_by_partner"]) == {"weak", "weak-1"} for r in rows if r["kind"] == "train")
    assert (out / "sft" / "weak" / "config.json").exists() and (out / "sft" / "weak-1" / "config.json").exists()
    make_model(tmp_path / "held_out", tiny.tok, n_layer=1, seed=9)
    printed = run_main(capsys, evaluation, "--strong", out / "final", "--weak", out / "sft" / "weak", "--weak",
                       out / "sft" / "weak-1", "--weak", tmp_path / "held_out", "--data", data,
                       "--max-new-tokens", "12",
                       "--device", "cpu", "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())["partners"]
    assert list(result) == [str(out / "sft" / "weak"), str(out / "sft" / "weak-1"), str(tmp_path / "held_out")]
    assert len({r["strong_accuracy"] for r in result.values()}) == 1  # the strong model alone, read by each
    assert all(r["weak_nll"] > 0 and 0 <= r["tandem_accuracy"] <= 1 for r in result.values())
    table = printed.split("weak partner")[-1].splitlines()
    assert len(table) == 4 and table[3].startswith(str(tmp_path / "held_out")[-40:])


def test_plain_rl_is_evaluated_in_tandem_at_the_papers_handoff(warm, tmp_path, capsys):
    """The control's rollouts are the strong model's alone, but its pair accuracy is at --eval-handoff-prob (0.5), as
    the tandem run's is: the two runs' curves compare."""
    data, out = write_data(tmp_path / "gsm8k", n_test=8), tmp_path / "run"
    run_main(capsys, tandem, "--strong", warm / "strong", "--weak", warm / "weak", "--data", data, "--out", out,
             "--sft-steps", "0", "--handoff-prob", "0", "--steps", "1", "--batch-size", "4", "--max-new-tokens", "16",
             "--temperature", "1.0", "--eval-every", "1", "--device", "cpu")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["tandem_handoff_prob"] for r in rows if r["kind"] == "eval"] == [0.5, 0.5]
    assert [r["weak_frac"] for r in rows if r["kind"] == "train"] == [0.0]


def test_cli_trains_a_llama_pair(llama, tmp_path, capsys):
    """The whole script on a Llama-architecture pair whose tokenizer ends text with <|im_end|>: the strong model's
    warm-start (the weak one's is 0 steps: as given), two RL updates with word handoffs, evaluations, and a final/
    that plain transformers loads."""
    data, out = write_data(tmp_path / "gsm8k", n_train=50, n_test=4), tmp_path / "run"
    printed = run_main(capsys, tandem, "--strong", llama.root / "strong", "--weak", llama.root / "weak", "--data", data,
                       "--out", out, "--sft-steps", "10", "--weak-sft-steps", "0", "--steps", "2", "--batch-size", "4",
                       "--max-new-tokens", "12", "--eval-every", "2", "--eval-limit", "4", "--handoff-unit", "word",
                       "--device", "cpu")
    assert "sft strong step 10/10" in printed and "sft weak" not in printed and not (out / "sft" / "weak").exists()
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1, 2, 2]
    final = tandem.AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(final).__name__ == "LlamaForCausalLM" and final.config.num_key_value_heads == 2
    assert tandem.AutoTokenizer.from_pretrained(out / "final").eos_token == "<|im_end|>"
    warm = tandem.AutoModelForCausalLM.from_pretrained(out / "sft" / "strong").state_dict()
    assert any(not torch.equal(v, llama.strong.state_dict()[k]) for k, v in warm.items())  # the warm-start trained it


def test_cli_trains_and_evaluates_a_pair_of_two_tokenizers(warm_across, tmp_path, capsys):
    """tandem.py and eval.py on a pair that shares no tokenizer (a Llama with a SentencePiece-style one, a GPT-2 with
    a byte-level one): each model's warm-start in its own tokens and saved with its tokenizer, RL with word handoffs
    (the default; by token is refused), batch coins and a weak prompt, evaluations, and eval.py's report of legibility
    per token and per character."""
    data, out = write_data(tmp_path / "gsm8k", n_test=4), tmp_path / "run"
    (tmp_path / "prefix.txt").write_text("Question: What is 1 plus 1?\nAnswer: 1+1=2\n#### 2\n\n")
    printed = run_main(capsys, tandem, "--strong", warm_across / "strong", "--weak", warm_across / "weak",
                       "--data", data, "--out", out, "--sft-steps", "5", "--steps", "2", "--batch-size", "4",
                       "--max-new-tokens", "16", "--temperature", "1.0", "--eval-every", "2", "--coins", "batch",
                       "--weak-prompt", tmp_path / "prefix.txt", "--device", "cpu")
    assert "sft strong step 5/5" in printed and "sft weak step 5/5" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]
    assert all(0 < r["weak_frac"] < 1 for r in rows if r["kind"] == "train")
    eos = {role: tandem.AutoTokenizer.from_pretrained(out / "sft" / role).eos_token for role in ("strong", "weak")}
    assert eos == {"strong": "</s>", "weak": "<|endoftext|>"}
    assert tandem.AutoTokenizer.from_pretrained(out / "final").eos_token == "</s>"
    printed = run_main(capsys, evaluation, "--strong", out / "final", "--weak", out / "sft" / "weak", "--data", data,
                       "--max-new-tokens", "16", "--device", "cpu", "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["weak_nll"] > 0 and 0 < result["weak_nll_per_char"] and "nats/character" in printed
    argv = ["--strong", out / "final", "--weak", out / "sft" / "weak", "--data", data, "--max-new-tokens", "16",
            "--handoff-unit", "token"]
    refused = usage_error(capsys, evaluation, argv + ["--device", "cpu"], alone=False)
    assert "two tokenizers share no tokens" in refused


def test_weak_frac_is_the_weak_models_share_of_the_text_in_characters(tiny, monkeypatch):
    """Whatever the tokenizers: here the strong model wrote "Lee has" (two tokens) and the weak one " 15 books"."""
    strong_ids, weak_ids = (tiny.tok(text, add_special_tokens=False)["input_ids"] for text in ["Lee has", " 15 books"])
    tokens = torch.tensor([strong_ids + weak_ids + [tiny.tok.eos_token_id]] * 2)
    from_weak = torch.tensor([[False] * len(strong_ids) + [True] * (len(weak_ids) + 1)] * 2)
    scripted = Rollout(tokens, from_weak, torch.ones_like(from_weak))
    monkeypatch.setattr(tandem, "tandem_generate", lambda *args, **kwargs: scripted)
    args = tandem.parse_args(["--max-new-tokens", "8", "--temperature", "1.0"])
    optimizer = torch.optim.AdamW(tiny.strong.parameters(), lr=0.0)
    metrics = tandem.rl_step(tiny.strong, pool(tiny.weak, both(tiny.tok)), optimizer, toy_problems(1), args)
    assert metrics["weak_frac"] == pytest.approx(len(" 15 books") / len("Lee has 15 books"))


def terms(problem):  # "3+4?" (or "3 + 4 ?") -> (3, 4)
    a, b = problem["question"].rstrip("?").split("+")
    return int(a), int(b)


def taught_to_weak(problem):  # the toy sums the weak partner learns: those whose second term is 0 to 4
    return terms(problem)[1] <= 4


def in_words(problem, marked):  # the language world's solutions: "3 plus 4 is 7" in A, "3 mas 4 es 7" in B (marked)
    a, b = terms(problem)
    plus, is_ = ("mas", "es") if marked else ("plus", "is")
    return f" {a} {plus} {b} {is_} {a + b}\n#### {a + b}"


# A task defined in a test, as a forker's is: GSM8K's prompt and check, its own solutions and marker
LANGUAGE_WORLD = tandem.GSM8K._replace(target=in_words, marker=lambda text: "mas" in text)


def toy_world(tokenizers="one", seed=0, coins="row", samples=2, plain=True, updates=80, algo="reinforce",
              world="jargon"):
    """The paper's experiment in miniature: {"warm-start": evaluate(), "tandem RL (handoff 0.5)": ..., "plain RL
    (handoff 0)": ...}, and the table it prints. A strong model (3 layers, 400 warm-start steps) learns single-digit
    sums ("3+4?") from solutions that keep the annotation 90% of the time. The weak partner (2 layers, plain solutions)
    is weaker by what it was taught: only the sums whose second term is 0 to 4, to the end of its learning curve, so
    alone it solves those and few others (about 55% of the test sums, on any processor), while it can still continue
    any sum's solution once its answer is written. From one warm-start, 80 REINFORCE steps of 64 rollouts at handoff
    0.5 (tandem) and, if `plain`, at handoff 0 (plain RL), a draw per token. With two tokenizers the models pass text
    and hand off by word, so the sums are written a word per symbol ("3 + 4 = 7"): "two", the strong model's tokenizer
    is SentencePiece-style and the weak one's byte-level; "two-reverse", the strong one's has single characters and
    the weak one's is SentencePiece-style with merges of several characters. `algo` "grpo": the follow-up's GRPO
    (--baseline mean --scale-rewards group, 8 samples of 8 prompts, 2 mini-batches of 4 prompts each update).
    `world` "language": the paper's second experiment in miniature (one tokenizer): the weak partner writes language B
    ("3 mas 4 es 7"), the strong model writes A ("3 plus 4 is 7") and 10% of its warm-start is in B; the marker is B."""
    start_time = time.time()
    spaced = tokenizers != "one"
    train = toy_problems(4000, seed, "{a} + {b} ?" if spaced else "{a}+{b}?", spaced)
    test = toy_problems(200, seed + 1000, "{a} + {b} ?" if spaced else "{a}+{b}?", spaced)
    # Characters (the jargon world with one tokenizer: a few merges of the template); SentencePiece-style, with and
    # without merges of sums. The language world's words are spelt out in characters, as the jargon is.
    chars = make_tokenizer([format_prompt("") + " #### <<>>"], vocab_size=257 if spaced or world == "language" else 285)
    pieces = make_sp_tokenizer([format_prompt("") + " #### <<>> 0123456789+=?"], vocab_size=80)
    merged = make_sp_tokenizer([format_prompt(p["question"]) + " " + p["answer"] for p in train[:500]], 200)
    toks = {"one": both(chars), "two": {"strong": pieces, "weak": chars},
            "two-reverse": {"strong": chars, "weak": merged}}[tokenizers]
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # models this small learn sums faster without
    shape = dict(n_embd=64, n_head=4, n_positions=256 if spaced else 128, **no_dropout)
    strong = make_model(None, toks["strong"], n_layer=3, seed=seed, **shape)
    weak = make_model(None, toks["weak"], n_layer=2, seed=seed + 1, **shape)
    # 10% of the strong model's warm-start is plain (in B): without it, it could not read the weak model's text at all.
    asking = tandem.Asking(LANGUAGE_WORLD if world == "language" else tandem.GSM8K)
    marker_frac = {"strong": 0.1, "weak": 1.0} if world == "language" else {"strong": 0.9, "weak": 0.0}
    # Its solutions a token per character: at 400 steps, the language world's seed 0 solved 0.76 alone, and the
    # reverse pairing's seeds 4 and 6 0.63 and 0.71, about as many as the weak model.
    steps = {"language": 600, "two-reverse": 800}.get(world if world == "language" else tokenizers, 400)
    tandem.sft(strong, toks["strong"], train, steps=steps, batch_size=32, lr=3e-3, marker_frac=marker_frac["strong"],
               seed=seed, name="sft strong", asking=asking)
    tandem.sft(weak, toks["weak"], [p for p in train if taught_to_weak(p)], steps=300, batch_size=32, lr=3e-3,
               marker_frac=marker_frac["weak"], seed=seed + 1, name="sft weak", asking=asking)
    weak.requires_grad_(False)
    warm_start = {k: v.clone() for k, v in strong.state_dict().items()}

    new_tokens, rule = (40, tandem.draw_rule("word", 32, toks, "cpu")) if spaced else (24, None)
    new_tokens = 32 if world == "language" else new_tokens  # "3 plus 4 is 7\n#### 7", a token per character

    def evaluate():
        return tandem.evaluate(strong, weak, toks, test, 0.5, max_new_tokens=new_tokens, batch_size=200, seed=seed,
                               rule=rule, asking=asking)

    results = {"warm-start": evaluate()}
    for arm, handoff_prob in [("tandem RL (handoff 0.5)", 0.5), ("plain RL (handoff 0)", 0.0)][:2 if plain else 1]:
        strong.load_state_dict(warm_start)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        # Two tokenizers: half the step. At 5e-4 the strong model alone collapsed on seeds 3 and 5 of "two" and 0
        # of the reverse (0.00, 0.43, 0.01) while the pair held; at 2.5e-4 the same seeds kept 0.97, 0.72, 1.00.
        lr = 5e-4 if tokenizers == "one" else 2.5e-4
        optimizer = torch.optim.AdamW(strong.parameters(), lr=lr, weight_decay=0.0)
        grpo = ["--baseline", "mean", "--scale-rewards", "group", "--batch-size", "8", "--mini-batch-size", "4"]
        samples = 8 if algo == "grpo" else samples
        args = tandem.parse_args(["--handoff-prob", str(handoff_prob), "--max-new-tokens", str(new_tokens),
                                  "--temperature", "1.0", "--micro-batch-size", "64", "--coins", coins,
                                  "--samples-per-prompt", str(samples), *(grpo if algo == "grpo" else [])])
        for _ in range(updates):
            tandem.rl_step(strong, pool(weak, toks, rule), optimizer, rng.sample(train, 64 // samples), args,
                           asking=asking)
        results[arm] = evaluate()

    print(f"\ntoy world, {world}, {algo}, {tokenizers} tokenizer{'s' if spaced else ''}, seed {seed}, {coins} coins, "
          f"{64 // samples} prompts x {samples}: greedy, {len(test)} test problems ({time.time() - start_time:.0f}s)")
    print(f"{'':24s} {'strong alone':>12s} {'tandem 0.5':>10s} {'weak alone':>10s} {'marker':>7s} {'weak NLL':>8s}")
    for name, r in results.items():
        print(f"{name:24s} {r['strong_accuracy']:12.3f} {r['tandem_accuracy']:10.3f} {r['weak_accuracy']:10.3f} "
              f"{r['strong_marker_rate']:7.2f} {r['weak_nll']:8.3f}")
    return results


@pytest.mark.parametrize("tokenizers", ["one", "two", "two-reverse"])
def test_tandem_training_removes_jargon_and_plain_rl_does_not(tokenizers):
    """Both halves of the paper's claim, on toy_world: tandem training makes the strong model drop the annotations and
    write text the weak one can continue, while it stays above the weak model alone; plain RL leaves the annotations
    in place. TANDEM_TOY_SEED picks another seed; TANDEM_TOY_COINS=batch shares the coins over the batch,
    TANDEM_TOY_SAMPLES=4 makes the same 64 rollouts 16 prompts x 4, TANDEM_TOY_ALGO=grpo runs the follow-up's GRPO
    (README). Seeds 0 to 7 (torch 2.13.0 CPU, 2 threads of an AMD EPYC): the warm-start's strong alone, pair and weak
    alone accuracies and weak NLL | after tandem RL: strong alone, pair, weak NLL | with one tokenizer, plain RL's
    pair; jargon 0.98 or more at every warm-start and after every plain RL arm, 0.00 after every tandem one. Two
    tokenizers: "two", a SentencePiece-style strong model; "two-reverse", a SentencePiece-style partner with merges
    (the strong warm-start 800 steps); both at RL's learning rate 2.5e-4 (toy_world).

    seed    one tokenizer                                 two
       0    0.97 0.49 0.67 4.3 | 0.84 0.80 0.5 | 0.52     0.96 0.25 0.59 4.0 | 0.96 0.82 0.3
       1    0.99 0.34 0.56 4.6 | 0.96 0.67 0.7 | 0.35     0.94 0.20 0.58 4.1 | 0.98 0.74 0.4
       2    1.00 0.32 0.51 4.7 | 0.96 0.66 0.6 | 0.30     0.93 0.20 0.56 4.3 | 0.97 0.80 0.2
       3    1.00 0.28 0.46 4.9 | 0.80 0.60 0.8 | 0.28     0.86 0.24 0.47 3.9 | 0.97 0.70 0.4
       4    1.00 0.31 0.41 4.7 | 1.00 0.62 0.8 | 0.28     1.00 0.18 0.57 4.7 | 1.00 0.81 0.3
       5    0.93 0.35 0.54 4.7 | 0.88 0.64 0.7 | 0.35     0.94 0.17 0.43 4.4 | 0.72 0.56 0.7
       6    0.91 0.37 0.52 4.5 | 0.89 0.68 0.5 | 0.33     0.96 0.15 0.55 3.7 | 0.95 0.85 0.3
       7    1.00 0.40 0.59 4.5 | 0.87 0.73 0.7 | 0.41     0.98 0.17 0.57 4.1 | 0.85 0.74 0.3

    seed    two-reverse
       0    1.00 0.20 0.59 5.5 | 1.00 0.70 1.0
       1    1.00 0.20 0.60 5.7 | 1.00 0.71 1.1
       2    1.00 0.18 0.56 5.1 | 0.97 0.64 0.9
       3    1.00 0.19 0.61 5.0 | 0.99 0.80 0.9
       4    1.00 0.19 0.67 4.9 | 1.00 0.78 0.8
       5    1.00 0.24 0.64 4.9 | 0.95 0.71 0.9
       6    1.00 0.23 0.64 4.9 | 1.00 0.73 0.8
       7    1.00 0.17 0.61 5.1 | 0.99 0.75 0.7

    At the one-tokenizer world's 5e-4 the strong model alone collapsed on 3 seeds of 16 ("two" 3: 0.00, 5: 0.43;
    reverse 0: 0.01; at 2.5e-4 0.97, 0.72, 1.00) while the pair held. The step, not the handoff rule: with the set-aside
    actions out of the loss it still collapsed (reverse 0: 0.015); the same partner sharing one tokenizer did not
    (1.00). Across tokenizers the warm-started pair starts lower (reverse 0: 0.195, one tokenizer with the same
    partner: 0.415): fewer rollouts are rewarded at first.
    """
    results = toy_world(tokenizers, int(os.environ.get("TANDEM_TOY_SEED", "0")),
                        os.environ.get("TANDEM_TOY_COINS", "row"), int(os.environ.get("TANDEM_TOY_SAMPLES", "2")),
                        tokenizers == "one", algo=os.environ.get("TANDEM_TOY_ALGO", "reinforce"))
    start, tandem_rl = results["warm-start"], results["tandem RL (handoff 0.5)"]
    plain_rl = results.get("plain RL (handoff 0)")
    weak_alone = start["weak_accuracy"]  # the weak model is frozen: the same in every row
    # Each margin below is half the smallest that seeds 0 to 7 showed, with one tokenizer and with two (docstring).
    # The warm-start speaks jargon, and alone it solves more sums than the weak model does.
    assert start["strong_marker_rate"] > 0.45 and start["strong_accuracy"] > weak_alone + 0.15
    # Tandem training: the jargon goes, the pair gets better together, the weak model finds the strong model's
    # solutions likelier, and the strong model alone stays above the weak one alone.
    assert tandem_rl["strong_marker_rate"] < start["strong_marker_rate"] - 0.45
    assert tandem_rl["tandem_accuracy"] > start["tandem_accuracy"] + 0.14
    assert tandem_rl["weak_nll"] < start["weak_nll"] / 2.5
    assert tandem_rl["strong_accuracy"] > weak_alone + 0.08
    # Plain RL (one tokenizer; the suite's time): the same number of updates leaves the jargon, and the pair worse off
    # than tandem RL makes it.
    if plain_rl is not None:
        assert plain_rl["strong_marker_rate"] > tandem_rl["strong_marker_rate"] + 0.45
        assert plain_rl["tandem_accuracy"] < tandem_rl["tandem_accuracy"] - 0.1


def test_tandem_training_in_the_language_world():
    """The paper's second experiment, on toy_world's language world: the weak partner writes language B, the strong
    model was warm-started in A (10% B). Seeds 0 to 7 (as the jargon test's): the warm-start's strong alone, pair and
    weak alone accuracies and weak NLL | after tandem RL: the share of the strong model's solutions in B, strong
    alone, pair, weak NLL | after plain RL: B, pair; B was 0.00 at every warm-start.

       0    1.00 0.56 0.66 5.2 | 1.00 0.88 0.78 0.2 | 0.00 0.53
       1    1.00 0.54 0.54 4.9 | 1.00 0.84 0.77 0.5 | 0.00 0.57
       2    0.97 0.59 0.52 5.3 | 1.00 0.81 0.62 0.4 | 0.00 0.56
       3    0.94 0.55 0.55 4.8 | 1.00 0.97 0.65 0.4 | 0.00 0.52
       4    1.00 0.54 0.55 5.2 | 0.00 0.88 0.66 1.4 | 0.00 0.57
       5    1.00 0.46 0.46 5.2 | 1.00 0.90 0.52 0.6 | 0.00 0.43
       6    1.00 0.48 0.49 4.7 | 1.00 0.80 0.64 0.5 | 0.00 0.46
       7    1.00 0.55 0.59 4.9 | 1.00 0.59 0.60 0.5 | 0.00 0.49

    Tandem RL moved the strong model to B on 7 seeds of 8 (not seed 4, which became legible in A: NLL 5.2 to 1.4)
    and kept it above its partner alone on 7 (seed 7: level): research outcomes, reported, not asserted. Asserted,
    with half the smallest margin seen: the premise, the weak model's NLL falling, plain RL staying in A, and the
    pair after tandem RL above the pair after plain RL. TANDEM_TOY_SEED picks another seed."""
    results = toy_world("one", int(os.environ.get("TANDEM_TOY_SEED", "0")), world="language")
    start, tandem_rl, plain_rl = results.values()
    assert start["strong_marker_rate"] < 0.5 and start["strong_accuracy"] > start["weak_accuracy"] + 0.15
    assert tandem_rl["weak_nll"] < start["weak_nll"] / 1.8
    assert plain_rl["strong_marker_rate"] < 0.5
    assert tandem_rl["tandem_accuracy"] > plain_rl["tandem_accuracy"] + 0.03


# The pool's toy world: four partners taught different sums (2 layers, plain solutions, 300 steps), D held out
TAUGHT = {"A": lambda a, b: b <= 4, "B": lambda a, b: a <= 4, "C": lambda a, b: a + b <= 9, "D": lambda a, b: b >= 5}


@pytest.mark.skipif(not os.environ.get("TANDEM_TOY_POOL"), reason="an experiment (about 100 s): TANDEM_TOY_POOL=1")
def test_a_pool_in_the_toy_world(capsys):
    """Issue "a pool of weak partners"'s question: from one warm-start (toy_world's jargon world, one tokenizer), 80
    REINFORCE updates with partner A alone and with the pool A, B, C; each strong model then read by every partner,
    D held out. The figures are printed, not asserted; the suite's pool tests check the mechanics. Seeds 0 to 3
    (torch 2.13.0 CPU, 2 threads of an AMD EPYC), the held-out D's pair, A alone / the pool: 0.55 / 0.52, 0.63 / 0.60,
    0.68 / 0.68, 0.56 / 0.68; its NLL 0.99 / 0.88, 0.98 / 1.03, 0.72 / 0.69, 0.76 / 0.71."""
    seed = int(os.environ.get("TANDEM_TOY_SEED", "0"))
    train, test = toy_problems(4000, seed, "{a}+{b}?"), toy_problems(200, seed + 1000, "{a}+{b}?")
    chars = make_tokenizer([format_prompt("") + " #### <<>>"], vocab_size=285)
    shape = dict(n_embd=64, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    strong = make_model(None, chars, n_layer=3, seed=seed, **shape)
    tandem.sft(strong, chars, train, steps=400, batch_size=32, lr=3e-3, marker_frac=0.9, seed=seed, name="sft strong")
    partners = {}
    for i, (name, taught) in enumerate(TAUGHT.items()):
        weak = make_model(None, chars, n_layer=2, seed=seed + 1 + i, **shape)
        tandem.sft(weak, chars, [p for p in train if taught(*terms(p))], steps=300, batch_size=32, lr=3e-3,
                   marker_frac=0.0, seed=seed + 1 + i, name=f"sft {name}")
        partners[name] = tandem.Partner(name, weak.requires_grad_(False), both(chars))
    warm_start = {k: v.clone() for k, v in strong.state_dict().items()}
    def read_by_all():
        return {name: tandem.evaluate(strong, p.model, both(chars), test, 0.5, max_new_tokens=24, batch_size=200,
                                      seed=seed) for name, p in partners.items()}
    results = {"warm-start": read_by_all()}
    for arm, names in [("one partner (A)", ["A"]), ("pool (A, B, C)", ["A", "B", "C"])]:
        strong.load_state_dict(warm_start)
        torch.manual_seed(seed)
        rng = random.Random(seed)
        optimizer = torch.optim.AdamW(strong.parameters(), lr=5e-4, weight_decay=0.0)
        args = tandem.parse_args(["--max-new-tokens", "24", "--temperature", "1.0", "--micro-batch-size", "64"])
        for _ in range(80):
            metrics = tandem.rl_step(strong, [partners[n] for n in names], optimizer, rng.sample(train, 32), args)
        assert set(metrics["reward_by_partner"]) == set(names)
        results[arm] = read_by_all()
    with capsys.disabled():
        print(f"\npool toy world, seed {seed}: by partner, its accuracy alone, the pair's, its NLL (D held out)")
        for arm, by in results.items():
            cells = " | ".join(f"{n} {r['weak_accuracy']:.2f} {r['tandem_accuracy']:.2f} {r['weak_nll']:.2f}"
                               for n, r in by.items())
            print(f"{arm:16s} strong {by['A']['strong_accuracy']:.2f} jargon {by['A']['strong_marker_rate']:.2f} | "
                  + cells)


# LoRA and QLoRA (peft)


def adapted(model, seed=0):  # `model` with LoRA adapters (rank 4), their B made nonzero so that they change its logits
    pytest.importorskip("peft")
    adapters = tandem.with_adapters(model, tandem.parse_args(["--lora-rank", "4", "--lora-alpha", "8"]))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return adapters


def test_lora_trains_the_adapters_and_leaves_the_base(pair, monkeypatch):
    """The trainable weights are the adapters alone; a warm-start step and an RL step move them, not the base."""
    model = make_model(None, pair.tok, n_layer=2, seed=1, family=pair.family)
    adapters = adapted(model)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert any(p.requires_grad for p in model.parameters()) and not model.get_output_embeddings().weight.requires_grad
    def frozen():
        return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    def trained():
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base, lora = frozen(), trained()
    tandem.sft(model, pair.tok, toy_problems(16), steps=2, batch_size=8, lr=1e-2, marker_frac=1.0, seed=0)
    after_sft = trained()
    args = pool_args("--lr", "1e-2", "--baseline", "none")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    monkeypatch.setattr(tandem, "reward", lambda completion, problem, task: 1.0)  # every rollout moves the adapters
    tandem.rl_step(model, pool(pair.weak, both(pair.tok)), optimizer, toy_problems(4), args)
    assert all(torch.equal(base[n], p) for n, p in frozen().items())
    assert any(not torch.equal(lora[n], after_sft[n]) for n in lora)
    assert any(not torch.equal(after_sft[n], p) for n, p in trained().items())
    assert adapters.get_base_model() is model


def test_the_decoder_with_adapters_equals_generate_and_uncached_forwards(pair):
    """The decoder calls the body (base_model) and the output layer apart: with adapters in the body, greedy tandem
    decoding at handoff 0 is still the adapted model's own generate, and at 0.5 its logits are uncached forwards'."""
    tiny = pair
    strong = copy.deepcopy(tiny.strong)
    adapters = adapted(strong)
    prompts = left_padded(tiny.tok, PROMPTS)
    ids, attn = prompts["strong"]
    with torch.no_grad():
        assert not torch.allclose(strong(ids, attention_mask=attn).logits, tiny.strong(ids, attention_mask=attn).logits)
    expected = hf_greedy(adapters, ids, attn, 16, tiny.tok.eos_token_id)
    got = tandem_generate(strong, tiny.weak, prompts, 0.0, 16, 0.0, tiny.tok.eos_token_id)
    assert torch.equal(got.tokens, expected[:, :got.tokens.shape[1]])
    with_adapters = Namespace(strong=strong, weak=tiny.weak)
    torch.manual_seed(0)
    got, logits = decode_recording_logits(with_adapters, prompts, 0.5, 16, 1.0, -1)
    assert_logits_are_uncached(with_adapters, prompts, got, logits, atol=1e-5)


def test_the_kl_reference_through_disabled_adapters_is_the_warm_start(tiny):
    """No second copy: the base with the adapters off gives the warm-start's log-probs; with them on, others."""
    strong = copy.deepcopy(tiny.strong)
    adapters = adapted(strong)
    prompt, roll = rollout_for_loss(tiny)
    rows = [torch.arange(4)]
    def logp(model):
        return tandem.logprobs_of(model, prompt, roll, rows, 1.0, 4, None, tandem.nullcontext())
    with adapters.disable_adapter():
        off = logp(strong)
    assert torch.allclose(off, logp(tiny.strong), atol=1e-6) and not torch.allclose(logp(strong), off, atol=1e-3)
    # rl_step takes it so: a step with the KL term alone (no reward) has a gradient back toward the base
    args = pool_args("--kl-coef", "1.0", "--baseline", "none", "--lora-rank", "4")
    optimizer = torch.optim.SGD([p for p in strong.parameters() if p.requires_grad], lr=0.0)
    metrics = tandem.rl_step(strong, pool(tiny.weak, both(tiny.tok)), optimizer, toy_problems(2), args,
                             reference=adapters)
    assert metrics["grad_norm"] > 0


def test_cli_with_lora_checkpoints_the_adapters_resumes_and_saves_merged_weights(warm, tmp_path, capsys):
    """--lora-rank: checkpoint.pt holds the adapters and AdamW's state only; a run resumed from it ends with the
    weights of one never stopped; final/ is merged weights plain transformers loads, equal in logits to the warm-start
    with the saved adapters (adapters/, for peft)."""
    peft = pytest.importorskip("peft")
    data = write_data(tmp_path / "gsm8k")
    def run(out, *more):
        return run_main(capsys, tandem, "--strong", warm / "strong", "--weak", warm / "weak", "--data", data,
                        "--out", out, "--sft-steps", "2", "--weak-sft-steps", "0", "--lora-rank", "4", "--lr", "1e-2",
                        "--batch-size", "4", "--max-new-tokens", "12", "--temperature", "1.0", "--steps", "3",
                        "--save-every", "2", "--eval-every", "0", "--baseline", "none", "--device", "cpu", *more)
    run(tmp_path / "whole")
    run(tmp_path / "resumed")
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["model"] and all("lora_" in name for name in state["model"])
    shutil.rmtree(tmp_path / "resumed" / "final")
    assert "resuming after step 2" in run(tmp_path / "resumed", "--resume")
    whole, resumed = (tandem.AutoModelForCausalLM.from_pretrained(tmp_path / name / "final").eval()
                      for name in ["whole", "resumed"])
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    def warm_start():
        return tandem.AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "sft" / "strong").eval()
    with_adapters = peft.PeftModel.from_pretrained(warm_start(), tmp_path / "whole" / "adapters").eval()
    ids = torch.arange(3, 13)[None]
    with torch.no_grad():
        assert torch.allclose(whole(ids).logits, with_adapters(ids).logits, atol=1e-5)
        assert not torch.allclose(whole(ids).logits, warm_start()(ids).logits, atol=1e-4)


def test_lora_without_peft_and_4_bit_on_a_cpu_are_one_line(tiny, tmp_path, capsys, monkeypatch):
    argv = ["--strong", tiny.root / "strong", "--weak", tiny.root / "weak", "--data", write_data(tmp_path / "d"),
            "--out", tmp_path / "run", "--sft-steps", "0", "--max-new-tokens", "8", "--device", "cpu"]
    assert "needs a CUDA GPU and bitsandbytes" in usage_error(capsys, tandem, argv + ["--lora-rank", "4",
                                                                                        "--load-in-4bit"])
    assert "--load-in-4bit needs --lora-rank" in usage_error(capsys, tandem, argv + ["--load-in-4bit"])
    monkeypatch.setitem(sys.modules, "peft", None)  # as if it were not installed
    assert "pip install peft" in usage_error(capsys, tandem, argv + ["--lora-rank", "4"], alone=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# -----------------------------------------------------------------------------
# Plumbing: loading, bad input, resuming, several processes


def test_a_model_that_rescales_its_logits_is_refused(tiny, tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    eos = tiny.tok.eos_token_id
    config = Gemma2Config(vocab_size=len(tiny.tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=12, final_logit_softcapping=1.0,
                          bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "gemma2")
    tiny.tok.save_pretrained(tmp_path / "gemma2")
    with pytest.raises(tandem.UsageError, match="rescales its logits after its output layer"):
        load_pair(str(tmp_path / "gemma2"), str(tiny.root / "weak"))


def test_tokenizers_that_agree_are_one_and_others_must_give_back_text_before_any_weights_load(tiny, tmp_path):
    tokenizers, strong, weak = load_pair(str(tiny.root / "strong"), str(tiny.root / "weak"))
    assert tokenizers["weak"] is tokenizers["strong"]  # the fast path: the models pass token ids
    strong_tok = tokenizers["strong"]
    assert strong_tok.padding_side == "left" and strong_tok.pad_token == strong_tok.eos_token
    # A SentencePiece tokenizer that puts "▁" (a space) before every piece it encodes can't read a partner's text.
    prefixing = make_sp_tokenizer(prepend_scheme="always")
    prefixing.save_pretrained(tmp_path / "prefixing")
    shutil.copy(tiny.root / "weak" / "config.json", tmp_path / "prefixing")  # a model folder without weights
    with pytest.raises(tandem.UsageError, match="changes a piece of text it encodes"):
        load_pair(str(tiny.root / "strong"), str(tmp_path / "prefixing"))


def usage_error(capsys, module, argv, alone=True):
    """Run a CLI in-process as its __main__ does; it must exit with code 2 and end with one line
    on stderr. Before the run starts (`alone`), that line must be all there is."""
    capsys.readouterr()  # forget what came before
    with pytest.raises(SystemExit) as exit:
        tandem.run_cli(lambda: module.main([str(a) for a in argv]))
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]
    assert exit.value.code == 2 and last.startswith("error: ") and "Traceback" not in err, err
    assert err == last + "\n" or not alone, err
    return last


@pytest.fixture(scope="module")
def bad_inputs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    make_model(root / "other", make_sp_tokenizer(prepend_scheme="always"), n_layer=1, seed=4)  # can't read a partner
    (root / "malformed.jsonl").write_text(json.dumps(GSM8K_SAMPLES[0]) + "\n{not json\n")
    (root / "no_answer.jsonl").write_text(json.dumps({"question": "What is 1 plus 1?"}) + "\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "empty_folder").mkdir()
    (root / "latin1.jsonl").write_bytes('{"question": "caf\xe9?", "answer": "#### 1"}\n'.encode("latin-1"))
    (root / "broken_model").mkdir()  # a model folder whose weights file is damaged
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tiny.root / "strong" / name, root / "broken_model")
    (root / "broken_model" / "model.safetensors").write_bytes(b"not safetensors")
    (root / "train_rows_only").mkdir()
    (root / "train_rows_only" / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train"}) + "\n")
    return root


BAD_INPUTS = [  # (flags, what the error must say), by class: missing, the wrong kind of thing, unreadable, out of range
    (["--strong", "{root}/missing"], "cannot load model"),
    (["--strong", "no-such-org/no-such-model"], "offline: a hub name needs a network"),
    (["--strong", "{root}/empty_folder"], "not a model folder (it has no config.json)"),
    (["--weak", "{root}/malformed.jsonl"], "not a model folder"),
    (["--strong", "{root}/broken_model"], "cannot load model"),
    (["--weak", "{root}/other"], "changes a piece of text it encodes"),
    (["--data", "{root}/missing.jsonl"], "missing.jsonl: No such file or directory"),
    (["--data", "{root}/empty_folder"], ".jsonl: No such file or directory"),
    (["--data", "{root}/malformed.jsonl"], "line 2: Expecting property name"),
    (["--data", "{root}/latin1.jsonl"], "'utf-8' codec can't decode"),
    (["--data", "{root}/no_answer.jsonl"], "line 1: needs string fields 'question' and 'answer'"),
    (["--data", "{root}/empty.jsonl"], "no problems"),
    (["--handoff-prob", "1.5"], "argument --handoff-prob: must be from 0 to 1, got 1.5"),
    (["--temperature", "-1"], "argument --temperature: must be at least 0, got -1"),
    (["--max-new-tokens", "many"], "argument --max-new-tokens: invalid int value: 'many'"),
    (["--weak-prompt", "{root}/missing.txt"], "--weak-prompt"),
    (["--weak-prompt", "{root}/empty_folder"], "Is a directory"),
    (["--weak-prompt", "{root}/malformed.jsonl", "--max-new-tokens", "90"], "exceed the weak model's 128 positions"),
]


TANDEM_ONLY = [
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--samples-per-prompt", "1"], "leave-one-out baseline needs --samples-per-prompt 2 or more"),
    (["--weak-token-weight", "-1"], "argument --weak-token-weight: must be at least 0"),
    (["--max-new-tokens", "16", "--out", "{root}/malformed.jsonl"], "malformed.jsonl: File exists"),  # once loaded
    (["--unknown-flag"], "unrecognized arguments: --unknown-flag"),
    (["--temperature", "0"], "--temperature 0 samples greedily"),
    (["--batch-size", "4", "--mini-batch-size", "3"], "does not split into mini-batches of 3"),
    (["--scale-rewards", "group", "--samples-per-prompt", "1", "--baseline", "none"], "a group of one has no spread"),
]


EVAL_ONLY = [
    (["--limit", "0"], "argument --limit: must be at least 1"),
    (["--curve", "0,half"], "argument --curve: invalid curve value: '0,half'"),
    (["--json", "{root}/missing/eval.json"], "its folder does not exist"),
    (["--plot", "{root}/missing"], "missing: no metrics.jsonl there"),
    (["--plot", "{root}/train_rows_only"], "has no evaluation rows"),
    (["--samples", "2"], "--samples above 1 needs --temperature above 0"),
    (["--pass-at", "3", "--samples", "2", "--temperature", "1"], "--pass-at 3 needs --samples 3 or more"),
]


@pytest.mark.parametrize("flags, message", BAD_INPUTS + TANDEM_ONLY)
def test_tandem_bad_input_is_one_line_and_writes_nothing(tiny, bad_inputs, tmp_path, capsys, flags, message):
    data = write_data(tmp_path / "gsm8k")
    argv = ["--strong", tiny.root / "strong", "--weak", tiny.root / "weak", "--data", data, "--out", tmp_path / "run",
            "--sft-steps", "0", "--steps", "1", "--device", "cpu"]
    err = usage_error(capsys, tandem, argv + [f.format(root=bad_inputs) for f in flags],
                      alone=not any(late in message for late in ["128 positions", "File exists"]))
    assert message in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", BAD_INPUTS + EVAL_ONLY)
def test_eval_bad_input_is_one_line(tiny, bad_inputs, tmp_path, capsys, flags, message):
    data = write_data(tmp_path / "gsm8k")
    argv = ["--strong", tiny.root / "strong", "--weak", tiny.root / "weak", "--data", data, "--device", "cpu",
            "--json", tmp_path / "eval.json"]
    err = usage_error(capsys, evaluation, argv + [f.format(root=bad_inputs) for f in flags],
                      alone="128 positions" not in message)
    assert message in err
    assert not (tmp_path / "eval.json").exists()


def test_a_killed_run_resumes_to_the_same_result(warm, tmp_path, capsys):
    """A run killed with SIGKILL and then resumed has every step in metrics.jsonl once, and ends with
    the weights of a run that was never interrupted."""
    data = write_data(tmp_path / "gsm8k")
    steps = 24

    def flags(out, *more):
        return ["--strong", str(warm / "strong"), "--weak", str(warm / "weak"), "--data", str(data),
                "--out", str(out), "--sft-steps", "0", "--lr", "1e-3", "--batch-size", "4", "--max-new-tokens", "16",
                "--temperature", "1.0", "--steps", str(steps), "--save-every", "3", "--eval-every", "0",
                "--device", "cpu", *more]

    def run(out, *more):
        return run_main(capsys, tandem, *flags(out, *more))

    def train_steps(out):
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [r["step"] for r in rows if r["kind"] == "train"]

    run(tmp_path / "whole")
    whole = tandem.AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final").state_dict()

    killed = tmp_path / "killed"
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell has it
    proc = subprocess.Popen([sys.executable, str(HERE / "tandem.py"), *flags(killed)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=buffered)
    while not ((killed / "metrics.jsonl").exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 5):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.01)
    proc.kill()
    printed = proc.communicate(timeout=60)[0]
    assert 5 <= len(train_steps(killed)) < steps and not (killed / "final").exists()
    assert f"step 4/{steps} |" in printed  # progress reaches a pipe or a log as it is made, not at the end
    assert "holds a started run: add --resume" in usage_error(capsys, tandem, flags(killed))

    assert "resuming after step" in run(killed, "--resume")
    assert train_steps(killed) == list(range(1, steps + 1))  # no step lost, none twice
    final = tandem.AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    assert all(torch.equal(whole[k], final[k]) for k in whole)
    tandem.main(flags(killed, "--resume"))
    assert "nothing to resume" in capsys.readouterr().out
    assert "holds a finished run" in usage_error(capsys, tandem, flags(killed))


def test_resume_goes_on_when_the_metrics_file_is_gone(warm, tmp_path, capsys):
    data, out = write_data(tmp_path / "gsm8k"), tmp_path / "run"
    flags = ["--strong", warm / "strong", "--weak", warm / "weak", "--data", data, "--out", out, "--sft-steps", "0",
             "--batch-size", "4", "--max-new-tokens", "8", "--temperature", "1.0", "--eval-every", "0",
             "--save-every", "1", "--device", "cpu"]
    run_main(capsys, tandem, *flags, "--steps", "2")
    shutil.rmtree(out / "final")
    (out / "metrics.jsonl").unlink()
    assert "resuming after step 2" in run_main(capsys, tandem, *flags, "--steps", "3", "--resume")
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [3]


@pytest.mark.parametrize("module", [tandem, evaluation])
def test_help_shows_every_flags_default(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    flags = [line for line in capsys.readouterr().out.split("\n  -")[1:] if not line.startswith("h, --help")]
    assert len(flags) > 20 and all("(default: " in " ".join(f.split()) for f in flags), flags


def test_a_logged_row_is_in_the_file_at_once(tmp_path):
    """A run killed at any moment has lost no row it logged: each is in metrics.jsonl before the next step."""
    _, log = tandem.resume(str(tmp_path), None, None, None, rank=0, resuming=False)
    log({"step": 1, "kind": "train"})
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "kind": "train"}\n'


def half_batch_gradients(rank, folder):
    """One of two gloo processes: for each advantage vector, the REINFORCE gradient of its half of the
    batch, added up over both processes by tandem.sum_gradients."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=60))  # a rank left waiting fails the test
    model = tandem.AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    ids, attn, tokens, from_weak, mask, advantages = torch.load(folder / "batch.pt")
    half = slice(2 * rank, 2 * rank + 2)
    roll = Rollout(tokens[half], from_weak[half], mask[half])
    gradients = []
    for a in advantages:
        model.zero_grad(set_to_none=True)
        policy_gradient(model, (ids[half], attn[half]), roll, a[half], 0.7, micro_batch_size=1)
        tandem.sum_gradients(model)
        gradients.append(grads(model))
    torch.save(torch.stack(gradients), folder / f"grad{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_processes_add_up_to_the_whole_batch_gradient(tiny, tmp_path):
    """Each process's loss is its share of the whole batch's, and one all-reduce adds up the gradients
    after the micro-batches: two processes with half the rollouts each get the one-process gradient.
    In the second batch, rank 1 has nothing to learn from and still joins."""
    prompt, roll = rollout_for_loss(tiny)
    ids, attn = prompt
    advantages = torch.tensor([[1.0, -0.5, 0.25, 2.0], [1.0, -0.5, 0.0, 0.0]])
    whole = [gradient_of(tiny.strong, prompt, roll, a, 0.7, micro_batch_size=4) for a in advantages]
    tiny.strong.save_pretrained(tmp_path / "model")
    torch.save((ids, attn, roll.tokens, roll.from_weak, roll.mask, advantages), tmp_path / "batch.pt")
    torch.multiprocessing.spawn(half_batch_gradients, args=(tmp_path,), nprocs=2)
    for rank in range(2):
        got = torch.load(tmp_path / f"grad{rank}.pt")
        for g, w in zip(got, whole):
            assert w.abs().max() > 0 and torch.allclose(g, w, atol=1e-6)


@pytest.mark.parametrize("weak", ["one", "pool"])
def test_torchrun_with_two_processes(weak, warm, warm_across, tmp_path):
    """torchrun, 2 CPU processes (gloo): the warm-start on both and rank 0's weights shared, rank 0 alone
    printing and writing the metrics, every step once with the whole batch's rollouts, and a final model
    that RL changed. The run is then resumed from its checkpoint at step 2 (as if it had died after it):
    the same metrics and final weights again, so every process's sampling went on where it stopped. With one
    partner; and with a pool of two (one that shares the strong model's tokenizer, one of another) and LoRA
    adapters, whose gradients alone the all-reduce adds up."""
    data, out = write_data(tmp_path / "gsm8k"), tmp_path / "run"
    partners = ["--weak", str(warm / "weak")]
    if weak == "pool":
        pytest.importorskip("peft")
        partners += ["--weak", str(warm_across / "strong"), "--lora-rank", "4", "--lora-alpha", "64"]

    def torchrun(*flags):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(HERE / "tandem.py"), "--strong", str(warm / "strong"), *partners,
               "--data", str(data), "--out", str(out), "--sft-steps", "10", "--sft-lr", "1e-3", "--lr", "1e-3",
               "--batch-size", "8", "--max-new-tokens", "16", "--temperature", "1.0", "--steps", "3",
               "--save-every", "2", "--eval-every", "2", "--eval-limit", "4", "--baseline", "none", "--device", "cpu",
               *flags]
        # --baseline none: every rewarded rollout moves the weights, so a change is sure to show in 3 updates
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr
        return run.stdout

    def metrics():  # its rows, less the wall times
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    stdout = torchrun()
    assert stdout.count("step 1/3 ") == 1  # printed by rank 0 only
    rows = metrics()
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval" and r["partner"] == "weak"] == [0, 2, 3]
    assert all(r["rollouts"] == 8 * 2 for r in rows if r["kind"] == "train")  # --batch-size prompts x 2, not per rank
    assert {name for r in rows if r["kind"] == "train" for name in r["reward_by_partner"]} == (
        {"weak", "weak-1"} if weak == "pool" else {"weak"})
    assert any(r["reward"] > 0 for r in rows if r["kind"] == "train")
    final = tandem.AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    start = tandem.AutoModelForCausalLM.from_pretrained(out / "sft" / "strong").state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in final)

    shutil.rmtree(out / "final")
    assert "resuming after step 2" in torchrun("--resume")
    # The same rows to the last digit: each rank's rollouts (their author draws set weak_frac) went on as before.
    assert metrics() == rows
    resumed = tandem.AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


# -----------------------------------------------------------------------------
# eval.py


def test_flexible_answer():
    assert evaluation.flexible_answer("so she pays $1,200.00 in total.") == "1200"
    assert evaluation.flexible_answer("#### 5 then 6") == "6"
    assert evaluation.flexible_answer("no numbers") is None


def test_pass_at_k_by_hand(tiny, tmp_path, capsys):
    """Chen et al.'s estimator on counts by hand, then eval.py --samples: pass@k for each model alone and the pair."""
    assert evaluation.pass_at_k(4, 1, 1) == 0.25 and evaluation.pass_at_k(4, 1, 2) == 0.5  # 1 - C(3, 2) / C(4, 2)
    assert evaluation.pass_at_k(4, 0, 3) == 0 and evaluation.pass_at_k(4, 2, 3) == 1  # n - c < k: some sample is right
    data = write_data(tmp_path / "gsm8k", n_test=3)
    stdout = run_main(capsys, evaluation, "--strong", tiny.root / "strong", "--weak", tiny.root / "weak",
                      "--data", data, "--samples", "4", "--pass-at", "1,4", "--temperature", "1.0",
                      "--max-new-tokens", "6",
                      "--device", "cpu", "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 12 and "3 problems x 4 samples" in stdout and "pass@4" in stdout
    for key in ["strong", "weak", "tandem"]:
        at = result[f"{key}_pass_at"]
        assert at["1"] == pytest.approx(result[f"{key}_accuracy"]) and at["1"] <= at["4"] <= 1


def test_wilson_interval():
    for (k, n), expected in [((5, 10), [0.2366, 0.7634]), ((0, 10), [0.0, 0.2775]), ((10, 10), [0.7225, 1.0])]:
        assert all(abs(a - b) < 1e-4 for a, b in zip(evaluation.wilson(k, n), expected)), (k, n)  # published values
    for k, n in [(41, 100), (3, 200), (150, 200)]:  # the ends are where a score test at z = 1.96 just fails
        for p in evaluation.wilson(k, n):
            assert abs((k / n - p) ** 2 - 1.96 ** 2 * p * (1 - p) / n) < 1e-12


def test_eval_cli_writes_json(tiny, tmp_path, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in toy_problems(5, seed=2)) + "\n")
    (tmp_path / "prefix.txt").write_text("Question: What is 1 plus 1?\nAnswer: 1+1=2\n#### 2\n\n")
    stdout = run_main(capsys, evaluation, "--strong", tiny.root / "strong", "--weak", tiny.root / "weak",
                      "--data", data, "--limit", "4", "--max-new-tokens", "10", "--curve", "0,1", "--batch-size", "2",
                      "--examples", "1", "--json", tmp_path / "eval.json", "--device", "cpu", "--handoff-unit", "word",
                      "--weak-prompt", tmp_path / "prefix.txt")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 4
    assert {"strong_accuracy", "weak_accuracy", "tandem_accuracy", "weak_nll", "curve"} <= result.keys()
    assert "strong alone" in stdout and "[tandem, weak tokens in {}]" in stdout
    for key in ["strong", "weak", "tandem", "flexible"]:  # every accuracy's 95% interval, in the JSON and the table
        low, high = result[f"{key}_accuracy_ci"]
        assert 0 <= low <= result[f"{key}_accuracy"] <= high <= 1 and high - low > 0.3  # wide on 4 problems
        assert f"{result[f'{key}_accuracy']:.3f}  [{low:.3f}, {high:.3f}]" in stdout
    for key in ["strong", "weak", "tandem"]:  # and the marker's
        low, high = result[f"{key}_marker_rate_ci"]
        assert f"{result[f'{key}_marker_rate']:.3f}  [{low:.3f}, {high:.3f}]" in stdout
    assert all(c["ci"][0] <= c["accuracy"] <= c["ci"][1] for c in result["curve"])


def eval_row(step, jargon, strong, pair):
    return {"step": step, "kind": "eval", "n": 50, "strong_marker_rate": jargon, "strong_accuracy": strong,
            "tandem_accuracy": pair, "weak_accuracy": 0.5}


def test_plot_draws_the_runs_curves(tmp_path, capsys, monkeypatch):
    tandem_rows = [eval_row(0, 1.0, 0.8, 0.4), eval_row(10, 0.3, 0.8, 0.6), eval_row(20, 0.0, 0.78, 0.7)]
    for run, rows in [("tandem", tandem_rows),
                      ("plain", [eval_row(0, 1.0, 0.8, 0.4), eval_row(20, 1.0, 0.9, 0.42)])]:
        (tmp_path / run).mkdir()
        rows.insert(1, {"step": 1, "kind": "train", "reward": 0.5})
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--plot", tmp_path / "tandem", tmp_path / "plain", "--out", tmp_path / "curves.png"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert "pip install matplotlib" in usage_error(capsys, evaluation, argv)
    # bad input first, with or without matplotlib
    assert "no metrics.jsonl there" in usage_error(capsys, evaluation, ["--plot", tmp_path / "missing"])
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert "wrote" in run_main(capsys, evaluation, *argv)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def eval_sum(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def test_make_data_writes_word_problems_in_gsm8k_format(tmp_path, capsys):
    run_main(capsys, evaluation, "--make-data", tmp_path / "a")
    train, test = load_gsm8k("train", str(tmp_path / "a")), load_gsm8k("test", str(tmp_path / "a"))
    assert len(train) == 2000 and len(test) == 500
    questions = [p["question"] for p in test]
    assert len(set(questions)) == 500 and not set(questions) & {p["question"] for p in train}
    steps = []
    for p in train + test:
        lines = p["answer"].split("\n")
        assert lines[-1] == "#### " + extract_answer(p["answer"]) and extract_answer(p["answer"]).isdigit()
        annotations = re.findall(r"<<(\d+)([-+*/])(\d+)=(\d+)>>", p["answer"])
        assert len(annotations) == len(lines) - 1  # one annotated step a line
        for a, op, b, result in annotations:
            assert eval_sum(int(a), op, int(b)) == int(result)
        assert annotations[-1][3] == extract_answer(p["answer"])  # the last step is the answer
        assert correct(strip_jargon(p["answer"]), p["answer"]) and p["question"].endswith("have now?")
        steps.append(len(annotations))
    assert set(steps) == {1, 2, 3}
    spanish = tandem.TASKS["gsm8k-es"].marker if importlib.util.find_spec("py3langid") else None
    for example in (tmp_path / "a" / "partner-es.txt").read_text(encoding="utf-8").split("\n\n")[:-1]:
        question, answer = example.removeprefix("Question: ").split("\nAnswer:")  # as the task puts a problem
        sums = re.findall(r"(\d+)([-+*/])(\d+)=(\d+)", answer)  # the partner's examples: right, and in Spanish
        for a, op, b, c in sums:
            assert eval_sum(int(a), op, int(b)) == int(c)
        assert sums[-1][3] == extract_answer(answer)
        assert question.endswith("have now?") and (spanish is None or spanish(answer) and not spanish(question))
    run_main(capsys, evaluation, "--make-data", tmp_path / "b")
    run_main(capsys, evaluation, "--make-data", tmp_path / "c", "--seed", "1")
    assert (tmp_path / "a" / "test.jsonl").read_text() == (tmp_path / "b" / "test.jsonl").read_text()  # seeded
    assert (tmp_path / "a" / "test.jsonl").read_text() != (tmp_path / "c" / "test.jsonl").read_text()


def test_bench_parts_run_on_tiny_models(tiny):
    """eval.py --bench's parts, in this process on tiny models (the real run takes minutes):
    every decoding run and forward pass gets a time, one RL step reports its time and memory, and the random
    prompts are left-padded to 90% to 110% of the asked length."""
    args = evaluation.parse_args(["--bench", "--strong", str(tiny.root / "strong"), "--weak", str(tiny.root / "weak"),
                                  "--device", "cpu", "--batch-size", "4", "--max-new-tokens", "6", "--repeats", "1"])
    device, amp, strong, weak = evaluation.bench_setup(args)
    prompts = evaluation.random_prompts(16, 20, len(tiny.tok), device)
    ids, attn = prompts["strong"]
    lengths = attn.sum(1)
    assert lengths.min() >= 18 and lengths.max() <= 22
    assert lengths.max() == ids.shape[1] and lengths.min() < lengths.max()
    assert torch.equal(attn, attn.sort(1).values)  # padding on the left only
    four = {name: (ids[:4], attn[:4]) for name in prompts}
    times = evaluation.bench_decoding(strong, weak, four, 6, evaluation.BENCH_TEMPERATURE, 1, amp)
    assert len(times) == 6 and all(0 < t < 60 for t in times.values())
    reads = evaluation.bench_reads(strong, four, 1, amp)
    assert list(reads) == ["prefill", 1, 4] and all(0 < t < 60 for t in reads.values())
    for minis, lora in [(1, 0), (2, 0), (1, 4)]:  # one optimizer step, the follow-up's two, LoRA's
        if lora and importlib.util.find_spec("peft") is None:
            continue
        seconds, peak = evaluation.rl_step_cost(args, micro_batch_size=2, batch_size=4, minis=minis, lora=lora)
        assert 0 < seconds < 60 and peak >= 0
    # One pair with one tokenizer and with two (trained in the bench): its models' output layers cover both.
    big = [make_model(None, tiny.tok, n_layer, seed=0, vocab_size=4300) for n_layer in (2, 1)]
    across = evaluation.bench_across(*big, 4, 6, 1, amp)
    assert list(across) == ["handoff 0.5, one tokenizer", "handoff 0.5, two tokenizers", "handoff 0.5, a pool of 3"]
    assert all(0 < t < 60 for t in across.values())

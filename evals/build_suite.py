"""Build the offline evaluation suite: a tiny Llama base, four synthetic tasks, one real LoRA adapter per task.

Everything is made here, from fixed seeds, on the CPU, with no download, into the suite folder that ships
inside the package, ``mergekit_lite/evaluation/suite/`` (``SUITE`` below; its ``tasks/`` are written by hand):

* ``data/<task>/{train,test,validation}.jsonl`` — four tasks in one shared prompt format (``Q: ...`` / ``A: ...``):
  ``capitals`` (made-up country → capital facts: recall), ``add`` (two-digit + one-digit sums: carrying),
  ``reverse`` (four distinct letters backwards: attention by position) and ``sentiment`` (three made-up words
  of one polarity → good/poor: a lexicon). Test rows carry multiple-choice ``choices`` and ``label``.
* ``base/`` — a 4-layer, 128-wide Llama (0.88 M parameters, the character tokenizer of
  ``evals/fixtures.make_tokenizer``) trained briefly on *generic* text in the same format (copy a word or a
  number, its first/last letter, its length, upper-case it, digits backwards): a working language model that
  knows the format but none of the four tasks.
* ``adapters/<task>/`` — one PEFT LoRA adapter per task (rank 8, every linear layer), trained on that
  task's train file (plus a replay of the base's generic text) with few steps, so that merges of them can still
  be told apart (on a narrower 96-wide, 3-layer base, adapters trained longer interfered completely when merged).
* ``scores.json`` — the recipe, and held-out multiple-choice accuracy and answer log-likelihood of
  the base and of each adapter, measured by this script's own scorer (the sums lm-eval makes).

Run ``python evals/build_suite.py`` (about 5½ minutes of one CPU thread) to rebuild in place, or
``python evals/build_suite.py --check`` to rebuild into a temporary folder and compare with the committed files
(scores and sha256 of every file).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evals.fixtures import _quiet, _save_base, make_tokenizer  # noqa: E402

#: The suite folder shipped as package data: tasks/ (by hand) and the data/, base/, adapters/, scores.json built here.
SUITE = REPO / "mergekit_lite" / "evaluation" / "suite"
#: What `build` writes into the suite folder (and `--check` compares).
BUILT = ("data", "base", "adapters", "scores.json")
TASKS: tuple[str, ...] = ("capitals", "add", "reverse", "sentiment")
SEED = 20240611


@dataclass(frozen=True)
class Recipe:
    """Every number that decides the built files; changing one changes the suite."""

    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 384
    num_heads: int = 4
    base_steps: int = 450
    base_lr: float = 2e-3
    base_batch: int = 32
    lora_r: int = 8
    lora_alpha: int = 16
    adapter_steps: dict[str, int] = field(default_factory=lambda: {"capitals": 200, "add": 600, "reverse": 350,
                                                                    "sentiment": 120})
    adapter_lr: float = 3e-3
    adapter_batch: int = 32
    replay: int = 8
    warmup: int = 30


RECIPE = Recipe()

# ----------------------------------------------------------------------------------------------- text


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def made_up_word(rng: random.Random, syllables: tuple[int, int] = (2, 3)) -> str:
    """A pronounceable nonsense word (consonant-vowel syllables, sometimes a closing consonant)."""
    word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(*syllables)))
    return word + rng.choice(_CONSONANTS) if rng.random() < 0.4 else word


def distinct_words(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int] = (2, 3)) -> list[str]:
    """`count` new made-up words not in `taken` (which is updated)."""
    words: list[str] = []
    while len(words) < count:
        word = made_up_word(rng, syllables)
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def prompt(question: str) -> str:
    """The shared prompt format; lm-eval's task YAMLs use exactly this `doc_to_text`."""
    return f"Q: {question}\nA:"


def training_text(question: str, answer: str) -> tuple[str, str]:
    """(context, continuation) as the model is trained on them: continuation is ' ' + answer (lm-eval's delimiter)."""
    return prompt(question), " " + answer


# ---------------------------------------------------------------------------------------------- tasks


def _choices(rng: random.Random, gold: str, pool: Sequence[str], k: int = 4) -> tuple[list[str], int]:
    """The gold answer and k-1 distinct distractors from `pool`, shuffled; returns (choices, gold index)."""
    distractors = rng.sample([p for p in dict.fromkeys(pool) if p != gold], k - 1)
    choices = [gold, *distractors]
    rng.shuffle(choices)
    return choices, choices.index(gold)


def make_capitals(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Made-up country → capital facts. Recall: the test asks every fact, with three other capitals as choices."""
    taken: set[str] = set()
    countries = [w.capitalize() + rng.choice(["ia", "and", "ar", "on"]) for w in distinct_words(rng, 48, taken, (1, 2))]
    capitals = []  # all five letters (consonant-vowel-consonant-vowel-consonant): no choice is favoured by length
    while len(capitals) < 48:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2)) + rng.choice(_CONSONANTS)
        if word not in taken:
            taken.add(word)
            capitals.append(word.capitalize())
    train = [{"question": f"capital of {c}", "answer": k} for c, k in zip(countries, capitals)]
    test = []
    for country, capital in zip(countries, capitals):
        choices, label = _choices(rng, capital, capitals)
        test.append({"question": f"capital of {country}", "answer": capital, "choices": choices, "label": label})
    return train, test


def make_add(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two-digit + one-digit sums; the test pairs are never seen in training. Distractors are off by 1 or 10."""
    pairs = [(a, b) for a in range(10, 90) for b in range(1, 10)]
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:150], pairs[150:]
    train = [{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in train_pairs]
    test = []
    for a, b in test_pairs:
        s = a + b
        choices, label = _choices(rng, str(s), [str(s + d) for d in (-10, -1, 1, 10)])
        test.append({"question": f"{a}+{b}", "answer": str(s), "choices": choices, "label": label})
    return train, test


def make_reverse(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Reverse four distinct letters; test strings are unseen. Distractors are other orders of the same letters."""
    seen: set[str] = set()
    words: list[str] = []
    while len(words) < 1650:
        word = "".join(rng.sample(string.ascii_lowercase, 4))
        if word not in seen:
            seen.add(word)
            words.append(word)
    test_words, train_words = words[:150], words[150:]
    train = [{"question": f"reverse {w}", "answer": w[::-1]} for w in train_words]
    test = []
    for w in test_words:
        pool = []
        while len(set(pool)) < 3:
            p = "".join(rng.sample(w, 4))
            if p not in (w, w[::-1]):
                pool.append(p)
        choices, label = _choices(rng, w[::-1], pool)
        test.append({"question": f"reverse {w}", "answer": w[::-1], "choices": choices, "label": label})
    return train, test


def make_sentiment(rng: random.Random) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Polarity of three made-up words of one polarity (lexicon of 12 good, 12 poor); test triples are unseen."""
    # No letter of "good" or "poor" in the words: the base, which knows how to copy, has no letter to lean on.
    words: list[str] = []
    while len(words) < 24:
        word = "".join(rng.choice("bfklmnstvz") + rng.choice("aeiu") for _ in range(2))
        if word not in words:
            words.append(word)
    lexicon = {"good": words[:12], "poor": words[12:]}  # labels of one length: neither is favoured by length
    triples = [(answer, triple) for answer, pool in lexicon.items()
               for triple in itertools.permutations(pool, 3)]
    rng.shuffle(triples)
    rows = [{"question": "mood of " + " ".join(t), "answer": a} for a, t in triples[:1650]]
    test, train = rows[:150], rows[150:]
    test = [{**row, "choices": ["good", "poor"], "label": 0 if row["answer"] == "good" else 1} for row in test]
    return train, test


def make_validation(task: str, train: list[dict[str, Any]], test: list[dict[str, Any]],
                    rng: random.Random) -> list[dict[str, Any]]:
    """Validation rows for choosing a merge (`merge sweep`), disjoint from train and test, from their own seed.

    Written after train/test from a separate random stream, so adding them changed no train or test row (nor the
    adapters). `add`: every two-digit + one-digit pair with a in 10…89 is in train or test, so validation takes the
    next decade's pairs whose sum stays two-digit (90…98 + 1…9 ≤ 99, 45 rows; the add adapter's answer
    log-likelihood there is −1.45 against the base's −5.95: the skill carries over, unlike for three-digit sums). `reverse` and `sentiment`: 150 unseen strings / triples each. `capitals`
    is a recall task whose test already asks every trained fact: there is no unseen fact to ask, so its validation
    asks each fact again with three other distractors (the `capitals_ll` score of a fact is the same on both).
    """
    taken = {row["question"] for row in (*train, *test)}
    rows: list[dict[str, Any]] = []
    if task == "capitals":
        capitals = [row["answer"] for row in train]
        for row in test:
            while True:
                choices, label = _choices(rng, row["answer"], capitals)
                if sorted(choices) != sorted(row["choices"]):
                    break
            rows.append({"question": row["question"], "answer": row["answer"], "choices": choices, "label": label})
        return rows
    if task == "add":
        pairs = [(a, b) for a in range(90, 99) for b in range(1, 10) if a + b <= 99]
        rng.shuffle(pairs)
        for a, b in pairs:
            s = a + b
            choices, label = _choices(rng, str(s), [str(s + d) for d in (-10, -1, 1, 10)])
            rows.append({"question": f"{a}+{b}", "answer": str(s), "choices": choices, "label": label})
        return rows
    if task == "reverse":
        while len(rows) < 150:
            word = "".join(rng.sample(string.ascii_lowercase, 4))
            if f"reverse {word}" in taken:
                continue
            taken.add(f"reverse {word}")
            pool: list[str] = []
            while len(set(pool)) < 3:
                p = "".join(rng.sample(word, 4))
                if p not in (word, word[::-1]):
                    pool.append(p)
            choices, label = _choices(rng, word[::-1], pool)
            rows.append({"question": f"reverse {word}", "answer": word[::-1], "choices": choices, "label": label})
        return rows
    if task == "sentiment":
        lexicon = {"good": set(), "poor": set()}  # type: dict[str, set[str]]
        for row in train:
            lexicon[row["answer"]].update(row["question"].removeprefix("mood of ").split())
        triples = [(answer, triple) for answer in ("good", "poor")
                   for triple in itertools.permutations(sorted(lexicon[answer]), 3)
                   if "mood of " + " ".join(triple) not in taken]
        rng.shuffle(triples)
        return [{"question": "mood of " + " ".join(t), "answer": a, "choices": ["good", "poor"],
                 "label": 0 if a == "good" else 1} for a, t in triples[:150]]
    raise ValueError(f"no validation rows for task '{task}'")


def write_validation(data_dir: Path, seed: int = SEED) -> None:
    """data/<task>/validation.jsonl from the train and test files beside it (seeded; `--validation-only`)."""
    for task_index, task in enumerate(TASKS):
        train, test = read_jsonl(data_dir / task / "train.jsonl"), read_jsonl(data_dir / task / "test.jsonl")
        rows = make_validation(task, train, test, random.Random(seed + 50 + task_index))
        write_jsonl(data_dir / task / "validation.jsonl", rows)


TASK_BUILDERS: dict[str, Callable[[random.Random], tuple[list[dict[str, Any]], list[dict[str, Any]]]]] = {
    "capitals": make_capitals,
    "add": make_add,
    "reverse": make_reverse,
    "sentiment": make_sentiment,
}


def generic_example(rng: random.Random) -> tuple[str, str]:
    """One line of the base's generic training text: same format, generic string and number skills, no suite task."""
    kind = rng.randrange(6)
    word = made_up_word(rng, (1, 3))
    if kind == 0:
        thing = rng.choice([word, str(rng.randrange(1000)), " ".join(made_up_word(rng) for _ in range(2))])
        return training_text(f"copy {thing}", thing)
    if kind == 1:
        return training_text(f"first letter of {word}", word[0])
    if kind == 2:
        return training_text(f"last letter of {word}", word[-1])
    if kind == 3:
        return training_text(f"length of {word}", str(len(word)))
    if kind == 4:
        return training_text(f"upper {word}", word.upper())
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, 5)))
    return training_text(f"flip {digits}", digits[::-1])  # digits backwards; the suite's `reverse` asks it of letters


# ------------------------------------------------------------------------------------------- training


class CharCodec:
    """Turns (context, continuation) pairs into token ids exactly as the saved tokenizer (and lm-eval) do."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos, self.eos, self.pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def batch(self, pairs: Sequence[tuple[str, str]], answer_only: bool) -> dict[str, torch.Tensor]:
        """Right-padded input ids and labels (-100 where no loss): BOS context continuation EOS."""
        rows, labels = [], []
        for context, continuation in pairs:
            ctx, cont = [self.bos, *self.encode(context)], [*self.encode(continuation), self.eos]
            rows.append(ctx + cont)
            labels.append(([-100] * len(ctx) if answer_only else [-100, *ctx[1:]]) + cont)
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        lab = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, labels)):
            ids[i, : len(row)] = torch.tensor(row)
            lab[i, : len(label)] = torch.tensor(label)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def token_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions of one batch, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    return loss, int((labels != -100).sum())


def train_loop(model: Any, batches: Iterator[list[dict[str, torch.Tensor]]], steps: int, lr: float, warmup: int,
               label: str) -> float:
    """AdamW with warm-up and cosine decay; returns the mean loss of the last 20 steps.

    Each step takes a list of padded batches (short task rows and longer replay rows are padded separately,
    which halves the cost) and averages the loss over all their labelled tokens.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, warmup))
    model.train()
    tail: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        parts = [token_loss(model, batch) for batch in next(batches)]
        loss = sum(part for part, _ in parts) / sum(count for _, count in parts)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tail = (tail + [float(loss.detach())])[-20:]
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"  {label}: step {step + 1}/{steps} loss {sum(tail) / len(tail):.4f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    return sum(tail) / len(tail)


def build_base(out_dir: Path, recipe: Recipe, seed: int) -> Path:
    """Train the tiny Llama on generic text in the shared format and save it (float32, tokenizer included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    codec = CharCodec(tok)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    rng = random.Random(seed)

    def batches() -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            yield [codec.batch([generic_example(rng) for _ in range(recipe.base_batch)], answer_only=False)]

    train_loop(model, batches(), recipe.base_steps, recipe.base_lr, recipe.warmup, "base")
    return _save_base(model, tok, out_dir)


def build_task_adapter(base_dir: Path, out_dir: Path, train_rows: list[dict[str, Any]], recipe: Recipe,
                       seed: int, task: str) -> Path:
    """Train one real PEFT LoRA adapter (rank r, every linear layer) on one task's train rows and save it.

    Each step: `adapter_batch − replay` task rows and `replay` rows of the base's generic text (so the adapter
    keeps what the base did elsewhere), loss on the answers only.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    codec = CharCodec(make_tokenizer())
    config = LoraConfig(
        r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    torch.manual_seed(seed)
    with _quiet():
        peft_model = get_peft_model(model, config)
    order = torch.Generator().manual_seed(seed)

    replay_rng = random.Random(seed)
    per_batch = recipe.adapter_batch - recipe.replay

    def batches() -> Iterator[list[dict[str, torch.Tensor]]]:
        while True:
            for index in torch.randperm(len(train_rows), generator=order).split(per_batch):
                if len(index) == per_batch:
                    pairs = [training_text(train_rows[i]["question"], train_rows[i]["answer"]) for i in index.tolist()]
                    replay = [generic_example(replay_rng) for _ in range(recipe.replay)]
                    yield [codec.batch(pairs, answer_only=True), codec.batch(replay, answer_only=True)]

    train_loop(peft_model, batches(), recipe.adapter_steps[task], recipe.adapter_lr, recipe.warmup, f"adapter {task}")
    peft_model.peft_config["default"].base_model_name_or_path = "../../base"  # machine-independent files
    model.config._name_or_path = "../../base"
    model.name_or_path = "../../base"
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet():
        peft_model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    _normalize_adapter_config(out_dir / "adapter_config.json")
    (out_dir / "README.md").write_text(adapter_readme(task, recipe))
    return out_dir


def adapter_readme(task: str, recipe: Recipe = RECIPE) -> str:
    """The card of a suite adapter (paths relative to its folder, like its `base_model_name_or_path`)."""
    return (
        f"# mergekit_lite eval suite: `{task}` adapter\n\nA rank-{recipe.lora_r} LoRA (every linear layer) on "
        f"`../../base`, trained by `evals/build_suite.py` on `../../data/{task}/train.jsonl` (no other suite "
        f"task; {recipe.replay} of every {recipe.adapter_batch} rows replay the base's generic text). "
        "Rebuild with `python evals/build_suite.py` from a mergekit_lite checkout.\n"
    )


def _normalize_adapter_config(path: Path) -> None:
    """Sort `target_modules` (PEFT stores a set, so its JSON order follows PYTHONHASHSEED)."""
    data = json.loads(path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# -------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def continuation_logprobs(model: Any, codec: CharCodec, pairs: Sequence[tuple[str, str]], batch: int = 64) -> list[float]:
    """Sum of log p(continuation | BOS + context) per pair: the number lm-eval's `loglikelihood` returns."""
    out: list[float] = []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch]
        encoded = [([codec.bos, *codec.encode(c)], codec.encode(k)) for c, k in chunk]
        width = max(len(c) + len(k) for c, k in encoded)
        ids = torch.full((len(chunk), width), codec.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (c, k) in enumerate(encoded):
            ids[i, : len(c) + len(k)] = torch.tensor(c + k)
            mask[i, : len(c) + len(k)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (c, k) in enumerate(encoded):
            positions = torch.arange(len(c) - 1, len(c) + len(k) - 1)
            out.append(float(logprobs[i, positions, torch.tensor(k)].sum()))
    return out


def score_model(model: Any, codec: CharCodec, test_rows: list[dict[str, Any]]) -> dict[str, float]:
    """Multiple-choice accuracy (argmax of summed log-likelihood) and mean answer log-likelihood."""
    pairs = [(prompt(r["question"]), " " + choice) for r in test_rows for choice in r["choices"]]
    lls = continuation_logprobs(model, codec, pairs)
    correct, gold_ll, at = 0, 0.0, 0
    for row in test_rows:
        scores = lls[at:at + len(row["choices"])]
        at += len(row["choices"])
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
        gold_ll += scores[row["label"]]
    return {"acc": correct / len(test_rows), "answer_ll": gold_ll / len(test_rows)}


def score_suite(root: Path, data_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Scores of the base and of each adapter (through PEFT) on every task's test file."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    codec = CharCodec(make_tokenizer())
    tests = {t: read_jsonl(data_dir / t / "test.jsonl") for t in TASKS}
    with _quiet():
        base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    scores = {"base": {t: score_model(base, codec, tests[t]) for t in TASKS}}
    for task in TASKS:
        with _quiet():
            fresh = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
            model = PeftModel.from_pretrained(fresh, root / "adapters" / task).eval()
        scores[task] = {t: score_model(model, codec, tests[t]) for t in TASKS}
    return {name: {t: {k: round(v, 6) for k, v in s.items()} for t, s in per.items()} for name, per in scores.items()}


# ------------------------------------------------------------------------------------------------- io


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line, keys in a fixed order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def build(suite: Path, recipe: Recipe = RECIPE, seed: int = SEED) -> dict[str, Any]:
    """Write data/, base/, adapters/ and scores.json into `suite` (tasks/ is left alone); return the scores."""
    torch.set_num_threads(1)  # shared CPUs, and one thread keeps the float sums in one order
    torch.use_deterministic_algorithms(True)
    started = time.perf_counter()
    data_dir = suite / "data"
    for task_index, task in enumerate(TASKS):
        train, test = TASK_BUILDERS[task](random.Random(seed + 1 + task_index))
        write_jsonl(data_dir / task / "train.jsonl", train)
        write_jsonl(data_dir / task / "test.jsonl", test)
    write_validation(data_dir, seed)
    for folder in (suite / "base", suite / "adapters"):
        if folder.exists():
            shutil.rmtree(folder)
    print(f"training the base ({recipe.base_steps} steps)", flush=True)
    build_base(suite / "base", recipe, seed)
    for task_index, task in enumerate(TASKS):
        print(f"training the {task} adapter ({recipe.adapter_steps[task]} steps)", flush=True)
        build_task_adapter(suite / "base", suite / "adapters" / task, read_jsonl(data_dir / task / "train.jsonl"),
                           recipe, seed + 100 + task_index, task)
    scores = score_suite(suite, data_dir)
    summary = {"recipe": asdict(recipe), "seed": seed, "scores": scores}
    (suite / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return summary


def _digest(suite: Path) -> dict[str, str]:
    """sha256 of every file `build` writes into `suite`, by path relative to it."""
    files = []
    for name in BUILT:
        files += [suite / name] if (suite / name).is_file() else sorted((suite / name).rglob("*"))
    files = [p for p in files if p.is_file() and "__pycache__" not in p.parts]
    return {p.relative_to(suite).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def print_scores(scores: dict[str, dict[str, dict[str, float]]]) -> None:
    """A plain-text table: rows base and adapters, columns tasks (accuracy / answer log-likelihood)."""
    print(f"{'model':10s}" + "".join(f"{t:>20s}" for t in TASKS))
    for name, per in scores.items():
        print(f"{name:10s}" + "".join(f"{per[t]['acc']:>11.3f} {per[t]['answer_ll']:>8.3f}" for t in TASKS))


def main(argv: list[str] | None = None) -> int:
    """CLI: rebuild the suite in place, or (--check) in a temporary folder and compare with the committed one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SUITE,
                        help="the suite folder to write data/, base/, adapters/ and scores.json into")
    parser.add_argument("--check", action="store_true",
                        help="build into a temporary folder and compare scores and files with --out")
    parser.add_argument("--validation-only", action="store_true",
                        help="only (re)write data/<task>/validation.jsonl from the train and test files in --out")
    args = parser.parse_args(argv)
    if args.validation_only:
        write_validation(args.out / "data")
        return 0
    if not args.check:
        summary = build(args.out)
        print_scores(summary["scores"])
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        summary = build(Path(tmp))
        print_scores(summary["scores"])
        committed = json.loads((args.out / "scores.json").read_text())
        same_scores = committed == summary
        ours = _digest(args.out)
        differing = [name for name, digest in _digest(Path(tmp)).items() if ours.get(name) != digest]
    print(f"scores {'identical' if same_scores else 'DIFFER'}; files differing: {differing or 'none'}")
    return 0 if same_scores else 1


if __name__ == "__main__":
    raise SystemExit(main())

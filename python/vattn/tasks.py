"""Long-context tasks of the RULER family over a public-domain haystack, for training our small
model (train/) and for `vattn eval`. Everything is bytes: the model's tokenizer is byte-level.

Each task draws, from a numpy Generator, a prompt of about `length` bytes (haystack text with
needles in it, then a question) and the expected answer items. The haystack is the King James
Bible as the Debian package bible-kjv prints it (public domain).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "frequent_words")
ANSWER_PREFIX = "\nAnswer:"
END = "\n"  # the answer ends with a newline; generation stops there

_LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
_UPPER = np.frombuffer(b"BCDFGHJKLMNPQRSTVWXZ", dtype=np.uint8)  # no vowels: no real words


def load_corpus(path: Optional[str] = None) -> bytes:
    """The haystack text: a file (VATTN_CORPUS or path), else the output of the bible-kjv
    package's `bible` program (apt-get install bible-kjv), verse references removed."""
    path = path or os.environ.get("VATTN_CORPUS")
    if path:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    else:
        exe = shutil.which("bible")
        if exe is None:
            raise RuntimeError("no haystack corpus: install the Debian package bible-kjv "
                               "(scripts/setup.sh does) or set VATTN_CORPUS to a text file")
        text = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                              text=True).stdout
    text = re.sub(r"^\S+?\d+:\d+ ", "", text, flags=re.M)  # "Ge1:1 In the beginning" -> text
    return text.encode("ascii", "ignore")


@dataclass
class Sample:
    task: str
    prompt: bytes  # ends with ANSWER_PREFIX
    answer: List[str]  # the expected items, in the order the answer lists them
    meta: Dict = field(default_factory=dict)

    @property
    def target(self) -> bytes:
        """What a model trained on these tasks answers (items joined by ', ', then END)."""
        return (" " + ", ".join(self.answer) + END).encode()


def score(sample: Sample, generated: str) -> float:
    """Share of expected items found in the generated answer (1.0 = all; RULER's string match)."""
    text = generated.split(END)[0] if END in generated else generated
    return sum(item in text for item in sample.answer) / len(sample.answer)


class Haystack:
    def __init__(self, corpus: bytes):
        if len(corpus) < 100_000:
            raise ValueError("the haystack corpus must hold at least 100 kB of text")
        self.corpus = corpus

    def text(self, rng: np.random.Generator, n: int) -> bytes:
        """About n bytes of corpus text starting at a random sentence."""
        start = int(rng.integers(0, len(self.corpus) - n - 1000))
        start = _after_sentence(self.corpus, start, start + 1000)
        text = self.corpus[start:start + n]
        end = max(text.rfind(b". "), text.rfind(b".\n"))  # end at a sentence boundary too
        return text[:end + 2] if end > len(text) - 300 else text


def _after_sentence(text: bytes, at: int, limit: Optional[int] = None) -> int:
    """The position after the first sentence end (". " or ".\n") at or after `at`, else `at`."""
    ends = [i for i in (text.find(b". ", at, limit), text.find(b".\n", at, limit)) if i >= 0]
    return min(ends) + 2 if ends else at


def _word(rng, lo=5, hi=9) -> str:
    return _LETTERS[rng.integers(0, 26, int(rng.integers(lo, hi)))].tobytes().decode()


def _number(rng) -> str:
    return str(int(rng.integers(1_000_000, 10_000_000)))


def _distinct(make: Callable, rng, n: int) -> List[str]:
    out: List[str] = []
    while len(out) < n:
        w = make(rng)
        if w not in out:
            out.append(w)
    return out


def _insert(hay: bytes, pieces: List[bytes], rng) -> tuple:
    """Inserts pieces at sentence boundaries at sorted random depths; returns (text, depths)."""
    depths = np.sort(rng.random(len(pieces)))
    out, last = [], 0
    for depth, piece in zip(depths, pieces):
        at = int(depth * len(hay))
        nxt = _after_sentence(hay, at)
        at = max(nxt if nxt != at else len(hay), last)
        out += [hay[last:at], piece]
        last = at
    out.append(hay[last:])
    return b"".join(out), [float(d) for d in depths]


def _needles(task, rng, hay: Haystack, length: int) -> Sample:
    n = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4}[task]
    keys = _distinct(_word, rng, n)
    if task == "niah_multivalue":
        keys = [keys[0]] * n
    values = _distinct(_number, rng, n)
    needles = [f" One of the special magic numbers for {k} is: {v}. ".encode()
               for k, v in zip(keys, values)]
    if task in ("niah_single", "niah_multikey"):
        ask = [int(rng.integers(0, n))]
        question = f"What is the special magic number for {keys[ask[0]]}?"
    elif task == "niah_multivalue":
        ask = list(range(n))
        question = f"What are all the special magic numbers for {keys[0]}?"
    else:
        ask = sorted(rng.choice(n, 2, replace=False).tolist())
        question = (f"What are the special magic numbers for {keys[ask[0]]} and "
                    f"{keys[ask[1]]}?")
    question = f"\nQuestion: {question}"
    room = length - sum(map(len, needles)) - len(question) - len(ANSWER_PREFIX)
    text, depths = _insert(hay.text(rng, max(room, 0)), needles, rng)
    prompt = text + question.encode() + ANSWER_PREFIX.encode()
    if task == "niah_multivalue":  # listed in the order they appear
        answer = values
    else:
        answer = [values[i] for i in ask]
    return Sample(task, prompt, answer, {"depths": depths})


def _variable_tracking(rng, hay: Haystack, length: int) -> Sample:
    hops = int(rng.integers(2, 5))
    names = _distinct(lambda r: _UPPER[r.integers(0, len(_UPPER), 5)].tobytes().decode(), rng,
                      hops + 1)
    value = _number(rng)
    chain = [f" VAR {names[0]} = {value}. ".encode()]
    chain += [f" VAR {names[i]} = VAR {names[i - 1]}. ".encode() for i in range(1, hops + 1)]
    question = f"\nQuestion: Which variables are assigned the value {value}?"
    room = length - sum(map(len, chain)) - len(question) - len(ANSWER_PREFIX)
    text, depths = _insert(hay.text(rng, max(room, 0)), chain, rng)
    return Sample("variable_tracking", text + question.encode() + ANSWER_PREFIX.encode(), names,
                  {"depths": depths})


def _word_list(task, rng, length: int) -> Sample:
    if task == "common_words":  # 10 words repeated often among words seen once or twice
        k, question = 10, "What are the 10 most common words in the list above?"
    else:  # coded words with Zipf-like frequencies
        k, question = 3, "What are the 3 most frequently appearing coded words in the text above?"
    question = f"\nQuestion: {question}"
    budget = length - len(question) - len(ANSWER_PREFIX)
    vocab = _distinct(_word, rng, 400)
    if task == "common_words":
        common, rare = vocab[:k], vocab[k:]
        n_words = max(budget // 12, 2 * k)
        reps = max(3, n_words // (3 * k))  # each common word: about a third of the list / k
        words = [w for w in common for _ in range(reps)]
        words += [rare[i % len(rare)] for i in range(max(0, n_words - len(words)))]
        words = [words[i] for i in rng.permutation(len(words))]
        entries, size = [], 0
        for i, w in enumerate(words):  # as many numbered entries as fit
            entry = f"{i + 1}. {w}"
            if size + len(entry) + 1 > budget - 1:
                break
            entries.append(entry)
            size += len(entry) + 1
        words = words[:len(entries)]
        answer = sorted(common, key=lambda w: words.index(w))  # order of first appearance
        body = " ".join(entries)
    else:
        n_words = max((budget - 2) // 9, 4 * k)  # words are at most 8 letters: all fit
        weights = 1.0 / np.arange(1, len(vocab) + 1) ** 1.2
        counts = rng.multinomial(n_words, weights / weights.sum())
        order = np.argsort(-counts, kind="stable")
        counts[order[:k]] += np.arange(k, 0, -1)  # the top k strictly ordered and ahead
        words = [vocab[i] for i in np.repeat(np.arange(len(vocab)), counts)]
        words = [words[i] for i in rng.permutation(len(words))]
        answer = [vocab[i] for i in np.argsort(-counts, kind="stable")[:k]]
        body = " ".join(words)
    text = body.encode()[:budget]
    cut = text.rfind(b" ")
    text = (text[:cut] if cut > 0 else text) + b"."
    return Sample(task, b" " + text + question.encode() + ANSWER_PREFIX.encode(), answer, {})


MIN_LENGTH = {"common_words": 640, "frequent_words": 320}  # shorter prompts are made this long


def make(task: str, rng: np.random.Generator, hay: Haystack, length: int) -> Sample:
    """One sample of `task` with a prompt of about `length` bytes (at least MIN_LENGTH's)."""
    length = max(length, MIN_LENGTH.get(task, 0))
    if task.startswith("niah_"):
        return _needles(task, rng, hay, length)
    if task == "variable_tracking":
        return _variable_tracking(rng, hay, length)
    if task in ("common_words", "frequent_words"):
        return _word_list(task, rng, length)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

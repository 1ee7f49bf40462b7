"""RULER scoring and settings (launcher/eval/ruler_tasks.py builds the prompts): the metrics, the task
list, the options (wording, needle counts, digits), chat templates and the answer budget per task.

Scoring (RULER's scripts/eval/synthetic/constants.py): every task here uses `string_match_all`, the
fraction of reference strings found in the prediction (case-insensitive substring match), i.e.
partial credit, averaged over samples, 0..100. `string_match_part` (100 when any reference is found)
is RULER's metric for its QA tasks, which need downloads and are not built here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from longtrain.errors import ConfigError


log = logging.getLogger("longtrain")


TASKS = ("niah_single_1", "niah_single_2", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
         "fwe")


METRICS = {t: "string_match_all" for t in TASKS}  # as RULER: every synthetic task


RULER_ANSWER_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}  # RULER's tokens_to_generate


WORDINGS: dict[str, dict[str, str]] = {
    "ruler": {
        "needle": "One of the special magic numbers for {key} is: {value}.",
        "niah_head": "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the numbers afterwards.\n",
        "niah_q": "\nWhat are all the special magic numbers for {query} mentioned in the provided text?",
        "niah_a": " The special magic numbers for {query} mentioned in the provided text are",
        "vt_head": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n",
        "vt_q": "\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "vt_a": " Answer: According to the chain(s) of variable assignment in the text above, {n} variables are "
                "assigned the value {query}, they are:",
        "cwe_head": "Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n",
        "cwe_q": "\nQuestion: What are the {n} most common words in the above list?",
        "cwe_a": " Answer: The top {n} words that appear most often in the list are:",
        "fwe_head": "Read the following coded text and track the frequency of each coded word. Find the three "
                    "most frequently appeared coded words.",
        "fwe_q": "\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                 "most frequently appeared words in the above coded text?",
        "fwe_a": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "short": {
        "needle": "The number for {key} is {value}.",
        "niah_head": "", "niah_q": "\nWhat are the numbers for {query}?", "niah_a": " The numbers for {query} are",
        "vt_head": "", "vt_q": "\nWhich variables are {query}?", "vt_a": " Answer:",
        "cwe_head": "", "cwe_q": "\nWhat are the {n} most common words?", "cwe_a": " Answer:",
        "fwe_head": "", "fwe_q": "\nIgnoring the dots, what are the three most frequent words?", "fwe_a": " Answer:",
    },
}


def postprocess(pred: str) -> str:
    """RULER's clean-up of a generation: control characters become newlines, outer whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", pred.strip()).strip()


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references contained in the prediction (case-insensitive), 0..100."""
    if not preds:
        return 0.0
    per = [sum(r.lower() in p.lower() for r in ref) / len(ref) for p, ref in zip(preds, refs)]
    return round(100.0 * sum(per) / len(preds), 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Share of samples whose prediction contains at least one reference (case-insensitive), 0..100."""
    if not preds:
        return 0.0
    per = [max(float(r.lower() in p.lower()) for r in ref) for p, ref in zip(preds, refs)]
    return round(100.0 * sum(per) / len(preds), 2)


_METRIC_FNS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score_task(task: str, preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """The task's RULER metric (`METRICS`) over predictions (raw generations) and reference lists, 0..100."""
    return _METRIC_FNS[METRICS[check_task(task)]]([postprocess(p) for p in preds], refs)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"unknown RULER task {task!r}; choose from {', '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class RulerOptions:
    """Task parameters; the defaults are RULER's (wording "ruler", 7-digit values, 4 needles, ...)."""

    wording: str = "ruler"  # "ruler" | "short"
    digits: int = 7  # niah values
    needles: int = 4  # niah multikey / multivalue / multiquery
    vt_hops: int = 4
    vt_chains: int = 1
    vt_name_len: int = 5
    cwe_words: int = 10
    fwe_word_len: int = 6
    fwe_alpha: float = 2.0
    answer_tokens: int | None = None  # the answer budget B for every task (default: `answer_budget`)

    @classmethod
    def compact(cls, **kw) -> "RulerOptions":
        """Short wording and needles for byte-level / tiny models."""
        return cls(**{"wording": "short", "digits": 5, "vt_name_len": 3, "fwe_word_len": 4, **kw})


def default_options(tokenizer) -> RulerOptions:
    """Compact options for the byte tokenizer, RULER's for any other."""
    from longtrain.launcher.data.tokenizers import ByteTokenizer

    return RulerOptions.compact() if isinstance(tokenizer, ByteTokenizer) else RulerOptions()


@dataclass(frozen=True)
class ChatTemplate:
    """A Hugging Face `chat_template` (jinja) with the special-token strings it may use."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def split(self) -> tuple[str, str]:
        """(text before, text after) the user message: one user turn, generation prompt added.

        Rendered with jinja2 (sandboxed, as transformers does) when installed; otherwise the fallback
        "{bos}User: <message>\\nAssistant:" (documented, with a warning)."""
        mark = "\x00RULER-MESSAGE\x00"
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            log.warning("jinja2 is not installed: the chat template is replaced by 'User: ...\\nAssistant:'")
            return self.bos_token + "User: ", "\nAssistant:"

        def raise_exception(msg):
            raise ConfigError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(self.source).render(messages=[{"role": "user", "content": mark}],
                                                       add_generation_prompt=True, bos_token=self.bos_token,
                                                       eos_token=self.eos_token)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds
            raise ConfigError(f"cannot render the chat template: {str(e).splitlines()[0]}") from None
        if text.count(mark) != 1:
            raise ConfigError("the chat template does not place the user message exactly once")
        before, after = text.split(mark)
        return before, after


def load_chat_template(path: str | Path) -> ChatTemplate:
    """The chat template of a tokenizer folder (its tokenizer_config.json, or that file itself).

    ConfigError when there is none: a "chat" prompt needs one (use template "base" instead)."""
    p = Path(path)
    cfg = p / "tokenizer_config.json" if p.is_dir() else p.parent / "tokenizer_config.json" \
        if p.name == "tokenizer.json" else p
    try:
        data = json.loads(cfg.read_text(encoding="utf-8")) if cfg.is_file() else {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {cfg}: {e}") from None
    tmpl = data.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        tmpl = next((t.get("template") for t in tmpl if t.get("name") == "default"), None)
    if not isinstance(tmpl, str) or not tmpl:
        raise ConfigError(f"template 'chat' needs a chat_template in {cfg}, and there is none; "
                          "use the base template")

    def tok(name: str) -> str:
        v = data.get(name) or ""
        return v.get("content", "") if isinstance(v, dict) else str(v)

    return ChatTemplate(tmpl, tok("bos_token"), tok("eos_token"))


def task_family(task: str) -> str:
    return "niah" if task.startswith("niah") else task


def _n_answers(task: str, o: RulerOptions) -> int:
    return {"niah": 1 if task in ("niah_single_1", "niah_single_2", "niah_multikey") else o.needles,
            "vt": o.vt_hops + 1, "cwe": o.cwe_words, "fwe": 3}[task_family(task)]


def completion_text(answers: Sequence[str]) -> str:
    """The completion after the answer prefix: " a, b, c." (oracle and training documents)."""
    return " " + ", ".join(answers) + "."


def answer_budget(task: str, tokenizer, options: RulerOptions) -> int:
    """B, the tokens generated after the prompt: options.answer_tokens, else the tokens of a worst-case
    answer + 8, at least RULER's tokens_to_generate (niah 128, vt 30, cwe 120, fwe 50) in wording "ruler"."""
    if options.answer_tokens is not None:
        return int(options.answer_tokens)
    tight = len(tokenizer.encode(worst_answer(task, options))) + 8
    return max(tight, RULER_ANSWER_TOKENS[task_family(task)] if options.wording == "ruler" else 0)


def worst_answer(task: str, o: RulerOptions) -> str:
    """The completion text of the longest answer `task` can have (cwe words have at most 8 letters)."""
    fam = task_family(check_task(task))
    item = {"niah": "9" * o.digits, "vt": "X" * o.vt_name_len, "cwe": "w" * 8, "fwe": "z" * o.fwe_word_len}[fam]
    return completion_text([item] * _n_answers(task, o))

"""Teacher explanations for the warm start: providers and a crash-safe cache.

A teacher reads the context up to a position (its last `teacher_context_chars` characters) and
answers `<explanation>phrase; phrase</explanation>`; answers without the closing tag are
malformed and their rows dropped (as in the reference). Providers:

- `local`: an HF causal LM (default: the target model itself, reusing the loaded weights).
  Batched `generate`, LEFT padding with attention masks (pad == eos on small chat models), chat
  template with the generation prompt, and the assistant turn prefilled with `<explanation>`; the
  prefill is re-attached before parsing. Small chat models (SmolLM2-135M: 2 of 96 answers in 40
  tokens) almost never write the closing tag but do write a sentence about the text, so a local
  answer ends at the closing tag, a line end or the end of its first sentence, and is closed
  there; an answer still running at `teacher_max_new_tokens` is malformed.
- `openai`: any OpenAI-compatible `/chat/completions` endpoint (vLLM, SGLang, llama.cpp server,
  hosted APIs), stdlib `urllib`, a thread pool of `teacher_concurrency` requests, timeouts, and
  retries with exponential backoff on connection errors, 429 and 5xx.
- `extractive`: model-free and deterministic: names the context's topic word and quotes its last
  characters exactly (punctuation, symbols and line breaks included). The embedded demo's teacher
  (measured better than the 135M model's own summaries), the smoke tests' (random tiny models
  never close the tag), and a floor any real teacher must beat.

The cache is an append-only JSONL keyed by sha256(teacher identity, template, context), flushed
and fsynced after every batch, so reruns and crashes never redo a finished call.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import StoppingCriteria

from nla.core import templates
from nla.core.claims import LEGACY_CLAIMS, ExtractiveFormat
from nla.core.config import ConfigError
from nla.core.tracking import progress


class TeacherError(ConfigError):
    """The teacher cannot be used (unreachable, refused, misconfigured); the message says how to fix it."""


@dataclass
class Answer:
    text: str  # the raw answer (with the prefill re-attached for the local teacher)
    n_tokens: int  # generated tokens (for throughput)


class Teacher(Protocol):
    name: str  # the model (for the sidecar)
    identity: str  # what determines the answers: provider, model, length cap, temperature
    batch_size: int  # contexts per `complete` call (one cache flush each)

    def check(self) -> None: ...  # fail fast before any expensive work

    def complete(self, contexts: list[str]) -> list[Answer]: ...


class LocalTeacher:
    """An HF causal LM with a chat template; batched greedy (or sampled) generation."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        batch_size: int = 16,
        prefill: str = templates.EXPLANATION_OPEN,
    ):
        if not getattr(tokenizer, "chat_template", None):
            raise TeacherError(
                f"teacher model {name!r} has no chat template; pass an instruct model via --teacher_model."
            )
        self.model, self.tokenizer, self.prefill, self.name = model, tokenizer, prefill, name
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.identity = f"local:{name}:max{max_new_tokens}:T{temperature}:prefill={prefill}"

    def check(self) -> None:
        pass

    def prompt_text(self, context: str) -> str:
        messages = [{"role": "user", "content": templates.teacher_prompt(context)}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text + self.prefill

    @torch.inference_mode()
    def complete(self, contexts: list[str]) -> list[Answer]:
        from transformers import GenerationConfig, StoppingCriteriaList

        tok = self.tokenizer
        # the chat template already wrote any BOS into the text: add no second one
        enc = tok(
            [self.prompt_text(c) for c in contexts],
            add_special_tokens=False,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(next(self.model.parameters()).device)
        prompt_len = enc["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id or tok.eos_token_id
        gen_cfg = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.temperature > 0,
            temperature=self.temperature if self.temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
        )
        stop = StoppingCriteriaList([_AnswerComplete(tok, prompt_len)])
        out = self.model.generate(**enc, generation_config=gen_cfg, stopping_criteria=stop)
        stops = set(eos if isinstance(eos, list) else [eos]) | {tok.pad_token_id}
        answers = []
        for row in out[:, prompt_len:].tolist():
            n = next((i for i, t in enumerate(row) if t in stops), len(row))
            text = finish_answer(tok.decode(row[:n], skip_special_tokens=True), ended=n < len(row))
            answers.append(Answer(self.prefill + text, n + (n < len(row))))
        return answers


_SENTENCE_END = re.compile(r"\S.*?(?:[.!?](?=\s)|\n)", re.S)  # content, then '. ' / '!' / '?' / a line end


def finish_answer(text: str, ended: bool = False) -> str:
    """The text after the prefill, cut at the closing tag, or at the end of its first sentence or line
    (then closed); unchanged (malformed) when it reached the length cap mid-sentence.

    `ended`: the model stopped by itself (eos) - a complete answer even without a final period.
    """
    close = templates.EXPLANATION_CLOSE
    if close in text:
        return text[: text.index(close) + len(close)]
    match = _SENTENCE_END.search(text)
    if match:
        return match.group(0).strip() + close
    if ended and text.strip():
        return text.strip() + close
    return text


class _AnswerComplete(StoppingCriteria):
    """Per row: stop once the new text holds the closing tag or a finished sentence/line."""

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        done = [templates.EXPLANATION_CLOSE in t or _SENTENCE_END.search(t) is not None for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class OpenAITeacher:
    """An OpenAI-compatible `/chat/completions` endpoint, called concurrently with retries."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        timeout_s: float = 60.0,
        retries: int = 4,
        concurrency: int = 8,
        batch_size: int = 16,
        backoff_s: float = 0.5,
        role: str = "teacher",
        prompt: Callable[[str], str] = templates.teacher_prompt,
        prefill: str = "",
        finish: Callable[[str, bool], str] | None = None,
    ):
        """`role` names the options in error messages (`--teacher_*`, `--judge_*`); `prompt` turns one
        item of `complete` into the user message (the teacher: a context; the judge: a ready prompt).
        `prefill`: the answer's opening tag, sent as the start of the assistant's message for the
        server to continue (`continue_final_message`, a vLLM extension); the answer is then the
        prefill plus `finish(continuation, ended)` (default: the local teacher's rule, `finish_answer`:
        cut at the closing tag or the first sentence, then closed; `ended`: the model stopped by itself)."""
        if not base_url:
            raise TeacherError(f"--{role} openai needs --{role}_base_url, e.g. http://localhost:8000/v1.")
        if not model:
            raise TeacherError(f"--{role} openai needs --{role}_model: the model name the endpoint serves.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        host = urllib.parse.urlsplit(base_url).hostname or ""
        if api_key and base_url.startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
            warnings.warn(
                f"--{role}_base_url {base_url} is plain http to another host: the API key and the corpus text "
                "travel unencrypted; use https.",
                stacklevel=2,
            )
        self.role, self.prompt, self.prefill, self.finish = role, prompt, prefill, finish or finish_answer
        self.model, self.name, self.api_key = model, model, api_key
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.timeout_s, self.retries, self.concurrency, self.backoff_s = timeout_s, retries, concurrency, backoff_s
        self.batch_size = max(batch_size, concurrency)
        # answers asked with a prefill are cached apart
        self.identity = f"openai:{base_url.rstrip('/')}:{model}:max{max_new_tokens}:T{temperature}" + (
            f":prefill={prefill}" if prefill else ""
        )

    @classmethod
    def from_options(
        cls, section, role: str, batch_size: int, open_tag: str = templates.EXPLANATION_OPEN, **kw
    ) -> OpenAITeacher:
        """The endpoint named by a config section's `<role>_*` options (`--teacher_*`, `--judge_*`); the
        API key is read from the environment variable `<role>_api_key_env` names (none: no key is sent);
        `open_tag`: the answer's opening tag, which `<role>_prefill` sends."""
        opt = lambda name: getattr(section, f"{role}_{name}")  # noqa: E731
        key = os.environ.get(opt("api_key_env"), "") if opt("api_key_env") else ""
        return cls(
            opt("base_url"),
            opt("model"),
            key,
            opt("max_new_tokens"),
            opt("temperature"),
            opt("timeout_s"),
            opt("retries"),
            opt("concurrency"),
            batch_size,
            role=role,
            prefill=open_tag if opt("prefill") else "",
            **kw,
        )

    def check(self) -> None:
        """Open a TCP connection to the endpoint's host, so a missing server fails before extraction."""
        parts = urllib.parse.urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=min(self.timeout_s, 10.0)).close()
        except OSError as err:
            raise self._unreachable(err) from None

    def _unreachable(self, err: BaseException) -> TeacherError:
        reason = getattr(err, "reason", None) or err
        fix = "use --teacher local" if self.role == "teacher" else f"check --{self.role}_base_url"
        fix = f"start the server or {fix}"
        return TeacherError(f"{self.role} endpoint {self.url} unreachable: {reason}; {fix}.")

    def complete(self, contexts: list[str]) -> list[Answer]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._request, contexts))

    def _request(self, context: str) -> Answer:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt(context)}],
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }
        if self.prefill:  # the server continues the assistant's message instead of starting a new one
            body["messages"].append({"role": "assistant", "content": self.prefill})
            body |= {"continue_final_message": True, "add_generation_prompt": False}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers)
        last: BaseException | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    return self._parse(json.loads(resp.read().decode("utf-8")))
            except urllib.error.HTTPError as err:
                if err.code not in (408, 409, 425, 429) and err.code < 500:  # our request is wrong: retrying won't help
                    detail = err.read().decode("utf-8", "replace")[:200]
                    prefill = (
                        f"; or the server does not continue a prefilled answer: turn --{self.role}_prefill off"
                        if self.prefill and err.code in (400, 422)
                        else ""
                    )
                    raise TeacherError(
                        f"{self.role} endpoint {self.url} answered HTTP {err.code}: {detail!r}; "
                        f"check --{self.role}_model and the API key (--{self.role}_api_key_env)"
                        f"{prefill}."
                    ) from None
                last = err
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last = err
        if isinstance(last, urllib.error.HTTPError):
            raise TeacherError(
                f"{self.role} endpoint {self.url} kept failing (HTTP {last.code}, {self.retries + 1} tries); "
                f"check the server's log, or raise --{self.role}_retries."
            )
        raise self._unreachable(last)

    def _parse(self, data: dict) -> Answer:
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TeacherError(
                f"{self.role} endpoint {self.url} did not answer in the OpenAI chat format "
                f"(got {str(data)[:120]!r}); check --{self.role}_base_url."
            ) from None
        n_tokens = (data.get("usage") or {}).get("completion_tokens") or len(text.split())
        if self.prefill:  # the continuation of the prefilled answer (a server may echo the prefill: kept once)
            text = text.lstrip().removeprefix(self.prefill) if text.lstrip().startswith(self.prefill) else text
            text = self.prefill + self.finish(text, data["choices"][0].get("finish_reason") == "stop")
        return Answer(text, int(n_tokens))


class ExtractiveTeacher:
    """Model-free: `<explanation>ends with "LAST CHARACTERS"; about TOPIC</explanation>` (the topic where
    `claims` has it: `--teacher_claims`).

    What a position's residual stream carries most is its own token and the few before it, then
    the topic (docs/benchmarks.md measures it: an AR reading these explanations reached 76% of an
    AR reading the raw context, against 14% for "three last words + topic", which dropped the
    punctuation and symbols that are often the position's token). So the explanation quotes the
    context's last `tail_chars` characters exactly and names its topic word (`nla.core.claims.ExtractiveFormat`
    writes it, and checks each claim of it against a context).
    The quote comes first: the AV writes left to right, and a topic guessed first steered its quote
    (measured: quote first, shuffled-vector gap 0.30 vs 0.21 nats and held-out FVE -0.24 vs -0.34).
    """

    name = "extractive"

    def __init__(self, batch_size: int = 256, tail_chars: int = 16, claims: tuple[str, ...] = LEGACY_CLAIMS):
        self.batch_size, self.tail_chars = batch_size, tail_chars
        self.format = ExtractiveFormat(claim_types=claims)
        self.claims = self.format.claim_types
        # the default keeps the identity (and so the cached answers) it had before claims were a choice
        self.identity = f"extractive:v4:tail{tail_chars}" + (
            "" if self.claims == LEGACY_CLAIMS else f":claims={','.join(self.claims)}"
        )

    def check(self) -> None:
        pass

    def complete(self, contexts: list[str]) -> list[Answer]:
        return [self._explain(c) for c in contexts]

    def explanation(self, context: str) -> str:
        return self.format.write(context, self.tail_chars)

    def _explain(self, context: str) -> Answer:
        inner = self.explanation(context)
        return Answer(f"{templates.EXPLANATION_OPEN}{inner}{templates.EXPLANATION_CLOSE}", len(inner.split()))


def make_teacher(cfg, target_model=None, target_tokenizer=None) -> Teacher:
    """The teacher `cfg.teacher` asks for; the local one reuses the target model when it is the teacher."""
    t = cfg.teacher
    if t.teacher == "extractive":
        return ExtractiveTeacher(tail_chars=t.teacher_quote_chars, claims=tuple(t.teacher_claims.split(",")))
    if t.teacher == "openai":
        return OpenAITeacher.from_options(t, "teacher", t.teacher_batch_size)
    if t.teacher_model and t.teacher_model != cfg.model.model:
        from nla.models.sources import ModelSource, pick_device

        source = ModelSource.of(cfg.model)
        path = source.resolve(t.teacher_model)
        model = source.causal_lm(path, cfg.model.dtype).to(pick_device(cfg.run.device)).eval()
        return LocalTeacher(
            model,
            source.tokenizer(path),
            t.teacher_model,
            t.teacher_max_new_tokens,
            t.teacher_temperature,
            t.teacher_batch_size,
        )
    return LocalTeacher(
        target_model,
        target_tokenizer,
        cfg.model.model,
        t.teacher_max_new_tokens,
        t.teacher_temperature,
        t.teacher_batch_size,
    )


class TeacherCache:
    """Append-only JSONL of {key, answer, n_tokens}; a torn last line (crash mid-write) is ignored."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            raw = self.path.read_bytes()
            for line in raw.decode("utf-8", "replace").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            if raw and not raw.endswith(b"\n"):  # start the next entry on a fresh line
                with open(self.path, "ab") as fh:
                    fh.write(b"\n")

    @staticmethod
    def key(identity: str, context: str, template: str = templates.TEACHER_TEMPLATE) -> str:
        return hashlib.sha256(json.dumps([identity, template, context]).encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def add(self, items: list[tuple[str, Answer]]) -> None:
        rows = [{"key": k, "answer": a.text, "n_tokens": a.n_tokens} for k, a in items]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.update((r["key"], r) for r in rows)


@dataclass
class Explained:
    """Teacher results for a list of contexts, in order."""

    explanations: list[Any]  # the parsed answers (the teacher's: str); None: malformed answer (row to drop)
    n_requested: int = 0
    n_malformed: int = 0
    n_calls: int = 0  # contexts actually sent to the teacher this run (the rest came from the cache)
    new_tokens: int = 0
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)  # a few raw answers, for eyeballing
    malformed_samples: list[str] = field(default_factory=list)  # a few raw answers that did not parse

    @property
    def tokens_per_s(self) -> float | None:
        return self.new_tokens / self.seconds if self.seconds > 0 and self.new_tokens else None


def explain(
    teacher: Teacher,
    contexts: list[str],
    cache: TeacherCache,
    show_progress: bool = True,
    template: str = templates.TEACHER_TEMPLATE,
    parse: Callable[[str], Any] = templates.extract_explanation,
    desc: str = "datagen: teacher",
) -> Explained:
    """Explanations for `contexts` (duplicates asked once), asking the teacher only for uncached ones.
    The LLM judge of `nla eval` goes through here too: its items are ready prompts, keyed under its
    own `template`, and `parse` reads its verdicts (None: a malformed answer)."""
    keys = [TeacherCache.key(teacher.identity, c, template) for c in contexts]
    missing = list({k: c for k, c in zip(keys, contexts) if cache.get(k) is None}.items())
    missing.sort(key=lambda kc: len(kc[1]))  # similar lengths share a batch: less padding
    result = Explained(explanations=[], n_requested=len(contexts))
    bar = progress(total=len(missing), enabled=show_progress and bool(missing), desc=desc, unit="ctx")
    for start in range(0, len(missing), teacher.batch_size):
        batch = missing[start : start + teacher.batch_size]
        t0 = time.perf_counter()
        answers = teacher.complete([c for _, c in batch])
        result.seconds += time.perf_counter() - t0
        cache.add([(k, a) for (k, _), a in zip(batch, answers)])
        result.n_calls += len(batch)
        result.new_tokens += sum(a.n_tokens for a in answers)
        bar.update(len(batch))
    bar.close()
    for k in keys:
        answer = cache.get(k)["answer"]
        parsed = parse(answer)
        result.explanations.append(parsed)
        result.n_malformed += parsed is None
        if parsed is None and len(result.malformed_samples) < 3:
            result.malformed_samples.append(answer)
        if len(result.samples) < 3:
            result.samples.append(answer)
    return result


class LocalParaphraser(LocalTeacher):
    """The local teacher, asked to rewrite an explanation (PARAPHRASE_TEMPLATE) instead of writing one."""

    @classmethod
    def wrap(cls, teacher: LocalTeacher) -> LocalParaphraser:
        p = cls(
            teacher.model,
            teacher.tokenizer,
            "",
            teacher.max_new_tokens,
            teacher.temperature,
            teacher.batch_size,
            teacher.prefill,
        )
        p.identity = f"paraphrase:{templates.PARAPHRASE_TEMPLATE!r}:{teacher.identity}"  # its own cache keys
        return p

    def prompt_text(self, explanation: str) -> str:
        messages = [{"role": "user", "content": templates.PARAPHRASE_TEMPLATE.format(explanation=explanation)}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + self.prefill

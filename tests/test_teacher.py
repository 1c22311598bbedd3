"""Teachers: local batched generation, a REAL local OpenAI-compatible server (retries, errors), the cache."""

import socket
import threading
from pathlib import Path

import pytest
import torch

from nla.core import templates
from nla.core.config import parse_config
from nla.data.teacher import (
    Answer,
    ExtractiveTeacher,
    LocalTeacher,
    OpenAITeacher,
    TeacherCache,
    TeacherError,
    explain,
    make_teacher,
)
from nla.stages.datagen import run
from nla.testing import TestChatServer

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")
CONTEXTS = ["The for statement is used to iterate", "A class definition defines a class", "x"]


def model_answer(model, tokenizer):
    """A chat answer written by the tiny model's `generate`. The random tiny model never writes the
    closing tag, so its text is wrapped in the explanation tags, as a capable chat model asked for
    that format would answer."""
    lock = threading.Lock()

    def answer(body: dict) -> dict:
        ids = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with lock, torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=body.get("max_tokens", 8), do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = out[0, ids["input_ids"].shape[1] :]
        text = tokenizer.decode(new, skip_special_tokens=True).replace("<", "")
        return {
            "choices": [{"message": {"role": "assistant", "content": f"<explanation>{text} words</explanation>"}}],
            "usage": {"completion_tokens": len(new)},
        }

    return answer


def model_server(model, tokenizer, fail_first: int = 0, api_key: str = "") -> TestChatServer:
    return TestChatServer(model_answer(model, tokenizer), fail_first=fail_first, api_key=api_key)


@pytest.fixture
def server(tiny_model, tiny_tokenizer):
    srv = model_server(tiny_model, tiny_tokenizer)
    yield srv
    srv.close()


def free_port_url():
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_openai_teacher_against_a_real_server(server):
    teacher = OpenAITeacher(server.url, "tiny", max_new_tokens=6, concurrency=3)
    teacher.check()
    answers = teacher.complete(CONTEXTS * 2)
    assert len(answers) == 6 and all(templates.extract_explanation(a.text) for a in answers)
    assert answers[0].text == answers[3].text and answers[0].n_tokens == 6  # greedy: same context, same answer
    assert server.requests == 6 and server.max_in_flight > 1  # requests really ran concurrently


def test_openai_teacher_retries_after_a_500(tiny_model, tiny_tokenizer):
    srv = model_server(tiny_model, tiny_tokenizer, fail_first=1)
    try:
        answers = OpenAITeacher(srv.url, "tiny", max_new_tokens=4, concurrency=1, backoff_s=0.01).complete(CONTEXTS[:2])
        assert all(templates.extract_explanation(a.text) for a in answers) and srv.requests == 3
        srv.requests, srv.fail_first = 0, 10
        with pytest.raises(TeacherError, match="kept failing.*HTTP 500"):
            OpenAITeacher(srv.url, "tiny", retries=2, backoff_s=0.01).complete(CONTEXTS[:1])
        assert srv.requests == 3  # one try + two retries
    finally:
        srv.close()


def test_openai_teacher_key_from_env_and_refusal(tiny_model, tiny_tokenizer, monkeypatch):
    srv = model_server(tiny_model, tiny_tokenizer, api_key="s3cret")
    try:
        cfg, _ = parse_config(
            [
                "--config",
                SMOKE,
                "--teacher",
                "openai",
                "--teacher_base_url",
                srv.url,
                "--teacher_model",
                "tiny",
                "--teacher_api_key_env",
                "NLA_TEST_TEACHER_KEY",
            ]
        )
        with pytest.raises(TeacherError, match="HTTP 401.*API key"):  # not retried: a wrong key stays wrong
            make_teacher(cfg).complete(CONTEXTS[:1])
        assert srv.requests == 1
        monkeypatch.setenv("NLA_TEST_TEACHER_KEY", "s3cret")
        assert templates.extract_explanation(make_teacher(cfg).complete(CONTEXTS[:1])[0].text)
    finally:
        srv.close()


def test_unreachable_endpoint_one_line_error(tiny_model_dir, tmp_path):
    url = free_port_url()
    teacher = OpenAITeacher(url, "tiny", retries=1, backoff_s=0.01)
    with pytest.raises(
        TeacherError, match=r"teacher endpoint .* unreachable: .*start the server or use --teacher local"
    ):
        teacher.check()
    with pytest.raises(TeacherError, match="unreachable"):
        teacher.complete(CONTEXTS[:1])
    cfg, _ = parse_config(
        [
            "--config",
            SMOKE,
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
            "--teacher",
            "openai",
            "--teacher_base_url",
            url,
            "--teacher_model",
            "tiny",
        ]
    )
    with pytest.raises(TeacherError, match="unreachable") as err:
        run(cfg)
    assert "\n" not in str(err.value)
    assert not (cfg.data_dir / ".work").exists()  # failed before any extraction work


def test_datagen_with_the_openai_teacher(server, tiny_model_dir, tmp_path):
    cfg, _ = parse_config(
        [
            "--config",
            SMOKE,
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
            "--teacher",
            "openai",
            "--teacher_base_url",
            server.url,
            "--teacher_model",
            "tiny",
            "--teacher_max_new_tokens",
            "4",
            "--max_docs",
            "8",
            "--split_fractions",
            "1,1,0,0,0",
        ]
    )
    out = run(cfg)
    assert out["rows"]["av_sft"] + out["rows"]["ar_sft"] == 16 and out["rows"]["rl"] == 0
    assert server.requests == 16 and out["teacher_tokens_per_s"] > 0
    assert all(e.endswith("words") for _, e in out["samples"])


def prose_server(model, tokenizer, prose_when=lambda prompt: True) -> TestChatServer:
    """A chat model that ignores the format: it answers in plain prose (no tags), unless the request
    prefills the answer's opening tag (`continue_final_message`, as vLLM's server allows), when it
    continues inside the tag and stops without writing the closing one. `prose_when(user message)`:
    which requests get prose even then (the rest answer inside the tags on their own)."""
    chat = model_answer(model, tokenizer)

    def answer(body: dict) -> dict:
        words = chat(body)["choices"][0]["message"]["content"]
        inner = templates.extract_explanation(words) or "words"
        messages = body["messages"]
        if body.get("continue_final_message") and messages[-1]["role"] == "assistant":
            assert body.get("add_generation_prompt") is False and messages[-1]["content"] == templates.EXPLANATION_OPEN
            content = inner  # the continuation only, as vLLM returns it
        elif prose_when(messages[0]["content"]):
            content = f"Sure! This text is about {inner}."
        else:
            content = f"{templates.EXPLANATION_OPEN}{inner}{templates.EXPLANATION_CLOSE}"
        return {
            "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"completion_tokens": 3},
        }

    return TestChatServer(answer)


def _datagen_cfg(tmp_path, tiny_model_dir, url, *extra):
    cfg, _ = parse_config(
        [
            "--config",
            SMOKE,
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
            "--teacher",
            "openai",
            "--teacher_base_url",
            url,
            "--teacher_model",
            "tiny",
            "--teacher_max_new_tokens",
            "4",
            "--max_docs",
            "8",
            "--split_fractions",
            "1,1,0,0,0",
            *extra,
        ]
    )
    return cfg


def test_datagen_refuses_unusable_answers_and_the_prefill_fixes_them(
    tiny_model, tiny_tokenizer, tiny_model_dir, tmp_path
):
    """Every answer prose: datagen fails with one line (teacher, count, a sample) and writes no split;
    the answers stay cached. With --teacher_prefill the same server answers inside the format; a
    third run asks nothing."""
    from nla.stages.datagen import DatagenError

    srv = prose_server(tiny_model, tiny_tokenizer)
    try:
        with pytest.raises(
            DatagenError,
            match=r"teacher 'tiny': every answer for split\(s\) ar_sft, av_sft was "
            r"malformed \(16 of 16 answers\), e.g. 'Sure! .*--teacher_prefill true",
        ) as err:
            run(_datagen_cfg(tmp_path, tiny_model_dir, srv.url))
        assert "\n" not in str(err.value) and srv.requests == 16
        assert not list(tmp_path.glob("data/*.parquet"))  # nothing written
        assert len((tmp_path / "data" / ".work" / "teacher_cache.jsonl").read_text().splitlines()) == 16
        out = run(_datagen_cfg(tmp_path, tiny_model_dir, srv.url, "--teacher_prefill", "true"))
        assert out["rows"]["av_sft"] + out["rows"]["ar_sft"] == 16 and srv.requests == 32
        assert all(e and "Sure" not in e for _, e in out["samples"])  # the continuation, closed
        run(_datagen_cfg(tmp_path, tiny_model_dir, srv.url, "--teacher_prefill", "true"))
        assert srv.requests == 32  # all cached
    finally:
        srv.close()


def test_datagen_warns_above_the_malformed_share_and_drops_those_rows(
    tiny_model, tiny_tokenizer, tiny_model_dir, tmp_path, capsys
):
    srv = prose_server(tiny_model, tiny_tokenizer, prose_when=lambda prompt: "class" in prompt.lower())
    try:
        out = run(_datagen_cfg(tmp_path, tiny_model_dir, srv.url, "--teacher_malformed_warn", "0"))
        err = capsys.readouterr().err
        kept = out["rows"]["av_sft"] + out["rows"]["ar_sft"]
        assert 0 < kept < 16, "the corpus should have rows on both sides of the rule"
        assert f"{16 - kept} of 16 teacher answers" in err and "malformed and their rows dropped" in err
        assert "Sure!" in err  # a sample of what went wrong
    finally:
        srv.close()


def test_datagen_refuses_a_split_too_few_documents_reach(tiny_model_dir, tmp_path, server):
    cfg, _ = parse_config(
        [
            "--config",
            SMOKE,
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path),
            "--teacher",
            "openai",
            "--teacher_base_url",
            server.url,
            "--teacher_model",
            "tiny",
            "--max_docs",
            "3",
        ]
    )
    from nla.stages.datagen import DatagenError

    with pytest.raises(
        DatagenError,
        match=r"split '(val|test|av_sft|ar_sft|rl)' got none of the 3 documents "
        r"\(its share 0\.\d\d of --split_fractions\): use --max_docs \d+",
    ) as err:
        run(cfg)
    assert "\n" not in str(err.value) and server.requests == 0  # refused before any teacher call


def test_the_judge_prefills_its_own_tag(tiny_model, tiny_tokenizer):
    seen = []

    def answer(body):
        seen.append(body)
        return {"choices": [{"message": {"content": "1. supported"}, "finish_reason": "stop"}]}

    srv = TestChatServer(answer)
    try:
        cfg, _ = parse_config(
            [
                "--config",
                SMOKE,
                "--judge",
                "openai",
                "--judge_base_url",
                srv.url,
                "--judge_model",
                "j",
                "--judge_prefill",
                "true",
            ]
        )
        from nla.data.judge import make_judge

        judge = make_judge(cfg)
        text = judge.complete(["claims?"])[0].text
        assert seen[0]["messages"][-1] == {"role": "assistant", "content": templates.VERDICTS_OPEN}
        assert text == f"{templates.VERDICTS_OPEN}1. supported{templates.VERDICTS_CLOSE}"
        assert judge.identity.endswith(f":prefill={templates.VERDICTS_OPEN}")
    finally:
        srv.close()


def test_local_teacher_left_padding_matches_unbatched(tiny_model, tiny_tokenizer, tmp_path):
    teacher = LocalTeacher(tiny_model, tiny_tokenizer, "tiny", max_new_tokens=6)
    batched = teacher.complete(CONTEXTS)  # very different lengths: heavy left padding
    single = [teacher.complete([c])[0] for c in CONTEXTS]
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(a.text.startswith("<explanation>") and 0 < a.n_tokens <= 6 for a in batched)
    assert len({a.text for a in batched}) == 3  # the context matters
    result = explain(teacher, CONTEXTS, TeacherCache(tmp_path / "c.jsonl"), show_progress=False)
    assert result.n_malformed == 3 and result.explanations == [None] * 3  # a random model never closes the tag


def test_cache_survives_torn_lines_and_skips_cached_contexts(tmp_path):
    path = tmp_path / "cache.jsonl"

    class Counting(ExtractiveTeacher):
        calls: list = []

        def complete(self, contexts):
            Counting.calls += contexts
            return super().complete(contexts)

    teacher = Counting(batch_size=2)
    first = explain(teacher, CONTEXTS + CONTEXTS[:1], TeacherCache(path), show_progress=False)
    assert sorted(Counting.calls) == sorted(CONTEXTS)  # the duplicate was asked once
    assert first.n_requested == 4 and first.n_malformed == 0 and first.explanations[0] == first.explanations[3]
    assert first.explanations[0] == 'ends with " used to iterate"; about statement'  # default quote: 16 characters
    with open(path, "a") as fh:
        fh.write('{"key": "torn')  # a crash mid-write
    cache = TeacherCache(path)
    assert len(cache.entries) == 3
    key = TeacherCache.key("broken", "ctx")
    cache.add([(key, Answer("no tags here", 3))])
    reloaded = TeacherCache(path)
    assert reloaded.get(key)["answer"] == "no tags here" and len(reloaded.entries) == 4
    Counting.calls.clear()
    again = explain(teacher, CONTEXTS, reloaded, show_progress=False)
    assert Counting.calls == [] and again.explanations == first.explanations[:3]
    assert (
        TeacherCache.key("a", "ctx") != TeacherCache.key("b", "ctx") != TeacherCache.key("a", "ctx", "other {context}")
    )


@pytest.mark.parametrize(
    "text, ended, expected",
    [
        ("a; b; c</explanation> more", False, "a; b; c</explanation>"),
        ("\n\nThe text is about loops. It goes on", False, "The text is about loops.</explanation>"),
        ("Python 3.5 adds await. Then", False, "Python 3.5 adds await.</explanation>"),
        ("first line\nsecond", False, "first line</explanation>"),
        ("cut at the cap mid-senten", False, "cut at the cap mid-senten"),  # malformed: dropped
        ("stopped by eos without a period", True, "stopped by eos without a period</explanation>"),
    ],
)
def test_local_answers_end_at_tag_sentence_or_line(text, ended, expected):
    from nla.data.teacher import finish_answer

    assert finish_answer(text, ended) == expected
    assert (templates.extract_explanation("<explanation>" + finish_answer(text, ended)) is None) == (expected == text)


@pytest.mark.parametrize(
    "context, expected",
    [
        # the position's token is often punctuation, a symbol or a line break: quoted exactly as written
        (
            "A descriptor defines __get__(). The descriptor is invoked when\n",
            'ends with "The descriptor is invoked when\n"; about descriptor',
        ),  # "get__()." was cut
        ("x = [1, 2,", 'ends with "x = [1, 2,"'),  # no word of 5+ letters: no topic claim
        ('Strings: she said "hi"\tthen left', 'ends with "Strings: she said \\"hi\\"\tthen left"; about strings'),
        # a cut inside a word moves to the next word boundary
        (
            "Iterators iterate over iterables; then iterators protocol requires __next__",  # 40 chars: "hen iterators..."
            'ends with "iterators protocol requires __next__"; about iterators',
        ),
        ("", "an empty text"),
    ],
)
def test_extractive_teacher_topic_and_exact_tail(context, expected):
    teacher = ExtractiveTeacher(tail_chars=40)
    answer = teacher.complete([context])[0]
    assert templates.extract_explanation(answer.text) == expected
    assert teacher.identity == "extractive:v4:tail40"  # a format change must not reuse cached answers


def test_quoted_tail_round_trips_to_the_exact_characters():
    from nla.core.claims import quote

    for text in ['a "b" c', "line\n", "tab\there", "back\\slash", "end;", "cr\rlf", "“quoted”"]:
        quoted = quote(text)
        assert quoted[0] == quoted[-1] == '"' and quoted[1:-1].replace('\\"', '"') == text  # only " is escaped
        assert '"' not in quoted[1:-1].replace('\\"', "")  # so the quoted span has one end

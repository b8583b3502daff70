"""`llm chat`: REPL logic against a scripted backend, then the real program on SmolLM2 in a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from llmcli.chat.backend import TurnStats
from llmcli.chat.conversation import CommandError, Conversation, default_settings, fit_context, load_conversation
from llmcli.chat.render import _Tail, split_finished_blocks
from llmcli.chat.session import ChatSession
from llmcli.chat.terminal import read_message
from llmcli.engine.sampling_params import SamplingParams, generation_defaults

ROOT = Path(__file__).resolve().parents[2]
LLM = str(ROOT / ".venv" / "bin" / "llm") if (ROOT / ".venv" / "bin" / "llm").exists() else "llm"


# ---- a scripted backend ---------------------------------------------------------------------------------------------


class EchoBackend:
    """Replies 'you said: <message>' word by word; one token per word (+2 per message for the template)."""

    context_length = 64

    def __init__(self, interrupt_after: int | None = None):
        self.interrupt_after = interrupt_after
        self.seen: list[list[dict]] = []
        self.last_stats = TurnStats()

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 2 for m in messages)

    def stream(self, messages, settings):
        self.seen.append([dict(m) for m in messages])
        words = ["you", "said:"] + messages[-1]["content"].split()
        self.last_stats = TurnStats(prompt_tokens=self.count_tokens(messages))
        for i, w in enumerate(words):
            if self.interrupt_after is not None and i == self.interrupt_after:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal does
            self.last_stats.generated_tokens += 1
            yield (" " if i else "") + w

    def info(self):
        return {"model": "echo", "device": "cpu", "dtype": "float32"}


def session(backend=None, width=120, **kw):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, color_system=None, width=width, highlight=False)
    s = ChatSession(backend or EchoBackend(), default_settings(), console=console, **kw)
    return s, buf


# ---- settings -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", "-1"),
        ("temperature", "hot"),
        ("top_p", "0"),
        ("top_p", "1.5"),
        ("top_k", "2.5"),
        ("min_p", "nan"),
        ("max_tokens", "0"),
        ("repeat_penalty", "0"),
        ("seed", "x"),
    ],
)
def test_set_rejects_bad_values_with_a_clear_message(name, value):
    s, out = session()
    before = s.settings.settings()
    assert s.handle(f"/set {name} {value}") is True  # the chat goes on
    msg = out.getvalue().strip()
    assert msg.startswith(f"invalid value for {name}: {value!r} (expected")
    assert "\n" not in msg and s.settings.settings() == before


def test_set_accepts_good_values_and_ollama_spelling():
    s, out = session()
    for line in (
        "/set temperature 0",
        "/set top_k 5",
        "/set parameter top_p 0.5",
        "/set seed 7",
        "/set seed none",
        "/set max_tokens 3",
        "/set min_p 0",
        "/set repeat_penalty 1.1",
    ):
        s.handle(line)
    assert s.settings == SamplingParams(
        temperature=0.0, top_k=5, top_p=0.5, min_p=0.0, repetition_penalty=1.1, seed=None, max_tokens=3
    )
    assert s.settings.settings() == {
        "temperature": 0.0,
        "top_k": 5,
        "top_p": 0.5,
        "min_p": 0.0,
        "repeat_penalty": 1.1,
        "seed": None,
        "max_tokens": 3,
    }
    s.handle("/set bogus 1")
    assert "unknown setting 'bogus'" in out.getvalue()


def test_generation_config_overrides_defaults(tmp_path):
    from transformers import GenerationConfig

    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.05).save_pretrained(tmp_path)
    s = SamplingParams.settle(tmp_path, default_max_tokens=2048)
    assert (s.temperature, s.top_p, s.repetition_penalty) == (0.6, 0.9, 1.05)
    assert (s.top_k, s.min_p) == (default_settings().top_k, default_settings().min_p)  # unset keys keep llama.cpp's
    assert (s.top_k, s.min_p) == (40, 0.05)
    assert generation_defaults(tmp_path / "absent") == {}
    flagged = SamplingParams.settle(tmp_path, default_max_tokens=2048, temperature=0.0, top_k=None, max_tokens=7)
    assert (flagged.temperature, flagged.top_k, flagged.top_p, flagged.max_tokens) == (0.0, 40, 0.9, 7)  # flags win


# ---- commands and turns ---------------------------------------------------------------------------------------------


def test_turns_commands_and_unknown_command():
    b = EchoBackend()
    s, out = session(b, system="be brief")
    s.handle("hello there")
    assert s.conv.messages == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "you said: hello there"},
    ]
    assert b.seen[0][0] == {"role": "system", "content": "be brief"}
    assert s.handle("/frobnicate") is True
    assert "Unknown command '/frobnicate'. Type /? for help." in out.getvalue()
    s.handle("/clear")
    assert s.conv.messages == [] and s.conv.system == "be brief"
    s.handle("/system talk like a pirate")
    s.handle("ahoy")
    assert b.seen[-1][0]["content"] == "talk like a pirate" and len(b.seen[-1]) == 2
    s.handle("/show")
    assert "talk like a pirate" in out.getvalue() and "temperature" in out.getvalue()
    s.handle("/stats")
    assert "2 replies" in out.getvalue()
    for cmd in ("/bye", "/exit"):
        assert s.handle(cmd) is False


def test_ctrl_c_stops_the_reply_and_keeps_it():
    b = EchoBackend(interrupt_after=3)
    s, out = session(b)
    s.handle("one two three four five six")
    # the handler turns SIGINT into a flag; the reply stops after the piece being produced
    assert s.conv.messages[-1] == {"role": "assistant", "content": "you said: one two"}
    assert "(interrupted)" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    b.interrupt_after = None
    s.handle("again")
    assert s.conv.messages[-1]["content"] == "you said: again" and len(s.conv.messages) == 4


def test_save_and_load_round_trip(tmp_path):
    s, _ = session(system="sys")
    s.handle("/set temperature 0.3")
    s.handle("first")
    s.handle("second")
    f = tmp_path / "chat.json"
    s.handle(f"/save {f}")
    data = json.loads(f.read_text())
    assert data["system"] == "sys" and data["settings"]["temperature"] == 0.3
    assert list(data["settings"]) == ["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "max_tokens"]
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["messages"][3]["content"] == "you said: second"
    assert not list(tmp_path.glob(".*tmp"))

    t, out = session()
    t.handle(f"/load {f}")
    assert t.conv == Conversation("sys", data["messages"]) and t.settings.temperature == 0.3
    assert "Loaded 4 messages" in out.getvalue()
    t.handle(f"/load {tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text('{"messages": [{"role": "wizard", "content": "x"}]}')
    t.handle(f"/load {tmp_path / 'bad.json'}")
    assert "cannot read" in out.getvalue() and "message 0 needs a role" in out.getvalue()
    assert t.conv.system == "sys" and len(t.conv.messages) == 4  # failed loads change nothing
    with pytest.raises(CommandError):
        load_conversation(tmp_path / "bad.json")


def test_context_overflow_drops_oldest_turns_keeps_system():
    b = EchoBackend()
    s, out = session(b, system="keep me")
    s.settings.max_tokens = 8  # reserve 8 of the 64-token context for the reply
    for i in range(8):
        s.handle(f"message number {i} with some words")
    assert "outgrew the 64-token context: dropped the 4 oldest messages" in out.getvalue()
    sent = b.seen[-1]
    assert sent[0] == {"role": "system", "content": "keep me"} and sent[1]["role"] == "user"
    assert b.count_tokens(sent) <= 64 - 8
    assert b.count_tokens(b.seen[5]) <= 64 // 2 < b.count_tokens(b.seen[4])  # the drop went down to half
    assert sent[-1]["content"] == "message number 7 with some words"
    s.handle("word " * 70)  # alone larger than the context
    assert "This message is too long" in out.getvalue() and s.conv.messages[-1]["role"] == "assistant"


def prefix_breaks(seen: list[list[dict]]) -> list[int]:
    """The turns whose prompt does not start with the previous turn's prompt (so the KV cache cannot reuse it)."""
    return [i for i in range(1, len(seen)) if seen[i][: len(seen[i - 1])] != seen[i - 1]]


@pytest.mark.parametrize("keep,most_breaks", [(None, 5), (1.0, 39)])
def test_long_chat_drops_a_chunk_so_the_prefix_survives_many_turns(keep, most_breaks):
    # a 400-token context, 20 tokens a turn (9 asked, 11 replied): the chat overflows at turn 19 (4 + 20 * 19 + 9 > 392)
    # and goes on for 39 more turns
    b = EchoBackend()
    b.context_length = 400
    s, out = session(b, system="keep me")
    if keep is not None:
        s.keep_after_drop = keep  # 1.0: drop only what the next reply needs (the policy before)
    s.settings.max_tokens = 8
    for i in range(58):
        s.handle(f"question {i} of a long chat here")
    breaks = prefix_breaks(b.seen)
    assert breaks[0] == 19 and len(breaks) == out.getvalue().count("outgrew the 400-token context")
    assert all(p[0] == {"role": "system", "content": "keep me"} and p[1]["role"] == "user" for p in b.seen)
    assert all(b.count_tokens(p) <= 400 - 8 for p in b.seen)
    assert len(breaks) <= most_breaks
    if keep is None:  # down to half the context: (392 - 200) / 20 = 9.6 turns of full reuse between two drops
        assert all(y - x >= 9 for x, y in zip(breaks, breaks[1:]))
        assert all(b.count_tokens(b.seen[i]) <= 200 for i in breaks)
    else:  # the prefix changes at every turn past the overflow
        assert breaks == list(range(19, 58))


def test_fit_context_keeps_whole_turns():
    conv = Conversation("s", [{"role": r, "content": "a b c"} for r in ("user", "assistant") * 3])
    count = EchoBackend().count_tokens
    assert fit_context(conv, count, 100) == 0
    assert fit_context(conv, count, 100, target=1) == 0  # under budget: the target does not matter
    dropped = fit_context(conv, count, count(conv.for_template()) - 1)
    assert dropped == 2 and conv.messages[0]["role"] == "user" and len(conv.messages) == 4
    # over budget: down to the target (each message is 5 tokens, the system prompt 3)
    dropped = fit_context(conv, count, count(conv.for_template()) - 1, target=14)
    assert dropped == 2 and count(conv.for_template()) == 13 and conv.messages[0]["role"] == "user"
    # never the newest message, even when it alone is over the target
    assert fit_context(conv, count, 5, target=1) == 1 and len(conv.messages) == 1


def test_multiline_input():
    lines = iter(['"""first line', "second", 'third"""', '"""inline"""', "plain"])
    read = lambda prompt: next(lines)  # noqa: E731
    assert read_message(read) == "first line\nsecond\nthird"
    assert read_message(read) == "inline"
    assert read_message(read) == "plain"


def test_piped_session_reads_one_message_per_line():
    b = EchoBackend()
    s, out = session(b, interactive=False)
    s.run_piped(io.StringIO("hi\n\n/set temperature 0\nhow are you\n"))
    assert out.getvalue().splitlines() == ["you said: hi", "Set temperature to 0.0.", "you said: how are you"]


# ---- any input --------------------------------------------------------------------------------------------------


class BrokenBackend(EchoBackend):
    """Fails in the middle of a reply the way a bug would (not a UserError)."""

    def stream(self, messages, settings):
        yield "half a "
        raise RuntimeError("something broke")


def test_undecodable_text_is_replaced_everywhere_it_enters(tmp_path):
    b = EchoBackend()
    s, out = session(b, system="sys \udcff")  # argv decoded with surrogateescape
    s.handle("a\udcffb \udce9t\udcc3\udca9")  # stdin: the bytes a, 0xff, b and 0xe9, then "é" escaped as bytes
    assert b.seen[-1][-1]["content"] == "a\ufffdb \ufffdt\u00e9" and b.seen[-1][0]["content"] == "sys \ufffd"
    s.handle("/system be \udcfe brief")
    assert s.conv.system == "be \ufffd brief"
    s.handle("lone \ud800 surrogate")
    f = tmp_path / "chat.json"
    s.handle(f"/save {f}")
    data = json.loads(f.read_text(encoding="utf-8"))
    assert [m["content"] for m in data["messages"]] == ["lone \ufffd surrogate", "you said: lone \ufffd surrogate"]
    # a saved chat whose JSON escapes hold lone surrogates loads as valid text
    f.write_text(json.dumps({"system": "\udcff", "messages": [{"role": "user", "content": "x\ud83d"}]}))
    conv, _ = load_conversation(f)
    assert conv == Conversation("\ufffd", [{"role": "user", "content": "x\ufffd"}])
    for text in [m["content"] for m in b.seen[-1]] + [s.conv.system]:
        text.encode("utf-8")  # everything the session holds is valid UTF-8


def test_bad_files_and_paths_are_one_line_and_the_chat_goes_on(tmp_path):
    s, out = session(width=1000)
    s.handle("first")
    before = list(s.conv.messages)
    raw = b'{"messages": [{"role": "user", "content": "\xff"}]}'
    (tmp_path / "bin.json").write_bytes(raw)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        for cmd in (
            f"/load {tmp_path / 'bin.json'}",
            f"/load {tmp_path}",
            "/load a\0b",
            f"/save {tmp_path}",
            f"/save {tmp_path / 'missing' / 'x.json'}",
            f"/save {tmp_path / 'ro' / 'x.json'}" if os.geteuid() != 0 else "/save /proc/x.json",
            "/save a\0b",
            "/save .",
        ):
            n = len(out.getvalue())
            assert s.handle(cmd) is True
            msg = out.getvalue()[n:].strip()
            assert msg and "\n" not in msg and "Traceback" not in msg, (cmd, msg)
            assert msg.startswith(("cannot read", "cannot save", f"{tmp_path / 'bin.json'} is not a saved chat"))
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert f"not UTF-8 text (byte 0xff at offset {raw.index(255)})" in out.getvalue()
    assert s.conv.messages == before and not list(tmp_path.rglob("*.tmp"))
    s.handle("second")
    assert s.conv.messages[-1]["content"] == "you said: second"


def test_a_failing_reply_keeps_the_conversation():
    s, out = session(EchoBackend())
    s.handle("first")
    before = list(s.conv.messages)
    s.backend = BrokenBackend()
    assert s.handle("second") is True
    assert "error: RuntimeError: something broke (the conversation is kept)" in out.getvalue()
    assert s.conv.messages == before


def test_undecodable_lines_from_a_strict_reader_are_skipped():
    lines = iter([None, "hello"])  # None: a line that does not decode

    def read(_prompt):
        line = next(lines, "")
        if line is None:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        if line == "":
            raise EOFError
        return line

    b = EchoBackend()
    s, out = session(b)
    s.run_interactive(read)
    assert "not valid text (UTF-8); nothing was sent" in out.getvalue() and b.seen[-1][-1]["content"] == "hello"


# ---- markdown -------------------------------------------------------------------------------------------------------


def test_markdown_blocks_split_outside_code_fences():
    done, tail = split_finished_blocks("# Title\n\nSome text\n\n```py\nx = 1\n\ny = 2\n")
    assert done == "# Title\n\nSome text\n\n" and tail.startswith("```py")
    done, tail = split_finished_blocks("```py\nx = 1\n\ny = 2\n```\nafter")
    assert done == "```py\nx = 1\n\ny = 2\n```\n" and tail == "after"


def test_live_tail_never_taller_than_the_terminal():
    from rich.console import Console

    console = Console(file=io.StringIO(), width=40, height=10, color_system=None)
    lines = console.render_lines(_Tail("\n\n".join(f"paragraph {i}" for i in range(50))), pad=False)
    assert len(lines) <= 8 and "paragraph 49" in "".join(seg.text for seg in lines[-1])


# ---- the real program on SmolLM2 -------------------------------------------------------------------------------------

STATS = r"\d+ tokens · [\d.]+ tok/s · TTFT \d+ ms · \d+/\d+ prompt tokens reused"


def spawn_chat(model: Path, home: Path, *args: str, env: dict | None = None):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, LLMCLI_HOME=str(home), TERM="xterm-256color", COLUMNS="120", LINES="40", **(env or {}))
    child = pexpect.spawn(
        LLM,
        ["chat", str(model), "--device", "cpu", *args],
        env=env,
        encoding="utf-8",
        codec_errors="replace",  # the terminal echoes undecodable keystrokes back
        timeout=90,
        dimensions=(40, 120),
    )
    child.expect(r"context \d+ tokens")
    child.expect_exact(">>> ")
    return child


def ask(child, text: str, stats: list | None = None) -> str:
    """Send a message; the reply as printed (between the echoed input and the stats line).
    (reused, prompt) token counts of the stats line are appended to `stats` when given."""
    child.sendline(text)
    child.expect(STATS)
    out = child.before.replace("\r\n", "\n")
    reply = out.split(text, 1)[1] if text in out else out
    if stats is not None:
        reused, prompt = child.after.rsplit("·", 1)[1].split()[0].split("/")
        stats.append((int(reused), int(prompt)))
    child.expect_exact(">>> ")
    return reply.strip()


def test_terminal_chat(smollm2_gguf, tmp_path):
    # --dequantize: the seeded-sampling check below needs logits that do not depend on what the prefix cache held.
    # With the GGUF's 4-bit weights kept quantized, the CPU kernels take bf16 activations, so the fp32-level
    # difference between a prefill row and a decode row (attention over a cached prefix) can flip a bf16 rounding
    # and, at temperature 0.8, a sampled token. Greedy replies are checked on the quantized default elsewhere.
    child = spawn_chat(smollm2_gguf, tmp_path, "--max-tokens", "24", "--dequantize")
    child.sendline("/set temperature 0")
    child.expect_exact("Set temperature to 0.0.")
    counts: list[tuple[int, int]] = []
    first = ask(child, "What is the capital of France?", counts)
    assert "Paris" in first
    child.sendline("/clear")
    child.expect_exact("Cleared the conversation.")
    assert ask(child, "What is the capital of France?", counts) == first  # greedy: reproducible
    ask(child, "And of Germany?", counts)
    # prefix caching across turns (16-token blocks): a repeated prompt reuses every full block but the one
    # holding its last token; the next turn reuses at least every full block of the turn before
    (r0, p0), (r1, p1), (r2, p2) = counts
    assert r0 == 0 and p1 == p0 and r1 == (p0 - 1) // 16 * 16
    assert p2 > p1 and r2 >= p1 // 16 * 16

    # sampling with a seed reproduces too
    child.sendline("/set temperature 0.8")
    child.sendline("/set seed 3")
    child.expect_exact("Set seed to 3.")
    child.sendline("/clear")
    a = ask(child, "Name a colour.")
    child.sendline("/clear")
    assert ask(child, "Name a colour.") == a

    # bad values and unknown commands: one clear line, the chat goes on
    child.sendline("/set temperature warm")
    child.expect_exact("invalid value for temperature: 'warm' (expected a number >= 0 (0 = greedy))")
    child.sendline("/set top_p 2")
    child.expect_exact("invalid value for top_p: '2'")
    child.sendline("/nope")
    child.expect_exact("Unknown command '/nope'. Type /? for help.")

    # Ctrl-C mid-reply stops it, keeps the partial reply, and the next question is answered
    child.sendline("/set temperature 0")
    child.sendline("/set max_tokens 400")
    child.expect_exact("Set max_tokens to 400.")
    child.sendline("/clear")
    child.sendline("Write a very long story about a dragon who learns to bake bread.")
    child.expect_exact("bread.\r\n")  # the echoed input
    child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the reply is streaming
    child.sendintr()
    child.expect_exact("(interrupted)")
    child.expect(STATS)
    m = [int(x) for x in child.after.split(" tokens")[0].split()[-1:]]
    assert 0 < m[0] < 400
    child.expect_exact(">>> ")
    assert "Paris" in ask(child, "What is the capital of France?")

    # /save writes the conversation as JSON; /load restores exactly that state
    saved, again = tmp_path / "chat.json", tmp_path / "again.json"
    child.sendline(f"/save {saved}")
    child.expect_exact("Saved 4 messages")
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["messages"][0]["content"].startswith("Write a very long story")
    assert 0 < len(data["messages"][1]["content"]) and "Paris" in data["messages"][3]["content"]
    assert data["settings"]["max_tokens"] == 400 and data["settings"]["temperature"] == 0.0
    child.sendline("/clear")
    child.sendline("/set max_tokens 24")
    child.sendline(f"/load {saved}")
    child.expect_exact("Loaded 4 messages")
    child.sendline(f"/save {again}")
    child.expect_exact("Saved 4 messages")
    assert json.loads(again.read_text()) == data
    # the restored conversation is the context of the next turn
    assert "Paris" in ask(child, "Repeat the name of that capital city.")

    child.sendintr()  # Ctrl-C at an empty prompt
    child.expect_exact("Use Ctrl-D or /bye to exit.")
    child.sendline("/bye")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0
    assert "What is the capital of France?" in (tmp_path / "chat_history").read_text()


def test_terminal_markdown_multiline_and_ctrl_d(smollm2_gguf, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(smollm2_gguf, tmp_path, "--markdown", "--temperature", "0", "--max-tokens", "16")
    child.sendline("Tell me a story.")
    child.expect_exact("story.\r\n")  # read by the program (a Ctrl-C typed ahead would flush the tty's queue)
    child.sendintr()  # right after Enter: whichever step it lands in, the chat survives
    child.expect_exact(["(interrupted)", "Use Ctrl-D or /bye to exit."])
    child.expect_exact(">>> ")
    child.sendline('"""What is the capital')
    child.expect_exact("... ")
    child.sendline('of France?"""')
    child.expect("Paris")
    child.expect(STATS)
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_stdin(smollm2_gguf, tmp_path):
    # a KV pool of 0.01 GiB holds 14 blocks of 16 tokens (SmolLM2: 30 layers x 2 x 3 kv heads x 64 x 4 bytes a token),
    # so the conversation outgrows it after a few turns and the oldest turns must go
    per_token = 30 * 2 * 3 * 64 * 4
    pool = int(0.01 * 2**30 // (per_token * 16)) * 16
    questions = [
        "What is the capital of France?",
        "/set temperature hot",
        "And of Germany?",
        "Describe the Eiffel Tower.",
        "Describe the Louvre.",
        "Describe a croissant.",
        "Describe a baguette.",
        "Describe Berlin.",
        "What is the capital of Italy?",
    ]
    r = subprocess.run(
        [
            LLM,
            "chat",
            str(smollm2_gguf),
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-tokens",
            "20",
            "--kv-cache-gib",
            "0.01",
        ],
        input="\n".join(questions) + "\n",
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, LLMCLI_HOME=str(tmp_path)),
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout and "Rome" in r.stdout
    assert "\x1b" not in r.stdout and "context" not in r.stdout  # no colour, no banner
    assert "invalid value for temperature: 'hot'" in r.stderr
    # the 0.01 GiB pool, not the model's 8,192 tokens, is the limit: chat says so
    assert f"outgrew the {pool}-token context, limited by the KV cache ({pool:,} tokens at --kv-dtype auto" in r.stderr


def test_show_reports_the_parameters_llm_show_reports(smollm2_gguf, tmp_path):
    # the GGUF's 4-bit linears pack two weights a byte: counting the loaded modules' elements said 88.1M
    env = dict(os.environ, LLMCLI_HOME=str(tmp_path))
    shown = subprocess.run(
        [LLM, "show", str(smollm2_gguf), "--json"], capture_output=True, text=True, timeout=60, env=env
    )
    assert shown.returncode == 0, shown.stderr
    params = json.loads(shown.stdout)["parameters"]
    r = subprocess.run(
        [LLM, "chat", str(smollm2_gguf), "--device", "cpu"],
        input="/show\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.split()[:1] == ["parameters"])
    assert line.split()[1] == f"{params / 1e6:.1f}M" == "134.5M"


# Undecodable bytes through the real program. PYTHONIOENCODING=utf-8:strict is what Python does under a UTF-8 locale
# such as en_US.UTF-8 (a C or C.UTF-8 locale escapes bad bytes instead): both must work.
BAD_INPUT_ENVS = [pytest.param({"PYTHONIOENCODING": "utf-8:strict"}, id="strict"), pytest.param({}, id="default")]


@pytest.mark.parametrize("extra_env", BAD_INPUT_ENVS)
def test_piped_undecodable_bytes(smollm2_gguf, tmp_path, extra_env):
    saved = tmp_path / "chat.json"
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00\x01")
    lines = [
        b"a\xffb",
        b"/system be \xfe brief",
        b"/load " + str(tmp_path / "bin.json").encode(),
        b"/save " + str(tmp_path / "no" / "such" / "dir.json").encode(),
        b"caf\xc3\xa9 \xe9 What is the capital of France?",
        b"/save " + str(saved).encode(),
    ]
    r = subprocess.run(
        [LLM, "chat", str(smollm2_gguf), "--device", "cpu", "--temperature", "0", "--max-tokens", "12"],
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        timeout=180,
        env=dict(os.environ, LLMCLI_HOME=str(tmp_path), **extra_env),
    )
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err and "Error" not in err
    assert err.splitlines() == [
        "Set the system prompt; started a new conversation.",
        f"{tmp_path / 'bin.json'} is not a saved chat: not UTF-8 text (byte 0xff at offset 0)",
        f"cannot save to {tmp_path / 'no' / 'such' / 'dir.json'}: No such file or directory",
        f"Saved 2 messages to {saved}",
    ]
    assert "Paris" in r.stdout.decode()
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["system"] == "be \ufffd brief"
    assert data["messages"][0]["content"] == "caf\u00e9 \ufffd What is the capital of France?"  # valid bytes kept


def test_terminal_undecodable_keystrokes(smollm2_gguf, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(
        smollm2_gguf, tmp_path, "--temperature", "0", "--max-tokens", "12", env={"PYTHONIOENCODING": "utf-8:strict"}
    )
    os.write(child.child_fd, b"a\xffb\r")  # a byte that is not UTF-8: replaced, and the model replies
    child.expect(STATS)
    child.expect_exact(">>> ")
    os.write(child.child_fd, b"\xc3\r")  # half a character (readline gives an empty line): a new prompt
    child.expect_exact(">>> ")
    os.write(child.child_fd, b"/system be \xfe brief\r")
    child.expect_exact("Set the system prompt; started a new conversation.")
    child.expect_exact(">>> ")
    assert "Paris" in ask(child, "What is the capital of France?")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

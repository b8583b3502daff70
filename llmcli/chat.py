"""`llm chat`: the interactive terminal chat (REPL state, slash commands, rendering).

The REPL talks to a small backend interface so its logic can be tested without a model:

    backend.stream(messages, settings) -> Iterator[str]   # text pieces of the reply, as they are generated
    backend.last_stats                                     # TurnStats of the reply being / last generated
    backend.count_tokens(messages), backend.context_length, backend.info()

`EngineBackend` implements it on an LLMEngine (or on anything with the same `.stream(ids, params)`, such as the
SpeculativeDecoder). The engine stays alive across turns, and each turn's prompt is the whole conversation through
the chat template: the engine's prefix cache finds the blocks of every earlier turn, so only the new message (and
the tail block) is computed — time to first token follows the new message, not the history.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

from llmcli.errors import UserError

# llama.cpp / Ollama defaults, used unless the model's generation_config.json or a flag says otherwise.
DEFAULT_MAX_TOKENS = 2048
HISTORY_FILE = "chat_history"
HISTORY_LENGTH = 1000
SAVE_FORMAT = "llmcli-chat"


class CommandError(Exception):
    """A bad slash command or value: reported on one line, the chat goes on."""


# ---- settings ------------------------------------------------------------------------------------------------------


@dataclass
class ChatSettings:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS

    def set(self, name: str, text: str) -> None:
        if name not in _RULES:
            raise CommandError(f"unknown setting {name!r} (one of: {', '.join(_RULES)})")
        setattr(self, name, parse_setting(name, text))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ChatSettings":
        s = cls()
        for k, v in d.items():
            s.set(k, "none" if v is None else str(v))
        return s


# name -> (type, valid?, what a valid value looks like)
_RULES: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "temperature": (float, lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    "repeat_penalty": (float, lambda v: v > 0, "a number > 0 (1 = off)"),
    "seed": (int, lambda v: True, "an integer, or 'none' for a random seed"),
    "max_tokens": (int, lambda v: v >= 1, "an integer >= 1"),
}
SETTING_NAMES = tuple(_RULES)


def parse_setting(name: str, text: str):
    kind, ok, expected = _RULES[name]
    if name == "seed" and text.strip().lower() in ("none", "random", "-1"):
        return None
    try:
        value = kind(text.strip())
    except ValueError:
        raise CommandError(f"invalid value for {name}: {text.strip()!r} (expected {expected})") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise CommandError(f"invalid value for {name}: {text.strip()!r} (expected {expected})")
    return value


def generation_defaults(model_path: Path | None) -> dict:
    """Sampling defaults from a model directory's generation_config.json (only the keys it sets, validated)."""
    if model_path is None or not Path(model_path).is_dir():
        return {}
    f = Path(model_path) / "generation_config.json"
    try:
        gc = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for ours, theirs in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                         ("min_p", "min_p"), ("repeat_penalty", "repetition_penalty")):
        if gc.get(theirs) is not None:
            try:
                out[ours] = parse_setting(ours, str(gc[theirs]))
            except CommandError:
                pass  # a value we cannot use: keep ours
    return out


def sampling_settings(model_path: Path | None, **flags) -> ChatSettings:
    """llama.cpp's defaults, then the model directory's generation_config.json, then the flags that were given
    (None = not given): how `llm run` and `llm chat` both settle their sampling."""
    settings = ChatSettings(**generation_defaults(model_path))
    for name, value in flags.items():
        if value is not None:
            setattr(settings, name, value)
    return settings


# ---- conversation --------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    system: str | None = None
    messages: list[dict] = field(default_factory=list)  # {"role": "user"|"assistant", "content": str}

    def for_template(self, messages: list[dict] | None = None) -> list[dict]:
        sys_msg = [{"role": "system", "content": self.system}] if self.system else []
        return sys_msg + (self.messages if messages is None else messages)


def save_conversation(path: Path, conv: Conversation, settings: ChatSettings, model: str) -> None:
    """JSON, written to a temporary file then renamed so a crash never leaves half a file."""
    data = {"format": SAVE_FORMAT, "version": 1, "model": model, "system": conv.system,
            "settings": settings.to_dict(), "messages": conv.messages}
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CommandError(f"cannot save to {path}: {e.strerror or e}") from None


def load_conversation(path: Path) -> tuple[Conversation, ChatSettings | None]:
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CommandError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise CommandError(f"{path} is not a saved chat (no 'messages' list)")
    messages = []
    for i, m in enumerate(data["messages"]):
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
            raise CommandError(f"{path}: message {i} needs a role (user or assistant) and a text content")
        messages.append({"role": m["role"], "content": m["content"]})
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise CommandError(f"{path}: 'system' must be text")
    settings = None
    if isinstance(data.get("settings"), dict):
        known = {f.name for f in fields(ChatSettings)}
        settings = ChatSettings.from_dict({k: v for k, v in data["settings"].items() if k in known})
    return Conversation(system or None, messages), settings


def fit_context(conv: Conversation, count_tokens: Callable[[list[dict]], int], budget: int) -> int:
    """Drop the oldest turns (never the system prompt, never the newest message) until the prompt fits budget.

    Whole turns go together: after dropping, the conversation starts again at a user message. Returns how many
    messages were dropped (conv.messages is edited in place).
    """
    dropped = 0
    while len(conv.messages) > 1 and count_tokens(conv.for_template()) > budget:
        conv.messages.pop(0)
        dropped += 1
        while len(conv.messages) > 1 and conv.messages[0]["role"] != "user":
            conv.messages.pop(0)
            dropped += 1
    return dropped


# ---- backend -------------------------------------------------------------------------------------------------------


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV blocks were reused from the prefix cache
    generated_tokens: int = 0
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    elapsed_s: float = 0.0
    finish_reason: str | None = None
    speculative: dict | None = None  # SpecStats.to_dict() when a speculative decoder produced the reply


class ChatBackend(Protocol):
    context_length: int
    last_stats: TurnStats

    def stream(self, messages: list[dict], settings: ChatSettings) -> Iterator[str]: ...

    def count_tokens(self, messages: list[dict]) -> int: ...

    def info(self) -> dict[str, str]: ...


class EngineBackend:
    """The chat backend on our engine. `streamer` defaults to the engine itself; anything with the same
    `.stream(prompt_ids, params)` works (speculative decoding: SpeculativeDecoder(engine, draft, ...))."""

    def __init__(self, engine, model_name: str, streamer=None):
        if engine.tokenizer is None:
            raise UserError("this model has no tokenizer, so it cannot chat")
        self.engine, self.model_name = engine, model_name
        self.streamer = streamer if streamer is not None else engine
        bm = engine.block_manager
        self.pool_tokens = len(bm.blocks) * bm.block_size
        self.context_length = min(engine.config.max_position_embeddings, self.pool_tokens)
        self.last_stats = TurnStats()

    def encode(self, messages: list[dict]) -> list[int]:
        tok = self.engine.tokenizer
        if hasattr(tok, "encode_chat"):
            return list(tok.encode_chat(messages))
        return list(tok.apply_chat_template(messages, add_generation_prompt=True))

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self.encode(messages))

    def stream(self, messages: list[dict], settings: ChatSettings) -> Iterator[str]:
        from llmcli.engine.block_manager import OutOfBlocks
        from llmcli.engine.sequence import SamplingParams
        from llmcli.tokenizer import StreamDecoder

        ids = self.last_prompt_ids = self.encode(messages)
        room = self.context_length - len(ids)
        if room < 1:
            raise UserError(f"the prompt ({len(ids)} tokens) does not fit the context ({self.context_length})")
        params = SamplingParams(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                                min_p=settings.min_p, repetition_penalty=settings.repeat_penalty,
                                seed=settings.seed, max_tokens=min(settings.max_tokens, room))
        stats = self.last_stats = TurnStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        decoder = StreamDecoder(self.engine.tokenizer)
        eos = self.engine.eos_token_ids
        events = self.streamer.stream(ids, params)
        try:
            for ev in events:
                s = ev.stats
                stats.cached_tokens, stats.generated_tokens = s.cached_prompt_tokens, s.generated_tokens
                stats.ttft_s, stats.decode_tok_s, stats.finish_reason = s.ttft_s, s.decode_tok_s, s.finish_reason
                if hasattr(s, "speculative"):
                    stats.speculative = s.speculative.to_dict()
                stats.elapsed_s = time.perf_counter() - t0
                if ev.token_id in eos:
                    continue  # the end-of-turn marker is not part of the reply
                piece = decoder.push(ev.token_id)
                if piece:
                    yield piece
            tail = decoder.flush()
            if tail:
                yield tail
        except OutOfBlocks:  # we size replies to fit, so only a pool shared with other work gets here
            raise UserError("the KV cache is full; raise --kv-cache-gib or /clear the conversation") from None
        finally:
            events.close()  # an interrupted reply releases its sequence now (its full blocks stay cached)
            stats.elapsed_s = time.perf_counter() - t0

    def plain_decode_tok_s(self) -> float | None:
        """Plain (non-speculative) decode speed after the last prompt, measured on demand for /stats' speed-up."""
        if self.streamer is self.engine or not getattr(self, "last_prompt_ids", None):
            return None
        from llmcli.engine.block_manager import OutOfBlocks
        from llmcli.engine.speculative import plain_decode_tok_s

        try:
            return plain_decode_tok_s(self.engine, self.last_prompt_ids)
        except OutOfBlocks:  # the pool is full of this conversation: no room for a measuring sequence
            return None

    def info(self) -> dict[str, str]:
        c, e = self.engine.config, self.engine
        n_params = sum(p.numel() for p in e.model.parameters())
        out = {
            "model": self.model_name,
            "architecture": c.family,
            "parameters": _human(n_params),
            "layers": str(c.num_layers),
            "hidden size": str(c.hidden_size),
            "attention heads": f"{c.num_heads} (kv {c.num_kv_heads})",
        }
        if c.num_experts:
            out["experts"] = f"{c.num_experts} ({c.num_experts_per_tok} per token)"
        out.update({
            "vocabulary": str(c.vocab_size),
            "context length": f"{self.context_length} tokens (model {c.max_position_embeddings}, "
                              f"KV pool {self.pool_tokens})",
            "device": str(e.device),
            "dtype": str(e.dtype).replace("torch.", ""),
        })
        if self.streamer is not e:
            out["speculative"] = getattr(self.streamer, "method", type(self.streamer).__name__)
        return out


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


# ---- rendering -----------------------------------------------------------------------------------------------------


class PlainRenderer:
    """Writes each piece as it arrives."""

    def __init__(self, file):
        self.file = file

    def feed(self, piece: str) -> None:
        self.file.write(piece)
        self.file.flush()

    def close(self) -> None:
        self.file.write("\n")
        self.file.flush()


def split_finished_blocks(text: str) -> tuple[str, str]:
    """Split markdown into (complete blocks, unfinished tail).

    A block ends at a blank line outside a fenced code block, or at a closing fence. Rendering only finished
    blocks means a block is never re-rendered differently once printed.
    """
    lines = text.split("\n")
    in_fence, fence, cut = False, "", 0
    pos = 0
    for i, line in enumerate(lines[:-1]):  # the last element is an unterminated line: never complete
        pos += len(line) + 1
        s = line.strip()
        if in_fence:
            if s.startswith(fence) and s.strip("`~") == "":
                in_fence = False
                cut = pos
        elif s.startswith("```") or s.startswith("~~~"):
            in_fence, fence = True, s[:3]
        elif s == "" and i > 0:
            cut = pos
    return text[:cut], text[cut:]


class _Tail:
    """Renders markdown but shows only its last lines, so the live area never outgrows the terminal
    (rich Live cannot redraw what has scrolled off, and would duplicate it)."""

    def __init__(self, text: str):
        self.text = text

    def __rich_console__(self, console, options):
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.text), options, pad=False)
        keep = max(1, console.size.height - 2)
        for line in lines[-keep:]:
            yield from line
            yield Segment.line()


class MarkdownRenderer:
    """Prints finished blocks as rendered Markdown; only the unfinished tail is live (re-rendered)."""

    def __init__(self, console):
        from rich.live import Live

        self.console, self.buf = console, ""
        self.live = Live(console=console, auto_refresh=False, transient=True)
        self.live.start()

    def feed(self, piece: str) -> None:
        from rich.markdown import Markdown

        self.buf += piece
        done, self.buf = split_finished_blocks(self.buf)
        if done.strip():
            self.live.update("", refresh=True)
            self.console.print(Markdown(done))
        self.live.update(_Tail(self.buf), refresh=True)

    def close(self) -> None:
        from rich.markdown import Markdown

        self.live.update("", refresh=True)
        self.live.stop()
        if self.buf.strip():
            self.console.print(Markdown(self.buf))
        self.buf = ""


# ---- input ---------------------------------------------------------------------------------------------------------


def read_message(read: Callable[[str], str], prompt: str = ">>> ", more: str = "... ") -> str:
    """One message: a line, or every line between `\"\"\"` markers (Ollama's multi-line input).

    `read(prompt)` returns a line and raises EOFError at the end of input (Ctrl-D) or KeyboardInterrupt.
    """
    line = read(prompt)
    start = line.lstrip()
    if not start.startswith('"""'):
        return line
    rest = start[3:]
    if rest.rstrip().endswith('"""'):  # """one line"""
        return rest.rstrip()[:-3]
    parts = [rest] if rest else []
    while True:
        line = read(more)
        if line.rstrip().endswith('"""'):
            last = line.rstrip()[:-3]
            if last:
                parts.append(last)
            return "\n".join(parts)
        parts.append(line)


def setup_readline(history: Path | None) -> Callable[[], None]:
    """Arrow-key editing and history (kept in `history`); returns the function that saves it."""
    try:
        import readline
    except ImportError:  # no GNU readline (Windows): plain input() still works
        return lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    if history is None:
        return lambda: None
    try:
        if history.is_file():
            readline.read_history_file(history)
    except OSError:
        pass

    def save() -> None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            tmp = history.with_name(history.name + ".tmp")
            readline.write_history_file(tmp)
            os.replace(tmp, history)
        except OSError:
            pass  # history is a convenience; never fail the exit over it

    return save


@contextmanager
def sigint_flag():
    """While active, Ctrl-C sets flag["hit"] instead of raising, so a reply stops between tokens
    (never in the middle of an engine step, which would leave the KV-cache bookkeeping half done)."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["hit"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


# ---- the session ---------------------------------------------------------------------------------------------------

HELP = [
    ("/help, /?", "show this help"),
    ("/bye, /exit", "leave (Ctrl-D works too)"),
    ("/clear", "start a new conversation (keeps the system prompt and settings)"),
    ("/system TEXT", "set the system prompt (empty: none); starts a new conversation"),
    ("/set NAME VALUE", "change a setting: " + ", ".join(SETTING_NAMES)),
    ("/show", "model information and current settings"),
    ("/save FILE", "save the conversation as JSON"),
    ("/load FILE", "restore a saved conversation"),
    ("/stats", "statistics of the last reply and of this session"),
    ('"""', "begin and end multi-line input"),
]


class ChatSession:
    """REPL state and behaviour. `console` receives everything shown to the user; `err` notices and errors
    (the same console in a terminal, stderr when piped so stdout carries only replies)."""

    def __init__(self, backend: ChatBackend, settings: ChatSettings | None = None, system: str | None = None, *,
                 console=None, err=None, interactive: bool = True, markdown: bool = False, model_name: str = ""):
        from rich.console import Console

        self.backend, self.settings = backend, settings or ChatSettings()
        self.conv = Conversation(system or None)
        self.interactive, self.markdown, self.model_name = interactive, markdown, model_name
        self.console = console or Console(highlight=False)
        self.err = err or self.console
        self.history: list[TurnStats] = []

    # ---- output helpers ----
    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def notice(self, text: str, style: str = "yellow") -> None:
        self.err.print(text, style=style, markup=False, highlight=False)

    def banner(self) -> None:
        info = self.backend.info()
        self.console.print(
            f"[bold]{info.get('model', self.model_name)}[/bold]  device {info.get('device', '?')}  "
            f"dtype {info.get('dtype', '?')}  context {self.backend.context_length} tokens", highlight=False)
        self.console.print('Type /? for help, /bye or Ctrl-D to exit, """ for multi-line input.', style="dim",
                           highlight=False, markup=False)

    # ---- input dispatch ----
    def handle(self, text: str) -> bool:
        """One message or slash command; False when the chat should end."""
        if not text.strip():
            return True
        if text.startswith("/"):
            try:
                return self.command(text)
            except CommandError as e:
                self.notice(str(e))
                return True
        self.send(text)
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.strip().partition(" ")
        arg = arg.strip()
        name = name.lower()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            for cmd, what in HELP:
                self.say(f"  {cmd:<18}{what}")
        elif name == "/clear":
            self.conv.messages.clear()
            self.notice("Cleared the conversation.", style="dim")
        elif name == "/system":
            self.set_system(arg)
        elif name == "/set":
            self.cmd_set(arg)
        elif name == "/show":
            self.cmd_show()
        elif name == "/save":
            if not arg:
                raise CommandError("usage: /save FILE")
            save_conversation(Path(arg), self.conv, self.settings, self.model_name)
            self.notice(f"Saved {len(self.conv.messages)} messages to {arg}", style="dim")
        elif name == "/load":
            if not arg:
                raise CommandError("usage: /load FILE")
            self.cmd_load(Path(arg))
        elif name == "/stats":
            self.cmd_stats()
        else:
            raise CommandError(f"Unknown command {name!r}. Type /? for help.")
        return True

    def set_system(self, text: str) -> None:
        self.conv.system = text or None
        self.conv.messages.clear()  # the system prompt leads the conversation: a new one starts
        self.notice("Set the system prompt; started a new conversation." if text else "Removed the system prompt.",
                    style="dim")

    def cmd_set(self, arg: str) -> None:
        parts = arg.split(None, 1)
        if parts and parts[0] == "parameter":  # Ollama spells it `/set parameter NAME VALUE`
            parts = parts[1].split(None, 1) if len(parts) > 1 else []
        if parts and parts[0] == "system":
            self.set_system(parts[1] if len(parts) > 1 else "")
            return
        if len(parts) != 2:
            raise CommandError(f"usage: /set NAME VALUE  (NAME: {', '.join(SETTING_NAMES)})")
        self.settings.set(parts[0].lower(), parts[1])
        self.notice(f"Set {parts[0].lower()} to {getattr(self.settings, parts[0].lower())}.", style="dim")

    def cmd_show(self) -> None:
        for k, v in self.backend.info().items():
            self.say(f"  {k:<18}{v}")
        self.say("settings:")
        for k, v in self.settings.to_dict().items():
            self.say(f"  {k:<18}{'random' if v is None and k == 'seed' else v}")
        self.say(f"  {'system':<18}{self.conv.system or '(none)'}")
        self.say(f"  {'messages':<18}{len(self.conv.messages)}")

    def cmd_load(self, path: Path) -> None:
        conv, settings = load_conversation(path)
        self.conv = conv
        if settings is not None:
            self.settings = settings
        self.notice(f"Loaded {len(conv.messages)} messages from {path}", style="dim")
        if conv.system:
            self.say(f"system: {conv.system}", style="dim")
        for m in conv.messages:
            self.say(f"{m['role']}: {m['content']}", style="dim")

    def cmd_stats(self) -> None:
        if not self.history:
            self.say("No replies yet.")
            return
        last = self.history[-1]
        self.say(f"  last reply        {_stats_line(last)}")
        gen = sum(s.generated_tokens for s in self.history)
        prompt = sum(s.prompt_tokens for s in self.history)
        reused = sum(s.cached_tokens for s in self.history)
        self.say(f"  session           {len(self.history)} replies, {gen} tokens generated, {prompt} prompt tokens "
                 f"({reused} reused from the prefix cache)")
        used = self.backend.count_tokens(self.conv.for_template()) if self.conv.messages else 0
        self.say(f"  context           {used} of {self.backend.context_length} tokens used")
        spec = [s.speculative for s in self.history if s.speculative]
        if spec:
            drafted, accepted = sum(s["drafted"] for s in spec), sum(s["accepted"] for s in spec)
            steps = sum(s["steps"] for s in spec)
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            self.say(f"  speculative       last reply {last.speculative['acceptance_rate']:.0%} accepted, "
                     f"{last.speculative['mean_accepted']:.2f} per step; session {rate} of {drafted} drafts, "
                     f"{accepted / max(steps, 1):.2f} per step")
            plain = getattr(self.backend, "plain_decode_tok_s", lambda: None)()
            if plain and last.decode_tok_s:
                self.say(f"  speed-up          ~{last.decode_tok_s / plain:.2f}x vs plain decoding "
                         f"({last.decode_tok_s:.1f} vs {plain:.1f} tok/s, plain measured now on the last prompt)")

    # ---- one turn ----
    def send(self, text: str) -> None:
        # Ctrl-C anywhere in a turn sets the flag (never raises mid engine step); the reply stops at the next token.
        with sigint_flag() as flag:
            self.conv.messages.append({"role": "user", "content": text})
            if not self._fit():
                self.conv.messages.pop()
                return
            renderer = (MarkdownRenderer(self.console) if self.markdown and self.interactive
                        else PlainRenderer(self.console.file))
            pieces: list[str] = []
            stream = self.backend.stream(self.conv.for_template(), self.settings)
            try:
                for piece in stream:
                    pieces.append(piece)
                    renderer.feed(piece)
                    if flag["hit"]:
                        break
            except UserError as e:
                renderer.close()
                self.conv.messages.pop()
                self.notice(str(e), style="red")
                return
            finally:
                stream.close()
            renderer.close()
            interrupted = flag["hit"]
        reply = "".join(pieces)
        if reply:
            self.conv.messages.append({"role": "assistant", "content": reply})
        else:  # nothing to keep: drop the question too, so roles keep alternating
            self.conv.messages.pop()
        stats = self.backend.last_stats
        self.history.append(stats)
        if interrupted:
            self.notice("(interrupted)", style="dim")
        if self.interactive:
            self.console.print(_stats_line(stats), style="dim", highlight=False, markup=False)
            self.console.print()

    def _fit(self) -> bool:
        """Make room for the reply: drop the oldest turns when the conversation outgrows the context."""
        limit = self.backend.context_length
        n = self.backend.count_tokens(self.conv.for_template(self.conv.messages[-1:]))
        if n >= limit:  # hopeless on its own: keep the history rather than drop it for nothing
            self.notice(f"This message is too long: {n} tokens with the system prompt, the context holds {limit}.",
                        style="red")
            return False
        reserve = min(self.settings.max_tokens, max(1, limit // 4))
        dropped = fit_context(self.conv, self.backend.count_tokens, limit - reserve)
        if dropped:
            self.notice(f"(the conversation outgrew the {limit}-token context: dropped the {dropped} oldest "
                        f"message{'s' if dropped > 1 else ''})")
        return True

    # ---- loops ----
    def run_interactive(self, read: Callable[[str], str] = input) -> None:
        while True:
            try:
                text = read_message(read)
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print()
                self.notice("Use Ctrl-D or /bye to exit.", style="dim")
                continue
            try:
                if not self.handle(text):
                    return
            except KeyboardInterrupt:  # Ctrl-C in a slow command (a reply has its own handling)
                self.console.print()
                self.notice("(interrupted)", style="dim")

    def run_piped(self, lines: Iterable[str]) -> None:
        it = iter(lines)

        def read(_prompt: str) -> str:
            try:
                return next(it).rstrip("\n")
            except StopIteration:
                raise EOFError from None

        while True:
            try:
                text = read_message(read)
            except EOFError:
                return
            if not self.handle(text):
                return


def _stats_line(s: TurnStats) -> str:
    reused = f"{s.cached_tokens}/{s.prompt_tokens} prompt tokens reused"
    return (f"{s.generated_tokens} tokens · {s.decode_tok_s:.1f} tok/s · TTFT {s.ttft_s * 1000:.0f} ms · {reused}")


def history_path() -> Path:
    from llmcli.paths import llmcli_home

    return llmcli_home() / HISTORY_FILE

"""The chat session: one REPL's state, its slash commands, and the turns it sends to the backend."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from rich.console import Console

from llmcli.chat.backend import ChatBackend, TurnStats
from llmcli.chat.conversation import (
    KEEP_AFTER_DROP,
    CommandError,
    Conversation,
    default_settings,
    fit_context,
    load_conversation,
    save_conversation,
)
from llmcli.chat.render import MarkdownRenderer, PlainRenderer
from llmcli.chat.terminal import read_message, sigint_flag
from llmcli.engine.sampling_params import SETTING_NAMES, SamplingParams, SettingError
from llmcli.engine.text import valid_text
from llmcli.errors import UserError

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

    def __init__(
        self,
        backend: ChatBackend,
        settings: SamplingParams | None = None,
        system: str | None = None,
        *,
        console: Console | None = None,
        err: Console | None = None,
        interactive: bool = True,
        markdown: bool = False,
        model_name: str = "",
    ):
        self.backend, self.settings = backend, settings or default_settings()
        self.conv = Conversation(valid_text(system) if system else None)
        self.interactive, self.markdown, self.model_name = interactive, markdown, model_name
        self.console = console or Console(highlight=False)
        self.err = err or self.console
        self.history: list[TurnStats] = []
        self.keep_after_drop = KEEP_AFTER_DROP  # fraction of the context kept when turns must go (1.0: the least)

    # ---- output helpers ----
    def say(self, text: str, style: str | None = None) -> None:
        self.console.print(text, style=style, markup=False, highlight=False)

    def notice(self, text: str, style: str = "yellow") -> None:
        self.err.print(text, style=style, markup=False, highlight=False)

    def banner(self) -> None:
        info = self.backend.info()
        self.console.print(
            f"[bold]{info.get('model', self.model_name)}[/bold]  device {info.get('device', '?')}  "
            f"dtype {info.get('dtype', '?')}  context {self.backend.context_length} tokens{self._limit_note()}",
            highlight=False,
        )
        self.console.print(
            'Type /? for help, /bye or Ctrl-D to exit, """ for multi-line input.',
            style="dim",
            highlight=False,
            markup=False,
        )

    # ---- input dispatch ----
    def handle(self, text: str) -> bool:
        """One message or slash command; False when the chat should end. Whatever the input, the chat goes on:
        undecodable bytes become U+FFFD (valid_text) before anything sees them, and an error is one line that
        leaves the conversation as it was."""
        text = valid_text(text)
        if not text.strip():
            return True
        kept = Conversation(self.conv.system, list(self.conv.messages))
        try:
            if text.startswith("/"):
                return self.command(text)
            self.send(text)
        except (CommandError, UserError) as e:
            self.conv = kept
            self.notice(str(e), style="red" if isinstance(e, UserError) else "yellow")
        except Exception as e:  # a bug must not end the session and lose the conversation: one line, go on
            self.conv = kept
            self.notice(f"error: {type(e).__name__}: {e} (the conversation is kept)", style="red")
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
        self.notice(
            "Set the system prompt; started a new conversation." if text else "Removed the system prompt.", style="dim"
        )

    def cmd_set(self, arg: str) -> None:
        parts = arg.split(None, 1)
        if parts and parts[0] == "parameter":  # Ollama spells it `/set parameter NAME VALUE`
            parts = parts[1].split(None, 1) if len(parts) > 1 else []
        if parts and parts[0] == "system":
            self.set_system(parts[1] if len(parts) > 1 else "")
            return
        if len(parts) != 2:
            raise CommandError(f"usage: /set NAME VALUE  (NAME: {', '.join(SETTING_NAMES)})")
        name = parts[0].lower()
        try:
            self.settings = self.settings.with_setting(name, parts[1])
        except SettingError as e:
            raise CommandError(str(e)) from None
        self.notice(f"Set {name} to {self.settings.setting(name)}.", style="dim")

    def cmd_show(self) -> None:
        for k, v in self.backend.info().items():
            self.say(f"  {k:<18}{v}")
        self.say("settings:")
        for k, v in self.settings.settings().items():
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
        self.say(
            f"  session           {len(self.history)} replies, {gen} tokens generated, {prompt} prompt tokens "
            f"({reused} reused from the prefix cache)"
        )
        used = self.backend.count_tokens(self.conv.for_template()) if self.conv.messages else 0
        self.say(f"  context           {used} of {self.backend.context_length} tokens used")
        spec = [s.speculative for s in self.history if s.speculative]
        if spec:
            drafted, accepted = sum(s["drafted"] for s in spec), sum(s["accepted"] for s in spec)
            steps = sum(s["steps"] for s in spec)
            rate = f"{accepted / drafted:.0%}" if drafted else "-"
            self.say(
                f"  speculative       last reply {last.speculative['acceptance_rate']:.0%} accepted, "
                f"{last.speculative['mean_accepted']:.2f} per step; session {rate} of {drafted} drafts, "
                f"{accepted / max(steps, 1):.2f} per step"
            )
            plain = getattr(self.backend, "plain_decode_tok_s", lambda: None)()
            if plain and last.decode_tok_s:
                self.say(
                    f"  speed-up          ~{last.decode_tok_s / plain:.2f}x vs plain decoding "
                    f"({last.decode_tok_s:.1f} vs {plain:.1f} tok/s, plain measured now on the last prompt)"
                )

    # ---- one turn ----
    def send(self, text: str) -> None:
        # Ctrl-C anywhere in a turn sets the flag (never raises mid engine step); the reply stops at the next token.
        with sigint_flag() as flag:
            self.conv.messages.append({"role": "user", "content": text})
            if not self._fit():
                self.conv.messages.pop()
                return
            renderer = (
                MarkdownRenderer(self.console)
                if self.markdown and self.interactive
                else PlainRenderer(self.console.file)
            )
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
            self.notice(
                f"This message is too long: {n} tokens with the system prompt, the context holds {limit}"
                f"{self._limit_note()}.",
                style="red",
            )
            return False
        reserve = min(self.settings.max_tokens, max(1, limit // 4))
        keep = int(limit * self.keep_after_drop)
        dropped = fit_context(self.conv, self.backend.count_tokens, limit - reserve, target=keep)
        if dropped:
            self.notice(
                f"(the conversation outgrew the {limit}-token context{self._limit_note()}: dropped the {dropped} "
                f"oldest message{'s' if dropped > 1 else ''})"
            )
        return True

    def _limit_note(self) -> str:
        """ ", limited by the KV cache (...)" when the KV budget, not the model, sets the context."""
        why = getattr(self.backend, "context_limit", "")
        return f", limited by {why}" if why else ""

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
            except UnicodeDecodeError:  # a terminal whose input decoding is strict (the CLI makes it lenient)
                self.notice("That input was not valid text (UTF-8); nothing was sent.")
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
            except UnicodeDecodeError:  # a stream whose decoding is strict (the CLI makes it lenient)
                self.notice("A line was not valid text (UTF-8); it was skipped.")
                continue
            if not self.handle(text):
                return


def _stats_line(s: TurnStats) -> str:
    reused = f"{s.cached_tokens}/{s.prompt_tokens} prompt tokens reused"
    return f"{s.generated_tokens} tokens · {s.decode_tok_s:.1f} tok/s · TTFT {s.ttft_s * 1000:.0f} ms · {reused}"

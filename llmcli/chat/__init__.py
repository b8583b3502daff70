"""`llm chat`'s REPL: the session and its slash commands (session), the conversation and its saved form
(conversation), the engine behind it (backend), how replies are shown (render) and terminal input (terminal)."""

"""`llm chat`: the terminal chat."""

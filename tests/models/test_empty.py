"""llmcli.models.empty: meta-device construction that runs no random initialization, and its allocation."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from llmcli.config import from_hf_dict
from llmcli.models.empty import empty_init, to_empty
from llmcli.models.transformer import Transformer

RANDOM_OPS = ("normal_", "uniform_", "bernoulli_", "exponential_", "log_normal_", "cauchy_", "random_")


class CountRandomOps(TorchDispatchMode):
    """Counts the aten random fills that really run (whatever device), by name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in RANDOM_OPS:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _config():
    return from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )


def test_empty_init_runs_no_random_fill():
    plain = CountRandomOps()
    with torch.device("meta"), plain:
        Transformer(_config())
    assert plain.calls.get("normal_") and plain.calls.get("uniform_")  # the counter sees what meta alone runs
    empty = CountRandomOps()
    with empty_init(), empty:
        model = Transformer(_config())
    assert empty.calls == {}
    assert all(p.is_meta for p in model.parameters())


def test_initialization_outside_is_untouched():
    with empty_init():
        pass
    torch.manual_seed(0)
    a = nn.Embedding(256, 64).weight
    torch.manual_seed(0)
    b = torch.empty(256, 64).normal_()
    assert torch.equal(a, b)  # nn.Embedding's own init, N(0, 1), exactly as torch does it
    w = torch.empty(3, 3)
    with empty_init():
        nn.init.normal_(w)  # a real tensor inside: still filled
    assert torch.isfinite(w).all() and w.std() > 0


def test_to_empty_matches_torch():
    with empty_init():
        ours = Transformer(_config())
    with empty_init():
        theirs = Transformer(_config())
    to_empty(ours, torch.device("cpu"))
    theirs.to_empty(device=torch.device("cpu"))
    a, b = dict(ours.named_parameters(remove_duplicate=False)), dict(theirs.named_parameters(remove_duplicate=False))
    assert a.keys() == b.keys()
    for name, p in a.items():
        q = b[name]
        assert type(p) is type(q) and p.requires_grad == q.requires_grad, name
        assert (p.shape, p.stride(), p.dtype, p.device) == (q.shape, q.stride(), q.dtype, q.device), name

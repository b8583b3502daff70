"""Speculative decoding: n-gram drafting, exactness of the rejection-sampling step, and the engine integration.

Exactness is tested on a synthetic Markov chain (next-token distribution depends on the previous token) where the
target's distribution over the first few generated tokens has a closed form; many seeded speculative runs in one
batch must match it within sampling error (chi-square test, p-value from the regularized gamma function).
"""

from __future__ import annotations

import functools

import pytest
import torch

from llmcli.engine.speculative import AdaptiveK, SpecStats, greedy_verify, ngram_propose, rejection_sample, sample


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny forwards: one intra-op thread is faster, and far faster on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- n-gram drafting ----------------------------------------------------------------------------------------------


def _ngram_reference(ctx: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Plain-Python statement of the rule: longest suffix first, latest earlier match with a following token."""
    for n in range(min(max_ngram, len(ctx) - 1), min_ngram - 1, -1):
        suffix = ctx[len(ctx) - n :]
        for i in range(len(ctx) - n - 1, -1, -1):  # start i, match must end before the last token
            if ctx[i : i + n] == suffix:
                return ctx[i + n : i + n + k]
    return []


def test_ngram_examples():
    t = torch.tensor
    # "a b c d ... a b" -> what followed "a b": "c d"
    assert ngram_propose(t([1, 2, 3, 4, 5, 1, 2]), k=2).tolist() == [3, 4]
    # k larger than what follows: stops at the end of the context
    assert ngram_propose(t([1, 2, 3, 1, 2]), k=10).tolist() == [3, 1, 2]
    # the longer match wins over a later shorter one: suffix "7 8 9" matched at the start, not "9" later on
    assert ngram_propose(t([7, 8, 9, 1, 6, 9, 2, 7, 8, 9]), k=1, max_ngram=3).tolist() == [1]
    # nothing repeats: no draft
    assert ngram_propose(t([1, 2, 3, 4]), k=3).numel() == 0
    assert ngram_propose(t([5]), k=3).numel() == 0
    # min_ngram=2 ignores single-token matches
    assert ngram_propose(t([4, 9, 5, 9]), k=2, min_ngram=2).numel() == 0
    assert ngram_propose(t([4, 9, 5, 9]), k=2, min_ngram=1).tolist() == [5, 9]


def test_ngram_matches_reference_on_random_sequences():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        length = int(torch.randint(1, 40, (1,), generator=g))
        ctx = torch.randint(0, 4 if trial % 2 else 12, (length,), generator=g)
        k, mx, mn = int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)), 1
        assert ngram_propose(ctx, k, mx, mn).tolist() == _ngram_reference(ctx.tolist(), k, mx, mn), ctx.tolist()


# ---- exactness on a synthetic Markov chain --------------------------------------------------------------------------

V, START = 5, 0


def _chain(seed: int, concentration: float = 1.0) -> torch.Tensor:
    """A random row-stochastic [V, V] transition matrix (float64 so closed-form probabilities are precise)."""
    g = torch.Generator().manual_seed(seed)
    return _dirichlet(g, concentration)


def _dirichlet(g: torch.Generator, concentration: float) -> torch.Tensor:
    # -log(U) is Exponential(1) = Gamma(1): normalized, a Dirichlet(1) row; raise to 1/concentration to sharpen
    e = -torch.rand(V, V, generator=g, dtype=torch.float64).log()
    e = e ** (1.0 / concentration)
    return e / e.sum(-1, keepdim=True)


def _resample_from_target(d, q, p, g):
    """A classic bug, used as a control: at a rejection, sample from the target p instead of max(0, p - q)."""
    tokens, n_acc = rejection_sample(d, q, p, g)
    rows = torch.arange(d.shape[0])
    rejected = n_acc < d.shape[1]
    redo = sample(p[rows, n_acc.clamp(max=d.shape[1] - 1)], g)
    tokens[rows, n_acc] = torch.where(rejected, redo, tokens[rows, n_acc])
    return tokens, n_acc


def _simulate(
    target: torch.Tensor,
    draft: torch.Tensor | None,
    k: int,
    rows: int,
    n_tokens: int,
    seed: int,
    verify=rejection_sample,
) -> torch.Tensor:
    """Run speculative sampling for `rows` independent sequences in lockstep; first n_tokens of each [rows, n]."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.full((rows, n_tokens + k + 1), -1, dtype=torch.long)
    length = torch.zeros(rows, dtype=torch.long)
    last = torch.full((rows,), START, dtype=torch.long)
    r = torch.arange(rows)
    while int(length.min()) < n_tokens:
        prev, drafts, qs = last, [], []
        for _ in range(k):
            if draft is None:  # deterministic drafter (like n-gram lookup): a fixed function of the previous token
                x = (prev * 3 + 1) % V
            else:
                qs.append(draft[prev])
                x = sample(qs[-1], g)
            drafts.append(x)
            prev = x
        d = torch.stack(drafts, 1) if k else torch.empty(rows, 0, dtype=torch.long)
        ctx = torch.cat([last.unsqueeze(1), d], 1)  # the token each of the K + 1 target positions conditions on
        q = torch.stack(qs, 1) if qs else None
        tokens, n_acc = verify(d, q, target[ctx], g)
        pos = length.unsqueeze(1) + torch.arange(k + 1)
        active = length < n_tokens  # finished rows keep stepping (lockstep) but write nothing
        valid = (torch.arange(k + 1) < (n_acc + 1).unsqueeze(1)) & active.unsqueeze(1)
        rr = r.unsqueeze(1).expand_as(pos)
        buf[rr[valid], pos[valid]] = tokens[valid]
        last = tokens[r, n_acc]
        length += torch.where(active, n_acc + 1, 0)
    return buf[:, :n_tokens]


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    stat = ((counts - expected) ** 2 / expected).sum()
    df = probs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def _pvalues(samples: torch.Tensor, target: torch.Tensor) -> list[float]:
    """p-values of: each position's marginal, and each consecutive pair's joint, against the closed form."""
    out = []
    dist = torch.zeros(V, dtype=torch.float64)
    dist[START] = 1
    for i in range(samples.shape[1]):
        prev_dist = dist
        dist = dist @ target  # marginal of token i
        out.append(_chi2_pvalue(torch.bincount(samples[:, i], minlength=V).double(), dist))
        if i:
            joint = (prev_dist.unsqueeze(1) * target).reshape(-1)  # P(x_{i-1} = a, x_i = b)
            pairs = samples[:, i - 1] * V + samples[:, i]
            out.append(_chi2_pvalue(torch.bincount(pairs, minlength=V * V).double(), joint))
    return out


ROWS = 50_000


@pytest.mark.parametrize("k", [1, 3, 6])
def test_draft_model_sampling_is_exact(k):
    target, draft = _chain(1), _chain(2, concentration=0.5)
    p = _pvalues(_simulate(target, draft, k, ROWS, 4, seed=10 + k), target)
    assert min(p) > 1e-4, p


def test_deterministic_drafts_sampling_is_exact():
    target = _chain(3)
    p = _pvalues(_simulate(target, None, 4, ROWS, 4, seed=7), target)
    assert min(p) > 1e-4, p


def test_exactness_check_detects_a_wrong_correction():
    """Control: resampling from p (not the residual) after a rejection biases the output; the check must see it."""
    target, draft = _chain(1), _chain(2, concentration=0.5)
    p = _pvalues(_simulate(target, draft, 3, ROWS, 4, seed=5, verify=_resample_from_target), target)
    assert min(p) < 1e-6, p


@pytest.mark.parametrize("one_hot", [False, True])
def test_acceptance_rate_matches_closed_form(one_hot):
    """P(accept) = sum_x min(p(x), q(x)) with the draft's q; sum_x q(x) p(x) when drafts are verified as one-hot.

    (The one-hot rule is exact for any way of choosing the draft, which is why n-gram drafts need no q; knowing q
    only raises acceptance.)
    """
    g = torch.Generator().manual_seed(3)
    p, q = _chain(5)[0], _chain(6, concentration=0.5)[0]
    n = ROWS
    drafts = sample(q.expand(n, 1, V), g)
    _, n_acc = rejection_sample(drafts, None if one_hot else q.expand(n, 1, V), p.expand(n, 2, V), g)
    expected = float((q * p).sum() if one_hot else torch.minimum(p, q).sum())
    sigma = (expected * (1 - expected) / n) ** 0.5
    assert abs(float(n_acc.double().mean()) - expected) < 5 * sigma


def test_identical_draft_accepts_everything():
    target = _chain(4)
    g = torch.Generator().manual_seed(0)
    probs = target[torch.randint(0, V, (64, 4), generator=g)]
    drafts = sample(probs[:, :3], g)
    tokens, n_acc = rejection_sample(drafts, probs[:, :3], probs, g)
    assert (n_acc == 3).all() and (tokens[:, :3] == drafts).all() and (tokens[:, 3] >= 0).all()


def test_zero_probability_draft_is_always_rejected():
    target = torch.tensor([[[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]]]).expand(200, 2, 3)
    tokens, n_acc = rejection_sample(torch.zeros(200, 1, dtype=torch.long), None, target)
    assert (n_acc == 0).all() and (tokens[:, 0] != 0).all() and (tokens[:, 1] == -1).all()


# ---- greedy --------------------------------------------------------------------------------------------------------


def test_greedy_verify_equals_step_by_step_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V, V, generator=g)  # next-token logits given the previous token
    for trial in range(50):
        # plain greedy chain from START
        ref, t = [], START
        for _ in range(12):
            t = int(logits[t].argmax())
            ref.append(t)
        out, last = [], START
        while len(out) < 12:
            k = trial % 5
            d = torch.randint(0, V, (1, k), generator=g)
            if trial % 2 and k:  # half the time drafts partially agree with the target
                d[0, : k // 2 + 1] = torch.tensor(ref[len(out) : len(out) + k // 2 + 1] + [0] * k)[: k // 2 + 1]
            ctx = torch.cat([torch.tensor([[last]]), d], 1)
            tokens, n = greedy_verify(d, logits[ctx])
            emitted = tokens[0, : int(n) + 1].tolist()
            out += emitted
            last = emitted[-1]
        assert out[:12] == ref


# ---- bookkeeping ---------------------------------------------------------------------------------------------------


def test_stats_and_adaptive_k():
    s = SpecStats()
    s.update(4, 4)
    s.update(4, 1)
    s.update(0, 0)
    assert (s.steps, s.drafted, s.accepted, s.emitted) == (3, 8, 5, 8)
    assert s.acceptance_rate == 5 / 8 and s.mean_accepted == 5 / 3
    a = AdaptiveK(4, lo=1, hi=6)
    a.update(4, 4)
    assert a.k == 6
    a.update(6, 6)
    assert a.k == 6
    for _ in range(10):
        a.update(a.k, 0)
    assert a.k == 1


# ---- integration with the engine: tiny random models -----------------------------------------------------------------

# a prompt with repeated runs, so n-gram lookup finds matches
PROMPT = [5, 17, 42, 99, 7, 5, 17, 42, 99, 7, 5, 17, 3, 250, 12, 5, 17]


@pytest.fixture(scope="module")
def tiny_engines(tiny_model, tmp_path_factory):
    """(target, draft with other weights, second copy of the target, target dir) on CPU."""
    from conftest import build_tiny_model

    from llmcli.engine.llm_engine import LLMEngine

    target_dir = tiny_model("llama")
    other_dir = build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-draft"), seed=1)

    def load(d):
        return LLMEngine.load(d, device="cpu", tokenizer=False, kv_cache_gib=0.01)

    return load(target_dir), load(other_dir), load(target_dir), target_dir


def _params(**kw):
    from llmcli.engine.sampling_params import SamplingParams

    return SamplingParams(**{"temperature": 0.0, "max_tokens": 40, "ignore_eos": True, **kw})


@pytest.mark.parametrize(
    "method,k,adaptive",
    [("ngram", 3, False), ("ngram", 10, True), ("draft", 4, True), ("draft", 2, False), ("self", 5, False)],
)
def test_greedy_output_identical_to_plain_decoding(tiny_engines, method, k, adaptive):
    from llmcli.engine.speculative import SpeculativeDecoder

    target, other, copy, _ = tiny_engines
    plain = target.generate([PROMPT], _params())[0]
    draft = {"ngram": None, "draft": other, "self": copy}[method]
    dec = SpeculativeDecoder(
        target, draft, method="ngram" if method == "ngram" else "draft", num_draft=k, adaptive=adaptive
    )
    assert dec.generate(PROMPT, _params()) == plain
    s = dec.stats
    assert s.drafted > 0 and s.emitted == len(plain) - 1  # the first token comes from the prefill step
    assert s.steps < len(plain) - 1 or method == "draft"  # something was accepted
    if method == "self":  # a draft with the target's own weights is right every time: checks the cache rollback
        assert s.acceptance_rate == 1.0


@pytest.mark.parametrize("use_draft", [False, True])
def test_greedy_with_repetition_penalty_identical(tiny_engines, use_draft):
    """The penalty depends on the history, so each verified position must see its own prefix (drafts included)."""
    from llmcli.engine.speculative import SpeculativeDecoder

    target, _, copy, _ = tiny_engines
    params = _params(repetition_penalty=1.5)
    plain = target.generate([PROMPT], params)[0]
    assert plain != target.generate([PROMPT], _params())[0]  # the penalty matters here
    dec = SpeculativeDecoder(target, copy if use_draft else None, num_draft=5)
    assert dec.generate(PROMPT, params) == plain
    if use_draft:
        assert dec.stats.acceptance_rate == 1.0


def test_stops_like_plain_decoding(tiny_engines):
    from llmcli.engine.speculative import SpeculativeDecoder

    target, _, copy, _ = tiny_engines
    plain = target.generate([PROMPT], _params())[0]
    stop = plain[13]  # a token first seen mid-way: plain decoding stops right after it
    ref = target.generate([PROMPT], _params(stop_token_ids=(stop,)))[0]
    assert ref[-1] == stop and len(ref) < len(plain)
    dec = SpeculativeDecoder(target, copy, num_draft=6)
    events = list(dec.stream(PROMPT, _params(stop_token_ids=(stop,))))
    assert [e.token_id for e in events] == ref and events[-1].stats.finish_reason == "stop"
    for n in (1, 2, 7):  # the token budget is exact even when a step could emit more
        events = list(dec.stream(PROMPT, _params(max_tokens=n)))
        assert [e.token_id for e in events] == plain[:n] and events[-1].stats.finish_reason == "length"
    # sequences are released: the pool is whole again
    assert target.block_manager.num_free == len(target.block_manager.blocks)


def test_seeded_sampling_reproduces(tiny_engines):
    from llmcli.engine.speculative import SpeculativeDecoder

    target, other, _, _ = tiny_engines
    dec = SpeculativeDecoder(target, other, num_draft=3)
    a = dec.generate(PROMPT, _params(temperature=0.8, seed=11))
    b = dec.generate(PROMPT, _params(temperature=0.8, seed=11))
    c = dec.generate(PROMPT, _params(temperature=0.8, seed=12))
    assert a == b and a != c


def test_draft_with_other_vocabulary_is_refused(tiny_engines, tiny_model):
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.speculative import SpeculativeDecoder
    from llmcli.errors import UserError

    target = tiny_engines[0]
    other = LLMEngine.load(tiny_model("llama", vocab_size=300), device="cpu", tokenizer=False, kv_cache_gib=0.01)
    with pytest.raises(UserError, match="vocabulary"):
        SpeculativeDecoder(target, other)

    class Tok:  # same size, one token mapped elsewhere
        def __init__(self, swap):
            v = {f"t{i}": i for i in range(256)}
            if swap:
                v["t0"], v["t1"] = 1, 0
            self.vocab = v

        def get_vocab(self):
            return self.vocab

    a, b = tiny_engines[0], tiny_engines[2]
    try:
        a.tokenizer, b.tokenizer = Tok(False), Tok(True)
        with pytest.raises(UserError, match="tokenizer"):
            SpeculativeDecoder(a, b)
        b.tokenizer = Tok(False)
        SpeculativeDecoder(a, b)
    finally:
        a.tokenizer = b.tokenizer = None


TEMPERATURE = 0.1  # the tiny model's logits are small: sharpen them so a few hundred runs resolve the distribution
RUNS = 400


@functools.lru_cache(maxsize=2)  # both drafting methods check against the same reference
def _reference_marginals(model_dir, prompt, temperature, n_tokens=3, min_prob=1e-6):
    """Exact marginals of generated tokens 2..n_tokens from transformers, enumerating prefixes of prob > min_prob.

    The prompt runs once; each enumeration level forwards one token per kept prefix over the parent's KV cache
    (reorder_cache selects/duplicates the parents' rows).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    marginals = []
    with torch.no_grad():
        out = model(torch.tensor([list(prompt)]), use_cache=True)
        cache, logits, weights = out.past_key_values, out.logits[:, -1], torch.ones(1, dtype=torch.float64)
        for step in range(n_tokens):
            probs = (logits.double() / temperature).softmax(-1) * weights[:, None]  # joint P(prefix, next)
            if step:
                marginals.append(probs.sum(0))
            if step == n_tokens - 1:
                break
            parents, toks = (probs > min_prob).nonzero().unbind(1)
            cache.reorder_cache(parents)
            logits = model(toks[:, None], past_key_values=cache, use_cache=True).logits[:, -1]
            weights = probs[parents, toks]
    return marginals


def _binned_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square over tokens expected >= 5 times, the rest pooled into one bin."""
    n = counts.sum()
    big = probs * n >= 5
    c = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    p = torch.cat([probs[big], (1 - probs[big].sum()).clamp(min=0).reshape(1)])
    if p[-1] * n < 1:  # nothing worth a bin left over
        c, p = c[:-1], p[:-1] / p[:-1].sum()
    return _chi2_pvalue(c.double(), p)


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampling_distribution_matches_target(tiny_engines, method):
    """Tokens 2 and 3 (both produced by draft-verify steps) follow the target's exact distribution."""
    from llmcli.engine.speculative import SpeculativeDecoder

    target, other, _, target_dir = tiny_engines
    # every token id occurs once in the prompt, so n-gram lookup always finds the last token and drafts
    prompt = torch.randperm(256, generator=torch.Generator().manual_seed(0)).tolist() + PROMPT[:6]
    dec = SpeculativeDecoder(
        target, other if method == "draft" else None, method=method, num_draft=2, adaptive=False, min_ngram=1
    )
    outs, drafted = [], 0
    for seed in range(RUNS):
        outs.append(dec.generate(prompt, _params(temperature=TEMPERATURE, max_tokens=3, seed=seed)))
        drafted += dec.stats.drafted
    outs = torch.tensor(outs)
    m2, m3 = _reference_marginals(target_dir, tuple(prompt), TEMPERATURE)
    vocab = m2.numel()
    p2 = _binned_pvalue(torch.bincount(outs[:, 1], minlength=vocab), m2)
    p3 = _binned_pvalue(torch.bincount(outs[:, 2], minlength=vocab), m3)
    assert min(p2, p3) > 1e-3, (p2, p3)
    assert drafted > RUNS // 2  # most runs really went through a draft-verify step


def test_cli_flag_errors_are_user_errors(tiny_engines):
    from llmcli.cli.options import make_decoder
    from llmcli.errors import UserError

    target = tiny_engines[0]
    assert make_decoder(target) is None
    for kw, msg in (
        (dict(num_draft=3), "--num-draft needs"),
        (dict(speculate="eagle"), "only 'ngram'"),
        (dict(speculate="ngram", draft="x"), "either"),
        (dict(speculate="ngram", num_draft=0), "between"),
    ):
        with pytest.raises(UserError, match=msg):
            make_decoder(target, **kw)


# ---- the real model --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_gguf):
    from llmcli.engine.llm_engine import LLMEngine

    return LLMEngine.load(smollm2_gguf, device="cpu", kv_cache_gib=0.1)


def test_smollm2_ngram_greedy_identical_and_accepted(smollm2_engine):
    """Copying a passage: n-gram drafts are mostly accepted and the reply is plain greedy's, token for token."""
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.speculative import SpeculativeDecoder
    from llmcli.tools.bench import REPEAT_PROMPT

    engine = smollm2_engine
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": REPEAT_PROMPT}])
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain = engine.generate([ids], params)[0]
    dec = SpeculativeDecoder(engine, None, method="ngram", num_draft=8)
    assert dec.generate(ids, params) == plain
    assert engine.tokenizer.decode(plain).startswith("The old lighthouse stood")  # it really copies
    assert dec.stats.acceptance_rate > 0.8 and dec.stats.steps <= len(plain) // 3


def test_smollm2_run_json_reports_speculation(smollm2_gguf, capsys):
    import json

    from llmcli.cli import main
    from llmcli.tools.bench import PASSAGE

    with pytest.raises(SystemExit) as e:
        main(
            [
                "run",
                str(smollm2_gguf),
                f"Repeat this exactly: {PASSAGE[:120]}",
                "--json",
                "-t",
                "0",
                "-n",
                "24",
                "--speculate",
                "ngram",
                "--kv-cache-gib",
                "0.1",
            ]
        )
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    s = out["speculative"]
    assert s["drafted"] > 0 and 0 < s["acceptance_rate"] <= 1 and s["mean_accepted"] > 1
    assert s["speedup_est"] > 0 and out["generated_tokens"] == s["emitted"] + 1


def test_smollm2_chat_stats_show_acceptance_and_speedup(smollm2_engine):
    """/stats in chat: acceptance, accepted per step, and a speed-up against plain decoding measured on the same
    prompt."""
    import io
    import re

    from rich.console import Console

    from llmcli.chat.backend import EngineBackend
    from llmcli.chat.session import ChatSession
    from llmcli.engine.sampling_params import SamplingParams
    from llmcli.engine.speculative import SpeculativeDecoder
    from llmcli.tools.bench import PASSAGE

    dec = SpeculativeDecoder(smollm2_engine, None, method="ngram", num_draft=8)
    buf = io.StringIO()
    s = ChatSession(
        EngineBackend(smollm2_engine, "smollm2", streamer=dec),
        SamplingParams(temperature=0.0, max_tokens=24),
        console=Console(file=buf, color_system=None, width=200),
    )
    s.handle(f"Repeat this exactly: {PASSAGE[:120]}")
    s.handle("/stats")
    out = buf.getvalue()
    rate = re.search(r"last reply (\d+)% accepted, ([\d.]+) per step", out)
    assert rate and int(rate.group(1)) == round(100 * dec.stats.acceptance_rate)
    m = re.search(r"speed-up +~([\d.]+)x vs plain decoding \(([\d.]+) vs ([\d.]+) tok/s", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(float(m.group(2)) / float(m.group(3)), rel=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_greedy_and_seeded_sampling(tiny_model, tmp_path_factory):
    from conftest import build_tiny_model

    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.speculative import SpeculativeDecoder

    def load(d):  # float32 so the k-token and one-token forwards agree on argmax
        return LLMEngine.load(d, device="cuda", dtype="float32", tokenizer=False, kv_cache_gib=0.01)

    target = load(tiny_model("llama"))
    other = load(build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-draft-cuda"), seed=1))
    plain = target.generate([PROMPT], _params())[0]
    for draft in (None, other):
        dec = SpeculativeDecoder(target, draft, num_draft=4)
        assert dec.generate(PROMPT, _params()) == plain
        a = dec.generate(PROMPT, _params(temperature=0.8, seed=3))
        assert a == dec.generate(PROMPT, _params(temperature=0.8, seed=3))

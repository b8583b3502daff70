"""The MoE layer against transformers' own sparse blocks, with the same weights.

The per-expert checkpoint layout is read from the safetensors file transformers wrote; the fused v5 layout
(experts.gate_up_proj / experts.down_proj) from the in-memory transformers model's state_dict.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import write_byte_tokenizer

from llmcli.engine.loader import build_model, load_model, load_weights
from llmcli.layers import moe as moe_mod
from llmcli.layers.moe import MoE, expert_usage, reset_expert_usage

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]


@pytest.fixture(scope="module")
def hf_models(tiny_model):
    """family (+ overrides) -> (our ModelConfig, transformers model, our model loaded from the same files)."""
    import transformers

    cache = {}

    def get(family: str, **overrides):
        key = (family, repr(sorted(overrides.items())))
        if key not in cache:
            d = tiny_model(family, **overrides)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            ours, cfg = load_model(d)
            cache[key] = (cfg, hf, ours)
        return cache[key]

    return get


def _ours(model, layer: int) -> MoE:
    """A private copy of our layer's MoE block (tests below poison or re-route it)."""
    m = copy.deepcopy(model.model.layers[layer].mlp)
    assert isinstance(m, MoE)
    return m


def _hidden(t: int, h: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t, h, generator=g)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_sparse_layers_match_reference(hf_models, family):
    cfg, hf, _ = hf_models(family)
    sparse = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert list(cfg.moe_layers) == sparse
    assert any(sparse) and (family in ("mixtral", "qwen3_moe") or not all(sparse))


def test_qwen_sparse_step_and_dense_layers(hf_models):
    """decoder_sparse_step and mlp_only_layers pick the sparse layers exactly as transformers does."""
    cfg, hf, ours = hf_models("qwen3_moe", num_hidden_layers=5, decoder_sparse_step=2, mlp_only_layers=[3])
    sparse = [hasattr(layer.mlp, "experts") for layer in hf.model.layers]
    assert sparse == [False, True, False, False, False] == list(cfg.moe_layers)
    assert [isinstance(layer.mlp, MoE) for layer in ours.model.layers] == sparse
    with torch.no_grad():
        ids = torch.tensor([_prompt(12, seed=11)])
        ref = hf(ids).logits[0]
    from llmcli.engine.llm_engine import LLMEngine

    eng = LLMEngine(ours, cfg, None, num_blocks=16)
    seq = eng.add(ids[0].tolist())
    got = eng.forward_logits([seq], all_positions=True)[0]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("tokens", [1, 2, 37])
def test_block_matches_transformers(hf_models, family, tokens):
    cfg, hf, ours = hf_models(family)
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        x = _hidden(tokens, cfg.hidden_size, seed=i)
        with torch.no_grad():
            ref = hf.model.layers[i].mlp(x.unsqueeze(0)).squeeze(0)
            got = _ours(ours, i)(x)
        assert ref.abs().max() > 1e-3  # the block does something
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_fused_checkpoint_layout(hf_models, family):
    """transformers v5 keeps experts fused in memory; load from its state_dict instead of the file."""
    cfg, hf, _ = hf_models(family)
    sd = hf.state_dict()
    i = cfg.num_layers - 1
    assert f"model.layers.{i}.mlp.experts.gate_up_proj" in sd
    model = build_model(cfg, torch.device("cpu"), torch.float32)
    load_weights(model, cfg, iter(sd.items()))
    x = _hidden(9, cfg.hidden_size)
    with torch.no_grad():
        ref = hf.model.layers[i].mlp(x.unsqueeze(0)).squeeze(0)
        got = model.model.layers[i].mlp(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_deepseek_v2_group_limited_greedy(hf_models):
    cfg, hf, ours = hf_models(
        "deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5
    )
    assert cfg.n_group == 2 and cfg.topk_group == 1
    x = _hidden(23, cfg.hidden_size)
    with torch.no_grad():
        ref = hf.model.layers[1].mlp(x.unsqueeze(0)).squeeze(0)
        got = _ours(ours, 1)(x)
        ids = _ours(ours, 1).gate(x)[1]
    # group-limited: both experts of every token come from one group of two
    assert torch.equal(ids[:, 0] // 2, ids[:, 1] // 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_router_matches_and_usage_counts(hf_models, family):
    cfg, hf, ours = hf_models(family)
    i = cfg.num_layers - 1
    m = _ours(ours, i)
    x = _hidden(50, cfg.hidden_size)
    with torch.no_grad():
        _, ref_w, ref_ids = hf.model.layers[i].mlp.gate(x)
        w, ids = m.gate(x)
        # same set of experts per token, same weight per expert (order within top-k is not meaningful)
        ref_sorted, ref_perm = ref_ids.sort(-1)
        got_sorted, got_perm = ids.sort(-1)
        assert torch.equal(got_sorted, ref_sorted)
        torch.testing.assert_close(w.gather(1, got_perm), ref_w.float().gather(1, ref_perm))
        reset_expert_usage(m)
        m(x[:20])
        m(x[20:21])
        m(x[21:])
    assert m.usage.tolist() == torch.bincount(ref_ids.reshape(-1), minlength=cfg.num_experts).tolist()
    reset_expert_usage(m)
    assert m.usage.tolist() == [0] * cfg.num_experts


def test_deepseek_v3_correction_bias_steers_selection_only(hf_models):
    """A large e_score_correction_bias changes which experts run but not their weights (unbiased scores)."""
    cfg, hf, ours = hf_models("deepseek_v3")
    i = cfg.num_layers - 1
    block = copy.deepcopy(hf.model.layers[i].mlp)
    bias = torch.randn(cfg.num_experts, generator=torch.Generator().manual_seed(3))
    m = _ours(ours, i)
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(bias)
        m.gate.e_score_correction_bias.copy_(bias)
    x = _hidden(40, cfg.hidden_size)
    with torch.no_grad():
        ref = block(x.unsqueeze(0)).squeeze(0)
        got = m(x)
        unbiased = m.gate.e_score_correction_bias.clone()
        m.gate.e_score_correction_bias.zero_()
        without = m(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (without - ref).abs().max() > 1e-2  # the bias really changed the routing
    assert unbiased.abs().max() > 0.5


PATHS = {
    "engine": lambda m, x, ids, w: m(x),  # what the model runs on this device
    "loop": lambda m, x, ids, w: moe_mod._grouped_experts(
        x, ids, w, m.experts.gate_up_proj, m.experts.down_proj, m.experts.act, grouped_mm=False
    ),
    "grouped_mm": lambda m, x, ids, w: moe_mod._grouped_experts(
        x, ids, w, m.experts.gate_up_proj, m.experts.down_proj, m.experts.act, grouped_mm=True
    ),
    "gather": lambda m, x, ids, w: moe_mod._selected_experts(
        x, ids, w, m.experts.gate_up_proj, m.experts.down_proj, m.experts.act
    ),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_decode_reads_only_selected_experts(hf_models, family, path):
    """Poison every expert the token did not pick with NaN: a batch-1 step must not notice."""
    if path == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    cfg, _, ours = hf_models(family)
    i = cfg.num_layers - 1
    m = _ours(ours, i)
    x = _hidden(1, cfg.hidden_size, seed=5)
    with torch.no_grad():
        w, ids = m.gate(x)
        before = PATHS[path](m, x, ids, w)
        others = torch.ones(cfg.num_experts, dtype=torch.bool)
        others[ids.reshape(-1)] = False
        assert others.any()
        m.experts.gate_up_proj[others] = float("nan")
        m.experts.down_proj[others] = float("nan")
        after = PATHS[path](m, x, ids, w)
    assert torch.equal(before, after)
    assert not after.isnan().any()


@pytest.mark.parametrize("tokens", [1, 33])
def test_dispatch_paths_agree(hf_models, tokens):
    """The active-expert loop, torch._grouped_mm and the batch-1 gather compute the same thing."""
    cfg, _, ours = hf_models("deepseek_v3")
    m = _ours(ours, cfg.num_layers - 1)
    x = _hidden(tokens, cfg.hidden_size)
    names = ["loop", "gather"] + (["grouped_mm"] if hasattr(torch, "_grouped_mm") else [])
    with torch.no_grad():
        w, ids = m.gate(x)
        outs = {n: PATHS[n](m, x, ids, w) for n in names}
    for n in names[1:]:
        torch.testing.assert_close(outs[n], outs["loop"], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 64])
def test_cuda_bf16_matches_cpu_fp32(hf_models, tokens):
    cfg, _, ours = hf_models("deepseek_v3")
    m = _ours(ours, cfg.num_layers - 1)
    x = _hidden(tokens, cfg.hidden_size)
    with torch.no_grad():
        ref = m(x)
        got = m.to("cuda", torch.bfloat16)(x.to("cuda", torch.bfloat16)).float().cpu()
    torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


# ---- end to end through the engine (the DeepSeek families are covered in test_mla.py) ------------------------


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_engine_logits_and_greedy_match_transformers(hf_models, family):
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams

    cfg, hf, ours = hf_models(family)
    eng = LLMEngine(ours, cfg, None, num_blocks=64)
    ids = _prompt(40, seed=7)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    seq = eng.add(ids, SamplingParams(temperature=0))
    got = eng.forward_logits([seq], all_positions=True)[0]
    eng.release(seq)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    prompt = _prompt(10, seed=8)
    out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out == hf_greedy_continuation(hf, prompt, out)


def hf_greedy_continuation(hf, prompt: list[int], ours: list[int]) -> list[int]:
    """transformers' greedy choice after prompt + ours[:j] for every j, in one teacher-forced forward.

    Equal to `ours` exactly when transformers' own greedy generation would produce `ours` (and ~10x cheaper
    than hf.generate on a loaded 2-core machine)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + ours[:-1]])).logits[0]
    return logits[len(prompt) - 1 :].argmax(-1).tolist()


def test_engine_usage_counts_cover_every_routed_token(hf_models):
    """After a generation, each sparse layer's counts sum to (tokens computed) * top_k."""
    from llmcli.engine.llm_engine import LLMEngine
    from llmcli.engine.sampling_params import SamplingParams

    cfg, _, ours = hf_models("qwen2_moe")
    eng = LLMEngine(ours, cfg, None, num_blocks=64)
    reset_expert_usage(ours)
    prompt = _prompt(9, seed=9)
    eng.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    usage = expert_usage(ours)
    assert sorted(usage) == [0, 2]  # mlp_only_layers=[1] is dense
    computed = len(prompt) + 6 - 1  # the last sampled token is never fed back
    assert all(sum(u) == computed * cfg.num_experts_per_tok for u in usage.values())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_active_params_per_token_match_the_loaded_model(hf_models, family):
    """`llm bench`'s active-parameter count == our model's tensors minus the (E - k) experts a token skips."""
    from llmcli.estimate import count_params

    cfg, _, ours = hf_models(family)
    total = sum(p.numel() for p in ours.parameters())  # tied embeddings once
    skipped = 0
    for layer in ours.model.layers:
        if isinstance(layer.mlp, MoE):
            per_expert = layer.mlp.experts.gate_up_proj[0].numel() + layer.mlp.experts.down_proj[0].numel()
            skipped += (cfg.num_experts - cfg.num_experts_per_tok) * per_expert
    pc = count_params(cfg)
    assert pc.total == total
    assert pc.active == total - skipped


def test_run_json_reports_expert_usage(tiny_model, tmp_path):
    import json
    import shutil

    from typer.testing import CliRunner

    from llmcli.cli import app

    d = tmp_path / "m"
    shutil.copytree(tiny_model("qwen2_moe"), d)
    write_byte_tokenizer(d)
    res = CliRunner().invoke(
        app, ["run", str(d), "hello world", "--raw", "--json", "-n", "5", "--ignore-eos", "-t", "0", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    usage = out["expert_usage"]
    assert sorted(usage) == ["0", "2"]  # layer 1 is in mlp_only_layers
    computed = out["prompt_tokens"] + out["generated_tokens"] - 1
    assert all(len(c) == 4 and sum(c) == computed * 2 for c in usage.values())

"""The transformers backend: tiny random-initialised models built from configs (no downloads).

Every model runs the same weights twice, through "sdpa" and through "cqsa",
in float32; logits must agree to a relative error of 1e-5 (max |diff| over
max |logit|) and "cqsa" must be as close to a float64 copy of the model as
"sdpa" is.  The budget forces W >= 7 token groups, so every layer's call is a
real multi-task job with merges.  Weights are drawn with a large initializer
range so that attention is peaked (logit std ~2-3), not near uniform.

One threaded local cluster and one Session serve the whole module.
"""

from __future__ import annotations

import contextvars
import copy
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from distributed import Client, LocalCluster
from reference import check_exact
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
)

import cqsa_dask
from cqsa_dask.client.session import current_session
from cqsa_dask.integrations import transformers as hf

BUDGET = "3MB"  # N = 2048 and 3072 with D = 16, float32: W = 7
MIN_TOKENS = 256
TINY: dict[str, Any] = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "max_position_embeddings": 8192, "initializer_range": 0.2}


@pytest.fixture(scope="module")
def session() -> Iterator[cqsa_dask.Session]:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"device_mem": 1e9},
                      dashboard_address=":0") as lc, Client(lc) as c, cqsa_dask.Session(client=c, memory_budget=BUDGET) as s:
        yield s


@pytest.fixture(scope="module")
def backend(session: cqsa_dask.Session) -> Iterator[hf.Backend]:
    b = hf.register("cqsa", min_tokens=MIN_TOKENS)
    yield b
    hf.unregister("cqsa")


def build(config: Any, seed: int = 0, impl: str = "sdpa") -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()


def use(model: PreTrainedModel, impl: str) -> None:
    """``model.set_attn_implementation(impl)``; transformers before 4.56 (no such method): through the config."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed))


def logits(model: PreTrainedModel, impl: str, x: torch.Tensor, **kw: Any) -> torch.Tensor:
    use(model, impl)
    with torch.no_grad():
        return model(x, **kw).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def check_model(model: PreTrainedModel, backend: hf.Backend, n: int) -> None:
    cfg = model.config
    plan = cqsa_dask.make_plan(seq_len=n, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                               head_dim=cfg.hidden_size // cfg.num_attention_heads, batch=1, dtype="float32",
                               causal=True, budget=BUDGET)
    assert plan.groups >= 7, plan
    x = ids(n)
    ref = logits(model, "sdpa", x)
    before = backend.calls["engine"]
    got = logits(model, "cqsa", x)
    assert backend.calls["engine"] - before == cfg.num_hidden_layers  # every layer through the engine
    exact = logits(copy.deepcopy(model).double(), "sdpa", x)
    assert rel(got, ref) <= 1e-5, rel(got, ref)
    assert rel(got, exact) <= 2 * rel(ref, exact) + 1e-6, (rel(got, exact), rel(ref, exact))


def test_llama_gqa_logits_match_sdpa(backend: hf.Backend) -> None:
    check_model(build(LlamaConfig(**TINY, num_key_value_heads=2)), backend, 2048)


def test_qwen2_mqa_logits_match_sdpa(backend: hf.Backend) -> None:
    """Qwen2: biased q/k/v projections, one kv head for four query heads, 3072 tokens (uneven groups);
    its second layer has a sliding window longer than the input (which then changes nothing)."""
    cfg = Qwen2Config(**TINY, num_key_value_heads=1, use_sliding_window=True, sliding_window=3100,
                      max_window_layers=1)
    assert cfg.layer_types == ["full_attention", "sliding_attention"]
    check_model(build(cfg, seed=3), backend, 3072)


def test_generate_after_cqsa_prefill_matches_sdpa(backend: hf.Backend) -> None:
    """The prompt goes through the engine, the decode steps (one query each) through SDPA."""
    model = build(LlamaConfig(**TINY, num_key_value_heads=2), seed=5)
    x = ids(1024, seed=7)
    mask = torch.ones_like(x)  # what a tokenizer returns: all ones, so still no N x N mask
    use(model, "sdpa")
    want = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    use(model, "cqsa")
    calls = dict(backend.calls)
    got = model.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want), (got[0, -6:], want[0, -6:])
    assert backend.calls["engine"] - calls["engine"] == 2  # the prefill, once per layer
    assert backend.calls["sdpa"] - calls["sdpa"] == 2 * 5  # five decode steps, two layers


def test_generate_with_a_static_cache(backend: hf.Backend) -> None:
    """A static cache holds more key slots than the prompt: the prefill uses the first N, as SDPA does."""
    model = build(LlamaConfig(**TINY, num_key_value_heads=2), seed=6)
    x = ids(512, seed=8)
    use(model, "sdpa")
    want = model.generate(x, max_new_tokens=3, do_sample=False, cache_implementation="static")
    use(model, "cqsa")
    engine = backend.calls["engine"]
    got = model.generate(x, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want), (got[0, -3:], want[0, -3:])
    assert backend.calls["engine"] - engine == 2


def test_short_calls_go_to_sdpa(backend: hf.Backend) -> None:
    model = build(LlamaConfig(**TINY, num_key_value_heads=2))
    x = ids(MIN_TOKENS - 1)
    calls = dict(backend.calls)
    assert torch.equal(logits(model, "cqsa", x), logits(model, "sdpa", x))
    assert backend.calls["engine"] == calls["engine"] and backend.calls["sdpa"] == calls["sdpa"] + 2


def test_from_config_and_unregister(session: cqsa_dask.Session) -> None:
    hf.register("cqsa-other", min_tokens=MIN_TOKENS)
    try:
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="cqsa-other")
        assert model.config._attn_implementation == "cqsa-other"
        model = LlamaForCausalLM._from_config(LlamaConfig(**TINY), attn_implementation="cqsa-other")
        assert model.config._attn_implementation == "cqsa-other"
    finally:
        hf.unregister("cqsa-other")
    with pytest.raises((ValueError, KeyError)):
        AutoModelForCausalLM.from_config(LlamaConfig(**TINY), attn_implementation="cqsa-other")
    with pytest.raises(cqsa_dask.InvalidInputError, match="transformers' own"):
        hf.register("sdpa")


def test_without_a_session_the_backend_opens_its_own(session: cqsa_dask.Session) -> None:
    b = hf.register("cqsa-own", client=session.client, memory_budget=BUDGET, min_tokens=MIN_TOKENS)
    model = build(LlamaConfig(**TINY, num_key_value_heads=2), seed=9)
    x = ids(1024, seed=10)
    try:  # a fresh context: no current session
        got = contextvars.Context().run(logits, model, "cqsa-own", x)
        assert b.calls["engine"] == 2 and b._own is not None and b._own.is_open
        own = b._own.workdir
    finally:
        hf.unregister("cqsa-own")
    assert not os.path.exists(own) and session.client.status == "running"
    assert rel(got, logits(model, "sdpa", x)) <= 1e-5


@pytest.mark.gpu
def test_cuda_calls_one_task_holds_run_in_process() -> None:
    """On a GPU, a call whose plan is one group runs the engine's kernel where the tensors are."""
    b = hf.register("cqsa-gpu", memory_budget="1GB", min_tokens=MIN_TOKENS)
    try:
        model = build(LlamaConfig(**TINY, num_key_value_heads=2)).cuda()
        x = ids(2048).cuda()
        got, ref = logits(model, "cqsa-gpu", x), logits(model, "sdpa", x)
    finally:
        hf.unregister("cqsa-gpu")
    assert b.calls == {"sdpa": 0, "device": 2, "engine": 0}
    assert rel(got, ref) <= 1e-5, rel(got, ref)


# -- refusals: a clear NotImplementedError naming the setting, before any engine work -----------------------


def refused(model: PreTrainedModel, x: torch.Tensor, match: str, **kw: Any) -> None:
    use(model, "cqsa")
    with pytest.raises(NotImplementedError, match=match):
        model(x, **kw)


def test_refuses_padding_mask(backend: hf.Backend) -> None:
    model = build(LlamaConfig(**TINY, num_key_value_heads=2))
    x = ids(512, batch=2)
    mask = torch.ones_like(x)
    mask[1, :100] = 0  # left padding of the shorter sequence
    with torch.no_grad():
        refused(model, x, "padding mask", attention_mask=mask)


def test_refuses_dropout_in_training(backend: hf.Backend) -> None:
    model = build(LlamaConfig(**TINY, num_key_value_heads=2, attention_dropout=0.1)).train()
    refused(model, ids(512), r"dropout=0\.1 \(config\.attention_dropout")


def test_refuses_sliding_window_shorter_than_input(backend: hf.Backend) -> None:
    model = build(MistralConfig(**TINY, num_key_value_heads=2, sliding_window=300))
    with torch.no_grad():
        refused(model, ids(512), r"sliding window of 300 tokens \(config\.sliding_window\)")


def test_refuses_soft_capping(backend: hf.Backend) -> None:
    cfg = Gemma2Config(**TINY, num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0)
    with torch.no_grad():
        refused(build(cfg, impl="eager"), ids(512), r"soft-capping.*config\.attn_logit_softcapping")


def test_backward_raises(backend: hf.Backend) -> None:
    model = build(LlamaConfig(**(TINY | {"num_hidden_layers": 1}), num_key_value_heads=2))
    use(model, "cqsa")
    out = model(ids(512)).logits  # gradients enabled: the forward runs
    with pytest.raises(NotImplementedError, match="no backward"):
        out.sum().backward()


# -- routes ---------------------------------------------------------------------------------------------------


def test_route() -> None:
    q, k = torch.empty(1, 4, 2048, 16), torch.empty(1, 2, 2048, 16)
    assert hf.route(q, k, min_tokens=4096, memory_budget=BUDGET) == "sdpa"
    assert hf.route(q, k, min_tokens=1024, memory_budget=BUDGET) == "engine"
    assert hf.route(q, k, min_tokens=1024, memory_budget="1GB") == "engine"  # on the CPU, even when it fits


@pytest.mark.parametrize("causal", [True, False])
def test_on_device_path_is_exact(causal: bool) -> None:
    """The in-process path (CUDA calls one task holds) with the engine's kernel, checked here on the CPU."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, 300, 16, generator=g) * 2 for h in (6, 2, 2))
    out = hf.on_device(q, k, v, scale=None, causal=causal)
    check_exact(q, k, v, out, None, causal=causal, scale=None)


def test_long_document_workflow_runs_tiny_on_the_cpu(session: cqsa_dask.Session, capsys: Any) -> None:
    """workflows/long_document_prefill.py end to end at a tiny size: one JSON line, both forwards agree."""
    path = Path(__file__).parents[1] / "workflows" / "long_document_prefill.py"
    spec = importlib.util.spec_from_file_location("long_document_prefill", path)
    assert spec is not None and spec.loader is not None
    wf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wf)
    r = wf.main(["--seq-len", "1024", "--budget", "2.5MB", "--min-tokens", "256", "--overhead-calls", "1",
                 "--attn-name", "cqsa-workflow"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(r))
    assert r["plan"]["groups"] >= 3 and r["routes"]["engine"] == 2 and r["routes"]["sdpa"] == 0
    assert r["cqsa"]["status"] == r["sdpa"]["status"] == "ok"
    assert r["last_logits_rel_diff"] <= 1e-5
    assert r["per_call"]["calls"] == 1 and r["per_call"]["execute_s"] > 0
    assert current_session() is session  # the workflow's own session has closed


def test_a_materialised_causal_mask_counts_as_causal() -> None:
    """Older transformers (4.53) materialise plain causal masks; anything else stays refused."""
    n, s = 300, 310
    keep = torch.ones(n, s, dtype=torch.bool).tril()
    keep[:, n:] = False  # (N, S): the first N keys causally, the rest unused (a static cache's free slots)
    mask = keep.expand(2, 1, n, s)
    assert hf._causal_mask(mask, n, s, rows=64)
    additive = torch.zeros(2, 1, n, s).masked_fill(~mask, torch.finfo(torch.float32).min)
    assert hf._causal_mask(additive, n, s, rows=64)
    padded = mask.clone()
    padded[1, :, :, :5] = False  # left padding in the second sequence
    assert not hf._causal_mask(padded, n, s, rows=64)
    window = mask & ~torch.ones(n, s, dtype=torch.bool).tril(-100)  # a sliding window of 100
    assert not hf._causal_mask(window, n, s, rows=64)
    assert not hf._causal_mask(mask[..., :n - 1, :], n, s)

"""Mixture-of-experts blocks (``model.moe.*``, ``jaxllm.model.moe``) and expert parallelism (``mesh.expert``).

The routing functions are checked on crafted inputs (hand-counted drops, an even router), the MoE layer
against references (one expert = the dense MLP; dropless = every expert on every token, weighted; capacity
without drops = dropless). Expert parallelism: tests/test_moe_parallel.py.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from test_generate import greedy_by_full_forward

import train
from jaxllm.core import fileio
from jaxllm.core.config import load_config, resolve_model
from jaxllm.model import flops, moe
from jaxllm.model.decode import Decoder
from jaxllm.model.transformer import Transformer

VOCAB, SEQ, BATCH = 64, 16, 8
MOE = ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.moe.n_experts=4", "model.moe.top_k=2"]
RTOL = 1e-5


def model_and_params(overrides: list[str], seed: int = 0):
    cfg = load_config(None, MOE + overrides)
    model = Transformer(resolve_model(cfg.model, VOCAB, SEQ))
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (2, SEQ)), jnp.int32)
    params = jax.jit(lambda t: nn.unbox(model.init(jax.random.PRNGKey(seed), t))["params"])(tokens)
    return model, params, tokens


def resolved(overrides: list[str]):
    return resolve_model(load_config(None, MOE + overrides).model, VOCAB, SEQ)


def apply(model, params, tokens, **kwargs):
    return jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs))(params, tokens)


def test_capacity_drops_match_a_hand_count_first_choices_first():
    # 4 tokens, top-2 of 3 experts, capacity 2. Choice-major order: first choices 0,0,0,1 then second
    # choices 1,1,2,2. Expert 0 keeps tokens 0,1 and drops token 2's first choice; expert 1 keeps token
    # 3's first choice and token 0's second, dropping token 1's second; expert 2 keeps both: 2 of 8.
    experts_Gxk = jnp.array([[0, 1], [0, 1], [0, 2], [1, 2]])
    weights_Gxk = jnp.full((4, 2), 0.5)
    x_GxD = jnp.arange(1.0, 5.0)[:, None] * jnp.ones((4, 3))
    out_GxD, dropped = moe.with_capacity(x_GxD, weights_Gxk, experts_Gxk, lambda buf: buf, 3, 2)
    assert float(dropped) == pytest.approx(2 / 8)
    kept_Gxk = np.array([[1, 1], [1, 0], [0, 1], [1, 1]])  # with an identity expert, out = 0.5 x * kept
    np.testing.assert_allclose(out_GxD, 0.5 * np.asarray(x_GxD) * kept_Gxk.sum(1)[:, None])


def test_balance_loss_is_one_for_an_even_router_and_n_experts_for_a_collapsed_one():
    n_tokens, n_experts = 64, 4
    even_GxE = jnp.zeros((n_tokens, n_experts))
    probs, _, experts = moe.route(even_GxE, 1)
    assert float(moe.router_losses(even_GxE, probs, experts)["balance"]) == pytest.approx(1.0)
    collapsed_GxE = jnp.zeros((n_tokens, n_experts)).at[:, 0].set(30.0)
    probs, _, experts = moe.route(collapsed_GxE, 1)
    assert float(moe.router_losses(collapsed_GxE, probs, experts)["balance"]) == pytest.approx(n_experts, rel=1e-6)
    skewed_GxE = jax.random.normal(jax.random.PRNGKey(0), (n_tokens, n_experts)) + jnp.array([1.0, 0, 0, 0])
    probs, _, experts = moe.route(skewed_GxE, 1)
    assert float(moe.router_losses(skewed_GxE, probs, experts)["balance"]) > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_one_expert_top1_equals_the_dense_block(arch):
    model, params, tokens = model_and_params([f"model.arch={arch}", "model.moe.n_experts=1", "model.moe.top_k=1"])
    dense, dense_params, _ = model_and_params([f"model.arch={arch}", "model.moe.n_experts=0"])
    mlp = dict(params["blocks"]["mlp"])
    mlp.pop("router")
    same = {
        **params,
        "blocks": {**params["blocks"], "mlp": jax.tree.map(lambda w: w[:, 0], mlp)},
    }  # [L, 1, ...] -> [L, ...]
    assert jax.tree.structure(same) == jax.tree.structure(dense_params)
    np.testing.assert_allclose(apply(model, params, tokens), apply(dense, same, tokens), rtol=1e-6, atol=1e-6)


def experts_everywhere(model, params, tokens):
    """Reference: every expert on every token (a dense einsum), combined with the router's top-k weights."""
    c = model.cfg

    def mlp_every_expert(mdl, x_BxTxD):
        m = mdl.variables["params"]
        x_GxD = x_BxTxD.reshape(-1, c.d_model)
        _, weights_Gxk, experts_Gxk = moe.route(x_GxD @ m["router"]["kernel"], c.moe.top_k)
        h_EGF = jnp.einsum("gd,edf->egf", x_GxD, m["up"]["kernel"])
        h_EGF = jax.nn.silu(jnp.einsum("gd,edf->egf", x_GxD, m["gate"]["kernel"])) * h_EGF
        y_EGD = jnp.einsum("egf,efd->egd", h_EGF, m["down"]["kernel"])
        combine_GxE = jnp.sum(jax.nn.one_hot(experts_Gxk, c.moe.n_experts) * weights_Gxk[..., None], axis=1)
        return jnp.einsum("egd,ge->gd", y_EGD, combine_GxE).reshape(x_BxTxD.shape)

    def intercept(next_fn, args, kwargs, context):
        if isinstance(context.module, moe.MoEMLP):
            return mlp_every_expert(context.module, *args)
        return next_fn(*args, **kwargs)

    def run(p, t):
        with nn.intercept_methods(intercept):
            return model.apply({"params": p}, t)

    return jax.jit(run)(params, tokens)


@pytest.mark.slow
def test_dropless_equals_every_expert_on_every_token_weighted():
    model, params, tokens = model_and_params(["model.arch=llama"])
    want = experts_everywhere(model, params, tokens)
    np.testing.assert_allclose(apply(model, params, tokens), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_capacity_without_drops_equals_dropless():
    overrides = ["model.arch=gpt2"]
    model, params, tokens = model_and_params(overrides)
    roomy, _, _ = model_and_params(overrides + ["model.moe.capacity_factor=2.0"])  # C = 2 G k / E = all of G
    got, sown = apply(roomy, params, tokens, mutable=["moe"])
    assert float(jnp.max(sown["moe"]["blocks"]["mlp"]["dropped"][0])) == 0.0
    np.testing.assert_allclose(got, apply(model, params, tokens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.moe.n_experts=4", "model.moe.top_k=5"], "model.moe.top_k=5 exceeds model.moe.n_experts=4"),
        (["model.moe.n_experts=4", "model.moe.every=3"], "model.moe.every=3 does not divide model.n_layer=2"),
        (["model.moe.n_experts=4", "mesh.expert=8"], "model.moe.n_experts=4 is not divisible by mesh.expert=8"),
        (["model.moe.aux_loss=-1"], "model.moe.aux_loss must be >= 0"),
    ],
    ids=["top_k", "every", "expert_axis", "negative_weight"],
)
def test_bad_moe_config_exits_2_with_one_line(tmp_path, corpus, capsys, overrides, message):
    args = TINY + [f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={tmp_path / 'run'}"]
    code = train.main([*args, *overrides])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.arch=gpt2", "model.moe.shared_experts=2"],
        ["model.arch=llama", "model.moe.every=2", "model.moe.d_ff=48", "model.moe.shared_experts=1"],
    ],
)
def test_param_counts_match_the_parameter_tree(overrides):
    m = resolved(overrides)
    shapes = jax.eval_shape(lambda: Transformer(m).init(jax.random.PRNGKey(0), jnp.zeros((1, SEQ), jnp.int32)))
    assert flops.param_counts(m)["total"] == sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"]))
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_active_weights_are_a_dense_model_top_k_experts_wide_plus_the_router(arch):
    m = resolved([f"model.arch={arch}", "model.moe.d_ff=48"])
    wide = resolved([f"model.arch={arch}", "model.moe.n_experts=0", f"model.d_ff={m.moe.top_k * 48}"])
    router = m.n_layer * m.d_model * m.moe.n_experts
    assert flops.param_counts(m)["active"] == flops.param_counts(wide)["matmul"] + router


@pytest.mark.slow
def test_cached_decoding_of_grouped_moe_blocks_equals_greedy_full_forward():
    # every=2: the scan runs groups of two blocks, and the KV cache must follow (generate.init_cache)
    m = resolve_model(
        load_config(None, MOE + ["model.arch=llama", "model.n_layer=4", "model.moe.every=2"]).model, VOCAB, 32
    )
    model = Transformer(m)
    params = jax.jit(lambda t: nn.unbox(model.init(jax.random.PRNGKey(0), t))["params"])(jnp.zeros((1, 8), jnp.int32))
    prompt = [3, 1, 4, 1, 5]
    want, _ = greedy_by_full_forward(model, params, prompt, 6)
    assert Decoder(m)(params, [prompt], 6, temperature=0.0) == [want]


def crafted_router_params(params, even_logits_E, constant_logits_E):
    """Layer 0 routes a token by its parity (even ids get ``even_logits_E``, odd ids their negation);
    layer 1 routes every token by ``constant_logits_E``. Layer 0 sees the embedding alone (positions,
    attention and its experts zeroed); the embedding of token t is +-(e0 - e1), which LayerNorm turns
    into +-sqrt(D/2) (e0 - e1); layer 1's norm2 has scale 0 and bias e0, so every token routes alike."""
    p = jax.tree.map(np.array, params)
    D = p["wte"]["embedding"].shape[1]
    sign_V = np.where(np.arange(p["wte"]["embedding"].shape[0]) % 2 == 0, 1.0, -1.0)
    p["wte"]["embedding"][:] = 0.0
    p["wte"]["embedding"][:, 0], p["wte"]["embedding"][:, 1] = sign_V, -sign_V
    p["wpe"]["embedding"][:] = 0.0
    p["blocks"]["attn"]["o"]["kernel"][0] = 0.0
    for name in ("up", "down"):
        p["blocks"]["mlp"][name]["kernel"][0] = 0.0
    router = p["blocks"]["mlp"]["router"]["kernel"]
    router[:] = 0.0
    router[0, 0] = np.asarray(even_logits_E) / np.sqrt(D / 2)
    norm2 = p["blocks"]["norm2"]
    norm2["scale"][1], norm2["bias"][1] = 0.0, np.eye(D)[0]
    router[1, 0] = constant_logits_E
    return p


@pytest.mark.slow
def test_logged_expert_load_and_drops_match_a_hand_count(tmp_path):
    # Two micro-batches of 2 x 8 tokens (G = 16 each), 4 experts, top-2, capacity factor 1: C = 8.
    # Layer 0: even tokens go to experts 0 and 1, odd ones to 2 and 3. Micro-batch 0 holds 10 even
    # tokens (experts 0, 1 get 10 each, 2 dropped from each), micro-batch 1 holds 4 (experts 2, 3 get
    # 12 each, 4 dropped from each). Layer 1: every token to experts 1 and 3 (16 each, 8 dropped each).
    import optax

    from jaxllm.train import loop
    from jaxllm.train.metrics_log import MetricsLog, plot_expert_load
    from jaxllm.train.train_step import TrainState, make_loss_fn, make_train_step

    model, params, _ = model_and_params(["model.arch=gpt2", "model.moe.capacity_factor=1.0"])
    params = crafted_router_params(params, [3.0, 2.0, -2.0, -3.0], [0.0, 3.0, 1.0, 2.0])
    odd_AxG = np.arange(16)[None, :] < np.array([[6], [12]])  # 10 and 4 even tokens
    inputs_AxBxT = (2 * np.arange(16) + odd_AxG).reshape(2, 2, 8)
    tokens_AxBxT1 = np.concatenate([inputs_AxBxT, np.zeros((2, 2, 1), int)], axis=-1).astype(np.int32)
    tx = optax.sgd(0.0)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=jax.random.PRNGKey(0)
    )
    step = jax.jit(make_train_step(make_loss_fn(model), tx, optax.constant_schedule(0.0)))
    _, metrics = step(state, jnp.asarray(tokens_AxBxT1))

    log = MetricsLog(tmp_path / "metrics.jsonl", 0, True, None)
    parts = loop.Parts(
        step=None,
        batch_at=None,
        save=None,
        checkpoint_dir=tmp_path,
        log=log,
        mfu=lambda tps: 0.0,
        tokens_per_step=64,
        context=None,
    )
    log.write(loop.report([(1, metrics)], parts, loop.Throughput(64), None))
    record = fileio.read_jsonl(tmp_path / "metrics.jsonl", "metrics")[0]

    want_load = np.mean([[10, 10, 6, 6], [4, 4, 12, 12]], axis=0) / 32
    np.testing.assert_allclose(record["moe_load"], [want_load, [0, 0.5, 0, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(record["moe_dropped"], [np.mean([4 / 32, 8 / 32]), 16 / 32], rtol=1e-6)
    assert len(record["moe_balance"]) == len(record["moe_z"]) == 2
    plot_expert_load(tmp_path / "metrics.jsonl", tmp_path / "expert_load.png")
    assert (tmp_path / "expert_load.png").stat().st_size > 0


def pretraining_loss_and_router_term(model, params, tokens_BxT1):
    """``(pre-training loss, its router term)``: ``train_step``'s MoE loss and that loss minus the cross-entropy."""
    from jaxllm.model.transformer import cross_entropy
    from jaxllm.train.train_step import make_loss_fn

    loss, _ = jax.jit(make_loss_fn(model))(params, tokens_BxT1, jax.random.PRNGKey(0))
    ce = cross_entropy(apply(model, params, tokens_BxT1[:, :-1]), tokens_BxT1[:, 1:])[0]
    return float(loss), float(loss - ce)


@pytest.mark.slow
def test_distillation_loss_carries_the_router_losses():
    from jaxllm.train import distill

    model, params, tokens = model_and_params(["model.moe.aux_loss=1.0", "model.moe.router_z_loss=1.0"])
    tokens_BxT1 = jnp.concatenate([tokens, tokens[:, :1]], axis=1)[:, :SEQ]
    want, router_term = pretraining_loss_and_router_term(model, params, tokens_BxT1)
    assert router_term > 0.5  # the balance loss alone is >= 1 at weight 1
    got = jax.jit(distill.make_loss_fn(model, model, 2.0, 0.0))(params, tokens_BxT1, jax.random.PRNGKey(0), params)
    assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.slow
def test_fine_tuning_loss_carries_the_router_losses():
    from jaxllm.data import chat
    from jaxllm.sft import finetune as sft
    from jaxllm.sft import peft

    model, params, tokens = model_and_params(["model.moe.aux_loss=1.0", "model.moe.router_z_loss=1.0"])
    tokens_BxT1 = jnp.concatenate([tokens, tokens[:, :1]], axis=1)[:, :SEQ]
    want, router_term = pretraining_loss_and_router_term(model, params, tokens_BxT1)
    assert router_term > 0.5
    B, T = tokens_BxT1.shape[0], SEQ - 1
    rows = {
        chat.INPUTS: tokens_BxT1[:, :-1],
        chat.TARGETS: tokens_BxT1[:, 1:],
        chat.MASK: jnp.ones((B, T), jnp.int32),
        chat.POSITIONS: jnp.broadcast_to(jnp.arange(T), (B, T)),
        chat.SEGMENTS: jnp.ones((B, T), jnp.int32),
    }
    batch_Bx5xT = jnp.stack([rows[i] for i in range(5)], axis=1)  # one example per row, every target counted
    loss_fn = sft.make_loss_fn(model, peft.trainable_mask(params, "full"), 0.0)
    got, _ = jax.jit(loss_fn)(params, batch_Bx5xT, jax.random.PRNGKey(0))
    assert float(got) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_experts_add_a_dense_mlp_of_their_width_to_the_routed_output(arch):
    # The routed part is the same layer without shared experts; the shared part, written out by hand,
    # is the block's MLP at width S * F on every token, unweighted.
    cfg = resolved([f"model.arch={arch}", "model.moe.shared_experts=2", "model.moe.d_ff=24"])
    x_BxTxD = jax.random.normal(jax.random.PRNGKey(1), (2, 8, cfg.d_model))
    layer = moe.MoEMLP(cfg, 0.02)
    params = nn.unbox(layer.init(jax.random.PRNGKey(0), x_BxTxD)["params"])
    got = layer.apply({"params": params}, x_BxTxD, mutable=[moe.COLLECTION])[0]
    routed_only = moe.MoEMLP(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, shared_experts=0)), 0.02)
    routed = routed_only.apply(
        {"params": {k: v for k, v in params.items() if k != "shared"}}, x_BxTxD, mutable=[moe.COLLECTION]
    )[0]
    w = params["shared"]
    assert w["up_kernel"].shape == (cfg.d_model, 2 * 24)
    if arch == "gpt2":
        h = jax.nn.gelu(x_BxTxD @ w["up_kernel"] + w["up_bias"], approximate=True)
        shared = h @ w["down_kernel"] + w["down_bias"]
    else:
        shared = (jax.nn.silu(x_BxTxD @ w["gate_kernel"]) * (x_BxTxD @ w["up_kernel"])) @ w["down_kernel"]
    np.testing.assert_allclose(got, routed + shared, rtol=1e-5, atol=1e-6)

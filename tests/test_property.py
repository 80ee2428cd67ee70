"""Property-based: randomly generated small plain-torch DiTs are transformed exactly, or refused clearly.

A DiT with at least one block is always transformed (every combination of norm placement, adaLN, two
streams, cross-attention and granularity); one without blocks is refused, saying why.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import first_tensor, hand_reference
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import adacache_fx as ax


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda t: t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)))
        return self.o(out.transpose(1, 2).reshape(b, n, d))


class RandomBlock(nn.Module):
    def __init__(self, dim, heads, pre_norm, ada, two_streams, cross):
        super().__init__()
        self.pre_norm, self.ada, self.two_streams, self.cross = pre_norm, ada, two_streams, cross
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim) if ada else None
        self.mlp_y = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if two_streams else None

    def forward(self, x, y, c):
        if self.ada:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        else:
            shift1 = scale1 = shift2 = scale2 = 0.0
            gate1 = gate2 = 1.0
        n = x.shape[1]
        if self.pre_norm:
            h = self.norm1(x) * (1 + scale1) + shift1
            if self.two_streams:
                joint = self.attn(torch.cat([h, self.norm1(y)], dim=1))
                x, y = x + gate1 * joint[:, :n], y + joint[:, n:]
            else:
                x = x + gate1 * self.attn(h)
            if self.cross:
                x = x + self.cross_attn(self.norm3(x), c[:, None])
            x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        else:
            if self.two_streams:
                joint = self.attn(torch.cat([x, y], dim=1))
                x, y = self.norm1(x + gate1 * joint[:, :n]), self.norm3(y + joint[:, n:])
            else:
                x = self.norm1(x + gate1 * self.attn(x))
            if self.cross:
                x = self.norm3(x + self.cross_attn(x, c[:, None]))
            x = self.norm2(x + gate2 * self.mlp(x))
        if self.two_streams:
            y = y + self.mlp_y(y)
            return x, y
        return x


class RandomDiT(nn.Module):
    def __init__(self, depth, dim, heads, channels, **block_kwargs):
        super().__init__()
        self.two_streams = block_kwargs["two_streams"]
        self.embed = nn.Linear(channels, dim)
        self.embed_y = nn.Linear(5, dim)
        self.embed_t = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(RandomBlock(dim, heads, **block_kwargs) for _ in range(depth))
        self.out = nn.Linear(dim, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        x = self.embed(hidden_states)
        y = self.embed_y(encoder_hidden_states)
        c = self.embed_t(timestep[:, None].float() / 1000)
        for block in self.blocks:
            if self.two_streams:
                x, y = block(x, y, c)
            else:
                x = block(x, y, c)
        return self.out(x)


models = st.fixed_dictionaries(
    {
        "depth": st.integers(0, 6),  # 0: no block stack, the one refused case
        "heads": st.sampled_from([1, 2, 3]),
        "head_dim": st.sampled_from([3, 4, 8]),
        "tokens": st.integers(3, 9),
        "text_tokens": st.integers(2, 7),
        "channels": st.sampled_from([2, 3, 5]),
        "pre_norm": st.booleans(),
        "ada": st.booleans(),
        "two_streams": st.booleans(),
        "cross": st.booleans(),
        "granularity": st.sampled_from(["stack", "block", "branch"]),
        "seed": st.integers(0, 1000),
    }
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=models)
@example(spec={"depth": 0, "heads": 2, "head_dim": 4, "tokens": 4, "text_tokens": 3, "channels": 3, "pre_norm": True,
               "ada": True, "two_streams": False, "cross": True, "granularity": "stack", "seed": 0})
def test_random_dits_are_exact_or_refused(spec):
    torch.manual_seed(spec["seed"])
    text_tokens = spec["text_tokens"]
    if text_tokens == spec["tokens"]:
        text_tokens += 1  # distinct stream shapes keep the hand reference unambiguous
    model = RandomDiT(
        spec["depth"], spec["heads"] * spec["head_dim"], spec["heads"], spec["channels"],
        pre_norm=spec["pre_norm"], ada=spec["ada"], two_streams=spec["two_streams"], cross=spec["cross"],
    ).eval()
    latents = torch.randn(2, spec["tokens"], spec["channels"])
    text = torch.randn(2, text_tokens, 5)

    def make_inputs(step):
        return {
            "hidden_states": latents + 0.05 * step,
            "timestep": torch.tensor([900 - 80 * step] * 2),
            "encoder_hidden_states": text,
        }

    steps = 6
    never = ax.transform(model, ax.AdaCacheConfig(num_steps=steps, codebook=ax.presets.NEVER,
                                                  granularity=spec["granularity"]))
    if spec["depth"] == 0:
        with pytest.raises(ax.TransformError, match="cannot cache RandomDiT: find_blocks: no transformer block stack"):
            with torch.no_grad():
                never(**make_inputs(0))
        return
    with torch.no_grad():
        got = [first_tensor(never(**make_inputs(s))).clone() for s in range(steps)]
    with torch.no_grad():
        expected = [model(**make_inputs(s)) for s in range(steps)]
    assert max(float((a - b).abs().max()) for a, b in zip(expected, got)) < 1e-5

    compute_steps = (1, 3, 6)
    forced = ax.transform(model, ax.AdaCacheConfig(num_steps=steps, compute_steps=compute_steps,
                                                   granularity=spec["granularity"]))
    with torch.no_grad():
        got = [first_tensor(forced(**make_inputs(s))).clone() for s in range(steps)]
    reference = hand_reference(model, make_inputs, steps, compute_steps, spec["granularity"])
    assert max(float((a - b).abs().max()) for a, b in zip(reference, got)) < 1e-5


def test_no_structure_with_blocks_is_refused():
    """Every structural combination (48) with two blocks is transformed: the refused fraction is 0."""
    inputs = {"hidden_states": torch.randn(2, 4, 3), "timestep": torch.tensor([900, 900]),
              "encoder_hidden_states": torch.randn(2, 5, 5)}
    refused, combos = [], list(itertools.product([False, True], repeat=4))
    for (pre_norm, ada, two_streams, cross), granularity in itertools.product(combos, ["stack", "block", "branch"]):
        torch.manual_seed(0)
        model = RandomDiT(2, 8, 2, 3, pre_norm=pre_norm, ada=ada, two_streams=two_streams, cross=cross).eval()
        cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=ax.presets.NEVER, granularity=granularity))
        try:
            with torch.no_grad():
                got = first_tensor(cached(**inputs))
        except ax.TransformError as error:
            refused.append((pre_norm, ada, two_streams, cross, granularity, str(error)))
            continue
        with torch.no_grad():
            assert float((got - model(**inputs)).abs().max()) < 1e-5
    assert refused == []

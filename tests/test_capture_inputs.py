"""Inputs the capture must find on its own: masks read on the host whatever their rank, boolean masks that
select tokens, slice bounds read from a mask, Python ints that change every step, block lists that are
not a stack, and ``adacache_fx.check``."""

import copy

import pytest
import torch
from helpers import max_diff, run_steps
from torch import nn

import adacache_fx as ax
from adacache_fx import presets


class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.attn, self.mlp = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, text):
        x = x + self.attn(x + text.mean(dim=1, keepdim=True))
        return x + self.mlp(torch.nn.functional.gelu(x))


class MaskedTextDiT(nn.Module):
    """Reads its ``(batch, tokens)`` text mask on the host in one of three ways, as diffusers models do:

    * ``"lengths"``: ``len(set(mask.sum(1).tolist()))`` decides a branch (Lumina2);
    * ``"select"``: the valid tokens first, by boolean indexing with the mask (HunyuanVideo 1.5);
    * ``"slice"``: the text cut to ``mask.sum(1)[0]`` tokens (HunyuanVideo Framepack).
    """

    def __init__(self, pattern, layers=4, dim=8):
        super().__init__()
        self.pattern = pattern
        self.embed, self.text, self.t = nn.Linear(4, dim), nn.Linear(6, dim), nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.out = nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep, text, mask):
        text = self.text(text)
        if self.pattern == "lengths" and len(set(mask.sum(dim=1).tolist())) > 1:
            text = text * mask[..., None]
        elif self.pattern == "select":
            text = torch.stack([torch.cat([row[m], torch.zeros_like(row[~m])]) for row, m in zip(text, mask.bool())])
        elif self.pattern == "slice":
            text = text[:, : mask.sum(dim=1, dtype=torch.int)[0]]
        x = self.embed(hidden_states) + self.t(timestep.float()[:, None, None] / 1000)
        for block in self.blocks:
            x = block(x, text)
        return self.out(x)


def masked_inputs(pattern):
    g = torch.Generator().manual_seed(0)
    latents, direction = torch.randn(2, 16, 4, generator=g), torch.randn(2, 16, 4, generator=g)
    text = torch.randn(2, 12, 6, generator=g)
    mask = torch.ones(2, 12)
    mask[0, 9:] = 0  # the rows have different lengths
    if pattern == "slice":
        mask[1, 9:] = 0

    def make_inputs(step=0):
        return {"hidden_states": latents + 0.05 * step * direction, "timestep": torch.tensor([999 - 90 * step] * 2),
                "text": text, "mask": mask.clone()}

    return make_inputs


@pytest.mark.parametrize("pattern", ["lengths", "select", "slice"])
def test_a_mask_read_on_the_host_is_specialized_whatever_its_rank(pattern):
    torch.manual_seed(0)
    model = MaskedTextDiT(pattern).eval()
    make_inputs = masked_inputs(pattern)
    reference = copy.deepcopy(model)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=6, codebook=presets.NEVER))
    assert max_diff(run_steps(cached, make_inputs, 6), run_steps(reference, make_inputs, 6)) == 0.0
    assert cached.static_inputs == ("mask",) and len(cached.programs) == 1
    cached = ax.transform(copy.deepcopy(reference), ax.AdaCacheConfig(num_steps=12, codebook={10.0: 3}))
    run_steps(cached, make_inputs, 12)
    assert ax.report(cached).num_computed < 12


class IntTimestepDiT(nn.Module):
    """Takes its timestep as a Python int (diffusers' PriorTransformer does), and ``frames`` as an int
    that sizes a tensor."""

    def __init__(self, layers=4, dim=8):
        super().__init__()
        self.embed, self.t = nn.Linear(4, dim), nn.Embedding(1000, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.out = nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep, frames=2):
        t = self.t(torch.tensor([timestep]))[:, None]
        x = self.embed(hidden_states).reshape(hidden_states.shape[0], frames, -1, self.embed.out_features)
        x = x.flatten(1, 2) + t
        for block in self.blocks:
            x = block(x, x[:, :1])
        return self.out(x)


def test_a_python_int_timestep_is_an_input_of_the_graph():
    torch.manual_seed(0)
    model = IntTimestepDiT().eval()
    g = torch.Generator().manual_seed(0)
    latents, direction = torch.randn(1, 16, 4, generator=g), torch.randn(1, 16, 4, generator=g)

    def make_inputs(step=0):
        return {"hidden_states": latents + 0.05 * step * direction, "timestep": 999 - 90 * step, "frames": 2}

    reference = copy.deepcopy(model)
    cached = ax.transform(model, ax.AdaCacheConfig(num_steps=8, codebook=presets.NEVER))
    assert max_diff(run_steps(cached, make_inputs, 8), run_steps(reference, make_inputs, 8)) == 0.0
    assert cached.traced_scalars == ("timestep",)  # frames sizes a tensor: a constant of the signature
    assert len(cached.programs) == 1 and ax.report(cached).computed_steps == list(range(1, 9))
    cached = ax.transform(copy.deepcopy(reference), ax.AdaCacheConfig(num_steps=10, codebook={10.0: 3}))
    run_steps(cached, make_inputs, 10)
    assert ax.report(cached).computed_steps == [1, 2, 5, 8, 9, 10]


class ProjectionList(nn.Module):
    """A ModuleList of projections, one per text-encoder layer, beside the blocks (diffusers' BriaFibo)."""

    def __init__(self, layers=4, dim=8):
        super().__init__()
        self.caption_projection = nn.ModuleList(nn.Linear(6, dim // 2) for _ in range(2))
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))

    def forward(self, hidden_states, text_layers):
        text = torch.cat([p(t) for p, t in zip(self.caption_projection, text_layers)], dim=-1)
        x = self.embed(hidden_states)
        for block in self.blocks:
            x = block(x, text)
        return x


def test_a_module_list_that_updates_no_stream_is_left_out_of_the_stack():
    torch.manual_seed(0)
    model = ProjectionList().eval()
    inputs = {"hidden_states": torch.randn(1, 16, 4), "text_layers": [torch.randn(1, 5, 6), torch.randn(1, 5, 6)]}
    result = ax.check(model, **inputs)
    assert result.ok and result.blocks == [f"blocks.{i}" for i in range(4)]


def test_check_reports_equality_and_an_untouched_state():
    from adacache_fx.tools.fixtures import build

    model, make_inputs = build("stdit")
    reference = copy.deepcopy(model)
    result = ax.check(model, **make_inputs(0), num_calls=3)
    assert result.ok and result.diffs == [0.0, 0.0, 0.0] and result.state_changes == []
    assert result.varied == "timestep" and result.timesteps == ["999", "749", "500"]
    assert result.static_inputs == ("height", "width", "fps")
    text = str(result)
    assert "OK" in text and "untouched" in text and "blocks: 4 (blocks.0 .. blocks.3)" in text
    assert reference.rope.cached_seq_len == 0 and model.rope.cached_seq_len == 4  # check's calls of the model
    with pytest.raises(ValueError, match="vary='sigma' is not among the keyword arguments"):
        ax.check(model, **make_inputs(0), vary="sigma")


def test_check_fails_when_the_transform_differs(monkeypatch):
    """A check that cannot fail is no check: a program that adds 1e-3 to the output is reported."""
    from adacache_fx import module
    from adacache_fx.tools.fixtures import build

    model, make_inputs = build("wan", num_layers=2)
    forward = module.CachedModel.forward
    monkeypatch.setattr(module.CachedModel, "forward", lambda self, *a, **k: forward(self, *a, **k)[0] + 1e-3)
    result = ax.check(model, **make_inputs(0))
    assert not result.ok and min(result.diffs) > 5e-4 and "FAILED" in str(result)

"""Density counted against hand-computed values on crafted activations."""

import pytest
import torch
from torch import nn

from deftcompress.architecture import MLPBlock
from deftcompress.measurement.density import DensityMeter


def _block(stack: str, index: int) -> MLPBlock:
    act = nn.Identity()
    return MLPBlock(stack=stack, index=index, layer_name=f"{stack}.{index}", layer=act, block=act, act=act, up=act, down=act)


# batch 2, seq 3, width 4. Sequence 0 has 3 real tokens, sequence 1 has 1 real token + 2 padding.
ACT = torch.tensor(
    [
        [[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.005], [3.0, 3.0, 3.0, 3.0]],  # nonzero: 2, 1, 4 ; |a|>0.01: 2, 0, 4
        [[0.0, 0.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]],  # nonzero: 1, (4 pad), (0 pad)
    ]
)
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_masked_density_counts_real_tokens_only():
    block = _block("encoder", 0)
    with DensityMeter([block], mode="masked", tau=0.01) as meter:
        meter.set_token_mask("encoder", MASK)
        block.act(ACT)
    r = meter.result()
    # real tokens: 4 positions x 4 features = 16 values; nonzero = 2 + 1 + 4 + 1 = 8
    assert r.encoder == pytest.approx(8 / 16)
    # |a| > 0.01: 2 + 0 + 4 + 1 = 7
    assert r.encoder_above_tau == pytest.approx(7 / 16)
    assert r.decoder is None
    assert r.counted_positions == {"encoder": 4}


def test_paper_density_counts_padding():
    block = _block("encoder", 0)
    with DensityMeter([block], mode="paper", tau=0.01) as meter:
        meter.set_token_mask("encoder", MASK)  # ignored in paper mode
        block.act(ACT)
    r = meter.result()
    # all 6 positions x 4 = 24 values; nonzero = 2 + 1 + 4 + 1 + 4 + 0 = 12
    assert r.encoder == pytest.approx(12 / 24)
    assert r.counted_positions == {"encoder": 6}


def test_accumulates_over_batches_and_separates_stacks():
    enc0, enc1, dec0 = _block("encoder", 0), _block("encoder", 1), _block("decoder", 0)
    with DensityMeter([enc0, enc1, dec0], mode="masked") as meter:
        for _ in range(2):
            meter.set_token_mask("encoder", MASK)
            meter.set_token_mask("decoder", torch.tensor([[1, 0, 0], [0, 0, 0]]))
            enc0.act(ACT)
            enc1.act(torch.zeros_like(ACT))
            dec0.act(ACT)
    r = meter.result()
    # encoder: layer 0 has 8/16 each batch, layer 1 has 0 -> (16 + 0) / 64
    assert r.encoder == pytest.approx(16 / 64)
    assert [l.density for l in r.per_layer] == pytest.approx([0.5, 0.0, 2 / 4])
    # decoder counts only position (0, 0): nonzero 2 of 4
    assert r.decoder == pytest.approx(0.5)


def test_paused_stack_is_not_counted():
    block = _block("decoder", 0)
    with DensityMeter([block], mode="paper") as meter:
        block.act(torch.ones(1, 2, 4))
        with meter.tap.paused("decoder"):
            block.act(torch.zeros(1, 50, 4))
    assert meter.result().decoder == 1.0

"""benchmarks/bench_7b.py predicts a 7B step's memory and FLOPs on fake tensors. Here its
prediction for a tiny shape is checked against the same two steps taken on real tensors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_7b  # noqa: E402
from minimcit.model import LlavaConfig, TextConfig, VisionConfig  # noqa: E402

TINY = LlavaConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=56, patch_size=14),
    text=TextConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2),
    image_token_index=299)


@pytest.mark.parametrize("method,ckpt", [("seqlora", False), ("branchlora", True), ("lilora", False)])
def test_fake_prediction_matches_the_real_step(method, ckpt):
    shape = dict(batch=3, prompt=7, answer=5)
    fake = bench_7b.predict(TINY, method, ckpt, **shape)
    real = bench_7b.predict(TINY, method, ckpt, fake=False, **shape)
    assert fake["flops"] == real["flops"] > 0
    assert fake["held"] == real["held"]
    # The real boolean index builds its integer indices inside the kernel, unseen; the replay
    # builds them as tensors. That is the only difference: a few bytes per labelled token.
    assert abs(fake["peak"] - real["peak"]) <= 3 * 15 * 8 * 2
    assert fake["peak"] > fake["held"] + 3 * 16 * 48 * 2  # activations were counted at all


def test_replay_refuses_a_tape_out_of_step():
    tape = [(torch.ops.aten.nonzero.default, 3)]
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(), bench_7b.Replay(tape):
        x = torch.zeros(4, 2)
        with pytest.raises(RuntimeError, match="out of step"):
            x.masked_select(x > 0)
        assert x.nonzero().shape == (3, 2)  # the tape's count, not the (all-zero) data's


import torch

from vlmalign.losses import token_logps


def test_token_logps_is_log_softmax_at_the_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g)
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    want = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    got = token_logps(logits, targets)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)


def test_token_logps_computes_in_fp32_for_low_precision_logits():
    logits = torch.tensor([[[4.0, 0.0, -4.0]]], dtype=torch.bfloat16)
    got = token_logps(logits, torch.tensor([[2]]))
    assert got.dtype == torch.float32
    assert torch.equal(got, token_logps(logits.float(), torch.tensor([[2]])))


def test_token_logps_keeps_the_graph():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    token_logps(logits, torch.tensor([[1]])).sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[[-0.25, 0.75, -0.25, -0.25]]]))

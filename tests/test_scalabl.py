"""ScalaBL (Samplawski et al., UAI 2025): the singular-value noise's moments, the SVD start, the KL direction
(q to p; the official code computes the reverse), and that TFB refuses a ScalaBL adapter (it has no free A).
The end-to-end runs, eval.py reloads and real-model runs of tests/test_bayes_lora.py cover it too (SAMPLED)."""
import math

import pytest
import torch

from test_bayes_lora import HEADS, TINY, Net, _moments, _run, _z, tiny_lora
from uqlora.core.blob import lora_layers
from uqlora.core.scalabl import ScalaBL
from uqlora.errors import UqloraError


@pytest.mark.parametrize("flip", [False, True])
def test_scalabl_training_noise_covariance(flip):
    model = tiny_lora()
    layers = lora_layers(model)[:1]
    var = ScalaBL(layers, eps=0.3, flipout=flip)
    layer = layers[0][1]
    x = torch.randn(2, 6, dtype=torch.float64)
    layer.eval()
    with torch.no_grad():
        mean_out = layer(x)
    layer.train()
    torch.manual_seed(2)
    with torch.no_grad():
        outs = torch.stack([layer(x) for _ in range(20000)])
    mean, se_mean, cov, se_cov, cross, se_cross = _moments(outs)
    B, s = layer.lora_B["default"].weight, layer.scaling["default"]
    z = x @ var.Vh[0].detach().T                          # [T, r]
    sig2 = var.log_s_sigma[0].detach().exp() ** 2
    expected = torch.stack([s ** 2 * B @ torch.diag(sig2 * z[t] ** 2) @ B.T for t in range(2)])
    expected_cross = torch.zeros_like(cross) if flip else s ** 2 * B @ torch.diag(sig2 * z[0] * z[1]) @ B.T
    assert _z(mean, mean_out, se_mean) < 5
    assert _z(cov, expected, se_cov) < 5
    assert _z(cross, expected_cross, se_cross) < 5  # one draw shared by the batch unless flipout
    # the mean path is A = diag(s) Vh: peft's lora_A weight is frozen and unused
    A = var.mean_weight(0).detach()
    base = layer.base_layer(x)
    torch.testing.assert_close(mean_out, base + x @ A.T @ B.T * s, rtol=1e-12, atol=1e-12)
    assert not layer.lora_A["default"].weight.requires_grad


def test_scalabl_starts_from_the_svd_of_peft_init():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], lora_dropout=0.0)).double()
    (name, layer), = lora_layers(model)
    A0 = layer.lora_A["default"].weight.detach().clone()
    var = ScalaBL([(name, layer)], eps=0.05)
    torch.testing.assert_close(var.s(0).detach(), torch.linalg.svdvals(A0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var.Vh[0].detach() @ var.Vh[0].detach().T, torch.eye(2, dtype=torch.float64))
    sig = var.sigma(0).detach()
    assert ((sig >= 0.05 / math.sqrt(2) - 1e-12) & (sig <= 0.05 + 1e-12)).all()


def test_scalabl_kl_direction_is_q_to_p_not_the_official_reverse():
    model = tiny_lora()
    var = ScalaBL(lora_layers(model), eps=0.05)
    Normal = torch.distributions.Normal
    q = [Normal(var.s(i).detach(), var.sigma(i).detach()) for i in range(2)]
    p = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    forward = sum(torch.distributions.kl_divergence(qi, p).sum() for qi in q)
    reverse = sum(torch.distributions.kl_divergence(Normal(torch.zeros_like(qi.loc), torch.ones_like(qi.loc)), qi).sum()
                  for qi in q)
    torch.testing.assert_close(var.kl().detach(), forward, rtol=1e-12, atol=0)
    torch.testing.assert_close(var.reverse_kl().detach(), reverse, rtol=1e-12, atol=0)
    # the official formula (BayesAdapt ScalaBLLinear.kl_div, prior mean 1e-8) is the reverse direction
    official = sum(((var.log_s_sigma[i] - 0.0) + (1.0 + (1e-8 - var.s(i)) ** 2) / (2 * var.sigma(i) ** 2) - 0.5).sum()
                   for i in range(2)).detach()
    torch.testing.assert_close(official, reverse, rtol=1e-6, atol=0)
    assert reverse > 10 * forward  # a real difference at sigma_s ~ 0.05


def test_tfb_refuses_a_scalabl_adapter(tmp_path):
    over = HEADS["classifier"][0]
    _, s = _run(tmp_path, "scalabl", *over, *TINY, "method=scalabl")
    with pytest.raises(UqloraError, match="checkpoint does not match this model"):
        _run(tmp_path, "tfb2", *over, *TINY, "method=tfb", f"method.map_run={s['run_dir']}")

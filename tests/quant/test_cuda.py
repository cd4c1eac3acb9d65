"""CUDA: a quantized CIM layer gives the same integers, outputs and counters as on CPU; backward runs."""

import pytest
import torch
from torch import nn

from cimq_pl.quant import CIMConv2d, CIMSpec, QuantizerOptions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    conv = nn.Conv2d(20, 12, 3, padding=1, groups=2).double()
    x = torch.randn(4, 20, 9, 9, dtype=torch.float64).relu()
    spec = CIMSpec(rows=40, cols=7, weight_bits=6, cell_bits=2, weight_slicing="offset", input_bits=5, dac_bits=2, adc_bits=5)
    layer = CIMConv2d.from_conv(conv, spec, QuantizerOptions(weight_rounding="adaround")).double()
    layer.eval()
    layer(x)
    layer.collect_stats = True
    out_cpu, trace_cpu = layer.simulate(x, trace=True)
    stats_cpu = layer.stats.as_dict()
    layer.reset_stats()
    layer.cuda()
    out_gpu, trace_gpu = layer.simulate(x.cuda(), trace=True)
    stats_gpu = layer.stats.as_dict()
    assert torch.equal(trace_cpu["partial_sums"], trace_gpu["partial_sums"].cpu())
    assert torch.equal(trace_cpu["adc_codes"], trace_gpu["adc_codes"].cpu())
    torch.testing.assert_close(out_cpu, out_gpu.cpu())
    assert stats_cpu == stats_gpu, (stats_cpu, stats_gpu)
    layer.train()
    layer.float()
    xg = x.float().cuda().requires_grad_(True)
    layer(xg).square().sum().backward()
    assert all(p.grad is not None for p in (layer.psum_quantizer.theta, layer.weight_quantizer.rounding_logits, layer.input_quantizer.step))

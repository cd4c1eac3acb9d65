"""CUDA: a quantized CIM layer gives the same integers, outputs and counters as on CPU; backward runs."""

import pytest
import torch
from torch import nn

from cimq_pl.errors import ConfigError
from cimq_pl.quant import CIMConv2d, CIMSpec, QuantizerOptions
from cimq_pl.quant.cuda_graphs import record_forward


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


def test_recording_a_cuda_graph_names_the_device_it_needs():
    with pytest.raises(ConfigError, match="images on cpu are not on a CUDA device"):
        record_forward(nn.Identity(), torch.zeros(2, 3))


def _two_layer_cim(device: str) -> nn.Module:
    """Two CIM convolutions (W4A4 bit-serial, ADC 4, AdaRound) on ``device``, initialised on random images."""
    from cimq_pl.quant import convert_to_cim

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)).eval()
    convert_to_cim(model, CIMSpec(rows=64, cols=32, weight_bits=4, input_bits=4, adc_bits=4),
                   options=QuantizerOptions(weight_rounding="adaround"))
    model = model.to(device)
    with torch.no_grad():
        model(torch.rand(8, 8, 12, 12, device=device))  # lazy initialisation
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_graph_replays_the_eager_evaluation_bit_for_bit():
    """The eager path reads no value on the host (tests/quant/test_host_syncs.py), so its evaluation records into a
    CUDA graph (`record_forward`); the replay gives the eager logits exactly, for new images too, and refuses
    another shape."""
    model = _two_layer_cim("cuda")
    images = torch.rand(16, 8, 12, 12, device="cuda")
    replay = record_forward(model, images)
    for batch in (images, torch.rand_like(images)):
        out = replay(batch)
        with torch.no_grad():
            assert torch.equal(out, model(batch))
    with pytest.raises(ConfigError, match=r"recorded for \(16, 8, 12, 12\) torch.float32 images, got \(8, 8, 12, 12\)"):
        replay(images[:8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_training_forward_and_backward_give_the_eager_gradients():
    """A reconstruction unit as ``torch.cuda.make_graphed_callables`` (what `benchmarks/network_speed.py --paths
    graphed` times): without random dropping, its replayed output and quantizer gradients are the eager ones."""
    from cimq_pl.quant import iter_quantizers

    eager, graphed = _two_layer_cim("cuda").train(), _two_layer_cim("cuda").train()
    graphed.load_state_dict(eager.state_dict())
    x = torch.rand(8, 8, 12, 12, device="cuda")
    learned = {}
    for model in (eager, graphed):
        for param in model.parameters():
            param.requires_grad_(False)
        learned[model] = [q.rounding_logits.requires_grad_(True) for *_, q in iter_quantizers(model, ("weight",))]
    run = torch.cuda.make_graphed_callables(graphed, (x,), allow_unused_input=True)
    for model, forward in ((eager, eager), (graphed, run)):
        for param in learned[model]:
            param.grad = None
        forward(x).square().sum().backward()
    torch.testing.assert_close(run(x), eager(x), rtol=1e-6, atol=1e-6)
    for a, b in zip(learned[eager], learned[graphed]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)

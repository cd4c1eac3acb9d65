"""Whole-network throughput of the CIM simulation: float model, CIM eager, CIM compiled.

For each network (ResNet-20 on 32x32 CIFAR images; timm ResNet-18 on 224x224 images, random weights and
images: speed does not depend on them) and each path it measures, in one process:

* eval img/s: images per second of ``model(images)`` under ``torch.no_grad`` in eval mode (best of
  ``--repeats`` batches after two warm-up batches), and its ratio to the float model (BN folded);
* PTQ step s: one block-reconstruction step of every unit (`find_blocks`), summed: the captured block input
  of ``--ptq-batch`` images, block forward and backward, Adam on the AdaRound logits, input steps and ADC clips
  (the PTQ preset ``configs/quant/cimq_ptq.yaml``: bit-sparse inputs k=2, arraywise weight scales, per-array
  learned ADC clips, QDrop on inputs); ``units / PTQ step s`` is reconstruction steps per second;
* compile s: the compiled path's first eval batch plus first PTQ step of every unit, minus the steady times
  (what ``torch.compile`` costs for the whole network; Inductor's on-disk cache makes later processes faster);
* host syncs: the tensor values one eval batch and one unit's reconstruction forward and backward (all units,
  summed; Adam's step left out) read on the host (`cimq_pl.quant.host_syncs.HostSyncCounter`): each waits for a
  GPU, and a CUDA graph can record none.

The ``graphed`` path (CUDA only) is the eager path with the launches of issue 14's small batches recorded into
CUDA graphs: evaluation replays one graph of the whole ``model(images)`` (`cimq_pl.quant.cuda_graphs.record_forward`:
three warm-up batches on a side stream, the images copied into the graph's own input each batch), and every unit's block forward and backward is a
``torch.cuda.make_graphed_callables`` callable (the loss, the rounding loss and Adam stay eager). Its "max abs logit
diff vs eager" column compares the replayed logits with the eager path's on the same images.

Spec: R = C = 128, W4, A4 bit-serial (dac_bits 1), ADC 4 bits, every conv and linear on the arrays.

Usage::

    python benchmarks/network_speed.py [--models resnet20,resnet18] [--paths fp,eager,compiled]
        [--threads 1] [--repeats 3] [--no-ptq] [--out-dir benchmarks/results]
    python benchmarks/network_speed.py --device cuda --paths fp,eager,graphed   # CUDA graphs (a GPU machine)
    python benchmarks/network_speed.py --smoke      # ResNet-20, batch 8, fp and eager, seconds

CPU times depend much on the allocator (see `benchmarks/cim_layer_speed.py`):
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` keeps glibc from faulting the partial-sum buffers in
again on every call. Writes ``network_speed_<device>.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner import machine, markdown_table  # noqa: E402

# name -> (model name, classes, image size, eval batch, PTQ batch)
NETWORKS = {
    "resnet20": ("cifar_resnet20", 10, 32, 128, 32),
    "resnet18": ("resnet18", 1000, 224, 8, 4),
}
PATHS = ("fp", "eager", "compiled", "graphed")
COLUMNS = ("model", "image", "path", "eval_batch", "eval_img_per_s", "eval_vs_fp", "ptq_batch", "units",
           "ptq_step_s", "ptq_steps_per_s", "compile_s", "eval_host_syncs", "ptq_host_syncs", "max_logit_diff")
HEADERS = ("model", "image", "path", "eval batch", "eval img/s", "eval time vs FP", "PTQ batch", "units",
           "PTQ step s (all units)", "PTQ steps/s (per unit)", "compile s", "eval host syncs",
           "PTQ block host syncs", "max abs logit diff vs eager")


def _spec():
    from cimq_pl.quant import CIMSpec

    return CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4)


def build(network: str, path: str, device: torch.device, calibration: torch.Tensor) -> nn.Module:
    """The float network (BN folded) or its CIM version on ``path``, quantizers initialised on ``calibration``."""
    from cimq_pl.models import create_model
    from cimq_pl.quant import QuantizerOptions, convert_to_cim, fold_batchnorm_

    name, classes, _, _, _ = NETWORKS[network]
    torch.manual_seed(0)
    model = create_model(name, classes, False).eval()
    fold_batchnorm_(model)
    model = model.to(device)
    if path == "fp":
        return model
    options = QuantizerOptions(weight_granularity="array", weight_rounding="adaround", input_max_ones=2,
                               psum_granularity="array", psum_observer="mse", psum_learn_clip=True)
    convert_to_cim(model, _spec(), options=options)
    if path == "compiled":  # (an older checkout without cimq_pl.quant.fused measures its eager path only)
        from cimq_pl.quant.fused import set_simulation

        set_simulation(model, path)
    with torch.no_grad():
        model(calibration)  # lazy initialisation of every quantizer (eager: calibration runs eagerly)
    return model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eval_seconds(forward, repeats: int, device) -> tuple:
    """(first batch s, best batch s) of ``forward()`` (one eval batch) under no_grad."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            start = time.perf_counter()
            forward()
            _sync(device)
            times.append(time.perf_counter() - start)
    return times[0], min(times[2:])


def sync_counter():
    """A fresh `cimq_pl.quant.host_syncs.HostSyncCounter`, None on a checkout without one (an older commit)."""
    try:
        from cimq_pl.quant.host_syncs import HostSyncCounter
    except ImportError:
        return None
    return HostSyncCounter()


def ptq_setup(model, network: str, batch: int, device, copy_model: bool = True, graphed: bool = False):
    """(units, step): ``step(count=None)`` runs one reconstruction step of every unit of a PTQ copy of ``model``
    (of ``model`` itself when not ``copy_model``); ``count``, a context manager, wraps each unit's forward and
    backward. ``graphed``: each block's forward and backward replay CUDA graphs
    (``torch.cuda.make_graphed_callables``)."""
    from cimq_pl.quant import cim_layers, iter_quantizers
    from cimq_pl.quant.layers import _CIMLayerBase
    from cimq_pl.quant.reconstruction import capture_block_io, find_blocks

    _, _, size, _, _ = NETWORKS[network]
    if copy_model:
        model = copy.deepcopy(model)
    for param in model.parameters():
        param.requires_grad_(False)
    learned = []
    for _, role, quantizer in iter_quantizers(model):
        for name, param in quantizer.named_parameters(recurse=False):
            if (role, name) in (("weight", "rounding_logits"), ("input", "step"), ("psum", "theta")):
                param.requires_grad_(True)
                learned.append(param)
    for _, layer in cim_layers(model):
        if layer.input_quantizer is not None:
            layer.input_quantizer.keep_prob = 0.5
    blocks = find_blocks(model, lambda m: isinstance(m, _CIMLayerBase))
    optimizer = torch.optim.Adam(learned, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)
    with torch.no_grad():
        ios = [capture_block_io(model, block, images) for _, block in blocks]
    model.train()
    runs = [block for _, block in blocks]
    if graphed:
        runs = [torch.cuda.make_graphed_callables(block, (x,), allow_unused_input=True)
                for block, (x, _) in zip(runs, ios)]

    def step(count=None) -> float:
        total = 0.0
        for (_, block), run, (x, y) in zip(blocks, runs, ios):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with count or contextlib.nullcontext():
                loss = (run(x) - y).pow(2).sum(1).mean()
                loss = loss + 1e-2 * sum(q.rounding_loss(4.0) for *_, q in iter_quantizers(block, ("weight",)))
                loss.backward()
            optimizer.step()
            _sync(device)
            total += time.perf_counter() - start
        return total

    return len(blocks), step


def ptq_seconds(model, network: str, batch: int, repeats: int, device, graphed: bool = False) -> tuple:
    """(units, first step of every unit s, best summed step s, host syncs of one step's unit forwards and backwards or
    None) of block reconstruction (see the docstring)."""
    units, step = ptq_setup(model, network, batch, device, graphed=graphed)
    totals = [step() for _ in range(repeats + 1)]
    counter = None if graphed else sync_counter()  # (a replay runs no operators to count)
    if counter is not None:
        step(counter)
    return units, totals[0], min(totals[1:]), None if counter is None else counter.total


def run(network: str, path: str, device, repeats: int, ptq: bool) -> dict:
    _, _, size, batch, ptq_batch = NETWORKS[network]
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(batch, 3, size, size, generator=generator).to(device)
    model = build(network, path, device, images[: min(batch, 8)])
    row = {"model": network, "image": f"{size}x{size}", "path": path, "eval_batch": batch}
    forward = lambda: model(images)  # noqa: E731
    if path == "graphed":
        from cimq_pl.quant.cuda_graphs import record_forward

        replay = record_forward(model, images)
        forward = lambda: replay(images)  # noqa: E731
        with torch.no_grad():
            row["max_logit_diff"] = float((forward() - model(images)).abs().max())
    elif path != "fp" and (counter := sync_counter()) is not None:
        with torch.no_grad(), counter:
            forward()
        row["eval_host_syncs"] = counter.total
    first, best = eval_seconds(forward, repeats, device)
    row.update(eval_img_per_s=round(batch / best, 1), _eval_s=best)
    compile_s = first - best
    if ptq and path != "fp":
        units, first_step, step, syncs = ptq_seconds(model, network, ptq_batch, repeats, device, path == "graphed")
        row.update(ptq_batch=ptq_batch, units=units, ptq_step_s=round(step, 3),
                   ptq_steps_per_s=round(units / step, 2), ptq_host_syncs=syncs)
        compile_s += first_step - step
    if path == "compiled":
        row["compile_s"] = round(compile_s, 1)
    return row


def main(argv=None) -> list:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet20,resnet18")
    parser.add_argument("--paths", default=None,
                        help=f"some of {','.join(PATHS)} (default: all; graphed on CUDA only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-ptq", action="store_true", help="skip the PTQ reconstruction step")
    parser.add_argument("--eval-batch", type=int, default=None, help="override every network's eval batch")
    parser.add_argument("--ptq-batch", type=int, default=None, help="override every network's PTQ batch")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--smoke", action="store_true", help="ResNet-20, batch 8, fp and eager, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.paths, args.repeats, args.eval_batch, args.ptq_batch = "resnet20", "fp,eager", 1, 8, 4
    cuda = torch.device(args.device).type == "cuda"
    paths = args.paths.split(",") if args.paths else [p for p in PATHS if cuda or p != "graphed"]
    models = args.models.split(",")
    for value, allowed, flag in ((models, NETWORKS, "--models"), (paths, PATHS, "--paths")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}, expected some of {list(allowed)}")
    if "graphed" in paths and not cuda:
        parser.error(f"--paths graphed records CUDA graphs: it needs --device cuda (got --device {args.device})")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in NETWORKS:
        model, classes, size, batch, ptq_batch = NETWORKS[name]
        NETWORKS[name] = (model, classes, size, args.eval_batch or batch, args.ptq_batch or ptq_batch)
    device = torch.device(args.device)
    print(f"# network speed: {machine()}, {torch.get_num_threads()} threads, device {device}")
    rows = []
    for network in models:
        fp_seconds = None
        for path in paths:
            try:
                row = run(network, path, device, args.repeats, not args.no_ptq)
            except Exception as error:  # noqa: BLE001 - a capture that fails must not cost the other paths' rows
                if path != "graphed":
                    raise
                print(f"[network_speed] {network} graphed: {type(error).__name__}: {str(error).splitlines()[0]}")
                continue
            if path == "fp":
                fp_seconds = row["_eval_s"]
            if fp_seconds:
                row["eval_vs_fp"] = round(row["_eval_s"] / fp_seconds, 1)
            rows.append({column: row.get(column, "") for column in COLUMNS})
            print(rows[-1], flush=True)
    print()
    print(markdown_table(rows, COLUMNS, HEADERS))
    path = write_csv_atomic(args.out_dir / f"network_speed_{device.type}.csv", rows, COLUMNS)
    print(f"\nwrote {path}")
    return rows


if __name__ == "__main__":
    main()

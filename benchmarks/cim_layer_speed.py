"""Speed of the CIM layer simulation on the conv shapes of a CIFAR ResNet-20, eager and compiled.

For every distinct 3x3 conv shape of ResNet-20 (built here directly, no model code imported) and each
simulation path (``layer.simulation``: ``eager``, the default, and ``compiled``, see `cimq_pl.quant.fused`)
it prints

* fwd ratio: forward time of the CIM layer (under ``torch.no_grad``) / (n_cycles x forward time of the plain
  conv), both measured in the same run;
* fwd+bwd ratio: the same for forward + backward (gradients for input, weight and quantizer parameters);
* compile s (compiled path): wall time of the first forward + backward minus a steady one, i.e. what
  ``torch.compile`` costs for this layer shape (Inductor's on-disk cache makes a second process faster);
* peak memory of one CIM forward+backward after a warm-up: on CUDA ``torch.cuda.max_memory_allocated`` minus
  the memory allocated before the call; on CPU (Linux) the process's peak RSS (``VmHWM`` of
  /proc/self/status, reset through /proc/self/clear_refs just before the call) minus its RSS before the call,
  in a fresh subprocess per shape and path.

Spec: R = C = 128, 4-bit weights, 4-bit bit-serial inputs (dac_bits = 1, unsigned: 4 cycles), 4-bit ADC.

Usage::

    python benchmarks/cim_layer_speed.py [--batch 128] [--device cpu|cuda] [--repeats 5] [--threads 1]
        [--paths eager,compiled] [--out-dir benchmarks/results]

Writes ``cim_layer_speed_<device>.csv`` (the ``fwd_ratio``/``fwd_bwd_ratio``/``peak_mib`` columns are the eager
path, ``compiled_*`` the compiled one) and ``cim_layer_speed_<device>.png`` in ``--out-dir``. CPU times depend
much on the allocator: glibc returns every partial-sum buffer above 32 MiB to the system and faults it in again
on the next call; ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (or jemalloc/tcmalloc) avoids it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from cimq_pl.quant import CIMConv2d, CIMSpec

# (in_channels, out_channels, stride, input height = width)
RESNET20_CONV_SHAPES = (
    (16, 16, 1, 32),
    (16, 32, 2, 32),
    (32, 32, 1, 16),
    (32, 64, 2, 16),
    (64, 64, 1, 8),
)
SPEC = CIMSpec(rows=128, cols=128, weight_bits=4, input_bits=4, dac_bits=1, adc_bits=4)
PATHS = ("eager", "compiled")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def _build(shape, batch: int, device: torch.device, simulation: str = "eager"):
    cin, cout, stride, size = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).to(device)
    x = torch.rand(batch, cin, size, size, device=device)
    layer = CIMConv2d.from_conv(conv, SPEC).to(device)
    layer.input_quantizer.signed = False
    with torch.no_grad():
        layer(x[:8])  # lazy initialisation of all quantizers
    layer.simulation = simulation
    return conv, layer, x


def measure(shape, batch: int, device: torch.device, repeats: int, simulation: str = "eager") -> dict:
    """Times and ratios for one conv shape and simulation path."""
    conv, layer, x = _build(shape, batch, device, simulation)
    n_cycles = layer.geometry.n_cycles(signed=False)
    x_grad = x.clone().requires_grad_(True)

    def conv_step():
        conv(x_grad).sum().backward()

    def cim_step():
        layer(x_grad).sum().backward()

    start = time.perf_counter()
    with torch.no_grad():
        layer(x)
    cim_step()
    _sync(device)
    first = time.perf_counter() - start
    with torch.no_grad():
        t_conv = _time(lambda: conv(x), device, repeats)
        t_cim = _time(lambda: layer(x), device, repeats)
    t_conv_fb = _time(conv_step, device, repeats)
    t_cim_fb = _time(cim_step, device, repeats)
    return {
        "shape": shape,
        "arrays": layer.geometry.arrays_used,
        "row_blocks": layer.geometry.n_row_blocks,
        "cycles": n_cycles,
        "conv_fwd_ms": 1e3 * t_conv,
        "cim_fwd_ms": 1e3 * t_cim,
        "fwd_ratio": t_cim / (n_cycles * t_conv),
        "fwd_bwd_ratio": t_cim_fb / (n_cycles * t_conv_fb),
        "first_call_s": first,
        "compile_s": max(first - t_cim - t_cim_fb, 0.0),
    }


def _rss_kib(field: str) -> int:
    """A memory field (``VmRSS`` or the peak ``VmHWM``) of /proc/self/status, in KiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_memory_mb(shape, batch: int, device: torch.device, simulation: str = "eager") -> float:
    """Peak memory of one CIM forward+backward after a warm-up (MiB); see the module docstring."""
    if device.type == "cuda":
        conv, layer, x = _build(shape, batch, device, simulation)
        x = x.requires_grad_(True)
        layer(x).sum().backward()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        layer(x).sum().backward()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    code = (
        "import json, sys, torch; sys.path.insert(0, '.');"
        f"torch.set_num_threads({torch.get_num_threads()});"
        "from benchmarks.cim_layer_speed import _build, _rss_kib;"
        f"conv, layer, x = _build({tuple(shape)}, {batch}, torch.device('cpu'), {simulation!r});"
        "x.requires_grad_(True);"
        "layer(x).sum().backward();"
        "open('/proc/self/clear_refs', 'w').write('5');"  # reset the peak RSS (VmHWM) to the current RSS
        "before = _rss_kib('VmRSS');"
        "layer(x).sum().backward();"
        "print(json.dumps((_rss_kib('VmHWM') - before) / 1024))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return float(out.stdout.strip().splitlines()[-1])


COLUMNS = ("conv", "arrays", "cycles", "conv_fwd_ms", "cim_fwd_ms", "fwd_ratio", "fwd_bwd_ratio", "peak_mib",
           "compiled_fwd_ms", "compiled_fwd_ratio", "compiled_fwd_bwd_ratio", "compiled_peak_mib", "compile_s")
HEADERS = ("conv (Cin->Cout, stride, HxW)", "arrays", "cycles", "conv fwd ms", "eager fwd ms", "eager fwd ratio",
           "eager fwd+bwd ratio", "eager peak MiB", "compiled fwd ms", "compiled fwd ratio",
           "compiled fwd+bwd ratio", "compiled peak MiB", "compile s")


def plot(rows: list, title: str, path: Path) -> Path:
    """Bars of the forward and forward+backward ratios per conv shape and path (PNG)."""
    from cimq_pl.cost.plots import finish_figure, new_figure

    figure = new_figure(7.5, 3.8)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(rows))
    bars = [("fwd_ratio", "eager forward"), ("fwd_bwd_ratio", "eager forward + backward"),
            ("compiled_fwd_ratio", "compiled forward"), ("compiled_fwd_bwd_ratio", "compiled forward + backward")]
    bars = [(key, label) for key, label in bars if any(r.get(key) != "" for r in rows)]
    width = 0.8 / len(bars)
    for index, (key, label) in enumerate(bars):
        offset = (index - (len(bars) - 1) / 2) * width
        axes.bar([p + offset for p in positions], [r[key] if r[key] != "" else 0 for r in rows], width, label=label)
    axes.axhline(2.0, color="k", linestyle=":", linewidth=1, label="target forward 2.0")
    axes.axhline(3.0, color="k", linestyle="--", linewidth=1, label="target fwd+bwd 3.0")
    axes.set_xticks(list(positions))
    axes.set_xticklabels([r["conv"] for r in rows], fontsize=7)
    return finish_figure(figure, axes, path, "", "CIM time / (cycles x conv time)", title)


def main(argv=None) -> list:
    from cimq_pl.cost.tables import write_csv_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--paths", default=None,
                        help="comma-separated simulation paths (default: eager,compiled; eager with --smoke)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--smoke", action="store_true", help="batch 4, one repeat, no memory column, eager only")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.repeats, args.no_memory = 4, 1, True
    paths = tuple((args.paths or ("eager" if args.smoke else ",".join(PATHS))).split(","))
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"--paths: unknown {unknown}, expected some of {list(PATHS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (f"CIM layer speed: {name}, torch {torch.__version__}, batch {args.batch}, "
             f"R=C={SPEC.rows}, W{SPEC.weight_bits} A{SPEC.input_bits} (bit-serial) ADC{SPEC.adc_bits}")
    print(f"# {title}")
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "---|" * len(HEADERS))
    rows = []
    for shape in RESNET20_CONV_SHAPES:
        cin, cout, stride, size = shape
        row = {column: "" for column in COLUMNS}
        row["conv"] = f"{cin}->{cout}, s{stride}, {size}x{size}"
        for path in paths:
            result = measure(shape, args.batch, device, args.repeats, path)
            memory = "" if args.no_memory else round(peak_memory_mb(shape, args.batch, device, path))
            prefix = "" if path == "eager" else "compiled_"
            row.update({"arrays": result["arrays"], "cycles": result["cycles"],
                        "conv_fwd_ms": row["conv_fwd_ms"] or round(result["conv_fwd_ms"], 2),
                        f"{prefix}fwd_ratio": round(result["fwd_ratio"], 2),
                        f"{prefix}fwd_bwd_ratio": round(result["fwd_bwd_ratio"], 2),
                        f"{prefix}peak_mib": memory,
                        "cim_fwd_ms" if path == "eager" else "compiled_fwd_ms": round(result["cim_fwd_ms"], 2)})
            if path == "compiled":
                row["compile_s"] = round(result["compile_s"], 1)
        rows.append(row)
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
    stem = f"cim_layer_speed_{device.type}"
    csv_path = write_csv_atomic(args.out_dir / f"{stem}.csv", rows, COLUMNS)
    picture = plot(rows, title, args.out_dir / f"{stem}.png")
    print(f"\nwrote {csv_path} and {picture}")
    return rows


if __name__ == "__main__":
    main()

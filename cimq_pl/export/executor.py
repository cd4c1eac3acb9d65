"""`IntegerExecutor`: the reference that runs an export the way the accelerator would, from its integers alone.

For every CIM layer and every tile (array) of it:

1. input codes: ``q = nearest allowed code of clamp(x / s_a)`` (the digital quantizer in front of the arrays);
2. input cycle j feeds the digits ``(q >> shift_j) & mask_j`` of every wordline;
3. each array computes integer partial sums ``p = sum over its wordlines of digit x cell`` per bitline and cycle;
4. each bitline's ADC turns p into the code ``code_min + #{thresholds <= p}`` (integer comparisons);
5. the digital unit shift-adds the codes over cycles (integers), then scales them by the ADC step and the
   tile's weight scale times the slice weight and accumulates tiles in float32, row block by row block
   (the reference column, with offset slicing, is subtracted the same way); then x s_a, + bias.

No fake-quant module is used; integer matrix products run in float32 on the integers and are rounded back to int64:
exact, because every partial sum, in any order of summation, is bounded by rows x max digit x max |cell| < 2^24
(checked at export), and float BLAS is far faster than PyTorch's int64 matmul, which has no BLAS kernel (CUDA
has no integer matmul at all). Between layers the graph's digital operations run in float32.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cimq_pl.export.format import CIM_LAYER_OPS, ExportError
from cimq_pl.export.graph import DIGITAL_OPS
from cimq_pl.export.reader import Export, read_export


def _integer_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The exact int64 product of two float32 tensors holding integers (every partial sum < 2^24, checked at export)."""
    return torch.matmul(a, b).round_().long()


def _unfold(x: torch.Tensor, kernel: list, stride: list, padding: list, dilation: list) -> tuple:
    """im2col: (..., C, H, W) -> ((..., C * k_h * k_w, H_out * W_out), (H_out, W_out)), rows in unrolled-row order
    (c * k_h * k_w + y * k_w + x), zero padding (`F.unfold` over the flattened leading dimensions)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    height = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    patches = F.unfold(x.reshape(-1, *x.shape[-3:]), (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))
    return patches.reshape(*x.shape[:-3], x.shape[-3] * kh * kw, height * width), (height, width)


class IntegerExecutor(nn.Module):
    """Run an `Export` (or an export directory) on images: ``executor(images) -> logits``.

    Args:
        export: an `Export` from `read_export`, or the directory to read (checked; `ExportError` if bad).
        chunk_images: images processed at once (bounds the memory of the integer partial sums).

    Attributes:
        manifest: the export's manifest.
        pretrained_cfg: the data config recorded at export (mean, std, input size), read by timm's
            ``resolve_model_data_config`` so the datamodules normalise images as for the original model.
    """

    def __init__(self, export, chunk_images: int = 50) -> None:
        super().__init__()
        export = export if isinstance(export, Export) else read_export(export)
        self.manifest = export.manifest
        self.spec = export.spec
        self.chunk_images = chunk_images
        self.pretrained_cfg = dict(self.manifest.get("data_config") or {"input_size": self.manifest["input_shape"]})
        self._buffer_of = {}
        for index, (name, tensor) in enumerate(sorted(export.tensors.items())):
            self.register_buffer(f"tensor{index}", tensor, persistent=False)  # the export is the source of truth
            self._buffer_of[name] = f"tensor{index}"

    def tensor(self, name: str) -> torch.Tensor:
        """The export's tensor ``name`` (on the executor's device)."""
        return getattr(self, self._buffer_of[name])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        expected = tuple(self.manifest["input_shape"])
        if images.dim() != len(expected) + 1 or tuple(images.shape[1:]) != expected:
            raise ExportError(f"images of shape {tuple(images.shape)}: the export was made for (N, *{expected})")
        return torch.cat([self._run_graph(chunk) for chunk in images.split(self.chunk_images)])

    def _run_graph(self, images: torch.Tensor) -> torch.Tensor:
        values = {}
        for node in self.manifest["graph"]:
            op, inputs = node["op"], [values[name] for name in node["inputs"]]
            if op == "input":
                values[node["name"]] = images.float()
            elif op == "output":
                return inputs[0]
            elif "layer" in node:
                values[node["name"]] = self.run_layer(node["layer"], inputs[0])
            else:
                values[node["name"]] = DIGITAL_OPS[op][0](inputs, node)
        raise ExportError("the export's graph has no output node")

    @torch.no_grad()
    def run_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run one layer of the export on its float input ``x`` (for checking a layer, or a chip, in isolation)."""
        if self.manifest["layers"][name]["op"] in CIM_LAYER_OPS:
            return self._cim_layer(name, x)
        return self._digital_layer(name, x)

    def _digital_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        entry = self.manifest["layers"][name]
        bias = self.tensor(f"{name}.bias") if entry["bias"] else None
        if entry["op"] == "linear":
            return F.linear(x, self.tensor(f"{name}.weight"), bias)
        return F.conv2d(x, self.tensor(f"{name}.weight"), bias, entry["stride"], entry["padding"], entry["dilation"],
                        entry["groups"])

    def input_codes(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Integer input codes (int64) of layer ``name`` for float inputs ``x``."""
        entry = self.manifest["layers"][name]
        allowed = self.tensor(f"{name}.input_codes").to(x.dtype)
        scaled = torch.clamp(x / self.tensor(f"{name}.input_scale"), float(allowed[0]), float(allowed[-1]))
        if entry["input"]["rounding"] == "half_even":
            return torch.round(scaled).long()
        midpoints = (allowed[1:] + allowed[:-1]) / 2  # ties go to the lower code
        return allowed[torch.bucketize(scaled.contiguous(), midpoints)].long()

    def _cim_layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        entry = self.manifest["layers"][name]
        mapping, slices = entry["mapping"], entry["slices"]
        linear = entry["op"] == "cim_linear"
        if linear:
            leading, x = x.shape[:-1], x.reshape(-1, x.shape[-1], 1, 1)
        codes = self.input_codes(name, x)
        digits = torch.stack([(codes >> c["shift"]) & (2 ** c["bits"] - 1) for c in entry["cycles"]])
        cycle_weights = torch.tensor([c["weight"] for c in entry["cycles"]], device=x.device).view(-1, 1, 1, 1)
        patches, (height, width) = _unfold(digits.float(), entry["kernel_size"], entry["stride"], entry["padding"],
                                           entry["dilation"])  # (cycles, N, groups * unrolled_rows, positions)
        n_images, positions = x.shape[0], height * width
        cells = self.tensor(f"{name}.cells").float()  # integers, multiplied exactly (see _integer_matmul)
        weight_scale = self.tensor(f"{name}.weight_scale")
        output = x.new_zeros(n_images, positions, entry["out_channels"])
        reference = x.new_zeros(n_images, positions, entry["out_channels"]) if entry["reference_digit"] else None
        tiles = sorted(enumerate(mapping["tiles"]), key=lambda item: (item[1]["row_block"], item[1]["group"]))
        for index, tile in tiles:  # row block by row block: the digital accumulation order
            row_start, n_rows = mapping["row_blocks"][tile["row_block"]]
            first_row = tile["group"] * mapping["unrolled_rows"] + row_start
            wordlines = patches[:, :, first_row:first_row + n_rows, :].transpose(-1, -2)  # (cycles, N, positions, rows)
            partial_sums = _integer_matmul(wordlines, cells[index, :n_rows, :tile["bitlines"]])
            if entry["adc"] is not None:
                setting = self.tensor(f"{name}.adc_setting")[index, :tile["bitlines"]].long()
                partial_sums = self._adc(name, setting, partial_sums)
            shifted = (partial_sums * cycle_weights).sum(0)  # (N, positions, bitlines): integer shift-add over cycles
            values = shifted.to(x.dtype)
            if entry["adc"] is not None:
                values = values * self.tensor(f"{name}.adc_scale")[setting]
            add_tile_bitlines(output, reference, values, tile, mapping, slices, weight_scale)
        if reference is not None:
            output = output + reference
        output = output.transpose(1, 2).reshape(n_images, entry["out_channels"], height, width)
        output = output * self.tensor(f"{name}.input_scale")
        if entry["bias"]:
            output = output + self.tensor(f"{name}.bias").view(1, -1, 1, 1)
        return output.reshape(*leading, entry["out_channels"]) if linear else output

    def _adc(self, name: str, setting: torch.Tensor, partial_sums: torch.Tensor) -> torch.Tensor:
        """ADC codes of a tile's partial sums (cycles, N, positions, bitlines), read by the ADC settings ``setting``
        (one per bitline): code_min + #{thresholds <= p}."""
        bitlines = partial_sums.shape[-1]
        thresholds = self.tensor(f"{name}.adc_thresholds").long()[setting]  # (bitlines, thresholds)
        per_bitline = partial_sums.reshape(-1, bitlines).t().contiguous()
        codes = torch.searchsorted(thresholds, per_bitline, right=True)
        codes = codes + self.tensor(f"{name}.adc_code_min").long()[setting].view(-1, 1)
        return codes.t().reshape(partial_sums.shape)


def add_tile_bitlines(output: torch.Tensor, reference: Optional[torch.Tensor], values: torch.Tensor, tile: dict,
                      mapping: dict, slices: list, weight_scale: torch.Tensor) -> None:
    """Add one tile's bitline values (..., bitlines) to ``output`` (..., C_out), in place: bitline o * n_slices + s
    times slice s's weight and the tile scale of column o; the reference column after them (offset slicing) times
    minus the top slice's weight and every column's tile scale, to ``reference`` (None: the layer has none)."""
    n_slices, cout_g = len(slices), mapping["out_channels_per_group"]
    col_start, n_cols = mapping["col_blocks"][tile["col_block"]]
    first_out = tile["group"] * cout_g + col_start
    tile_scale = weight_scale[tile["group"], tile["row_block"], col_start:col_start + n_cols]
    for s, piece in enumerate(slices):
        output[..., first_out:first_out + n_cols] += values[..., s:n_cols * n_slices:n_slices] * (
            float(piece["weight"]) * tile_scale)
    if reference is not None:
        top_weight = float(slices[-1]["weight"])
        reference[..., first_out:first_out + n_cols] += values[..., n_cols * n_slices:n_cols * n_slices + 1] * (
            -top_weight * tile_scale)


__all__ = ["IntegerExecutor", "add_tile_bitlines"]

"""Export for deployment (pure PyTorch, no Lightning): the quantized network as the hardware needs it.

* `export_model(model, spec, dirpath, input_shape)` writes ``manifest.json`` + ``model.safetensors``
  (format version `FORMAT_VERSION`, documented in the README) atomically;
* `read_export(dirpath)` loads and checks one, raising `ExportError` on anything malformed or mismatched;
* `IntegerExecutor` runs it with integer partial sums, integer ADC comparisons and integer shift-adds;
* `compare_with_model` measures how closely it reproduces the fake-quant model.
"""

from cimq_pl.export.executor import IntegerExecutor
from cimq_pl.export.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, TENSORS_FILE, ExportError
from cimq_pl.export.graph import DIGITAL_OPS, trace_graph
from cimq_pl.export.reader import Export, read_export
from cimq_pl.export.verify import Agreement, compare_with_model
from cimq_pl.export.writer import export_manifest_and_tensors, export_model, write_export

__all__ = [
    "Agreement",
    "DIGITAL_OPS",
    "Export",
    "ExportError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IntegerExecutor",
    "MANIFEST_FILE",
    "TENSORS_FILE",
    "compare_with_model",
    "export_manifest_and_tensors",
    "export_model",
    "read_export",
    "trace_graph",
    "write_export",
]

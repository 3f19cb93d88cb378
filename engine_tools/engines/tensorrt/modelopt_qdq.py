"""Calibrated Q/DQ ONNX with NVIDIA ModelOpt: the input TensorRT turns into real INT8 kernels.

TensorRT 10 deprecated and TensorRT 11 removed implicit INT8 calibration; the current flow is explicit
quantization: ModelOpt inserts ``QuantizeLinear``/``DequantizeLinear`` pairs with calibrated scales
("fake quantization") and TensorRT, building a strongly-typed network from that ONNX, fuses them into
INT8 kernels. Calibration runs on ONNX Runtime's CPU execution provider, so it works (and is tested)
without a GPU.

Installation without ModelOpt's ``[onnx]`` extra (which would replace the CPU ``onnxruntime`` by
``onnxruntime-gpu``, pull ``cupy-cuda12x`` and downgrade ``onnx``): see ``.ci/install-modelopt.sh`` and
``docs/TENSORRT.md``. :func:`modelopt_availability` says whether it is usable here.

The Q/DQ ONNX keeps FP32 weights (it is no smaller than the FP32 model); the INT8 size appears only in
the built TensorRT engine.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_tools.cache import atomic_file, sha256_file
from engine_tools.progress import Progress, SilentProgress

CALIBRATION_METHODS = ("max", "entropy")
HIGH_PRECISION_DTYPES = ("fp16", "fp32")
#: Named INT8 recipes: the type of everything ModelOpt leaves unquantized.
RECIPES: dict[str, dict[str, str]] = {
    "medquant": {
        "high_precision_dtype": "fp16",
        "description": "INT8 convolutions, everything else FP16 (ModelOpt's default; faster)",
    },
    "medptq": {
        "high_precision_dtype": "fp32",
        "description": "the MedPTQ paper's recipe (hrlblab/PTQ, --high_precision_dtype fp32): INT8 "
        "convolutions, everything else FP32 (slower, no FP16 rounding outside the INT8 layers)",
    },
}
DEFAULT_RECIPE = "medquant"
#: Op types AutoCast keeps in FP32 in an FP16 engine: reductions that overflow or lose precision in FP16.
FP32_OP_TYPES = (
    "InstanceNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "BatchNormalization",
    "Softmax",
    "LogSoftmax",
)
#: AutoCast limits (TensorRT's strongly-typed AutoCast sample uses the same): a node whose input or
#: output magnitude exceeds ``AUTOCAST_DATA_MAX`` on the reference run, or whose initializers exceed
#: the FP16 range, stays FP32.
AUTOCAST_DATA_MAX = 512.0
AUTOCAST_INIT_MAX = 65504.0
#: Transposed convolutions stay FP16 in TensorRT even with Q/DQ (NVIDIA/TensorRT#4668,
#: NVIDIA/Model-Optimizer#688); quantizing them only adds Q/DQ pairs, so they are excluded by default.
CONV_TRANSPOSE = "ConvTranspose"
#: pip line that installs ModelOpt's ONNX quantizer next to the CPU onnxruntime (no ``[onnx]`` extra).
MODELOPT_PIP = (
    "nvidia-modelopt==0.47.0 onnx-graphsurgeon==0.6.1 onnxslim==0.1.98 lief==1.0.0 nvidia-ml-py==13.615.71 "
    "polygraphy==0.53.6"
)
_EXTRA_MODULES = ("onnx_graphsurgeon", "onnxslim", "lief", "pynvml")


class ModelOptUnavailable(RuntimeError):
    """ModelOpt's ONNX quantizer cannot be imported; the message says how to install it."""


@dataclass
class QdqResult:
    """What :func:`quantize_qdq` produced."""

    path: Path
    sha256: str
    calibration_method: str
    high_precision_dtype: str
    calibration_windows: int
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    excluded_op_types: list[str]
    op_counts: dict[str, int]
    modelopt_version: str
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def modelopt_availability() -> tuple[bool, str]:
    """``(True, version)`` when ``modelopt.onnx.quantization`` imports, else ``(False, how to fix)``."""
    try:
        import modelopt
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError as exc:
        return False, (
            f"NVIDIA ModelOpt's ONNX quantizer does not import ({exc}). Install it without its [onnx] "
            f"extra, which would replace onnxruntime: bash .ci/install-modelopt.sh "
            f"(pip install --no-deps {MODELOPT_PIP})"
        )
    return True, f"nvidia-modelopt {modelopt.__version__}"


def require_modelopt() -> str:
    ok, message = modelopt_availability()
    if not ok:
        raise ModelOptUnavailable(message)
    return message


def onnx_input_name(onnx_path: Path) -> str:
    """Name of the single graph input (initialisers excluded)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initialisers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise ValueError(f"{onnx_path}: expected one network input, found {inputs}")
    return inputs[0]


def expand_patterns(onnx_path: Path, patterns: Iterable[str]) -> list[str]:
    """Node names of ``onnx_path`` matched (``re.search``) by any of ``patterns``.

    Cards list ``quantization.keep_higher_precision`` as regexes over layer names; ONNX node names
    come from the export (``/decoder/up1/ConvTranspose``), so a search, not a full match, is used.
    """
    import onnx

    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ValueError(f"quantization.keep_higher_precision: bad regex {pattern!r} ({exc})") from exc
    if not compiled:
        return []
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [n.name for n in graph.node if n.name and any(p.search(n.name) for p in compiled)]


def exact_name_patterns(names: Iterable[str]) -> list[str]:
    """ModelOpt reads ``nodes_to_exclude`` as regexes (``re.match``): ``/x/Conv`` would also exclude
    ``/x/Conv_1`` and ``+ ( [`` in names would mis-match. Each name becomes ``re.escape(name) + "$"``."""
    return [re.escape(name) + "$" for name in dict.fromkeys(names)]


def op_types_in(onnx_path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node}


def recipe_dtype(recipe: str) -> str:
    """``high_precision_dtype`` of a named recipe (:data:`RECIPES`); unknown names are refused."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown INT8 recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[recipe]["high_precision_dtype"]


def _check_windows(windows: np.ndarray) -> np.ndarray:
    if windows is None or windows.ndim != 5 or windows.shape[0] < 1:
        shape = None if windows is None else windows.shape
        raise ValueError(
            f"calibration windows must be a float32 array N, C, D, H, W with N >= 1, got {shape}"
        )
    if not np.isfinite(windows).all():
        raise ValueError("calibration windows contain NaN or infinite values")
    return np.ascontiguousarray(windows, dtype=np.float32)


def quantized_node_names(model: Any) -> list[str]:
    """Nodes whose weight input is dequantized (the ops that become INT8 in TensorRT)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    names = []
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input
        ):
            names.append(node.name)
    return names


def quantize_qdq(
    onnx_path: str | Path,
    calibration: np.ndarray,
    output_path: str | Path,
    *,
    calibration_method: str = "max",
    high_precision_dtype: str = "fp16",
    keep_higher_precision: Iterable[str] = (),
    nodes_to_exclude: Iterable[str] = (),
    op_types_to_exclude: Iterable[str] = (),
    quantize_conv_transpose: bool = False,
    calibration_eps: Iterable[str] = ("cpu",),
    progress: Progress | None = None,
) -> QdqResult:
    """Calibrate ``onnx_path`` on ``calibration`` windows and write a Q/DQ ONNX to ``output_path``.

    ``calibration`` are preprocessed windows ``N, C, D, H, W`` (the same the other engines calibrate
    on); ``calibration_method`` is ``max`` or ``entropy``; weights are quantized per output channel
    (ModelOpt's INT8 default); ``high_precision_dtype`` is the type of everything left unquantized
    (``fp16``, recipe ``medquant``; ``fp32``, the paper's recipe ``medptq``). Left unquantized:
    ``keep_higher_precision``, regexes searched in node names (the card's
    ``quantization.keep_higher_precision``); ``nodes_to_exclude``, exact node names (the accuracy
    guard's choice); ``op_types_to_exclude``; and ``ConvTranspose`` unless ``quantize_conv_transpose``
    (TensorRT keeps it FP16 anyway). Names reach ModelOpt as exact-match regexes
    (:func:`exact_name_patterns`); the result reports the nodes and op types excluded. ModelOpt
    rewrites its input in place, so it works on a private copy; ``output_path`` is written atomically.
    """
    progress = progress or SilentProgress()
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(
            f"calibration_method must be one of {CALIBRATION_METHODS}, not {calibration_method!r}"
        )
    if high_precision_dtype not in HIGH_PRECISION_DTYPES:
        raise ValueError(
            f"high_precision_dtype must be one of {HIGH_PRECISION_DTYPES}, not {high_precision_dtype!r}"
        )
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: ONNX model not found")
    windows = _check_windows(calibration)
    require_modelopt()
    import modelopt

    excluded = list(dict.fromkeys([*expand_patterns(onnx_path, keep_higher_precision), *nodes_to_exclude]))
    excluded_types = list(dict.fromkeys(op_types_to_exclude))
    if not quantize_conv_transpose and CONV_TRANSPOSE in op_types_in(onnx_path):
        excluded_types.append(CONV_TRANSPOSE)
    progress.update("calibrate", 0.0, f"ModelOpt {calibration_method} calibration on {len(windows)} windows")
    arguments = {
        "quantize_mode": "int8",
        "calibration_method": calibration_method,
        "calibration_eps": list(calibration_eps),
        "nodes_to_exclude": exact_name_patterns(excluded) or None,
        "op_types_to_exclude": excluded_types or None,
        "high_precision_dtype": high_precision_dtype,
        "log_level": logging.getLevelName(logging.WARNING),
    }
    output_path = Path(output_path)
    model = _quantize_in_child(onnx_path, windows, arguments, output_path)
    quantized = quantized_node_names(model)
    notes = []
    if CONV_TRANSPOSE in excluded_types and not quantize_conv_transpose:
        notes.append(
            "ConvTranspose layers left unquantized: TensorRT keeps them FP16 under Q/DQ "
            "(NVIDIA/TensorRT#4668, NVIDIA/Model-Optimizer#688)"
        )
    if not quantized:
        notes.append(
            "ModelOpt quantized no node: TensorRT INT8 needs convolutions with >= 16 (or a multiple of 8) "
            "input/output channels; this network stays in higher precision"
        )
    progress.update("calibrate", 1.0, f"{len(quantized)} nodes quantized")
    return QdqResult(
        path=output_path,
        sha256=sha256_file(output_path),
        calibration_method=calibration_method,
        high_precision_dtype=high_precision_dtype,
        calibration_windows=int(len(windows)),
        quantized_nodes=quantized,
        excluded_nodes=excluded,
        excluded_op_types=excluded_types,
        op_counts=dict(Counter(n.op_type for n in model.graph.node)),
        modelopt_version=str(modelopt.__version__),
        notes=notes,
    )


def _quantize_in_child(
    onnx_path: Path, windows: np.ndarray, arguments: dict[str, Any], output_path: Path
) -> Any:
    """Run ModelOpt's ``quantize`` on a private copy of ``onnx_path`` in a spawned child; write its
    Q/DQ ONNX atomically to ``output_path`` and return it."""
    import onnx

    input_name = onnx_input_name(onnx_path)
    with tempfile.TemporaryDirectory(prefix="medquant-modelopt-") as tmp:
        work = Path(tmp) / "model.onnx"
        shutil.copyfile(onnx_path, work)  # ModelOpt rewrites (and writes beside) its input
        result = Path(tmp) / "model.qdq.onnx"
        windows_file = Path(tmp) / "calibration.npy"
        np.save(windows_file, windows)
        arguments = {**arguments, "onnx_path": str(work), "output_path": str(result)}
        # ModelOpt monkey-patches onnxruntime.quantization while it calibrates; a spawned child keeps
        # that out of this process (ONNX Runtime's own INT8 engine must keep working afterwards).
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_modelopt_quantize, arguments, input_name, str(windows_file)).result()
        if not result.is_file():
            raise RuntimeError(f"ModelOpt wrote no quantized model for {onnx_path}")
        model = onnx.load(str(result))
        with atomic_file(output_path) as stream:
            stream.write(model.SerializeToString())
    return model


def _modelopt_quantize(arguments: dict[str, Any], input_name: str, windows_file: str) -> None:
    """Child-process body of :func:`quantize_qdq` (ModelOpt's calibration, isolated)."""
    from modelopt.onnx.quantization import quantize

    onnx_path = arguments.pop("onnx_path")
    quantize(onnx_path, calibration_data={input_name: np.load(windows_file)}, **arguments)


def convert_fp16_onnx(
    onnx_path: str | Path,
    output_path: str | Path,
    *,
    calibration: np.ndarray | None = None,
    keep_io_types: bool = True,
    fp32_op_types: Iterable[str] = FP32_OP_TYPES,
) -> Path:
    """Mixed FP16/FP32 copy of an FP32 ONNX (ModelOpt AutoCast), the input of a strongly-typed FP16 engine.

    Strongly-typed networks take each tensor's precision from the ONNX types. AutoCast converts to FP16
    every node except ``fp32_op_types`` (normalizations, softmax) and the nodes whose activations on a
    reference run exceed :data:`AUTOCAST_DATA_MAX` or whose initializers exceed the FP16 range; the
    reference run uses ``calibration`` windows when given (else random inputs). ``keep_io_types`` keeps
    the ``float32`` input and logits. Runs in a spawned child, like calibration.
    """
    require_modelopt()
    onnx_path = Path(onnx_path)
    with tempfile.TemporaryDirectory(prefix="medquant-autocast-") as tmp:
        arguments: dict[str, Any] = {
            "onnx_path": str(onnx_path),
            "low_precision_type": "fp16",
            "op_types_to_exclude": list(fp32_op_types) or None,
            "data_max": AUTOCAST_DATA_MAX,
            "init_max": AUTOCAST_INIT_MAX,
            "keep_io_types": keep_io_types,
        }
        if calibration is not None:
            data = Path(tmp) / "reference.npz"
            np.savez(data, **{onnx_input_name(onnx_path): _check_windows(calibration)})
            arguments["calibration_data"] = str(data)
        result = Path(tmp) / "model_fp16.onnx"
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            pool.submit(_modelopt_autocast, arguments, str(result)).result()
        output_path = Path(output_path)
        with atomic_file(output_path) as stream:
            stream.write(result.read_bytes())
    return output_path


def _modelopt_autocast(arguments: dict[str, Any], result: str) -> None:
    """Child-process body of :func:`convert_fp16_onnx`."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    onnx.save(convert_to_mixed_precision(**arguments), result)


def set_static_window(onnx_path: str | Path, output_path: str | Path, window: tuple[int, int, int]) -> Path:
    """Copy of a fully-convolutional ONNX whose input spatial dims are ``window`` (batch stays dynamic).

    Used to calibrate whole-volume networks (brainchop MeshNets take 256^3) on smaller windows; the
    intermediate shape annotations are dropped so that ONNX re-infers them.
    """
    import onnx

    model = onnx.load(str(onnx_path))
    name = onnx_input_name(Path(onnx_path))
    graph_input = next(i for i in model.graph.input if i.name == name)
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != 5:
        raise ValueError(f"{onnx_path}: input {name!r} is not 5-D (N, C, D, H, W)")
    dims[0].Clear()
    dims[0].dim_param = "batch"
    for dim, size in zip(dims[2:], window, strict=True):
        dim.Clear()
        dim.dim_value = int(size)
    del model.graph.value_info[:]
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            dim.Clear()
    onnx.checker.check_model(model)
    output_path = Path(output_path)
    with atomic_file(output_path) as stream:
        stream.write(model.SerializeToString())
    return output_path

"""Per-window GPU latency of every network: eager FP32, eager FP16, ``torch.compile`` FP16, TensorRT.

One 96^3 window, batch 1, random weights and random (non-zero) inputs; CUDA events around each call,
median of ``--iters`` calls after ``--warmup`` calls (``cudnn.benchmark`` on for the eager rows).
The compiled row is the :mod:`engine_tools.engines.torch_compiled_engine` path (Inductor, default mode
``max-autotune`` = autotuned kernels + CUDA graphs); its first call's seconds are reported as the
compile time. TensorRT FP16/INT8 rows are added only where ``tensorrt`` imports; otherwise the reason
is recorded. Results go to ``<out>/gpu_<gpu>.json`` and ``.md`` and are rewritten after every row, so
a run stopped by a time limit keeps what it measured.

Networks: the brainchop MeshNets (their TF.js topology, random weights), MONAI U-Net / DynUNet /
SegResNet / SwinUNETR at the seed study's published sizes, and every model card whose network has a
PyTorch builder (``engine_tools.networks.torch_factory``, random weights).

CPU smoke (what CI-free local checks use)::

    python bench/gpu_bench.py --device cpu --window 32 --models unet,model5_gw_ae --iters 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from engine_tools.engines.torch_compiled_engine import compile_module  # noqa: E402

MESHNETS = ("model5_gw_ae", "model11_gw_ae", "model18cls", "model21_104class", "mindgrab")
# Compile order: the reference networks first, so a time limit cuts the least important.
PRIORITY = (
    "unet",
    "dynunet",
    "segresnet",
    "nnunet-totalseg",
    "transunet-btcv",
    "swinunetr-btcv",
    "unest-wholebrain",
    "segresnet-wholebody",
    "vista3d",
    "stunet-totalseg",
    "model18cls",
    "model21_104class",
    "swinunetr",
)


def monai_networks() -> dict[str, tuple[Callable[[], Any], str]]:
    """MONAI networks at the sizes the seed study (MedPTQ) published."""
    from monai.networks import nets

    dyn_kernels = [[3, 3, 3]] * 5
    dyn_strides = [[1, 1, 1]] + [[2, 2, 2]] * 4
    return {
        "unet": (
            lambda: nets.UNet(3, 1, 14, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2, norm="batch"),
            "MONAI UNet 16-256, 2 res units, 14 classes (BTCV)",
        ),
        "dynunet": (
            lambda: nets.DynUNet(
                3, 1, 105, dyn_kernels, dyn_strides, dyn_strides[1:], filters=[32, 64, 128, 256, 320]
            ),
            "MONAI DynUNet nnU-Net-like 32-320, 105 classes (TotalSegmentator)",
        ),
        "segresnet": (
            lambda: nets.SegResNet(3, 32, 1, 105, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1)),
            "MONAI SegResNet 32 filters, 105 classes (wholeBody_ct_segmentation)",
        ),
        "swinunetr": (
            lambda: nets.SwinUNETR(in_channels=1, out_channels=14, feature_size=48, spatial_dims=3),
            "MONAI SwinUNETR feature 48, 14 classes (swin_unetr_btcv)",
        ),
    }


def brainchop_topologies(weights_dir: str | None) -> dict[str, Path]:
    """``model.json`` of each brainchop MeshNet found in the weights mirror (``--weights-dir``, else
    ``$MEDQUANT_WEIGHTS_DIR``, else the demo's mirror), laid out ``<mirror>/<model>/model.json``."""
    from engine_tools import demo
    from engine_tools.weights import mirror_dirs

    dirs = mirror_dirs(weights_dir)
    if not dirs and demo.default_weights_dir() is not None:
        dirs = [demo.default_weights_dir()]
    found = {}
    for name in MESHNETS:
        model_json = next(
            (d / name / "model.json" for d in dirs if (d / name / "model.json").is_file()), None
        )
        if model_json is not None:
            found[name] = model_json
    return found


def meshnets(weights_dir: str | None) -> dict[str, tuple[Callable[[], Any], str]]:
    """brainchop MeshNets from their TF.js ``model.json`` (random weights: latency only)."""
    from engine_tools.networks.tfjs import build_tfjs_module

    found = {}
    for name, model_json in brainchop_topologies(weights_dir).items():
        if model_json.is_file():
            found[name] = (
                lambda p=model_json: build_tfjs_module(p, random_weights=True),
                f"brainchop MeshNet {name} (TF.js topology)",
            )
    return found


def card_networks(skip: set[str]) -> tuple[dict[str, tuple[Callable[[], Any], str]], list[str]]:
    """Every model card with a PyTorch builder (the zoo team's networks), random weights."""
    notes: list[str] = []
    try:
        from engine_tools.networks import torch_factory
        from engine_tools.registry import load_cards
    except ImportError as exc:
        return {}, [f"model cards not benchmarked: {exc}"]
    found = {}
    for card_id, card in sorted(load_cards().items()):
        if card.network.get("format") in ("tfjs", "onnx") or card_id in skip:
            continue
        try:
            factory = torch_factory(card, random_weights=True)
        except Exception as exc:  # noqa: BLE001 - a broken card must not stop the bench
            notes.append(f"{card_id}: no PyTorch builder ({type(exc).__name__}: {exc})")
            continue
        if factory is not None:
            found[card_id] = (factory, f"card {card_id}: {card.title}")
    return found, notes


def time_call(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(iters):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
    else:
        for _ in range(iters):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def rel_error(test: torch.Tensor, reference: torch.Tensor) -> float:
    """‖test − ref‖ / ‖ref‖ in float64."""
    ref = reference.double()
    return float(torch.linalg.vector_norm(test.double() - ref) / torch.linalg.vector_norm(ref))


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "host_cpu": platform.processor() or platform.machine(),
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        )
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        env["tensorrt"] = None
        env["tensorrt_reason"] = (
            f"TensorRT is not installed ({exc}); install it with pip install -r requirements-tensorrt.txt"
        )
    return env


def bench_eager(
    name: str, factory: Callable[[], Any], args: argparse.Namespace, low: torch.dtype
) -> tuple[dict[str, Any], Any, torch.Tensor, torch.Tensor]:
    """Eager FP32 and low-precision rows; returns the row, the FP32 module, the input and FP32 logits."""
    module = factory().eval()
    params = sum(p.numel() for p in module.parameters())
    module = module.to(args.device)
    in_channels = next(p for p in module.parameters() if p.dim() == 5).shape[1]
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand((1, in_channels, *([args.window] * 3)), generator=generator).to(args.device)
    with torch.inference_mode():
        reference = module(x)
        row: dict[str, Any] = {
            "model": name,
            "params_m": round(params / 1e6, 3),
            "classes": int(reference.shape[1]),
            "window": [args.window] * 3,
            "batch": 1,
            "eager_fp32_ms": time_call(lambda: module(x), args.device, args.warmup, args.iters),
        }
        low_module = copy.deepcopy(module).to(low)
        x_low = x.to(low)
        key = f"eager_{_short(low)}"
        row[f"{key}_ms"] = time_call(lambda: low_module(x_low), args.device, args.warmup, args.iters)
        row[f"{key}_rel_err"] = round(rel_error(low_module(x_low).float(), reference), 5)
    return row, module, x, reference


def bench_compiled(
    row: dict[str, Any], module: Any, x: torch.Tensor, reference: torch.Tensor, args: argparse.Namespace
) -> None:
    """Compiled row (first call = compile seconds, then median latency)."""
    precision = args.compiled_precision
    compiled = compile_module(copy.deepcopy(module), args.device, precision, args.compile_mode)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    x_low = x.to(dtype)
    cuda = args.device.startswith("cuda")

    def call() -> Any:
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(x_low)

    with torch.inference_mode():
        started = time.perf_counter()
        out = call().float().clone()
        if cuda:
            torch.cuda.synchronize()
        row[f"compile_{precision}_s"] = round(time.perf_counter() - started, 1)
        row[f"compiled_{precision}_ms"] = time_call(call, args.device, args.warmup, args.iters)
        row[f"compiled_{precision}_rel_err"] = round(rel_error(out, reference), 5)
    row["compile_mode"] = args.compile_mode
    torch._dynamo.reset()


def tensorrt_rows(row: dict[str, Any], env: dict[str, Any]) -> None:
    if env.get("tensorrt") is None:
        row["tensorrt"] = "not run: " + env.get("tensorrt_reason", "tensorrt missing")


def engine_smoke(args: argparse.Namespace, factory: Callable[[], Any], name: str) -> dict[str, Any]:
    """TorchCompiledEngine end to end (build → load → MONAI sliding window) on this device."""
    import tempfile

    import numpy as np
    from monai.inferers import sliding_window_inference

    from engine_tools.engines.base import BuildRequest
    from engine_tools.engines.torch_compiled_engine import TorchCompiledEngine

    torch.manual_seed(0)
    state = factory().state_dict()

    def fixed_factory() -> Any:
        module = factory()
        module.load_state_dict(state)
        return module.eval()

    precision = args.compiled_precision
    engine = TorchCompiledEngine(precision, args.device)
    probe = fixed_factory()
    in_channels = next(p for p in probe.parameters() if p.dim() == 5).shape[1]
    request = BuildRequest(
        model_id=name,
        onnx_path=None,
        window_shape=(args.window,) * 3,
        in_channels=int(in_channels),
        num_classes=0,
        torch_module_factory=fixed_factory,
        options={"compile_mode": args.compile_mode, "batch": 2},
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = engine.build(request, Path(tmp))
        side = int(args.window * 1.6)
        volume = torch.rand((1, in_channels, side, side, side), generator=torch.Generator().manual_seed(1))
        started = time.perf_counter()
        with torch.inference_mode():
            logits = sliding_window_inference(
                volume.to(args.device),
                (args.window,) * 3,
                2,
                engine.predictor(),
                overlap=0.5,
                mode="gaussian",
            )
        seconds = time.perf_counter() - started
        reference_module = probe.to(args.device)
        with torch.inference_mode():
            reference = sliding_window_inference(
                volume.to(args.device), (args.window,) * 3, 2, reference_module, overlap=0.5, mode="gaussian"
            )
        agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
        described = engine.describe()
    return {
        "model": name,
        "engine": described["backend"],
        "artifact_bytes": described["bytes_on_disk"],
        "precision": precision,
        "compile_seconds": report.get("compile_seconds"),
        "sliding_window_volume": [side] * 3,
        "sliding_window_seconds": round(seconds, 3),
        "argmax_agreement_vs_eager_fp32": round(agree, 5),
        "logits_rel_err": round(rel_error(logits.float(), reference), 5),
        "finite": bool(np.isfinite(logits.float().cpu().numpy()).all()),
    }


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def write_results(out_dir: Path, results: dict[str, Any]) -> Path:
    from engine_tools.cache import write_json_atomic

    label = results["environment"].get("gpu") or "cpu"
    stem = "gpu_" + re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
    if results["environment"]["device"] == "cpu":
        stem = "gpu_bench_cpu_smoke"
    if results.get("tag"):
        stem += f"_{results['tag']}"
    write_json_atomic(out_dir / f"{stem}.json", results)
    (out_dir / f"{stem}.md").write_text(markdown(results), encoding="utf-8")
    return out_dir / f"{stem}.json"


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    low = results["low_precision"]
    cp = results["compiled_precision"]
    lines = [
        f"# GPU baseline: {env.get('gpu', 'CPU smoke run')}",
        "",
        f"Device: {env.get('gpu', env['device'])} (compute capability {env.get('compute_capability', '-')}), "
        f"torch {env['torch']}, CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, "
        f"TensorRT: {env.get('tensorrt') or env.get('tensorrt_reason')}.",
        f"Per window {results['window']}^3, batch 1, random weights and inputs; median of {results['iters']} "
        f"calls after {results['warmup']} warm-up calls (CUDA events); compiled = torch.compile "
        f"mode {results['compile_mode']}. Date {results['date']}.",
        "",
        f"| model | params (M) | classes | eager FP32 ms | eager {low.upper()} ms | compiled {cp.upper()} ms "
        f"| compile s | mode | eager {low.upper()} → compiled | rel err eager {low.upper()} | rel err compiled "
        "| TensorRT |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        eager_low = row.get(f"eager_{low}_ms")
        compiled = row.get(f"compiled_{cp}_ms")
        speedup = f"{eager_low / compiled:.1f}x" if eager_low and compiled else "-"
        lines.append(
            f"| {row['model']} | {row.get('params_m', '-')} | {row.get('classes', '-')} "
            f"| {row.get('eager_fp32_ms', '-')} | {eager_low or '-'} | {compiled or row.get('compiled_skipped', '-')} "
            f"| {row.get(f'compile_{cp}_s', '-')} | {row.get('compile_mode', '-')} | {speedup} | {row.get(f'eager_{low}_rel_err', '-')} "
            f"| {row.get(f'compiled_{cp}_rel_err', '-')} | {'not run' if 'tensorrt' in row else '-'} |"
        )
    lines += ["", "Networks:", *[f"- `{k}`: {v}" for k, v in results.get("descriptions", {}).items()]]
    if results.get("errors"):
        lines += ["", "Errors / skipped:", *[f"- {e}" for e in results["errors"]]]
    if results.get("engine_smoke"):
        lines += [
            "",
            "TorchCompiledEngine end to end:",
            "```",
            json.dumps(results["engine_smoke"], indent=1),
            "```",
        ]
    return "\n".join(lines) + "\n"


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """Rows of several runs on one GPU: later runs add the keys (compiled rows) earlier runs lack."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    gpus = {run["environment"].get("gpu") for run in runs}
    if len(gpus) != 1:
        raise ValueError(f"refusing to merge runs from different devices: {sorted(map(str, gpus))}")
    merged = copy.deepcopy(runs[0])
    rows = {row["model"]: row for row in merged["rows"]}
    for run in runs[1:]:
        for row in run["rows"]:
            target = rows.setdefault(row["model"], {})
            for key, value in row.items():
                if key not in target or (
                    key.startswith(("compile", "compiled")) and "compiled_skipped" in target
                ):
                    target[key] = value
            if any(k.startswith("compiled_") and k != "compiled_skipped" for k in row):
                target.pop("compiled_skipped", None)
        merged["errors"] += [e for e in run.get("errors", []) if e not in merged["errors"]]
        merged["descriptions"].update(run.get("descriptions", {}))
        merged.setdefault("engine_smoke", run.get("engine_smoke"))
        if run.get("engine_smoke"):
            merged["engine_smoke"] = run["engine_smoke"]
    merged["rows"] = list(rows.values())
    done = {row["model"] for row in merged["rows"] if row.get("eager_fp32_ms") is not None}
    merged["errors"] = [
        e
        for e in merged["errors"]
        if e.split(":")[0] not in done and not (e.startswith("engine smoke") and merged.get("engine_smoke"))
    ]
    merged["runs"] = [run["date"] for run in runs]
    merged["tag"] = ""
    modes = sorted({row["compile_mode"] for row in merged["rows"] if row.get("compile_mode")})
    merged["compile_mode"] = " / ".join(modes) + " (per row: compile_mode)"
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--window", type=int, default=96)
    parser.add_argument("--models", default="all", help="comma-separated names, or all")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode (default per device)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop compiling after this many s")
    parser.add_argument("--compile-reserve-s", type=float, default=150.0, help="time one compile may take")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--engine-smoke", default="unet", help="model for the engine end-to-end run, or ''")
    parser.add_argument(
        "--weights-dir",
        default=None,
        help="offline weights mirror holding the brainchop MeshNets (default $MEDQUANT_WEIGHTS_DIR)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    parser.add_argument("--merge", type=Path, nargs="+", help="combine result JSONs of several runs")
    args = parser.parse_args(argv)
    if args.merge:
        path = write_results(args.out, merge_results(args.merge))
        print(f"wrote {path}")
        return 0
    started = time.perf_counter()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cudnn.benchmark = True
    args.compile_mode = args.compile_mode or ("max-autotune" if cuda else "default")
    args.compiled_precision = "fp16" if cuda else "fp32"
    low = torch.float16 if cuda else torch.bfloat16

    env = environment(args.device)
    errors: list[str] = []
    catalogue: dict[str, tuple[Callable[[], Any], str]] = {}
    try:
        catalogue.update(meshnets(args.weights_dir))
    except ImportError as exc:
        errors.append(f"brainchop MeshNets not benchmarked: {exc}")
    catalogue.update(monai_networks())
    cards, card_notes = card_networks(set(catalogue))
    catalogue.update(cards)
    if "swinunetr-btcv" in catalogue:  # the card's builder is the same MONAI network
        catalogue.pop("swinunetr")
    errors += card_notes
    wanted = list(catalogue) if args.models == "all" else [m.strip() for m in args.models.split(",")]
    errors += [f"{m}: unknown model" for m in wanted if m not in catalogue]
    wanted = [m for m in wanted if m in catalogue]
    results: dict[str, Any] = {
        "environment": env,
        "window": args.window,
        "warmup": args.warmup,
        "iters": args.iters,
        "compile_mode": args.compile_mode,
        "low_precision": _short(low),
        "compiled_precision": args.compiled_precision,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "tag": args.tag,
        "descriptions": {m: catalogue[m][1] for m in wanted},
        "rows": [],
        "errors": errors,
    }
    print(json.dumps(env), flush=True)
    rows: dict[str, dict[str, Any]] = {}
    kept: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = {}
    for name in wanted:  # all eager rows first: cheap and never cut by the budget
        try:
            row, module, x, reference = bench_eager(name, catalogue[name][0], args, low)
            tensorrt_rows(row, env)
            rows[name] = row
            kept[name] = (module.cpu(), x.cpu(), reference.cpu())
            results["rows"] = list(rows.values())
            write_results(args.out, results)
            print(json.dumps(row), flush=True)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: eager failed ({type(exc).__name__}: {exc})")
        if cuda:
            torch.cuda.empty_cache()
    order = [m for m in PRIORITY if m in rows] + [m for m in rows if m not in PRIORITY]
    for name in [] if args.no_compile else order:
        left = args.budget_s - (time.perf_counter() - started)
        if left < args.compile_reserve_s:
            rows[name]["compiled_skipped"] = f"skipped (time budget, {left:.0f} s left)"
            continue
        module, x, reference = kept[name]
        try:
            bench_compiled(
                rows[name], module.to(args.device), x.to(args.device), reference.to(args.device), args
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{name}: compile failed ({type(exc).__name__}: {str(exc)[:300]})")
        kept[name] = (module.cpu(), x, reference)
        results["rows"] = list(rows.values())
        write_results(args.out, results)
        print(json.dumps(rows[name]), flush=True)
        if cuda:
            torch.cuda.empty_cache()
    if args.engine_smoke and args.engine_smoke in catalogue and not args.no_compile:
        left = args.budget_s - (time.perf_counter() - started)
        if left >= args.compile_reserve_s:
            try:
                results["engine_smoke"] = engine_smoke(
                    args, catalogue[args.engine_smoke][0], args.engine_smoke
                )
            except Exception as exc:  # noqa: BLE001
                errors.append(f"engine smoke failed ({type(exc).__name__}: {str(exc)[:300]})")
        else:
            errors.append(f"engine smoke skipped (time budget, {left:.0f} s left)")
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    path = write_results(args.out, results)
    print(markdown(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

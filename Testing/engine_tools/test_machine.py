"""What the product reads off the CPU it runs on (engine_tools/machine.py), read from the real
``/proc/cpuinfo`` and, for CPUs this machine is not, from the flags such a CPU reports."""

from __future__ import annotations

import pytest

from engine_tools import machine


def test_the_description_names_this_machine_and_its_int8_flags() -> None:
    description = machine.machine_description()
    model, flags = machine.cpu_model_and_flags()
    assert description["cpu"] == model and description["cores"] >= 1
    assert description["cpu_flags"]["avx2"] == ("avx2" in flags)
    assert machine.cpu_has_vnni() == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


@pytest.mark.parametrize(
    ("flags", "expect_note"),
    [
        ({"avx2"}, True),
        ({"avx2", "avx_vnni"}, False),
        ({"avx2", "avx512f", "avx512_vnni"}, False),
        ({"avx2", "amx_int8", "amx_bf16"}, False),
    ],
)
def test_an_int8_build_on_a_cpu_without_vnni_says_what_to_expect(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], expect_note: bool
) -> None:
    monkeypatch.setattr(machine, "cpu_model_and_flags", lambda: ("a CPU", frozenset(flags)))
    from engine_tools.engines.onnxruntime.engine import OnnxRuntimeEngine
    from engine_tools.engines.openvino.engine import OpenVINOEngine

    for engine in (OpenVINOEngine(precision="int8"), OnnxRuntimeEngine(precision="int8")):
        note = machine.int8_speed_note(engine.device)
        assert (note is not None) == expect_note
        if note:
            assert "VNNI" in note and "FP32" in note
    assert machine.int8_speed_note("cuda") is None  # a GPU engine: the CPU's flags do not matter

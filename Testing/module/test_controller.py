"""The Apply ↔ Cancel state machine."""

import pytest
from MedQuantSlicerLib.controller import CANCEL_TEXT, State, TaskController


def test_build_turns_into_cancel_and_back():
    seen = []
    c = TaskController({"build": "Build engine", "run": "Run"})
    c.add_listener(lambda ctl: seen.append(ctl.state))
    assert c.button("build").text == "Build engine" and c.button("build").enabled
    assert c.button("run", available=False).enabled is False
    assert c.pressed("build") == "start"
    c.start("build")
    assert c.state is State.RUNNING
    assert c.button("build").text == CANCEL_TEXT and c.button("build").enabled
    assert c.button("run").enabled is False and c.button("run").text == "Run"
    assert c.pressed("run") == "ignore" and c.pressed("build") == "cancel"
    with pytest.raises(RuntimeError):
        c.start("run")
    assert c.request_cancel() is True
    assert c.state is State.CANCELLING
    assert c.button("build").enabled is False  # no double cancel
    assert c.request_cancel() is False
    c.finish("Cancelled.")
    assert c.state is State.IDLE and c.status == "Cancelled."
    assert c.button("build").text == "Build engine" and c.button("build").enabled
    assert seen == [State.RUNNING, State.CANCELLING, State.IDLE]


def test_unknown_action_rejected():
    with pytest.raises(KeyError):
        TaskController({"run": "Run"}).start("build")

"""The pieces every experiment binary shares (`experiments/common.py`)."""

import types

from experiments import common


def _parallel(data, expert, pipe):
  return types.SimpleNamespace(data=data, expert=expert, pipe=pipe)


def test_devices_default_to_the_configs_mesh(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert common.devices_for(_parallel(2, 4, 1), -1) == 8  # `small` runs bare on a plain CPU
  assert common.devices_for(_parallel(2, 2, 2), -1) == 8
  assert common.devices_for(_parallel(-1, 1, 1), -1) == 0  # "all devices": nothing to ask for


def test_devices_explicit_or_already_chosen_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert common.devices_for(_parallel(2, 4, 1), -1) == 0  # XLA_FLAGS already chose
  assert common.devices_for(_parallel(2, 4, 1), 4) == 4
  monkeypatch.delenv("XLA_FLAGS")
  assert common.devices_for(_parallel(2, 4, 1), 0) == 0  # 0: leave XLA_FLAGS alone

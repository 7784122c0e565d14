"""Shared by the golden-case generators (tools/golden/*.py): recording module outputs of upstream PyTorch models
with forward hooks, and package versions for case.json."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def recorded(modules: dict, store: dict, keep=None, every_call: bool = False):
    """Forward hooks putting a copy of each named module's output into ``store[name]``: the first call's only, or
    (``every_call``) a list of every call's. ``keep(name, output)`` picks or reshapes the output first."""
    handles = []

    def make(name):
        def hook(_module, _args, output):
            if not every_call and name in store:
                return
            value = (keep(name, output) if keep else output).detach().clone()
            if every_call:
                store.setdefault(name, []).append(value)
            else:
                store[name] = value

        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(make(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


def version(dist: str) -> str:
    """The installed version of ``dist``, or "?"."""
    from importlib.metadata import version as installed

    try:
        return installed(dist)
    except Exception:  # noqa: BLE001
        return "?"

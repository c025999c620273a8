"""The kinds an app serves: the built-in ones and the user's (`--kinds` / PROFILE_APP_KINDS).

`MODULE:NAME` names a `KindRegistry` in the user's own module, imported from the working
directory as uvicorn imports an app. Whatever is wrong with it (no such module, no such
attribute, not a KindRegistry, a kind named like a built-in one, an error while importing
it) stops start-up with one line naming the setting; a kind that cannot run where it is
placed, with one line naming the kind.
"""

from __future__ import annotations

import importlib
import os
import sys

from profile_app.executors.kinds import KindRegistry, Placement, check_picklable
from profile_app.settings import Settings, SettingsError
from profile_app.tasks.builtin import builtin_kinds

KINDS_SETTING = "PROFILE_APP_KINDS"


def served_kinds(settings: Settings, *, setting: str = KINDS_SETTING) -> KindRegistry:
    """The built-in kinds and those of `settings.kinds`, checked as start-up checks them.

    Raises SettingsError naming `setting` (the flag or the variable the value came from)
    or KindError naming a kind.
    """
    registry = builtin_kinds(settings)
    if settings.kinds:
        user_kinds = import_registry(settings.kinds, setting)
        for kind in user_kinds:
            if kind.name in registry:
                raise SettingsError(
                    f"invalid setting {setting}: task kind {kind.name!r} of {settings.kinds}"
                    " has the name of a built-in kind; give it another name"
                )
        registry = registry.merged(user_kinds)
    check_placements(registry, settings)
    return registry


def import_registry(spec: str, setting: str = KINDS_SETTING) -> KindRegistry:
    """The KindRegistry `spec` (`MODULE:NAME`) names, its module imported from the working directory."""
    module_name, _, attribute = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # as uvicorn does with its --app-dir (the working directory)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise SettingsError(f"invalid setting {setting}: no module named {exc.name!r} in {cwd}") from None
        raise SettingsError(f"invalid setting {setting}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while it was imported: say what, in one line
        why = " ".join(str(exc).split()) or "(no message)"
        raise SettingsError(
            f"invalid setting {setting}: importing {module_name} failed: {type(exc).__name__}: {why}"
        ) from None
    registry = getattr(module, attribute, None)
    if registry is None:
        raise SettingsError(f"invalid setting {setting}: module {module_name} has no attribute {attribute!r}")
    if not isinstance(registry, KindRegistry):
        raise SettingsError(
            f"invalid setting {setting}: {spec} is a {type(registry).__name__}, not a KindRegistry"
        )
    return registry


def check_placements(registry: KindRegistry, settings: Settings) -> None:
    """Raise KindError for a kind that must be sent to a worker but cannot be pickled: a
    `process` or `dask` kind, or one PROFILE_APP_DASK_KINDS sends to a cluster. (An `auto`
    kind that cannot be pickled runs on a thread instead, with a warning.)"""
    on_dask = set(settings.dask_kind_names) if settings.dask_scheduler else set()
    for kind in registry:
        pickled = kind.name in on_dask or (
            not kind.auto and kind.placement in (Placement.PROCESS, Placement.DASK)
        )
        if pickled:
            check_picklable(kind, "dask" if kind.name in on_dask else kind.placement.value)

"""Lightning's names for where and how a run trains: the checks of ``--strategy`` and ``--devices``.

No torch here (``continue_pt.options`` runs these before anything is imported); Lightning's strategy registry is
imported only when a strategy other than "auto" is given.
"""

from __future__ import annotations

import difflib


def strategy_problem(strategy: str) -> str | None:
    """A strategy name Lightning does not know. Lightning is imported only when one is given (not for "auto")."""
    if strategy == "auto":
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    known = StrategyRegistry.available_strategies()
    if strategy in known:
        return None
    close = difflib.get_close_matches(str(strategy), known, n=3, cutoff=0.4)  # closest first
    ordered = close + [name for name in known if name not in close]
    return f"strategy is {strategy!r}; expected auto or one of Lightning's strategies: {', '.join(ordered)}"


def devices_problem(devices: int | str) -> str | None:
    """Lightning's ``devices``: a count >= 1, -1 or "auto" (all), or a comma-separated list of GPU ids."""
    text = str(devices).strip()
    if text == "auto" or text == "-1":
        return None
    if text.isdigit() and int(text) >= 1:
        return None
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if "," in text and ids and all(part.isdigit() for part in ids):
        return None
    return (f"devices is {devices!r}; expected a number of devices >= 1 (e.g. 1 or 4), -1 or auto for all of them, "
            "or a comma-separated list of GPU ids (e.g. 0,1)")

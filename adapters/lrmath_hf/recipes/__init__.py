"""Compression recipes: calibration plan -> lrmath decisions -> module surgery.

A recipe is a function ``run(model, spec, batches, *, ratio, progress, **options)``
returning a :class:`RecipeResult`; :func:`lrmath_hf.compress` looks it up here
by name, counts parameters before and after, and writes the report.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["RecipeResult", "register", "get_recipe", "available_recipes", "recipe_options", "check_options"]


@dataclass
class RecipeResult:
    """What a recipe decided and how long its phases took.

    Attributes
    ----------
    ranks : dict
        ``"layer.role"`` -> rank (or ``"dense"``), per-head ranks where they apply.
    details : dict
        Recipe-specific facts for the report (allocation, importances, search calls).
    timings : dict
        Seconds per phase (``calibration``, ``decisions``, ``surgery``).
    calibration_tokens : int
        Tokens (or image patches) seen during calibration.
    spectra : dict
        ``name`` -> (spectrum, chosen rank) for plots; not written to JSON.
    """

    ranks: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    calibration_tokens: int = 0
    spectra: dict[str, Any] = field(default_factory=dict, repr=False)


_RECIPES: dict[str, Callable[..., RecipeResult]] = {}
# recipe name -> module that registers it (imported on first use)
_MODULES = {
    "svd": "svd",
    "svd-llm": "svd",
    "flat": "flat",
    "flat-paper": "flat",
    "auto": "auto",
    "global": "auto",
    "latent": "latent",
    "flar": "flar",
}


def register(name: str):
    """Decorator registering a recipe function under ``name``."""

    def wrap(fn):
        _RECIPES[name] = fn
        return fn

    return wrap


def available_recipes() -> tuple[str, ...]:
    """Names :func:`lrmath_hf.compress` accepts as ``recipe``, sorted."""
    return tuple(sorted(_MODULES))


def get_recipe(name: str) -> Callable[..., RecipeResult]:
    """The function of recipe ``name`` (its module imported on first use); ValueError for an unknown name."""
    if name not in _MODULES:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}")
    if name not in _RECIPES:
        importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return _RECIPES[name]


def recipe_options(name: str) -> tuple[str, ...] | None:
    """The keyword options recipe ``name`` takes (``None``: it takes any).

    A recipe that forwards ``**options`` to another names it in a
    ``forwards_options_to`` attribute (``auto`` -> ``flat``); its options are its
    own plus that recipe's.
    """
    fn = get_recipe(name)
    params = inspect.signature(fn).parameters.values()
    names = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in ("ratio", "progress")]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        target = getattr(fn, "forwards_options_to", None)
        if target is None:
            return None
        names += [n for n in recipe_options(target) or () if n not in names]
    return tuple(names)


def check_options(name: str, options, *, hidden: tuple[str, ...] = ()) -> None:
    """Raise TypeError naming the ``options`` recipe ``name`` does not take, and listing those it does.

    ``hidden``: options refused here although the recipe takes them (the command line's ``stats``,
    which is data, not a setting), and left out of the list.
    """
    accepted = recipe_options(name)
    given = set(options)
    unknown = sorted((given - set(accepted or given)) | (given & set(hidden)))
    if unknown:
        shown = ", ".join(o for o in accepted or () if o not in hidden)
        raise TypeError(f"recipe {name!r} has no option {', '.join(map(repr, unknown))}; its options: {shown}")

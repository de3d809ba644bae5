"""Which models a series goes to: the ``[[routes]]`` of the configuration.

A route matches on what a radiology IT engineer routes on: modality, body part, series
description (a regular expression), the calling AE title, slice thickness and slice count.
A series can go to several models; one that matches no route is kept and marked "no model",
never an error.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from dicom_node.config import ModelSettings, Route, Settings


def _in(value: str, allowed: list[str]) -> bool:
    return not allowed or value.strip().upper() in {a.strip().upper() for a in allowed}


def _within(value: float | None, bounds: list) -> bool:
    if not bounds:
        return True
    return value is not None and bounds[0] <= value <= bounds[1]


def _thickness(header: Dataset) -> float | None:
    try:
        return float(header.get("SliceThickness"))
    except (TypeError, ValueError):
        return None


def matches(route: Route, header: Dataset, slice_count: int, calling_ae: str) -> bool:
    """Whether every condition of ``route`` holds for the series ``header`` describes."""
    return (
        _in(str(header.get("Modality", "")), route.modality)
        and _in(str(header.get("BodyPartExamined", "")), route.body_part)
        and (
            not route.series_description
            or re.search(
                route.series_description, str(header.get("SeriesDescription", "")), re.IGNORECASE
            )
            is not None
        )
        and _in(calling_ae, route.calling_ae)
        and _within(_thickness(header), route.slice_thickness)
        and _within(slice_count, route.slice_count)
    )


def select_models(
    settings: Settings, header: Dataset, slice_count: int, calling_ae: str
) -> list[ModelSettings]:
    """The models for a series, in configuration order, each once.

    With no routes configured, every series goes to the first model.
    """
    if not settings.routes:
        return settings.models[:1]
    by_name = {m.name: m for m in settings.models}
    chosen: list[str] = []
    for route in settings.routes:
        if matches(route, header, slice_count, calling_ae):
            chosen += [n for n in route.models if n not in chosen]
    return [by_name[n] for n in chosen]


def describe(header: Dataset, slice_count: int, calling_ae: str) -> str:
    """What the routes were matched against, for a "no model" reason."""
    return (
        f"modality {header.get('Modality', '') or '-'}, body part "
        f"{header.get('BodyPartExamined', '') or '-'}, description "
        f"{str(header.get('SeriesDescription', '') or '-')!r}, calling AE {calling_ae or '-'}, "
        f"slice thickness {_thickness(header) if _thickness(header) is not None else '-'}, "
        f"{slice_count} slices"
    )

"""What a finished job made: per model, its result files and the volume of each label.

One series may be routed to several models; each model's SEG, RTSTRUCT and SR are its own
objects. The job database stores a run's results as JSON (:meth:`SeriesResults.to_json`);
the status pages, the ``jobs`` listing and the metrics all read them back through
:meth:`SeriesResults.from_json`, so that every reader sees every model's results.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelResults", "ResultFile", "SeriesResults"]


@dataclass(frozen=True)
class ResultFile:
    """One result object: where it was written and its SOP Instance UID."""

    path: str
    sop_uid: str


@dataclass
class ModelResults:
    """The results of one model: its files by kind, the volume of each label, in mL, and
    the algorithm that made them as the objects name it (bundle name and version, weights'
    SHA-256, node version; see :meth:`dicom_node.encode.AlgorithmInfo.as_dict`)."""

    model: str
    files: dict[str, ResultFile] = field(default_factory=dict)
    volumes_ml: dict[str, float] = field(default_factory=dict)
    algorithm: dict[str, str] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        """The kinds of result this model made, in the order they were made (the encoders'
        registry order, :mod:`dicom_node.encode.registry`)."""
        return list(self.files)


@dataclass
class SeriesResults:
    """The results of one run of a series: one :class:`ModelResults` per model, in the
    order the models were routed, and the earlier results they supersede (SOP UIDs)."""

    models: list[ModelResults] = field(default_factory=list)
    supersedes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[ModelResults]:
        return iter(self.models)

    def __bool__(self) -> bool:
        return bool(self.models)

    def model(self, name: str) -> ModelResults | None:
        return next((m for m in self.models if m.model == name), None)

    def file(self, model: str, kind: str) -> ResultFile | None:
        found = self.model(model)
        return None if found is None else found.files.get(kind)

    @property
    def model_names(self) -> str:
        """The models, comma-separated, as the job listing shows them."""
        return ", ".join(m.model for m in self.models)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "models": {
                m.model: {
                    "files": {
                        k: {"path": f.path, "sop_uid": f.sop_uid} for k, f in m.files.items()
                    },
                    "volumes_ml": dict(m.volumes_ml),
                    "algorithm": dict(m.algorithm),
                }
                for m in self.models
            }
        }
        if self.supersedes:
            out["supersedes"] = list(self.supersedes)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> SeriesResults:
        """Read what :meth:`to_json` wrote."""
        data = data or {}
        return cls(
            models=[
                ModelResults(
                    model=name,
                    files={
                        kind: ResultFile(str(f["path"]), str(f["sop_uid"]))
                        for kind, f in (entry.get("files") or {}).items()
                    },
                    volumes_ml={k: float(v) for k, v in (entry.get("volumes_ml") or {}).items()},
                    algorithm={k: str(v) for k, v in (entry.get("algorithm") or {}).items()},
                )
                for name, entry in (data.get("models") or {}).items()
            ],
            supersedes=list(data.get("supersedes", [])),
        )

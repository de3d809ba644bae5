"""Typed results: every model's files and volumes survive the job database, and rows written
before results were per model still read."""

from dicom_node.state.results import ModelResults, ResultFile, SeriesResults


def _two_models() -> SeriesResults:
    return SeriesResults(
        models=[
            ModelResults(
                "spleen",
                {
                    "SEG": ResultFile("/r/seg-1.dcm", "1.2.1"),
                    "SR": ResultFile("/r/sr-3.dcm", "1.2.3"),
                },
                {"spleen": 212.5},
            ),
            ModelResults(
                "liver", {"SEG": ResultFile("/r/seg-11.dcm", "1.2.11")}, {"liver": 1500.0}
            ),
        ],
        supersedes=["1.2.0"],
    )


def test_round_trip_keeps_every_model_in_order():
    results = _two_models()
    back = SeriesResults.from_json(results.to_json())
    assert back == results
    assert back.model_names == "spleen, liver"
    assert back.file("liver", "SEG") == ResultFile("/r/seg-11.dcm", "1.2.11")
    assert back.model("spleen").kinds() == ["SEG", "SR"]  # in RESULT_KINDS order
    assert back.file("liver", "SR") is None and back.model("kidney") is None


def test_rows_of_one_model_at_the_top_level_still_read():
    legacy = {
        "model": "spleen",
        "files": {"SEG": {"path": "/r/seg.dcm", "sop_uid": "1.9"}},
        "volumes_ml": {"spleen": 99.0},
    }
    (only,) = SeriesResults.from_json(legacy)
    assert only == ModelResults(
        "spleen", {"SEG": ResultFile("/r/seg.dcm", "1.9")}, {"spleen": 99.0}
    )


def test_no_results_is_empty_and_false():
    for data in (None, {}, {"models": {}}):
        assert not SeriesResults.from_json(data)

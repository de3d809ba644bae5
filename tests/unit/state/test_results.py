"""Typed results: every model's files and volumes survive the job database."""

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
    assert back.model("spleen").kinds() == ["SEG", "SR"]  # in the order they were made
    assert back.file("liver", "SR") is None and back.model("kidney") is None


def test_no_results_is_empty_and_false():
    for data in (None, {}, {"models": {}}):
        assert not SeriesResults.from_json(data)

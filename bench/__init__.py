"""Benchmarks of dicom-node: each module has run() -> list[dict] and main()."""

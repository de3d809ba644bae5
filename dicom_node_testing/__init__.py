"""Synthetic data for the tests, the benchmarks and the demo bundles: abdominal CT phantoms
(:mod:`.phantom`) and DICOM series written from them (:mod:`.synthetic`).

Not part of the node: nothing in :mod:`dicom_node` imports it.
"""

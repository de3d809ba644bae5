"""What an encoder worker needs, loaded once in the fork server its workers are forked from
(:mod:`dicom_node.encode.processes`): the encoders, and highdicom's tables of the standard
read and shared as the node does at start-up, so that no worker reads them for its first
object; then, as in the node, the heap so far is frozen, so that a worker's collections do
not walk the tables' million objects."""

import dicom_node.encode  # noqa: F401 - the encoders and what they import
from dicom_node.common.heap import freeze_heap
from dicom_node.common.standard_tables import load_standard_tables

load_standard_tables()
freeze_heap()

"""dicom-node: a DICOM node that segments CT series with MONAI on Triton.

receive (scp) -> store (spool, jobs) -> assemble (volume) -> infer (pipeline, inference)
-> encode (encode) -> send (export), wired together by :mod:`dicom_node.node`.
"""

__version__ = "0.1.0"

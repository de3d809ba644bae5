"""The Python-backend models Triton runs for the node: ``segmentation`` (the pipeline around
the network) and ``network`` (the bundle's network on batches of patches).

A model repository's ``model.py`` files only import these classes (see
:func:`dicom_node.inference.triton.repository.model_py`), so every model, hand-written or generated,
runs the code of the installed node.
"""

"""Export: results from the outbox to their destinations, never twice once acknowledged.

The sender (:mod:`.sender`) works through due outbox items and hands them to the transport of
each destination's type (:mod:`.transport`: C-STORE in :mod:`.dimse`, STOW-RS in
:mod:`.dicomweb`); acknowledgements are journalled before they are committed. Destinations
that ask for it are then asked to commit to what they acknowledged (storage commitment,
:mod:`.commitment`).
"""

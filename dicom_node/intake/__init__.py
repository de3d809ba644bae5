"""Intake: instances in, durably, with the right DIMSE status.

The node's C-STORE SCP (:mod:`.scp`) and everything one C-STORE passes through before its
response: who may connect and how long a connection may take (:mod:`.connections`,
:mod:`.pynetdicom_tuning`), the data set as it arrived (:mod:`.received`), the ordered
checks that refuse it with a status and a reason (:mod:`.checks`, :mod:`.plausibility`), and
the durable write to the spool with its database row (:mod:`.storage`, :mod:`.spool`).

Intake knows nothing of what happens to a series afterwards: it emits events
(:mod:`.events`) that completion and assembly subscribe to.
"""

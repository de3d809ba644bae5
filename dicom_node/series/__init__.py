"""Series: from stored instances to a volume in patient coordinates.

When a series is complete (:mod:`.completion`: rules that act on an association's release
or on a timer), its slices staged while it arrived (:mod:`.assembly`), and the volume with
its geometry and the checks that turn "not a volume" into a reason (:mod:`.volume`).
"""

"""Association slots: who may take one, and which idle associations give theirs back."""

from __future__ import annotations

from dicom_node.intake.connections import AssociationSlots


class _Association:
    """What the slots read of a pynetdicom association."""

    def __init__(self) -> None:
        self.ident = None
        self.is_established = True
        self.dul = type("dul", (), {"socket": None})()

    def is_alive(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_address_with_an_association_leaves_the_reserved_slots_to_others():
    slots = AssociationSlots(total=4, reserved=2)
    a, b, c, d = (_Association() for _ in range(4))
    assert slots.acquire(a, "10.0.0.1") == ""
    assert slots.acquire(b, "10.0.0.1") == ""  # three free, more than the reserved two
    assert "kept for other addresses" in slots.acquire(c, "10.0.0.1")
    assert slots.acquire(c, "10.0.0.2") == "" and slots.acquire(d, "10.0.0.3") == ""
    assert "all 4 association slots are held" in slots.acquire(_Association(), "10.0.0.4")
    slots.release(a)
    assert slots.held() == 3 and slots.acquire(_Association(), "10.0.0.4") == ""


def test_idle_associations_give_their_slots_back_only_when_slots_are_short():
    clock = _Clock()
    slots = AssociationSlots(total=4, reserved=1, clock=clock)
    quiet, working = _Association(), _Association()
    slots.acquire(quiet, "10.0.0.1")
    slots.acquire(working, "10.0.0.2")
    clock.now = 30.0
    assert slots.idle(20.0) == []  # two of four free: nobody waits for a slot
    slots.acquire(_Association(), "10.0.0.3")  # one free now, the reserved one
    slots.touch(working, busy=True)  # a data set is arriving on it
    assert slots.idle(20.0) == [quiet]
    slots.touch(working, busy=False)
    clock.now = 45.0
    assert slots.idle(20.0) == [quiet]  # its work ended 15 s ago: not idle yet

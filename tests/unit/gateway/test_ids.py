"""Request and record ids: random, unique, in `uuid4().hex`'s format, and
never repeated by a forked child."""

from __future__ import annotations

import os
import uuid

from gateway.ids import new_id


def test_ids_are_version_4_uuids_in_hex() -> None:
    for _ in range(600):  # more than one batch of kernel randomness
        value = new_id()
        parsed = uuid.UUID(value)
        assert value == parsed.hex
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat_across_batches() -> None:
    ids = [new_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_id()  # the parent holds a partly used batch
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once
        os.close(read_end)
        os.write(write_end, "".join(new_id() for _ in range(4)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode()
    os.waitpid(pid, 0)
    parent = "".join(new_id() for _ in range(4))
    child_ids = {child[i : i + 32] for i in range(0, len(child), 32)}
    parent_ids = {parent[i : i + 32] for i in range(0, len(parent), 32)}
    assert len(child_ids) == 4
    assert not child_ids & parent_ids

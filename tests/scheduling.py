"""pytest-xdist's `--dist loadfile`, except that the test files in `ALONE` run last, with the other
workers done: they start whole Ray clusters, whose processes took twice as long (97 s against 56 s)
while another worker's exports held the second core."""

from __future__ import annotations

from xdist.scheduler import LoadFileScheduling

ALONE = frozenset({"tests/test_ray_serve.py"})


class AloneLastScheduling(LoadFileScheduling):
    def _assign_work_unit(self, node) -> None:
        for scope in [scope for scope in self.workqueue if scope in ALONE]:
            self.workqueue.move_to_end(scope)
        if next(iter(self.workqueue)) not in ALONE:
            super()._assign_work_unit(node)
            return
        # Only ALONE files are left. A worker holds its last test until it is sent more work or told
        # to stop, so "the other workers are done" means each has at most one test pending.
        others = [other for other in self.nodes if other is not node and not other.shutting_down]
        if any(self._pending_of(self.assigned_work[other]) > 1 for other in others):
            return  # the last of their tests to finish calls this again
        super()._assign_work_unit(node)
        for other in others:  # the rest of the ALONE files go to `node` too
            other.shutdown()

"""Admission queues in front of each model pool: priority classes weighted
against each other, tenants treated fairly within a class, bounded waits.

- ``scheduler``: who gets the next free slot (pure data structures).
- ``pool``: slots, waiting, deadlines and disconnects for one pool (asyncio).
- ``registry``: one queue per pool, reconfigured on policy reload.
- ``classes``: a request's priority class.
"""

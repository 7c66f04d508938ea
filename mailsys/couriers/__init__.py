"""Couriers: what carries a queued message to its next hop.

Every courier answers ``deliver(sender, recipients, message, params)`` with a
Deferred of one :class:`mailsys.delivery.Outcome` per recipient, in order, and
never fails: trouble of any kind is a :class:`~mailsys.delivery.TempFail`.
"""

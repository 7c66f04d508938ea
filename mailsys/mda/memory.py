"""An in-memory store: the fake that the store contract tests also run on."""
import zlib

from zope.interface import implementer

from mailsys.delivery import Delivered, PermFail
from mailsys.mda.store import IMailStore
from mailsys.smtp.reply import Reply


@implementer(IMailStore)
class MemoryStore:
    kind = "memory"

    def __init__(self):
        self.boxes = {}
        self.fail_with = None    # an Outcome to return instead of storing (fault injection)

    def size(self, path):
        return sum(len(m) for m in self.boxes.get(path, ()))

    def deliver(self, path, prefix, message, quota, sender=None, when=None):
        if self.fail_with is not None:
            return self.fail_with
        data = prefix + bytes(message)
        if quota and self.size(path) + len(data) > quota:
            return PermFail(Reply(552, "5.2.2", "Mailbox full: over quota"))
        self.boxes.setdefault(path, []).append(data)
        return Delivered()

    def deliver_many(self, items, log=None, keys=None):
        outcomes = []
        for i, item in enumerate(items):
            outcome = self.deliver(*item)
            outcomes.append(outcome)
            if outcome.delivered and log is not None and keys and keys[i]:
                box = self.boxes[item[0]]
                log.write([keys[i] + (item[0], [len(box) - 1, zlib.crc32(box[-1])])])
        return outcomes

    def holds(self, path, where):
        index, crc = where
        box = self.boxes.get(path, ())
        return 0 <= index < len(box) and zlib.crc32(box[index]) == crc

    def messages(self, path):
        return list(self.boxes.get(path, ()))

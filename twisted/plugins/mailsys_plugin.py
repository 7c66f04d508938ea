"""twistd plugin for mailsys: ``twistd -n mailsys [--config PATH]``.

Kept tiny and lazy on purpose: twistd imports every plugin module on each start,
so nothing from mailsys is imported until the mailsys service is actually chosen.
"""
from twisted.application.service import ServiceMaker

mailsys = ServiceMaker(
    "mailsys",
    "mailsys.tap",
    "A complete mail host: MTA, MSA, queue, LMTP MDA and POP3.",
    "mailsys",
)

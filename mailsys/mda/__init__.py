"""The MDA: an LMTP server that delivers into Maildir and mbox stores."""

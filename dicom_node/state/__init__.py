"""State: the job database, the one place the node's durable bookkeeping lives.

Series with their states, instances with their recorded geometry, the results each
destination is owed (the outbox) and the acknowledgement journal, each a repository over
one SQLite database (WAL). The spool on disk stays the source of truth for received
instances; this database indexes it.
"""

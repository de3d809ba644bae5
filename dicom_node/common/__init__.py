"""Small pieces every stage may use: back-off, memory, TLS, credentials, the standard's
tables, durable file writes and network addresses. Nothing here knows a stage."""
